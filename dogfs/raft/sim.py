# -*- test-case-name: tests.test_raft_sim -*-
"""Deterministic simulation of a whole Raft group with concurrent clients, under seeded faults.

``python -m dogfs.raft.sim --seeds N --first-seed S [--nodes 3|5] [--steps N] [--inject-bug B]``
runs N simulations. Each is a group of :class:`~dogfs.raft.core.RaftNode` s on one simulated
clock and an in-memory network, with clients running put, get and compare-and-set on a few keys
(retrying on timeouts through client sessions), and faults drawn from the seed: crashes that
lose unsynced writes and tear the last record, partitions (halves, an isolated node, partial
connectivity), message drop, duplication, reordering and delay, slow disks, leadership
transfers, membership changes (learners added, promoted, voters removed) and snapshots with
chunked transfer. After every event the Raft invariants are checked; over the run's history,
linearizability and that no acknowledged write was lost; after the faults heal, liveness. The
last line printed is ``runs=N violations=V``; each violation prints its seed, the command that
replays it, and the end of a readable trace.

Besides random faults, a nemesis aims some at the moments that matter (as Jepsen's do): a new
leader is cut off or crashed soon after its election or its first commit, a node is crashed
right after it voted or while its disk write is in flight, and several nodes campaign at once.
Without ``--first-seed`` the seeds are drawn at random. Defaults (100 runs of 1000 ticks) find
every planted bug (``--inject-bug``, see :data:`~dogfs.raft.core.BUGS`) and take about ten
seconds on one core.

May import dogfs.raft only.
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
from attrs import define, field

from dogfs.raft.checker import Operation, check_kv_history
from dogfs.raft.core import (
    BUGS,
    ConfigChange,
    ConfigChangeKind,
    Configuration,
    Entry,
    Message,
    NotLeader,
    ProposalRejected,
    RaftNode,
    RaftOptions,
    Ready,
    RequestVoteResponse,
    Role,
    Snapshot,
    SnapshotMeta,
)
from dogfs.raft.sim_world import KVStateMachine, MemoryStorage, encode_command

__all__ = ["DEFAULT_SEEDS", "DEFAULT_STEPS", "RunResult", "Simulation", "main", "run_seeds"]

#: Defaults of the command line: a sweep that finds every planted bug.
DEFAULT_SEEDS = 100
DEFAULT_STEPS = 1000

ELECTION_TICK = 10
CLIENT_TIMEOUT = 25
KEYS = ("k0", "k1", "k2")


class Violation(Exception):
    """A checked property failed."""


@define
class RunResult:
    """The outcome of one seeded run."""

    seed: int
    nodes: int
    steps: int
    bug: str | None
    violation: str | None
    trace: list[str]
    ops: int
    acked: int
    ticks_to_leader: int | None

    def replay_command(self) -> str:
        """The command that replays this run."""
        cmd = (
            f"python -m dogfs.raft.sim --seeds 1 --first-seed {self.seed} --nodes {self.nodes}"
            f" --steps {self.steps}"
        )
        if self.bug:
            cmd += f" --inject-bug {self.bug}"
        return cmd + " --trace"


@define
class _ClientRequest:
    client: str
    seq: int
    op: tuple[Any, ...]


@define
class _ClientReply:
    client: str
    seq: int
    result: Any = None
    redirect: bool = False
    hint: str | None = None


@define(eq=False)
class _SimNode:
    id: str
    storage: MemoryStorage
    bootstrap: Configuration
    raft: RaftNode | None = None
    sm: KVStateMachine = field(factory=KVStateMachine)
    incarnation: int = 0
    saving: Ready | None = None
    disk_factor: float = 1.0
    pending_writes: dict[tuple[str, int], bool] = field(factory=dict)
    pending_reads: dict[bytes, tuple[str, int, str]] = field(factory=dict)
    waiting_reads: list[tuple[int, bytes]] = field(factory=list)
    seen_commit: int = 0
    seen_role: tuple[Role, int] | None = None
    removed: bool = False
    snap_every: int = 30


@define(eq=False)
class _SimClient:
    id: str
    seq: int = 0
    op: tuple[Any, ...] | None = None
    key: str = ""
    call: int = 0
    target: str = ""
    deadline: float = 0.0
    attempts: int = 0
    redirects: int = 0
    history_index: int = -1
    last_seen: dict[str, str | None] = field(factory=dict)


class Simulation:
    """One seeded run."""

    def __init__(
        self,
        seed: int,
        nodes: int = 3,
        steps: int = DEFAULT_STEPS,
        bug: str | None = None,
        trace: Callable[[str], None] | None = None,
    ) -> None:
        """Set up the group, clients and fault profile from ``seed``."""
        if bug is not None and bug not in BUGS:
            raise ValueError(f"unknown bug {bug!r}; known: {', '.join(BUGS)}")
        self.seed = seed
        self.n = nodes
        self.steps = steps
        self.bug = bug
        self.rng = random.Random(seed)
        self._live_trace = trace
        self.trace: deque[str] = deque(maxlen=400)
        self.now = 0.0
        self.tick_no = 0
        self.events = 0
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._qseq = 0
        r = self.rng
        # The fault profile: how hostile this run is.
        self.drop = r.choice([0.0, 0.01, 0.05, 0.1])
        self.dup = r.choice([0.0, 0.01, 0.05])
        self.max_delay = r.choice([0.3, 1.0, 2.5])
        self.crash_rate = r.choice([0.002, 0.01, 0.03])
        self.partition_rate = r.choice([0.003, 0.01, 0.03])
        self.transfer_rate = r.choice([0.0, 0.005, 0.02])
        self.member_rate = r.choice([0.0, 0.01, 0.03])
        self.slow_rate = r.choice([0.0, 0.01, 0.03])
        # Targeted faults, as a Jepsen nemesis would aim them: at a new leader soon after its
        # election, at a node whose disk write is in flight, at a node that just voted.
        self.nemesis = r.choice([0.0, 0.5, 1.0])
        self.crash_inflight = r.choice([0.0, 0.02, 0.08])
        self.crash_after_vote = r.choice([0.0, 0.2, 0.5])
        self.split_votes = r.choice([0.0, 0.3, 0.6])
        self.commit_strike = r.choice([0.0, 0.03, 0.1])
        self.first_commit_strike = r.choice([0.0, 0.5, 1.0])
        self.first_commit: dict[int, int] = {}
        self.options = RaftOptions(
            election_tick=ELECTION_TICK,
            heartbeat_tick=2,
            max_inflight=r.choice([1, 4, 64]),
            max_entries_per_msg=r.choice([1, 1, 2, 8, 64]),
            max_bytes_per_msg=r.choice([200, 1 << 20]),
            snapshot_chunk_bytes=r.choice([64, 512, 1 << 20]),
            inject_bug=None if bug == "early-ack" else bug,
        )
        # The last stretch is calm: faults heal, then clients stop starting operations, and
        # everything pending must complete before the end (liveness).
        tail = max(int(steps * 0.3), 150)
        self.heal_at = max(steps - tail, 1)
        self.quiet_at = self.heal_at + tail // 2
        self.liveness_bound = 12 * ELECTION_TICK
        voters = frozenset(f"n{i}" for i in range(1, nodes + 1))
        self.bootstrap = Configuration(voters)
        self.nodes: dict[str, _SimNode] = {}
        for nid in sorted(voters):
            self._add_node(nid, self.bootstrap)
        self.next_node = nodes + 1
        self.clients = [_SimClient(f"c{i}") for i in range(1, r.choice([3, 4, 6]) + 1)]
        self.history: list[dict[str, Any]] = []
        self.blocked: set[tuple[str, str]] = set()
        # Bumped at every new partition, so that a scheduled heal ends only its own partition.
        self.partition_gen = 0
        self.leaders: dict[int, str] = {}
        self.committed: dict[int, tuple[int, int, bytes]] = {}
        self.max_committed = 0
        self.seen_entries: dict[tuple[int, int], tuple[int, bytes, int | None]] = {}
        self.member_step = "add"
        self.member_node: str | None = None
        self.member_cycles = 0
        self.leader_seen_at: int | None = None
        o = self.options
        self._log(
            f"seed {seed}: {nodes} nodes, {len(self.clients)} clients, drop={self.drop} "
            f"dup={self.dup} delay<={self.max_delay} crash={self.crash_rate} "
            f"partition={self.partition_rate} transfer={self.transfer_rate} "
            f"membership={self.member_rate} slow-disk={self.slow_rate} nemesis={self.nemesis} "
            f"batch={o.max_entries_per_msg} window={o.max_inflight} "
            f"chunk={o.snapshot_chunk_bytes} bug={bug}"
        )

    # -- plumbing -----------------------------------------------------------------------------

    def _log(self, text: str) -> None:
        line = f"t={self.now:8.2f} {text}"
        self.trace.append(line)
        if self._live_trace is not None:
            self._live_trace(line)

    def _at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        self._qseq += 1
        heapq.heappush(self._queue, (when, self._qseq, fn, args))

    def _add_node(self, nid: str, bootstrap: Configuration) -> _SimNode:
        node = _SimNode(nid, MemoryStorage(), bootstrap)
        node.snap_every = self.rng.choice([8, 20, 50])
        node.disk_factor = 1.0
        self.nodes[nid] = node
        self._start(node)
        return node

    def _start(self, node: _SimNode) -> None:
        hs, snap, entries = node.storage.load()
        node.incarnation += 1
        node.sm = KVStateMachine.from_bytes(snap.data) if snap is not None else KVStateMachine()
        node.raft = RaftNode(
            node.id,
            self.options,
            hard_state=hs,
            snapshot=snap,
            entries=entries,
            config=node.bootstrap,
            applied=snap.meta.index if snap else 0,
            rng=random.Random(self.rng.random()),
        )
        node.saving = None
        node.pending_writes = {}
        node.pending_reads = {}
        node.waiting_reads = []
        node.seen_commit = node.raft.commit_index
        node.seen_role = None

    # -- network ------------------------------------------------------------------------------

    def _send(self, src: str, dst: str, payload: Any) -> None:
        if (src, dst) in self.blocked or self.rng.random() < self.drop:
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            delay = 0.01 + self.rng.random() * self.max_delay
            self._at(self.now + delay, self._deliver, src, dst, payload)

    def _deliver(self, src: str, dst: str, payload: Any) -> None:
        if (src, dst) in self.blocked:
            return
        if dst.startswith("c"):
            self._client_reply(payload)
            return
        node = self.nodes.get(dst)
        if node is None or node.raft is None:
            return
        if isinstance(payload, _ClientRequest):
            self._node_request(node, payload)
        else:
            node.raft.step(payload)
        self._pump(node)

    # -- node driver --------------------------------------------------------------------------

    def _pump(self, node: _SimNode) -> None:
        raft = node.raft
        assert raft is not None
        self._check_node(node)
        if node.saving is not None or not raft.has_ready():
            return
        rd = raft.ready()
        self._check_ready(node, rd)
        node.saving = rd
        node.storage.write(rd.hard_state, rd.entries, rd.snapshot)
        if self.bug == "early-ack":
            # Planted driver bug: send before the write is durable.
            self._send_all(node, rd.messages)
            rd.messages = []
        latency = 0.02 + self.rng.random() * 0.3
        if self.rng.random() < 0.1:
            latency += self.rng.random() * 2
        latency *= node.disk_factor
        self._at(self.now + latency, self._saved, node, node.incarnation)
        if self.tick_no < self.heal_at and self.rng.random() < self.crash_inflight:
            self._at(
                self.now + latency * self.rng.random(), self._crash_for, node, node.incarnation
            )

    def _send_all(self, node: _SimNode, messages: Sequence[Message]) -> None:
        for m in messages:
            self._send(node.id, m.dst, m)

    def _saved(self, node: _SimNode, incarnation: int) -> None:
        if node.incarnation != incarnation or node.raft is None or node.saving is None:
            return
        raft = node.raft
        rd = node.saving
        node.storage.sync()
        if rd.snapshot is not None:
            node.sm = KVStateMachine.from_bytes(rd.snapshot.data)
            self._log(f"{node.id} restored snapshot at {rd.snapshot.meta.index}")
        self._send_all(node, rd.messages)
        if (
            self.tick_no < self.heal_at
            and self.crash_after_vote
            and any(
                isinstance(m, RequestVoteResponse) and m.granted and not m.pre_vote
                for m in rd.messages
            )
            and self.rng.random() < self.crash_after_vote
        ):
            self._crash_for(node, node.incarnation, 0.1 + self.rng.random())
            return
        for e in rd.committed:
            self._apply(node, e)
        for rs in rd.read_states:
            node.waiting_reads.append((rs.index, rs.request_ctx))
        self._serve_reads(node)
        raft.advance(rd)
        node.saving = None
        if raft.applied - raft.snapshot_index >= node.snap_every:
            meta = SnapshotMeta(raft.applied, raft.term_at(raft.applied) or 0, raft.config)
            snap = Snapshot(meta, node.sm.to_bytes())
            node.storage.compact(snap)
            raft.compact(snap)
        self._pump(node)

    def _apply(self, node: _SimNode, e: Entry) -> None:
        got = self.committed.get(e.index)
        if got is not None and got != (e.term, int(e.kind), e.data):
            raise Violation(
                f"state-machine safety: {node.id} applies {e.index}/{e.term} but {got[0]} was "
                "committed there"
            )
        out = node.sm.apply(e)
        if out is None:
            return
        client, seq, result = out
        if node.pending_writes.pop((client, seq), None):
            self._send(node.id, client, _ClientReply(client, seq, result))

    def _serve_reads(self, node: _SimNode) -> None:
        still = []
        for index, ctx in node.waiting_reads:
            if node.sm.applied >= index:
                req = node.pending_reads.pop(ctx, None)
                if req is not None:
                    client, seq, key = req
                    self._send(node.id, client, _ClientReply(client, seq, node.sm.get(key)))
            else:
                still.append((index, ctx))
        node.waiting_reads = still

    def _node_request(self, node: _SimNode, req: _ClientRequest) -> None:
        raft = node.raft
        assert raft is not None
        kind = req.op[0]
        if kind == "get":
            ctx = msgpack.packb([req.client, req.seq, self.events])
            r = raft.read_index(ctx)
            if isinstance(r, NotLeader):
                self._send(
                    node.id,
                    req.client,
                    _ClientReply(req.client, req.seq, None, True, r.leader_hint),
                )
            else:
                node.pending_reads[ctx] = (req.client, req.seq, req.op[1])
            return
        session = node.sm.sessions.get(req.client)
        if session is not None and session.last_seq >= req.seq:
            if session.last_seq == req.seq:
                result = msgpack.unpackb(session.response)
                self._send(node.id, req.client, _ClientReply(req.client, req.seq, result))
            return
        res = raft.propose(encode_command(req.client, req.seq, req.op))
        if isinstance(res, NotLeader):
            self._send(
                node.id, req.client, _ClientReply(req.client, req.seq, None, True, res.leader_hint)
            )
        else:
            node.pending_writes[(req.client, req.seq)] = True

    # -- invariants ---------------------------------------------------------------------------

    def _check_ready(self, node: _SimNode, rd: Ready) -> None:
        raft = node.raft
        assert raft is not None
        for e in rd.entries:
            prev = raft.term_at(e.index - 1)
            key = (e.index, e.term)
            val = (int(e.kind), e.data, prev)
            seen = self.seen_entries.get(key)
            if seen is None:
                self.seen_entries[key] = val
            elif seen != val:
                raise Violation(
                    f"log matching: {node.id} has entry {e.index}/{e.term} after term {prev}, "
                    f"another log has it after term {seen[2]} (or with other data)"
                )

    def _check_node(self, node: _SimNode) -> None:
        raft = node.raft
        assert raft is not None
        if raft.applied > raft.commit_index:
            raise Violation(f"{node.id} applied {raft.applied} past commit {raft.commit_index}")
        if raft.commit_index < node.seen_commit:
            raise Violation(
                f"{node.id} commit index went back from {node.seen_commit} to {raft.commit_index}"
            )
        if raft.commit_index > node.seen_commit:
            for i in range(node.seen_commit + 1, raft.commit_index + 1):
                e = raft.entry_at(i)
                if e is None:
                    continue
                val = (e.term, int(e.kind), e.data)
                got = self.committed.get(i)
                if got is None:
                    self.committed[i] = val
                    if i > self.max_committed:
                        self.max_committed = i
                elif got != val:
                    raise Violation(
                        f"state-machine safety: {node.id} committed {i}/{e.term}, but {i}/{got[0]}"
                        " was committed before"
                    )
            node.seen_commit = raft.commit_index
            if raft.role == Role.LEADER and self.tick_no < self.heal_at:
                first = self.first_commit.get(raft.term) is None
                self.first_commit.setdefault(raft.term, raft.commit_index)
                p = self.first_commit_strike if first else self.commit_strike
                if self.rng.random() < p:
                    # Cut the leader off right after it commits (a new leader right after its
                    # first commit), before the followers learn of it.
                    self._at(self.now, self._strike, node, raft.term)
        role = (raft.role, raft.term)
        if role != node.seen_role:
            node.seen_role = role
            self._log(f"{node.id} is {raft.role.value} in term {raft.term}")
            if (
                raft.role == Role.CANDIDATE
                and self.tick_no < self.heal_at
                and self.rng.random() < self.split_votes
            ):
                # Split votes: another node campaigns right behind this one.
                others = [n for n in self._live_nodes() if n is not node]
                if others:
                    rival = self.rng.choice(others)
                    when = self.now + self.rng.random() * 3
                    self._at(when, self._campaign, rival, rival.incarnation)
            if raft.role == Role.LEADER:
                if self.tick_no < self.heal_at and self.rng.random() < self.nemesis:
                    delay = self.rng.choice([0.0, 0.3, 1.0, 3.0, 6.0]) * self.rng.random()
                    self._at(self.now + delay, self._strike, node, raft.term)
                other = self.leaders.setdefault(raft.term, node.id)
                if other != node.id:
                    raise Violation(
                        f"election safety: {other} and {node.id} both lead term {raft.term}"
                    )
                m = self.max_committed
                if m > raft.snapshot_index:
                    t = raft.term_at(m)
                    if t != self.committed[m][0]:
                        raise Violation(
                            f"leader completeness: {node.id} leads term {raft.term} without "
                            f"committed entry {m}/{self.committed[m][0]}"
                        )

    # -- clients ------------------------------------------------------------------------------

    def _client_step(self, c: _SimClient) -> None:
        if c.op is None:
            if self.tick_no >= self.quiet_at or self.rng.random() > 0.3:
                return
            self._new_op(c)
            return
        if self.now < c.deadline:
            return
        c.attempts += 1
        if c.attempts >= 4 and self.tick_no < self.heal_at:
            # Give up: the outcome is unknown (the write may still apply).
            self._log(f"{c.id} gives up on seq {c.seq}")
            c.op = None
            return
        c.redirects = 0
        # Try another server than the one that did not answer.
        c.target = self.rng.choice(sorted(set(self.nodes) - {c.target}) or sorted(self.nodes))
        self._client_send(c)

    def _new_op(self, c: _SimClient) -> None:
        r = self.rng
        key = r.choice(KEYS)
        c.seq += 1
        kind = r.choice(("put", "get", "get", "cas"))
        value = f"{c.id}.{c.seq}"
        if kind == "put":
            op: tuple[Any, ...] = ("put", key, value)
            inp: tuple[Any, ...] = ("put", value)
        elif kind == "get":
            op = ("get", key)
            inp = ("get",)
        else:
            expected = c.last_seen.get(key)
            op = ("cas", key, expected, value)
            inp = ("cas", expected, value)
        c.op = op
        c.key = key
        c.attempts = 0
        c.redirects = 0
        self.events += 1
        c.history_index = len(self.history)
        self.history.append(
            {
                "client": c.id,
                "key": key,
                "input": inp,
                "call": self.events,
                "ret": None,
                "out": None,
            }
        )
        if not c.target or r.random() < 0.2:
            c.target = r.choice(sorted(self.nodes))
        self._log(f"{c.id} invokes {op} (seq {c.seq}) at {c.target}")
        self._client_send(c)

    def _client_send(self, c: _SimClient) -> None:
        assert c.op is not None
        c.deadline = self.now + CLIENT_TIMEOUT
        self._send(c.id, c.target, _ClientRequest(c.id, c.seq, c.op))

    def _client_resend(self, c: _SimClient, seq: int) -> None:
        if c.op is not None and c.seq == seq:
            self._client_send(c)

    def _client_reply(self, reply: _ClientReply) -> None:
        c = next(x for x in self.clients if x.id == reply.client)
        if c.op is None or reply.seq != c.seq:
            return
        if reply.redirect:
            c.redirects += 1
            if c.redirects > 8:
                return
            c.target = reply.hint if reply.hint else self.rng.choice(sorted(self.nodes))
            # Back off a little: during an election or a transfer hints can go round in circles.
            self._at(self.now + 0.5 + self.rng.random(), self._client_resend, c, c.seq)
            return
        self.events += 1
        h = self.history[c.history_index]
        h["ret"] = self.events
        h["out"] = reply.result
        if c.op[0] == "get":
            c.last_seen[c.key] = reply.result
        elif c.op[0] == "put":
            c.last_seen[c.key] = c.op[2]
        elif reply.result is True:
            c.last_seen[c.key] = c.op[3]
        self._log(f"{c.id} {c.op} -> {reply.result!r}")
        c.op = None

    # -- faults -------------------------------------------------------------------------------

    def _live_nodes(self) -> list[_SimNode]:
        return [n for n in self.nodes.values() if n.raft is not None]

    def _leader(self) -> _SimNode | None:
        best = None
        for n in self._live_nodes():
            assert n.raft is not None
            if n.raft.is_leader and (best is None or n.raft.term > best.raft.term):  # type: ignore[union-attr]
                best = n
        return best

    def _crash(self, node: _SimNode) -> None:
        what = node.storage.crash(self.rng)
        node.raft = None
        node.saving = None
        node.incarnation += 1
        self._log(f"CRASH {node.id} ({what})")

    def _crash_for(self, node: _SimNode, incarnation: int, downtime: float | None = None) -> None:
        if node.incarnation != incarnation or node.raft is None:
            return
        self._crash(node)
        if downtime is None:
            downtime = self.rng.choice([0.5, 3.0, 20.0]) * self.rng.random()
        self._at(self.now + downtime, self._restart, node)

    def _strike(self, node: _SimNode, term: int) -> None:
        """The leader nemesis: isolate or crash a leader soon after its election."""
        if node.raft is None or node.raft.term != term or self.tick_no >= self.heal_at:
            return
        if self.rng.random() < 0.75:
            self.blocked.clear()
            for y in self.nodes:
                if y != node.id:
                    self.blocked.add((node.id, y))
                    self.blocked.add((y, node.id))
            self._log(f"PARTITION isolate new leader {node.id}")
            self.partition_gen += 1
            self._at(self.now + self.rng.randint(3, 40), self._unpartition, self.partition_gen)
        else:
            self._crash_for(node, node.incarnation)
        # An election storm: once the followers' leases ran out, several campaign at once.
        others = [n for n in self._live_nodes() if n is not node]
        if len(others) >= 2 and self.rng.random() < 0.5:
            when = self.now + ELECTION_TICK + self.rng.random() * 2
            for n in self.rng.sample(others, 2):
                self._at(when, self._campaign, n, n.incarnation)

    def _campaign(self, node: _SimNode, incarnation: int) -> None:
        if node.raft is not None and node.incarnation == incarnation:
            node.raft.campaign()
            self._pump(node)

    def _unpartition(self, gen: int) -> None:
        if self.blocked and gen == self.partition_gen:
            self.blocked.clear()
            self._log("partition healed")

    def _restart(self, node: _SimNode) -> None:
        if node.raft is not None:
            return
        self._start(node)
        assert node.raft is not None
        self._log(
            f"RESTART {node.id} term={node.raft.term} vote={node.raft.vote} "
            f"last={node.raft.last_index} commit={node.raft.commit_index}"
        )
        self._pump(node)

    def _faults(self) -> None:
        r = self.rng
        ids = sorted(self.nodes)
        if r.random() < self.crash_rate:
            victim = self.nodes[r.choice(ids)]
            if victim.raft is not None:
                self._crash(victim)
                back = self.now + r.choice([0.5, 2, 10, 30]) * r.random()
                self._at(back, self._restart, victim)
        if r.random() < self.partition_rate and not self.blocked:
            self._partition(ids)
        if self.blocked and r.random() < 0.03:
            self.blocked.clear()
            self._log("partition healed")
        if r.random() < self.slow_rate:
            node = self.nodes[r.choice(ids)]
            node.disk_factor = r.choice([5.0, 20.0])
            self._log(f"{node.id} disk slow x{node.disk_factor}")
            self._at(self.now + r.randint(5, 40), self._disk_ok, node)
        if r.random() < self.transfer_rate:
            leader = self._leader()
            if leader is not None and leader.raft is not None:
                voters = sorted(leader.raft.config.voters - {leader.id})
                if voters:
                    target = r.choice(voters)
                    self._log(f"transfer leadership {leader.id} -> {target}")
                    leader.raft.transfer_leadership(target)
                    self._pump(leader)
        if r.random() < self.member_rate:
            self._membership()

    def _disk_ok(self, node: _SimNode) -> None:
        node.disk_factor = 1.0

    def _partition(self, ids: list[str]) -> None:
        r = self.rng
        kind = r.choice(["halves", "isolate", "partial"])
        ids = list(ids)
        r.shuffle(ids)
        self.partition_gen += 1
        if kind == "halves":
            cut = r.randint(1, len(ids) - 1)
            a, b = ids[:cut], ids[cut:]
            for x in a:
                for y in b:
                    self.blocked.add((x, y))
                    self.blocked.add((y, x))
            self._log(f"PARTITION {sorted(a)} | {sorted(b)}")
        elif kind == "isolate":
            leader = self._leader()
            x = leader.id if leader is not None and r.random() < 0.7 else ids[0]
            for y in ids:
                if y != x:
                    self.blocked.add((x, y))
                    self.blocked.add((y, x))
            self._log(f"PARTITION isolate {x}")
        else:
            # Partial connectivity: A and C cannot talk, both see B.
            one, other = ids[0], ids[1]
            self.blocked.add((one, other))
            self.blocked.add((other, one))
            self._log(f"PARTITION partial: {one} cannot reach {other}, both reach the rest")

    def _membership(self) -> None:
        leader = self._leader()
        if leader is None or leader.raft is None or self.member_cycles >= 2:
            return
        raft = leader.raft
        try:
            if self.member_step == "add":
                nid = f"n{self.next_node}"
                self.next_node += 1
                res = raft.propose_config_change(ConfigChange(ConfigChangeKind.ADD_LEARNER, nid))
                if isinstance(res, NotLeader):
                    return
                self._add_node(nid, Configuration(frozenset()))
                self.member_node = nid
                self.member_step = "promote"
                self._log(f"MEMBERSHIP add learner {nid} at {res}")
            elif self.member_step == "promote":
                learner = self.member_node
                assert learner is not None
                new = self.nodes[learner]
                if learner not in raft.config.learners:
                    return
                if new.raft is None or new.raft.applied + 5 < raft.commit_index:
                    return  # not caught up yet
                res = raft.propose_config_change(ConfigChange(ConfigChangeKind.ADD_VOTER, learner))
                if isinstance(res, NotLeader):
                    return
                self.member_step = "remove"
                self._log(f"MEMBERSHIP promote {learner} at {res}")
            else:
                if len(raft.config.voters) <= self.n:
                    return
                victim = self.rng.choice(sorted(raft.config.voters))
                res = raft.propose_config_change(ConfigChange(ConfigChangeKind.REMOVE, victim))
                if isinstance(res, NotLeader):
                    return
                self.nodes[victim].removed = True
                self.member_step = "add"
                self.member_cycles += 1
                self._log(f"MEMBERSHIP remove {victim} at {res}")
        except ProposalRejected as e:
            self._log(f"MEMBERSHIP rejected: {e}")
            return
        self._pump(leader)

    def _heal(self) -> None:
        self._log("HEAL: partitions cleared, nodes restarted, network and disks reliable")
        self.blocked.clear()
        self.drop = 0.0
        self.dup = 0.0
        for node in self.nodes.values():
            node.disk_factor = 1.0
            if node.raft is None:
                self._restart(node)

    # -- the run ------------------------------------------------------------------------------

    def _tick(self) -> None:
        self.tick_no += 1
        if self.tick_no == self.heal_at:
            self._heal()
        elif self.tick_no < self.heal_at:
            self._faults()
        for node in list(self.nodes.values()):
            if node.raft is not None:
                node.raft.tick()
                self._pump(node)
        for c in self.clients:
            self._client_step(c)
        if self.tick_no >= self.heal_at and self.leader_seen_at is None:
            leader = self._leader()
            if leader is not None and leader.raft is not None:
                raft = leader.raft
                if raft.term_at(raft.commit_index) == raft.term:
                    self.leader_seen_at = self.tick_no
            elif self.tick_no > self.heal_at + self.liveness_bound:
                raise Violation(
                    f"liveness: no leader {self.liveness_bound} ticks after the faults healed"
                )

    def run(self) -> RunResult:
        """Run to the end or to the first violation."""
        violation = None
        try:
            self._at(1.0, self._tick_event)
            end = float(self.steps)
            storm_tick, storm_events = 0, 0
            while self._queue:
                when, _, fn, args = heapq.heappop(self._queue)
                if when > end:
                    break
                self.now = when
                fn(*args)
                if self.tick_no != storm_tick:
                    storm_tick, storm_events = self.tick_no, 0
                storm_events += 1
                if storm_events > 50_000:
                    raise Violation(f"livelock: a storm of {storm_events} events within one tick")
            self._final_checks()
        except Violation as v:
            violation = str(v)
            self._log(f"VIOLATION: {violation}")
        except AssertionError as e:
            violation = f"assertion failed: {e}"
            self._log(f"VIOLATION: {violation}")
        acked = sum(1 for h in self.history if h["ret"] is not None)
        return RunResult(
            self.seed,
            self.n,
            self.steps,
            self.bug,
            violation,
            list(self.trace),
            len(self.history),
            acked,
            None if self.leader_seen_at is None else self.leader_seen_at - self.heal_at,
        )

    def _tick_event(self) -> None:
        self._tick()
        self._at(self.now + 1.0, self._tick_event)

    def _final_checks(self) -> None:
        pending = [c.id for c in self.clients if c.op is not None]
        if pending:
            raise Violation(f"liveness: operations of {pending} still pending at the end")
        ops = [
            Operation(h["client"], h["call"], h["ret"], h["input"], h["out"], h["key"])
            for h in self.history
        ]
        result = check_kv_history(ops)
        if not result.ok:
            raise Violation(result.explain())
        # No acknowledged write lost: every member of the final configuration that caught up
        # has executed each of them.
        leader = self._leader()
        if leader is None or leader.raft is None:
            raise Violation("liveness: no leader at the end")
        acked = {
            (h["client"], int(h["input"][-1].split(".")[1]))
            for h in self.history
            if h["ret"] is not None
            and (h["input"][0] == "put" or (h["input"][0] == "cas" and h["out"] is True))
        }
        for nid in sorted(leader.raft.config.voters):
            node = self.nodes[nid]
            if node.raft is None or node.sm.applied < leader.raft.commit_index:
                continue
            lost = sorted(acked - node.sm.writes)
            if lost:
                raise Violation(f"lost acknowledged writes on {nid}: {lost[:5]}")


def run_seeds(
    seeds: int,
    first_seed: int,
    nodes: int = 3,
    steps: int = DEFAULT_STEPS,
    bug: str | None = None,
    stop_at_first: bool = False,
    trace: Callable[[str], None] | None = None,
) -> list[RunResult]:
    """Run ``seeds`` simulations starting at ``first_seed``."""
    results = []
    for seed in range(first_seed, first_seed + seeds):
        res = Simulation(seed, nodes, steps, bug, trace).run()
        results.append(res)
        if stop_at_first and res.violation:
            break
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m dogfs.raft.sim", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="number of runs")
    p.add_argument(
        "--first-seed", type=int, default=None, help="seed of the first run (default: random)"
    )
    p.add_argument("--nodes", type=int, default=3, choices=(3, 5))
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="ticks per run")
    p.add_argument("--inject-bug", choices=BUGS, default=None)
    p.add_argument("--trace", action="store_true", help="print every run's trace as it goes")
    p.add_argument("--stop-at-first", action="store_true", help="stop at the first violation")
    args = p.parse_args(argv)
    first = args.first_seed
    if first is None:
        first = random.SystemRandom().randrange(1 << 31)
    out = sys.stdout
    out.write(
        f"seeds {first}..{first + args.seeds - 1}, nodes={args.nodes}, steps={args.steps}"
        f"{', bug=' + args.inject_bug if args.inject_bug else ''}\n"
    )
    started = time.perf_counter()
    violations = 0
    runs = 0

    def live(line: str) -> None:
        out.write(line + "\n")

    for seed in range(first, first + args.seeds):
        res = Simulation(
            seed,
            args.nodes,
            args.steps,
            args.inject_bug,
            live if args.trace else None,
        ).run()
        runs += 1
        if res.violation:
            violations += 1
            out.write(f"\nseed={seed} VIOLATION: {res.violation}\n")
            out.write(f"  replay: {res.replay_command()}\n")
            if not args.trace:
                out.write("  trace (last events):\n")
                for line in res.trace[-40:]:
                    out.write(f"    {line}\n")
            if args.stop_at_first:
                break
    elapsed = time.perf_counter() - started
    out.write(f"{runs / elapsed if elapsed else 0:.1f} runs/s\n")
    out.write(f"runs={runs} violations={violations}\n")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
