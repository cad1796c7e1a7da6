# -*- test-case-name: tests.test_security_sealed -*-
"""Tests for dogfs.security.sealed: one direction's sealing and opening of frames."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dogfs.security.sealed import (
    HEADER,
    MAX_PLAINTEXT,
    TAG,
    Opener,
    SealedFrameError,
    directions,
)


def _exported(seed: int) -> bytes:
    return random.Random(seed).randbytes(64)


class SealedFrameTests(SynchronousTestCase):
    """What one end seals, the other opens, once, in order, and nothing else opens."""

    def setUp(self) -> None:
        self.client_sealer, self.client_opener = directions(_exported(1), is_client=True)
        self.server_sealer, self.server_opener = directions(_exported(1), is_client=False)

    def test_round_trip_both_ways(self) -> None:
        """Frames of every size from 1 byte to the limit open to what was sealed."""
        rng = random.Random(2)
        for size in (1, 15, 16, 17, 16384, 1 << 20, MAX_PLAINTEXT):
            data = rng.randbytes(size)
            header, body = self.client_sealer.seal(data)
            self.assertEqual(HEADER.unpack(header), (size,))
            self.assertEqual(len(body), size + TAG)
            self.assertEqual(Opener.body_size(header), size + TAG)
            self.assertEqual(self.server_opener.open(header, body), data)
            header, body = self.server_sealer.seal(memoryview(data))
            into = bytearray(size)
            self.client_opener.open_into(header, body, into)
            self.assertEqual(bytes(into), data)

    def test_directions_have_their_own_keys(self) -> None:
        """A frame the client sealed does not open as the server's, nor the other way."""
        header, body = self.client_sealer.seal(b"to the server")
        self.assertRaises(SealedFrameError, self.client_opener.open, header, body)
        header, body = self.server_sealer.seal(b"to the client")
        self.assertRaises(SealedFrameError, self.server_opener.open, header, body)

    def test_same_plaintext_seals_differently(self) -> None:
        """Each frame has its own nonce: the same bytes twice give different ciphertexts."""
        first = self.client_sealer.seal(b"x" * 64)
        second = self.client_sealer.seal(b"x" * 64)
        self.assertNotEqual(first[1], second[1])

    def test_replayed_reordered_and_dropped_frames_fail(self) -> None:
        """The sequence number is in the nonce: a frame opened twice, out of order, or after
        a dropped one fails its tag."""
        frames = [self.client_sealer.seal(bytes([i]) * 100) for i in range(4)]
        self.assertEqual(self.server_opener.open(*frames[0]), b"\x00" * 100)
        self.assertRaises(SealedFrameError, self.server_opener.open, *frames[0])  # replayed
        _, opener = directions(_exported(1), is_client=False)
        self.assertRaises(SealedFrameError, opener.open, *frames[1])  # reordered / dropped

    def test_tampering_fails(self) -> None:
        """A flipped bit in the body or the length fails the tag; nothing is returned."""
        header, body = self.client_sealer.seal(b"payload" * 10)
        for i in (0, len(body) // 2, len(body) - 1):
            _, opener = directions(_exported(1), is_client=False)
            changed = bytearray(body)
            changed[i] ^= 1
            self.assertRaises(SealedFrameError, opener.open, header, bytes(changed))
        _, opener = directions(_exported(1), is_client=False)
        self.assertRaises(SealedFrameError, opener.open, HEADER.pack(71), body[:-1] + b"\0\0")

    def test_other_connection_does_not_open(self) -> None:
        """Keys come from the connection's exporter: another connection's frames fail."""
        header, body = self.client_sealer.seal(b"secret")
        _, stranger = directions(_exported(2), is_client=False)
        self.assertRaises(SealedFrameError, stranger.open, header, body)

    def test_close_frame(self) -> None:
        """The close frame carries nothing, opens to b"", and a forged one fails."""
        close = self.client_sealer.close()
        self.assertEqual(len(close), HEADER.size + TAG)
        self.assertEqual(self.server_opener.open(close[:4], close[4:]), b"")
        self.assertRaises(SealedFrameError, self.server_opener.open, HEADER.pack(0), b"\0" * TAG)

    def test_limits(self) -> None:
        """Empty and oversized plaintexts are refused when sealing; a header announcing more
        than the limit is refused before anything is allocated for it."""
        self.assertRaises(ValueError, self.client_sealer.seal, b"")
        self.assertRaises(ValueError, self.client_sealer.seal, bytes(MAX_PLAINTEXT + 1))
        error = self.assertRaises(SealedFrameError, Opener.body_size, HEADER.pack(MAX_PLAINTEXT + 1))
        self.assertIn("the most is", str(error))
        self.assertRaises(ValueError, directions, b"short", True)

    def test_rekey(self) -> None:
        """After `rekey_bytes` in one direction both ends move to the next key together; the
        sequence starts again, and frames under the new key open only with it."""
        sealer, _ = directions(_exported(3), is_client=True, rekey_bytes=1000)
        _, opener = directions(_exported(3), is_client=False, rekey_bytes=1000)
        _, never = directions(_exported(3), is_client=False, rekey_bytes=1 << 40)
        sent = [bytes([i]) * 300 for i in range(10)]
        for i, data in enumerate(sent):
            frame = sealer.seal(data)
            self.assertEqual(opener.open(*frame), data)
            if i < 4:  # 4 x 300 bytes: the first key seals the first four frames
                self.assertEqual(never.open(*frame), data)
        self.assertEqual(sealer.generation, 2)
        self.assertEqual(opener.generation, 2)
        self.assertEqual(sealer.sequence, 2)
        self.assertRaises(SealedFrameError, never.open, *sealer.seal(b"after the rekey"))


class SealedFuzzTests(SynchronousTestCase):
    """Arbitrary bytes as a frame never open and never raise anything but SealedFrameError."""

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(header=st.binary(min_size=4, max_size=4), body=st.binary(min_size=TAG, max_size=200))
    def test_garbage_does_not_open(self, header: bytes, body: bytes) -> None:
        _, opener = directions(_exported(4), is_client=False)
        try:
            size = Opener.body_size(header)
        except SealedFrameError:
            self.assertGreater(HEADER.unpack(header)[0], MAX_PLAINTEXT)
            return
        self.assertEqual(size, HEADER.unpack(header)[0] + TAG)
        self.assertRaises(SealedFrameError, opener.open, header, body)

    @settings(max_examples=100, deadline=None, derandomize=True)
    @given(data=st.binary(min_size=1, max_size=4096), flip=st.integers(min_value=0))
    def test_any_flipped_bit_fails(self, data: bytes, flip: int) -> None:
        sealer, _ = directions(_exported(5), is_client=True)
        _, opener = directions(_exported(5), is_client=False)
        header, body = sealer.seal(data)
        frame = bytearray(header + body)
        bit = flip % (len(frame) * 8)
        frame[bit // 8] ^= 1 << (bit % 8)
        try:
            size = Opener.body_size(bytes(frame[:4]))
        except SealedFrameError:
            return
        if size != len(body):
            return  # the reader would wait for, or misframe, a different body: its tag fails too
        self.assertRaises(SealedFrameError, opener.open, bytes(frame[:4]), bytes(frame[4:]))
