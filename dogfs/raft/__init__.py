"""Raft consensus: a pure core with no I/O, LMDB log storage, a Twisted driver and a simulator.

May import dogfs.wire and dogfs.storage only.
"""
