# -*- test-case-name: tests.test_wire_frame -*-
"""Tests for dogfs.wire.frame: the length-prefixed framing."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dogfs.wire.frame import (
    PREFIX,
    Flags,
    FrameDecoder,
    FrameError,
    FrameLimits,
    FrameTooLarge,
    encode_frame,
)

frames_strategy = st.lists(
    st.tuples(
        st.integers(0, 2**32 - 1),
        st.sampled_from([0, 1, 2, 4, 5, 8]),
        st.integers(0, 2**16 - 1),
        st.binary(max_size=64),
        st.binary(max_size=3000),
    ),
    max_size=12,
)


def wire(frames: list[tuple[int, int, int, bytes, bytes]]) -> bytes:
    return b"".join(
        encode_frame(1, flags, type_, rid, header, len(payload)) + header + payload
        for rid, flags, type_, header, payload in frames
    )


def decoded(frames: list) -> list[tuple[int, int, int, bytes, bytes]]:
    return [(f.request_id, int(f.flags), f.type, f.header, bytes(f.payload)) for f in frames]


class FrameDecoderTests(SynchronousTestCase):
    """The decoder returns exactly the frames that were encoded, however bytes are split."""

    @settings(deadline=None, max_examples=60)
    @given(frames_strategy)
    def test_one_byte_at_a_time(self, frames: list) -> None:
        """Feeding one byte per call yields every frame intact and in order."""
        data = wire(frames)
        decoder = FrameDecoder()
        out = []
        for i in range(len(data)):
            out.extend(decoder.feed(data[i : i + 1]))
        self.assertEqual(decoded(out), frames)
        self.assertEqual(decoder.buffered, 0)

    @settings(deadline=None, max_examples=100)
    @given(frames_strategy, st.randoms(use_true_random=False))
    def test_random_splits(self, frames: list, rnd: random.Random) -> None:
        """Feeding chunks of random sizes (including empty ones) yields the same frames."""
        data = wire(frames)
        decoder = FrameDecoder()
        out = []
        pos = 0
        while pos < len(data):
            n = rnd.randint(0, 700)
            out.extend(decoder.feed(data[pos : pos + n]))
            pos += n
        self.assertEqual(decoded(out), frames)

    def test_flags_decoded(self) -> None:
        """Flags come back as the Flags enum."""
        [frame] = FrameDecoder().feed(encode_frame(1, Flags.RESPONSE | Flags.MORE, 9, 7, b"h", 0) + b"h")
        self.assertEqual(frame.flags, Flags.RESPONSE | Flags.MORE)
        self.assertEqual(frame.version, 1)

    def test_oversized_frame_refused_from_its_prefix(self) -> None:
        """A frame announcing more than the limit fails as soon as the prefix arrives."""
        limits = FrameLimits(max_header=100, max_payload=1000)
        decoder = FrameDecoder(limits)
        prefix = PREFIX.pack(limits.max_frame + 1, 1, 0, 3, 1, 0)
        self.assertRaises(FrameTooLarge, decoder.feed, prefix)

    def test_oversized_header_refused(self) -> None:
        """A header longer than max_header is refused even if the frame fits."""
        limits = FrameLimits(max_header=100, max_payload=1000)
        prefix = PREFIX.pack(12 + 200, 1, 0, 3, 1, 200)
        self.assertRaises(FrameTooLarge, FrameDecoder(limits).feed, prefix)

    def test_oversized_payload_refused(self) -> None:
        """A payload longer than max_payload is refused from the prefix."""
        limits = FrameLimits(max_header=100, max_payload=1000)
        prefix = PREFIX.pack(12 + 10 + 1001, 1, 0, 3, 1, 10)
        self.assertRaises(FrameTooLarge, FrameDecoder(limits).feed, prefix)

    def test_header_overruns_frame(self) -> None:
        """A header length larger than the frame is a framing error."""
        prefix = PREFIX.pack(12 + 5, 1, 0, 3, 1, 6)
        self.assertRaises(FrameError, FrameDecoder().feed, prefix)

    def test_short_length(self) -> None:
        """A length smaller than the fixed part is a framing error."""
        prefix = PREFIX.pack(3, 1, 0, 3, 1, 0)
        self.assertRaises(FrameError, FrameDecoder().feed, prefix)

    @settings(deadline=None, max_examples=200)
    @given(st.binary(min_size=16, max_size=200))
    def test_garbage_never_crashes(self, data: bytes) -> None:
        """Random bytes either decode as frames or raise FrameError, nothing else."""
        decoder = FrameDecoder(FrameLimits(max_header=1024, max_payload=4096))
        try:
            decoder.feed(data)
        except FrameError:
            pass
        self.assertLessEqual(decoder.buffered, len(data))
