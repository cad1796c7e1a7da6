# -*- test-case-name: tests.test_codec -*-
"""Tests for dogfs.codec: policies, CRC32C and stripe-by-stripe Reed-Solomon coding."""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import pickle
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dogfs.codec.checksum import crc32c, pack_crc, unpack_crc
from dogfs.codec.policy import DEFAULT_POLICY, MAX_WIDTH, ECPolicy, UnknownPolicy
from dogfs.codec.stripe import (
    EC_TYPE,
    FRAGMENT_HEADER_SIZE,
    BadFragment,
    CellSlice,
    NotEnoughFragments,
    StripeCodec,
    tune_malloc,
)

POLICIES = [ECPolicy(4, 2), ECPolicy(6, 3), ECPolicy(10, 4), ECPolicy(1, 1), ECPolicy(3, 1),
            ECPolicy(2, 5), ECPolicy(17, 15)]
# Small cells keep the property tests quick; one test below uses the 1 MiB default.
CELL = 1000


def interesting_lengths(codec: StripeCodec) -> list[int]:
    """Stripe lengths at every boundary that matters: cells, payload rounding, the stripe."""
    cell, stripe, k = codec.cell_size, codec.stripe_size, codec.k
    candidates = {1, 2, k - 1, k, k + 1, cell - 1, cell, cell + 1, 2 * cell + 1,
                  stripe - cell, stripe - 1, stripe, stripe // 2, stripe - k + 1}
    return sorted(n for n in candidates if 0 < n <= stripe)


def seeded_bytes(seed: int, n: int) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


class PolicyTests(SynchronousTestCase):
    """ECPolicy parses, names and bounds RS-K-M policies."""

    def test_parse_common(self) -> None:
        """The usual policies parse into (k, m) with their canonical name and width."""
        for text, k, m in [("RS-4-2", 4, 2), ("RS-6-3", 6, 3), ("RS-10-4", 10, 4),
                           ("rs-10-4", 10, 4), (" RS-1-1 ", 1, 1), ("RS-16-16", 16, 16)]:
            policy = ECPolicy.parse(text)
            self.assertEqual((policy.k, policy.m), (k, m))
            self.assertEqual(policy.name, f"RS-{k}-{m}")
            self.assertEqual(str(policy), policy.name)
            self.assertEqual(policy.width, k + m)
        self.assertEqual(DEFAULT_POLICY, ECPolicy.parse("RS-4-2"))

    def test_parse_rejects(self) -> None:
        """Malformed or unsupported names raise UnknownPolicy naming the value and the form."""
        for text in ["RS-4", "RS-4-2-1", "XOR-4-2", "RS-0-2", "RS-4-0", "RS-30-3", "RS-a-b",
                     "", "RS--4-2", "RS-4-2x", "RS-٤-2"]:
            with self.assertRaises(UnknownPolicy) as caught:
                ECPolicy.parse(text)
            message = str(caught.exception)
            self.assertIn(repr(text), message)
            self.assertIn("RS-K-M", message)
            self.assertIsInstance(caught.exception, ValueError)

    def test_construct_rejects(self) -> None:
        """The constructor applies the same bounds as parse."""
        for k, m in [(0, 1), (1, 0), (MAX_WIDTH, 1), (-1, 2)]:
            self.assertRaises(UnknownPolicy, ECPolicy, k, m)
        self.assertEqual(ECPolicy(MAX_WIDTH - 1, 1).width, MAX_WIDTH)

    def test_frozen_and_hashable(self) -> None:
        """Policies are values: equal by (k, m), usable as dict keys."""
        self.assertEqual({ECPolicy(4, 2): 1}[ECPolicy.parse("RS-4-2")], 1)
        self.assertNotEqual(ECPolicy(4, 2), ECPolicy(2, 4))


class ChecksumTests(SynchronousTestCase):
    """crc32c is the Castagnoli CRC, incremental, and catches corrupted fragments."""

    def test_known_vector(self) -> None:
        """The standard check value of CRC-32C for "123456789"."""
        self.assertEqual(crc32c(b"123456789"), 0xE3069283)
        self.assertEqual(crc32c(b""), 0)

    def test_incremental_and_views(self) -> None:
        """Continuing from a previous value equals one pass; memoryviews work."""
        data = seeded_bytes(1, 10000)
        self.assertEqual(crc32c(data[5000:], crc32c(data[:5000])), crc32c(data))
        self.assertEqual(crc32c(memoryview(data)[10:20]), crc32c(data[10:20]))
        self.assertEqual(unpack_crc(pack_crc(crc32c(data))), crc32c(data))
        self.assertEqual(len(pack_crc(0xFFFFFFFF)), 4)

    @settings(deadline=None, max_examples=60)
    @given(st.integers(0, 2**32), st.integers(1, 255))
    def test_corrupted_fragment_detected(self, where: int, flip: int) -> None:
        """Any corrupted byte of a fragment (header or payload) changes its CRC32C."""
        codec = StripeCodec(ECPolicy(4, 2), CELL)
        fragments = codec.encode(seeded_bytes(2, 3 * CELL + 17))
        fragment = fragments[where % len(fragments)]
        position = (where // len(fragments)) % len(fragment)
        bad = bytearray(fragment)
        bad[position] ^= flip
        self.assertNotEqual(crc32c(bad), crc32c(fragment))


class StripeCodecTests(SynchronousTestCase):
    """StripeCodec encodes, decodes, repairs and exposes data payloads correctly."""

    def test_backend(self) -> None:
        """The codec uses ISA-L's Cauchy Reed-Solomon, never liberasurecode_rs_vand."""
        self.assertEqual(EC_TYPE, "isa_l_rs_cauchy")

    def test_sizes(self) -> None:
        """stripe_size is k cells; full-stripe fragments hold one cell after the header."""
        codec = StripeCodec(ECPolicy(6, 3), CELL)
        self.assertEqual(codec.stripe_size, 6 * CELL)
        self.assertEqual(codec.fragment_size(codec.stripe_size), FRAGMENT_HEADER_SIZE + CELL)
        self.assertEqual(StripeCodec(ECPolicy(4, 2)).stripe_size, 4 << 20)

    def test_bad_lengths_refused(self) -> None:
        """Empty or oversized stripes, and absurd cell sizes, are refused before pyeclib."""
        codec = StripeCodec(ECPolicy(4, 2), CELL)
        self.assertRaises(ValueError, codec.encode, b"")
        self.assertRaises(ValueError, codec.encode, b"x" * (codec.stripe_size + 1))
        self.assertRaises(ValueError, codec.fragment_size, 0)
        self.assertRaises(ValueError, StripeCodec, ECPolicy(4, 2), 0)

    def test_round_trip_every_boundary(self) -> None:
        """For every policy and boundary length: fragment sizes, payloads and decode agree."""
        for policy in POLICIES:
            codec = StripeCodec(policy, CELL)
            for n in interesting_lengths(codec):
                data = seeded_bytes(n, n)
                fragments = codec.encode(data)
                self.assertEqual(len(fragments), policy.width)
                self.assertEqual({len(f) for f in fragments}, {codec.fragment_size(n)})
                lengths = codec.data_lengths(n)
                self.assertEqual(sum(lengths), n)
                self.assertEqual(
                    [len(codec.data_payload(f)) for f in fragments[: policy.k]], lengths
                )
                self.assertEqual(
                    b"".join(codec.data_payload(f) for f in fragments[: policy.k]), data
                )
                # Parity fragments only, topped up with the last data fragments.
                rest = dict(list(enumerate(fragments))[policy.m:])
                self.assertEqual(codec.decode(rest), data)

    @settings(deadline=None, max_examples=120)
    @given(st.data())
    def test_round_trip_any_missing(self, data: st.DataObject) -> None:
        """Any stripe length survives losing any m (or fewer) fragments; repair is exact."""
        policy = data.draw(st.sampled_from(POLICIES), "policy")
        cell = data.draw(st.sampled_from([1, 7, 64, CELL]), "cell")
        codec = StripeCodec(policy, cell)
        n = data.draw(
            st.one_of(st.sampled_from(interesting_lengths(codec)),
                      st.integers(1, codec.stripe_size)),
            "length",
        )
        payload = seeded_bytes(data.draw(st.integers(0, 1000), "seed"), n)
        fragments = codec.encode(payload)
        missing = data.draw(
            st.lists(st.integers(0, policy.width - 1), max_size=policy.m, unique=True),
            "missing",
        )
        available = {i: f for i, f in enumerate(fragments) if i not in missing}
        self.assertEqual(codec.decode(available), payload)
        rebuilt = codec.reconstruct(available, missing)
        self.assertEqual(rebuilt, {i: fragments[i] for i in missing})
        # The fast path: data fragments' payloads, cut to their data_lengths, are the stripe.
        lengths = codec.data_lengths(n)
        joined = b"".join(
            bytes(fragments[i][FRAGMENT_HEADER_SIZE: FRAGMENT_HEADER_SIZE + lengths[i]])
            for i in range(policy.k)
        )
        self.assertEqual(joined, payload)
        self.assertEqual(b"".join(codec.data_payload(f) for f in fragments[: policy.k]), payload)

    def test_default_cell_size(self) -> None:
        """With 1 MiB cells, full and short stripes round-trip through parity fragments."""
        codec = StripeCodec(ECPolicy(4, 2))
        cell = codec.cell_size
        for n in [1, cell - 1, cell + 1, codec.stripe_size - 1, codec.stripe_size]:
            data = seeded_bytes(n, n)
            fragments = codec.encode(memoryview(data))
            self.assertEqual(codec.decode({i: fragments[i] for i in (1, 3, 4, 5)}), data)
            self.assertEqual(b"".join(codec.data_payload(f) for f in fragments[:4]), data)

    def test_every_missing_combination(self) -> None:
        """RS-4-2 decodes from every one of the 15 choices of 4 fragments out of 6."""
        codec = StripeCodec(ECPolicy(4, 2), CELL)
        data = seeded_bytes(3, 3 * CELL + 5)
        fragments = codec.encode(data)
        for chosen in itertools.combinations(range(6), 4):
            self.assertEqual(codec.decode({i: fragments[i] for i in chosen}), data)

    def test_data_lengths_short_stripe(self) -> None:
        """A short stripe spreads evenly: ceil(len / k) bytes per fragment, the rest padding."""
        codec = StripeCodec(ECPolicy(4, 2), CELL)
        self.assertEqual(codec.data_lengths(1), [1, 0, 0, 0])
        self.assertEqual(codec.data_lengths(5), [2, 2, 1, 0])
        self.assertEqual(codec.data_lengths(4 * CELL), [CELL] * 4)
        self.assertEqual(codec.data_lengths(CELL + 1), [251, 251, 251, 248])
        fragments = codec.encode(b"abcde")
        self.assertEqual([bytes(codec.data_payload(f)) for f in fragments[:4]],
                         [b"ab", b"cd", b"e", b""])

    def test_stripe_lengths(self) -> None:
        """A block group splits into full stripes and one shorter remainder."""
        codec = StripeCodec(ECPolicy(4, 2), CELL)
        s = codec.stripe_size
        self.assertEqual(codec.stripe_lengths(0), [])
        self.assertEqual(codec.stripe_lengths(1), [1])
        self.assertEqual(codec.stripe_lengths(s), [s])
        self.assertEqual(codec.stripe_lengths(3 * s + 7), [s, s, s, 7])
        self.assertRaises(ValueError, codec.stripe_lengths, -1)

    @settings(deadline=None, max_examples=100)
    @given(st.data())
    def test_plan_read(self, data: st.DataObject) -> None:
        """Slices planned for any byte range of a block group reassemble exactly that range."""
        policy = data.draw(st.sampled_from(POLICIES[:5]), "policy")
        codec = StripeCodec(policy, data.draw(st.sampled_from([1, 5, 64]), "cell"))
        group_size = data.draw(st.integers(1, 4 * codec.stripe_size), "group size")
        group = seeded_bytes(group_size, group_size)
        offset = data.draw(st.integers(0, group_size), "offset")
        length = data.draw(st.integers(0, group_size - offset), "length")
        stripes = [codec.encode(s) for s in codec.stripes(group)]
        self.assertEqual(len(stripes), len(codec.stripe_lengths(group_size)))
        slices = codec.plan_read(group_size, offset, length)
        got = b"".join(
            codec.data_payload(stripes[c.stripe][c.index])[c.start : c.stop] for c in slices
        )
        self.assertEqual(got, group[offset : offset + length])
        self.assertTrue(all(c.start < c.stop for c in slices))

    def test_plan_read_bounds(self) -> None:
        """Ranges outside the block group are refused; an empty range needs no cells."""
        codec = StripeCodec(ECPolicy(4, 2), CELL)
        self.assertRaises(ValueError, codec.plan_read, 100, 50, 51)
        self.assertRaises(ValueError, codec.plan_read, 100, -1, 1)
        self.assertEqual(codec.plan_read(100, 100, 0), [])
        self.assertEqual(codec.plan_read(10 * CELL, 4 * CELL + 5, 10),
                         [CellSlice(stripe=1, index=0, start=5, stop=15)])

    def test_not_enough_fragments(self) -> None:
        """Fewer than k fragments raise NotEnoughFragments saying how many of each."""
        codec = StripeCodec(ECPolicy(6, 3), CELL)
        fragments = codec.encode(seeded_bytes(4, 100))
        with self.assertRaises(NotEnoughFragments) as caught:
            codec.decode({i: fragments[i] for i in range(5)})
        self.assertEqual((caught.exception.needed, caught.exception.available), (6, 5))
        self.assertIn("6 fragments are needed, only 5 are available", str(caught.exception))
        self.assertRaises(NotEnoughFragments, codec.reconstruct, {0: fragments[0]}, [1])

    def test_bad_fragments_refused(self) -> None:
        """Malformed fragments raise BadFragment instead of reaching (and aborting in) C."""
        codec = StripeCodec(ECPolicy(4, 2), CELL)
        fragments = codec.encode(seeded_bytes(5, 2 * CELL))
        other = codec.encode(seeded_bytes(6, 2 * CELL + 9))
        good = {i: fragments[i] for i in range(1, 5)}
        cases = [
            {**good, 1: b"x" * 10},                 # shorter than the header
            {**good, 1: bytes(len(fragments[1]))},  # all zero
            {**good, 1: fragments[2]},              # filed under the wrong index
            {**good, 1: other[1]},                  # from another stripe
        ]
        for case in cases:
            self.assertRaises(BadFragment, codec.decode, case)
        self.assertRaises(BadFragment, codec.data_payload, fragments[4])
        self.assertRaises(BadFragment, StripeCodec(ECPolicy(6, 3), CELL).decode,
                          dict(enumerate(fragments)))

    def test_corrupt_header_refused(self) -> None:
        """A flipped bit in a fragment's checked header fields is refused by pyeclib or us.

        Bytes 63-66 (library version) and 71-79 (padding) are not covered by pyeclib's
        metadata checksum: only the cell CRC32C of the shard store guards those.
        """
        codec = StripeCodec(ECPolicy(4, 2), CELL)
        fragments = codec.encode(seeded_bytes(7, 2 * CELL))
        for position in [*range(0, 63), *range(67, 71)]:
            bad = bytearray(fragments[1])
            bad[position] ^= 0x10
            self.assertRaises(BadFragment, codec.decode,
                              {1: bytes(bad), 2: fragments[2], 4: fragments[4],
                               5: fragments[5]})

    def test_reconstruct_present_and_range(self) -> None:
        """Asking to rebuild a present fragment returns it; bad indexes raise ValueError."""
        codec = StripeCodec(ECPolicy(4, 2), CELL)
        fragments = codec.encode(seeded_bytes(8, 999))
        available = dict(enumerate(fragments))
        self.assertEqual(codec.reconstruct(available, [2]), {2: fragments[2]})
        self.assertRaises(ValueError, codec.reconstruct, available, [6])

    def test_pickle(self) -> None:
        """A codec pickles (for worker processes) into an equivalent codec."""
        codec = StripeCodec(ECPolicy(6, 3), CELL)
        copy = pickle.loads(pickle.dumps(codec))
        self.assertEqual((copy.policy, copy.cell_size), (codec.policy, codec.cell_size))
        data = seeded_bytes(10, 777)
        self.assertEqual(copy.decode(dict(list(enumerate(codec.encode(data)))[3:])), data)

    def test_bytearray_and_memoryview_inputs(self) -> None:
        """Non-bytes buffers are accepted everywhere (pyeclib itself only takes bytes)."""
        codec = StripeCodec(ECPolicy(4, 2), CELL)
        data = seeded_bytes(9, 1234)
        fragments = codec.encode(bytearray(data))
        views = {i: memoryview(fragments[i]) for i in (0, 2, 4, 5)}
        self.assertEqual(codec.decode(views), data)
        self.assertEqual(codec.reconstruct(views, [1])[1], fragments[1])


class RebuildDataTests(SynchronousTestCase):
    """StripeCodec.rebuild_data: the degraded read's rebuild, with ISA-L on received buffers."""

    def assert_rebuilds(self, codec: StripeCodec, data: bytes, present: set[int]) -> None:
        fragments = codec.encode(data)
        # Writable buffers (as received), read-only views and bytes: all three reach ISA-L.
        kinds = [lambda f: memoryview(bytearray(f)), lambda f: memoryview(f), bytes]
        given = {i: kinds[i % 3](fragments[i]) for i in present}
        rebuilt = codec.rebuild_data(given, range(codec.k))
        self.assertEqual(list(rebuilt), list(range(codec.k)))
        self.assertEqual(b"".join(rebuilt[i] for i in range(codec.k)), data)

    def test_every_loss_every_policy(self) -> None:
        """For every policy, every stripe length that matters and every choice of lost
        fragments (up to m), the rebuilt data is the original, byte for byte."""
        self.assertIsNotNone(StripeCodec(ECPolicy(4, 2), CELL)._rebuilder, "ISA-L was not found")
        for policy in POLICIES[:3] + [ECPolicy(2, 5), ECPolicy(3, 1)]:
            codec = StripeCodec(policy, CELL)
            for n in interesting_lengths(codec):
                data = seeded_bytes(n, n)
                for lost in itertools.combinations(range(policy.width), policy.m):
                    self.assert_rebuilds(codec, data, set(range(policy.width)) - set(lost))

    def test_wide_policy_sampled(self) -> None:
        """RS-17-15 (too many loss patterns to try all): seeded random patterns of 15 lost
        fragments, data ones among them, rebuild the original."""
        policy = ECPolicy(17, 15)
        codec = StripeCodec(policy, CELL)
        rnd = random.Random(17)
        data = seeded_bytes(15, codec.stripe_size - 3)
        for _ in range(20):
            lost = set(rnd.sample(range(policy.width), policy.m))
            self.assert_rebuilds(codec, data, set(range(policy.width)) - lost)

    def test_same_as_pyeclib(self) -> None:
        """Without ISA-L (pyeclib's reconstruct instead) the results are the same."""
        codec = StripeCodec(ECPolicy(6, 3), CELL)
        data = seeded_bytes(11, codec.stripe_size - 7)
        fragments = codec.encode(data)
        given = {i: fragments[i] for i in (1, 3, 6, 7, 8, 2)}
        fast = codec.rebuild_data(given, range(6))
        codec._rebuilder = None
        slow = codec.rebuild_data(given, range(6))
        self.assertEqual({i: bytes(v) for i, v in fast.items()}, {i: bytes(v) for i, v in slow.items()})

    def test_results_in_given_buffers(self) -> None:
        """Rebuilt payloads are written into buffers from ``allocate`` (the read path passes its
        pool), which may be longer than needed."""
        codec = StripeCodec(ECPolicy(4, 2), CELL)
        data = seeded_bytes(12, 4 * CELL)
        fragments = codec.encode(data)
        buffers: list[bytearray] = []

        def allocate(n: int) -> bytearray:
            buffers.append(bytearray(b"\xff" * (2 * n)))
            return buffers[-1]

        rebuilt = codec.rebuild_data({i: fragments[i] for i in (1, 2, 4, 5)}, [0, 3], allocate)
        self.assertEqual(len(buffers), 2)
        self.assertEqual(bytes(rebuilt[0]), data[:CELL])
        self.assertEqual(bytes(rebuilt[3]), data[3 * CELL :])
        self.assertIs(rebuilt[0].obj, buffers[0])

    def test_refusals(self) -> None:
        """Too few fragments, a parity index, mixed stripes: each refused with its reason."""
        codec = StripeCodec(ECPolicy(4, 2), CELL)
        fragments = codec.encode(seeded_bytes(13, 999))
        other = codec.encode(seeded_bytes(14, 555))
        self.assertRaises(NotEnoughFragments, codec.rebuild_data, {i: fragments[i] for i in (1, 2, 5)}, [0])
        self.assertRaises(ValueError, codec.rebuild_data, dict(enumerate(fragments)), [4])
        mixed = {1: fragments[1], 2: fragments[2], 4: fragments[4], 5: other[5]}
        self.assertRaises(BadFragment, codec.rebuild_data, mixed, [0])


class TuneMallocTests(SynchronousTestCase):
    """tune_malloc keeps multi-MiB buffers out of fresh mmaps."""

    def test_large_buffers_stay_in_heap(self) -> None:
        """After tune_malloc, an 8 MiB allocation is not served by mmap (glibc only)."""
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "mallinfo2"):
            raise self.skipTest("needs glibc >= 2.33 (mallinfo2)")

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]

        libc.mallinfo2.restype = MallInfo2
        tune_malloc()
        tune_malloc()  # idempotent
        before = libc.mallinfo2().hblkhd
        buffer = bytearray(8 << 20)
        after = libc.mallinfo2().hblkhd
        del buffer
        self.assertLess(after - before, 8 << 20)
