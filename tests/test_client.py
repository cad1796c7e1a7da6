# -*- test-case-name: tests.test_client -*-
"""Unit tests for dogfs.client.api: sessions, redirects and errors, on simulated time."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dogfs.client.api import (
    MAX_REDIRECTS,
    REDIRECT_PAUSE,
    SESSION_REUSE_LIMIT,
    DogFSClient,
    DogFSError,
)
from dogfs.client.transfer import Renewal
from dogfs.config import ClientConfig
from dogfs.meta import commands as c
from dogfs.wire import messages as m
from dogfs.wire.protocol import Reply, RequestTimeout, WireError


class FakeConnection:
    """Answers calls with a function of (address, message); records what it was sent."""

    def __init__(self, address: str, answer: Any, sent: list[tuple[str, Any]]) -> None:
        self.address = address
        self.answer = answer
        self.sent = sent

    def call(self, msg: Any, payload: bytes = b"", timeout: float | None = None) -> defer.Deferred[Reply]:
        self.sent.append((self.address, msg))
        return defer.maybeDeferred(self.answer, self.address, msg)


class FakePool:
    """A ConnectionPool stand-in: every address connects to a FakeConnection."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.sent: list[tuple[str, Any]] = []
        self.dropped: list[str] = []

    def get(self, address: str) -> defer.Deferred[FakeConnection]:
        return defer.succeed(FakeConnection(address, self.answer, self.sent))

    def open_connection(self, address: str) -> FakeConnection | None:
        return None if address in self.dropped else FakeConnection(address, self.answer, self.sent)

    def drop(self, address: str) -> None:
        self.dropped.append(address)

    def close_all(self) -> defer.Deferred[None]:
        return defer.succeed(None)


def client(answer: Any, meta: tuple[str, ...] = ("a:1", "b:1"), timeout: float = 5.0) -> tuple[DogFSClient, FakePool, Clock]:
    clock = Clock()
    dogfs = DogFSClient(clock, ClientConfig(meta=meta), endpoints=lambda a: None, timeout=timeout)  # type: ignore[arg-type,return-value]
    pool = FakePool(answer)
    dogfs.pool = pool  # type: ignore[assignment]
    return dogfs, pool, clock


def ok_reply() -> Reply:
    return Reply(m.MetaReply("a:1"), c.encode_result(c.Ok()))


def fail_once(error: Exception) -> tuple[Any, list[tuple[str, Any]]]:
    """An answer function failing the first call with ``error`` and answering Ok after, and
    the (address, message) of every call."""
    calls: list[tuple[str, Any]] = []

    def answer(address: str, msg: Any) -> Reply:
        calls.append((address, msg))
        if len(calls) == 1:
            raise error
        return ok_reply()

    return answer, calls


class SessionTests(SynchronousTestCase):
    """Exactly-once sessions: one per command in flight."""

    def test_concurrent_commands_use_distinct_sessions(self) -> None:
        """Two commands in flight carry different session ids; a later one reuses a free one."""
        pending: list[defer.Deferred[Reply]] = []

        def answer(address: str, msg: Any) -> defer.Deferred[Reply]:
            d: defer.Deferred[Reply] = defer.Deferred()
            pending.append(d)
            return d

        dogfs, pool, clock = client(answer)
        first = dogfs.rm("/x")
        second = dogfs.rm("/y")
        sessions = [(msg.client_id, msg.seq) for _, msg in pool.sent]
        self.assertEqual(len({s for s, _ in sessions}), 2)
        self.assertEqual([seq for _, seq in sessions], [1, 1])
        for d in pending:
            d.callback(ok_reply())
        self.successResultOf(first)
        self.successResultOf(second)
        pending.clear()
        third = dogfs.rm("/z")
        _, msg = pool.sent[-1]
        self.assertIn(msg.client_id, {s for s, _ in sessions})
        self.assertEqual(msg.seq, 2)
        pending[0].callback(ok_reply())
        self.successResultOf(third)

    def test_retry_keeps_sequence_number(self) -> None:
        """A command retried after a lost connection is resent with the same session and seq."""
        answer, calls = fail_once(WireError("connection_closed", "lost"))
        dogfs, pool, clock = client(answer)
        d = dogfs.mkdir("/d")
        self.successResultOf(d)
        self.assertEqual(len(calls), 2)
        (_, first), (_, again) = calls
        self.assertEqual((first.client_id, first.seq), (again.client_id, again.seq))
        self.assertEqual(pool.dropped, ["a:1"])


class SessionAgeTests(SynchronousTestCase):
    """Sessions idle too long are not used again (the metadata may have forgotten them)."""

    def test_idle_session_dropped(self) -> None:
        """A free session is reused within SESSION_REUSE_LIMIT of its last answer; past it,
        a new session (seq 1) is made instead."""
        dogfs, pool, clock = client(lambda address, msg: ok_reply())
        self.successResultOf(dogfs.rm("/a"))
        clock.advance(SESSION_REUSE_LIMIT - 1)
        self.successResultOf(dogfs.rm("/b"))
        clock.advance(SESSION_REUSE_LIMIT + 1)
        self.successResultOf(dogfs.rm("/c"))
        ids = [(msg.client_id, msg.seq) for _, msg in pool.sent]
        self.assertEqual(ids[1], (ids[0][0], 2))  # reused within the limit
        self.assertNotEqual(ids[2][0], ids[0][0])  # idle past it: a new session
        self.assertEqual(ids[2][1], 1)


class LeaderConnectionTests(SynchronousTestCase):
    """Once the leader is known, a request goes straight to its open connection; a failure
    there goes on through the full retry loop, within the same deadline."""

    def test_known_leader_is_asked_directly(self) -> None:
        """After one answer names the leader, the next commands go to it alone."""

        def answer(address: str, msg: Any) -> Reply:
            if address != "b:1":
                raise WireError("not_leader", "not me", {"leader": "b:1"})
            return Reply(m.MetaReply("b:1"), c.encode_result(c.Ok()))

        dogfs, pool, clock = client(answer)
        self.successResultOf(dogfs.rm("/x"))
        pool.sent.clear()
        for path in ("/y", "/z"):
            self.successResultOf(dogfs.mkdir(path))
        self.assertEqual([a for a, _ in pool.sent], ["b:1", "b:1"])

    def test_leader_lost_is_retried_elsewhere(self) -> None:
        """The known leader's connection closes mid-command: it is dropped and the same
        command (same session and sequence number) is sent to whoever leads now."""
        leader = ["a:1"]
        calls: list[tuple[str, Any]] = []

        def answer(address: str, msg: Any) -> Reply:
            calls.append((address, msg))
            if address != leader[0]:
                raise WireError("not_leader", "not me", {"leader": leader[0]})
            if len(calls) == 2:
                leader[0] = "b:1"
                raise WireError("connection_closed", "lost")
            return Reply(m.MetaReply(leader[0]), c.encode_result(c.Ok()))

        dogfs, pool, clock = client(answer)
        self.successResultOf(dogfs.mkdir("/first"))
        self.successResultOf(dogfs.mkdir("/second"))
        self.assertEqual(pool.dropped, ["a:1"])
        self.assertEqual([a for a, _ in calls[1:]], ["a:1", "b:1"])
        self.assertEqual((calls[1][1].client_id, calls[1][1].seq), (calls[2][1].client_id, calls[2][1].seq))
        self.assertEqual(dogfs._leader, "b:1")

    def test_final_error_from_the_leader(self) -> None:
        """A final error on the direct path is the caller's error, without a retry."""
        replies = [Reply(m.MetaReply("a:1"), c.encode_result(c.Ok()))]

        def answer(address: str, msg: Any) -> Reply:
            if replies:
                return replies.pop()
            raise WireError("exists", "'/d' already exists.")

        dogfs, pool, clock = client(answer)
        self.successResultOf(dogfs.mkdir("/c"))
        error = self.failureResultOf(dogfs.mkdir("/d"), DogFSError).value
        self.assertEqual((error.code, error.message), ("exists", "'/d' already exists."))
        self.assertEqual(len(pool.sent), 2)

    def test_no_quorum_on_the_direct_path_is_the_error(self) -> None:
        """The leader answers "no quorum" and then nothing answers: the error says no quorum,
        once the timeout counted from the first try has passed."""
        replies = [Reply(m.MetaReply("a:1"), c.encode_result(c.Ok()))]

        def answer(address: str, msg: Any) -> Reply:
            if replies:
                return replies.pop()
            if address == "a:1" and len(pool.sent) == 2:
                raise WireError("no_quorum", "the metadata group has no quorum: 1 of 3 members reachable")
            raise WireError("unreachable", f"cannot connect to {address}")

        dogfs, pool, clock = client(answer, timeout=2.0)
        self.successResultOf(dogfs.mkdir("/c"))
        d = dogfs.mkdir("/d")
        clock.advance(1.0)
        self.assertNoResult(d)
        clock.pump([0.1] * 12)
        error = self.failureResultOf(d, DogFSError).value
        self.assertEqual(error.code, "no_quorum")


class ErrorTests(SynchronousTestCase):
    """What the client says when the cluster cannot serve."""

    def test_not_leader_redirect_is_immediate(self) -> None:
        """A not_leader hint is followed at once, without waiting for a backoff."""

        def answer(address: str, msg: Any) -> Reply:
            if address != "b:1":
                raise WireError("not_leader", "not me", {"leader": "b:1"})
            return Reply(m.MetaReply("b:1"), c.encode_result(c.Ok()))

        dogfs, pool, clock = client(answer, meta=("a:1", "c:1"))
        self.successResultOf(dogfs.rm("/x"))
        self.assertEqual([a for a, _ in pool.sent], ["a:1", "b:1"])
        self.assertEqual(dogfs._leader, "b:1")

    def test_no_quorum_wins_over_unreachable(self) -> None:
        """If any member said "no quorum", that is the error, even if others were unreachable."""

        def answer(address: str, msg: Any) -> Reply:
            if address == "a:1":
                raise WireError("no_quorum", "the metadata group has no quorum: 1 of 3 members reachable")
            raise WireError("unreachable", "cannot connect to b:1")

        dogfs, pool, clock = client(answer, timeout=2.0)
        d = dogfs.mkdir("/d")
        clock.pump([0.1] * 30)
        error = self.failureResultOf(d, DogFSError).value
        self.assertEqual(error.code, "no_quorum")
        self.assertIn("no quorum", error.message)

    def test_gives_up_within_timeout(self) -> None:
        """With nothing reachable the call fails once the timeout has passed, not before."""

        def answer(address: str, msg: Any) -> Reply:
            raise WireError("unreachable", f"cannot connect to {address}")

        dogfs, pool, clock = client(answer, timeout=3.0)
        d = dogfs.stat("/x")
        clock.advance(2.0)
        self.assertNoResult(d)
        clock.pump([0.25] * 8)
        error = self.failureResultOf(d, DogFSError).value
        self.assertEqual(error.code, "unreachable")
        self.assertIn("a:1, b:1", error.message)

    def test_final_errors_are_not_retried(self) -> None:
        """not_found is final: no retry, the message is kept."""

        def answer(address: str, msg: Any) -> Reply:
            raise WireError("not_found", "'/x' does not exist.")

        dogfs, pool, clock = client(answer)
        error = self.failureResultOf(dogfs.stat("/x"), DogFSError).value
        self.assertEqual((error.code, error.message), ("not_found", "'/x' does not exist."))
        self.assertEqual(len(pool.sent), 1)

    def test_not_ready_is_retried_until_ready(self) -> None:
        """A new leader that has not heard every chunk server yet answers not_ready: the
        client retries the same command (same session and seq) until it succeeds."""
        calls = []

        def answer(address: str, msg: Any) -> Reply:
            calls.append(msg)
            if len(calls) <= 4:
                raise WireError("not_ready", "cannot write /f yet: 2 of 3 chunk servers heard from")
            return ok_reply()

        dogfs, pool, clock = client(answer, meta=("a:1",))
        d = dogfs.mkdir("/d")
        self.assertNoResult(d)
        clock.pump([0.1] * 20)
        self.successResultOf(d)
        self.assertEqual(len(calls), 5)
        self.assertEqual(len({(msg.client_id, msg.seq) for msg in calls}), 1)

    def test_not_ready_until_the_timeout_keeps_its_message(self) -> None:
        """If the leader stays not ready past the timeout, its own explanation is the error."""

        def answer(address: str, msg: Any) -> Reply:
            raise WireError("not_ready", "cannot write /f yet: 2 of 3 chunk servers heard from")

        dogfs, pool, clock = client(answer, meta=("a:1",), timeout=2.0)
        d = dogfs.mkdir("/d")
        clock.pump([0.1] * 30)
        error = self.failureResultOf(d, DogFSError).value
        self.assertEqual(error.code, "not_ready")
        self.assertEqual(error.message, "cannot write /f yet: 2 of 3 chunk servers heard from")


class RetryHygieneTests(SynchronousTestCase):
    """Retries that neither churn connections nor spin, and a deadline kept while dialling."""

    def test_answered_timeout_keeps_the_connection(self) -> None:
        """A member that answers "timeout" (the group did not decide in time, or it is
        overloaded) has a working connection: the command is retried, the connection kept,
        so other requests in flight on it are not failed."""
        answer, calls = fail_once(WireError("timeout", "the metadata leader is overloaded"))
        dogfs, pool, clock = client(answer)
        d = dogfs.mkdir("/d")
        clock.pump([0.1] * 5)
        self.successResultOf(d)
        self.assertEqual(len(calls), 2)
        self.assertEqual(pool.dropped, [])

    def test_request_timeout_drops_the_connection(self) -> None:
        """No answer at all within the request's timeout: the connection is in doubt and is
        made again."""
        answer, _calls = fail_once(RequestTimeout("MetaCommand to a:1 timed out after 5s"))
        dogfs, pool, clock = client(answer)
        self.successResultOf(dogfs.mkdir("/d"))
        self.assertEqual(pool.dropped, ["a:1"])

    def test_members_naming_each_other_do_not_spin(self) -> None:
        """Two members each naming the other as leader (a transfer under way): the client
        follows a couple of redirects at once, then backs off, and gives up at its timeout."""

        def answer(address: str, msg: Any) -> Reply:
            other = "b:1" if address == "a:1" else "a:1"
            raise WireError("not_leader", "not me", {"leader": other})

        dogfs, pool, clock = client(answer, timeout=2.0)
        d = dogfs.mkdir("/d")
        self.assertLessEqual(len(pool.sent), 1 + MAX_REDIRECTS)
        clock.pump([REDIRECT_PAUSE] * 100)
        error = self.failureResultOf(d, DogFSError).value
        self.assertEqual(error.code, "not_leader")
        # A few requests per short pause (the pause does not grow: the leader's name comes
        # in a moment), not a spin: at most 1 + MAX_REDIRECTS per pause over 2 s.
        self.assertLessEqual(len(pool.sent), (1 + MAX_REDIRECTS) * (2.0 / REDIRECT_PAUSE + 1))
        self.assertGreater(len(pool.sent), 2.0 / REDIRECT_PAUSE)

    def test_dialling_keeps_the_deadline(self) -> None:
        """A member that never completes the connection cannot hold the call past its
        timeout (the pool's own handshake limit may be longer)."""

        class StuckPool(FakePool):
            def get(self, address: str) -> defer.Deferred[FakeConnection]:
                return defer.Deferred()

        dogfs, _pool, clock = client(lambda address, msg: ok_reply(), timeout=3.0)
        dogfs.pool = StuckPool(None)  # type: ignore[assignment]
        d = dogfs.stat("/x")
        clock.advance(2.9)
        self.assertNoResult(d)
        clock.pump([0.05] * 4)
        error = self.failureResultOf(d, DogFSError).value
        self.assertEqual(error.code, "unreachable")

    def test_own_client_id_is_only_a_label(self) -> None:
        """Two clients given the same client_id (a restarted process) never share a session
        id: the metadata would answer the second with the first one's results."""
        clock = Clock()
        ids = []
        for _ in range(2):
            dogfs = DogFSClient(clock, ClientConfig(meta=("a:1",)), endpoints=lambda a: None, client_id="app")  # type: ignore[arg-type,return-value]
            pool = FakePool(lambda address, msg: ok_reply())
            dogfs.pool = pool  # type: ignore[assignment]
            self.successResultOf(dogfs.mkdir("/d"))
            ids.append(pool.sent[0][1].client_id)
        self.assertNotEqual(ids[0], ids[1])
        self.assertTrue(all(i.startswith("app.") for i in ids))


class RenewalTests(SynchronousTestCase):
    """An upload renews its pending block groups every third of the allocation ttl."""

    def setUp(self) -> None:
        self.commands: list[Any] = []
        self.answers: list[Any] = []

        def answer(address: str, msg: Any) -> Any:
            if self.answers:
                next_answer = self.answers.pop(0)
                if isinstance(next_answer, Exception):
                    raise next_answer
                return next_answer  # a Deferred the test fires
            return Reply(m.MetaReply("a:1"), c.encode_result(c.Count(1)))

        self.dogfs, self.pool, self.clock = client(answer, timeout=1.0)
        commands = self.commands

        class Recording(FakeConnection):
            def call(self, msg: Any, payload: bytes = b"", timeout: float | None = None) -> defer.Deferred[Reply]:
                commands.append(c.decode_command(payload))
                return super().call(msg, payload, timeout)

        self.pool.open_connection = lambda address: Recording(address, answer, self.pool.sent)  # type: ignore[method-assign]
        self.pool.get = lambda address: defer.succeed(Recording(address, answer, self.pool.sent))  # type: ignore[method-assign]

    def renewals(self) -> list[tuple[int, ...]]:
        return [cmd.block_groups for cmd in self.commands if isinstance(cmd, c.RenewAllocations)]

    def test_renews_what_was_allocated_every_third_of_the_ttl(self) -> None:
        renewal = Renewal(self.dogfs, "/f", 30.0)
        self.addCleanup(renewal.stop)
        self.clock.advance(10)
        self.assertEqual(self.renewals(), [])  # nothing allocated yet: nothing sent
        renewal.add(7)
        renewal.add(9)
        renewal.add(8)
        renewal.discard(9)  # abandoned after a failed group: left to expire
        self.clock.advance(10)
        self.assertEqual(self.renewals(), [(7, 8)])
        self.clock.advance(10)
        self.assertEqual(self.renewals(), [(7, 8), (7, 8)])
        renewal.check()
        renewal.stop()
        self.clock.advance(100)
        self.assertEqual(len(self.renewals()), 2)

    def test_expired_groups_fail_the_upload_early(self) -> None:
        renewal = Renewal(self.dogfs, "/f", 3.0)
        self.addCleanup(renewal.stop)
        renewal.add(1)
        self.answers.append(WireError("stale_allocation", "Block group 1 is not a pending allocation"))
        self.clock.advance(1)
        error = self.assertRaises(DogFSError, renewal.check)
        self.assertEqual(error.code, "stale_allocation")
        self.assertIn("write it again", error.message)
        self.clock.advance(10)
        self.assertEqual(len(self.renewals()), 1)  # no more tries once it is known lost

    def test_unreachable_metadata_is_tried_again(self) -> None:
        renewal = Renewal(self.dogfs, "/f", 3.0)
        self.addCleanup(renewal.stop)
        renewal.add(1)
        self.pool.dropped.extend(["a:1", "b:1"])
        self.pool.get = lambda address: defer.fail(WireError("unreachable", "down"))  # type: ignore[method-assign]
        self.clock.pump([0.1] * 15)  # one round, which gives up within the client's timeout
        renewal.check()
        self.assertEqual(self.renewals(), [])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_no_ttl_renews_nothing(self) -> None:
        renewal = Renewal(self.dogfs, "/f", None)
        renewal.add(1)
        self.clock.advance(1e6)
        self.assertEqual(self.renewals(), [])
        renewal.stop()

    def test_never_two_renewals_at_once(self) -> None:
        held: defer.Deferred[Reply] = defer.Deferred()
        self.answers.append(held)
        renewal = Renewal(self.dogfs, "/f", 3.0)
        self.addCleanup(renewal.stop)
        renewal.add(1)
        self.clock.pump([1, 1, 1])
        self.assertEqual(self.renewals(), [(1,)])  # the first is under way: the next two wait
        held.callback(Reply(m.MetaReply("a:1"), c.encode_result(c.Count(1))))
        self.clock.advance(1)
        self.assertEqual(self.renewals(), [(1,), (1,)])

    def test_at_least_every_minute(self) -> None:
        """However long the ttl the client learnt, it renews at least every minute (the
        operator may have lowered it since)."""
        renewal = Renewal(self.dogfs, "/f", 3600.0)
        self.addCleanup(renewal.stop)
        renewal.add(5)
        self.clock.advance(59)
        self.assertEqual(self.renewals(), [])
        self.clock.advance(1)
        self.assertEqual(self.renewals(), [(5,)])

    def test_stopped_renewal_is_quiet(self) -> None:
        """A renewal under way when the upload ends (committed: its groups are no longer
        pending) neither fails the upload nor warns."""
        held: defer.Deferred[Reply] = defer.Deferred()
        self.answers.append(held)
        renewal = Renewal(self.dogfs, "/f", 3.0)
        renewal.add(1)
        self.clock.advance(1)
        renewal.stop()
        held.errback(WireError("stale_allocation", "Block group 1 is not a pending allocation"))
        renewal.check()
        self.assertEqual(self.flushLoggedErrors(), [])



class _FrozenConnection:
    """A member's connection: a frozen member never answers (the call times out as a real
    Connection's does); the others redirect to the leader, or say there is no quorum."""

    def __init__(self, world: _FrozenWorld, address: str) -> None:
        self.world, self.address = world, address

    def call(self, msg: Any, payload: bytes = b"", timeout: float | None = None) -> defer.Deferred[Reply]:
        world = self.world
        world.calls.append((world.clock.seconds(), self.address))
        if self.address in world.frozen:
            d: defer.Deferred[Reply] = defer.Deferred()
            assert timeout is not None
            world.clock.callLater(timeout, d.errback, RequestTimeout(f"no answer from {self.address}"))
            return d
        if world.leader is None:
            return defer.fail(WireError("no_quorum", "the metadata group has no quorum: 1 of 3 members reachable"))
        if self.address != world.leader:
            return defer.fail(WireError("not_leader", "not me", {"leader": world.leader}))
        return defer.succeed(ok_reply())


class _FrozenWorld:
    """A pool of three members, some frozen: they accept TCP and never complete the
    handshake (a dial fails after the pool's handshake timeout, 5 s), or, connected before
    they froze, never answer on the open connection."""

    def __init__(self, frozen: set[str], leader: str | None, connected: set[str] = frozenset()) -> None:
        self.clock = Clock()
        self.frozen, self.leader, self.opened = frozen, leader, set(connected)
        self.calls: list[tuple[float, str]] = []

    def open_connection(self, address: str) -> _FrozenConnection | None:
        return _FrozenConnection(self, address) if address in self.opened else None

    def get(self, address: str) -> defer.Deferred[_FrozenConnection]:
        if address in self.opened or address not in self.frozen:
            self.opened.add(address)
            return defer.succeed(_FrozenConnection(self, address))
        d: defer.Deferred[_FrozenConnection] = defer.Deferred()
        self.clock.callLater(5.0, lambda: d.called or d.errback(WireError("unreachable", f"{address}: no handshake")))
        return d

    def drop(self, address: str) -> None:
        self.opened.discard(address)

    def client(self, timeout: float, leader: str | None = None) -> DogFSClient:
        c_ = DogFSClient(self.clock, ClientConfig(meta=("a:1", "b:1", "c:1")), endpoints=lambda a: None, timeout=timeout)  # type: ignore[arg-type,return-value]
        c_.pool = self  # type: ignore[assignment]
        c_._leader = leader
        return c_


class FrozenMemberTests(SynchronousTestCase):
    """A member that accepts connections but never answers (SIGSTOP, a host gone without a
    reset) costs a command about a second, not the handshake or request timeout."""

    def test_fresh_client_first_member_frozen(self) -> None:
        """The first member listed is frozen: a new client (a CLI command) dials them all at
        once and is served by the leader about a second later, well within a 5 s timeout."""
        world = _FrozenWorld({"a:1"}, leader="b:1")
        d = world.client(5.0).mkdir("/x")
        world.clock.pump([0.05] * 40)  # 2 s
        self.assertIsInstance(self.successResultOf(d), c.Ok)
        self.assertEqual([address for _, address in world.calls], ["b:1"])
        self.assertLessEqual(world.calls[0][0], 1.1)

    def test_known_leader_frozen_on_an_open_connection(self) -> None:
        """The leader this client knew froze with its connection open; b leads by now: the
        command goes there after one request timeout (META_CALL_TIMEOUT, 6 s: longer than
        a member takes to answer for itself), not 10 s, so a 10 s timeout is enough."""
        from dogfs.client.api import META_CALL_TIMEOUT

        world = _FrozenWorld({"a:1"}, leader="b:1", connected={"a:1"})
        d = world.client(10.0, leader="a:1").mkdir("/x")
        world.clock.pump([0.05] * 160)  # 8 s
        self.assertIsInstance(self.successResultOf(d), c.Ok)
        self.assertEqual([address for _, address in world.calls][:1], ["a:1"])
        self.assertEqual(world.calls[-1][1], "b:1")
        self.assertLess(world.calls[-1][0], META_CALL_TIMEOUT + 1.5)

    def test_slow_leader_answers_before_the_client_gives_up(self) -> None:
        """A leader that takes its own operation timeout (5 s) to answer is waited for: its
        answer comes before the request times out here, and the connection others share is
        kept."""
        world = _FrozenWorld(set(), leader="a:1", connected={"a:1"})
        calls = []
        inner = _FrozenConnection.call

        def slow(self: _FrozenConnection, msg: Any, payload: bytes = b"", timeout: float | None = None) -> Any:
            calls.append(timeout)
            d: defer.Deferred[Reply] = defer.Deferred()
            world.clock.callLater(5.0, lambda: inner(self, msg, payload, timeout).chainDeferred(d))
            return d

        self.patch(_FrozenConnection, "call", slow)
        d = world.client(30.0, leader="a:1").mkdir("/x")
        world.clock.pump([0.05] * 120)  # 6 s
        self.assertIsInstance(self.successResultOf(d), c.Ok)
        self.assertEqual(len(calls), 1)
        self.assertGreater(calls[0], 5.0)
        self.assertIn("a:1", world.opened)

    def test_no_quorum_said_within_the_timeout(self) -> None:
        """Two of three frozen, the third answers that there is no quorum: the client
        reaches it and says so, within the timeout, not 'no metadata node is reachable'."""
        world = _FrozenWorld({"a:1", "b:1"}, leader=None)
        d = world.client(10.0).mkdir("/x")
        world.clock.pump([0.05] * 240)  # 12 s
        error = self.failureResultOf(d, DogFSError).value
        self.assertEqual(error.code, "no_quorum")
        self.assertIn("c:1", [address for _, address in world.calls])
        self.assertLessEqual(world.calls[0][0], 2.1)
