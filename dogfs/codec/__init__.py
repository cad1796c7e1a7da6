"""Reed-Solomon erasure coding (pyeclib, ISA-L) stripe by stripe, with per-cell CRC32C.

Depends on nothing else in DogFS.
"""
