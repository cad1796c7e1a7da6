# -*- test-case-name: tests.test_raft_checker -*-
"""A linearizability checker: Wing and Gong's search with Lowe's memoisation, split per key.

A history is a list of :class:`Operation` (a call time, a return time, an input and an output).
An operation that never returned (the client timed out) has ``ret=None``: it may have taken
effect at any point after its call, or never; the checker lets it linearize anywhere after its
call, including after everything else, which is the same as never. Reads that never returned
say nothing and are dropped.

The search (Wing & Gong 1993, with the cache of Lowe 2017, as in Porcupine): walk the history
in time order; at a call, try to linearize that operation now (its model step must accept its
output); on reaching a return whose operation is not yet linearized, undo the last choice. A
cache of (set of linearized operations, model state) prunes every configuration already seen.
A history is linearizable iff it is for each key on its own (linearizability is local), so a
key-value history is split by key first.

May import nothing of DogFS.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from attrs import frozen

__all__ = [
    "CheckResult",
    "KVModel",
    "Model",
    "Operation",
    "check_kv_history",
    "check_linearizable",
]


@frozen
class Operation:
    """One client operation. ``ret`` is None when the client never learned the outcome."""

    client: str
    call: int
    ret: int | None
    input: Any
    output: Any = None
    key: Hashable = None

    @property
    def completed(self) -> bool:
        """Whether the client saw a response."""
        return self.ret is not None


@frozen
class Model:
    """A sequential specification: ``step(state, input, output, completed)`` returns whether
    the operation may produce that output in that state, and the next state."""

    init: Callable[[], Hashable]
    step: Callable[[Hashable, Any, Any, bool], tuple[bool, Hashable]]
    describe: Callable[[Any, Any], str] = lambda i, o: f"{i!r} -> {o!r}"


@frozen
class CheckResult:
    """The verdict for a history."""

    ok: bool
    #: The key whose history is not linearizable (None when ok or unsplit).
    key: Hashable = None
    #: The operations of that key, for a readable report.
    operations: tuple[Operation, ...] = ()
    #: True when the search gave up (budget exhausted): neither proven nor refuted.
    inconclusive: bool = False

    def explain(self, model: Model | None = None) -> str:
        """A readable account of the offending key's history."""
        if self.ok:
            return "linearizable" + (" (search budget exhausted)" if self.inconclusive else "")
        lines = [f"not linearizable: key {self.key!r}, {len(self.operations)} operations"]
        for op in sorted(self.operations, key=lambda o: o.call):
            ret = "never" if op.ret is None else str(op.ret)
            what = (
                model.describe(op.input, op.output) if model else f"{op.input!r} -> {op.output!r}"
            )
            lines.append(f"  [{op.call:>7} .. {ret:>7}] {op.client}: {what}")
        return "\n".join(lines)


class _Node:
    __slots__ = ("op", "index", "is_call", "match", "prev", "next")

    def __init__(self, op: Operation | None, index: int, is_call: bool) -> None:
        self.op = op
        self.index = index
        self.is_call = is_call
        self.match: _Node | None = None
        self.prev: _Node | None = None
        self.next: _Node | None = None


def check_linearizable(
    ops: Sequence[Operation], model: Model, max_steps: int = 2_000_000
) -> CheckResult:
    """Whether ``ops`` (all on one object) are linearizable with respect to ``model``."""
    ops = [op for op in ops if op.completed or not _is_pure_read(op)]
    if not ops:
        return CheckResult(True)
    end = max((op.ret for op in ops if op.ret is not None), default=0)
    end = max(end, max(op.call for op in ops)) + 1
    events: list[tuple[int, int, int]] = []
    for i, op in enumerate(ops):
        ret = op.ret if op.ret is not None else end
        if ret < op.call:
            raise ValueError(f"operation returns before its call: {op!r}")
        # At equal times, calls go first: overlapping is the lenient reading.
        events.append((op.call, 0, i))
        events.append((ret, 1, i))
    events.sort()
    head = _Node(None, -1, False)
    prev = head
    calls: dict[int, _Node] = {}
    for _, kind, i in events:
        node = _Node(ops[i], i, kind == 0)
        if kind == 0:
            calls[i] = node
        else:
            node.match = calls[i]
            calls[i].match = node
        prev.next = node
        node.prev = prev
        prev = node

    def lift(call: _Node) -> None:
        assert call.prev is not None and call.match is not None
        call.prev.next = call.next
        if call.next is not None:
            call.next.prev = call.prev
        ret = call.match
        assert ret.prev is not None
        ret.prev.next = ret.next
        if ret.next is not None:
            ret.next.prev = ret.prev

    def unlift(call: _Node) -> None:
        ret = call.match
        assert ret is not None and ret.prev is not None and call.prev is not None
        ret.prev.next = ret
        if ret.next is not None:
            ret.next.prev = ret
        call.prev.next = call
        if call.next is not None:
            call.next.prev = call

    state = model.init()
    linearized = 0
    cache: set[tuple[int, Hashable]] = set()
    stack: list[tuple[_Node, Hashable]] = []
    entry = head.next
    steps = 0
    while head.next is not None:
        steps += 1
        if steps > max_steps:
            return CheckResult(True, inconclusive=True)
        assert entry is not None
        if entry.is_call:
            cur = entry.op
            assert cur is not None
            ok, new_state = model.step(state, cur.input, cur.output, cur.completed)
            if ok:
                new_lin = linearized | (1 << entry.index)
                if (new_lin, new_state) not in cache:
                    cache.add((new_lin, new_state))
                    stack.append((entry, state))
                    state = new_state
                    linearized = new_lin
                    lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if not stack:
                return CheckResult(False, operations=tuple(ops))
            call, state = stack.pop()
            linearized &= ~(1 << call.index)
            unlift(call)
            entry = call.next
    return CheckResult(True)


def _is_pure_read(op: Operation) -> bool:
    return isinstance(op.input, tuple) and bool(op.input) and op.input[0] == "get"


def _kv_step(state: Hashable, inp: Any, out: Any, completed: bool) -> tuple[bool, Hashable]:
    kind = inp[0]
    if kind == "put":
        return (not completed or out == "ok"), inp[1]
    if kind == "get":
        return out == state, state
    if kind == "cas":
        expected, new = inp[1], inp[2]
        matches = state == expected
        if not completed:
            # Unknown outcome: it ran (and did what the state says) or it is placed last.
            return True, new if matches else state
        return out == matches, new if matches else state
    raise ValueError(f"unknown operation {inp!r}")


def _kv_describe(inp: Any, out: Any) -> str:
    kind = inp[0]
    if kind == "put":
        return f"put {inp[1]!r}" + ("" if out is None else f" -> {out}")
    if kind == "get":
        return f"get -> {out!r}"
    return f"cas {inp[1]!r} => {inp[2]!r}" + ("" if out is None else f" -> {out}")


#: A register per key: inputs ("put", v) -> "ok", ("get",) -> value (None when absent),
#: ("cas", expected, new) -> whether it swapped.
KVModel = Model(init=lambda: None, step=_kv_step, describe=_kv_describe)


def check_kv_history(ops: Iterable[Operation], max_steps: int = 2_000_000) -> CheckResult:
    """Check a key-value history key by key (``Operation.key``) against :data:`KVModel`."""
    by_key: dict[Hashable, list[Operation]] = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    inconclusive = False
    for key in sorted(by_key, key=repr):
        result = check_linearizable(by_key[key], KVModel, max_steps)
        if not result.ok:
            return CheckResult(False, key=key, operations=result.operations)
        inconclusive = inconclusive or result.inconclusive
    return CheckResult(True, inconclusive=inconclusive)
