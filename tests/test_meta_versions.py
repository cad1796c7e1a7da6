"""Rolling upgrades of a metadata group: log versions (dogfs.meta.versions), in the state
machine, on the leader, and in the handlers."""

from __future__ import annotations

import os

import msgpack
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dogfs.config import MetaConfig
from dogfs.meta import commands as c
from dogfs.meta import state as state_module
from dogfs.meta.commands import (
    LOG_VERSION,
    ErrorCode,
    MetaError,
    Mkdir,
    Ok,
    Sessioned,
    SetLogVersion,
)
from dogfs.meta.state import LogVersionError, NamespaceState
from dogfs.meta.versions import LogVersionKeeper
from dogfs.wire import messages as m
from dogfs.wire.protocol import WireError
from tests.test_meta_service import Harness


class StateTests(SynchronousTestCase):
    """The group's log version in the replicated state."""

    def setUp(self) -> None:
        self.index = 0
        self.path = self.mktemp()
        self.state = self.open(self.path)

    def open(self, path: str) -> NamespaceState:
        state = NamespaceState(path, durable=False, map_size=1 << 26)
        state.open()
        self.addCleanup(state.close)
        return state

    def apply(self, command: object, state: NamespaceState | None = None) -> object:
        self.index += 1
        return (state or self.state).apply(self.index, command)  # type: ignore[arg-type]

    def test_rises_and_never_falls(self) -> None:
        """A namespace starts at 0 (as one of a release before log versions reads); the version
        rises with SetLogVersion and a lower one changes nothing."""
        self.assertEqual(self.state.log_version(), 0)
        self.assertEqual(self.apply(SetLogVersion(LOG_VERSION)), Ok())
        self.assertEqual(self.state.log_version(), LOG_VERSION)
        self.assertEqual(self.apply(SetLogVersion(0)), Ok())
        self.assertEqual(self.state.log_version(), LOG_VERSION)

    def test_version_beyond_this_release_halts(self) -> None:
        """A SetLogVersion above what this release applies is not applied, and neither is
        anything in its batch: apply raises (the Raft member halts rather than diverge)."""
        before = self.state.applied_index
        with self.assertRaises(LogVersionError) as raised:
            self.state.apply_batch([(1, Mkdir("/a")), (2, SetLogVersion(LOG_VERSION + 1))])
        self.assertIn(f"applies up to {LOG_VERSION}", str(raised.exception))
        self.assertIn("Upgrading", str(raised.exception))
        self.assertEqual(self.state.applied_index, before)
        self.assertEqual(self.state.log_version(), 0)
        self.assertEqual(self.state.stat("/a").code, ErrorCode.NOT_FOUND)  # type: ignore[union-attr]

    def test_unknown_command_halts(self) -> None:
        """An entry whose command type this release does not know (a later release's leader
        proposed it) halts the member, bare or in a session; a malformed command of a type it
        knows is still an error result, the same on every member."""
        unknown = msgpack.packb([60, "x"])
        with self.assertRaises(LogVersionError) as raised:
            self.state.apply(1, unknown)
        self.assertIn("Entry 1", str(raised.exception))
        with self.assertRaises(LogVersionError):
            self.state.apply(1, msgpack.packb([c.tag_of(Sessioned), "client-a", 1, [60, "x"], 0.0]))
        self.assertEqual(self.state.applied_index, 0)
        result = self.state.apply(1, msgpack.packb([c.tag_of(Mkdir), 5]))
        self.assertIsInstance(result, MetaError)
        self.assertEqual(result.code, ErrorCode.INVALID_ARGUMENT)  # type: ignore[union-attr]
        self.assertNotIsInstance(c.UnknownCommand("x"), LogVersionError)
        with self.assertRaises(c.UnknownCommand):
            c.decode_command(unknown)

    def later_release(self, version: int) -> None:
        """Make this process a release that applies ``version``, with Mkdir new in it."""
        self.patch(c, "LOG_VERSION", version)
        self.patch(state_module, "LOG_VERSION", version)
        self.patch(c, "_SINCE", {**c._SINCE, Mkdir: version})

    def test_command_waits_for_its_version(self) -> None:
        """A command newer than the group's log version is refused (the same on every member)
        until the version is raised; then it applies."""
        self.later_release(LOG_VERSION + 1)
        refused = self.apply(Mkdir("/a"))
        self.assertIsInstance(refused, MetaError)
        self.assertEqual(refused.code, ErrorCode.VERSION_MISMATCH)  # type: ignore[union-attr]
        self.assertIn(f"needs metadata log version {LOG_VERSION + 1}", refused.message)  # type: ignore[union-attr]
        self.assertEqual(self.state.stat("/a").code, ErrorCode.NOT_FOUND)  # type: ignore[union-attr]
        self.assertEqual(self.apply(SetLogVersion(LOG_VERSION + 1)), Ok())
        self.assertEqual(self.apply(Mkdir("/a")).path, "/a")  # type: ignore[attr-defined]

    def test_state_of_a_later_release_refused(self) -> None:
        """A namespace or snapshot that a later release's group wrote is refused, naming it,
        at open and at load; the state loaded into is left as it was."""
        self.later_release(LOG_VERSION + 2)
        self.apply(SetLogVersion(LOG_VERSION + 2))
        dump = self.state.dump()
        self.state.close()
        self.patch(state_module, "LOG_VERSION", LOG_VERSION)
        again = NamespaceState(self.path, durable=False, map_size=1 << 26)
        with self.assertRaises(LogVersionError) as raised:
            again.open()
        self.assertIn(self.path, str(raised.exception))
        self.assertIn(f"log version {LOG_VERSION + 2}", str(raised.exception))
        other = self.open(self.mktemp())
        self.apply(c.SetClusterId("kept"), other)
        with self.assertRaises(LogVersionError):
            other.load(dump, applied_index=50)
        self.assertEqual(other.cluster_id(), "kept")
        self.assertEqual(other.log_version(), 0)


class KeeperTests(SynchronousTestCase):
    """The leader raises the group's version once every member applies it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.group = 0
        self.leading = True
        self.answers: dict[str, defer.Deferred[int] | int | Exception] = {"meta-2": LOG_VERSION, "meta-3": LOG_VERSION}
        self.asked: list[str] = []
        self.proposed: list[object] = []
        self.keeper = LogVersionKeeper(
            self.clock, lambda: self.group, lambda: list(self.answers), self.ask, self.propose,
            lambda: self.leading, interval=2.0,
        )

    def ask(self, member: str) -> defer.Deferred[int]:
        self.asked.append(member)
        answer = self.answers[member]
        if isinstance(answer, Exception):
            return defer.fail(answer)
        if isinstance(answer, defer.Deferred):
            return answer
        return defer.succeed(answer)

    def propose(self, command: object) -> defer.Deferred[object]:
        self.proposed.append(command)
        if isinstance(command, SetLogVersion):
            self.group = max(self.group, command.version)
        return defer.succeed(Ok())

    def check(self) -> object:
        return self.successResultOf(defer.Deferred.fromCoroutine(self.keeper.check()))

    def test_raised_when_every_member_applies_it(self) -> None:
        """Every member answers this release's version: it is proposed, once."""
        self.assertEqual(self.check(), LOG_VERSION)
        self.assertEqual(self.proposed, [SetLogVersion(LOG_VERSION)])
        self.assertEqual(self.keeper.known, {"meta-2": LOG_VERSION, "meta-3": LOG_VERSION})
        self.asked.clear()
        self.assertIsNone(self.check())
        self.assertEqual((self.proposed, self.asked), ([SetLogVersion(LOG_VERSION)], []))

    def test_not_raised_past_an_older_member(self) -> None:
        """A member of a release before log versions (0) holds the group where it is."""
        self.answers["meta-3"] = 0
        self.assertIsNone(self.check())
        self.assertEqual(self.proposed, [])
        self.assertEqual(self.keeper.known["meta-3"], 0)

    def test_not_raised_while_a_member_cannot_be_asked(self) -> None:
        """A member that cannot be asked might run an older release: nothing is proposed
        until it answers (the loop asks again every interval)."""
        self.answers["meta-2"] = WireError("unavailable", "down")
        self.keeper.start()
        self.addCleanup(self.keeper.stop)
        self.assertEqual(self.proposed, [])
        self.assertIsNone(self.keeper.known["meta-2"])
        self.answers["meta-2"] = LOG_VERSION
        self.clock.advance(2.0)
        self.assertEqual(self.proposed, [SetLogVersion(LOG_VERSION)])

    def test_only_a_leader_proposes(self) -> None:
        """A member that does not lead asks nobody; one that stops leading while it asks
        proposes nothing."""
        self.leading = False
        self.assertIsNone(self.check())
        self.assertEqual(self.asked, [])
        self.leading = True
        slow: defer.Deferred[int] = defer.Deferred()
        self.answers["meta-3"] = slow
        d = defer.Deferred.fromCoroutine(self.keeper.check())
        self.leading = False
        slow.callback(LOG_VERSION)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.proposed, [])

    def test_round_dropped_when_membership_or_leadership_changes(self) -> None:
        """A member added while a round asks (it was not asked), or a stop meanwhile, drops the
        round: nothing is proposed from answers that no longer cover the group."""
        slow: defer.Deferred[int] = defer.Deferred()
        self.answers["meta-3"] = slow
        d = defer.Deferred.fromCoroutine(self.keeper.check())
        self.answers["meta-4"] = 0
        slow.callback(LOG_VERSION)
        self.assertIsNone(self.successResultOf(d))
        del self.answers["meta-4"]
        slow = defer.Deferred()
        self.answers["meta-3"] = slow
        d = defer.Deferred.fromCoroutine(self.keeper.check())
        self.keeper.stop()
        slow.callback(LOG_VERSION)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.proposed, [])
        self.assertEqual(self.check(), LOG_VERSION)  # a whole round, undisturbed

    def test_stopped_loop_asks_no_more(self) -> None:
        """After stop, the loop asks nobody."""
        self.answers["meta-2"] = 0
        self.keeper.start()
        self.assertEqual(len(self.asked), 2)
        self.keeper.stop()
        self.clock.advance(10.0)
        self.assertEqual(len(self.asked), 2)


class HandlerTests(SynchronousTestCase):
    """What a metadata member answers about log versions."""

    def test_version_query(self) -> None:
        """Any member says what its release applies and what its group uses."""
        h = Harness(self, chunks=1)
        reply = h.ok(m.MetaQuery("version"))
        answer = msgpack.unpackb(bytes(reply.payload), raw=False)
        self.assertEqual(answer, {"log_version": LOG_VERSION, "group_log_version": 0})
        self.successResultOf(h.log.propose(SetLogVersion(LOG_VERSION)))
        answer = msgpack.unpackb(bytes(h.ok(m.MetaQuery("version")).payload), raw=False)
        self.assertEqual(answer["group_log_version"], LOG_VERSION)

    def test_command_of_a_later_version_refused_before_it_is_proposed(self) -> None:
        """A client's command that the group's log version does not allow yet is refused
        with a clear error, and nothing is proposed."""
        h = Harness(self, chunks=1)
        self.patch(c, "_SINCE", {**c._SINCE, Mkdir: LOG_VERSION + 1})
        before = h.state.applied_index
        error = self.failureResultOf(h.command(Mkdir("/a")), WireError).value
        self.assertEqual(error.code, "unsupported")
        self.assertIn("needs metadata log version", error.message)
        self.assertIn("log_version", error.message)
        self.assertEqual(h.state.applied_index, before)


class ServiceTests(TestCase):
    """A metadata daemon's service and the log version."""

    def test_single_node_raises_its_version(self) -> defer.Deferred[None]:
        """A lone metadata node (no other member to wait for) raises its namespace's log
        version to its release's once it starts."""
        from tests.test_meta_service import _started

        async def run() -> None:
            config = MetaConfig(id="meta-1", listen="tcp:0", address="127.0.0.1:1", data_dir=self.mktemp())
            service = await _started(config, lambda s: s.state.log_version() == LOG_VERSION)
            await service.stopService()

        return defer.Deferred.fromCoroutine(run())

    def test_namespace_of_a_later_release_stops_the_daemon(self) -> None:
        """A data directory that a later release's group wrote (a downgrade) stops the daemon
        with one sentence, before it serves anything."""
        from dogfs.meta.service import MetaService

        config = MetaConfig(id="meta-1", listen="tcp:0", address="127.0.0.1:1", data_dir=self.mktemp())
        self.patch(state_module, "LOG_VERSION", LOG_VERSION + 1)
        later = NamespaceState(os.path.join(config.data_dir, "namespace"), durable=True)
        later.open()
        later.apply(1, SetLogVersion(LOG_VERSION + 1))
        later.close()
        self.patch(state_module, "LOG_VERSION", LOG_VERSION)
        fatal: list[bool] = []
        listened: list[object] = []
        service = MetaService(
            Clock(), config, listen=lambda handlers: listened.append(handlers), on_fatal=lambda: fatal.append(True)
        )
        logged: list[dict[str, object]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        service.startService()
        self.assertEqual((fatal, listened), ([True], []))
        critical = [e for e in logged if e.get("log_level") == LogLevel.critical]
        self.assertEqual(len(critical), 1)
        self.assertIn(f"uses metadata log version {LOG_VERSION + 1}", str(critical[0]["error"]))


class AddMemberTests(SynchronousTestCase):
    """`dogfs admin meta add` and the log version."""

    def test_node_of_an_older_release_is_not_added(self) -> None:
        """A node whose release applies less than the group's log version is refused, naming
        both versions, and stays out of the group; one that cannot be asked yet is added (it
        halts at the first entry it cannot apply, should it be too old)."""
        from tests.test_meta_raft import Group

        group = Group(self)
        leader = group.leader()
        group.settle(leader.propose(SetLogVersion(LOG_VERSION)))
        asked: list[str] = []

        async def older(address: str) -> int:
            asked.append(address)
            return LOG_VERSION - 1

        leader._ask_version = older  # type: ignore[method-assign]
        failure = group.failure(leader.add_learner("m4", group.address("m4")))
        self.assertEqual(failure.value.code, "invalid_argument")
        self.assertIn(f"applies metadata log version {LOG_VERSION - 1}, below this group's {LOG_VERSION}", failure.value.message)
        self.assertEqual(asked, [group.address("m4")])
        cfg = leader.driver.config
        assert cfg is not None
        self.assertNotIn("m4", cfg.members())

        async def unreachable(address: str) -> int:
            raise WireError("unavailable", "connection refused")

        leader._ask_version = unreachable  # type: ignore[method-assign]
        group.start("m4")
        self.assertEqual(group.settle(leader.add_learner("m4", group.address("m4"))), "added")


class LaterFieldsTests(SynchronousTestCase):
    """A known command with fields this release does not know is a later release's."""

    def test_extra_fields_halt(self) -> None:
        """In the log, a command of a known type with more fields than this release knows
        halts the member (a leader of this release re-encodes what it proposes, so only a
        later release's leader writes such an entry); from a client it is a clear refusal."""
        state = NamespaceState(self.mktemp(), durable=False, map_size=1 << 26)
        state.open()
        self.addCleanup(state.close)
        later = msgpack.packb([c.tag_of(SetLogVersion), 1, "a later field"])
        with self.assertRaises(LogVersionError):
            state.apply(1, later)
        with self.assertRaises(c.UnknownCommand) as raised:
            c.decode_command(msgpack.packb([c.tag_of(Mkdir), "/a", False, None, 0.0, "x", "y"]))
        self.assertIn("more than this release knows", str(raised.exception))
        self.assertEqual((state.applied_index, state.log_version()), (0, 0))
