# -*- test-case-name: tests.test_raft_driver -*-
"""Tests for dogfs.raft.driver and dogfs.raft.transport: Raft groups on a simulated clock."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any, cast

import lmdb
import msgpack
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dogfs.raft.core import (
    Configuration,
    Entry,
    HardState,
    Heartbeat,
    ProposalRejected,
    RaftOptions,
    RequestVote,
    RequestVoteResponse,
    Snapshot,
)
from dogfs.raft.driver import (
    IRaftStateMachine,
    LeadershipLostError,
    NotLeaderError,
    RaftDriver,
    RaftError,
    RaftOverloadedError,
    RaftStoppedError,
    RaftTimeoutError,
)
from dogfs.raft.storage import (
    IRaftStorage,
    LMDBRaftStorage,
    MemoryRaftStorage,
    RaftStorageCorruption,
)
from dogfs.raft.transport import FramedRaftTransport, IRaftTransport, MemoryRaftNetwork

IDS = ("a", "b", "c")


@implementer(IRaftStateMachine)
class KVMachine:
    """A key-value state machine: ``key=value`` sets, and returns the previous value."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.applied: list[int] = []

    def apply(self, entry: Entry) -> object:
        key, _, value = entry.data.decode().partition("=")
        previous = self.data.get(key)
        self.data[key] = value
        self.applied.append(entry.index)
        return previous

    def snapshot(self) -> bytes:
        return msgpack.packb(self.data)

    def restore(self, snapshot: Snapshot) -> None:
        self.data = dict(msgpack.unpackb(snapshot.data))

    def applied_index(self) -> int:
        return 0


class BatchKVMachine(KVMachine):
    """A KVMachine that also applies batches, recording each batch's indexes."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[int]] = []

    def apply_batch(self, entries: Any) -> list[object]:
        self.batches.append([e.index for e in entries])
        return [self.apply(e) for e in entries]


class LaterSnapshotKVMachine(KVMachine):
    """A KVMachine whose snapshots are fixed at once and serialised later."""

    def snapshot_later(self) -> Callable[[], bytes]:
        frozen = dict(self.data)
        return lambda: msgpack.packb(frozen)  # type: ignore[no-any-return]


class HeldExecutor:
    """An executor that runs nothing until the test releases it."""

    def __init__(self) -> None:
        self.held: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.held.append((work, d))
        return d

    def release(self) -> None:
        work, d = self.held.pop(0)
        d.callback(work())


@implementer(IRaftStorage)
class RecordingStorage:
    """Wraps a storage and records each batch in a shared event list."""

    def __init__(self, inner: Any, events: list[tuple[str, Any]]) -> None:
        self.inner = inner
        self.events = events
        self.saves: list[tuple[HardState | None, list[Entry], Snapshot | None]] = []

    def load(self) -> Any:
        return self.inner.load()

    def save(self, hard_state: Any, entries: Any, snapshot: Any) -> None:
        self.inner.save(hard_state, entries, snapshot)
        self.saves.append((hard_state, list(entries), snapshot))
        self.events.append(("save", [e.index for e in entries]))

    def snapshot_data(self) -> Snapshot | None:
        return self.inner.snapshot_data()  # type: ignore[no-any-return]

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def run_now(f: Callable[[], Any]) -> Deferred[Any]:
    """An executor that performs the storage write synchronously (tests only)."""
    return defer.maybeDeferred(f)


class Group:
    """Drivers on one task.Clock joined by a MemoryRaftNetwork."""

    def __init__(
        self,
        case: SynchronousTestCase,
        ids: tuple[str, ...] = IDS,
        *,
        lmdb_dirs: dict[str, str] | None = None,
        snapshot_every: int | None = None,
        snapshot_growth: float | None = None,
        seed: int = 1,
        operation_timeout: float = 10.0,
        max_pending: int = 10_000,
        machine_factory: Callable[[], KVMachine] = KVMachine,
        snapshot_executor: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
    ) -> None:
        self.case = case
        self.machine_factory = machine_factory
        self.snapshot_executor = snapshot_executor
        self.clock = task.Clock()
        self.network = MemoryRaftNetwork(self.clock)
        self.ids = ids
        self.lmdb_dirs = lmdb_dirs
        self.snapshot_every = snapshot_every
        self.snapshot_growth = snapshot_growth
        self.seed = seed
        self.operation_timeout = operation_timeout
        self.max_pending = max_pending
        self.events: list[tuple[str, Any]] = []
        self.memory = {i: MemoryRaftStorage() for i in ids}
        self.drivers: dict[str, RaftDriver] = {}
        self.machines: dict[str, KVMachine] = {}
        self.storages: dict[str, RecordingStorage] = {}
        for i in ids:
            self.start(i)
        case.addCleanup(self.stop_all)

    def start(self, node_id: str, bootstrap: Configuration | None = None) -> RaftDriver:
        """(Re)start ``node_id`` with a fresh state machine on its existing storage."""
        inner: Any
        if self.lmdb_dirs is not None:
            inner = LMDBRaftStorage(self.lmdb_dirs[node_id], map_size=1 << 24)
        else:
            inner = self.memory.setdefault(node_id, MemoryRaftStorage())
        storage = RecordingStorage(inner, self.events)
        machine = self.machine_factory()
        driver = RaftDriver(
            node_id,
            storage=storage,
            transport=self.network.transport(node_id),
            state_machine=machine,
            clock=self.clock,
            bootstrap=bootstrap or Configuration(voters=frozenset(self.ids)),
            options=RaftOptions(),
            tick_interval=0.1,
            rng=random.Random(f"{self.seed}-{node_id}-{len(self.drivers)}"),
            executor=run_now,
            snapshot_executor=self.snapshot_executor,
            snapshot_every=self.snapshot_every,
            snapshot_growth=self.snapshot_growth,
            operation_timeout=self.operation_timeout,
            max_pending=self.max_pending,
        )
        driver.startService()
        self.drivers[node_id], self.machines[node_id], self.storages[node_id] = (
            driver,
            machine,
            storage,
        )
        return driver

    def stop(self, node_id: str) -> None:
        """Stop ``node_id`` (its storage is closed, its data kept)."""
        driver = self.drivers[node_id]
        if driver.running:
            self.case.successResultOf(driver.stopService())

    def stop_all(self) -> None:
        """Stop every running driver."""
        for i in list(self.drivers):
            self.stop(i)

    def run(self, seconds: float) -> None:
        """Let ``seconds`` of simulated time pass."""
        for _ in range(round(seconds / 0.05)):
            self.clock.advance(0.05)

    def leader(self, within: float = 10.0) -> RaftDriver:
        """Run until exactly one running member leads, and return it."""
        for _ in range(round(within / 0.1)):
            leaders = [d for d in self.drivers.values() if d.running and d.is_leader]
            if len(leaders) == 1:
                return leaders[0]
            self.run(0.1)
        raise AssertionError("no single leader elected")

    def followers(self) -> list[RaftDriver]:
        """Running members that do not lead."""
        return [d for d in self.drivers.values() if d.running and not d.is_leader]


class DriverTests(SynchronousTestCase):
    """A three-member group of drivers on a simulated clock."""

    def test_interfaces(self) -> None:
        """The in-memory and framed transports provide IRaftTransport."""
        network = MemoryRaftNetwork(task.Clock())
        self.assertTrue(verifyObject(IRaftTransport, network.transport("a")))
        self.assertTrue(verifyObject(IRaftTransport, FramedRaftTransport(lambda p, b: None)))
        self.assertTrue(verifyObject(IRaftStateMachine, KVMachine()))

    def test_election(self) -> None:
        """One leader is elected and every member agrees on it and on the term."""
        group = Group(self)
        leader = group.leader()
        group.run(1)
        self.assertEqual({d.leader_hint for d in group.drivers.values()}, {leader.node_id})
        self.assertEqual(len({d.term for d in group.drivers.values()}), 1)
        self.assertEqual(leader.role, "leader")
        self.assertEqual({d.role for d in group.followers()}, {"follower"})

    def test_propose_returns_result_and_replicates(self) -> None:
        """propose fires with apply's result on the leader; every member applies the entry."""
        group = Group(self)
        leader = group.leader()
        first = leader.propose(b"x=1")
        second = leader.propose(b"x=2")
        group.run(0.5)
        self.assertIsNone(self.successResultOf(first))
        self.assertEqual(self.successResultOf(second), "1")
        for machine in group.machines.values():
            self.assertEqual(machine.data, {"x": "2"})
        self.assertEqual(len({d.commit_index for d in group.drivers.values()}), 1)
        self.assertEqual(leader.applied_index, leader.commit_index)

    def test_follower_redirects(self) -> None:
        """A follower refuses a proposal with NotLeaderError naming the leader."""
        group = Group(self)
        leader = group.leader()
        group.run(0.5)
        failure = self.failureResultOf(group.followers()[0].propose(b"y=1"), NotLeaderError)
        self.assertEqual(failure.value.leader_hint, leader.node_id)

    def test_read_index(self) -> None:
        """read_index fires on the leader and (forwarded) on a follower once safe to read."""
        group = Group(self)
        leader = group.leader()
        write = leader.propose(b"k=v")
        on_leader = leader.read_index()
        follower = group.followers()[0]
        group.run(0.2)
        on_follower = follower.read_index()
        group.run(0.5)
        self.successResultOf(write)
        self.assertIsNone(self.successResultOf(on_leader))
        self.assertIsNone(self.successResultOf(on_follower))
        self.assertEqual(group.machines[follower.node_id].data, {"k": "v"})

    def test_read_contexts_differ_across_restarts(self) -> None:
        """A follower's reads are named for the run of the member that asked: after a restart
        the first read's context is not the first read's of the run before, so a late answer
        to that one cannot complete this one."""
        group = Group(self)
        group.leader()
        follower = group.followers()[0]
        asked: list[bytes] = []

        def spy(driver: RaftDriver) -> None:
            inner = driver.node.read_index

            def read_index(ctx: bytes) -> Any:
                asked.append(ctx)
                return inner(ctx)

            driver.node.read_index = read_index  # type: ignore[method-assign]

        spy(follower)
        first = follower.read_index()
        group.run(0.5)
        self.successResultOf(first)
        group.stop(follower.node_id)
        again = group.start(follower.node_id)
        group.run(1.0)
        spy(again)
        second = again.read_index()
        group.run(0.5)
        self.successResultOf(second)
        self.assertEqual(len(asked), 2)
        self.assertNotEqual(asked[0], asked[1])
        self.assertTrue(all(ctx.startswith(follower.node_id.encode() + b"/") for ctx in asked))

    def test_leadership_loss_fails_pending(self) -> None:
        """An isolated leader steps down and its pending proposal fails as outcome-unknown."""
        group = Group(self)
        leader = group.leader()
        group.run(0.5)
        group.network.isolate(leader.node_id)
        pending = leader.propose(b"lost=1")
        group.run(5)
        self.failureResultOf(pending, LeadershipLostError)
        self.assertFalse(leader.is_leader)
        group.network.heal()
        new_leader = group.leader()
        self.assertNotEqual(new_leader.node_id, leader.node_id)
        d = new_leader.propose(b"after=1")
        group.run(1)
        self.successResultOf(d)

    def test_minority_cannot_commit(self) -> None:
        """Without a majority no proposal is acknowledged (it times out or fails)."""
        group = Group(self)
        leader = group.leader()
        group.run(0.5)
        for f in group.followers():
            group.stop(f.node_id)
        pending = leader.propose(b"nope=1")
        group.run(15)
        # check-quorum makes the leader step down: the outcome is reported as unknown.
        self.failureResultOf(pending, LeadershipLostError)
        self.assertNotIn("nope", group.machines[leader.node_id].data)

    def test_read_times_out(self) -> None:
        """A read whose forwarded request is lost fails with RaftTimeoutError, not silence."""
        group = Group(self)
        leader = group.leader()
        group.run(0.5)
        follower = group.followers()[0]
        group.network.cut(leader.node_id, follower.node_id)
        d = follower.read_index()
        group.run(11)
        self.failureResultOf(d, RaftTimeoutError)

    def test_proposal_times_out(self) -> None:
        """A proposal that cannot commit within the timeout fails with RaftTimeoutError."""
        group = Group(self, operation_timeout=0.3)
        leader = group.leader()
        group.run(0.5)
        for f in group.followers():
            group.network.isolate(f.node_id)
        d = leader.propose(b"slow=1")
        group.run(0.5)
        self.failureResultOf(d, RaftTimeoutError)

    def test_proposals_expire_at_their_own_deadlines(self) -> None:
        """Each proposal times out exactly ``operation_timeout`` after it was made, though one
        timer serves them all: proposing adds no delayed call per proposal."""
        group = Group(self, operation_timeout=1.0)
        leader = group.leader()
        group.run(0.5)
        for f in group.followers():
            group.network.isolate(f.node_id)
        first = leader.propose(b"a=1")
        calls = len(group.clock.getDelayedCalls())
        group.clock.advance(0.25)
        later = [leader.propose(f"b{i}=1".encode()) for i in range(20)]
        self.assertLessEqual(len(group.clock.getDelayedCalls()), calls)
        group.clock.advance(0.75)
        self.failureResultOf(first, RaftTimeoutError)
        for d in later:
            self.assertNoResult(d)
        group.clock.advance(0.24)
        self.assertNoResult(later[0])
        group.clock.advance(0.02)
        for d in later:
            self.failureResultOf(d, RaftTimeoutError)
        self.assertEqual(leader.status()["pending_proposals"], 0)

    def test_overload(self) -> None:
        """Past max_pending waiting proposals, propose fails fast with RaftOverloadedError."""
        group = Group(self, max_pending=3)
        leader = group.leader()
        group.run(0.5)
        accepted = [leader.propose(b"p=%d" % i) for i in range(3)]
        self.failureResultOf(leader.propose(b"p=4"), RaftOverloadedError)
        group.run(0.5)
        for d in accepted:
            self.successResultOf(d)
        self.successResultOf(_settle(group, leader.propose(b"p=5")))

    def test_apply_error_halts_member(self) -> None:
        """An exception from the state machine halts that member instead of skipping the
        entry (which would make it diverge): it stops leading, says it failed, fails its
        proposals and tells its owner; it never reports the entry applied."""
        group = Group(self)
        leader = group.leader()
        failures: list[Failure] = []
        leader.on_failure = failures.append
        applied = leader.applied_index
        d = leader.propose(b"\xff")
        group.run(0.5)
        self.failureResultOf(d, RaftStoppedError)
        self.assertFalse(leader.is_leader)
        self.assertEqual(leader.role, "failed")
        self.assertEqual(leader.applied_index, applied)
        self.assertEqual([f.type for f in failures], [UnicodeDecodeError])
        self.failureResultOf(leader.propose(b"ok=1"), RaftError)
        self.flushLoggedErrors(UnicodeDecodeError)

    def test_storage_failure_halts_leader(self) -> None:
        """A leader whose log disk fails stops leading at once (it can never be deposed by
        messages it no longer reads), and another member takes over."""
        import errno

        group = Group(self)
        leader = group.leader()
        failures: list[Failure] = []
        leader.on_failure = failures.append

        def full(*args: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        group.storages[leader.node_id].save = full  # type: ignore[method-assign]
        d = leader.propose(b"x=1")
        group.run(0.2)
        self.failureResultOf(d, RaftStoppedError)
        self.assertFalse(leader.is_leader)
        self.assertEqual(leader.role, "failed")
        self.assertEqual(len(failures), 1)
        group.run(3)
        others = [dr for dr in group.drivers.values() if dr is not leader]
        self.assertEqual(sum(dr.is_leader for dr in others), 1)
        self.flushLoggedErrors(OSError)

    def test_second_config_change_waits(self) -> None:
        """Only one membership change may be pending: a second waits until the first is
        applied, then goes ahead; one that stays pending past the operation timeout fails
        with RaftTimeoutError; one that would do nothing fails at once."""
        group = Group(self, operation_timeout=0.3)
        leader = group.leader()
        group.run(0.5)
        first = leader.add_learner("d")
        second = leader.add_learner("e")
        self.assertNoResult(second)
        group.run(1)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(leader.config.learners, frozenset({"d", "e"}))  # type: ignore[union-attr]
        self.failureResultOf(leader.add_learner("d"), ProposalRejected)
        # Without a quorum the first change never applies: the second gives up in time.
        for follower in group.followers():
            group.network.isolate(follower.node_id)
        stuck = leader.remove("d")
        waiting = leader.remove("e")
        group.run(0.4)  # less than check-quorum's step-down: the leader still leads
        self.assertTrue(leader.is_leader)
        self.failureResultOf(waiting, RaftTimeoutError)
        self.failureResultOf(stuck, RaftTimeoutError)

    def test_new_leader_accepts_a_change_at_once(self) -> None:
        """A change sent to a member right after it became leader (before it has applied the
        entries it inherited) is not refused: it waits for them and goes ahead."""
        group = Group(self)
        leader = group.leader()
        group.run(0.5)
        target = group.followers()[0]
        changed: list[Deferred[Any]] = []
        done = leader.transfer_leadership(target.node_id)
        done.addCallback(lambda _: changed.append(target.add_learner("d")))
        group.run(0.05)
        for _ in range(40):
            if changed:
                break
            group.clock.advance(0.01)
        self.assertTrue(changed)
        group.run(1)
        self.successResultOf(changed[0])
        self.assertIn("d", target.config.learners)  # type: ignore[union-attr]

    def test_transfer_leadership(self) -> None:
        """transfer_leadership hands over to the named voter and fires when it leads."""
        group = Group(self)
        leader = group.leader()
        group.run(0.5)
        target = group.followers()[0].node_id
        d = leader.transfer_leadership(target)
        group.run(2)
        self.successResultOf(d)
        self.assertTrue(group.drivers[target].is_leader)

    def test_membership(self) -> None:
        """A learner is added, catches up, is promoted to voter, then removed."""
        group = Group(self)
        leader = group.leader()
        self.successResultOf(_settle(group, leader.propose(b"before=1")))
        group.start("d", bootstrap=Configuration(voters=frozenset(IDS)))
        self.successResultOf(_settle(group, leader.add_learner("d")))
        group.run(1)
        self.assertEqual(group.drivers["d"].role, "learner")
        self.assertEqual(group.machines["d"].data, {"before": "1"})
        self.successResultOf(_settle(group, leader.promote("d")))
        group.run(1)
        self.assertIn("d", group.drivers["d"].config.voters)  # type: ignore[union-attr]
        self.assertEqual(group.drivers["d"].role, "follower")
        self.successResultOf(_settle(group, leader.remove("d")))
        self.assertNotIn("d", leader.config.members())  # type: ignore[union-attr]

    def test_change_right_after_the_previous_one_applies(self) -> None:
        """A membership change asked for as soon as the previous one is seen applied (from its
        Deferred, before the core has been told of the batch) is proposed once the batch is
        written, instead of being refused as "still pending"."""
        group = Group(self)
        leader = group.leader()
        self.successResultOf(_settle(group, leader.propose(b"before=1")))
        group.start("d", bootstrap=Configuration(voters=frozenset(IDS)))
        promoted: list[Deferred[Any]] = []
        added = leader.add_learner("d")
        added.addCallback(lambda _: promoted.append(leader.promote("d")))
        group.run(1)
        self.successResultOf(added)
        self.successResultOf(promoted[0])
        self.assertIn("d", leader.config.voters)  # type: ignore[union-attr]

    def test_one_write_per_batch(self) -> None:
        """Proposals made in the same reactor turn reach storage as one write."""
        group = Group(self)
        leader = group.leader()
        group.run(0.5)
        storage = group.storages[leader.node_id]
        before = len(storage.saves)
        proposals = [leader.propose(b"n=%d" % i) for i in range(50)]
        group.clock.advance(0)
        batches = [s for s in storage.saves[before:] if s[1]]
        self.assertEqual(len(batches), 1)
        self.assertEqual(len(batches[0][1]), 50)
        group.run(0.5)
        for d in proposals:
            self.successResultOf(d)

    def test_committed_entries_applied_as_a_batch(self) -> None:
        """A state machine with apply_batch gets a Ready's committed entries in one call, in
        log order, and each proposer still gets its own entry's result."""
        group = Group(self, machine_factory=BatchKVMachine)
        machines = cast(dict[str, BatchKVMachine], group.machines)
        leader = group.leader()
        group.run(0.5)
        proposals = [leader.propose(b"k=%d" % i) for i in range(20)]
        group.run(0.5)
        self.assertEqual([self.successResultOf(d) for d in proposals], [None] + [str(i) for i in range(19)])
        for machine in machines.values():
            self.assertEqual(machine.data, {"k": "19"})
            self.assertTrue(any(len(b) == 20 for b in machine.batches), machine.batches)
            flat = [i for b in machine.batches for i in b]
            self.assertEqual(flat, sorted(flat))

    def test_vote_durable_before_vote_messages(self) -> None:
        """No member asks for or grants a vote before that term and vote are durable."""
        group = Group(self)
        trace: list[tuple[str, str, Any]] = []
        for node_id in IDS:
            storage = group.storages[node_id]
            transport = group.network.transport(node_id)

            def save(hs: Any, entries: Any, snap: Any, inner: Any = storage.save,
                     node_id: str = node_id) -> None:
                inner(hs, entries, snap)
                if hs is not None:
                    trace.append(("save", node_id, (hs.term, hs.vote)))

            def send(message: Any, inner: Any = transport.send, node_id: str = node_id) -> None:
                trace.append(("send", node_id, message))
                inner(message)

            storage.save = save  # type: ignore[method-assign]
            transport.send = send  # type: ignore[method-assign]
        leader = group.leader()
        # Force a second election too.
        group.network.isolate(leader.node_id)
        group.run(5)
        group.network.heal()
        group.leader()
        durable: dict[str, tuple[int, str | None]] = {}
        checked = 0
        for kind, node_id, item in trace:
            if kind == "save":
                durable[node_id] = item
            elif isinstance(item, RequestVote) and not item.pre_vote:
                self.assertEqual(durable.get(node_id), (item.term, node_id))
                checked += 1
            elif isinstance(item, RequestVoteResponse) and item.granted and not item.pre_vote:
                self.assertEqual(durable.get(node_id), (item.term, item.dst))
                checked += 1
        self.assertGreater(checked, 2)

    def test_follower_persists_before_acknowledging(self) -> None:
        """A follower's acknowledgement of entries follows the durable write of those entries."""
        group = Group(self)
        leader = group.leader()
        group.run(0.5)
        follower = group.followers()[0]
        order: list[str] = []
        storage = group.storages[follower.node_id]
        inner_save = storage.save

        def save(hs: Any, entries: Any, snap: Any) -> None:
            if entries:
                order.append("save")
            inner_save(hs, entries, snap)

        storage.save = save  # type: ignore[method-assign]
        transport = group.network.transport(follower.node_id)
        inner_send = transport.send

        def send(message: Any) -> None:
            if type(message).__name__ == "AppendEntriesResponse" and message.success:
                order.append("ack")
            inner_send(message)

        transport.send = send  # type: ignore[method-assign]
        leader.propose(b"z=1")
        group.run(0.5)
        self.assertIn("ack", order)
        self.assertEqual(order[0], "save")

    def test_stop_fails_pending(self) -> None:
        """Stopping the driver fails pending proposals with RaftStoppedError."""
        group = Group(self)
        leader = group.leader()
        pending = leader.propose(b"a=1")
        group.stop(leader.node_id)
        self.failureResultOf(pending, RaftStoppedError)
        self.failureResultOf(leader.propose(b"b=1"), RaftStoppedError)
        self.assertEqual(leader.role, "stopped")

    def test_status(self) -> None:
        """status() reports role, term, indexes and membership for status pages."""
        group = Group(self)
        leader = group.leader()
        group.run(0.5)
        status = leader.status()
        self.assertEqual(status["role"], "leader")
        self.assertEqual(status["leader"], leader.node_id)
        self.assertEqual(status["voters"], list(IDS))
        self.assertEqual(status["commit_index"], leader.commit_index)
        self.assertGreaterEqual(int(status["term"]), 1)  # type: ignore[call-overload]

    def test_snapshot_serialised_off_the_loop(self) -> None:
        """With snapshot_later, the state is fixed at the snapshot index and serialised
        elsewhere while the group goes on committing; once written, the snapshot holds the
        state as of that index and the log before it is compacted. Stopping waits for a
        serialisation in progress."""
        held = HeldExecutor()
        group = Group(self, snapshot_every=10, machine_factory=LaterSnapshotKVMachine, snapshot_executor=held)
        leader = group.leader()
        group.run(0.5)
        for i in range(12):
            leader.propose(b"k%d=%d" % (i, i))
        group.run(0.5)
        self.assertEqual(len(held.held), 3)  # one per member, none serialised yet
        index = leader.applied_index
        later = [leader.propose(b"after=%d" % i) for i in range(5)]
        group.run(0.5)
        for d in later:
            self.successResultOf(d)  # the loop did not wait for the snapshot
        self.assertEqual(leader.applied_index, index + 5)
        while held.held:
            held.release()
        group.run(0.1)
        snapshot = group.storages[leader.node_id].snapshot_data()
        self.assertEqual(snapshot.meta.index, index)
        data = msgpack.unpackb(snapshot.data)
        self.assertEqual(data["k11"], "11")
        self.assertNotIn("after", data)
        self.assertGreater(leader.node.first_index, index)
        # A second snapshot in progress holds up stopping until it is done.
        for i in range(10):
            leader.propose(b"more=%d" % i)
        group.run(0.5)
        self.assertTrue(held.held)
        stopped = leader.stopService()
        self.assertNoResult(stopped)
        while held.held:
            held.release()
        self.successResultOf(stopped)

    def test_snapshot_written_in_parts_between_log_writes(self) -> None:
        """On LMDB a snapshot's data is written one part per storage job, each queued after
        the one before: the log's writes go in between, so a large snapshot does not hold
        up the member's Ready loop (its heartbeats, its acknowledgements) for the whole
        write; the stored snapshot is whole."""
        import functools

        import dogfs.raft.storage as storage_module

        self.patch(storage_module, "SNAPSHOT_PART_BYTES", 16)
        clock = task.Clock()
        held = HeldExecutor()
        machine = LaterSnapshotKVMachine()
        storage = LMDBRaftStorage(self.mktemp(), map_size=1 << 24)
        driver = RaftDriver(
            "solo",
            storage=storage,
            transport=MemoryRaftNetwork(clock).transport("solo"),
            state_machine=machine,
            clock=clock,
            bootstrap=Configuration(voters=frozenset({"solo"})),
            tick_interval=0.1,
            rng=random.Random(3),
            executor=held,
            snapshot_executor=run_now,
            snapshot_every=10,
        )
        driver.startService()
        self.addCleanup(lambda: held.held and held.release())
        kinds: list[str] = []
        during: list[Deferred[Any]] = []

        def release() -> None:
            work = held.held[0][0]
            part = isinstance(work, functools.partial) and work.func.__name__ == "write"
            if part and not during:
                # A proposal while the first part waits: its log write queues behind it.
                during.append(driver.propose(b"during=1"))
                clock.advance(0)
            kinds.append("part" if part else "save")
            held.release()

        for _ in range(100):
            clock.advance(0.1)
            while held.held:
                release()
            if driver.is_leader:
                break
        for i in range(12):
            driver.propose(b"k%d=%d" % (i, i))
            clock.advance(0)
            while held.held:
                release()
                clock.advance(0)
        parts = [n for n, kind in enumerate(kinds) if kind == "part"]
        self.assertGreaterEqual(len(parts), 3)
        driver.propose(b"late=1")
        clock.advance(0)
        self.assertTrue(held.held)
        while held.held:
            release()
            clock.advance(0)
        snapshot = storage.snapshot_data()
        self.assertIsNotNone(snapshot)
        self.assertGreaterEqual(snapshot.meta.index, 10)
        self.assertEqual(msgpack.unpackb(snapshot.data)["k0"], "0")
        # The log write queued while a part was written went before the next part.
        self.assertIn("save", kinds[parts[0] : parts[-1]])
        self.assertIsNone(self.successResultOf(during[0]))
        self.successResultOf(driver.stopService())

    def test_snapshot_and_catch_up(self) -> None:
        """Members snapshot every N entries; a member that missed them catches up by snapshot."""
        group = Group(self, snapshot_every=10)
        leader = group.leader()
        group.run(0.5)
        lagging = group.followers()[0].node_id
        group.network.isolate(lagging)
        for i in range(30):
            leader.propose(b"k%d=%d" % (i, i))
            group.run(0.1)
        self.assertGreater(leader.node.snapshot_index, 10)
        group.network.heal()
        group.run(3)
        self.assertEqual(group.machines[lagging].data, group.machines[leader.node_id].data)
        self.assertEqual(len(group.machines[lagging].data), 30)
        self.assertIsNotNone(group.memory[lagging].snapshot)


    def test_snapshot_waits_for_the_log_to_outgrow_it(self) -> None:
        """With snapshot_growth, a snapshot also waits until the entries since the last one
        hold that many times its bytes: a large state is not dumped every few small entries."""
        group = Group(self, snapshot_every=5, snapshot_growth=1.0)
        leader = group.leader()
        group.run(0.5)

        def propose(entries: list[bytes]) -> None:
            for data in entries:
                leader.propose(data)
                group.run(0.1)

        # A big state: five 400-byte values. The first snapshot has nothing to outgrow.
        propose([b"big%d=%s" % (i, b"x" * 400) for i in range(5)])
        first = leader.node.snapshot_index
        self.assertGreaterEqual(first, 5)
        size = len(group.memory[leader.node_id].snapshot.data)  # type: ignore[union-attr]
        self.assertGreater(size, 1000)  # (the snapshot may be taken before the fifth)
        # Thirty small entries (well past snapshot_every) hold far fewer bytes: no snapshot.
        propose([b"s=%d" % i for i in range(30)])
        self.assertEqual(leader.node.snapshot_index, first)
        # Once the entries since the snapshot hold as many bytes as it did, the next one comes.
        propose([b"t%d=%s" % (i, b"y" * 200) for i in range(size // 200 + 2)])
        self.assertGreater(leader.node.snapshot_index, first)
        for machine in group.machines.values():
            self.assertEqual(machine.data, group.machines[leader.node_id].data)


class DurableGroupTests(SynchronousTestCase):
    """Groups on real LMDB storage: restarts, and damaged storage."""

    def setUp(self) -> None:
        base = self.mktemp()
        self.dirs = {i: f"{base}/{i}" for i in IDS}

    def test_restart_keeps_log_and_vote(self) -> None:
        """After every member restarts from LMDB, term, vote and log are back, the state
        machines replay to the same state, and the group goes on committing."""
        group = Group(self, lmdb_dirs=self.dirs)
        leader = group.leader()
        for i in range(10):
            leader.propose(b"k=%d" % i)
        group.run(1)
        before = {i: (d.term, d.node.vote, d.node.last_index) for i, d in group.drivers.items()}
        group.stop_all()
        for i in IDS:
            group.start(i)
        for i, d in group.drivers.items():
            self.assertEqual((d.term, d.node.vote, d.node.last_index), before[i])
        leader = group.leader()
        d = leader.propose(b"k=after")
        group.run(1)
        self.assertEqual(self.successResultOf(d), "9")
        for machine in group.machines.values():
            self.assertEqual(machine.data, {"k": "after"})

    def test_restart_from_snapshot(self) -> None:
        """A member restarts from its LMDB snapshot plus the log after it."""
        group = Group(self, lmdb_dirs=self.dirs, snapshot_every=5)
        leader = group.leader()
        for i in range(12):
            leader.propose(b"k%d=%d" % (i, i))
            group.run(0.1)
        group.run(1)
        name = leader.node_id
        group.stop(name)
        restarted = group.start(name)
        self.assertGreaterEqual(restarted.node.snapshot_index, 5)
        # Restored from the snapshot at once; the entries after it are applied on the first turn.
        self.assertGreaterEqual(len(group.machines[name].data), 5)
        group.clock.advance(0)
        self.assertEqual(len(group.machines[name].data), 12)

    def _damage(self, node_id: str, index: int, value: bytes) -> None:
        env = lmdb.open(self.dirs[node_id], max_dbs=4, map_size=1 << 24)
        try:
            with env.begin(write=True, db=env.open_db(b"log")) as txn:
                txn.put(struct.pack(">Q", index), value)
        finally:
            env.close()

    def test_corrupt_tail_refuses_to_start(self) -> None:
        """A corrupt record after the last entry stops the member from starting, naming the
        entry (it may be one this member acknowledged and a majority committed: dropping it
        could lose an acknowledged write); the others go on serving."""
        group = Group(self, lmdb_dirs=self.dirs)
        leader = group.leader()
        self.successResultOf(_settle(group, leader.propose(b"k=1")))
        victim = group.followers()[0].node_id
        last = group.drivers[victim].node.last_index
        group.stop(victim)
        self._damage(victim, last + 1, b"\x12\x34\x56\x78torn")
        e = self.assertRaises(RaftStorageCorruption, group.start, victim)
        self.assertIn(f"log entry {last + 1}", str(e))
        self.assertIn("refusing to start", str(e))
        d = leader.propose(b"k=2")
        group.run(1)
        self.successResultOf(d)

    def test_corrupt_middle_refuses_to_start(self) -> None:
        """A corrupt entry inside the log stops the member from starting, naming the entry."""
        group = Group(self, lmdb_dirs=self.dirs)
        leader = group.leader()
        for i in range(5):
            leader.propose(b"k=%d" % i)
        group.run(1)
        victim = group.followers()[0].node_id
        group.stop(victim)
        self._damage(victim, 2, b"\x00\x00\x00\x00garbage")
        e = self.assertRaises(RaftStorageCorruption, group.start, victim)
        self.assertIn("log entry 2", str(e))

    def test_lmdb_one_transaction_per_ready(self) -> None:
        """On LMDB, the number of durable write transactions equals the number of batches."""
        group = Group(self, lmdb_dirs=self.dirs)
        leader = group.leader()
        for _ in range(5):
            for i in range(20):
                leader.propose(b"k=%d" % i)
            group.run(0.2)
        for node_id, driver in group.drivers.items():
            inner = group.storages[node_id].inner
            self.assertEqual(inner.commits, len(group.storages[node_id].saves))
            self.assertEqual(inner.commits, driver.batches)
        self.assertLess(group.storages[leader.node_id].inner.commits, 100)


class FramedTransportTests(SynchronousTestCase):
    """FramedRaftTransport encodes for any byte carrier and drops what it cannot decode."""

    def test_roundtrip(self) -> None:
        """A message sent on one side arrives, equal, on the other."""
        received: list[Any] = []
        b = FramedRaftTransport(lambda peer, payload: None)
        b.start(received.append)
        a = FramedRaftTransport(lambda peer, payload: b.deliver(payload))
        a.start(lambda m: None)
        message = Heartbeat(term=3, src="a", dst="b", commit=7, ctx=b"r1")
        a.send(message)
        self.assertEqual(received, [message])

    def test_malformed_dropped(self) -> None:
        """Garbage is logged and dropped, never raised into the carrier."""
        received: list[Any] = []
        t = FramedRaftTransport(lambda peer, payload: None)
        t.start(received.append)
        with capturedLogs() as events:
            t.deliver(b"\xc1garbage")
        self.assertEqual(received, [])
        self.assertEqual(len(events), 1)


class WorkerThreadTests(TestCase):
    """The driver's own worker threads on the real reactor (the production path)."""

    def test_single_member_on_threads(self) -> Deferred[None]:
        """A one-member group on LMDB with the default worker threads elects itself and commits."""
        from twisted.internet import reactor

        network = MemoryRaftNetwork(reactor)  # type: ignore[arg-type]
        machine = KVMachine()
        driver = RaftDriver(
            "solo",
            storage=LMDBRaftStorage(self.mktemp(), map_size=1 << 24),
            transport=network.transport("solo"),
            state_machine=machine,
            clock=reactor,
            reactor=reactor,
            bootstrap=Configuration(voters=frozenset({"solo"})),
            tick_interval=0.01,
            rng=random.Random(7),
        )
        driver.startService()

        async def scenario() -> None:
            for _ in range(300):
                if driver.is_leader:
                    break
                await task.deferLater(reactor, 0.01, lambda: None)  # type: ignore[arg-type]
            result = await driver.propose(b"a=1")
            self.assertIsNone(result)
            self.assertEqual(machine.data, {"a": "1"})
            await driver.stopService()

        return Deferred.fromCoroutine(scenario())

    def test_corrupt_storage_stops_nothing_running(self) -> None:
        """A member whose storage is corrupt refuses to start and leaves no thread behind."""
        from twisted.internet import reactor

        path = self.mktemp()
        storage = LMDBRaftStorage(path, map_size=1 << 24)
        storage.load()
        storage.save(HardState(1, "solo", 0), [], None)
        storage.close()
        env = lmdb.open(path, max_dbs=4, map_size=1 << 24)
        with env.begin(write=True, db=env.open_db(b"meta")) as txn:
            txn.put(b"hard_state", b"\x00\x00\x00\x00bad")
        env.close()
        driver = RaftDriver(
            "solo",
            storage=LMDBRaftStorage(path, map_size=1 << 24),
            transport=MemoryRaftNetwork(reactor).transport("solo"),  # type: ignore[arg-type]
            state_machine=KVMachine(),
            clock=reactor,
            reactor=reactor,
            bootstrap=Configuration(voters=frozenset({"solo"})),
        )
        self.assertRaises(RaftStorageCorruption, driver.startService)
        self.assertFalse(driver.running)
        self.assertIsNone(driver._pool)


def _settle(group: Group, d: Deferred[Any], seconds: float = 2.0) -> Deferred[Any]:
    """Run the group for a while and hand back ``d`` (fired by then)."""
    group.run(seconds)
    return d

