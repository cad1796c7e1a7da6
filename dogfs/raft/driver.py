# -*- test-case-name: tests.test_raft_driver -*-
"""The Twisted driver of one Raft member: the thin I/O layer around the pure core.

Owns the Ready loop (persist in a worker thread, then send, then apply, then advance), the
tick timer, the state machine callbacks, and the Deferred-returning API that daemons use:
``propose``, ``read_index``, leadership transfer, membership changes and introspection.
May import ``dogfs.raft`` only.

One Ready is in flight at a time. While its batch is being made durable, new proposals and
messages keep flowing into the core and form the next batch: this is the group commit, one
durable write (one LMDB transaction, one sync) per Ready however many entries it holds.
Messages are batched the same way: the core sends a leader's new commit index with the
next Ready's appends (an empty one only to a follower not yet told it), and a follower's
answers to the appends of one batch as one cumulative ack.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from dogfs.raft.core import (
    ChangePending,
    ConfigChange,
    ConfigChangeKind,
    Configuration,
    Entry,
    EntryKind,
    HardState,
    Message,
    NotLeader,
    ProposalRejected,
    RaftNode,
    RaftOptions,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
)
from dogfs.raft.storage import IRaftStorage
from dogfs.raft.transport import IRaftTransport
from dogfs.raft.worker import SerialWorker

__all__ = [
    "IRaftStateMachine",
    "LeadershipLostError",
    "NotLeaderError",
    "ProposalDroppedError",
    "RaftDriver",
    "RaftError",
    "RaftOverloadedError",
    "RaftStoppedError",
    "RaftTimeoutError",
]

_log = Logger()
T = TypeVar("T")
Executor = Callable[[Callable[[], Any]], "Deferred[Any]"]


class CannotApply(Exception):
    """Raised by a state machine for a committed entry it must not apply (one of a later
    release, say): the member halts, as for a failing disk, rather than diverge; its message
    says why in a sentence."""


class RaftError(Exception):
    """Base of the errors the driver's Deferreds fail with."""


class NotLeaderError(RaftError):
    """This member is not the leader; ``leader_hint`` names the one it knows of, if any."""

    def __init__(self, leader_hint: str | None) -> None:
        super().__init__(
            f"not the Raft leader (leader: {leader_hint})" if leader_hint else "no Raft leader known"
        )
        self.leader_hint = leader_hint


class LeadershipLostError(RaftError):
    """Leadership was lost before the proposal was applied: its outcome is unknown."""


class ProposalDroppedError(RaftError):
    """Another entry was committed at the proposal's index: it will never be applied."""


class RaftTimeoutError(RaftError):
    """The operation did not complete in time: its outcome is unknown."""


class RaftOverloadedError(RaftError):
    """Too many proposals are waiting already: back off and retry."""


class RaftStoppedError(RaftError):
    """The driver stopped (or its storage failed) before the operation completed."""


class IRaftStateMachine(Interface):
    """The replicated state machine a driver applies committed entries to.

    Every method runs on the reactor thread, in log order, and must be deterministic.
    """

    def apply(entry: Entry) -> object:
        """Apply a committed NORMAL entry and return the proposer's result.

        NOOP and CONFIG entries are not passed here (the core applies configurations). An
        exception fails the proposer's Deferred with it and the driver goes on: it must be
        deterministic, like any other result, or replicas diverge.
        """

    # Optional: ``apply_batch(entries: Sequence[Entry]) -> Sequence[object]``, the results of
    # applying several NORMAL entries in order, as ``apply`` would one by one. The driver uses
    # it when present so a batch of committed entries costs one storage transaction.
    #
    # Optional: ``snapshot_later() -> Callable[[], bytes]``, called on the reactor thread, fixes
    # the state as of the last applied entry and returns a function that serialises it and may
    # run on another thread while applying goes on. Without it, ``snapshot`` runs on the
    # reactor thread, which stalls the member for as long as the state takes to serialise.

    def snapshot() -> bytes:  # type: ignore[misc,empty-body]
        """Serialise the state as of the last applied entry."""

    def restore(snapshot: Snapshot) -> None:
        """Replace the state by ``snapshot.data`` (state as of ``snapshot.meta.index``)."""

    def applied_index() -> int:  # type: ignore[misc,empty-body]
        """The last index whose effect the state machine has kept durably (0 if in memory)."""


class RaftDriver(Service):
    """Runs one ``RaftNode`` on a reactor: storage, transport, timer and state machine.

    ``clock`` drives ticks (every ``tick_interval`` seconds) and timeouts. Storage writes run on
    the driver's own worker thread through ``reactor`` (an ``IReactorFromThreads``), unless an
    ``executor`` is given (tests pass one that runs the write synchronously); snapshots are
    serialised on another worker thread, unless ``snapshot_executor`` (or ``executor``) is
    given.

    A snapshot is taken once ``snapshot_every`` entries have been applied since the last one
    and, with ``snapshot_growth``, once the entries applied since then hold at least that
    many times the last snapshot's bytes (the Raft thesis's rule, section 5.1.1): each
    snapshot writes the whole state, so a fixed entry count would make a large namespace pay
    for a full dump every few thousand small commands. The rule keeps a snapshot's cost per
    logged byte bounded whatever the state's size, and the log at most that many times the
    state's size.
    """

    def __init__(
        self,
        node_id: str,
        *,
        storage: IRaftStorage,
        transport: IRaftTransport,
        state_machine: IRaftStateMachine,
        clock: IReactorTime,
        bootstrap: Configuration,
        options: RaftOptions | None = None,
        tick_interval: float = 0.1,
        rng: random.Random | None = None,
        reactor: IReactorFromThreads | None = None,
        executor: Executor | None = None,
        snapshot_executor: Executor | None = None,
        operation_timeout: float = 10.0,
        snapshot_every: int | None = 10_000,
        snapshot_growth: float | None = None,
        max_pending: int = 10_000,
        on_failure: Callable[[Failure], None] | None = None,
    ) -> None:
        if executor is None and reactor is None:
            raise ValueError("RaftDriver needs a reactor for its worker threads, or an executor")
        # Told when this member halts (storage or state machine failed): a daemon exits so
        # that clients and chunk servers move to a member that still works.
        self.on_failure = on_failure
        self.node_id = node_id
        # Held as Any: mypy has no zope plugin here, so interface-typed calls would not check.
        self._storage: Any = storage
        self._transport: Any = transport
        self._sm: Any = state_machine
        self._clock: Any = clock
        self._bootstrap = bootstrap
        self._options = options or RaftOptions()
        self._tick_interval = tick_interval
        self._rng = rng or random.Random()
        self._reactor: Any = reactor
        self._executor_arg = executor
        self._executor: Executor | None = executor
        self._pool: SerialWorker | None = None
        # Serialising snapshots runs on a thread of its own, so the log's writes never queue
        # behind it (tests give an executor, which runs both synchronously).
        self._snapshot_executor_arg = snapshot_executor or executor
        self._snapshot_executor: Executor | None = self._snapshot_executor_arg
        self._snapshot_pool: SerialWorker | None = None
        self._snapshot_job: Deferred[Any] | None = None
        self._timeout = operation_timeout
        self._snapshot_every = snapshot_every
        self._snapshot_growth = snapshot_growth
        # Bytes of the entries applied so far, as of the last snapshot, and that snapshot's
        # size: what snapshot_growth compares.
        self._applied_bytes = 0
        self._bytes_at_snapshot = 0
        self._snapshot_size = 0
        self._max_pending = max_pending
        self._node: RaftNode | None = None
        self._ticker: LoopingCall | None = None
        self._kick_call: Any = None
        self._busy = False
        self._failure: Failure | None = None
        self._applied = 0
        self._snapshot_index = 0
        # (term, vote) as last made durable: a leader sends early only when these are on disk.
        self._durable_vote: tuple[int, str | None] = (0, None)
        # A commit-only hard state not written yet (see _process).
        self._unsaved_commit: HardState | None = None
        self._was_leader = False
        self._leader_term = 0
        # (role, term, leader) as last logged: every change of role or leader is logged once.
        self._seen_role: tuple[Role, int, str | None] | None = None
        # index -> (term it was proposed in, Deferred, deadline), oldest first. One timer,
        # armed for the oldest deadline, expires them: a timer per proposal cost the leader a
        # heap insertion and a cancellation for every command.
        self._proposals: dict[int, tuple[int, Deferred[Any], float]] = {}
        self._proposal_timer: IDelayedCall | None = None
        self._reads: dict[bytes, tuple[Deferred[None], IDelayedCall]] = {}
        self._reads_waiting: list[tuple[int, Deferred[None], IDelayedCall]] = []
        self._read_counter = 0
        # Set anew at every start: a read's context names this run of the member, so an
        # answer to a read of an earlier run (delayed across a restart) matches none of now.
        self._read_epoch = 0
        self._transfers: list[tuple[str, Deferred[None], IDelayedCall]] = []
        # Membership changes asked for while a batch was being written (see _config_change).
        self._changes_waiting: list[
            tuple[Callable[[RaftNode], int | NotLeader], Deferred[Any], IDelayedCall]
        ] = []
        self._loop_done: Deferred[None] | None = None
        #: Number of Ready batches persisted (each is one durable storage write).
        self.batches = 0

    # --- service ----------------------------------------------------------------------

    def startService(self) -> None:
        """Load storage, restore the state machine, build the node, start ticking."""
        super().startService()
        if self._executor_arg is None:
            assert self._reactor is not None
            self._pool = SerialWorker(self._reactor, f"raft-{self.node_id}")
            self._pool.start()
            self._executor = self._pool.run
        if self._snapshot_executor_arg is None:
            assert self._reactor is not None
            self._snapshot_pool = SerialWorker(self._reactor, f"raft-snap-{self.node_id}")
            self._snapshot_pool.start()
            self._snapshot_executor = self._snapshot_pool.run
        try:
            self._restore()
        except BaseException:
            # Corrupt or unreadable storage: refuse to run, leaving nothing behind.
            self.running = False
            self._stop_pools()
            raise
        self._failure = None
        self._busy = False
        self._was_leader = False
        self._read_epoch = self._rng.getrandbits(64)
        self._transport.start(self._receive)
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = self._clock
        self._ticker.start(self._tick_interval, now=False).addErrback(
            lambda f: _log.failure("Raft {id}: ticker failed", f, id=self.node_id)
        )
        self._kick()

    def _restore(self) -> None:
        """Load storage, bring the state machine up to its snapshot, build the core."""
        loaded = self._storage.load()
        # Hand the core the whole snapshot so it can send it to followers that fall behind.
        snapshot = self._storage.snapshot_data() if loaded.snapshot is not None else None
        applied = self._sm.applied_index()
        if snapshot is not None:
            self._snapshot_index = snapshot.meta.index
            self._snapshot_size = len(snapshot.data)
            self._bytes_at_snapshot = self._applied_bytes
            if snapshot.meta.index > applied:
                self._sm.restore(snapshot)
                applied = snapshot.meta.index
        self._applied = applied
        self._durable_vote = (loaded.hard_state.term, loaded.hard_state.vote)
        self._unsaved_commit = None
        self._node = RaftNode(
            self.node_id,
            self._options,
            hard_state=loaded.hard_state,
            snapshot=snapshot if snapshot is not None else loaded.snapshot,
            entries=loaded.entries,
            config=loaded.config if loaded.config is not None else self._bootstrap,
            applied=applied,
            rng=self._rng,
        )

    def stopService(self) -> Deferred[None]:
        """Stop ticking and receiving, fail pending operations, wait for the write in flight."""
        super().stopService()
        self._transport.stop()
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None
        if self._kick_call is not None and self._kick_call.active():
            self._kick_call.cancel()
        self._kick_call = None
        self._fail_all(RaftStoppedError(f"Raft member {self.node_id} stopped"))
        loop: Deferred[None] = Deferred()
        if self._busy:
            self._loop_done = loop
        else:
            loop.callback(None)
        waits: list[Deferred[Any]] = [loop]
        if self._snapshot_job is not None:
            # The serialiser reads the state machine's storage: let it finish before anything
            # is closed.
            snapshot_done: Deferred[None] = Deferred()

            def settled(result: object) -> object:
                snapshot_done.callback(None)
                return result

            self._snapshot_job.addBoth(settled)
            waits.append(snapshot_done)
        done = defer.gatherResults(waits, consumeErrors=True)

        def _release(_: object) -> None:
            if self._unsaved_commit is not None and self._failure is None:
                # Keep the commit index we learnt, so a restart re-applies less.
                self._storage.save(self._unsaved_commit, [], None)
                self._unsaved_commit = None
            self._stop_pools()
            close = getattr(self._storage, "close", None)
            if close is not None:
                close()

        return done.addCallback(_release)

    def _stop_pools(self) -> None:
        for pool in (self._pool, self._snapshot_pool):
            if pool is not None:
                pool.stop()
        self._pool = self._snapshot_pool = None
        self._executor = self._executor_arg
        self._snapshot_executor = self._snapshot_executor_arg

    # --- introspection ----------------------------------------------------------------

    @property
    def node(self) -> RaftNode:
        """The core (only while running)."""
        if self._node is None:
            raise RaftStoppedError(f"Raft member {self.node_id} is not running")
        return self._node

    @property
    def role(self) -> str:
        """``leader``, ``follower``, ``candidate``, ``pre-candidate``, ``learner`` or ``stopped``."""
        if self._failure is not None:
            return "failed"
        if self._node is None or not self.running:
            return "stopped"
        return self._node.role.value

    @property
    def is_leader(self) -> bool:
        """True while this member leads."""
        return bool(
            self._node is not None
            and self.running
            and self._failure is None
            and self._node.role == Role.LEADER
        )

    @property
    def term(self) -> int:
        """The current term."""
        return 0 if self._node is None else self._node.term

    @property
    def commit_index(self) -> int:
        """The highest index known committed."""
        return 0 if self._node is None else self._node.commit_index

    @property
    def applied_index(self) -> int:
        """The highest index applied to the state machine."""
        return self._applied

    @property
    def leader_hint(self) -> str | None:
        """The member this one believes leads, if any."""
        return None if self._node is None else self._node.leader_id

    @property
    def config(self) -> Configuration | None:
        """The membership the core currently uses."""
        return None if self._node is None else self._node.config

    def status(self) -> dict[str, object]:
        """A JSON-ready summary for status pages and ``dogfs cluster status``."""
        cfg = self.config
        return {
            "id": self.node_id,
            "role": self.role,
            "term": self.term,
            "leader": self.leader_hint,
            "commit_index": self.commit_index,
            "applied_index": self.applied_index,
            "last_index": 0 if self._node is None else self._node.last_index,
            "snapshot_index": self._snapshot_index,
            "voters": sorted(cfg.voters) if cfg else [],
            "learners": sorted(cfg.learners) if cfg else [],
            "pending_proposals": len(self._proposals),
            "replicated": {} if self._node is None else self._node.replication(),
        }

    # --- public operations ------------------------------------------------------------

    def propose(self, data: bytes) -> Deferred[Any]:
        """Replicate ``data``; fires with ``state_machine.apply``'s result once applied here.

        Fails with ``NotLeaderError`` (carrying the leader hint) if this member cannot accept
        it, ``LeadershipLostError`` or ``RaftTimeoutError`` when the outcome is unknown, and
        ``ProposalDroppedError`` when it is known to have been lost.
        """
        return self._start_proposal(lambda node: node.propose(data))

    def add_learner(self, member: str) -> Deferred[Any]:
        """Add ``member`` as a non-voting learner; fires once the change is applied here."""
        return self._config_change(ConfigChange(ConfigChangeKind.ADD_LEARNER, member))

    def promote(self, member: str) -> Deferred[Any]:
        """Make learner ``member`` a voter; fires once the change is applied here."""
        return self._config_change(ConfigChange(ConfigChangeKind.ADD_VOTER, member))

    def remove(self, member: str) -> Deferred[Any]:
        """Remove ``member`` (voter or learner); fires once the change is applied here."""
        return self._config_change(ConfigChange(ConfigChangeKind.REMOVE, member))

    def _config_change(self, change: ConfigChange) -> Deferred[Any]:
        """Propose ``change``, waiting (up to the operation timeout) while another is pending.

        The core refuses a change while an earlier one is not applied, and a new leader until
        it has applied what it inherited. Both clear by themselves within a round trip, so the
        change waits and is tried again after each batch; a caller who saw the previous change
        applied, or who was sent here by a leader that just handed over, need not retry.
        Entries applied early in a batch (see _process) reach the core only when the batch is
        written: while one is, the change waits too.
        """

        def submit(node: RaftNode) -> int | NotLeader:
            return node.propose_config_change(change)

        d: Deferred[Any] = Deferred()
        timer = self._clock.callLater(self._timeout, self._expire_change, d)
        self._changes_waiting.append((submit, d, timer))
        if not self._busy:
            self._try_changes()
        return d

    def _try_changes(self) -> None:
        waiting, self._changes_waiting = self._changes_waiting, []
        for submit, d, timer in waiting:
            try:
                attempt = self._submit(submit)
            except ChangePending:
                self._changes_waiting.append((submit, d, timer))
                continue
            except ProposalRejected as e:
                attempt = defer.fail(e)
            _cancel(timer)
            attempt.chainDeferred(d)

    def _expire_change(self, d: Deferred[Any]) -> None:
        for item in self._changes_waiting:
            if item[1] is d:
                self._changes_waiting.remove(item)
                d.errback(RaftTimeoutError("a configuration change stayed pending past the timeout"))
                return

    def read_index(self) -> Deferred[None]:
        """Fires when a linearizable read may be served from the local state machine."""
        failed = self._check_running()
        if failed is not None:
            return failed
        self._read_counter += 1
        ctx = b"%s/%x/%d" % (self.node_id.encode(), self._read_epoch, self._read_counter)
        outcome = self.node.read_index(ctx)
        if isinstance(outcome, NotLeader):
            return defer.fail(NotLeaderError(outcome.leader_hint))
        d: Deferred[None] = Deferred()
        timer = self._clock.callLater(
            self._timeout, self._expire_read, ctx, d
        )
        self._reads[ctx] = (d, timer)
        self._kick()
        return d

    def transfer_leadership(self, to: str) -> Deferred[None]:
        """Hand leadership to ``to``; fires once this member sees ``to`` lead."""
        failed = self._check_running()
        if failed is not None:
            return failed
        outcome = self.node.transfer_leadership(to)
        if isinstance(outcome, NotLeader):
            return defer.fail(NotLeaderError(outcome.leader_hint))
        d: Deferred[None] = Deferred()
        record: list[tuple[str, Deferred[None], IDelayedCall]] = []

        def expire() -> None:
            if record and record[0] in self._transfers:
                self._transfers.remove(record[0])
                d.errback(RaftTimeoutError(f"leadership transfer to {to} timed out"))

        record.append((to, d, self._clock.callLater(self._timeout, expire)))
        self._transfers.append(record[0])
        self._kick()
        return d

    # --- internals: operations --------------------------------------------------------

    def _check_running(self) -> Deferred[Any] | None:
        if self._failure is not None:
            return defer.fail(RaftStoppedError(f"Raft member {self.node_id} failed: {self._failure.value}"))
        if self._node is None or not self.running:
            return defer.fail(RaftStoppedError(f"Raft member {self.node_id} is not running"))
        return None

    def _start_proposal(self, submit: Callable[[RaftNode], int | NotLeader]) -> Deferred[Any]:
        try:
            return self._submit(submit)
        except ProposalRejected as e:
            return defer.fail(e)

    def _submit(self, submit: Callable[[RaftNode], int | NotLeader]) -> Deferred[Any]:
        """``_start_proposal``, except that the core's ProposalRejected is raised."""
        failed = self._check_running()
        if failed is not None:
            return failed
        if len(self._proposals) >= self._max_pending:
            # A stalled disk or a slow quorum must not turn into unbounded memory.
            return defer.fail(RaftOverloadedError(f"{len(self._proposals)} proposals pending"))
        outcome = submit(self.node)
        if isinstance(outcome, NotLeader):
            return defer.fail(NotLeaderError(outcome.leader_hint))
        index = outcome
        d: Deferred[Any] = Deferred()
        self._proposals[index] = (self.node.term, d, self._clock.seconds() + self._timeout)
        if self._proposal_timer is None:
            self._proposal_timer = self._clock.callLater(self._timeout, self._expire_proposals)
        self._kick()
        return d

    def _expire_proposals(self) -> None:
        """Fail the proposals whose deadline has passed; arm the timer for the next one."""
        self._proposal_timer = None
        now = self._clock.seconds()
        while self._proposals:
            index = next(iter(self._proposals))
            _term, d, deadline = self._proposals[index]
            if deadline > now:
                if self._proposal_timer is None:
                    self._proposal_timer = self._clock.callLater(deadline - now, self._expire_proposals)
                return
            del self._proposals[index]
            d.errback(RaftTimeoutError(f"proposal at index {index} timed out; outcome unknown"))

    def _expire_read(self, ctx: bytes, d: Deferred[None]) -> None:
        if self._reads.pop(ctx, None) is not None:
            d.errback(RaftTimeoutError("read index timed out"))
            return
        for item in self._reads_waiting:
            if item[1] is d:
                self._reads_waiting.remove(item)
                d.errback(RaftTimeoutError("read index timed out waiting for apply"))
                return

    def _fail_all(self, error: Exception) -> None:
        proposals, self._proposals = self._proposals, {}
        if self._proposal_timer is not None:
            _cancel(self._proposal_timer)
            self._proposal_timer = None
        for _term, d, _deadline in proposals.values():
            d.errback(error)
        reads, self._reads = self._reads, {}
        for d, timer in reads.values():
            _cancel(timer)
            d.errback(error)
        waiting, self._reads_waiting = self._reads_waiting, []
        for _index, d, timer in waiting:
            _cancel(timer)
            d.errback(error)
        transfers, self._transfers = self._transfers, []
        for _to, d, timer in transfers:
            _cancel(timer)
            d.errback(error)
        changes, self._changes_waiting = self._changes_waiting, []
        for _submit, d, timer in changes:
            _cancel(timer)
            d.errback(error)

    # --- internals: the loop ----------------------------------------------------------

    def _tick(self) -> None:
        if self._node is not None and self._failure is None:
            self._node.tick()
            self._kick()

    def _receive(self, message: Message) -> None:
        if self._node is None or not self.running or self._failure is not None:
            return
        try:
            self._node.step(message)
        except Exception:
            _log.failure("Raft {id}: stepping {msg!r} failed", id=self.node_id, msg=message)
        self._kick()

    def _kick(self) -> None:
        """Process the core's output soon (once per reactor turn, to batch proposals)."""
        if self._kick_call is None and not self._busy and self.running:
            self._kick_call = self._clock.callLater(0, self._process)

    def _process(self) -> None:
        self._kick_call = None
        if self._busy or self._node is None or not self.running or self._failure is not None:
            return
        node = self._node
        ready = node.ready()
        if not ready.contains_updates():
            return
        self._busy = True
        hs = ready.hard_state
        if (
            hs is not None
            and not ready.entries
            and ready.snapshot is None
            and (hs.term, hs.vote) == self._durable_vote
        ):
            # Only the commit index moved. Raft does not need it durable (a restart learns it
            # again), so it rides along with the next write instead of costing an fsync now.
            self._unsaved_commit = hs
            hs = None
        elif hs is None and self._unsaved_commit is not None and (
            ready.entries or ready.snapshot is not None
        ):
            hs = self._unsaved_commit
        writes = hs is not None or bool(ready.entries) or ready.snapshot is not None
        # A leader may send its appends while it writes the same entries (Raft thesis 10.2.1):
        # it counts itself towards a commit only once ``advance`` says they are durable. Only
        # when its term and vote are already durable, so no message can promise them early.
        send_early = not writes or (
            node.role == Role.LEADER
            and ready.snapshot is None
            and (hs is None or (hs.term, hs.vote) == self._durable_vote)
        )
        if send_early:
            self._send(ready)
        # Committed entries that were durable here before this batch can be applied while the
        # batch is written: only the commit index is new, and it need not be durable first.
        applied_early = 0
        if ready.snapshot is None:
            limit = ready.entries[0].index if ready.entries else None
            while applied_early < len(ready.committed) and (
                limit is None or ready.committed[applied_early].index < limit
            ):
                applied_early += 1
            try:
                self._apply(ready.committed[:applied_early])
            except Exception:
                self._loop_failed(Failure())
                self._busy = False
                return
        if writes:
            assert self._executor is not None
            d = self._executor(partial(self._storage.save, hs, ready.entries, ready.snapshot))
        else:
            d = defer.succeed(None)
        d.addCallback(lambda _: self._after_persist(ready, hs, not send_early, applied_early))
        d.addErrback(self._loop_failed)
        d.addBoth(self._loop_finished)

    def _send(self, ready: Ready) -> None:
        for message in ready.messages:
            self._transport.send(message)

    def _after_persist(
        self, ready: Ready, saved: HardState | None, send: bool, applied_early: int
    ) -> Deferred[None] | None:
        node = self.node
        if saved is not None or ready.entries or ready.snapshot is not None:
            self.batches += 1
        if saved is not None:
            self._durable_vote = (saved.term, saved.vote)
            if self._unsaved_commit is not None and saved.commit >= self._unsaved_commit.commit:
                self._unsaved_commit = None
        if ready.snapshot is not None:
            self._install_snapshot(ready.snapshot)
        if send:
            self._send(ready)
        self._apply(ready.committed[applied_early:])
        for read_state in ready.read_states:
            self._read_ready(read_state.request_ctx, read_state.index)
        node.advance(ready)
        self._serve_reads()
        self._watch_leadership()
        return self._maybe_snapshot()

    def _loop_failed(self, failure: Failure) -> None:
        # Storage failing (disk full, I/O error) or a core bug: this member can no longer keep
        # its promises, so it stops taking part rather than acknowledge what it may not keep.
        if failure.check(CannotApply):
            # Said in a sentence by the state machine: no traceback to read.
            _log.error("Raft {id}: {error}; member halted", id=self.node_id, error=str(failure.value))
        else:
            _log.failure("Raft {id}: the Ready loop failed; member halted", failure, id=self.node_id)
        if self._failure is not None:
            return
        self._failure = failure
        self._fail_all(RaftStoppedError(f"Raft member {self.node_id} failed: {failure.value}"))
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        if self.on_failure is not None:
            self.on_failure(failure)

    def _loop_finished(self, _: object) -> None:
        self._busy = False
        if self._loop_done is not None:
            done, self._loop_done = self._loop_done, None
            done.callback(None)
            return
        if self.running and self._failure is None and self._node is not None:
            self._try_changes()
            # More input may have arrived while the batch was being written.
            self._kick()

    def _install_snapshot(self, snapshot: Snapshot) -> None:
        if snapshot.meta.index <= self._applied:
            return
        self._sm.restore(snapshot)
        self._applied = snapshot.meta.index
        self._snapshot_index = snapshot.meta.index
        self._snapshot_size = len(snapshot.data)
        self._bytes_at_snapshot = self._applied_bytes
        for index in [i for i in self._proposals if i <= snapshot.meta.index]:
            _term, d, _deadline = self._proposals.pop(index)
            d.errback(LeadershipLostError(f"proposal at {index} was superseded by a snapshot"))

    def _apply(self, entries: Sequence[Entry]) -> None:
        """Apply committed entries in log order and answer their proposers.

        A state machine with ``apply_batch`` gets all the NORMAL entries at once (one storage
        transaction for a whole Ready's worth instead of one each). An exception here means
        this replica could not apply a committed entry (its disk, its LMDB map): skipping it
        would make this replica diverge from the others for good, so it propagates and the
        member halts, leaving the entry (with a batch, the whole batch) unapplied.
        """
        todo = [entry for entry in entries if entry.index > self._applied]
        if not todo:
            return
        normal = [entry for entry in todo if entry.kind == EntryKind.NORMAL]
        batch = getattr(self._sm, "apply_batch", None)
        results: dict[int, object] = {}
        if batch is not None and len(normal) > 1:
            results = dict(zip((e.index for e in normal), batch(normal), strict=True))
        else:
            for entry in normal:
                results[entry.index] = self._sm.apply(entry)
        self._applied_bytes += sum(len(entry.data) for entry in todo)
        for entry in todo:
            self._applied = entry.index
            pending = self._proposals.pop(entry.index, None)
            if pending is None:
                continue
            term, d, _deadline = pending
            if entry.term != term:
                d.errback(ProposalDroppedError(f"entry {entry.index} was replaced by a later leader"))
            else:
                d.callback(results.get(entry.index))

    def _read_ready(self, ctx: bytes, index: int) -> None:
        pending = self._reads.pop(ctx, None)
        if pending is not None:
            self._reads_waiting.append((index, pending[0], pending[1]))

    def _serve_reads(self) -> None:
        if not self._reads_waiting:
            return
        still: list[tuple[int, Deferred[None], IDelayedCall]] = []
        for index, d, timer in self._reads_waiting:
            if index <= self._applied:
                _cancel(timer)
                d.callback(None)
            else:
                still.append((index, d, timer))
        self._reads_waiting = still

    def _log_role(self, seen: tuple[Role, int, str | None]) -> None:
        """Log a change of role or of the leader followed (elections explain most outages)."""
        role, term, leader = seen
        if role == Role.LEADER:
            what = "leads"
        elif leader is not None:
            what = f"is {role.value}, following {leader}"
        else:
            what = f"is {role.value}, no leader known"
        _log.info("Raft: {node} {what} in term {term}", node=self.node_id, what=what, term=term)

    def _watch_leadership(self) -> None:
        node = self.node
        seen = (node.role, node.term, node.leader_id)
        before = self._seen_role
        if before is None or seen[0] != before[0] or seen[2] != before[2]:
            self._log_role(seen)
        self._seen_role = seen
        leading = node.role == Role.LEADER
        if self._was_leader and (not leading or node.term != self._leader_term):
            # Entries we proposed may still commit under the next leader, or may not: the
            # proposer must retry through its session to learn which.
            lost = LeadershipLostError(
                f"{self.node_id} lost leadership in term {self._leader_term}; outcome unknown"
            )
            proposals, self._proposals = self._proposals, {}
            for _t, d, _deadline in proposals.values():
                d.errback(lost)
            reads, self._reads = self._reads, {}
            for d, timer in reads.values():
                _cancel(timer)
                d.errback(lost)
        self._was_leader, self._leader_term = leading, node.term
        if self._transfers:
            for item in list(self._transfers):
                to, d, timer = item
                if node.leader_id == to:
                    self._transfers.remove(item)
                    _cancel(timer)
                    d.callback(None)

    def _maybe_snapshot(self) -> Deferred[None] | None:
        """Every ``snapshot_every`` applied entries: snapshot, store it, then compact the core.

        With a state machine that has ``snapshot_later``, the state is fixed here and
        serialised on the snapshot thread while the Ready loop carries on; the result is then
        written through the storage thread, in order with the log's writes. Otherwise the
        snapshot is taken inside the Ready loop's busy window. Either way the core drops its
        log prefix only once the snapshot is durable.
        """
        if self._snapshot_every is None or not self.running or self._snapshot_job is not None:
            return None
        if self._applied - self._snapshot_index < self._snapshot_every:
            return None
        growth = self._snapshot_growth
        since = self._applied_bytes - self._bytes_at_snapshot
        if growth is not None and since < growth * self._snapshot_size:
            return None
        node = self.node
        index = self._applied
        term = node.term_at(index)
        if term is None:
            return None
        meta = SnapshotMeta(index=index, term=term, config=node.config)

        applied_bytes = self._applied_bytes

        def stored(_: object) -> None:
            if index > self._snapshot_index:
                self._snapshot_size = len(snapshot_of[0].data)
                self._bytes_at_snapshot = applied_bytes
            self._snapshot_index = max(self._snapshot_index, index)
            if self._node is node:
                try:
                    node.compact(snapshot_of[0])
                except ValueError as e:
                    # The log moved under us (a leader's snapshot replaced it): nothing to do.
                    _log.info("Raft {id}: compaction at {index} skipped: {why}",
                              id=self.node_id, index=index, why=str(e))

        snapshot_of: list[Snapshot] = []
        later = getattr(self._sm, "snapshot_later", None)
        assert self._executor is not None and self._snapshot_executor is not None
        if later is None:
            snapshot_of.append(Snapshot(meta=meta, data=self._sm.snapshot()))
            d: Deferred[None] = self._executor(partial(self._storage.save, None, [], snapshot_of[0]))
            return d.addCallback(stored)

        serialise = later()

        def store(data: bytes) -> Deferred[None] | None:
            if not self.running or self._node is not node or self._failure is not None:
                return None
            if self._snapshot_index >= index:
                return None  # a leader's snapshot got here first
            snapshot_of.append(Snapshot(meta=meta, data=data))
            # Storage that can write the data ahead in parts (LMDB) gets one job per part,
            # each queued once the one before is done: the log's own writes go in between,
            # so a large snapshot does not silence this member (no Ready is processed while
            # a write is queued ahead of its own) for as long as the whole write takes.
            staging = getattr(self._storage, "snapshot_writes", None)
            jobs: list[Callable[[], Any]] = list(staging(snapshot_of[0])) if staging is not None else []
            jobs.append(partial(self._storage.save, None, [], snapshot_of[0]))
            executor = self._executor
            assert executor is not None

            def run(_: object, job: Callable[[], Any]) -> Deferred[Any]:
                return executor(job)

            written: Deferred[Any] = defer.succeed(None)
            for job in jobs:
                written.addCallback(run, job)
            return written.addCallback(stored)

        def failed(failure: Failure) -> None:
            # Not fatal: the log is intact and the next attempt comes snapshot_every entries
            # later. A broken disk fails the next log write, which halts the member.
            _log.failure("Raft {id}: snapshot at {index} failed", failure, id=self.node_id, index=index)

        def finished(_: object) -> None:
            self._snapshot_job = None

        job: Deferred[Any] = self._snapshot_executor(serialise)
        self._snapshot_job = job
        job.addCallback(store).addErrback(failed).addBoth(finished)
        return None


def _cancel(call: Any) -> None:
    if call.active():
        call.cancel()
