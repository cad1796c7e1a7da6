# -*- test-case-name: tests.test_raft_sim -*-
"""The simulator's world: in-memory storage that models fsync, and the key-value state machine.

:class:`MemoryStorage` keeps what was synced apart from what was only written: a crash loses
the unsynced tail except for a random prefix the "operating system" happened to flush, and the
last record of that prefix may be torn, which replay detects and discards as real storage must.
:class:`KVStateMachine` is the clients' key-value store (put, get, compare-and-set) behind
client sessions, with the set of writes it applied so that the simulator can check that no
acknowledged write was lost.

May import dogfs.raft only.
"""

from __future__ import annotations

import random
from typing import Any

import msgpack

from dogfs.raft.core import Entry, EntryKind, HardState, Snapshot
from dogfs.raft.session import SessionTable

__all__ = ["KVStateMachine", "MemoryStorage", "decode_command", "encode_command"]


class MemoryStorage:
    """A node's disk: a log of records, durable once synced."""

    def __init__(self) -> None:
        """An empty disk."""
        self.hard_state = HardState(0, None, 0)
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self._pending: list[tuple[str, Any]] = []

    def write(
        self, hard_state: HardState | None, entries: list[Entry], snapshot: Snapshot | None
    ) -> None:
        """Write one batch to the page cache (not yet durable)."""
        if snapshot is not None:
            self._pending.append(("snap", snapshot))
        for e in entries:
            self._pending.append(("ent", e))
        if hard_state is not None:
            self._pending.append(("hs", hard_state))

    def sync(self) -> None:
        """fsync: everything written is now durable."""
        for rec in self._pending:
            self._apply(rec)
        self._pending = []

    def crash(self, rng: random.Random) -> str:
        """Power loss: keep a random prefix of the unsynced records, maybe tearing its last
        one (discarded on replay). Returns what happened, for the trace."""
        n = len(self._pending)
        if n == 0:
            return "nothing unsynced"
        keep = rng.randint(0, n)
        torn = keep > 0 and rng.random() < 0.5
        if torn:
            # The last record's checksum fails on replay: it is discarded.
            keep -= 1
        for rec in self._pending[:keep]:
            self._apply(rec)
        self._pending = []
        return f"kept {keep} of {n} unsynced records" + (", tore the next" if torn else "")

    def compact(self, snapshot: Snapshot) -> None:
        """The application's own snapshot, written and synced on its own."""
        idx = snapshot.meta.index
        if self.snapshot is not None and idx <= self.snapshot.meta.index:
            return
        self.entries = [e for e in self.entries if e.index > idx]
        self.snapshot = snapshot

    def _base(self) -> int:
        return self.snapshot.meta.index if self.snapshot else 0

    def _apply(self, rec: tuple[str, Any]) -> None:
        kind, value = rec
        if kind == "snap":
            # A snapshot received from the leader replaces the whole log.
            self.snapshot = value
            self.entries = []
        elif kind == "ent":
            base = self._base()
            keep = value.index - base - 1
            if keep < 0:
                return
            if keep > len(self.entries):
                raise AssertionError(f"log gap writing index {value.index}")
            del self.entries[keep:]
            self.entries.append(value)
        else:
            self.hard_state = value

    def load(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        """What a restart finds on disk."""
        return self.hard_state, self.snapshot, list(self.entries)


def encode_command(client: str, seq: int, op: tuple[Any, ...]) -> bytes:
    """A client command as log entry data."""
    return msgpack.packb([client, seq, list(op)], use_bin_type=True)


def decode_command(data: bytes) -> tuple[str, int, tuple[Any, ...]]:
    """Read what :func:`encode_command` wrote."""
    client, seq, op = msgpack.unpackb(data, raw=False)
    return client, seq, tuple(op)


class KVStateMachine:
    """Keys to values, with compare-and-set, behind exactly-once client sessions."""

    def __init__(self) -> None:
        """An empty store."""
        self.data: dict[str, str] = {}
        self.sessions = SessionTable()
        self.applied = 0
        #: (client, seq) of every write that executed: for the lost-write check.
        self.writes: set[tuple[str, int]] = set()

    def apply(self, entry: Entry) -> tuple[str, int, Any] | None:
        """Apply one committed entry; for a command, (client, seq, result)."""
        if entry.index != self.applied + 1:
            raise AssertionError(f"applying {entry.index} after {self.applied}")
        self.applied = entry.index
        if entry.kind != EntryKind.NORMAL:
            return None
        client, seq, op = decode_command(entry.data)

        def execute() -> bytes:
            self.writes.add((client, seq))
            return msgpack.packb(self._execute(op))

        response, _ = self.sessions.apply(client, seq, entry.index, execute)
        try:
            result = msgpack.unpackb(response)
        except Exception:
            result = None
        return client, seq, result

    def _execute(self, op: tuple[Any, ...]) -> Any:
        kind, key = op[0], op[1]
        if kind == "put":
            self.data[key] = op[2]
            return "ok"
        if kind == "cas":
            if self.data.get(key) == op[2]:
                self.data[key] = op[3]
                return True
            return False
        raise ValueError(f"unknown command {op!r}")

    def get(self, key: str) -> str | None:
        """A read (linearizable only behind a ReadState)."""
        return self.data.get(key)

    def to_bytes(self) -> bytes:
        """Snapshot bytes."""
        return msgpack.packb(
            [
                self.applied,
                sorted(self.data.items()),
                self.sessions.to_bytes(),
                sorted(self.writes),
            ],
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KVStateMachine:
        """Restore a snapshot."""
        applied, items, sessions, writes = msgpack.unpackb(data, raw=False)
        sm = cls()
        sm.applied = applied
        sm.data = dict(items)
        sm.sessions = SessionTable.from_bytes(sessions)
        sm.writes = {(c, s) for c, s in writes}
        return sm
