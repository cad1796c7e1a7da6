# -*- test-case-name: tests.test_raft_scenarios -*-
"""A step-by-step harness for scenario tests, in the spirit of etcd's interaction tests.

:class:`Cluster` holds a group of :class:`~dogfs.raft.core.RaftNode` s with in-memory storage
and a message queue that the test drives by hand: process a node's Ready (persist, then queue its
messages, then apply), deliver queued messages (all, or only some), cut links, crash and restart
nodes, tick. Nothing happens unless the test says so, so a test can build the exact situations
of the Raft paper's figures.

May import dogfs.raft only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from dogfs.raft.core import (
    Configuration,
    Entry,
    EntryKind,
    HardState,
    Message,
    RaftNode,
    RaftOptions,
    ReadState,
    Role,
    Snapshot,
    SnapshotMeta,
)
from dogfs.raft.sim_world import MemoryStorage

__all__ = ["Cluster"]


class Cluster:
    """A hand-driven Raft group."""

    def __init__(
        self,
        ids: Iterable[str],
        options: RaftOptions | None = None,
        seed: int = 0,
        learners: Iterable[str] = (),
    ) -> None:
        """Voters ``ids`` (and ``learners``), all with empty logs."""
        self.options = options or RaftOptions(election_tick=10, heartbeat_tick=1)
        self.rng = random.Random(seed)
        ids = list(ids)
        self.bootstrap = Configuration(frozenset(ids), frozenset(learners))
        self.storage: dict[str, MemoryStorage] = {}
        self.nodes: dict[str, RaftNode] = {}
        self.queue: list[Message] = []
        self.cut: set[tuple[str, str]] = set()
        self.applied: dict[str, list[Entry]] = {}
        self.read_states: dict[str, list[ReadState]] = {}
        self.crashed: set[str] = set()
        #: Application state per node: applied normal entries' data, as a snapshot would hold.
        for nid in [*ids, *learners]:
            self.add(nid, self.bootstrap)

    # -- membership of the harness ------------------------------------------------------------

    def add(self, nid: str, bootstrap: Configuration) -> RaftNode:
        """Start a node with an empty disk."""
        self.storage[nid] = MemoryStorage()
        self.applied[nid] = []
        self.read_states[nid] = []
        return self._boot(nid, bootstrap)

    def _boot(self, nid: str, bootstrap: Configuration) -> RaftNode:
        hs, snap, entries = self.storage[nid].load()
        node = RaftNode(
            nid,
            self.options,
            hard_state=hs,
            snapshot=snap,
            entries=entries,
            config=bootstrap,
            applied=snap.meta.index if snap else 0,
            rng=random.Random(self.rng.random()),
        )
        self.nodes[nid] = node
        return node

    def preload(self, nid: str, terms: list[int], term: int) -> RaftNode:
        """Replace ``nid``'s disk with a log whose entries have ``terms`` (indices from 1) at
        current term ``term``, and restart it from there."""
        st = MemoryStorage()
        st.write(
            HardState(term, None, 0),
            [Entry(t, i, EntryKind.NORMAL, b"%d/%d" % (i, t)) for i, t in enumerate(terms, 1)],
            None,
        )
        st.sync()
        self.storage[nid] = st
        self.applied[nid] = []
        self.queue = [m for m in self.queue if m.dst != nid]
        return self._boot(nid, self.bootstrap)

    def crash(self, nid: str) -> None:
        """Stop a node; it keeps only what it persisted (every Ready is persisted at once)."""
        self.crashed.add(nid)
        self.queue = [m for m in self.queue if m.dst != nid]

    def restart(self, nid: str) -> RaftNode:
        """Restart a crashed node from its disk."""
        self.crashed.discard(nid)
        self.applied[nid] = []
        snap = self.storage[nid].snapshot
        if snap is not None:
            self.applied[nid] = [Entry(snap.meta.term, snap.meta.index, EntryKind.NOOP, b"snap")]
        return self._boot(nid, self.bootstrap)

    def isolate(self, nid: str) -> None:
        """Cut every link to and from ``nid``."""
        for other in self.nodes:
            if other != nid:
                self.cut.add((nid, other))
                self.cut.add((other, nid))

    def cut_link(self, a: str, b: str) -> None:
        """Cut the link between ``a`` and ``b`` both ways."""
        self.cut.add((a, b))
        self.cut.add((b, a))

    def heal(self) -> None:
        """Restore every link."""
        self.cut.clear()

    # -- driving ------------------------------------------------------------------------------

    def process(self, nid: str) -> None:
        """Handle ``nid``'s Ready: persist, queue its messages, apply, advance."""
        if nid in self.crashed:
            return
        node = self.nodes[nid]
        while node.has_ready():
            rd = node.ready()
            st = self.storage[nid]
            st.write(rd.hard_state, rd.entries, rd.snapshot)
            st.sync()
            if rd.snapshot is not None:
                self.applied[nid] = [
                    Entry(rd.snapshot.meta.term, rd.snapshot.meta.index, EntryKind.NOOP, b"snap")
                ]
            self.queue.extend(m for m in rd.messages if (m.src, m.dst) not in self.cut)
            self.applied[nid].extend(rd.committed)
            self.read_states[nid].extend(rd.read_states)
            node.advance(rd)

    def process_all(self) -> None:
        """Process every live node's Ready."""
        for nid in sorted(self.nodes):
            self.process(nid)

    def deliver(self, where: Callable[[Message], bool] = lambda m: True) -> int:
        """Deliver the queued messages ``where`` accepts (others stay queued); returns how many."""
        todo = [m for m in self.queue if where(m)]
        self.queue = [m for m in self.queue if not where(m)]
        n = 0
        for m in todo:
            if m.dst in self.crashed or m.dst not in self.nodes or (m.src, m.dst) in self.cut:
                continue
            self.nodes[m.dst].step(m)
            n += 1
        return n

    def drop(self, where: Callable[[Message], bool] = lambda m: True) -> None:
        """Forget queued messages ``where`` accepts."""
        self.queue = [m for m in self.queue if not where(m)]

    def stabilize(self, max_rounds: int = 1000) -> None:
        """Process and deliver until nothing moves."""
        for _ in range(max_rounds):
            self.process_all()
            if not self.queue:
                return
            self.deliver()
        raise AssertionError("the cluster did not stabilize")

    def tick(self, nid: str | None = None, n: int = 1) -> None:
        """Tick one node (or all live ones) ``n`` times, processing after each tick."""
        for _ in range(n):
            for x in [nid] if nid else sorted(self.nodes):
                if x not in self.crashed:
                    self.nodes[x].tick()
                    self.process(x)

    def elect(self, nid: str) -> None:
        """Make ``nid`` campaign and let the group settle."""
        self.nodes[nid].campaign()
        self.stabilize()
        assert self.nodes[nid].role == Role.LEADER, f"{nid} did not win"

    def leader(self) -> str | None:
        """The live leader with the highest term, if any."""
        best = None
        for nid, n in self.nodes.items():
            if nid not in self.crashed and n.role == Role.LEADER:
                if best is None or n.term > self.nodes[best].term:
                    best = nid
        return best

    def snapshot(self, nid: str) -> Snapshot:
        """Take a snapshot of ``nid``'s applied state and compact its log."""
        node = self.nodes[nid]
        idx = node.applied
        data = b"|".join(e.data for e in self.applied[nid])
        snap = Snapshot(SnapshotMeta(idx, node.term_at(idx) or 0, node.config), data)
        self.storage[nid].compact(snap)
        node.compact(snap)
        return snap

    def log_terms(self, nid: str) -> list[int]:
        """Terms of ``nid``'s in-memory log, from its first index."""
        node = self.nodes[nid]
        return [e.term for e in node.entries_from(node.first_index, node.last_index)]
