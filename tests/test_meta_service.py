# -*- test-case-name: tests.test_meta_service -*-
"""Tests for dogfs.meta.service and dogfs.meta.log: the metadata node's request handlers."""

from __future__ import annotations

import random
from typing import Any

import msgpack
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.test.iosim import FakeTransport, connect
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from dogfs.config import MetaConfig
from dogfs.interfaces import ICommandLog
from dogfs.meta import commands as c
from dogfs.meta.log import LocalCommandLog
from dogfs.meta.registry import ChunkServerRegistry
from dogfs.meta.service import MetaHandlers
from dogfs.meta.state import NamespaceState
from dogfs.raft.worker import SerialWorker
from dogfs.security.roles import Identity, Role
from dogfs.security.tokens import block_token, valid_block_key
from dogfs.wire import messages as m
from dogfs.wire.protocol import Connection, WireError


class Harness:
    """A metadata node's handlers on a simulated clock, reached over an in-memory connection."""

    #: The block key the harness's namespace starts with (a real one is chosen by the first
    #: leader: MetaService._seed_secrets).
    BLOCK_KEY = "0123456789abcdef" * 4

    def __init__(self, case: SynchronousTestCase, chunks: int = 6, block_key: bool = True) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.config = MetaConfig(
            id="meta-1", listen="tcp:0", address="127.0.0.1:7000", data_dir=case.mktemp(),
            chunk_dead_after=10.0,
        )
        self.state = NamespaceState(self.config.data_dir, durable=False)
        self.state.open()
        case.addCleanup(self.state.close)
        self.log = LocalCommandLog(self.clock, self.state, None, node_id="meta-1", address="127.0.0.1:7000")
        if block_key:
            case.successResultOf(self.log.propose(c.SetBlockKey(self.BLOCK_KEY)))
        self.registry = ChunkServerRegistry(self.clock, 10.0)
        self.handlers = MetaHandlers(
            self.clock, self.config, self.state, self.log, self.registry, rng=random.Random(7)
        )
        self.server = Connection(self.clock, self.handlers.handlers(), node_id="meta-1")
        self.client = Connection(self.clock, {})
        self.pump = connect(self.server, FakeTransport(self.server, True), self.client, FakeTransport(self.client, False))
        self.case = case
        self.seq = 0
        for i in range(1, chunks + 1):
            self.heartbeat(f"chunk-{i}")

    def call(self, msg: Any, payload: bytes = b"") -> Any:
        d = self.client.call(msg, payload)
        self.pump.flush()
        return d

    def ok(self, msg: Any, payload: bytes = b"") -> Any:
        return self.case.successResultOf(self.call(msg, payload))

    def error(self, msg: Any, payload: bytes = b"") -> WireError:
        return self.case.failureResultOf(self.call(msg, payload), WireError).value

    def command(
        self, command: Any, client_id: str = "client-a", seq: int | None = None, wants_tokens: bool = True
    ) -> Any:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return self.call(m.MetaCommand(client_id, seq, wants_tokens), c.encode_command(command))

    def result(self, command: Any, **kw: Any) -> Any:
        reply = self.case.successResultOf(self.command(command, **kw))
        return c.decode_result(bytes(reply.payload))

    def heartbeat(self, node: str, address: str | None = None) -> Any:
        port = 7100 + int(node.rsplit("-", 1)[1])
        return self.ok(m.Heartbeat(node, address or f"127.0.0.1:{port}", 10**12, 0, 0, {}, None)).msg


class MetaHandlerTests(SynchronousTestCase):
    """The request handlers of a single metadata node."""

    def test_log_provides_interface(self) -> None:
        """The local command log implements ICommandLog."""
        h = Harness(self)
        verifyObject(ICommandLog, h.log)

    def test_heartbeat_registers_durably(self) -> None:
        """A chunk server's first heartbeat registers it in the persistent registry."""
        h = Harness(self, chunks=2)
        self.assertEqual([r.node_id for r in h.state.chunk_servers()], ["chunk-1", "chunk-2"])
        reply = h.heartbeat("chunk-1")
        self.assertEqual(reply.leader_hint, "127.0.0.1:7000")
        self.assertTrue(reply.want_report)

    def test_heartbeat_with_impossible_figures_refused(self) -> None:
        """A heartbeat with a NaN or infinite load or a negative count is refused with a clear
        error and changes nothing: such figures would reach placement and the status JSON."""
        h = Harness(self, chunks=2)
        before = h.handlers.registry.view()
        for load, shards in (({"cpu": float("nan")}, 0), ({"cpu": float("inf")}, 0), ({}, -1)):
            error = h.error(m.Heartbeat("chunk-9", "127.0.0.1:7109", 10**12, 0, shards, load, None))
            self.assertEqual(error.code, "invalid_argument")
            self.assertIn("heartbeat from chunk-9", error.message)
        self.assertEqual(h.handlers.registry.view(), before)
        self.assertNotIn("chunk-9", [r.node_id for r in h.state.chunk_servers()])

    def test_prepare_sets_only_the_time(self) -> None:
        """The leader stamps mkdir and commit with its clock and keeps every other field."""
        import attrs

        h = Harness(self)
        h.clock.advance(1234.5)
        for command in (
            c.Mkdir("/a/b", True, "RS-2-1", 7.0),
            c.CommitFile("/f", 10, ((3, 10),), 7.0, "RS-2-1", 4),
        ):
            self.assertEqual(h.handlers.prepare(command), attrs.evolve(command, now=h.clock.seconds()))

    def test_inherited_policy_decided_when_applied(self) -> None:
        """An upload without a policy gets its directory's as the state machine sees it
        when it applies the Allocate, not as the leader saw it when it placed the upload: a
        directory made (or moved, or the default changed) by a command still in the log
        must not leave the file on another policy. When the placement does not fit the
        policy found then, the upload is refused with a reason, never given the wrong one."""
        h = Harness(self, chunks=9)
        h.log._busy = True  # a batch is being written: what follows is logged, not applied
        same = h.command(c.Mkdir("/same", ec="RS-5-1"))
        wider = h.command(c.Mkdir("/wider", ec="RS-6-3"))
        fits = h.command(c.Allocate("/same/f", None, ()))  # placed for RS-4-2: 6 servers
        misfit = h.command(c.Allocate("/wider/f", None, ()))
        h.log._busy = False
        h.log._flush()
        h.pump.flush()
        for d in (same, wider):
            self.successResultOf(d)
        allocation = c.decode_result(bytes(self.successResultOf(fits).payload))
        self.assertEqual(allocation.ec, "RS-5-1")
        self.assertEqual(len(allocation.shards), 6)
        error = self.failureResultOf(misfit, WireError).value
        self.assertEqual(error.code, "invalid_argument")
        self.assertIn("'/wider/f' inherits RS-6-3 from its directory", error.message)
        self.assertIn("try the upload again", error.message)

    def test_read_authorized_again_after_its_barrier(self) -> None:
        """A read is authorized when it arrives and again once its barrier has passed (with
        the revocation list read afresh): a revocation acknowledged while it waited, which
        this member's state now holds, refuses it."""
        h = Harness(self)
        barrier: defer.Deferred[None] = defer.Deferred()
        h.log.read_barrier = lambda: barrier  # type: ignore[method-assign]
        asked: list[str] = []

        def fresh(request: Any, permission: str) -> None:
            asked.append(permission)
            raise WireError("permission_denied", "identity 'rita' is revoked")

        h.handlers.authorize_fresh = fresh
        d = h.call(m.MetaQuery("stat", "/"))
        self.assertEqual(asked, [])
        barrier.callback(None)
        h.pump.flush()
        self.assertEqual(asked, ["read"])
        self.assertEqual(self.failureResultOf(d, WireError).value.code, "permission_denied")

    def test_allocate_places_on_distinct_servers(self) -> None:
        """Allocation puts the k+m shards of a block group on k+m different chunk servers."""
        h = Harness(self)
        alloc = h.result(c.Allocate("/f", None, ()))
        self.assertEqual(alloc.ec, "RS-4-2")
        self.assertEqual(len({s.node_id for s in alloc.shards}), 6)
        self.assertEqual([s.index for s in alloc.shards], list(range(6)))

    def test_allocate_avoids_what_the_client_saw_fail(self) -> None:
        """Allocate.avoid: none of the named servers is chosen, the logged command does not
        carry them, and when too few remain the error names them."""
        h = Harness(self, chunks=8)
        for _ in range(20):
            alloc = h.result(c.Allocate("/f", None, (), avoid=("chunk-1", "chunk-2")))
            self.assertEqual({s.node_id for s in alloc.shards} & {"chunk-1", "chunk-2"}, set())
        logged = h.handlers.prepare(c.Allocate("/f", None, (), avoid=("chunk-1",)))
        self.assertEqual(logged.avoid, ())
        # Logged as before the field existed (4 fields), so the previous release applies it.
        self.assertEqual(len(msgpack.unpackb(c.encode_command(logged))), 5)
        self.assertEqual(c.decode_command(c.encode_command(logged)), logged)
        self.assertEqual(len(msgpack.unpackb(c.encode_command(c.Allocate("/f", None, (), avoid=("x",))))), 6)
        error = self.failureResultOf(
            h.command(c.Allocate("/f", None, (), avoid=("chunk-1", "chunk-2", "chunk-3"))), WireError
        ).value
        self.assertEqual(error.code, "not_enough_chunk_servers")
        self.assertIn("without chunk-1, chunk-2, chunk-3, which failed this upload", error.message)

    def test_not_enough_chunk_servers(self) -> None:
        """With fewer live servers than k+m, allocation fails saying how many are needed and alive."""
        h = Harness(self, chunks=4)
        error = self.failureResultOf(h.command(c.Allocate("/f", None, ())), WireError).value
        self.assertEqual(error.code, "not_enough_chunk_servers")
        self.assertIn("needs 6 live chunk servers, only 4 are alive", error.message)
        self.assertIn("/f", error.message)

    def test_new_leader_waits_for_servers_not_yet_heard(self) -> None:
        """Servers known from the registry but not heard since this leader took over may be
        alive: until they report (or the grace ends) a short allocation is "not_ready", which
        clients retry, not the final not_enough_chunk_servers."""
        h = Harness(self, chunks=4)
        h.registry.known("chunk-5", "127.0.0.1:7105")
        h.registry.known("chunk-6", "127.0.0.1:7106")
        error = self.failureResultOf(h.command(c.Allocate("/f", None, ())), WireError).value
        self.assertEqual(error.code, "not_ready")
        self.assertIn("needs 6 live chunk servers, only 4 are alive", error.message)
        h.heartbeat("chunk-5")
        h.heartbeat("chunk-6")
        alloc = h.result(c.Allocate("/f", None, ()))
        self.assertEqual(len({s.node_id for s in alloc.shards}), 6)

    def test_silent_known_servers_become_dead_after_the_grace(self) -> None:
        """Once the grace has passed, servers never heard from are dead and the refusal final."""
        h = Harness(self, chunks=4)
        h.registry.known("chunk-5", "127.0.0.1:7105")
        h.clock.advance(11)
        for i in range(1, 5):
            h.heartbeat(f"chunk-{i}")
        error = self.failureResultOf(h.command(c.Allocate("/f", None, ())), WireError).value
        self.assertEqual(error.code, "not_enough_chunk_servers")

    def test_dead_servers_are_not_chosen(self) -> None:
        """A chunk server silent past chunk_dead_after no longer receives shards."""
        h = Harness(self, chunks=7)
        h.clock.advance(8)
        for i in range(1, 7):
            h.heartbeat(f"chunk-{i}")
        h.clock.advance(5)  # chunk-7 silent for 13 s
        h.registry.check()
        for _ in range(10):
            alloc = h.result(c.Allocate("/f", None, ()))
            self.assertNotIn("chunk-7", {s.node_id for s in alloc.shards})

    def test_commit_then_stat_and_list(self) -> None:
        """A committed file is visible to stat and list with its block groups."""
        h = Harness(self)
        alloc = h.result(c.Allocate("/f", "RS-4-2", ()))
        info = h.result(c.CommitFile("/f", 10, ((alloc.bg_id, 10),)))
        self.assertEqual(info.size, 10)
        self.assertEqual(info.mtime, h.clock.seconds())
        stat = c.decode_result(bytes(h.ok(m.MetaQuery("stat", "/f")).payload))
        self.assertEqual(stat.block_groups[0].id, alloc.bg_id)
        listing = c.decode_result(bytes(h.ok(m.MetaQuery("list", "/")).payload))
        self.assertEqual([e.name for e in listing.entries], ["f"])

    def test_errors_become_wire_errors(self) -> None:
        """State machine errors arrive as wire errors with a lower-case code and the path."""
        h = Harness(self)
        error = h.error(m.MetaQuery("stat", "/missing"))
        self.assertEqual(error.code, "not_found")
        self.assertIn("/missing", error.message)
        error = self.failureResultOf(h.command(c.Mkdir("relative")), WireError).value
        self.assertEqual(error.code, "invalid_path")

    def test_unknown_policy_refused(self) -> None:
        """An unknown EC policy is refused before anything is proposed."""
        h = Harness(self)
        applied = h.state.applied_index
        error = self.failureResultOf(h.command(c.Allocate("/f", "RS-4", ())), WireError).value
        self.assertEqual(error.code, "invalid_argument")
        self.assertEqual(h.state.applied_index, applied)

    def test_internal_commands_refused_from_clients(self) -> None:
        """A client cannot send the leader's own commands (registration, moves)."""
        h = Harness(self)
        error = self.failureResultOf(h.command(c.RegisterChunkServer("evil", "1.2.3.4:1")), WireError).value
        self.assertEqual(error.code, "permission_denied")

    def test_retried_command_applies_once(self) -> None:
        """The same (client id, seq) applies once; the retry gets the first result."""
        h = Harness(self)
        first = h.result(c.Mkdir("/d"), seq=41)
        again = h.result(c.Mkdir("/d"), seq=41)  # a plain second Mkdir would fail: EXISTS
        self.assertEqual(first, again)
        alloc = h.result(c.Allocate("/f", None, ()), seq=43)
        commit = c.CommitFile("/f", 1, ((alloc.bg_id, 1),))
        self.assertEqual(h.result(commit, seq=44), h.result(commit, seq=44))
        error = self.failureResultOf(h.command(c.Mkdir("/d"), seq=45), WireError).value
        self.assertEqual(error.code, "exists")

    def test_resend_while_in_flight_waits_for_the_first(self) -> None:
        """A resend of a command this leader is still deciding is not proposed again: it
        gets the first try's answer when that comes, failures included. Once answered, a
        resend goes to the log (whose session table answers it)."""
        h = Harness(self)
        proposed: list[Any] = []
        held: list[defer.Deferred[Any]] = []
        real = h.log.propose

        def propose(command: Any) -> defer.Deferred[Any]:
            proposed.append(command)
            d: defer.Deferred[Any] = defer.Deferred()
            held.append(d)
            return d

        h.log.propose = propose  # type: ignore[method-assign]
        first = h.command(c.Mkdir("/d"), seq=7)
        resend = h.command(c.Mkdir("/d"), seq=7)
        other = h.command(c.Mkdir("/e"), seq=8)
        self.assertEqual(len(proposed), 2)  # /d once, /e
        self.assertNoResult(resend)
        real(proposed[0]).chainDeferred(held[0])
        h.pump.flush()
        first_info = c.decode_result(bytes(self.successResultOf(first).payload))
        self.assertEqual(c.decode_result(bytes(self.successResultOf(resend).payload)), first_info)
        held[1].errback(WireError("no_quorum", "no majority"))
        h.pump.flush()
        self.assertEqual(self.failureResultOf(other, WireError).value.code, "no_quorum")
        h.log.propose = real  # type: ignore[method-assign]
        again = h.result(c.Mkdir("/d"), seq=7)  # answered by the session table
        self.assertEqual(again, first_info)
        self.assertEqual(h.handlers._in_flight, {})

    def test_retried_allocate_answered_when_no_longer_placeable(self) -> None:
        """A retried Allocate that already took effect gets its first answer even when the
        leader could no longer place it (its chunk servers died since); a new one is refused."""
        h = Harness(self)
        first = h.result(c.Allocate("/f", None, ()), seq=50)
        h.clock.advance(11)
        h.heartbeat("chunk-1")  # the other five are now dead: RS-4-2 cannot be placed
        self.assertEqual(h.result(c.Allocate("/f", None, ()), seq=50), first)
        error = self.failureResultOf(h.command(c.Allocate("/g", None, ()), seq=51), WireError).value
        self.assertEqual(error.code, "not_enough_chunk_servers")
        h.result(c.Mkdir("/d"), seq=52)
        error = self.failureResultOf(h.command(c.Allocate("/f", None, ()), seq=50), WireError).value
        self.assertEqual(error.code, "session_expired")

    def test_unplaceable_retry_on_a_leader_not_caught_up_is_not_ready(self) -> None:
        """A leader whose state may still lack its predecessors' commits cannot tell an
        unplaceable retry from a new command: it answers "not ready" (retried by the client),
        never a failure the first try may contradict."""
        h = Harness(self)
        h.clock.advance(11)
        h.heartbeat("chunk-1")
        h.log.caught_up = lambda: False  # type: ignore[attr-defined]
        error = self.failureResultOf(h.command(c.Allocate("/f", None, ()), seq=7), WireError).value
        self.assertEqual(error.code, "not_ready")
        self.assertIn("needs 6 live chunk servers", error.message)
        h.log.caught_up = lambda: True  # type: ignore[attr-defined]
        error = self.failureResultOf(h.command(c.Allocate("/f", None, ()), seq=7), WireError).value
        self.assertEqual(error.code, "not_enough_chunk_servers")

    def test_shard_report_names_garbage(self) -> None:
        """A shard report is answered with the shards no block group references."""
        h = Harness(self)
        alloc = h.result(c.Allocate("/f", None, ()))
        mine = next(s for s in alloc.shards if s.node_id == "chunk-1")
        payload = "\n".join([mine.shard_id, "00000000000000ff-00"]).encode()
        reply = h.ok(m.ShardReport("chunk-1", 0, True), payload)
        self.assertEqual(bytes(reply.payload).decode().split("\n"), ["00000000000000ff-00"])
        self.assertFalse(h.heartbeat("chunk-1").want_report)

    def test_shard_report_names_damaged_garbage(self) -> None:
        """Damaged shards named apart in the last batch: those the namespace no longer
        places on the reporting server are named unreferenced with the rest, those it still
        places there are not (the server keeps them until repair moves them); more than
        MAX_DAMAGED is refused (and fits in a frame's header)."""
        h = Harness(self)
        alloc = h.result(c.Allocate("/f", None, ()))
        mine = next(s for s in alloc.shards if s.node_id == "chunk-1")
        moved = next(s for s in alloc.shards if s.node_id == "chunk-2")  # not chunk-1's
        reply = h.ok(m.ShardReport("chunk-1", 0, True, (mine.shard_id, moved.shard_id)), b"")
        self.assertEqual(bytes(reply.payload).decode(), moved.shard_id)
        self.assertEqual(h.ok(m.ShardReport("chunk-1", 0, True, (mine.shard_id,)), b"").payload, b"")
        error = h.error(m.ShardReport("chunk-1", 0, True, ("00000000000000ff-00",) * (m.MAX_DAMAGED + 1)))
        self.assertEqual(error.code, "invalid_argument")
        self.assertIn("damaged", error.message)

    def test_heartbeat_reply_names_the_cluster(self) -> None:
        """Heartbeat replies name the cluster once its id is set (None before) to a chunk
        server that knows ids (it sends "" while it keeps none), and so does cluster_info. A
        server of the release before ids (no such field) gets the 3-field reply it can read."""
        h = Harness(self, chunks=1)

        def beat(cluster_id: str | None) -> Any:
            return h.ok(m.Heartbeat("chunk-1", "127.0.0.1:7101", 10**12, 0, 0, {}, None, cluster_id)).msg

        self.assertIsNone(beat("").cluster_id)
        self.successResultOf(h.log.propose(c.SetClusterId("cid-a")))
        self.assertEqual(beat("").cluster_id, "cid-a")
        self.assertEqual(beat("cid-a").cluster_id, "cid-a")
        self.assertEqual(h.handlers.cluster_info()["cluster_id"], "cid-a")
        old = beat(None)
        self.assertIsNone(old.cluster_id)
        self.assertEqual(len(msgpack.unpackb(m.encode(old))), 3)
        # ... and its 7-field heartbeat is read (fields are only ever added at the end).
        header = msgpack.packb(list(msgpack.unpackb(m.encode(m.Heartbeat("chunk-1", "a:1", 1, 0, 0))))[:7])
        self.assertIsNone(m.decode(m.Heartbeat.TYPE, header).cluster_id)  # type: ignore[attr-defined]

    def test_block_key_goes_only_to_servers_that_ask(self) -> None:
        """A heartbeat reply carries the block key to a chunk server that asks for it (one of
        this release) over an authenticated connection, and to no other; a server of the
        release before ids or before block tokens gets the reply of its release's size."""
        h = Harness(self, chunks=1)
        self.successResultOf(h.log.propose(c.SetClusterId("cid-a")))

        def beat(**fields: Any) -> Any:
            return h.ok(m.Heartbeat("chunk-1", "127.0.0.1:7101", 10**12, 0, 0, {}, None, **fields)).msg

        # In the clear (no identity: an --insecure cluster) the key is never sent.
        in_clear = beat(cluster_id="cid-a", wants_block_key=True)
        self.assertIsNone(in_clear.block_key)
        self.assertEqual(in_clear.cluster_id, "cid-a")
        h.server.identity = Identity("chunk-1", Role.NODE, 7)
        asked = beat(cluster_id="cid-a", wants_block_key=True)
        self.assertEqual(asked.block_key, Harness.BLOCK_KEY)
        self.assertEqual(len(msgpack.unpackb(m.encode(asked))), 5)
        ids_only = beat(cluster_id="cid-a")
        self.assertIsNone(ids_only.block_key)
        self.assertEqual(len(msgpack.unpackb(m.encode(ids_only))), 4)
        self.assertEqual(len(msgpack.unpackb(m.encode(beat()))), 3)

    def test_no_allocation_before_the_block_key(self) -> None:
        """Until the new cluster's block key is applied, an Allocate is answered "not ready"
        (the client retries), and so has no token-less allocation to write with."""
        h = Harness(self, block_key=False)
        error = h.error(m.MetaCommand("client-a", 1), c.encode_command(c.Allocate("/f", None, ())))
        self.assertEqual(error.code, "not_ready")
        self.assertIn("block key", error.message)
        self.successResultOf(h.log.propose(c.SetBlockKey(Harness.BLOCK_KEY)))
        alloc = h.result(c.Allocate("/f", None, ()))
        self.assertEqual(alloc.token, block_token(Harness.BLOCK_KEY, alloc.bg_id))

    def test_allocation_without_token_for_a_client_before_tokens(self) -> None:
        """A client of the release before block tokens (its MetaCommand does not say it reads
        them) gets the 3-field Allocation its decoder knows, first try and retry alike."""
        h = Harness(self)
        reply = self.successResultOf(h.command(c.Allocate("/f", None, ()), seq=7, wants_tokens=False))
        raw = msgpack.unpackb(bytes(reply.payload))
        self.assertEqual(len(raw) - 1, 3)  # tag, then bg_id, ec, shards
        self.assertIsNone(c.decode_result(bytes(reply.payload)).token)
        retry = self.successResultOf(h.command(c.Allocate("/f", None, ()), seq=7, wants_tokens=False))
        self.assertEqual(bytes(retry.payload), bytes(reply.payload))
        # The same session's answer, to a client that reads tokens, carries it.
        again = c.decode_result(bytes(self.successResultOf(h.command(c.Allocate("/f", None, ()), seq=7)).payload))
        self.assertEqual(again.token, block_token(Harness.BLOCK_KEY, again.bg_id))

    def test_no_answer_before_the_cluster_id_is_known(self) -> None:
        """A leader whose state has no cluster id yet (a new cluster's first entries not
        applied, or a leader behind its log) answers a chunk server keeping an id with
        not_ready, and registers it not: it may be another cluster's. Its report is refused
        the same way. A server keeping no id is served."""
        h = Harness(self, chunks=0)
        error = h.error(m.Heartbeat("chunk-9", "127.0.0.1:7109", 10**12, 0, 3, {}, None, "cid-b"))
        self.assertEqual(error.code, "not_ready")
        self.assertIn("cluster cid-b", error.message)
        self.assertEqual(h.handlers.registry.view(), [])
        error = h.error(m.ShardReport("chunk-9", 0, True, (), 1, "cid-b"), b"00000000000000ff-00")
        self.assertEqual(error.code, "not_ready")
        self.assertEqual(h.state.chunk_servers(), [])
        self.assertIsNone(h.ok(m.Heartbeat("chunk-1", "127.0.0.1:7101", 10**12, 0, 0, {}, None, "")).msg.cluster_id)
        self.successResultOf(h.log.propose(c.SetClusterId("cid-b")))
        self.assertEqual(h.ok(m.Heartbeat("chunk-9", "127.0.0.1:7109", 10**12, 0, 3, {}, None, "cid-b")).msg.cluster_id, "cid-b")
        self.assertEqual([r.node_id for r in h.state.chunk_servers()], ["chunk-1", "chunk-9"])

    def test_other_clusters_chunk_server_refused(self) -> None:
        """A chunk server holding another cluster's shards is refused, its heartbeat and its
        shard report alike, naming both clusters: it is never registered, and none of its
        shards is called garbage (this namespace references none of them). One of this
        cluster, or one that has no cluster yet (a new data directory), is served."""
        h = Harness(self, chunks=0)
        self.successResultOf(h.log.propose(c.SetClusterId("cid-a")))
        error = h.error(m.Heartbeat("chunk-9", "127.0.0.1:7109", 10**12, 0, 3, {}, None, "cid-b"))
        self.assertEqual(error.code, "permission_denied")
        self.assertIn("cluster cid-b", error.message)
        self.assertIn("cluster cid-a", error.message)
        self.assertEqual(h.handlers.registry.view(), [])
        error = h.error(m.ShardReport("chunk-9", 0, True, (), 1, "cid-b"), b"00000000000000ff-00")
        self.assertEqual(error.code, "permission_denied")
        self.assertNotIn("chunk-9", h.handlers.reported)
        self.assertEqual(h.state.chunk_servers(), [])
        for node, cluster in (("chunk-1", "cid-a"), ("chunk-2", "")):
            reply = h.ok(m.Heartbeat(node, "127.0.0.1:7101", 10**12, 0, 0, {}, None, cluster)).msg
            self.assertEqual(reply.cluster_id, "cid-a")
            reply = h.ok(m.ShardReport(node, 0, True, (), 1, cluster), b"00000000000000ff-00")
            self.assertEqual(bytes(reply.payload), b"00000000000000ff-00")
        self.assertEqual([r.node_id for r in h.state.chunk_servers()], ["chunk-1", "chunk-2"])

    def test_status(self) -> None:
        """Status lists the metadata member and every chunk server with the contract fields."""
        h = Harness(self)
        alloc = h.result(c.Allocate("/f", None, ()))
        h.result(c.CommitFile("/f", 10, ((alloc.bg_id, 10),)))
        status = msgpack.unpackb(bytes(h.ok(m.MetaQuery("status")).payload))
        self.assertEqual(status["meta"][0]["role"], "leader")
        self.assertEqual(len(status["chunks"]), 6)
        chunk = status["chunks"][0]
        for key in ("id", "address", "state", "capacity_bytes", "used_bytes", "shards", "last_heartbeat_s"):
            self.assertIn(key, chunk)
        self.assertEqual(status["namespace"]["files"], 1)
        self.assertEqual(status["namespace"]["at_risk"], {"2": 1})

    def test_at_risk_counts_dead_servers(self) -> None:
        """A block group with a shard on a dead server has one loss fewer to spare."""
        h = Harness(self)
        alloc = h.result(c.Allocate("/f", None, ()))
        h.result(c.CommitFile("/f", 10, ((alloc.bg_id, 10),)))
        h.clock.advance(8)
        for i in range(2, 7):
            h.heartbeat(f"chunk-{i}")
        h.clock.advance(5)
        h.registry.check()
        status = h.handlers.status()
        self.assertEqual(status["namespace"]["at_risk"], {"1": 1})

    def test_cluster_info(self) -> None:
        """cluster_info gives what a client needs to encode."""
        h = Harness(self)
        info = msgpack.unpackb(bytes(h.ok(m.MetaQuery("cluster_info")).payload))
        self.assertEqual((info["default_ec"], info["cell_size"]), ("RS-4-2", 1 << 20))

    def test_unknown_query(self) -> None:
        """An unknown query op is an invalid_argument error."""
        self.assertEqual(Harness(self).error(m.MetaQuery("frobnicate")).code, "invalid_argument")


class LocalLogTests(SynchronousTestCase):
    """Group commit in the single-node log."""

    def test_batches_while_busy(self) -> None:
        """Commands proposed while a batch is being written go together in the next one."""
        state = NamespaceState(self.mktemp(), durable=False)
        state.open()
        self.addCleanup(state.close)
        batches: list[int] = []
        real = state.apply_batch

        def counting(entries: Any) -> Any:
            batches.append(len(entries))
            return real(entries)

        state.apply_batch = counting  # type: ignore[method-assign]
        log = LocalCommandLog(Clock(), state, None, node_id="m", address="a:1")
        log._busy = True  # a batch is in flight
        ds = [log.propose(c.Mkdir(f"/d{i}")) for i in range(5)]
        log._busy = False
        log._flush()
        self.assertEqual(batches, [5])
        self.assertEqual([type(self.successResultOf(d)) for d in ds], [c.DirInfo] * 5)
        self.assertEqual(state.applied_index, 5)


    def test_batches_run_on_the_worker_and_fail_once_it_stopped(self) -> None:
        """With a worker, a batch is applied on it and answered through the reactor; once
        the service has stopped the worker, proposals fail with "unreachable" (the node is
        stopping) instead of waiting for ever, and nothing is applied."""
        state = NamespaceState(self.mktemp(), durable=False)
        state.open()
        self.addCleanup(state.close)

        class Reactor:
            def callFromThread(self, f: Any, *args: Any) -> None:  # noqa: N802
                answers.append((f, args))

        answers: list[tuple[Any, tuple[Any, ...]]] = []
        worker = SerialWorker(Reactor(), "test-lmdb")  # type: ignore[arg-type]
        worker.start()
        log = LocalCommandLog(Clock(), state, worker, node_id="m", address="a:1")
        first = log.propose(c.Mkdir("/a"))
        worker.stop()
        for f, args in answers:
            f(*args)
        self.assertIsInstance(self.successResultOf(first), c.DirInfo)
        late = log.propose(c.Mkdir("/b"))
        error = self.failureResultOf(late, WireError).value
        self.assertEqual(error.code, "unreachable")
        self.assertIn("metadata node m is stopping", error.message)
        self.assertEqual(state.applied_index, 1)


class DefaultPolicyTests(TestCase):
    """The config's default_ec seeds a new namespace; it never overrides an admin's choice."""

    async def _restart_keeps_admin_choice(self) -> None:
        data_dir = self.mktemp()
        config = MetaConfig(id="meta-1", listen="tcp:0", address="127.0.0.1:1", data_dir=data_dir, default_ec="RS-6-3")

        async def start() -> Any:
            return await _started(config, lambda service: service.state.default_policy_set())

        service = await start()
        self.assertEqual(service.state.default_policy(), "RS-6-3")
        assert service.log is not None
        await service.log.propose(c.SetDefaultPolicy("RS-10-4"))
        await service.stopService()
        service = await start()
        self.assertEqual(service.state.default_policy(), "RS-10-4")
        await service.stopService()

    async def _election_event(self) -> None:
        from twisted.internet import reactor

        from dogfs.meta.service import MetaService

        config = MetaConfig(id="meta-1", listen="tcp:0", address="127.0.0.1:1", data_dir=self.mktemp())

        class Port:
            def stopListening(self) -> None:
                pass

        service = MetaService(reactor, config, listen=lambda handlers: defer.succeed(Port()))
        service.startService()
        assert service.handlers is not None
        heard: list[tuple[str, dict[str, Any]]] = []
        service.handlers.listeners.append(lambda kind, fields: heard.append((kind, fields)))
        service._leadership_changed(True)
        await service.stopService()
        self.assertIn(("election", {"node": "meta-1", "term": 1}), heard)

    async def _cluster_id_chosen_once(self) -> None:
        config = MetaConfig(id="meta-1", listen="tcp:0", address="127.0.0.1:1", data_dir=self.mktemp())

        async def start() -> Any:
            return await _started(config, lambda service: service.state.cluster_id() is not None)

        service = await start()
        first = service.state.cluster_id()
        self.assertTrue(m.valid_cluster_id(first), first)
        await _until(lambda: service.state.block_key() is not None)
        key = service.state.block_key()
        self.assertTrue(valid_block_key(key), key)
        service._leadership_changed(True)  # a new term: nothing new to name
        assert service.handlers is not None
        self.assertEqual(service.handlers.cluster_info()["cluster_id"], first)
        self.assertNotIn(key, repr(service.handlers.cluster_info()))
        await service.stopService()
        service = await start()
        self.assertEqual(service.state.cluster_id(), first)
        self.assertEqual(service.state.block_key(), key)
        await service.stopService()

    def test_failed_seeding_tries_again_once_per_round(self) -> None:
        """Proposals of the cluster id and block key that fail (no quorum) are tried again a
        second later, once for the round however many failed: retries never multiply."""
        from dogfs.meta.service import MetaService

        clock = Clock()
        config = MetaConfig(id="meta-1", listen="tcp:0", address="127.0.0.1:1", data_dir=self.mktemp())
        service = MetaService(clock, config, listen=lambda handlers: defer.succeed(_Port()))
        service.state.open()
        self.addCleanup(service.state.close)
        proposed: list[Any] = []

        class FailingLog:
            is_leader = True

            def propose(self, command: Any) -> defer.Deferred[Any]:
                proposed.append(command)
                return defer.fail(WireError("no_quorum", "no majority"))

        service.log = FailingLog()  # type: ignore[assignment]
        service.running = True
        service._seed_secrets()
        self.assertEqual([type(p) for p in proposed], [c.SetClusterId, c.SetBlockKey])
        for _ in range(10):
            clock.advance(1.0)
        self.assertEqual(len(proposed), 22)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.flushLoggedErrors(WireError)
        service.running = False

    def test_cluster_id_chosen_once(self) -> defer.Deferred[None]:
        """A new namespace's leader names the cluster with a random id and chooses a random
        block key; restarts and new leaders keep both, and cluster_info shows no key."""
        return defer.Deferred.fromCoroutine(self._cluster_id_chosen_once())

    def test_election_event(self) -> defer.Deferred[None]:
        """A node that becomes leader tells its listeners (the dashboard's event log)."""
        return defer.Deferred.fromCoroutine(self._election_event())

    def test_restart_keeps_admin_choice(self) -> defer.Deferred[None]:
        """A restart (or a new leader) does not put back the config's default over an admin's."""
        return defer.Deferred.fromCoroutine(self._restart_keeps_admin_choice())


class _Port:
    def stopListening(self) -> None:
        pass


async def _started(config: MetaConfig, ready: Any) -> Any:
    """A MetaService of ``config`` on the real reactor (listening nowhere), once ``ready(it)``."""
    from twisted.internet import reactor

    from dogfs.meta.service import MetaService

    service = MetaService(reactor, config, listen=lambda handlers: defer.succeed(_Port()))
    service.startService()
    await _until(lambda: ready(service))
    return service


async def _until(condition: Any, deadline_s: float = 10.0) -> None:
    from twisted.internet import reactor, task

    waited = 0.0
    while not condition():
        if waited > deadline_s:
            raise AssertionError("condition not met in time")
        await task.deferLater(reactor, 0.02, lambda: None)
        waited += 0.02
