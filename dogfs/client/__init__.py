"""The Twisted client API: metadata calls and parallel shard transfers.
"""
