# -*- test-case-name: tests.test_wire_frame -*-
"""Tests for dogfs.wire.frame: the length-prefixed framing."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dogfs.wire.frame import (
    DIRECT_READ_MIN,
    PREFIX,
    BufferPool,
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
        """Flags come back as their bits (Flags values compare equal)."""
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


def read_all(decoder: FrameDecoder, data: bytes, step: int) -> list:
    """Feed `data` like Connection._read_socket: into the target when there is one."""
    frames: list = []
    pos = 0
    while pos < len(data):
        target = decoder.read_target()
        if target is None:
            chunk = data[pos : pos + step]
            frames += decoder.feed(chunk)
        else:
            chunk = data[pos : pos + min(step, len(target))]
            target[: len(chunk)] = chunk
            frames += decoder.received_into(len(chunk))
        pos += len(chunk)
    return frames


class DirectReadTests(SynchronousTestCase):
    """`read_target` / `received_into`: large frames read straight into their own buffer."""

    def big_frame(self, payload_size: int = DIRECT_READ_MIN * 3, rid: int = 7) -> bytes:
        payload = bytes(random.Random(rid).randbytes(payload_size))
        return wire([(rid, 4, 9, b"hdr", payload)])

    def read(self, decoder: FrameDecoder, data: bytes, step: int) -> list:
        return read_all(decoder, data, step)

    def test_no_target_without_a_large_frame_under_way(self) -> None:
        """Between frames, or for a small frame, there is no target: reads go through feed."""
        decoder = FrameDecoder()
        self.assertIsNone(decoder.read_target())
        small = wire([(1, 0, 2, b"h", b"x" * 100)])
        decoder.feed(small[:20])
        self.assertIsNone(decoder.read_target())

    def test_large_frame_read_into_its_buffer(self) -> None:
        """After the prefix, the rest of a large frame is one target holding what came first."""
        data = self.big_frame()
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(data[:1000]), [])
        target = decoder.read_target()
        assert target is not None
        self.assertEqual(len(target), len(data) - 1000)
        self.assertEqual(decoder.buffered, 1000)
        target[:] = data[1000:]
        frames = decoder.received_into(len(target))
        self.assertEqual(decoded(frames), [(7, 4, 9, b"hdr", data[16 + 3 :])])
        self.assertEqual(decoder.buffered, 0)
        self.assertIsNone(decoder.read_target())

    def test_target_shrinks_as_it_fills(self) -> None:
        """Each partial read leaves a target for exactly the bytes still to come."""
        data = self.big_frame()
        decoder = FrameDecoder()
        decoder.feed(data[:PREFIX.size])
        target = decoder.read_target()
        assert target is not None
        target[:5000] = data[PREFIX.size : PREFIX.size + 5000]
        self.assertEqual(decoder.received_into(5000), [])
        rest = decoder.read_target()
        assert rest is not None
        self.assertEqual(len(rest), len(data) - PREFIX.size - 5000)
        self.assertEqual(decoder.buffered, PREFIX.size + 5000)

    @settings(deadline=None, max_examples=40)
    @given(
        st.lists(st.tuples(st.integers(0, 5), st.integers(0, DIRECT_READ_MIN * 2)), min_size=1, max_size=6),
        st.integers(1, DIRECT_READ_MIN // 2),
    )
    def test_mixed_sizes_and_splits(self, shapes: list, step: int) -> None:
        """Small and large frames in any read size decode as with feed alone."""
        rnd = random.Random(len(shapes) * 1000 + step)
        frames = [(i, flags, 3, b"h" * i, rnd.randbytes(size)) for i, (flags, size) in enumerate(shapes)]
        data = wire(frames)
        self.assertEqual(decoded(self.read(FrameDecoder(), data, step)), frames)

    def test_limits_checked_before_any_target(self) -> None:
        """An oversized frame fails in feed, from its prefix; no buffer is ever offered."""
        decoder = FrameDecoder(FrameLimits(max_payload=DIRECT_READ_MIN))
        data = encode_frame(1, 0, 2, 1, b"", DIRECT_READ_MIN * 4)
        self.assertRaises(FrameTooLarge, decoder.feed, data)
        self.assertIsNone(decoder.read_target())

    def test_misuse_refused(self) -> None:
        """A count larger than the target, or feed() in the middle of a direct read, raise."""
        data = self.big_frame()
        decoder = FrameDecoder()
        decoder.feed(data[:100])
        target = decoder.read_target()
        assert target is not None
        self.assertRaises(ValueError, decoder.received_into, len(target) + 1)
        self.assertRaises(RuntimeError, decoder.feed, b"more")
        fresh = FrameDecoder()
        self.assertRaises(ValueError, fresh.received_into, 1)


class BufferPoolTests(SynchronousTestCase):
    """Direct-read buffers are reused only once no view of them is alive."""

    def test_reused_only_when_free(self) -> None:
        """A buffer a view still refers to is never handed out again; once it is gone, it is."""
        pool = BufferPool(max_buffers=4, max_bytes=1 << 20)
        view = memoryview(pool.get(1000))[10:20]
        first_id = id(view.obj)
        other = pool.get(1000)
        self.assertNotEqual(id(other), first_id)
        del other
        del view
        again = pool.get(1000)
        self.assertEqual(id(again), first_id)  # the first free one, in the order kept
        self.assertGreaterEqual(len(again), 1000)
        smaller = pool.get(900)  # a free buffer of up to twice the size serves
        self.assertLessEqual(len(smaller), 1800)
        self.assertNotEqual(id(smaller), id(again))

    def test_bounded(self) -> None:
        """The pool keeps at most max_buffers buffers and max_bytes bytes."""
        pool = BufferPool(max_buffers=2, max_bytes=10_000)
        held = [pool.get(3000) for _ in range(5)]
        self.assertEqual(len(pool._buffers), 2)
        self.assertLessEqual(pool._bytes, 10_000)
        self.assertEqual(len({id(b) for b in held}), 5)

    def test_held_payloads_never_overwritten(self) -> None:
        """Payloads kept by a consumer stay intact while later frames reuse the pool."""
        rnd = random.Random(12)
        payloads = [rnd.randbytes(DIRECT_READ_MIN * 2) for _ in range(12)]
        data = wire([(i, 0, 3, b"h", p) for i, p in enumerate(payloads)])
        frames = read_all(FrameDecoder(), data, 50_000)
        kept = {i: f.payload for i, f in enumerate(frames)}
        del frames
        for _ in range(3):
            for i in list(kept)[::3]:
                del kept[i]  # let some go: their buffers return to the pool
            more = read_all(FrameDecoder(), data, 70_000)
            self.assertEqual([bytes(f.payload) for f in more], payloads)
            for i, payload in kept.items():
                self.assertEqual(bytes(payload), payloads[i])
