# -*- test-case-name: tests.test_security_tokens -*-
"""Block tokens: proof, checked by a chunk server, that a shard upload was allocated.

The certificate's role says that a ``user`` may write; it cannot say *what*. Without more, a
user identity could send ``PutShard`` for any shard id, and so overwrite a shard of another
file with bytes whose checksums it computed itself: a read would return them without a word.
HDFS closes the same hole with block access tokens, and so does DogFS:

- The metadata group keeps a secret, the *block key* (32 random bytes, chosen by the first
  leader with ``SetBlockKey`` and replicated like the rest of the namespace).
- Every ``Allocation`` carries the token of its block group, an HMAC-SHA256 of the block
  group id under that key, which every member computes alike.
- Chunk servers learn the key from their heartbeat replies (sent only to the ``node``
  identities that heartbeats require) and keep it in ``DATA/block_key``. With TLS, a
  ``PutShard`` from any identity but a ``node`` must carry the token of the shard's block
  group: so an upload can only write the block groups the metadata allocated to it.

Node identities (repair, moves between chunk servers) need no token: a node may already act
as a cluster member. Without TLS nothing is checked, as for every other permission.

A token names a block group, not a time: block group ids are never reused, and a chunk server
takes a client's shard once, so a token lets its holder write only the shards of the upload it
was given for, once each.

Depends on nothing of DogFS.
"""

from __future__ import annotations

import hashlib
import hmac
import string

__all__ = ["BLOCK_KEY_HEX", "block_token", "valid_block_key", "valid_block_token"]

#: Length of a block key in hex digits (32 bytes).
BLOCK_KEY_HEX = 64
#: Length of a token in hex digits (the first 16 bytes of the HMAC, as HDFS's 128-bit ones).
_TOKEN_HEX = 32
_CONTEXT = b"dogfs block write token\0"
_HEX = frozenset(string.hexdigits.lower())


def valid_block_key(key: object) -> bool:
    """Whether ``key`` is a block key: 64 lower-case hex digits."""
    return isinstance(key, str) and len(key) == BLOCK_KEY_HEX and _HEX.issuperset(key)


def block_token(key: str, bg_id: int) -> str:
    """The token that lets its holder write the shards of block group ``bg_id``."""
    mac = hmac.new(bytes.fromhex(key), _CONTEXT + bg_id.to_bytes(8, "big"), hashlib.sha256)
    return mac.hexdigest()[:_TOKEN_HEX]


def valid_block_token(key: str, bg_id: int, token: object) -> bool:
    """Whether ``token`` is block group ``bg_id``'s under ``key`` (in constant time)."""
    if not isinstance(token, str) or len(token) != _TOKEN_HEX or not 0 <= bg_id < 1 << 64:
        return False
    if not _HEX.issuperset(token):  # compare_digest refuses a str that is not ASCII
        return False
    return hmac.compare_digest(block_token(key, bg_id), token)
