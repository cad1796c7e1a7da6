"""The chunk server daemon: shard RPCs, heartbeats, garbage collection.
"""
