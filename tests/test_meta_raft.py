# -*- test-case-name: tests.test_meta_raft -*-
"""The namespace behind Raft, in one process: RaftCommandLog members on a simulated clock and
an in-memory network (dogfs.meta.raftlog), and Raft peers over real DogFS connections on
loopback (dogfs.raft.wire_transport)."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from typing import Any

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from dogfs.interfaces import ICommandLog
from dogfs.meta import commands as c
from dogfs.meta.raftlog import (
    MemberBook,
    NamespaceMachine,
    RaftCommandLog,
    member_record,
    raft_mode,
)
from dogfs.meta.state import NamespaceState
from dogfs.raft.core import Configuration, HardState, RaftNode, RaftOptions
from dogfs.raft.driver import RaftDriver
from dogfs.raft.storage import MemoryRaftStorage
from dogfs.raft.transport import MemoryRaftNetwork
from dogfs.wire.protocol import WireError

IDS = ("m1", "m2", "m3")


def run_now(f: Any) -> defer.Deferred[Any]:
    """Perform storage writes synchronously (tests only)."""
    return defer.maybeDeferred(f)


class Group:
    """Metadata members (LMDB namespace, in-memory Raft storage) on one clock and network."""

    def __init__(
        self, case: SynchronousTestCase, ids: tuple[str, ...] = IDS, *, snapshot_every: int | None = None
    ) -> None:
        self.case = case
        self.clock = task.Clock()
        self.network = MemoryRaftNetwork(self.clock)
        self.ids = ids
        self.snapshot_every = snapshot_every
        self.root = tempfile.mkdtemp(prefix="dogfs-meta-raft-")
        case.addCleanup(shutil.rmtree, self.root, True)  # after stop_all (cleanups run LIFO)
        self.storages: dict[str, MemoryRaftStorage] = {}
        self.logs: dict[str, RaftCommandLog] = {}
        self.states: dict[str, NamespaceState] = {}
        self.contact: dict[str, dict[str, float]] = {}
        self.starts = 0
        for i in ids:
            self.start(i, Configuration(voters=frozenset(ids)))
        case.addCleanup(self.stop_all)

    def address(self, node_id: str) -> str:
        return f"127.0.0.1:{7000 + int(node_id[1:])}"

    def start(self, node_id: str, bootstrap: Configuration | None = None) -> RaftCommandLog:
        """(Re)start a member on its stored log and namespace."""
        state = NamespaceState(os.path.join(self.root, node_id, "ns"), durable=False, map_size=1 << 26)
        state.open()
        book = MemberBook(
            os.path.join(self.root, node_id, "members.json"), {i: self.address(i) for i in self.ids}
        )
        machine = NamespaceMachine(state, book)
        seen = self.contact.setdefault(node_id, {})
        transport = self.network.transport(node_id)
        self.starts += 1
        driver = RaftDriver(
            node_id,
            storage=self.storages.setdefault(node_id, MemoryRaftStorage()),
            transport=transport,
            state_machine=machine,
            clock=self.clock,
            bootstrap=bootstrap or Configuration(voters=frozenset()),
            options=RaftOptions(election_tick=10),
            tick_interval=0.05,
            rng=random.Random(f"{node_id}-{self.starts}"),
            executor=run_now,
            snapshot_every=self.snapshot_every,
            operation_timeout=3.0,
        )
        log = RaftCommandLog(
            driver, machine, clock=self.clock, node_id=node_id, address=self.address(node_id),
            last_contact=seen.get, contact_window=1.0,
        )
        driver.startService()
        # Note contact times as messages arrive (what WireRaftTransport does for real).
        receive = transport.receiver
        assert receive is not None

        def noted(message: Any) -> None:
            seen[message.src] = self.clock.seconds()
            receive(message)

        transport.receiver = noted
        self.logs[node_id], self.states[node_id] = log, state
        return log

    def stop(self, node_id: str) -> None:
        log = self.logs[node_id]
        if log.driver.running:
            self.case.successResultOf(log.driver.stopService())
        self.states[node_id].close()

    def stop_all(self) -> None:
        for i in list(self.logs):
            self.stop(i)

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / 0.05)):
            self.clock.advance(0.05)

    def leader(self, within: float = 10.0) -> RaftCommandLog:
        for _ in range(round(within / 0.05)):
            leaders = [g for g in self.logs.values() if g.driver.running and g.is_leader]
            if len(leaders) == 1:
                return leaders[0]
            self.run(0.05)
        raise AssertionError("no single leader elected")

    def settle(self, d: defer.Deferred[Any], within: float = 10.0) -> Any:
        """Run the clock until ``d`` fires; its result (a failure raises in the test)."""
        for _ in range(round(within / 0.05)):
            if d.called:
                break
            self.run(0.05)
        return self.case.successResultOf(d)

    def failure(self, d: defer.Deferred[Any], within: float = 10.0) -> Any:
        for _ in range(round(within / 0.05)):
            if d.called:
                break
            self.run(0.05)
        return self.case.failureResultOf(d)


class RaftCommandLogTests(SynchronousTestCase):
    """The namespace replicated through RaftCommandLog members."""

    def test_interface(self) -> None:
        """RaftCommandLog provides ICommandLog."""
        group = Group(self)
        self.assertTrue(verifyObject(ICommandLog, group.leader()))

    def test_mutations_replicate(self) -> None:
        """Commands proposed at the leader are applied on every member: equal namespaces."""
        group = Group(self)
        leader = group.leader()
        group.settle(leader.propose(c.Mkdir("/a", False, None, now=1.0)))
        group.settle(leader.propose(c.Sessioned("client", 1, c.Mkdir("/a/b", False, None, now=2.0))))
        group.run(1.0)
        digests = {i: group.states[i].digest() for i in IDS}
        self.assertEqual(len(set(digests.values())), 1, digests)
        for i in IDS:
            self.assertIsInstance(group.states[i].stat("/a/b"), c.DirInfo)

    def test_caught_up(self) -> None:
        """caught_up: only a leader that has committed an entry of its own term and applied
        up to it (its state then holds everything acknowledged before its election)."""
        group = Group(self)
        leader = group.leader()
        group.run(1.0)
        self.assertTrue(leader.caught_up())
        followers = [g for i, g in group.logs.items() if g is not leader]
        self.assertEqual([g.caught_up() for g in followers], [False, False])

        class Node:
            def __init__(self, terms: dict[int, int]) -> None:
                self.terms = terms

            def term_at(self, index: int) -> int | None:
                return self.terms.get(index)

        class Driver:
            is_leader = True
            term = 3
            commit_index = 10
            applied_index = 10
            node = Node({10: 3})

        stub = object.__new__(RaftCommandLog)
        stub.driver = Driver()  # type: ignore[assignment]
        self.assertTrue(stub.caught_up())
        Driver.applied_index = 9  # committed, not yet applied here
        self.assertFalse(stub.caught_up())
        Driver.applied_index = 10
        Driver.node = Node({10: 2})  # the commit index is still the last leader's
        self.assertFalse(stub.caught_up())

    def test_retried_session_applies_once(self) -> None:
        """A retried Sessioned command gets the first answer and changes nothing more."""
        group = Group(self)
        leader = group.leader()
        first = group.settle(leader.propose(c.Sessioned("cl", 1, c.Mkdir("/x", False, None, now=1.0))))
        again = group.settle(leader.propose(c.Sessioned("cl", 1, c.Mkdir("/x", False, None, now=1.0))))
        self.assertIsInstance(first, c.DirInfo)
        self.assertEqual(first, again)
        plain = group.settle(leader.propose(c.Mkdir("/x", False, None, now=1.0)))
        self.assertIsInstance(plain, c.MetaError)

    def test_follower_redirects(self) -> None:
        """A follower refuses commands with not_leader naming the leader's address; its
        members() knows who leads; reads through the barrier see acknowledged writes."""
        group = Group(self)
        leader = group.leader()
        follower = next(g for g in group.logs.values() if g is not leader)
        with self.assertRaises(WireError) as caught:
            follower.require_leader()
        self.assertEqual(caught.exception.code, "not_leader")
        self.assertEqual(caught.exception.details["leader"], leader.address)
        failure = group.failure(follower.propose(c.Mkdir("/no", False, None, now=1.0)))
        self.assertEqual(failure.value.code, "not_leader")
        self.assertEqual(follower.leader_address(), leader.address)
        roles = {m["id"]: m["role"] for m in follower.members()}
        self.assertEqual(roles[leader.node_id], "leader")
        self.assertEqual(roles[follower.node_id], "follower")
        group.settle(leader.propose(c.Mkdir("/seen", False, None, now=1.0)))
        group.settle(follower.read_barrier())
        self.assertIsInstance(group.states[follower.node_id].stat("/seen"), c.DirInfo)
        # The leader knows how far each follower has replicated, for status pages.
        group.run(0.5)
        view = {m["id"]: m for m in leader.members()}
        mine = view[leader.node_id]
        self.assertEqual(view[follower.node_id]["term"], mine["term"])
        self.assertEqual(view[follower.node_id]["commit_index"], mine["commit_index"])

    def test_no_quorum(self) -> None:
        """A leader cut from both peers stops acknowledging: its proposal fails with
        no_quorum (not applied anywhere), reads fail the same way, and once the network heals
        the group serves again and nothing acknowledged is missing."""
        group = Group(self)
        leader = group.leader()
        group.settle(leader.propose(c.Mkdir("/kept", False, None, now=1.0)))
        group.network.isolate(leader.node_id)
        d = leader.propose(c.Mkdir("/lost", False, None, now=2.0))
        failure = group.failure(d, within=5.0)
        self.assertEqual(failure.value.code, "no_quorum")
        self.assertIn("no quorum", failure.value.message)
        read = group.failure(leader.read_barrier(), within=5.0)
        self.assertEqual(read.value.code, "no_quorum")
        group.network.heal()
        new = group.leader()
        group.settle(new.propose(c.Mkdir("/after", False, None, now=3.0)))
        group.run(1.0)
        for i in IDS:
            self.assertIsInstance(group.states[i].stat("/kept"), c.DirInfo)
            self.assertIsInstance(group.states[i].stat("/after"), c.DirInfo)

    def test_catch_up_from_snapshot(self) -> None:
        """A member down for many commits (the log compacted meanwhile) comes back, gets a
        snapshot and ends with the same namespace; the others kept serving meanwhile."""
        group = Group(self, snapshot_every=50)
        leader = group.leader()
        lagging = next(i for i in IDS if i != leader.node_id)
        group.stop(lagging)
        for n in range(300):
            group.settle(leader.propose(c.Mkdir(f"/d{n}", False, None, now=float(n))))
        group.start(lagging, Configuration(voters=frozenset(IDS)))
        group.run(3.0)
        self.assertEqual(group.states[lagging].digest(), group.states[leader.node_id].digest())
        snapshot_index: Any = group.logs[lagging].driver.status()["snapshot_index"]
        self.assertGreater(snapshot_index, 0)

    def test_member_rebuilds_a_torn_namespace(self) -> None:
        """A member whose machine went down with namespace commits unsynced sets the torn
        namespace aside when it comes back, and rebuilds it from its Raft snapshot and log."""
        from dogfs.meta import state as state_module

        group = Group(self, snapshot_every=50)
        leader = group.leader()
        for n in range(120):
            group.settle(leader.propose(c.Mkdir(f"/d{n}", False, None, now=float(n))))
        victim = next(i for i in IDS if i != leader.node_id)
        group.run(1.0)
        self.assertEqual(group.states[victim].digest(), group.states[leader.node_id].digest())
        # The machine goes down: the member stops, its namespace is neither synced nor closed.
        self.successResultOf(group.logs[victim].driver.stopService())
        torn = group.states[victim]
        assert torn._env is not None
        torn._env.close()
        torn._env = None
        self.patch(state_module, "_boot_id", lambda: "the-next-boot")
        group.start(victim, Configuration(voters=frozenset(IDS)))
        self.assertLess(group.states[victim].applied_index, 120)  # it started over
        group.run(3.0)
        self.assertEqual(group.states[victim].digest(), group.states[leader.node_id].digest())
        self.assertEqual(len([n for n in os.listdir(os.path.join(group.root, victim)) if ".torn-" in n]), 1)

    def test_add_learner_promote_remove(self) -> None:
        """A fourth member joins as a learner (its address goes through the log), catches up
        from a snapshot, is promoted; removing the leader hands leadership over first."""
        group = Group(self, snapshot_every=20)
        leader = group.leader()
        for n in range(60):
            group.settle(leader.propose(c.Mkdir(f"/d{n}", False, None, now=float(n))))
        group.start("m4")  # joins: no bootstrap configuration
        self.assertEqual(group.settle(leader.add_learner("m4", group.address("m4"))), "added")
        group.run(2.0)
        self.assertEqual(group.states["m4"].digest(), group.states[leader.node_id].digest())
        self.assertEqual(group.logs["m4"].driver.role, "learner")
        group.settle(leader.promote("m4"))
        group.run(1.0)
        cfg = leader.driver.config
        assert cfg is not None
        self.assertIn("m4", cfg.voters)
        for i in group.logs:
            self.assertEqual(group.logs[i].book.address("m4"), group.address("m4"))
        # Removing the leader: it hands over and redirects to the new leader.
        failure = group.failure(leader.remove(leader.node_id))
        self.assertEqual(failure.value.code, "not_leader")
        new = group.leader()
        self.assertNotEqual(new.node_id, leader.node_id)
        group.settle(new.remove(leader.node_id))
        group.run(1.0)
        cfg = new.driver.config
        assert cfg is not None
        self.assertNotIn(leader.node_id, cfg.members())
        group.settle(new.propose(c.Mkdir("/after", False, None, now=1.0)))

    def test_lead_hands_leadership_over(self) -> None:
        """`admin meta lead`: the leader hands over to the voter named, says so when it leads
        already, and refuses a node that is not a voter; the group serves under the new one."""
        group = Group(self)
        leader = group.leader()
        target = next(i for i in IDS if i != leader.node_id)
        self.assertEqual(group.settle(leader.lead(leader.node_id)), "leader")
        with self.assertRaises(WireError) as raised:
            leader.lead("m9")
        self.assertEqual(raised.exception.code, "invalid_argument")
        self.assertIn("not a voter", raised.exception.message)
        self.assertEqual(group.settle(leader.lead(target)), "moved")
        self.assertEqual(group.leader().node_id, target)
        group.settle(group.logs[target].propose(c.Mkdir("/under-new", False, None, now=1.0)))

    def test_removed_member_says_so_at_once(self) -> None:
        """A member removed from the group but still running (restarted on its old config,
        say) answers commands and reads at once that it is no longer a member, sending the
        client elsewhere, instead of "no quorum" after a timeout; its status says removed."""
        group = Group(self)
        leader = group.leader()
        gone = next(i for i in group.logs if i != leader.node_id)
        group.settle(leader.remove(gone))
        group.run(1.0)
        removed = group.logs[gone]
        self.assertTrue(removed.removed)
        self.assertFalse(leader.removed)
        with self.assertRaises(WireError) as e:
            removed.require_leader()
        self.assertEqual(e.exception.code, "not_leader")
        self.assertIn("no longer a member", e.exception.message)
        error = self.failureResultOf(removed.read_barrier(), WireError).value
        self.assertIn("no longer a member", error.message)
        own = next(m for m in removed.members() if m["id"] == gone)
        self.assertEqual(own["role"], "removed")

    def test_membership_mistakes_refused(self) -> None:
        """Promoting an id that is not a learner (a typo, a learner removed meanwhile) is
        refused: a voter no node answers for would raise the quorum for good. Adding a
        member's id at another address is refused too: a fresh node would take over its vote
        with none of its log. Neither changes the configuration or the address book."""
        group = Group(self)
        leader = group.leader()
        before = leader.driver.config
        with self.assertRaises(WireError) as e:
            leader.promote("ghost")
        self.assertEqual(e.exception.code, "invalid_argument")
        self.assertIn("ghost is not a learner", e.exception.message)
        with self.assertRaises(WireError) as e:
            leader.add_learner("m2", "127.0.0.1:9999")
        self.assertEqual(e.exception.code, "invalid_argument")
        self.assertIn("m2 is already a member", e.exception.message)
        group.run(0.5)
        self.assertEqual(leader.driver.config, before)
        for log in group.logs.values():
            self.assertEqual(log.book.address("m2"), group.address("m2"))
        # The same address is no mistake: it answers what the member is.
        self.assertEqual(group.settle(leader.add_learner("m2", group.address("m2"))), "voter")

    def test_command_too_large_for_the_log_refused(self) -> None:
        """A command whose AppendEntries could not fit in a frame is refused at once, with
        its size: proposed, every follower would drop the leader's connection and elect
        another, again at every retry."""
        from dogfs.meta.raftlog import MAX_ENTRY_BYTES

        group = Group(self)
        leader = group.leader()
        huge = c.CommitFile("/big", 0, tuple((2**40 + i, 2**40) for i in range(MAX_ENTRY_BYTES // 16)))
        error = self.failureResultOf(leader.propose(huge), WireError).value
        self.assertEqual(error.code, "invalid_argument")
        self.assertIn("larger than the log takes", error.message)
        term = leader.driver.term
        group.settle(leader.propose(c.Mkdir("/fine", False, None, now=1.0)))
        self.assertEqual(leader.driver.term, term)

    def test_writes_without_quorum_say_so(self) -> None:
        """A command sent to a member that knows no leader because most members are gone is
        refused with no_quorum naming the count, not a bare "not the leader"."""
        group = Group(self)
        leader = group.leader()
        survivor = next(i for i in group.logs if i != leader.node_id)
        for i in list(group.logs):
            if i != survivor:
                group.stop(i)
        group.run(3.0)
        from dogfs.meta.service import MetaHandlers

        handlers = MetaHandlers.__new__(MetaHandlers)
        handlers.log = group.logs[survivor]
        with self.assertRaises(WireError) as e:
            handlers._require_leader()
        self.assertEqual(e.exception.code, "no_quorum")
        self.assertIn("1 of 3 members reachable", e.exception.message)

    def test_member_record_and_snapshot_round_trip(self) -> None:
        """Member records update the address book; a snapshot carries book and namespace."""
        group = Group(self)
        leader = group.leader()
        group.settle(leader.propose(member_record("m9", "10.0.0.9:1", "10.0.0.9:2")))
        group.run(0.5)
        for g in group.logs.values():
            self.assertEqual(g.book.address("m9"), "10.0.0.9:1")
            self.assertEqual(g.book.http_address("m9"), "10.0.0.9:2")
        data = leader.machine.snapshot()
        other = NamespaceState(os.path.join(group.root, "other"), durable=False, map_size=1 << 24)
        other.open()
        self.addCleanup(other.close)
        machine = NamespaceMachine(other, MemberBook(None, {}))
        from dogfs.raft.core import Snapshot, SnapshotMeta

        machine.restore(Snapshot(SnapshotMeta(99, 3, Configuration(frozenset(IDS))), data))
        self.assertEqual(machine.book.address("m9"), "10.0.0.9:1")
        self.assertEqual(other.applied_index, 99)
        with self.assertRaises(ValueError):
            machine.restore(Snapshot(SnapshotMeta(99, 3, Configuration(frozenset(IDS))), b"junk"))

    def test_batch_with_member_record_applies_every_command(self) -> None:
        """A batch mixing commands and a member record applies every command (none is taken
        for a replay because the record came first) and gives each entry its own result, the
        same as applying them one by one."""
        from dogfs.raft.core import Entry, EntryKind

        def machine(name: str) -> NamespaceMachine:
            state = NamespaceState(os.path.join(self.mktemp(), name), durable=False, map_size=1 << 24)
            state.open()
            self.addCleanup(state.close)
            return NamespaceMachine(state, MemberBook(None, {}))

        datas = [
            c.encode_command(c.Mkdir("/a", now=1.0)),
            member_record("m9", "10.0.0.9:1"),
            c.encode_command(c.Mkdir("/a/b", now=1.0)),
            c.encode_command(c.Mkdir("/a", now=1.0)),
        ]
        entries = [Entry(index=i + 5, term=2, kind=EntryKind.NORMAL, data=d) for i, d in enumerate(datas)]
        batched, single = machine("batched"), machine("single")
        results = batched.apply_batch(entries)
        self.assertEqual(results, [single.apply(e) for e in entries])
        self.assertIsInstance(results[0], c.DirInfo)
        self.assertEqual(results[1], c.Ok())
        self.assertIsInstance(results[2], c.DirInfo)
        self.assertEqual(results[3].code, c.ErrorCode.EXISTS)
        self.assertEqual(batched.book.address("m9"), "10.0.0.9:1")
        self.assertEqual(batched.applied_index(), 8)
        self.assertEqual(batched.state.dump(), single.state.dump())

    def test_leadership_listeners_and_announcement(self) -> None:
        """watch() tells listeners when this member gains or loses leadership, and a new
        leader announces its addresses (dashboard included) to every member through the log."""
        group = Group(self)
        leader = group.leader()
        leader.http_address = "127.0.0.1:9999"
        heard: list[bool] = []
        leader.on_leadership.append(heard.append)
        leader.watch()
        leader.watch()
        self.assertEqual(heard, [True])
        group.run(1.0)
        for g in group.logs.values():
            self.assertEqual(g.book.http_address(leader.node_id), "127.0.0.1:9999")
        group.network.isolate(leader.node_id)
        group.run(3.0)
        leader.watch()
        self.assertEqual(heard, [True, False])

    def test_raft_mode(self) -> None:
        """Raft runs with several peers, or when joining (own id not among the peers)."""

        class Config:
            def __init__(self, node_id: str, peers: dict[str, str]) -> None:
                self.id, self.peers = node_id, peers

        self.assertFalse(raft_mode(Config("a", {"a": "x:1"})))
        self.assertTrue(raft_mode(Config("a", {"a": "x:1", "b": "x:2"})))
        self.assertTrue(raft_mode(Config("c", {"a": "x:1", "b": "x:2"})))

    def test_cut_off_member_refuses_reads_at_once(self) -> None:
        """A member that still names a leader it has not heard from within the contact window
        (a learner never campaigns, so it keeps that name) and hears from no majority answers
        a read with no_quorum at once instead of retrying for read_timeout; one that hears
        its leader forwards the read."""

        class Driver:
            is_leader = False
            leader_hint = "m1"
            config = Configuration(voters=frozenset(IDS), learners=frozenset({"m4"}))
            asked = 0

            def read_index(self) -> defer.Deferred[None]:
                Driver.asked += 1
                return defer.Deferred()  # forwarded; the answer would come later

        clock = task.Clock()
        clock.advance(100)
        heard = {"m1": 99.0}
        state = NamespaceState(self.mktemp(), durable=False)
        state.open()
        self.addCleanup(state.close)
        log = RaftCommandLog(
            Driver(), NamespaceMachine(state, MemberBook(None, {})), clock=clock, node_id="m4", address="a:4",  # type: ignore[arg-type]
            last_contact=heard.get, read_timeout=5.0,
        )
        pending = log.read_barrier()
        self.assertNoResult(pending)
        self.assertEqual(Driver.asked, 1)
        clock.advance(3.0)  # m1 silent for 4 s, past the 2 s contact window
        error = self.failureResultOf(pending, WireError).value  # at the next retry, not at 5 s
        self.assertEqual(error.code, "no_quorum")
        self.assertIn("0 of 3 members reachable from m4", error.message)  # a learner counts no vote
        self.assertIn("out of reach", error.message)
        self.failureResultOf(log.read_barrier(), WireError)
        self.assertEqual(Driver.asked, 1)  # refused without forwarding


class WireTransportTests(TestCase):
    """Raft messages over real DogFS connections on loopback."""

    def test_envelopes_delivered(self) -> defer.Deferred[None]:
        """A message sent by one WireRaftTransport arrives at the other's driver callback
        through its listening port; contact times are noted; unknown peers are dropped."""
        from twisted.internet import reactor

        from dogfs.raft.core import TimeoutNow
        from dogfs.raft.wire_transport import WireRaftTransport
        from dogfs.wire import messages as m
        from dogfs.wire.pool import ConnectionFactory, tcp_endpoints

        addresses: dict[str, str] = {}
        a = WireRaftTransport(reactor, tcp_endpoints(reactor), node_id="a", address_of=addresses.get)
        b = WireRaftTransport(reactor, tcp_endpoints(reactor), node_id="b", address_of=addresses.get)
        got: list[Any] = []
        arrived: defer.Deferred[None] = defer.Deferred()

        def receive(message: Any) -> None:
            got.append(message)
            if not arrived.called:
                arrived.callback(None)

        b.start(receive)
        a.start(lambda message: None)
        factory = ConnectionFactory(reactor, {m.RaftEnvelope: b.handle_envelope}, node_id="b")
        listener: Any = reactor
        port = listener.listenTCP(0, factory, interface="127.0.0.1")
        addresses["b"] = f"127.0.0.1:{port.getHost().port}"

        def cleanup() -> defer.Deferred[Any]:
            a.stop()
            b.stop()
            for conn in list(factory.connections):
                conn.close()
            return defer.maybeDeferred(port.stopListening)

        self.addCleanup(cleanup)
        a.send(TimeoutNow(5, "a", "nobody"))
        self.assertEqual(a.dropped, 1)
        a.send(TimeoutNow(5, "a", "b"))
        a.send(TimeoutNow(6, "a", "b"))

        def check(_: Any) -> None:
            self.assertEqual(got[0].term, 5)
            self.assertIsNotNone(b.last_contact("a"))
            self.assertIsNone(b.last_contact("c"))

        return arrived.addCallback(check)


class EnvelopeSenderTests(SynchronousTestCase):
    """Over TLS a Raft message must come from the member its connection authenticated as."""

    def test_message_from_another_source_is_dropped(self) -> None:
        """An envelope whose message claims a source other than the connection's node
        certificate is dropped and counted; one from its own name is delivered; without an
        identity (plaintext) the source is taken as given."""
        from dogfs.raft.core import TimeoutNow, encode_message
        from dogfs.raft.wire_transport import WireRaftTransport
        from dogfs.security.roles import Identity, Role
        from dogfs.wire import messages as m

        members = {"m2": "127.0.0.1:7002", "m3": "127.0.0.1:7003"}
        transport = WireRaftTransport(task.Clock(), lambda address: None, node_id="m1", address_of=members.get)  # type: ignore[arg-type]
        got: list[Any] = []
        transport.start(got.append)

        class Conn:
            def __init__(self, identity: Identity | None) -> None:
                self.identity = identity

        class Request:
            def __init__(self, identity: Identity | None, src: str) -> None:
                self.connection = Conn(identity)
                self.msg = m.RaftEnvelope("meta")
                self.payload = encode_message(TimeoutNow(term=5, src=src, dst="m1"))

        chunk = Identity("chunk-1", Role.NODE, 3)
        transport.handle_envelope(Request(Identity("m3", Role.NODE, 5), "m2"))  # type: ignore[arg-type]
        self.assertEqual((got, transport.forged), ([], 1))
        transport.handle_envelope(Request(chunk, "m2"))  # type: ignore[arg-type]
        self.assertEqual((got, transport.forged), ([], 1))  # not a member: dropped before
        transport.handle_envelope(Request(Identity("m2", Role.NODE, 4), "m2"))  # type: ignore[arg-type]
        transport.handle_envelope(Request(None, "m3"))  # type: ignore[arg-type]
        self.assertEqual([msg.src for msg in got], ["m2", "m3"])
        self.assertEqual(transport.forged, 1)
        # A node certificate outside the group (a chunk server's) sending in its own name:
        # dropped, however often, and logged once.
        transport.handle_envelope(Request(chunk, "chunk-1"))  # type: ignore[arg-type]
        transport.handle_envelope(Request(chunk, "chunk-1"))  # type: ignore[arg-type]
        self.assertEqual([msg.src for msg in got], ["m2", "m3"])
        self.assertEqual(transport.outsiders, {"chunk-1"})

    def test_members_of_the_configuration_are_heard(self) -> None:
        """A metadata node's transport hears the members its book knows and those of the
        group's configuration (one added at run time), and no one else."""
        from dogfs.config import MetaConfig
        from dogfs.meta.raftlog import build_raft_log
        from dogfs.raft.core import TimeoutNow, encode_message
        from dogfs.security.roles import Identity, Role
        from dogfs.wire import messages as m

        clock = task.Clock()
        config = MetaConfig(
            id="meta-1", listen="tcp:0", address="127.0.0.1:7001", data_dir=self.mktemp(),
            peers={"meta-1": "127.0.0.1:7001", "meta-2": "127.0.0.1:7002"},
        )
        state = NamespaceState(os.path.join(config.data_dir, "ns"), durable=False)
        state.open()
        self.addCleanup(state.close)
        raft_log = build_raft_log(clock, config, state, lambda address: None)
        transport = raft_log.transport
        self.assertTrue(transport.is_member("meta-2"))
        self.assertFalse(transport.is_member("chunk-1"))
        self.assertFalse(transport.is_member("meta-4"))
        # Running, with meta-4 added to the configuration (its member record not yet here).
        driver = raft_log.driver
        driver._node = RaftNode(
            "meta-1", RaftOptions(), hard_state=HardState(1, None, 0), snapshot=None, entries=[],
            config=Configuration(voters=frozenset({"meta-1", "meta-2", "meta-4"})),
            applied=0, rng=random.Random(1),
        )
        driver.running = True
        self.addCleanup(setattr, driver, "running", False)
        self.assertTrue(transport.is_member("meta-4"))
        self.assertFalse(transport.is_member("chunk-1"))
        delivered: list[Any] = []
        transport.start(delivered.append)
        envelope = type("Envelope", (), {})()
        envelope.msg = m.RaftEnvelope("meta")
        for name in ("chunk-1", "meta-4"):
            envelope.connection = type("Conn", (), {"identity": Identity(name, Role.NODE, 1)})()
            envelope.payload = encode_message(TimeoutNow(term=5, src=name, dst="meta-1"))
            transport.handle_envelope(envelope)
        self.assertEqual([message.src for message in delivered], ["meta-4"])
