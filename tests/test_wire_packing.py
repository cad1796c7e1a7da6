# -*- test-case-name: tests.test_wire_packing -*-
"""Tests for dogfs.wire.packing: the per-thread Packer gives msgpack.packb's bytes."""

from __future__ import annotations

import threading

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dogfs.wire import packing
from dogfs.wire.packing import packb

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=40) | st.binary(max_size=300),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=30,
)


class PackbTests(SynchronousTestCase):
    """`packb` is ``msgpack.packb(obj, use_bin_type=True)``, call after call and thread by
    thread."""

    @settings(max_examples=300)
    @given(st.lists(values, min_size=1, max_size=5))
    def test_same_bytes_as_msgpack(self, objs: list[object]) -> None:
        """Any sequence of values packs, one call after another, as msgpack.packb packs each."""
        for obj in objs:
            self.assertEqual(packb(obj), msgpack.packb(obj, use_bin_type=True))

    def test_failed_pack_leaves_nothing_behind(self) -> None:
        """After a value msgpack cannot encode (the error propagates), the next pack is whole
        and holds nothing of the failed one."""
        self.assertEqual(packb([1, "a"]), msgpack.packb([1, "a"]))
        self.assertRaises(TypeError, packb, [b"x" * 100, object()])
        self.assertEqual(packb({"k": 2}), msgpack.packb({"k": 2}))

    def test_each_thread_has_its_own_packer(self) -> None:
        """A thread packs with a Packer of its own (one stays thread-safe even where a
        pack could let another thread run), made on its first call and kept."""
        seen: list[object] = []

        def work() -> None:
            packb([1])
            seen.append(packing._local.packer)
            packb([2])
            seen.append(packing._local.packer)

        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
            t.join()
        packb([3])
        self.assertIs(seen[0], seen[1])
        self.assertIs(seen[2], seen[3])
        self.assertEqual(len({id(p) for p in seen} | {id(packing._local.packer)}), 3)
