# -*- test-case-name: tests.test_security_plugins -*-
"""The daemons' endpoints and security service over real loopback TLS, in one process:
identities reach the handlers, roles are enforced, revocation cuts connections, plaintext
clients get nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from dogfs.config import TLSFiles
from dogfs.plugins.common import client_endpoints, server_endpoint
from dogfs.security.authz import guard
from dogfs.security.ca import init_ca
from dogfs.security.daemon import DaemonSecurity, RevocationTap
from dogfs.security.roles import Role
from dogfs.wire import messages as m
from dogfs.wire.pool import ConnectionFactory, ConnectionPool
from dogfs.wire.protocol import Reply, Request, WireError

reactor: Any = _reactor


class TLSDaemonTests(TestCase):
    """A listener made like a daemon's, dialled like a client."""

    def setUp(self) -> None:
        home = tempfile.mkdtemp(prefix="dogfs-plugins-")
        self.addCleanup(shutil.rmtree, home, True)
        ca = init_ca(os.path.join(home, "ca"))

        def files(name: str, role: Role, hosts: list[str] | None = None) -> TLSFiles:
            issued = ca.issue(name, role, os.path.join(home, name), hosts=hosts or [])
            return TLSFiles(ca=ca.cert_path, cert=issued.cert_path, key=issued.key_path)

        self.node = files("chunk-1", Role.NODE, ["127.0.0.1"])
        self.reader = files("rita", Role.READER)
        self.user = files("ursula", Role.USER)
        self.security = DaemonSecurity(reactor, self.node, "chunk-1", "127.0.0.1:0")
        self.security.startService()
        self.addCleanup(self.security.stopService)

        def whoami(request: Request) -> Any:
            return m.Error("ok", request.connection.identity.name)

        handlers = guard(
            {m.GetShard: whoami, m.DeleteShards: whoami},
            self.security.authorize,
            {m.GetShard: "read", m.DeleteShards: "node"},
        )
        self.factory = ConnectionFactory(reactor, handlers, on_handshake=self.security.on_handshake)
        self.factory.noisy = False
        d = server_endpoint(reactor, "tcp:0:interface=127.0.0.1", self.security.server).listen(self.factory)
        return d.addCallback(self._listening)

    def _listening(self, port: Any) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port.getHost().port}"
        self.addCleanup(port.stopListening)

    def pool(self, tls: TLSFiles | None) -> ConnectionPool:
        pool = ConnectionPool(reactor, client_endpoints(reactor, tls, timeout=5.0))
        self.addCleanup(pool.close_all)
        return pool

    async def ask(self, pool: ConnectionPool, msg: Any) -> Any:
        connection = await pool.get(self.address)
        return (await connection.call(msg, timeout=5.0)).msg

    async def test_identity_and_roles(self) -> None:
        """The handler sees the certificate's identity; a reader may read but not delete."""
        pool = self.pool(self.reader)
        self.assertEqual((await self.ask(pool, m.GetShard("x"))).message, "rita")
        with self.assertRaises(WireError) as e:
            await self.ask(pool, m.DeleteShards(("x",)))
        self.assertEqual(e.exception.code, "permission_denied")
        self.assertEqual(e.exception.message, "identity 'rita' (role reader) may not act as a cluster node")

    async def test_revocation_cuts_and_refuses(self) -> None:
        """Revoking cuts the open connection; reconnecting fails with permission_denied."""
        pool = self.pool(self.user)
        connection = await pool.get(self.address)
        self.assertEqual((await connection.call(m.GetShard("x"), timeout=5.0)).msg.message, "ursula")
        self.assertEqual(self.security.set_revocations({"ursula"}, set()), 1)
        await connection.closed
        with self.assertRaises(WireError) as e:
            await self.ask(pool, m.GetShard("x"))
        self.assertEqual(e.exception.code, "permission_denied")
        self.assertIn("refused our identity", e.exception.message)

    async def test_plaintext_client_gets_nothing(self) -> None:
        """A plaintext client's connection ends without a DogFS answer (TLS port)."""
        pool = self.pool(None)
        with self.assertRaises(WireError) as e:
            await self.ask(pool, m.GetShard("x"))
        self.assertIn(e.exception.code, ("connection_closed", "unreachable"))


class PlaintextWarningTests(TestCase):
    """A daemon without [tls] says what that exposes, at every start."""

    def test_warns_at_every_start(self) -> None:
        """Each startService of a plaintext DaemonSecurity logs the plaintext warning."""
        seen: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            from twisted.logger import formatEvent

            seen.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        security = DaemonSecurity(Clock(), None, "chunk-9", "127.0.0.1:7100")
        for _ in range(2):
            security.startService()
            security.stopService()
        warnings = [line for line in seen if line.startswith("plaintext: anyone who can reach 127.0.0.1:7100")]
        self.assertEqual(len(warnings), 2)
        self.assertIsNone(security.server)


class RevocationPollingTests(TestCase):
    """A member polls its own state for the revocation list; a failed read skips a turn."""

    def test_failed_read_keeps_polling(self) -> None:
        """An unexpected error reading the list is logged, the last list stays in force, and
        the next poll reads it again (the LoopingCall must not stop for good)."""
        clock = Clock()
        answers: list[Any] = [(["alice"], [7]), OSError("MDB_CORRUPTED"), (["alice", "bob"], [])]

        def source() -> tuple[list[str], list[int]]:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer  # type: ignore[no-any-return]

        security = DaemonSecurity(clock, None, "meta-1", "127.0.0.1:7000", source=source, poll=1.0)
        security.startService()
        self.addCleanup(security.stopService)
        self.assertEqual((security.revocations.names, security.revocations.serials), ({"alice"}, {7}))
        clock.advance(1.0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(security.revocations.names, {"alice"})
        clock.advance(1.0)
        self.assertEqual(security.revocations.names, {"alice", "bob"})
        self.assertEqual(answers, [])


class KeptRevocationTests(TestCase):
    """A chunk server keeps the last revocation list across restarts, and takes no list from
    a leader that says it has none to give."""

    def test_list_survives_a_restart(self) -> None:
        """The list set from a heartbeat is kept on disk; a new DaemonSecurity on the same file
        enforces it from the start, before any leader has answered."""
        path = os.path.join(self.mktemp(), "revoked.json")
        os.makedirs(os.path.dirname(path))
        first = DaemonSecurity(Clock(), None, "chunk-1", "127.0.0.1:1", keep=path)
        first.set_revocations({"eve"}, {42})
        again = DaemonSecurity(Clock(), None, "chunk-1", "127.0.0.1:1", keep=path)
        self.assertEqual((again.revocations.names, again.revocations.serials), ({"eve"}, {42}))
        again.set_revocations(set(), set())
        third = DaemonSecurity(Clock(), None, "chunk-1", "127.0.0.1:1", keep=path)
        self.assertEqual((third.revocations.names, third.revocations.serials), (set(), set()))

    def test_damaged_file_is_reported(self) -> None:
        """A kept file that cannot be read is named in a warning; nothing is enforced from it."""
        path = os.path.join(self.mktemp(), "revoked.json")
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write('{"names": ["eve"')
        seen: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            from twisted.logger import formatEvent

            seen.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        security = DaemonSecurity(Clock(), None, "chunk-1", "127.0.0.1:1", keep=path)
        self.assertEqual(security.revocations.names, set())
        self.assertTrue(any("cannot read the revocation list kept in" in line and path in line for line in seen), seen)

    def test_no_news_keeps_the_list(self) -> None:
        """A heartbeat reply without a list (revoked=None) leaves the list as it was; one with
        a list replaces it."""
        security = DaemonSecurity(Clock(), None, "chunk-1", "127.0.0.1:1")
        security.set_revocations({"eve"}, set())
        tap = RevocationTap(None, security)
        tap._seen(Reply(m.HeartbeatReply("m:1", False, None)))
        self.assertEqual(security.revocations.names, {"eve"})
        tap._seen(Reply(m.HeartbeatReply("m:1", False, ("bob",))))
        self.assertEqual(security.revocations.names, {"bob"})


class GCTuningTests(TestCase):
    """A daemon's tree tunes the garbage collector only when it starts."""

    def test_only_when_started(self) -> None:
        """Building the service changes nothing; starting it raises the first generation's
        threshold, and once the reactor runs, freezes what start-up made."""
        import gc

        from dogfs.plugins.common import GC_THRESHOLD, GCTuning

        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        calls: list[str] = []
        self.patch(gc, "freeze", lambda: calls.append("freeze"))
        self.patch(gc, "collect", lambda *a: calls.append("collect") or 0)

        class Reactor:
            def __init__(self) -> None:
                self.when_running: list[Any] = []

            def callWhenRunning(self, f: Any) -> None:  # noqa: N802
                self.when_running.append(f)

        reactor = Reactor()
        service = GCTuning(reactor)
        self.assertEqual(gc.get_threshold(), before)
        service.startService()
        self.assertEqual(gc.get_threshold(), GC_THRESHOLD)
        self.assertEqual(calls, [])
        [run] = reactor.when_running
        run()
        self.assertEqual(calls, ["collect", "freeze"])
