"""The metadata leader's repair scheduler (dogfs/meta/repair.py) on simulated time.

A real LMDB namespace state and a real liveness registry; the chunk servers it sends
RebuildShard to are stand-ins that record the request and answer as the test says (the real
rebuild is tested in tests/test_chunk_rebuild.py, the whole path in tests/test_repair_process.py).
"""

from __future__ import annotations

import random
from typing import Any

import msgpack
from twisted.internet import defer, task
from twisted.python.failure import Failure

from dogfs.meta.commands import (
    Allocate,
    CommitFile,
    Delete,
    DrainChunkServer,
    ErrorCode,
    MetaError,
    Ok,
    RemoveChunkServer,
    shard_id,
)
from dogfs.meta.registry import ChunkServerRegistry
from dogfs.meta.repair import DEAD, DRAINING, REMOVED, RepairScheduler
from dogfs.wire import messages as m
from dogfs.wire.protocol import Reply, WireError
from tests.test_meta_state import SERVERS, StateTestCase

DEAD_AFTER = 10.0
REPAIR_AFTER = 60.0
INTERVAL = 5.0


class _Chunk:
    """A chunk server's connection as the scheduler sees it: every call is recorded and
    answered when the test says."""

    def __init__(self, calls: list[tuple[str, Any, defer.Deferred[Reply]]], address: str) -> None:
        self.calls = calls
        self.address = address

    def call(self, msg: Any, timeout: float | None = None) -> defer.Deferred[Reply]:
        d: defer.Deferred[Reply] = defer.Deferred()
        self.calls.append((self.address, msg, d))
        return d


class RepairSchedulerTests(StateTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.clock = task.Clock()
        self.registry = ChunkServerRegistry(self.clock, DEAD_AFTER, grace_after_start=DEAD_AFTER)
        self.calls: list[tuple[str, Any, defer.Deferred[Reply]]] = []
        self.dropped: list[str] = []
        self.proposed: list[Any] = []
        self.register(6)
        self.registry.known_all(self.state.chunk_servers())  # as the service does
        self.addresses = {node: f"127.0.0.1:{9000 + i}" for i, node in enumerate(SERVERS)}
        self.scheduler = RepairScheduler(
            self.clock, self.state, self.registry, self.propose,
            lambda address: defer.succeed(_Chunk(self.calls, address)), cell_size=4096,
            repair_after=REPAIR_AFTER, interval=INTERVAL, concurrency=4, retry_after=30.0,
            rng=random.Random(7), drop=self.dropped.append,
        )

    def propose(self, command: Any) -> defer.Deferred[Any]:
        self.proposed.append(command)
        return defer.succeed(self.run_(command))

    def beat(self, *nodes: str) -> None:
        for node in nodes:
            self.registry.heartbeat(node, self.addresses[node], 10**12, 10**9 * SERVERS.index(node), 0, {})

    def live_for(self, seconds: float, nodes: tuple[str, ...]) -> None:
        """Advance the clock by ``seconds``, the ``nodes`` heartbeating every second."""
        for _ in range(int(seconds)):
            self.beat(*nodes)
            self.clock.advance(1)
        self.beat(*nodes)

    def place(self, path: str, nodes: tuple[str, ...]) -> None:
        """Commit a 100-byte RS-2-2 file whose one block group is on ``nodes``."""
        alloc = self.ok(Allocate(path, "RS-2-2", nodes, 1.0))
        self.ok(CommitFile(path, 100, ((alloc.bg_id, 100),), 1.0))

    def answer(self, call: tuple[str, Any, defer.Deferred[Reply]], size: int = 100) -> None:
        _, msg, d = call
        d.callback(Reply(m.ShardStored(msg.shard_id, size), b""))

    def test_waits_for_repair_after_then_rebuilds_and_moves(self) -> None:
        """A server silent past chunk_dead_after is dead, but its shards are rebuilt only once
        it has been silent for repair_after: then each group's lost shard is rebuilt on a live
        server holding none of the group, from the others, and MoveShard records it there."""
        self.upload("/a", [5000, 9000])  # RS-2-1 on chunk-0, chunk-1, chunk-2
        others = SERVERS[:1] + SERVERS[2:6]
        self.live_for(5, SERVERS[:6])
        self.live_for(DEAD_AFTER + 5, others)
        self.assertEqual(self.registry.state("chunk-1"), "dead")
        self.assertEqual(self.scheduler.plan(), [])
        self.assertIn("chunk-1", self.scheduler.waiting())
        self.live_for(REPAIR_AFTER, others)
        tasks = self.scheduler.plan()
        self.assertEqual([(t.index, t.from_node, t.reason, t.margin) for t in tasks], [(1, "chunk-1", DEAD, 0)] * 2)

        self.scheduler.tick()
        self.assertEqual(len(self.calls), 2)
        for address, msg, _ in self.calls:
            self.assertIsInstance(msg, m.RebuildShard)
            self.assertEqual((msg.policy, msg.index, msg.cell_size), ("RS-2-1", 1, 4096))
            self.assertIn(address, [self.addresses[n] for n in SERVERS[3:6]])
            # Sources: the group's other shards, never the dead server's; data shards first.
            self.assertEqual([s[0] for s in msg.sources], [0, 2])
            self.assertNotIn(self.addresses["chunk-1"], [s[2] for s in msg.sources])
        sizes = {msg.group_size for _, msg, _ in self.calls}
        self.assertEqual(sizes, {5000, 9000})
        for call in list(self.calls):
            self.answer(call)
        moved = [p for p in self.proposed if type(p).__name__ == "MoveShard"]
        self.assertEqual(len(moved), 2)
        info = self.state.stat("/a")
        for group, (address, msg, _) in zip(sorted(info.block_groups, key=lambda g: g.size),
                                             sorted(self.calls, key=lambda c: c[1].group_size), strict=True):
            self.assertEqual(group.shards[1].address, address)
            self.assertEqual(group.shards[1].shard_id, msg.shard_id)
        self.assertEqual(self.scheduler.stats.rebuilt, 2)
        self.assertEqual(self.scheduler.plan(), [])
        self.assertEqual(self.scheduler.status()["lost_servers"], {})

    def test_most_endangered_first_one_task_per_group(self) -> None:
        """With room for one task, the group with the fewest readable shards goes first; a
        group never has two tasks at once."""
        self.scheduler.concurrency = 1
        self.place("/safe", ("chunk-0", "chunk-1", "chunk-4", "chunk-3"))  # loses chunk-3 only
        self.place("/one", SERVERS[:4])  # loses chunk-2 and chunk-3
        alive = ("chunk-0", "chunk-1", "chunk-4", "chunk-5")
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        tasks = self.scheduler.plan()
        self.assertEqual([(t.index, t.margin) for t in tasks], [(2, 0), (3, 0), (3, 1)])
        one = self.state.stat("/one").block_groups[0].id
        self.assertEqual({t.bg_id for t in tasks[:2]}, {one})
        self.scheduler.tick()
        self.assertEqual(len(self.calls), 1)
        self.assertEqual(self.calls[0][1].index, 2)
        self.answer(self.calls[0])
        self.clock.advance(0)
        # The next task of the same group starts once the first has ended.
        self.assertEqual(len(self.calls), 2)
        self.assertEqual(self.calls[1][1].index, 3)
        # Its source list holds the shard rebuilt a moment ago.
        self.assertIn(2, [s[0] for s in self.calls[1][1].sources])

    def test_failure_is_reported_and_retried_later(self) -> None:
        """A rebuild that fails is in the status's errors, is not retried before retry_after,
        and is retried after it."""
        self.upload("/a", [100])
        alive = ("chunk-0", "chunk-2", "chunk-3", "chunk-4", "chunk-5")
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        self.scheduler.start()
        self.live_for(INTERVAL, alive)
        self.assertEqual(len(self.calls), 1)
        self.calls[0][2].errback(Failure(WireError("unavailable", "only 1 of 2 sources answered")))
        status = self.scheduler.status()
        self.assertEqual(status["failed"], 1)
        self.assertIn("only 1 of 2 sources answered", status["errors"][-1]["error"])
        self.assertEqual(self.dropped, [])  # a refusal over a sound connection keeps it
        self.live_for(20, alive)
        self.assertEqual(len(self.calls), 1)
        self.live_for(15, alive)
        self.assertEqual(len(self.calls), 2)
        self.answer(self.calls[1])
        self.assertEqual(self.scheduler.stats.rebuilt, 1)
        self.scheduler.stop()
        self.assertFalse(self.scheduler.active)

    def test_broken_connection_is_dropped(self) -> None:
        """A rebuild lost with its connection makes the pool dial afresh next time."""
        self.upload("/a", [100])
        alive = ("chunk-0", "chunk-2", "chunk-3", "chunk-4", "chunk-5")
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        self.scheduler.tick()
        address = self.calls[0][0]
        self.calls[0][2].errback(Failure(WireError("connection_closed", "closed")))
        self.assertEqual(self.dropped, [address])

    def test_group_changed_meanwhile_is_stale_not_failed(self) -> None:
        """A file deleted while its shard was being rebuilt: the move is stale, not an error."""
        self.upload("/a", [100])
        alive = ("chunk-0", "chunk-2", "chunk-3", "chunk-4", "chunk-5")
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        self.scheduler.tick()
        self.ok(Delete("/a"))
        self.answer(self.calls[0])
        self.assertEqual((self.scheduler.stats.stale, self.scheduler.stats.failed), (1, 0))

    def test_too_few_readable_waits(self) -> None:
        """A group with fewer than k readable shards cannot be rebuilt: no request is sent,
        the status says why, and it is tried again later."""
        self.upload("/a", [100])  # RS-2-1 on chunk-0..2
        alive = ("chunk-0", "chunk-3", "chunk-4", "chunk-5")
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        self.assertEqual([t.margin for t in self.scheduler.plan()], [-1, -1])
        self.scheduler.tick()
        self.assertEqual(self.calls, [])
        self.assertIn("only 1 of its shards are readable, 2 are needed", self.scheduler.status()["errors"][0]["error"])

    def test_no_server_to_rebuild_onto(self) -> None:
        """Every live server already holds a shard of the group: nothing is sent; noted."""
        self.upload("/a", [100], ec="RS-3-2")  # chunk-0..4
        alive = ("chunk-0", "chunk-1", "chunk-2", "chunk-3")
        self.ok(RemoveChunkServer("chunk-5"))
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        self.scheduler.tick()
        self.assertEqual(self.calls, [])
        self.assertIn("no live chunk server without a shard of the group", self.scheduler.status()["errors"][0]["error"])

    def test_draining_server_moves_its_shards(self) -> None:
        """A draining server's shards move at once (it need not die): to a server that is not
        draining, with the draining one's shard read last."""
        self.upload("/a", [100])  # chunk-0..2
        self.ok(DrainChunkServer("chunk-0"))
        self.ok(DrainChunkServer("chunk-3"))
        self.live_for(3, SERVERS[:6])
        [t] = self.scheduler.plan()
        self.assertEqual((t.index, t.from_node, t.reason, t.margin), (0, "chunk-0", DRAINING, 1))
        self.scheduler.tick()
        [(address, msg, _)] = self.calls
        self.assertIn(address, [self.addresses["chunk-4"], self.addresses["chunk-5"]])
        self.assertEqual([s[0] for s in msg.sources], [1, 2])
        self.answer(self.calls[0])
        self.assertEqual(self.scheduler.plan(), [])
        self.ok(RemoveChunkServer("chunk-0"))

    def test_removed_server_shards_are_rebuilt(self) -> None:
        """A server removed with force (its shards still placed on it) is repaired at once."""
        self.upload("/a", [100])
        self.ok(RemoveChunkServer("chunk-1", force=True))
        self.live_for(3, ("chunk-0", "chunk-2", "chunk-3", "chunk-4", "chunk-5"))
        [t] = self.scheduler.plan()
        self.assertEqual((t.from_node, t.reason), ("chunk-1", REMOVED))
        self.assertEqual(self.scheduler.status()["lost_servers"], {"chunk-1": {"reason": REMOVED, "shards": 1}})

    def test_uncommitted_uploads_are_left_to_their_client(self) -> None:
        """Shards of an upload not committed yet are not repaired (its client writes around
        failures, or the allocation expires)."""
        self.ok(Allocate("/p", "RS-2-1", SERVERS[:3], 1.0))
        self.ok(DrainChunkServer("chunk-0"))
        self.live_for(3, SERVERS[:6])
        self.assertEqual(self.scheduler.plan(), [])

    def test_metadata_refusal_is_a_failure(self) -> None:
        """A MoveShard the state machine refuses for another reason is reported."""
        self.upload("/a", [100])
        alive = ("chunk-0", "chunk-2", "chunk-3", "chunk-4", "chunk-5")
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        refused = MetaError(ErrorCode.UNKNOWN_CHUNK_SERVER, "Chunk server 'x' is not registered.")
        self.scheduler.propose = lambda command: defer.succeed(refused)
        self.scheduler.tick()
        self.answer(self.calls[0])
        self.assertEqual(self.scheduler.stats.failed, 1)
        self.assertIn("the metadata refused the move", self.scheduler.status()["errors"][0]["error"])

    def test_ids(self) -> None:
        """The rebuilt shard keeps its id: the id names the block group and index."""
        self.upload("/a", [100])
        alive = ("chunk-0", "chunk-2", "chunk-3", "chunk-4", "chunk-5")
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        self.scheduler.tick()
        [group] = self.state.stat("/a").block_groups
        self.assertEqual(self.calls[0][1].shard_id, shard_id(group.id, 1))


class RepairHandlerTests(StateTestCase):
    """What the metadata node's handlers add for repair: the admin commands and the status."""

    def harness(self) -> Any:
        from tests.test_meta_service import Harness

        h = Harness(self)
        h.handlers.repair = RepairScheduler(
            h.clock, h.state, h.registry, h.log.propose, lambda address: defer.Deferred(), 4096,
        )
        return h

    def test_drain_and_remove_are_admin_commands(self) -> None:
        """drain and remove need the admin role; a user's request is refused naming it."""
        h = self.harness()
        refused = []

        def authorize(request: Any, permission: str) -> None:
            if permission == "admin":
                refused.append(permission)
                raise WireError("permission_denied", "identity 'u' (role user) may not run admin commands")

        h.handlers.authorize = authorize
        for command in (DrainChunkServer("chunk-1"), RemoveChunkServer("chunk-1")):
            error = self.failureResultOf(h.command(command), WireError).value
            self.assertEqual(error.code, "permission_denied")
        self.assertEqual(refused, ["admin", "admin"])

    def test_drain_then_remove(self) -> None:
        """Draining is recorded; a running server cannot be removed (its next heartbeat would
        register it again); a stopped one is removed and forgotten by the registry."""
        h = self.harness()
        self.assertEqual(h.result(DrainChunkServer("chunk-2")), Ok())
        self.assertEqual({r.node_id: r.draining for r in h.state.chunk_servers()}["chunk-2"], True)
        error = self.failureResultOf(h.command(RemoveChunkServer("chunk-2")), WireError).value
        self.assertEqual(error.code, "invalid_argument")
        self.assertIn("chunk-2 is running: stop it first", error.message)
        h.clock.advance(11)  # silent past chunk_dead_after
        for node in ("chunk-1", "chunk-3", "chunk-4", "chunk-5", "chunk-6"):
            h.heartbeat(node)
        self.assertEqual(h.result(RemoveChunkServer("chunk-2")), Ok())
        self.assertNotIn("chunk-2", [r.node_id for r in h.state.chunk_servers()])
        self.assertIsNone(h.registry.state("chunk-2"))

    def test_repair_status_query(self) -> None:
        """`repair_status` answers with the scheduler's status; it needs the admin role."""
        h = self.harness()
        reply = h.ok(m.MetaQuery("repair_status", "", {}))
        status = msgpack.unpackb(bytes(reply.payload), raw=False)
        self.assertEqual((status["lost_servers"], status["rebuilt"], status["active"]), ({}, 0, False))
        h.handlers.authorize = lambda request, permission: (
            None if permission == "read" else (_ for _ in ()).throw(WireError("permission_denied", "no"))
        )
        self.assertEqual(h.error(m.MetaQuery("repair_status", "", {})).code, "permission_denied")


class StateAndRegistryTests(StateTestCase):
    def test_placed_nodes(self) -> None:
        """placed_nodes lists every node a shard is placed on, registered or not, once."""
        self.register(6)
        self.assertEqual(self.state.placed_nodes(), [])
        self.upload("/a", [1, 2, 3])
        self.upload("/b", [1], ec="RS-3-2")
        self.assertEqual(self.state.placed_nodes(), list(SERVERS[:5]))
        self.ok(RemoveChunkServer("chunk-4", force=True))
        self.assertEqual(self.state.placed_nodes(), list(SERVERS[:5]))

    def test_dead_for(self) -> None:
        """dead_for counts from the last heartbeat (or the registry's start), only once dead."""
        clock = task.Clock()
        registry = ChunkServerRegistry(clock, 10.0, grace_after_start=10.0)
        registry.known("never", "h:1")
        registry.heartbeat("gone", "h:2", 1, 0, 0, {})
        clock.advance(5)
        self.assertIsNone(registry.dead_for("gone"))
        self.assertIsNone(registry.dead_for("never"))  # unknown within the grace period
        clock.advance(7)
        self.assertEqual(registry.dead_for("gone"), 12.0)
        self.assertEqual(registry.dead_for("never"), 12.0)
        self.assertIsNone(registry.dead_for("nobody"))
        registry.heartbeat("gone", "h:2", 1, 0, 0, {})
        self.assertIsNone(registry.dead_for("gone"))


class RepairStatusTextTests(StateTestCase):
    def test_describe(self) -> None:
        """`dogfs admin repair status` says what is lost, waiting, running and failing."""
        from dogfs.cli.admin_chunk import _describe

        self.assertEqual(_describe({"active": True, "concurrency": 4}).splitlines()[0], "nothing to repair or move")
        text = _describe({
            "active": True, "concurrency": 4, "repair_after": 600.0, "queued": 7, "rebuilt": 3, "failed": 1,
            "lost_servers": {"chunk-2": {"reason": "dead", "shards": 9}},
            "waiting_servers": {"chunk-5": 42.4},
            "running": [{"block_group": "00000000000000a1", "index": 2, "from": "chunk-2", "to": "chunk-6",
                         "reason": "dead", "margin": 0, "seconds": 1.2}],
            "errors": [{"block_group": "00000000000000a2", "index": 0, "from": "chunk-2",
                        "error": "only 1 of its shards are readable", "s_ago": 5.0}],
        })
        self.assertIn("chunk-2: dead, 9 shards to rebuild or move", text)
        self.assertIn("chunk-5: dead; repair starts in 42s unless it returns (repair_after 600s)", text)
        self.assertIn("block group 00000000000000a1 shard 2: chunk-2 -> chunk-6", text)
        self.assertIn("rebuilt 3, failed 1, queued 7, running 1 (at most 4 at once)", text)
        self.assertIn("only 1 of its shards are readable", text)
