# -*- test-case-name: tests.test_security_authz -*-
"""Tests for dogfs.security.authz and dogfs.security.daemon: who may do what, revocation."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dogfs.meta import commands as c
from dogfs.meta.state import NamespaceState
from dogfs.security.authz import guard, make_authorizer, record_identity
from dogfs.security.daemon import (
    DaemonSecurity,
    parse_revoked_entries,
    revoked_entries,
    secure_meta_handlers,
)
from dogfs.security.roles import Identity, Role
from dogfs.wire import messages as m
from dogfs.wire.protocol import Reply, WireError


class _Conn:
    def __init__(self, identity: Identity | None) -> None:
        self.identity = identity


class _Request:
    def __init__(self, identity: Identity | None, msg: Any = None, payload: bytes = b"") -> None:
        self.connection = _Conn(identity)
        self.msg = msg
        self.payload = payload
        self.oneway = False


ALICE = Identity("alice", Role.READER, 11)
BOB = Identity("bob", Role.USER, 12)
ROOT = Identity("root", Role.ADMIN, 13)
NODE = Identity("chunk-1", Role.NODE, 14)


class AuthorizerTests(SynchronousTestCase):
    """make_authorizer applies the role matrix to the connection's identity."""

    def test_plaintext_allows_everything(self) -> None:
        """Without TLS there are no identities and nothing is refused."""
        authorize = make_authorizer(False)
        for permission in ("read", "write", "admin", "node"):
            authorize(_Request(None), permission)  # type: ignore[arg-type]

    def test_reader_may_read_not_write(self) -> None:
        """A reader reads; a write is refused with a sentence naming the missing permission."""
        authorize = make_authorizer(True)
        authorize(_Request(ALICE), "read")  # type: ignore[arg-type]
        with self.assertRaises(WireError) as e:
            authorize(_Request(ALICE), "write")  # type: ignore[arg-type]
        self.assertEqual(e.exception.code, "permission_denied")
        self.assertEqual(e.exception.message, "identity 'alice' (role reader) may not write")

    def test_user_not_admin_or_node(self) -> None:
        """A user writes but may neither run admin commands nor act as a node."""
        authorize = make_authorizer(True)
        authorize(_Request(BOB), "write")  # type: ignore[arg-type]
        for permission, verb in (("admin", "run admin commands"), ("node", "act as a cluster node")):
            with self.assertRaises(WireError) as e:
                authorize(_Request(BOB), permission)  # type: ignore[arg-type]
            self.assertIn(verb, e.exception.message)

    def test_alternatives(self) -> None:
        """'write|node' lets a node write shards; a reader is refused naming 'write'."""
        authorize = make_authorizer(True)
        authorize(_Request(NODE), "write|node")  # type: ignore[arg-type]
        authorize(_Request(BOB), "write|node")  # type: ignore[arg-type]
        with self.assertRaises(WireError) as e:
            authorize(_Request(ALICE), "write|node")  # type: ignore[arg-type]
        self.assertIn("may not write", e.exception.message)

    def test_no_identity_refused(self) -> None:
        """With TLS, a connection without an identity gets nothing, not even reads."""
        with self.assertRaises(WireError) as e:
            make_authorizer(True)(_Request(None), "read")  # type: ignore[arg-type]
        self.assertEqual(e.exception.code, "permission_denied")

    def test_unknown_permission_refused(self) -> None:
        """A misspelt permission refuses rather than allows."""
        with self.assertRaises(WireError):
            make_authorizer(True)(_Request(ROOT), "everything")  # type: ignore[arg-type]

    def test_revoked_refused_per_request(self) -> None:
        """A revoked identity is refused even on a connection opened before the revocation."""
        from dogfs.security.tls import RevocationSet

        revocations = RevocationSet()
        authorize = make_authorizer(True, revocations)
        authorize(_Request(ROOT), "admin")  # type: ignore[arg-type]
        revocations.revoke_serial(13)
        with self.assertRaises(WireError) as e:
            authorize(_Request(ROOT), "read")  # type: ignore[arg-type]
        self.assertIn("revoked", e.exception.message)

    def test_guard_wraps_named_types_only(self) -> None:
        """guard checks the permission before the handler, and leaves other types alone."""
        calls: list[str] = []
        table = guard(
            {m.Heartbeat: lambda r: calls.append("hb"), m.MetaQuery: lambda r: calls.append("q")},
            make_authorizer(True),
            {m.Heartbeat: "node", m.RaftEnvelope: "node"},
        )
        self.assertNotIn(m.RaftEnvelope, table)
        with self.assertRaises(WireError):
            table[m.Heartbeat](_Request(BOB))  # type: ignore[arg-type]
        table[m.Heartbeat](_Request(NODE))  # type: ignore[arg-type]
        table[m.MetaQuery](_Request(None))  # type: ignore[arg-type]
        self.assertEqual(calls, ["hb", "q"])

    def test_record_identity_from_peer_certificate(self) -> None:
        """Without a registry entry, the identity is read from the TLS peer certificate."""

        class Transport:
            def getPeerCertificate(self) -> None:
                return None

        connection = _Conn(None)
        connection.transport = Transport()  # type: ignore[attr-defined]
        record_identity(None)(connection)
        self.assertIsNone(connection.identity)


class RevocationListTests(SynchronousTestCase):
    """The revocation list: replicated commands, the state, the heartbeat form."""

    def state(self) -> NamespaceState:
        state = NamespaceState(self.mktemp(), durable=False, map_size=1 << 24)
        state.open()
        self.addCleanup(state.close)
        return state

    def test_revoke_and_reinstate(self) -> None:
        """Revoke by name and by serial, reinstate a name with its serials; bad input refused."""
        state = self.state()
        self.assertEqual(state.apply(1, c.Revoke("alice")), c.Ok())
        serial = str(2**150 + 7)  # wider than msgpack integers: carried as digits
        self.assertEqual(state.apply(2, c.encode_command(c.Revoke("bob", serial))), c.Ok())
        self.assertEqual(state.revocations(), (frozenset({"alice"}), frozenset({2**150 + 7})))
        state.apply(3, c.Reinstate("bob"))
        self.assertEqual(state.revocations(), (frozenset({"alice"}), frozenset()))
        bad = state.apply(4, c.Revoke("x", "12ab"))
        self.assertIsInstance(bad, c.MetaError)
        self.assertIsInstance(state.apply(5, c.Revoke("")), c.MetaError)

    def test_same_bytes_whatever_the_order(self) -> None:
        """Replicas applying revocations in the same log get the same digest."""
        a, b = self.state(), self.state()
        for state in (a, b):
            state.apply(1, c.Revoke("z"))
            state.apply(2, c.Revoke("a"))
        self.assertEqual(a.digest(), b.digest())

    def test_commands_round_trip(self) -> None:
        """Revoke and Reinstate survive the command codec, inside a session too."""
        for cmd in (c.Revoke("a", "123"), c.Reinstate("a"), c.Sessioned("cid", 3, c.Revoke("b"))):
            self.assertEqual(c.decode_command(c.encode_command(cmd)), cmd)

    def test_heartbeat_entries(self) -> None:
        """The list travels in HeartbeatReply.revoked and parses back; junk serials ignored."""
        entries = revoked_entries({"b", "a"}, {2**100})
        self.assertEqual(entries, ("a", "b", f"serial:{2**100}"))
        reply = m.decode(m.HeartbeatReply.TYPE, m.encode(m.HeartbeatReply(None, False, entries)))  # type: ignore[attr-defined]
        self.assertEqual(parse_revoked_entries(reply.revoked), (frozenset({"a", "b"}), frozenset({2**100})))
        self.assertEqual(parse_revoked_entries(["serial:x1"]), (frozenset(), frozenset()))


class _Log:
    is_leader = True

    def __init__(self) -> None:
        self.proposed: list[Any] = []
        self.current = True

    def caught_up(self) -> bool:
        return self.current

    def propose(self, command: Any) -> defer.Deferred[Any]:
        self.proposed.append(command)
        return defer.succeed(c.Ok())

    def leader_address(self) -> str:
        return "127.0.0.1:1"


class _Handlers:
    """The parts of MetaHandlers that secure_meta_handlers uses."""

    def __init__(self) -> None:
        self.log = _Log()
        self.clock = Clock()
        self.events: list[str] = []
        self.authorize: Any = None
        self.extra: dict[type, Any] = {}

    def handlers(self) -> dict[type, Any]:
        return {
            **self.extra,
            m.MetaCommand: lambda r: "plain",
            m.Heartbeat: lambda r: m.HeartbeatReply("127.0.0.1:1", False),
            m.RaftEnvelope: lambda r: "raft",
        }

    def _require_leader(self) -> None:
        pass

    def emit(self, kind: str, **fields: Any) -> None:
        self.events.append(kind)


class SecureMetaHandlersTests(SynchronousTestCase):
    """The metadata handler table with security wired in."""

    def setUp(self) -> None:
        self.revoked: tuple[set[str], set[int]] = (set(), set())
        self.security = DaemonSecurity(Clock(), None, "meta-1", "127.0.0.1:1", source=lambda: self.revoked)
        # Plaintext DaemonSecurity allows all; use a TLS authorizer for the role checks.
        self.security.authorize = make_authorizer(True, self.security.revocations)
        self.handlers = _Handlers()
        self.table = secure_meta_handlers(self.handlers, self.security)

    def command(self, identity: Identity, cmd: Any) -> Any:
        request = _Request(identity, m.MetaCommand("cid", 1), c.encode_command(cmd))
        return defer.maybeDeferred(self.table[m.MetaCommand], request)

    def test_revoke_needs_admin(self) -> None:
        """A user's Revoke is refused; an admin's is proposed in its session and enforced."""
        failure = self.failureResultOf(self.command(BOB, c.Revoke("alice")), WireError)
        self.assertIn("may not run admin commands", failure.value.message)
        self.revoked = ({"alice"}, set())
        reply = self.successResultOf(self.command(ROOT, c.Revoke("alice")))
        self.assertIsInstance(reply, Reply)
        self.assertEqual(self.handlers.log.proposed, [c.Sessioned("cid", 1, c.Revoke("alice"))])
        self.assertEqual(self.security.revocations.names, frozenset({"alice"}))
        self.assertEqual(self.handlers.events, ["revocation"])

    def test_fresh_authorization_reads_the_list_first(self) -> None:
        """authorize_fresh (what a read asks once its barrier has passed) sees a revocation
        the state holds but this member's poll has not fetched yet; authorize alone does not."""
        class Server:  # as with TLS: a list to read, connections to cut
            def enforce_revocations(self) -> int:
                return 0

        self.security.server = Server()  # type: ignore[assignment]
        request = _Request(BOB, m.MetaQuery("stat", "/f"))
        self.revoked = ({"bob"}, set())
        self.security.authorize(request, "read")  # the last list polled: bob is not on it
        with self.assertRaises(WireError) as e:
            self.handlers.authorize_fresh(request, "read")
        self.assertIn("'bob' is revoked", e.exception.message)

    def test_other_commands_pass_through(self) -> None:
        """Commands other than Revoke/Reinstate go to the plain handler."""
        self.assertEqual(self.successResultOf(self.command(BOB, c.Mkdir("/a"))), "plain")

    def test_heartbeat_nodes_only_with_list(self) -> None:
        """Only nodes heartbeat; their reply carries the revocation list as the state holds it
        now (not as last polled)."""
        self.revoked = ({"eve"}, {5})
        hb = m.Heartbeat("chunk-1", "127.0.0.1:2", 1, 0, 0)
        self.assertRaises(WireError, self.table[m.Heartbeat], _Request(BOB, hb))
        reply = self.successResultOf(defer.maybeDeferred(self.table[m.Heartbeat], _Request(NODE, hb)))
        self.assertEqual(reply.revoked, ("eve", "serial:5"))

    def test_node_speaks_for_itself_only(self) -> None:
        """A node certificate's heartbeat or shard report naming another chunk server is
        refused (it would re-register that server at the sender's address); a heartbeat
        relayed one-way by the leader carries the chunk server's id and is let through."""
        self.handlers.extra = {m.ShardReport: lambda r: "report"}
        table = secure_meta_handlers(self.handlers, self.security)
        forged = m.Heartbeat("chunk-2", "127.0.0.1:2", 1, 0, 0)
        e = self.assertRaises(WireError, table[m.Heartbeat], _Request(NODE, forged))
        self.assertEqual(e.code, "permission_denied")
        self.assertIn("may not speak for chunk server 'chunk-2'", e.message)
        e = self.assertRaises(WireError, table[m.ShardReport], _Request(NODE, m.ShardReport("chunk-2", 0, True)))
        self.assertEqual(e.code, "permission_denied")
        self.assertEqual(table[m.ShardReport](_Request(NODE, m.ShardReport("chunk-1", 0, True))), "report")
        relayed = _Request(Identity("meta-1", Role.NODE, 15), forged)
        relayed.oneway = True
        self.assertIsInstance(self.successResultOf(defer.maybeDeferred(table[m.Heartbeat], relayed)), m.HeartbeatReply)

    def test_heartbeat_from_a_leader_not_caught_up_has_no_list(self) -> None:
        """A leader whose state may lack committed entries (just elected) answers with no
        list at all ("no news"), never with one that may miss an acknowledged revocation."""
        self.security.set_revocations({"eve"}, set())
        self.revoked = (set(), set())  # what a state behind the log would say
        self.handlers.log.current = False
        hb = m.Heartbeat("chunk-1", "127.0.0.1:2", 1, 0, 0)
        reply = self.successResultOf(defer.maybeDeferred(self.table[m.Heartbeat], _Request(NODE, hb)))
        self.assertIsNone(reply.revoked)
        decoded = m.decode(m.HeartbeatReply.TYPE, m.encode(reply))  # type: ignore[attr-defined]
        self.assertIsNone(decoded.revoked)

    def test_raft_nodes_only(self) -> None:
        """Raft envelopes from a non-node identity are refused."""
        self.assertRaises(WireError, self.table[m.RaftEnvelope], _Request(ROOT, m.RaftEnvelope("g")))
        self.assertEqual(self.table[m.RaftEnvelope](_Request(NODE, m.RaftEnvelope("g"))), "raft")

    def test_polling_follows_the_state(self) -> None:
        """A started DaemonSecurity reads the list from its source every poll interval."""
        clock = Clock()
        security = DaemonSecurity(clock, None, "meta-2", "127.0.0.1:3", source=lambda: self.revoked, poll=0.5)
        security.startService()
        self.addCleanup(security.stopService)
        self.revoked = ({"mallory"}, {9})
        clock.advance(0.5)
        self.assertEqual(security.revocations.names, frozenset({"mallory"}))
        self.assertEqual(security.revocations.serials, frozenset({9}))
