# -*- test-case-name: tests.test_security_sealed -*-
"""Sealed frames: how a DogFS TLS connection carries its bytes once the handshake is done.

TLS 1.3 does two jobs: its handshake authenticates both ends (certificates from the cluster
CA) and agrees on secrets; its record layer then protects the bytes, 16 KiB at a time.
Through pyOpenSSL's memory BIOs the record layer costs several passes over every byte on top
of the cipher (OpenSSL copies each record into and out of its buffers, and zero-fills the
memory BIO it writes to), plus a Python call per 16 KiB record: on the data path that is most
of what TLS costs, more than AES-GCM itself (docs/security.md, bench/tls.py).

A connection whose two ends offer the ALPN protocol :data:`ALPN` and negotiate TLS 1.3 keeps
the handshake and replaces the record layer, as QUIC (RFC 9001) and kernel TLS do:

- both ends derive keys from the TLS exporter (RFC 8446 section 7.5), which is bound to
  this handshake's transcript: one secret per direction, never used by anything else;
- each end writes :data:`MARKER` as its last TLS record; what follows it on the stream is
  sealed frames. A TLS record the peer sends before its marker (a session ticket) is read
  by OpenSSL as usual;
- a sealed frame is a 4-byte big-endian length ``n`` then ``n`` bytes of AES-128-GCM
  ciphertext and its 16-byte tag. The nonce is the direction's IV XOR the frame's sequence
  number (as TLS 1.3 builds it), and the length is the associated data: a frame changed,
  dropped, replayed, reordered or moved to the other direction fails its tag;
- ``n`` is at most :data:`MAX_PLAINTEXT` (4 MiB), so a 1 MiB cell is one frame: one cipher
  call writing straight into the buffer sent, and one reading straight into the
  application's;
- a frame of length 0 closes the stream, as TLS's close_notify does: a connection that ends
  without one was cut, and is reported as lost, not done;
- every :data:`REKEY_BYTES` (64 GiB) in one direction, both ends move to the next key
  (HKDF-Expand of the last secret), well inside AES-GCM's limits (RFC 8446 section 5.5).

The two classes here hold one direction's state each and nothing else (no I/O); the TLS
protocol in :mod:`dogfs.security.tls` drives them.
"""

from __future__ import annotations

import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

__all__ = [
    "ALPN",
    "HEADER",
    "MARKER",
    "MAX_PLAINTEXT",
    "REKEY_BYTES",
    "TAG",
    "Opener",
    "SealedFrameError",
    "Sealer",
    "directions",
]

#: The ALPN protocol both ends offer to use sealed frames after the handshake.
ALPN = b"dogfs-sealed/1"
#: Each end's last TLS application record: the stream is sealed frames after it.
MARKER = b"DOGFS-SEALED/1\r\n"
#: RFC 8446 exporter label (RFC 5705 asks for the "EXPORTER" prefix).
EXPORTER_LABEL = b"EXPORTER-dogfs-sealed-frames"
#: The frame header: the plaintext's length, also the frame's associated data.
HEADER = struct.Struct(">I")
#: AES-GCM's tag.
TAG = 16
#: The largest plaintext one frame carries.
MAX_PLAINTEXT = 4 << 20
#: Plaintext bytes one key seals before both ends move to the next.
REKEY_BYTES = 1 << 36

_SECRET = 32
_KEY = 16
_IV = 12


class SealedFrameError(Exception):
    """A sealed frame that does not open: malformed, too long, or failing its tag."""


def _expand(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


class _Direction:
    """One direction's key schedule: key, IV, sequence number, bytes under this key."""

    def __init__(self, secret: bytes, rekey_bytes: int) -> None:
        self._rekey_bytes = rekey_bytes
        #: How many times this direction has moved to a new key.
        self.generation = -1
        self._use(secret)

    def _use(self, secret: bytes) -> None:
        self._secret = secret
        self._aead = AESGCM(_expand(secret, b"dogfs sealed key", _KEY))
        self._iv = int.from_bytes(_expand(secret, b"dogfs sealed iv", _IV), "big")
        self.sequence = 0
        self._sealed = 0
        self.generation += 1

    def _next(self, size: int) -> tuple[AESGCM, bytes]:
        """The cipher and nonce for the next frame of ``size`` bytes; advances the schedule."""
        aead = self._aead
        nonce = (self._iv ^ self.sequence).to_bytes(_IV, "big")
        self.sequence += 1
        self._sealed += size
        if self._sealed >= self._rekey_bytes or self.sequence >= 1 << 32:
            self._use(_expand(self._secret, b"dogfs sealed next", _SECRET))
        return aead, nonce


class Sealer(_Direction):
    """Seals what this end sends."""

    def seal(self, data: Any) -> tuple[bytes, bytes]:
        """The header and the body (ciphertext and tag) of one frame carrying ``data``
        (a buffer of 1 to :data:`MAX_PLAINTEXT` bytes)."""
        size = len(data)
        if not 0 < size <= MAX_PLAINTEXT:
            raise ValueError(f"a sealed frame carries 1 to {MAX_PLAINTEXT} bytes, not {size}")
        header = HEADER.pack(size)
        aead, nonce = self._next(size)
        return header, aead.encrypt(nonce, data, header)

    def close(self) -> bytes:
        """The frame that ends the stream (length 0, tag only)."""
        header = HEADER.pack(0)
        aead, nonce = self._next(0)
        return header + aead.encrypt(nonce, b"", header)


class Opener(_Direction):
    """Opens what the peer sealed, in the order it sealed it."""

    @staticmethod
    def body_size(header: Any) -> int:
        """Bytes of body that follow ``header`` (4 bytes); raises SealedFrameError if the
        length is over :data:`MAX_PLAINTEXT`."""
        (size,) = HEADER.unpack(header)
        if size > MAX_PLAINTEXT:
            raise SealedFrameError(
                f"sealed frame of {size} bytes announced; the most is {MAX_PLAINTEXT}"
            )
        return size + TAG

    def open_into(self, header: bytes, body: Any, into: Any) -> None:
        """Decrypt ``body`` into ``into`` (``len(body) - 16`` writable bytes) and check its
        tag; on a bad frame ``into`` holds garbage and SealedFrameError is raised."""
        aead, nonce = self._next(len(body) - TAG)
        try:
            aead.decrypt_into(nonce, body, header, into)
        except InvalidTag:
            raise SealedFrameError("a sealed frame failed its integrity check") from None

    def open(self, header: bytes, body: Any) -> bytes:
        """The plaintext of ``body``; raises SealedFrameError on a bad frame."""
        aead, nonce = self._next(len(body) - TAG)
        try:
            return aead.decrypt(nonce, body, header)
        except InvalidTag:
            raise SealedFrameError("a sealed frame failed its integrity check") from None


def directions(
    exported: bytes, is_client: bool, rekey_bytes: int = REKEY_BYTES
) -> tuple[Sealer, Opener]:
    """This end's sealer and opener from ``exported`` (64 bytes of TLS exporter output for
    :data:`EXPORTER_LABEL`): the first 32 bytes key the client's direction, the rest the
    server's."""
    if len(exported) != 2 * _SECRET:
        raise ValueError(f"need {2 * _SECRET} exported bytes, got {len(exported)}")
    client, server = exported[:_SECRET], exported[_SECRET:]
    mine, theirs = (client, server) if is_client else (server, client)
    return Sealer(mine, rekey_bytes), Opener(theirs, rekey_bytes)
