"""On-disk storage: shard files on chunk servers and LMDB helpers.

Depends on nothing else in DogFS.
"""
