# -*- test-case-name: tests.test_raft_core -*-
"""The pure Raft core: no sockets, no clocks, no disk.

This module owns the Raft algorithm itself, shaped like etcd's raft library. Ticks
(:meth:`RaftNode.tick`), received messages (:meth:`RaftNode.step`), proposals and the
completion of storage writes (:meth:`RaftNode.advance`) go in; a :class:`Ready` comes out,
holding the hard state and entries to persist, the messages to send once they are durable, the
committed entries to apply and the linearizable reads that became safe.

The driver's loop, in order, for each :class:`Ready` (never ask for the next one before calling
:meth:`RaftNode.advance` on the previous one):

1. if ``ready.snapshot`` is set: durably replace the *whole* stored log with it (a follower
   received it from the leader) and restore the state machine from ``ready.snapshot.data``;
2. append ``ready.entries`` durably, first truncating the stored log from
   ``ready.entries[0].index`` when that index is not past the last stored one;
3. save ``ready.hard_state`` when set (1-3 are one durable batch: one fsync);
4. only then send ``ready.messages``;
5. apply ``ready.committed`` in order (``CONFIG`` entries are applied by the core itself; the
   state machine ignores them and ``NOOP`` entries, but must count them as applied);
6. serve each read in ``ready.read_states`` once the state machine has applied its ``index``;
7. call :meth:`RaftNode.advance` with the same Ready.

Figure 2 of the Raft paper is followed exactly; on top of it: pre-vote and check-quorum,
a no-op on election, ReadIndex (and, as an option, lease) reads, leadership transfer by
TimeoutNow, log compaction with chunked and resumable InstallSnapshot, one-at-a-time membership
changes with learners (a change takes effect when it is applied), and batched, pipelined,
flow-controlled replication. ``RaftOptions.inject_bug`` plants known bugs for the simulator's
proof that its checks bite; nothing else may set it.

May import nothing of DogFS.
"""

from __future__ import annotations

import random
import typing
from collections import deque
from collections.abc import Sequence
from enum import Enum, IntEnum
from typing import Any, Union

import msgpack
from attrs import define, field, fields, frozen

from dogfs.wire.packing import packb

__all__ = [
    "BUGS",
    "AppendEntries",
    "AppendEntriesResponse",
    "ConfigChange",
    "ConfigChangeKind",
    "Configuration",
    "Entry",
    "EntryKind",
    "HardState",
    "Heartbeat",
    "HeartbeatResponse",
    "InstallSnapshot",
    "InstallSnapshotResponse",
    "Message",
    "NotLeader",
    "ProposalRejected",
    "RaftNode",
    "RaftOptions",
    "ReadIndexRequest",
    "ReadIndexResponse",
    "ReadState",
    "Ready",
    "RequestVote",
    "RequestVoteResponse",
    "Role",
    "Snapshot",
    "SnapshotMeta",
    "TimeoutNow",
    "decode_message",
    "encode_message",
]

#: The bugs ``RaftOptions.inject_bug`` can plant (the simulator's proof that its checks bite).
#: ``early-ack`` is a driver bug (messages sent before the storage write is durable): the
#: simulator plants it, the core does not look at it.
BUGS = ("commit-old-term", "forget-vote", "no-truncate", "stale-read", "early-ack")


class EntryKind(IntEnum):
    """What a log entry carries."""

    NORMAL = 0
    NOOP = 1
    CONFIG = 2


@frozen
class Entry:
    """One log entry. ``data`` is the command for NORMAL, the encoded Configuration for CONFIG."""

    term: int
    index: int
    kind: EntryKind
    data: bytes


@frozen
class HardState:
    """What Raft must persist before answering: current term, vote in it, commit index."""

    term: int
    vote: str | None
    commit: int


@frozen
class Configuration:
    """The members of a group: voters and learners (non-voting members that catch up)."""

    voters: frozenset[str]
    learners: frozenset[str] = frozenset()

    def members(self) -> frozenset[str]:
        """Every member, voting or not."""
        return self.voters | self.learners

    def encode(self) -> bytes:
        """The bytes a CONFIG entry carries."""
        return msgpack.packb([sorted(self.voters), sorted(self.learners)])

    @classmethod
    def decode(cls, data: bytes) -> Configuration:
        """Read what :meth:`encode` wrote; ``ValueError`` on anything else."""
        try:
            raw = msgpack.unpackb(data)
        except Exception as e:
            raise ValueError(f"malformed configuration: {e}") from None
        return _configuration_from_wire(raw)


class ConfigChangeKind(IntEnum):
    """One-server membership changes."""

    ADD_LEARNER = 0
    #: Add a voter, or promote a learner to voter.
    ADD_VOTER = 1
    REMOVE = 2


@frozen
class ConfigChange:
    """A change of one server's membership."""

    kind: ConfigChangeKind
    node: str

    def apply_to(self, config: Configuration) -> Configuration:
        """The configuration after this change; ``ValueError`` when it changes nothing."""
        v, learners = set(config.voters), set(config.learners)
        if self.kind == ConfigChangeKind.ADD_LEARNER:
            if self.node in v or self.node in learners:
                raise ValueError(f"{self.node} is already a member")
            learners.add(self.node)
        elif self.kind == ConfigChangeKind.ADD_VOTER:
            if self.node in v:
                raise ValueError(f"{self.node} is already a voter")
            learners.discard(self.node)
            v.add(self.node)
        else:
            if self.node not in v and self.node not in learners:
                raise ValueError(f"{self.node} is not a member")
            v.discard(self.node)
            learners.discard(self.node)
            if not v:
                raise ValueError("cannot remove the last voter")
        return Configuration(frozenset(v), frozenset(learners))


@frozen
class SnapshotMeta:
    """Where a snapshot stands in the log, and the configuration in force there."""

    index: int
    term: int
    config: Configuration


@frozen
class Snapshot:
    """A state-machine snapshot: ``data`` is the state machine's bytes."""

    meta: SnapshotMeta
    data: bytes


@frozen
class ReadState:
    """A linearizable read: safe to serve once the state machine has applied ``index``."""

    request_ctx: bytes
    index: int


@frozen
class NotLeader:
    """This node cannot serve the request; ``leader_hint`` is where to redirect, if known."""

    leader_hint: str | None


class ProposalRejected(Exception):
    """A configuration change cannot be proposed now (one is pending, or it is invalid)."""


class ChangePending(ProposalRejected):
    """An earlier configuration change (or, on a new leader, an entry it inherited) is not
    applied yet: the same change may be proposed again once it is."""


class Role(Enum):
    """What a node currently is."""

    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"
    LEARNER = "learner"


# ---------------------------------------------------------------------------------------------
# Messages


@frozen
class RequestVote:
    """RequestVote, or PreVote when ``pre_vote`` (the term is then the one it would campaign in)."""

    term: int
    src: str
    dst: str
    last_index: int
    last_term: int
    pre_vote: bool = False
    #: Sent on a leadership transfer: voters must not ignore it because of their leader lease.
    transfer: bool = False


@frozen
class RequestVoteResponse:
    """The answer to a (pre-)vote request."""

    term: int
    src: str
    dst: str
    granted: bool
    pre_vote: bool = False


@frozen
class AppendEntries:
    """AppendEntries: entries after (prev_index, prev_term) and the leader's commit index."""

    term: int
    src: str
    dst: str
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int


@frozen
class AppendEntriesResponse:
    """On success ``index`` is the follower's match; on rejection the rejected prev_index, with
    ``hint_index``/``hint_term`` pointing at where the logs may agree."""

    term: int
    src: str
    dst: str
    success: bool
    index: int
    hint_index: int = 0
    hint_term: int = 0


@frozen
class Heartbeat:
    """Leader liveness; ``commit`` is at most the follower's match; ``ctx`` confirms reads."""

    term: int
    src: str
    dst: str
    commit: int
    ctx: bytes = b""


@frozen
class HeartbeatResponse:
    """Echoes the heartbeat's ``ctx``."""

    term: int
    src: str
    dst: str
    ctx: bytes = b""


@frozen
class InstallSnapshot:
    """One chunk of a snapshot, at ``offset``; ``done`` on the last one."""

    term: int
    src: str
    dst: str
    meta: SnapshotMeta
    offset: int
    data: bytes
    done: bool


@frozen
class InstallSnapshotResponse:
    """``next_offset`` is what the follower holds of the snapshot at ``snap_index``: the leader
    resumes from there (after a lost chunk, or a follower restart it starts over)."""

    term: int
    src: str
    dst: str
    snap_index: int
    next_offset: int


@frozen
class TimeoutNow:
    """Leadership transfer: campaign now, skipping pre-vote."""

    term: int
    src: str
    dst: str


@frozen
class ReadIndexRequest:
    """A follower forwards a linearizable read to the leader."""

    term: int
    src: str
    dst: str
    ctx: bytes


@frozen
class ReadIndexResponse:
    """The leader's answer: the read is safe once ``index`` is applied (only if ``ok``)."""

    term: int
    src: str
    dst: str
    ctx: bytes
    index: int
    ok: bool


Message = Union[
    RequestVote,
    RequestVoteResponse,
    AppendEntries,
    AppendEntriesResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    InstallSnapshotResponse,
    TimeoutNow,
    ReadIndexRequest,
    ReadIndexResponse,
]

# Wire codes follow the union's order: derived from it, so a message is declared once.
_MESSAGE_TYPES: tuple[type, ...] = typing.get_args(Message)
_TYPE_CODE = {cls: code for code, cls in enumerate(_MESSAGE_TYPES)}
_FIELD_NAMES = {cls: tuple(f.name for f in fields(cls)) for cls in _MESSAGE_TYPES}
# Wire kind of each field, checked on decode so that malformed input is a ValueError.
_FIELD_KINDS: dict[str, str] = {
    "term": "int",
    "src": "str",
    "dst": "str",
    "last_index": "int",
    "last_term": "int",
    "pre_vote": "bool",
    "transfer": "bool",
    "granted": "bool",
    "prev_index": "int",
    "prev_term": "int",
    "entries": "entries",
    "commit": "int",
    "success": "bool",
    "index": "int",
    "hint_index": "int",
    "hint_term": "int",
    "ctx": "bytes",
    "meta": "meta",
    "offset": "int",
    "data": "bytes",
    "done": "bool",
    "snap_index": "int",
    "next_offset": "int",
    "ok": "bool",
}


def _configuration_from_wire(raw: Any) -> Configuration:
    if (
        not isinstance(raw, list)
        or len(raw) != 2
        or not all(isinstance(part, list) for part in raw)
        or not all(isinstance(n, str) for part in raw for n in part)
    ):
        raise ValueError("malformed configuration")
    return Configuration(frozenset(raw[0]), frozenset(raw[1]))


_ENTRY_KINDS = {int(k): k for k in EntryKind}


def _to_wire(kind: str, value: Any) -> Any:
    if kind == "entries":
        return [[e.term, e.index, int(e.kind), e.data] for e in value]
    if kind == "meta":
        c = value.config
        return [value.index, value.term, [sorted(c.voters), sorted(c.learners)]]
    return value


def _check_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"expected a non-negative integer, got {v!r}")
    return v


def _from_wire(kind: str, v: Any) -> Any:
    if kind == "int":
        return _check_int(v)
    if kind == "str":
        if not isinstance(v, str):
            raise ValueError(f"expected a string, got {v!r}")
        return v
    if kind == "bool":
        if not isinstance(v, bool):
            raise ValueError(f"expected a boolean, got {v!r}")
        return v
    if kind == "bytes":
        if not isinstance(v, bytes):
            raise ValueError(f"expected bytes, got {type(v).__name__}")
        return v
    if kind == "entries":
        if not isinstance(v, list):
            raise ValueError("expected a list of entries")
        out = []
        # Followers decode every entry: plain type tests and a table for the kind instead of
        # calls per field (an IntEnum call alone cost as much as the rest).
        for raw in v:
            if type(raw) is not list or len(raw) != 4 or type(raw[3]) is not bytes:
                raise ValueError("malformed entry")
            term, index, code, data = raw
            if type(term) is not int or type(index) is not int or term < 0 or index < 0:
                raise ValueError(f"malformed entry: term {term!r}, index {index!r}")
            ek = _ENTRY_KINDS.get(code) if type(code) is int else None
            if ek is None:
                raise ValueError(f"unknown entry kind {code!r}")
            out.append(Entry(term, index, ek, data))
        return tuple(out)
    if kind == "meta":
        if not isinstance(v, list) or len(v) != 3:
            raise ValueError("malformed snapshot meta")
        return SnapshotMeta(_check_int(v[0]), _check_int(v[1]), _configuration_from_wire(v[2]))
    raise AssertionError(kind)


def encode_message(m: Message) -> bytes:
    """The msgpack bytes of a Raft message."""
    cls = type(m)
    body: list[Any] = [_TYPE_CODE[cls]]
    for name in _FIELD_NAMES[cls]:
        body.append(_to_wire(_FIELD_KINDS[name], getattr(m, name)))
    return packb(body)


def decode_message(data: bytes) -> Message:
    """Read what :func:`encode_message` wrote; ``ValueError`` on malformed input."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:
        raise ValueError(f"malformed raft message: {e}") from None
    if not isinstance(raw, list) or not raw:
        raise ValueError("malformed raft message: not a non-empty list")
    code = raw[0]
    if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code < len(_MESSAGE_TYPES):
        raise ValueError(f"unknown raft message type {code!r}")
    cls = _MESSAGE_TYPES[code]
    names = _FIELD_NAMES[cls]
    if len(raw) < len(names) + 1:
        raise ValueError(f"{cls.__name__}: expected {len(names)} fields, got {len(raw) - 1}")
    # Fields after the ones this release knows are a later release's, added at the end:
    # ignored (as the wire messages do, docs/protocol.md), so that the members of a group
    # may run two releases during a rolling upgrade.
    kwargs = {
        name: _from_wire(_FIELD_KINDS[name], v) for name, v in zip(names, raw[1 : len(names) + 1], strict=True)
    }
    msg: Message = cls(**kwargs)
    return msg


# ---------------------------------------------------------------------------------------------
# Ready and options


@define
class Ready:
    """What the driver must do next (see the module docstring for the order)."""

    hard_state: HardState | None = None
    entries: list[Entry] = field(factory=list)
    snapshot: Snapshot | None = None
    messages: list[Message] = field(factory=list)
    committed: list[Entry] = field(factory=list)
    read_states: list[ReadState] = field(factory=list)

    def contains_updates(self) -> bool:
        """Whether there is anything to persist, send, apply or serve."""
        return bool(
            self.hard_state is not None
            or self.entries
            or self.snapshot is not None
            or self.messages
            or self.committed
            or self.read_states
        )


@frozen
class RaftOptions:
    """Tuning. Ticks are the driver's unit of time (say 100 ms)."""

    #: Followers campaign after a random timeout in [election_tick, 2 * election_tick).
    election_tick: int = 10
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    #: Appends in flight per follower before the leader waits for acknowledgements.
    max_inflight: int = 256
    max_entries_per_msg: int = 1024
    max_bytes_per_msg: int = 1 << 20
    #: Serve reads from the leader's lease (check-quorum) instead of a heartbeat round: faster,
    #: but safe only while clocks drift boundedly.
    lease_read: bool = False
    snapshot_chunk_bytes: int = 1 << 20
    #: Simulator only: plant one of :data:`BUGS`.
    inject_bug: str | None = None


# ---------------------------------------------------------------------------------------------
# Per-follower replication state


class _ProgressState(IntEnum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


class _Progress:
    """The leader's view of one follower (etcd's tracker.Progress)."""

    __slots__ = (
        "match",
        "next",
        "state",
        "probe_sent",
        "inflight",
        "recent_active",
        "pending_snapshot",
        "snap_offset",
        "read_ack",
        "commit_sent",
    )

    def __init__(self, next_index: int) -> None:
        self.match = 0
        self.next = next_index
        self.state = _ProgressState.PROBE
        self.probe_sent = False
        # Last index carried by each append in flight, oldest first.
        self.inflight: deque[int] = deque()
        self.recent_active = False
        self.pending_snapshot = 0
        self.snap_offset = 0
        # Highest read sequence number this follower confirmed by echoing a heartbeat.
        self.read_ack = 0
        # The commit index carried by the last append sent (heartbeats carry it too).
        self.commit_sent = 0

    def become_probe(self) -> None:
        if self.state == _ProgressState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
            self.pending_snapshot = 0
        else:
            self.next = self.match + 1
        self.state = _ProgressState.PROBE
        self.probe_sent = False
        self.inflight.clear()

    def become_replicate(self) -> None:
        self.state = _ProgressState.REPLICATE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflight.clear()

    def paused(self, max_inflight: int) -> bool:
        if self.state == _ProgressState.PROBE:
            return self.probe_sent
        if self.state == _ProgressState.REPLICATE:
            return len(self.inflight) >= max_inflight
        return True


@define
class _PendingRead:
    seq: int
    index: int
    ctx: bytes
    #: None for a read asked on the leader itself, else the follower that forwarded it.
    requester: str | None


# ---------------------------------------------------------------------------------------------
# The node


class RaftNode:
    """One member of a Raft group, as a deterministic state machine with no I/O."""

    def __init__(
        self,
        node_id: str,
        options: RaftOptions,
        *,
        hard_state: HardState,
        snapshot: SnapshotMeta | Snapshot | None,
        entries: Sequence[Entry],
        config: Configuration,
        applied: int,
        rng: random.Random,
    ) -> None:
        """Restore a node from storage.

        ``snapshot`` is the latest stored snapshot (pass the whole :class:`Snapshot` if you have
        it so the node can send it to lagging followers; with only its meta the node can send
        snapshots only after the next :meth:`compact`). ``entries`` follow it contiguously.
        ``config`` is the configuration as of the snapshot (or the bootstrap configuration);
        configuration entries up to ``applied`` are replayed over it here. ``applied`` is how
        far a durable state machine has applied (at least the snapshot index).
        """
        self.id = node_id
        self.options = options
        self._rng = rng
        self._bug = options.inject_bug
        if isinstance(snapshot, Snapshot):
            self._snapshot: Snapshot | None = snapshot
            meta: SnapshotMeta | None = snapshot.meta
        else:
            self._snapshot = None
            meta = snapshot
        self._snap_index = meta.index if meta else 0
        self._snap_term = meta.term if meta else 0
        self._log: list[Entry] = []
        expected = self._snap_index + 1
        for e in entries:
            if e.index < expected:
                continue
            if e.index != expected:
                raise ValueError(f"log gap: expected index {expected}, got {e.index}")
            self._log.append(e)
            expected += 1
        self.term = hard_state.term
        self.vote: str | None = hard_state.vote
        last = self.last_index
        self.commit_index = min(max(hard_state.commit, self._snap_index, applied), last)
        self._applied = max(applied, self._snap_index)
        if self._applied > self.commit_index:
            raise ValueError(f"applied {self._applied} is past the log's end {last}")
        cfg = meta.config if meta else config
        for e in self._log:
            if e.index > self._applied:
                break
            if e.kind == EntryKind.CONFIG:
                cfg = Configuration.decode(e.data)
        self.config: Configuration = cfg
        # The stored log matches ours up to here.
        self._persisted = last
        self._prev_hard_state = HardState(self.term, self.vote, self.commit_index)
        self._pending_restore: Snapshot | None = None
        self._incoming: tuple[SnapshotMeta, bytearray] | None = None
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self.leader_id: str | None = None
        self.role = Role.FOLLOWER
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = options.election_tick
        self._votes: dict[str, bool] = {}
        self._progress: dict[str, _Progress] = {}
        self._transferee: str | None = None
        self._pending_conf_index = 0
        self._read_seq = 0
        self._reads: deque[_PendingRead] = deque()
        self._reads_waiting_commit: list[_PendingRead] = []
        self._led = False
        self._appends_pending = False
        self._become_follower(self.term, None)

    # -- introspection ------------------------------------------------------------------------

    @property
    def last_index(self) -> int:
        """Index of the last entry in the log (the snapshot's when the log is empty)."""
        return self._snap_index + len(self._log)

    @property
    def last_term(self) -> int:
        """Term of the last entry."""
        return self._log[-1].term if self._log else self._snap_term

    @property
    def first_index(self) -> int:
        """Index of the first entry still in memory (after compaction)."""
        return self._snap_index + 1

    @property
    def applied(self) -> int:
        """Index of the last entry handed to the state machine and advanced."""
        return self._applied

    @property
    def snapshot_index(self) -> int:
        """Index the log was compacted up to."""
        return self._snap_index

    @property
    def is_leader(self) -> bool:
        """Whether this node is the leader."""
        return self.role == Role.LEADER

    @property
    def transferee(self) -> str | None:
        """The target of a leadership transfer in progress, if any."""
        return self._transferee

    def term_at(self, index: int) -> int | None:
        """Term of the entry at ``index``; None when compacted away or beyond the end."""
        if index == self._snap_index:
            return self._snap_term
        if index < self._snap_index or index > self.last_index:
            return None
        return self._log[index - self._snap_index - 1].term

    def entry_at(self, index: int) -> Entry | None:
        """The entry at ``index`` if it is in memory."""
        if index <= self._snap_index or index > self.last_index:
            return None
        return self._log[index - self._snap_index - 1]

    def entries_from(self, lo: int, hi: int) -> list[Entry]:
        """Entries with lo <= index <= hi that are in memory."""
        lo = max(lo, self._snap_index + 1)
        hi = min(hi, self.last_index)
        if lo > hi:
            return []
        base = self._snap_index + 1
        return self._log[lo - base : hi - base + 1]

    def hard_state(self) -> HardState:
        """The current hard state."""
        return HardState(self.term, self.vote, self.commit_index)

    def replication(self) -> dict[str, int]:
        """On a leader: how far each member's log is known to match this one (its match
        index); empty on other roles. For status pages, never for decisions."""
        if self.role != Role.LEADER:
            return {}
        return {member: pr.match for member, pr in self._progress.items()}

    def promotable(self) -> bool:
        """Whether this node may campaign now."""
        if self.id not in self.config.voters:
            return False
        if self._pending_restore is not None:
            return False
        # A committed configuration change not yet applied may remove us or change the quorum:
        # campaigning under the old configuration could elect a second leader.
        for e in self.entries_from(self._applied + 1, self.commit_index):
            if e.kind == EntryKind.CONFIG:
                return False
        return True

    # -- inputs -------------------------------------------------------------------------------

    def tick(self) -> None:
        """One unit of time passed."""
        if self.role == Role.LEADER:
            self._tick_leader()
        else:
            self._election_elapsed += 1
            if self._election_elapsed >= self._randomized_timeout:
                self._election_elapsed = 0
                if self.promotable():
                    self._campaign(transfer=False)

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self.options.election_tick:
            self._election_elapsed = 0
            if self.options.check_quorum:
                if not self._quorum_active():
                    self._become_follower(self.term, None)
                    return
            if self._transferee is not None:
                # The transfer did not happen within an election timeout: accept proposals again.
                self._transferee = None
        if self._heartbeat_elapsed >= self.options.heartbeat_tick:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat()

    def _quorum_active(self) -> bool:
        active = 0
        for nid in self.config.voters:
            if nid == self.id:
                active += 1
                continue
            pr = self._progress.get(nid)
            if pr is not None and pr.recent_active:
                active += 1
        for pr in self._progress.values():
            pr.recent_active = False
        return active >= self._quorum()

    def _quorum(self) -> int:
        return len(self.config.voters) // 2 + 1

    def propose(self, data: bytes) -> int | NotLeader:
        """Append a command; returns the index it will have if it commits."""
        if self.role != Role.LEADER:
            return NotLeader(self.leader_id)
        if self._transferee is not None:
            return NotLeader(self._transferee)
        return self._append(EntryKind.NORMAL, data)

    def propose_config_change(self, change: ConfigChange) -> int | NotLeader:
        """Propose a one-server membership change.

        Raises :class:`ProposalRejected` while another change is pending (proposed and not yet
        applied; this includes every change a new leader inherited, and the leader's first
        no-op), or when the change would do nothing.
        """
        if self.role != Role.LEADER:
            return NotLeader(self.leader_id)
        if self._transferee is not None:
            return NotLeader(self._transferee)
        if self._pending_conf_index > self._applied:
            raise ChangePending(
                f"a configuration change (index {self._pending_conf_index}) is still pending"
            )
        try:
            new = change.apply_to(self.config)
        except ValueError as e:
            raise ProposalRejected(str(e)) from None
        index = self._append(EntryKind.CONFIG, new.encode())
        self._pending_conf_index = index
        return index

    def read_index(self, ctx: bytes) -> None | NotLeader:
        """Ask for a linearizable read; a ReadState with ``ctx`` comes out in a later Ready.

        On a follower the request is forwarded to the leader; if that message or its answer is
        lost, no ReadState comes: the caller times out and asks again.
        """
        if self.role == Role.LEADER:
            self._leader_read(ctx, None)
            return None
        if self._bug == "stale-read" and self._led:
            # Planted bug: a deposed leader still answers reads from its own state.
            self._read_states.append(ReadState(ctx, self.commit_index))
            return None
        if self.leader_id is None:
            return NotLeader(None)
        self._send(ReadIndexRequest(self.term, self.id, self.leader_id, ctx))
        return None

    def transfer_leadership(self, target: str) -> None | NotLeader:
        """Hand leadership to ``target`` (a voter); aborted after an election timeout."""
        if self.role != Role.LEADER:
            return NotLeader(self.leader_id)
        if target == self.id or target not in self.config.voters:
            return None
        if self._transferee == target:
            return None
        self._transferee = target
        # Count the abort timeout from now.
        self._election_elapsed = 0
        pr = self._progress[target]
        if pr.match == self.last_index:
            self._send_timeout_now(target)
        else:
            self._send_append(target, send_if_empty=True)
        return None

    def campaign(self) -> None:
        """Start an election now (with pre-vote if enabled), as if the election timeout
        elapsed; nothing happens on a leader or on a node that may not campaign."""
        if self.role != Role.LEADER and self.promotable():
            self._campaign(transfer=False)

    def compact(self, snapshot: Snapshot) -> None:
        """The application took (and durably stored) ``snapshot`` at an applied index: drop the
        log up to it and keep it to send to followers that fall behind."""
        meta = snapshot.meta
        if meta.index <= self._snap_index:
            return
        if meta.index > self._applied:
            raise ValueError(f"snapshot index {meta.index} is past applied {self._applied}")
        if self.term_at(meta.index) != meta.term:
            raise ValueError(f"snapshot term {meta.term} does not match the log at {meta.index}")
        del self._log[: meta.index - self._snap_index]
        self._snap_index = meta.index
        self._snap_term = meta.term
        self._snapshot = snapshot
        # What the durable snapshot holds is durable, whatever the log's writes said.
        self._persisted = max(self._persisted, meta.index)

    def step(self, m: Message) -> None:
        """Handle a message from a peer."""
        if m.dst != self.id:
            return
        if m.term > self.term:
            if isinstance(m, RequestVote):
                in_lease = (
                    self.options.check_quorum
                    and self.leader_id is not None
                    and self._election_elapsed < self.options.election_tick
                )
                if in_lease and not m.transfer:
                    # We heard from a leader recently: a disruptive candidate must not depose it.
                    return
                if not m.pre_vote:
                    self._become_follower(m.term, None)
            elif isinstance(m, RequestVoteResponse) and m.pre_vote and m.granted:
                # Granted pre-votes carry the term we would campaign in: not a newer term.
                pass
            elif isinstance(m, AppendEntries | Heartbeat | InstallSnapshot):
                self._become_follower(m.term, m.src)
            else:
                self._become_follower(m.term, None)
        elif m.term < self.term:
            # Figure 2: reply false with our term. A leader from an older term (perhaps we
            # advanced our term alone in a partition) then steps down and the group moves on.
            if isinstance(m, AppendEntries | Heartbeat | InstallSnapshot):
                self._send(AppendEntriesResponse(self.term, self.id, m.src, False, 0))
            elif isinstance(m, RequestVote):
                self._send(RequestVoteResponse(self.term, self.id, m.src, False, m.pre_vote))
            elif isinstance(m, ReadIndexRequest):
                # A read forwarded to a leader that is no more: refuse, so it learns our term.
                self._send(ReadIndexResponse(self.term, self.id, m.src, m.ctx, 0, False))
            return

        if isinstance(m, RequestVote):
            self._handle_vote_request(m)
        elif isinstance(m, RequestVoteResponse):
            self._handle_vote_response(m)
        elif isinstance(m, AppendEntries | Heartbeat | InstallSnapshot):
            if self.role == Role.LEADER:
                # Another leader in our term cannot exist (election safety); ignore it.
                return
            self._become_follower_of(m.src)
            if isinstance(m, AppendEntries):
                self._handle_append(m)
            elif isinstance(m, Heartbeat):
                self._handle_heartbeat(m)
            else:
                self._handle_snapshot_chunk(m)
        elif isinstance(m, AppendEntriesResponse):
            if self.role == Role.LEADER:
                self._handle_append_response(m)
        elif isinstance(m, HeartbeatResponse):
            if self.role == Role.LEADER:
                self._handle_heartbeat_response(m)
        elif isinstance(m, InstallSnapshotResponse):
            if self.role == Role.LEADER:
                self._handle_snapshot_response(m)
        elif isinstance(m, TimeoutNow):
            if self.role != Role.LEADER and self.promotable():
                self._campaign(transfer=True)
        elif isinstance(m, ReadIndexRequest):
            if self.role == Role.LEADER:
                self._leader_read(m.ctx, m.src)
            else:
                self._send(ReadIndexResponse(self.term, self.id, m.src, m.ctx, 0, False))
        elif isinstance(m, ReadIndexResponse):
            if m.ok:
                self._read_states.append(ReadState(m.ctx, m.index))

    # -- outputs ------------------------------------------------------------------------------

    def has_ready(self) -> bool:
        """Whether :meth:`ready` would return updates."""
        return bool(
            self._msgs
            or self._appends_pending
            or self._read_states
            or self._pending_restore is not None
            or self.last_index > self._persisted
            or self.commit_index > self._applied
            or self._persist_hard_state() != self._prev_hard_state
        )

    def _persist_hard_state(self) -> HardState:
        vote = None if self._bug == "forget-vote" else self.vote
        return HardState(self.term, vote, self.commit_index)

    def ready(self) -> Ready:
        """Everything to persist, send and apply now (call :meth:`advance` when done)."""
        self._flush_appends()
        hs = self._persist_hard_state()
        rd = Ready(
            hard_state=hs if hs != self._prev_hard_state else None,
            entries=self.entries_from(self._persisted + 1, self.last_index),
            snapshot=self._pending_restore,
            messages=self._msgs,
            committed=self.entries_from(self._applied + 1, self.commit_index),
            read_states=self._read_states,
        )
        self._msgs = []
        self._read_states = []
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver persisted, sent and applied ``rd``."""
        if rd.hard_state is not None:
            self._prev_hard_state = rd.hard_state
        if rd.snapshot is not None and rd.snapshot is self._pending_restore:
            self._pending_restore = None
        # If the log was truncated since, the stored entries still match ours up to the last
        # one whose term did not change (log matching): that prefix is durable, and the next
        # Ready need not write it again.
        for e in reversed(rd.entries):
            if self.term_at(e.index) == e.term:
                self._persisted = max(self._persisted, e.index)
                break
        for e in rd.committed:
            if e.index <= self._applied:
                continue
            self._applied = e.index
            if e.kind == EntryKind.CONFIG:
                self._apply_config(Configuration.decode(e.data))
        if self.role == Role.LEADER:
            pr = self._progress.get(self.id)
            if pr is not None and self._persisted > pr.match:
                pr.match = self._persisted
                pr.next = pr.match + 1
                if self._maybe_commit():
                    self._appends_pending = True

    # -- roles --------------------------------------------------------------------------------

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
        self.leader_id = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = self._rng.randrange(
            self.options.election_tick, 2 * self.options.election_tick
        )
        self._votes = {}
        self._transferee = None
        self._reads.clear()
        self._reads_waiting_commit.clear()

    def _follower_role(self) -> Role:
        if self.id not in self.config.voters and self.id in self.config.learners:
            return Role.LEARNER
        return Role.FOLLOWER

    def _become_follower(self, term: int, leader: str | None) -> None:
        self._reset(term)
        self.role = self._follower_role()
        self.leader_id = leader
        self._progress = {}

    def _become_follower_of(self, leader: str) -> None:
        # A message of the current term from its leader (a candidate of this term lost).
        if self.role in (Role.CANDIDATE, Role.PRE_CANDIDATE):
            self._become_follower(self.term, leader)
        self.leader_id = leader
        self._election_elapsed = 0

    def _campaign(self, transfer: bool) -> None:
        if not self.options.pre_vote or transfer:
            self._campaign_for_real(transfer)
            return
        # Pre-vote: ask whether we could win before disturbing anyone with a new term.
        self._reset(self.term)
        self.role = Role.PRE_CANDIDATE
        self._votes = {self.id: True}
        if self._tally() == "won":
            self._campaign_for_real(False)
            return
        for nid in sorted(self.config.voters):
            if nid != self.id:
                self._send(
                    RequestVote(self.term + 1, self.id, nid, self.last_index, self.last_term, True)
                )

    def _tally(self) -> str:
        granted = sum(1 for n, g in self._votes.items() if g and n in self.config.voters)
        rejected = sum(1 for n, g in self._votes.items() if not g and n in self.config.voters)
        if granted >= self._quorum():
            return "won"
        if rejected >= self._quorum():
            return "lost"
        return "pending"

    def _campaign_for_real(self, transfer: bool) -> None:
        self._reset(self.term + 1)
        self.role = Role.CANDIDATE
        self.vote = self.id
        self._votes = {self.id: True}
        if self._tally() == "won":
            self._become_leader()
            return
        for nid in sorted(self.config.voters):
            if nid != self.id:
                self._send(
                    RequestVote(
                        self.term, self.id, nid, self.last_index, self.last_term, False, transfer
                    )
                )

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader_id = self.id
        self._led = True
        self._read_seq = 0
        self._progress = {}
        nxt = self.last_index + 1
        for nid in self.config.members() | {self.id}:
            self._progress[nid] = _Progress(nxt)
        me = self._progress[self.id]
        me.match = self._persisted
        me.recent_active = True
        # The no-op commits the previous terms' entries and lets reads start (Raft section 8).
        self._append(EntryKind.NOOP, b"")
        self._flush_appends()
        # Every configuration change in the log must be applied, and an entry of this term
        # committed, before another change is proposed (the known single-server-change fix).
        self._pending_conf_index = self.last_index

    def _apply_config(self, config: Configuration) -> None:
        self.config = config
        if self.role == Role.LEADER:
            if self.id not in config.voters:
                # Removed (or demoted): the rest of the group elects a leader among itself.
                self._become_follower(self.term, None)
                return
            for nid in config.members():
                if nid not in self._progress:
                    pr = _Progress(self.last_index + 1)
                    pr.recent_active = True
                    self._progress[nid] = pr
            for nid in list(self._progress):
                if nid not in config.members() and nid != self.id:
                    del self._progress[nid]
            if self._transferee is not None and self._transferee not in config.voters:
                self._transferee = None
            # A smaller quorum may commit more now.
            if self._maybe_commit():
                self._appends_pending = True
            self._release_reads()
        elif self.role in (Role.FOLLOWER, Role.LEARNER):
            self.role = self._follower_role()
        elif self.id not in config.voters:
            self._become_follower(self.term, None)

    # -- votes --------------------------------------------------------------------------------

    def _handle_vote_request(self, m: RequestVote) -> None:
        can_vote = (
            self.vote == m.src
            or (self.vote is None and self.leader_id is None)
            or (m.pre_vote and m.term > self.term)
        )
        up_to_date = m.last_term > self.last_term or (
            m.last_term == self.last_term and m.last_index >= self.last_index
        )
        if can_vote and up_to_date:
            if m.pre_vote:
                self._send(RequestVoteResponse(m.term, self.id, m.src, True, True))
            else:
                self._election_elapsed = 0
                self.vote = m.src
                self._send(RequestVoteResponse(self.term, self.id, m.src, True, False))
        else:
            self._send(RequestVoteResponse(self.term, self.id, m.src, False, m.pre_vote))

    def _handle_vote_response(self, m: RequestVoteResponse) -> None:
        if m.pre_vote:
            if self.role != Role.PRE_CANDIDATE:
                return
        elif self.role != Role.CANDIDATE:
            return
        self._votes.setdefault(m.src, m.granted)
        result = self._tally()
        if result == "won":
            if m.pre_vote:
                self._campaign_for_real(False)
            else:
                self._become_leader()
        elif result == "lost":
            self._become_follower(self.term, None)

    # -- replication: follower side -----------------------------------------------------------

    def _handle_append(self, m: AppendEntries) -> None:
        if m.prev_index < self.commit_index:
            self._send(AppendEntriesResponse(self.term, self.id, m.src, True, self.commit_index))
            return
        if self.term_at(m.prev_index) != m.prev_term:
            hint = self._find_conflict_by_term(min(m.prev_index, self.last_index), m.prev_term)
            self._send(
                AppendEntriesResponse(
                    self.term,
                    self.id,
                    m.src,
                    False,
                    m.prev_index,
                    hint,
                    self.term_at(hint) or 0,
                )
            )
            return
        last_new = m.prev_index + len(m.entries)
        for i, e in enumerate(m.entries):
            existing = self.term_at(e.index)
            if existing == e.term:
                continue
            if existing is not None:
                # A real conflict: an entry the leader does not have, so never committed.
                if e.index <= self.commit_index:
                    raise AssertionError(
                        f"{self.id}: conflict at committed index {e.index} (commit "
                        f"{self.commit_index})"
                    )
                if self._bug == "no-truncate":
                    # Planted bug: keep our conflicting entries, append only past our end.
                    self._log.extend(x for x in m.entries[i:] if x.index > self.last_index)
                    break
                del self._log[e.index - self._snap_index - 1 :]
                self._persisted = min(self._persisted, e.index - 1)
            self._log.extend(m.entries[i:])
            break
        self._commit_to(min(m.commit, last_new))
        self._acknowledge(m.src, last_new)

    def _acknowledge(self, leader: str, index: int) -> None:
        """Answer an append with success up to ``index``. Acks are cumulative: one still
        waiting in the outbox for the same leader and term, right before this one, is
        replaced rather than followed (appends that arrive while a batch is written are then
        answered once, not each)."""
        last = self._msgs[-1] if self._msgs else None
        if (
            type(last) is AppendEntriesResponse
            and last.success
            and last.dst == leader
            and last.term == self.term
            and last.index <= index
        ):
            self._msgs[-1] = AppendEntriesResponse(self.term, self.id, leader, True, index)
            return
        self._send(AppendEntriesResponse(self.term, self.id, leader, True, index))

    def _find_conflict_by_term(self, index: int, term: int) -> int:
        """The largest index <= ``index`` whose term is <= ``term`` (or the compaction point)."""
        while index > self._snap_index:
            t = self.term_at(index)
            if t is None or t <= term:
                break
            index -= 1
        return index

    def _commit_to(self, index: int) -> None:
        if index > self.commit_index:
            self.commit_index = index

    def _handle_heartbeat(self, m: Heartbeat) -> None:
        self._commit_to(min(m.commit, self.last_index))
        self._send(HeartbeatResponse(self.term, self.id, m.src, m.ctx))

    def _handle_snapshot_chunk(self, m: InstallSnapshot) -> None:
        meta = m.meta
        if meta.index <= self.commit_index:
            # Already have it all: say where we are so the leader moves on.
            self._send(AppendEntriesResponse(self.term, self.id, m.src, True, self.commit_index))
            return
        inc = self._incoming
        if m.offset == 0:
            inc = self._incoming = (meta, bytearray())
        if inc is None or inc[0] != meta or len(inc[1]) != m.offset:
            # A lost chunk or a restart: tell the leader where to resume.
            have = len(inc[1]) if inc is not None and inc[0] == meta else 0
            if inc is None or inc[0] != meta:
                self._incoming = None
            self._send(InstallSnapshotResponse(self.term, self.id, m.src, meta.index, have))
            return
        inc[1].extend(m.data)
        if not m.done:
            self._send(InstallSnapshotResponse(self.term, self.id, m.src, meta.index, len(inc[1])))
            return
        self._incoming = None
        snap = Snapshot(meta, bytes(inc[1]))
        self._restore(snap)
        self._send(AppendEntriesResponse(self.term, self.id, m.src, True, self.commit_index))

    def _restore(self, snap: Snapshot) -> None:
        meta = snap.meta
        if self.term_at(meta.index) == meta.term:
            # Our log already holds the snapshot's last entry: just commit up to it.
            self._commit_to(meta.index)
            return
        self._log = []
        self._snap_index = meta.index
        self._snap_term = meta.term
        self._snapshot = snap
        self.commit_index = meta.index
        self._applied = meta.index
        self._persisted = meta.index
        self._pending_restore = snap
        self.config = meta.config
        if self.role in (Role.FOLLOWER, Role.LEARNER):
            self.role = self._follower_role()

    # -- replication: leader side -------------------------------------------------------------

    def _append(self, kind: EntryKind, data: bytes) -> int:
        index = self.last_index + 1
        self._log.append(Entry(self.term, index, kind, data))
        # Sent at the next ready(): proposals made in between travel together (batching).
        self._appends_pending = True
        return index

    def _flush_appends(self) -> None:
        if self._appends_pending:
            self._appends_pending = False
            if self.role == Role.LEADER:
                self._broadcast_append()

    def _send(self, m: Message) -> None:
        self._msgs.append(m)

    def _peers(self) -> list[str]:
        return sorted(n for n in self._progress if n != self.id)

    def _broadcast_append(self) -> None:
        # Sent even without new entries when it carries a commit index the follower has not
        # been sent yet (or probes one whose log is in doubt).
        for nid in self._peers():
            pr = self._progress[nid]
            self._send_append(
                nid,
                send_if_empty=pr.state != _ProgressState.REPLICATE or pr.commit_sent < self.commit_index,
            )

    def _broadcast_heartbeat(self) -> None:
        ctx = str(self._read_seq).encode() if self._reads else b""
        for nid in self._peers():
            pr = self._progress[nid]
            if pr.state == _ProgressState.SNAPSHOT:
                self._send_snapshot_chunk(nid)
            self._send(Heartbeat(self.term, self.id, nid, min(pr.match, self.commit_index), ctx))

    def _send_append(self, nid: str, send_if_empty: bool) -> None:
        pr = self._progress[nid]
        if pr.paused(self.options.max_inflight):
            return
        prev = pr.next - 1
        prev_term = self.term_at(prev)
        if prev_term is None:
            if prev < self._snap_index:
                self._start_snapshot(nid)
            return
        entries = self._batch(pr.next)
        if not entries and not send_if_empty:
            return
        self._send(
            AppendEntries(
                self.term, self.id, nid, prev, prev_term, tuple(entries), self.commit_index
            )
        )
        pr.commit_sent = self.commit_index
        if pr.state != _ProgressState.REPLICATE:
            pr.probe_sent = True
            return
        if entries:
            pr.next = entries[-1].index + 1
            pr.inflight.append(entries[-1].index)
        # Pipelining: keep sending while there is more and the window allows.
        while pr.next <= self.last_index and not pr.paused(self.options.max_inflight):
            entries = self._batch(pr.next)
            prev = pr.next - 1
            self._send(
                AppendEntries(
                    self.term,
                    self.id,
                    nid,
                    prev,
                    self.term_at(prev) or 0,
                    tuple(entries),
                    self.commit_index,
                )
            )
            pr.next = entries[-1].index + 1
            pr.inflight.append(entries[-1].index)

    def _send_timeout_now(self, nid: str) -> None:
        # A commit index the target has not been sent yet (its broadcast waits for the next
        # Ready) goes first: the target must know of a committed, unapplied configuration
        # change (its own removal, say) when it decides whether it may campaign.
        if self._progress[nid].commit_sent < self.commit_index:
            self._send_append(nid, send_if_empty=True)
        self._send(TimeoutNow(self.term, self.id, nid))

    def _batch(self, lo: int) -> list[Entry]:
        hi = min(self.last_index, lo + self.options.max_entries_per_msg - 1)
        entries = self.entries_from(lo, hi)
        budget = self.options.max_bytes_per_msg
        for i, e in enumerate(entries):
            budget -= len(e.data) + 32
            if budget < 0 and i > 0:
                return entries[:i]
        return entries

    def _start_snapshot(self, nid: str) -> None:
        if self._snapshot is None:
            # Only the meta is known (restarted without the data): wait for the next compact.
            return
        pr = self._progress[nid]
        pr.state = _ProgressState.SNAPSHOT
        pr.pending_snapshot = self._snapshot.meta.index
        pr.snap_offset = 0
        pr.inflight.clear()
        self._send_snapshot_chunk(nid)

    def _send_snapshot_chunk(self, nid: str) -> None:
        snap = self._snapshot
        if snap is None:
            return
        pr = self._progress[nid]
        if pr.pending_snapshot != snap.meta.index:
            # Compacted again since: start over with the newer snapshot.
            pr.pending_snapshot = snap.meta.index
            pr.snap_offset = 0
        off = pr.snap_offset
        chunk = snap.data[off : off + self.options.snapshot_chunk_bytes]
        done = off + len(chunk) >= len(snap.data)
        self._send(InstallSnapshot(self.term, self.id, nid, snap.meta, off, chunk, done))

    def _handle_snapshot_response(self, m: InstallSnapshotResponse) -> None:
        pr = self._progress.get(m.src)
        if pr is None:
            return
        pr.recent_active = True
        if pr.state != _ProgressState.SNAPSHOT or m.snap_index != pr.pending_snapshot:
            return
        if m.next_offset == pr.snap_offset and m.next_offset != 0:
            return  # a duplicate answer
        pr.snap_offset = m.next_offset
        self._send_snapshot_chunk(m.src)

    def _handle_append_response(self, m: AppendEntriesResponse) -> None:
        pr = self._progress.get(m.src)
        if pr is None:
            return
        pr.recent_active = True
        if m.success:
            if m.index > pr.match:
                pr.match = m.index
                if pr.next <= m.index:
                    pr.next = m.index + 1
                while pr.inflight and pr.inflight[0] <= m.index:
                    pr.inflight.popleft()
                if pr.state == _ProgressState.PROBE:
                    pr.become_replicate()
                elif pr.state == _ProgressState.SNAPSHOT and pr.match >= self._snap_index:
                    pr.become_probe()
                    pr.become_replicate()
                if self._maybe_commit():
                    # Sent at the next ready(), with whatever else is due by then: the acks
                    # of one reactor turn and the proposals made in it share one append.
                    self._appends_pending = True
                elif pr.state != _ProgressState.SNAPSHOT:
                    self._send_append(m.src, send_if_empty=False)
            elif pr.state == _ProgressState.PROBE:
                # A stale success: the probe may still be unanswered.
                pr.probe_sent = False
            if m.src == self._transferee and pr.match == self.last_index:
                self._send_timeout_now(m.src)
            return
        # Rejected: go back to probing below the rejected index.
        if pr.state == _ProgressState.REPLICATE:
            if m.index <= pr.match:
                return  # stale
            pr.become_probe()
        elif pr.state == _ProgressState.PROBE:
            if m.index != pr.next - 1 or m.index <= pr.match:
                # Stale; or a follower denying what it acknowledged (it lost its disk):
                # retry at the next heartbeat rather than at once.
                return
        else:
            return
        probe = m.hint_index
        if m.hint_term > 0:
            probe = self._find_conflict_by_term(min(m.hint_index, self.last_index), m.hint_term)
        pr.next = max(min(m.index, probe + 1), pr.match + 1)
        pr.probe_sent = False
        self._send_append(m.src, send_if_empty=True)

    def _handle_heartbeat_response(self, m: HeartbeatResponse) -> None:
        pr = self._progress.get(m.src)
        if pr is None:
            return
        pr.recent_active = True
        if pr.state == _ProgressState.PROBE:
            pr.probe_sent = False
        elif pr.state == _ProgressState.REPLICATE and pr.paused(self.options.max_inflight):
            pr.inflight.popleft()
        if pr.state != _ProgressState.SNAPSHOT and (
            pr.match < self.last_index or pr.state == _ProgressState.PROBE
        ):
            self._send_append(m.src, send_if_empty=True)
        if m.ctx:
            try:
                seq = int(m.ctx)
            except ValueError:
                return
            if seq > pr.read_ack:
                pr.read_ack = seq
                self._release_reads()

    def _maybe_commit(self) -> bool:
        matches = sorted(
            (self._progress[n].match if n in self._progress else 0 for n in self.config.voters),
            reverse=True,
        )
        if not matches:
            return False
        index = matches[self._quorum() - 1]
        if index <= self.commit_index:
            return False
        if self.term_at(index) != self.term and self._bug != "commit-old-term":
            # Figure 8: entries of earlier terms commit only through one of the leader's own.
            return False
        self.commit_index = index
        if self.term_at(index) == self.term and self._reads_waiting_commit:
            waiting, self._reads_waiting_commit = self._reads_waiting_commit, []
            for r in waiting:
                self._register_read(r.ctx, r.requester)
        return True

    # -- reads --------------------------------------------------------------------------------

    def _committed_own_term(self) -> bool:
        return self.term_at(self.commit_index) == self.term

    def _leader_read(self, ctx: bytes, requester: str | None) -> None:
        if self._bug == "stale-read":
            # Planted bug: answer from local state, with no check that we are still leader and
            # no wait for our no-op.
            self._read_done(ctx, requester, self.commit_index)
            return
        if not self._committed_own_term():
            # Our commit index may lag the previous leader's until our no-op commits.
            self._reads_waiting_commit.append(_PendingRead(0, 0, ctx, requester))
            return
        self._register_read(ctx, requester)

    def _register_read(self, ctx: bytes, requester: str | None) -> None:
        if self.options.lease_read or self.config.voters == {self.id}:
            self._read_done(ctx, requester, self.commit_index)
            return
        self._read_seq += 1
        self._reads.append(_PendingRead(self._read_seq, self.commit_index, ctx, requester))
        self._broadcast_heartbeat()

    def _release_reads(self) -> None:
        if not self._reads:
            return
        acks = sorted(
            (
                self._read_seq
                if n == self.id
                else (self._progress[n].read_ack if n in self._progress else 0)
                for n in self.config.voters
            ),
            reverse=True,
        )
        confirmed = acks[self._quorum() - 1]
        while self._reads and self._reads[0].seq <= confirmed:
            r = self._reads.popleft()
            self._read_done(r.ctx, r.requester, r.index)

    def _read_done(self, ctx: bytes, requester: str | None, index: int) -> None:
        if requester is None or requester == self.id:
            self._read_states.append(ReadState(ctx, index))
        else:
            self._send(ReadIndexResponse(self.term, self.id, requester, ctx, index, True))
