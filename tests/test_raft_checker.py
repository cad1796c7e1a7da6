"""Tests for dogfs.raft.checker: the Wing-Gong linearizability checker."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dogfs.raft.checker import (
    KVModel,
    Operation,
    check_kv_history,
    check_linearizable,
)


def put(client: str, call: int, ret: int | None, value: str, key: str = "k") -> Operation:
    return Operation(client, call, ret, ("put", value), "ok" if ret is not None else None, key)


def get(client: str, call: int, ret: int, value: str | None, key: str = "k") -> Operation:
    return Operation(client, call, ret, ("get",), value, key)


def cas(
    client: str, call: int, ret: int | None, old: str | None, new: str, ok: bool | None
) -> Operation:
    return Operation(client, call, ret, ("cas", old, new), ok, "k")


class RegisterTests(SynchronousTestCase):
    """Single-register histories with known verdicts."""

    def test_sequential(self) -> None:
        """A sequential history that follows the register is linearizable."""
        ops = [put("a", 1, 2, "x"), get("b", 3, 4, "x"), put("a", 5, 6, "y"), get("b", 7, 8, "y")]
        self.assertTrue(check_linearizable(ops, KVModel).ok)

    def test_stale_read(self) -> None:
        """A read that starts after a write finished must see it (or something newer)."""
        ops = [put("a", 1, 2, "x"), put("a", 3, 4, "y"), get("b", 5, 6, "x")]
        result = check_linearizable(ops, KVModel)
        self.assertFalse(result.ok)
        self.assertIn("not linearizable", result.explain(KVModel))

    def test_concurrent_read_may_see_either(self) -> None:
        """A read overlapping a write may return the old or the new value."""
        for seen in ("x", "y"):
            ops = [put("a", 1, 2, "x"), put("a", 3, 10, "y"), get("b", 4, 5, seen)]
            self.assertTrue(check_linearizable(ops, KVModel).ok, seen)

    def test_reads_cannot_go_back(self) -> None:
        """Two sequential reads during a write cannot see new then old."""
        ops = [
            put("a", 1, 2, "x"),
            put("a", 3, 20, "y"),
            get("b", 4, 5, "y"),
            get("c", 6, 7, "x"),
        ]
        self.assertFalse(check_linearizable(ops, KVModel).ok)

    def test_timed_out_write_may_apply(self) -> None:
        """A write whose client never heard back may have taken effect..."""
        ops = [put("a", 1, None, "x"), get("b", 5, 6, "x")]
        self.assertTrue(check_linearizable(ops, KVModel).ok)

    def test_timed_out_write_may_not_apply(self) -> None:
        """...or not."""
        ops = [put("a", 1, None, "x"), get("b", 5, 6, None)]
        self.assertTrue(check_linearizable(ops, KVModel).ok)

    def test_timed_out_write_not_before_its_call(self) -> None:
        """A timed-out write still cannot take effect before it was issued."""
        ops = [get("b", 1, 2, "x"), put("a", 5, None, "x")]
        self.assertFalse(check_linearizable(ops, KVModel).ok)

    def test_timed_out_write_applies_once(self) -> None:
        """A timed-out write, once seen, cannot disappear again and come back."""
        ops = [
            put("a", 1, None, "x"),
            get("b", 2, 3, "x"),
            put("c", 4, 5, "y"),
            get("b", 6, 7, "x"),
        ]
        self.assertFalse(check_linearizable(ops, KVModel).ok)

    def test_cas(self) -> None:
        """Compare-and-set succeeds only on the expected value."""
        ok = [put("a", 1, 2, "x"), cas("b", 3, 4, "x", "y", True), get("c", 5, 6, "y")]
        self.assertTrue(check_linearizable(ok, KVModel).ok)
        bad = [put("a", 1, 2, "x"), cas("b", 3, 4, "z", "y", True)]
        self.assertFalse(check_linearizable(bad, KVModel).ok)
        failed = [put("a", 1, 2, "x"), cas("b", 3, 4, "x", "y", False)]
        self.assertFalse(check_linearizable(failed, KVModel).ok)

    def test_timed_out_cas(self) -> None:
        """An unknown compare-and-set may have swapped."""
        ops = [put("a", 1, 2, "x"), cas("b", 3, None, "x", "y", None), get("c", 10, 11, "y")]
        self.assertTrue(check_linearizable(ops, KVModel).ok)


class KeySplitTests(SynchronousTestCase):
    """Histories are checked key by key."""

    def test_reports_the_key(self) -> None:
        """The verdict names the key whose history is wrong."""
        ops = [
            put("a", 1, 2, "x", key="good"),
            get("b", 3, 4, "x", key="good"),
            put("a", 5, 6, "x", key="bad"),
            get("b", 7, 8, None, key="bad"),
        ]
        result = check_kv_history(ops)
        self.assertFalse(result.ok)
        self.assertEqual(result.key, "bad")

    def test_many_concurrent_operations(self) -> None:
        """Memoisation keeps a long, highly concurrent history tractable."""
        rng = random.Random(7)
        ops = []
        t = 0
        value = None
        # Ten clients, each op overlapping the others; values follow a real register.
        for i in range(300):
            t += 1
            if rng.random() < 0.5:
                value = f"v{i}"
                ops.append(put(f"c{i % 10}", t, t + 15, value))
            else:
                ops.append(get(f"c{i % 10}", t, t + 15, value))
        result = check_kv_history(ops)
        self.assertTrue(result.ok)
        self.assertFalse(result.inconclusive)


@st.composite
def register_histories(draw: st.DrawFn) -> list[Operation]:
    """Histories produced by a real register with random overlaps."""
    n = draw(st.integers(1, 25))
    value: str | None = None
    ops = []
    for i in range(n):
        # The effect happens at time 10*i; the call may start earlier, the return come later.
        before = draw(st.integers(0, 9))
        after = draw(st.integers(0, 9))
        lost = draw(st.booleans()) and draw(st.booleans())
        if draw(st.booleans()):
            value = f"v{i}"
            ret = None if lost else 10 * i + after
            ops.append(put("c", 10 * i - before, ret, value))
        else:
            ops.append(get("c", 10 * i - before, 10 * i + after, value))
    return ops


class PropertyTests(SynchronousTestCase):
    """Generated histories."""

    @settings(deadline=None, max_examples=60)
    @given(register_histories())
    def test_real_register_is_linearizable(self, ops: list[Operation]) -> None:
        """Anything a real register could produce passes."""
        self.assertTrue(check_kv_history(ops).ok)


def brute_force(ops: list[Operation]) -> bool:
    """Linearizable by trying every order (small histories only): an operation may come next
    when no other remaining completed operation returned before it was called; one that never
    returned may also be left out."""
    import itertools

    ops = [op for op in ops if op.completed or op.input[0] != "get"]
    for keep in itertools.product(*[[True] if op.completed else [True, False] for op in ops]):
        chosen = [op for op, k in zip(ops, keep, strict=True) if k]
        for order in itertools.permutations(chosen):
            ok = True
            for i, op in enumerate(order):
                for later in order[i + 1 :]:
                    if later.ret is not None and later.ret < op.call:
                        ok = False
            if not ok:
                continue
            state = None
            for op in order:
                good, state = KVModel.step(state, op.input, op.output, op.completed)
                if not good:
                    ok = False
                    break
            if ok:
                return True
    return False


@st.composite
def arbitrary_histories(draw: st.DrawFn) -> list[Operation]:
    """Small histories with random overlaps and random (often wrong) outputs."""
    ops = []
    for i in range(draw(st.integers(1, 5))):
        call = draw(st.integers(0, 20))
        ret = None if draw(st.integers(0, 4)) == 0 else call + draw(st.integers(0, 10))
        kind = draw(st.sampled_from(["put", "get", "cas"]))
        value = draw(st.sampled_from([None, "a", "b"]))
        if kind == "put":
            ops.append(put(f"c{i}", call, ret, f"v{i}"))
        elif kind == "get":
            if ret is None:
                ret = call + 1
            ops.append(get(f"c{i}", call, ret, draw(st.sampled_from([None, "v0", "v1", "v2"]))))
        else:
            ok = None if ret is None else draw(st.booleans())
            ops.append(cas(f"c{i}", call, ret, value if value else None, f"v{i}", ok))
    return ops


class BruteForceTests(SynchronousTestCase):
    """The search agrees with trying every order."""

    @settings(deadline=None, max_examples=300)
    @given(arbitrary_histories())
    def test_agrees_with_brute_force(self, ops: list[Operation]) -> None:
        """Same verdict as exhaustive enumeration, linearizable or not."""
        self.assertEqual(check_linearizable(ops, KVModel).ok, brute_force(ops))
