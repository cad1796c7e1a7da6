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
    ExpireAllocations,
    MetaError,
    MoveShard,
    Ok,
    RegisterChunkServer,
    RemoveChunkServer,
    parse_shard_id,
    shard_id,
)
from dogfs.meta.registry import ChunkServerRegistry
from dogfs.meta.repair import DEAD, DRAINING, REMOVED, RepairScheduler, RepairTask
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
        self.closed = False

    def call(self, msg: Any, timeout: float | None = None) -> defer.Deferred[Reply]:
        d: defer.Deferred[Reply] = defer.Deferred()
        self.calls.append((self.address, msg, d))
        return d

    def close(self) -> None:
        self.closed = True


class _Pool:
    """Leases a new _Chunk per task; records what comes back and what is closed."""

    def __init__(self, calls: list[tuple[str, Any, defer.Deferred[Reply]]]) -> None:
        self.calls = calls
        self.leased: list[_Chunk] = []
        self.given_back: list[_Chunk] = []

    def lease(self, address: str) -> defer.Deferred[_Chunk]:
        chunk = _Chunk(self.calls, address)
        self.leased.append(chunk)
        return defer.succeed(chunk)

    def give_back(self, address: str, connection: _Chunk) -> None:
        self.given_back.append(connection)


class _SchedulerCase(StateTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.clock = task.Clock()
        self.registry = ChunkServerRegistry(self.clock, DEAD_AFTER, grace_after_start=DEAD_AFTER)
        self.calls: list[tuple[str, Any, defer.Deferred[Reply]]] = []
        self.pool = _Pool(self.calls)
        self.proposed: list[Any] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.register(6)
        self.registry.known_all(self.state.chunk_servers())  # as the service does
        self.addresses = {node: f"127.0.0.1:{9000 + i}" for i, node in enumerate(SERVERS)}
        self.scheduler = RepairScheduler(
            self.clock, self.state, self.registry, self.propose,
            self.pool, cell_size=4096,
            repair_after=REPAIR_AFTER, interval=INTERVAL, concurrency=4, retry_after=30.0,
            rng=random.Random(7),
            emit=lambda kind, **fields: self.events.append((kind, fields)),
        )

    def propose(self, command: Any) -> defer.Deferred[Any]:
        self.proposed.append(command)
        return defer.succeed(self.run_(command))

    def plan(self) -> list[RepairTask]:
        """Plan a whole slice; the tasks in the order they would run."""
        self.scheduler.plan_slice()
        return [self.scheduler.tasks[key] for key in self.scheduler._order]

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



class RepairSchedulerTests(_SchedulerCase):
    """Planning, dispatch, failures and status."""

    def test_waits_for_repair_after_then_rebuilds_and_moves(self) -> None:
        """A server silent past chunk_dead_after is dead, but its shards are rebuilt only once
        it has been silent for repair_after: then each group's lost shard is rebuilt on a live
        server holding none of the group, from the others, and MoveShard records it there."""
        self.upload("/a", [5000, 9000])  # RS-2-1 on chunk-0, chunk-1, chunk-2
        others = SERVERS[:1] + SERVERS[2:6]
        self.live_for(5, SERVERS[:6])
        self.live_for(DEAD_AFTER + 5, others)
        self.assertEqual(self.registry.state("chunk-1"), "dead")
        self.assertEqual(self.plan(), [])
        self.assertIn("chunk-1", self.scheduler.waiting())
        self.live_for(REPAIR_AFTER, others)
        tasks = self.plan()
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
        self.assertEqual([(k, f["level"], f["node"]) for k, f in self.events], [("repair", "info", "chunk-1")] * 2)
        self.assertIn("(dead) rebuilt on chunk-", self.events[0][1]["message"])
        self.assertEqual(self.plan(), [])
        self.assertEqual(self.scheduler.status()["lost_servers"], {})

    def test_most_endangered_first_one_task_per_group(self) -> None:
        """With room for one task, the group with the fewest readable shards goes first; a
        group never has two tasks at once."""
        self.scheduler.concurrency = 1
        self.place("/safe", ("chunk-0", "chunk-1", "chunk-4", "chunk-3"))  # loses chunk-3 only
        self.place("/one", SERVERS[:4])  # loses chunk-2 and chunk-3
        alive = ("chunk-0", "chunk-1", "chunk-4", "chunk-5")
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        tasks = self.plan()
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
        self.assertEqual(self.pool.given_back, self.pool.leased)  # a refusal keeps a sound connection
        self.assertEqual(self.events[-1][1]["level"], "warn")
        self.assertIn("failed: ", self.events[-1][1]["message"])
        self.live_for(20, alive)
        self.assertEqual(len(self.calls), 1)
        self.live_for(15, alive)
        self.assertEqual(len(self.calls), 2)
        self.answer(self.calls[1])
        self.assertEqual(self.scheduler.stats.rebuilt, 1)
        self.scheduler.stop()
        self.assertFalse(self.scheduler.active)

    def test_broken_connection_closes_only_its_own(self) -> None:
        """Each task has a connection of its own: one that fails (timeout, lost) is closed,
        and the other tasks to the same server go on."""
        self.upload("/a", [100])
        self.upload("/b", [100])
        alive = ("chunk-0", "chunk-2", "chunk-3")  # one target possible for both
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        self.scheduler.tick()
        self.assertEqual([c[0] for c in self.calls], [self.addresses["chunk-3"]] * 2)
        self.calls[0][2].errback(Failure(WireError("timeout", "no answer within 600s")))
        first, second = self.pool.leased
        self.assertEqual((first.closed, second.closed), (True, False))
        self.answer(self.calls[1])
        self.assertEqual(self.pool.given_back, [second])
        self.assertEqual(self.scheduler.stats.rebuilt, 1)

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
        self.assertEqual([t.margin for t in self.plan()], [-1, -1])
        self.scheduler.tick()
        self.assertEqual(self.calls, [])
        status = self.scheduler.status()
        self.assertEqual(status["failed"], 0)
        self.assertEqual(status["blocked"]["unreadable"]["shards"], 2)  # both lost shards
        self.assertIn("only 1 of its other shards are readable, 2 are needed", status["blocked"]["unreadable"]["why"])

    def test_no_server_to_rebuild_onto(self) -> None:
        """Every live server already holds a shard of the group: nothing is sent; noted."""
        self.upload("/a", [100], ec="RS-3-2")  # chunk-0..4
        alive = ("chunk-0", "chunk-1", "chunk-2", "chunk-3")
        self.ok(RemoveChunkServer("chunk-5"))
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        self.scheduler.tick()
        self.assertEqual(self.calls, [])
        status = self.scheduler.status()
        self.assertEqual((status["failed"], status["blocked"]["no_target"]["shards"]), (0, 1))
        self.assertIn("holds a shard of the group already (4 live ones", status["blocked"]["no_target"]["why"])
        self.assertEqual(status["lost_servers"]["chunk-4"]["blocked"], 1)

    def test_draining_server_moves_its_shards(self) -> None:
        """A draining server's shards move at once (it need not die): to a server that is not
        draining, copied from the draining server itself (one shard's traffic), with the
        group's other shards as the fallback, the draining one's read last."""
        self.upload("/a", [100])  # chunk-0..2
        self.ok(DrainChunkServer("chunk-0"))
        self.ok(DrainChunkServer("chunk-3"))
        self.live_for(3, SERVERS[:6])
        [t] = self.plan()
        self.assertEqual((t.index, t.from_node, t.reason, t.margin), (0, "chunk-0", DRAINING, 1))
        self.scheduler.tick()
        [(address, msg, _)] = self.calls
        self.assertIn(address, [self.addresses["chunk-4"], self.addresses["chunk-5"]])
        self.assertEqual([s[0] for s in msg.sources], [0, 1, 2])
        self.assertEqual(msg.sources[0][1:], (msg.shard_id, self.addresses["chunk-0"]))
        self.answer(self.calls[0])
        self.assertEqual(self.plan(), [])
        self.assertEqual(self.scheduler.status()["copied"], 1)
        self.ok(RemoveChunkServer("chunk-0"))

    def test_chunk_server_that_refuses_copies_gets_rebuilds(self) -> None:
        """A chunk server of a release before copies answers invalid_argument to a copy
        source: the task goes again at once, without it (a rebuild from the others), counted
        as no failure; copies are tried on that server again only after NO_COPY_FOR."""
        from dogfs.meta.repair import NO_COPY_FOR

        self.upload("/a", [100])  # chunk-0..2
        self.ok(DrainChunkServer("chunk-0"))
        self.live_for(3, SERVERS[:6])
        self.scheduler.tick()
        [(address, msg, d)] = self.calls
        self.assertEqual(msg.sources[0][0], 0)
        d.errback(WireError("invalid_argument", f"shard {msg.shard_id} cannot be rebuilt from itself"))
        self.clock.advance(0)
        [_, (again_address, again, _)] = self.calls
        self.assertEqual((again_address, [s[0] for s in again.sources]), (address, [1, 2]))
        self.answer(self.calls[1])
        status = self.scheduler.status()
        self.assertEqual((status["failed"], status["rebuilt"], status["copied"]), (0, 1, 0))
        self.assertEqual(self.scheduler._no_copy, {SERVERS[[self.addresses[n] for n in SERVERS].index(address)]: NO_COPY_FOR + self.clock.seconds()})

    def test_a_refusal_for_another_reason_is_not_held_against_copies(self) -> None:
        """A target that refuses the copy and then the rebuild too (a request it cannot
        take, not an older release) is not marked as one that cannot copy: the task fails
        as any, and the next try copies again."""
        self.upload("/a", [100])  # chunk-0..2
        self.ok(DrainChunkServer("chunk-0"))
        self.live_for(3, SERVERS[:6])
        self.scheduler.tick()
        _, msg, d = self.calls[0]
        d.errback(WireError("invalid_argument", "cells too large"))
        self.clock.advance(0)
        _, again, d2 = self.calls[1]
        self.assertNotEqual(again.sources[0][0], msg.index)
        d2.errback(WireError("invalid_argument", "cells too large"))
        self.assertEqual(self.scheduler._no_copy, {})
        self.assertEqual(self.scheduler.status()["failed"], 1)
        self.clock.advance(31)  # retry_after
        self.live_for(1, SERVERS[:6])
        self.scheduler.tick()
        self.assertEqual(self.calls[-1][1].sources[0][0], msg.index)  # a copy again

    def test_undrained_server_leaves_nothing_blocked(self) -> None:
        """A drain that cannot move a shard (every other server holds one of its group) shows
        it blocked for that server; once the drain is undone, nothing is left of it."""
        self.upload("/w", [100], ec="RS-3-3")  # chunk-0..5: all of them
        self.ok(DrainChunkServer("chunk-2"))
        self.live_for(3, SERVERS[:6])
        self.scheduler.tick()
        self.assertEqual(self.calls, [])
        self.assertEqual(self.scheduler.status()["lost_servers"]["chunk-2"]["blocked"], 1)
        self.ok(DrainChunkServer("chunk-2", False))
        self.scheduler.tick()
        status = self.scheduler.status()
        self.assertEqual((status["lost_servers"], status["blocked"]), ({}, {}))

    def test_removed_server_shards_are_rebuilt(self) -> None:
        """A server removed with force (its shards still placed on it) is repaired at once."""
        self.upload("/a", [100])
        self.ok(RemoveChunkServer("chunk-1", force=True))
        self.live_for(3, ("chunk-0", "chunk-2", "chunk-3", "chunk-4", "chunk-5"))
        [t] = self.plan()
        self.assertEqual((t.from_node, t.reason), ("chunk-1", REMOVED))
        self.assertEqual(self.scheduler.status()["lost_servers"], {"chunk-1": {"reason": REMOVED, "shards": 1, "pending": 0, "blocked": 0}})

    def test_uncommitted_uploads_are_left_to_their_client(self) -> None:
        """Shards of an upload not committed yet are not repaired (its client writes around
        failures, or the allocation expires)."""
        self.ok(Allocate("/p", "RS-2-1", SERVERS[:3], 1.0))
        self.ok(DrainChunkServer("chunk-0"))
        self.live_for(3, SERVERS[:6])
        self.assertEqual(self.plan(), [])

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

    def test_rebuilt_in_the_domain_holding_fewest(self) -> None:
        """The target is in the failure domain with fewest of the group's readable shards,
        as a new upload would be placed: never beside another shard while a domain has none."""
        racks = {"chunk-0": "a", "chunk-1": "b", "chunk-2": "c", "chunk-3": "a", "chunk-4": "c", "chunk-5": "b"}
        for seed in range(20):
            self.scheduler.rng = random.Random(seed)
            self.registry = self.scheduler.registry = ChunkServerRegistry(self.clock, DEAD_AFTER)
            for node, rack in racks.items():
                self.registry.heartbeat(node, self.addresses[node], 10**12, 0, 0, {}, rack)
            self.scheduler.stop()
            self.scheduler._retry_at.clear()
            alloc = self.ok(Allocate(f"/f{seed}", "RS-2-1", ("chunk-0", "chunk-1", "chunk-2"), 1.0))
            self.ok(CommitFile(f"/f{seed}", 1, ((alloc.bg_id, 1),), 1.0))
            self.ok(DrainChunkServer("chunk-1"))
            self.calls.clear()
            self.scheduler.tick()
            [(address, _, d)] = self.calls
            self.assertEqual(address, self.addresses["chunk-5"], f"seed {seed}")  # rack b: none left
            d.errback(Failure(WireError("busy", "later")))
            self.ok(DrainChunkServer("chunk-1", False))
            self.ok(Delete(f"/f{seed}"))

    def test_at_most_per_target_and_busy_is_not_a_failure(self) -> None:
        """No server is sent more rebuilds than it takes at once; a `busy` answer is tried
        again at the next tick, without counting as a failure, and its slot goes to another."""
        for i in range(4):
            self.upload(f"/f{i}", [100])
        alive = ("chunk-0", "chunk-2", "chunk-3")  # chunk-3: the only possible target
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        self.scheduler.tick()
        self.assertEqual(len(self.calls), 2)  # concurrency 4, but 2 per target
        busy_shard = self.calls[0][1].shard_id
        self.calls[0][2].errback(Failure(WireError("busy", "2 rebuilds are running here already")))
        self.clock.advance(0)
        self.assertEqual(len(self.calls), 3)
        self.assertNotEqual(self.calls[2][1].shard_id, busy_shard)
        self.assertEqual((self.scheduler.stats.failed, list(self.scheduler.stats.errors)), (0, []))
        self.answer(self.calls[1])
        self.answer(self.calls[2])
        self.clock.advance(0)
        self.assertEqual(len(self.calls), 4)
        self.assertNotEqual(self.calls[3][1].shard_id, busy_shard)  # not before the next tick
        self.answer(self.calls[3])
        self.live_for(INTERVAL, alive)
        self.scheduler.tick()
        self.assertEqual(self.calls[4][1].shard_id, busy_shard)
        self.answer(self.calls[4])
        self.assertEqual(self.scheduler.stats.rebuilt, 4)

    def test_planning_goes_round_in_slices(self) -> None:
        """A tick reads at most plan_batch placements, resuming where the last stopped and
        starting again from the first: every lost shard is seen whatever blocks the first."""
        self.scheduler.plan_batch = 2
        for i in range(5):
            self.upload(f"/f{i}", [100])
        self.ok(DrainChunkServer("chunk-0"))
        self.live_for(3, SERVERS[:6])
        seen = set()
        for _ in range(3):
            self.scheduler.plan_slice()
            seen |= set(self.scheduler.tasks)
            self.assertLessEqual(len(self.scheduler.tasks), 2 * 3)
        self.assertEqual(len(seen), 5)
        self.assertIsNone(self.scheduler._cursors["chunk-0"])  # wrapped: the next starts over

    def test_an_error_in_planning_does_not_stop_it(self) -> None:
        """An exception in a tick is logged; the next tick plans again."""
        self.upload("/a", [100])
        alive = ("chunk-0", "chunk-2", "chunk-3", "chunk-4", "chunk-5")
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        real, calls = self.state.placed_nodes, []

        def flaky() -> list[str]:
            calls.append(1)
            if len(calls) == 1:
                raise OSError("LMDB said no")
            return real()

        self.state.placed_nodes = flaky
        self.scheduler.start()
        self.live_for(INTERVAL, alive)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.calls, [])
        self.live_for(INTERVAL, alive)
        self.assertEqual(len(self.calls), 1)
        self.assertTrue(self.scheduler.active)
        self.scheduler.stop()

    def test_status_counts_pending_apart(self) -> None:
        """A draining server's shards of uploads in progress are counted apart: repair leaves
        them to their clients, and a drain waits for committed shards only."""
        self.upload("/a", [100])
        self.ok(Allocate("/p", "RS-2-1", SERVERS[:3], 1.0))
        self.ok(DrainChunkServer("chunk-0"))
        self.live_for(3, SERVERS[:6])
        self.assertEqual(self.scheduler.status()["lost_servers"]["chunk-0"],
                         {"reason": DRAINING, "shards": 1, "pending": 1, "blocked": 0})

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
            h.clock, h.state, h.registry, h.log.propose, _Pool([]), 4096,
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
        self.assertEqual(error.code, "failed_precondition")
        self.assertIn("chunk-2 is running: stop it first", error.message)
        h.clock.advance(11)  # silent past chunk_dead_after
        for node in ("chunk-1", "chunk-3", "chunk-4", "chunk-5", "chunk-6"):
            h.heartbeat(node)
        self.assertEqual(h.result(RemoveChunkServer("chunk-2")), Ok())
        self.assertNotIn("chunk-2", [r.node_id for r in h.state.chunk_servers()])
        self.assertIsNone(h.registry.state("chunk-2"))

    def test_force_removed_id_not_registered_again(self) -> None:
        """A server removed with --force while groups placed shards on it cannot register
        again under that id (a fresh disk would be trusted with shards it lacks) until the
        shards have moved; another id can."""
        h = self.harness()
        alloc = h.result(c_allocate())
        h.result(CommitFile("/f", 1, ((alloc.bg_id, 1),)))
        node = alloc.shards[0].node_id
        h.clock.advance(11)
        for other in {f"chunk-{i}" for i in range(1, 7)} - {node}:
            h.heartbeat(other)
        h.result(RemoveChunkServer(node, force=True))
        error = h.error(m.Heartbeat(node, "127.0.0.1:7999", 10**12, 0, 0, {}, None))
        self.assertEqual(error.code, "permission_denied")
        self.assertIn(f"chunk server {node} was removed while block groups still placed shards", error.message)
        self.assertNotIn(node, [r.node_id for r in h.state.chunk_servers()])
        self.assertIsNone(h.registry.state(node))
        h.heartbeat("chunk-9")
        self.assertIn("chunk-9", [r.node_id for r in h.state.chunk_servers()])

    def test_remove_refused_while_a_new_leader_has_not_heard(self) -> None:
        """A leader that took over has not heard from anyone yet: it cannot tell a running
        server from a stopped one, so removal waits (not_ready, with how long)."""
        h = self.harness()
        fresh = ChunkServerRegistry(h.clock, 10.0)
        fresh.known_all(h.state.chunk_servers())
        h.handlers.registry = fresh
        error = self.failureResultOf(h.command(RemoveChunkServer("chunk-3")), WireError).value
        self.assertEqual(error.code, "not_ready")
        self.assertIn("took over 10s too recently", error.message)
        h.clock.advance(10.5)
        self.assertEqual(h.result(RemoveChunkServer("chunk-3")), Ok())

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


def c_allocate() -> Allocate:
    return Allocate("/f", "RS-2-1", ())


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

        self.assertEqual(_describe({"active": True, "concurrency": 4}).splitlines()[0], "nothing to repair")
        text = _describe({
            "active": True, "concurrency": 4, "repair_after": 600.0, "queued": 7, "rebuilt": 3, "failed": 1,
            "lost_servers": {"chunk-2": {"reason": "dead", "shards": 9}},
            "waiting_servers": {"chunk-5": 42.4},
            "missing_shards": {"chunk-1": 2},
            "running": [{"block_group": "00000000000000a1", "index": 2, "from": "chunk-2", "to": "chunk-6",
                         "reason": "dead", "margin": 0, "seconds": 1.2}],
            "errors": [{"block_group": "00000000000000a2", "index": 0, "from": "chunk-2",
                        "error": "only 1 of its shards are readable", "s_ago": 5.0}],
            "blocked": {"no_target": {"shards": 1, "why": "all taken"}},
        })
        self.assertIn("chunk-2: dead, 9 shards to rebuild or move", text)
        self.assertIn("1 shard wait (no_target): all taken", text)
        self.assertIn("chunk-1: alive, but 2 shards left out of its last two shard reports", text)
        self.assertIn("chunk-5: dead; repair starts in 42s unless it returns (repair_after 600s)", text)
        self.assertIn("block group 00000000000000a1 shard 2: chunk-2 -> chunk-6", text)
        self.assertIn("rebuilt 3, failed 1, queued 7, running 1 (at most 4 at once)", text)
        self.assertIn("only 1 of its shards are readable", text)
        self.assertIn("balancing: off ([meta] balance = false)", text)

    def test_describe_balance(self) -> None:
        """The balancer's lines: what it does (waiting for repair, moving, balanced), the
        fullest and emptiest servers, and what it has moved."""
        from dogfs.cli.admin_chunk import _describe

        balance = {"threshold": 0.1, "balanced": False, "average": 0.26, "queued": 5, "running": 2,
                   "utilization": {"chunk-1": 0.4, "chunk-2": 0.3, "chunk-7": 0.0},
                   "moved": 3, "moved_bytes": 3 << 20, "rounds": 1}
        base = {"active": True, "concurrency": 4, "copied": 2, "rebuilt": 2,
                "running": [{"block_group": "00000000000000a1", "index": 2, "from": "chunk-1",
                             "to": "chunk-7", "reason": "balance", "margin": 2, "seconds": 0.5}]}
        text = _describe({**base, "balance": balance})
        self.assertEqual(text.splitlines()[0], "nothing to repair")
        self.assertIn("rebuilt 2 (2 copied from where they were)", text)
        self.assertIn("balancing: moving shards (5 queued, 2 running) until every server is within 10 points", text)
        self.assertIn("utilization: average 26.0%, fullest chunk-1 40.0%, emptiest chunk-7 0.0%", text)
        self.assertIn("moved 3 shards (3.0 MiB) in 1 round", text)
        text = _describe({**base, "lost_servers": {"chunk-2": {"reason": "draining", "shards": 1}}, "balance": balance})
        self.assertIn("balancing: waits until nothing needs repair", text)
        done = {**balance, "balanced": True, "queued": 0, "running": 0}
        self.assertIn("balancing: balanced: every server within 10 points of the average",
                      _describe({**base, "running": [], "balance": done}))


class RepairRegressionTests(_SchedulerCase):
    """Cases a review found wrong, each with what must happen instead."""

    def wait_drained(self, node: str, polls: int, between: Any = None) -> str:
        """Run `drain --wait`'s loop (dogfs/cli/admin_chunk.py) against this scheduler's
        status on the simulated clock: each poll lets one second pass (``between`` makes the
        live servers heartbeat through it). "done", "stopped: ..." or "still waiting"."""
        from dogfs.cli import admin_chunk, output

        test, seen = self, []

        class Client:
            clock = test.clock

            async def repair_status(self) -> dict[str, Any]:
                seen.append(1)
                if len(seen) > polls:
                    raise RuntimeError("still waiting")
                return test.scheduler.status()

        def tick_second() -> None:
            if between is not None:
                between()
            else:
                self.clock.advance(1)

        left, pending = admin_chunk._left(self.scheduler.status(), node)
        d = defer.Deferred.fromCoroutine(
            admin_chunk._wait_drained(Client(), node, left, pending, True)
        )
        for _ in range(polls + 1):
            if d.called:
                break
            tick_second()
        if not d.called:
            return "still waiting"
        if isinstance(d.result, Failure):
            failure = self.failureResultOf(d)
            if failure.check(output.CLIError):
                return "stopped: " + str(failure.value)
            return "still waiting"
        self.successResultOf(d)
        return "done"

    def test_blocked_counted_per_shard(self) -> None:
        """A group with shards on a dead and on a draining server, neither movable: both are
        counted blocked, and drain --wait of the draining one stops, saying why."""
        self.upload("/w", [100], ec="RS-3-3")  # chunk-0..5: every server
        self.ok(DrainChunkServer("chunk-2"))
        alive = ("chunk-0", "chunk-1", "chunk-2", "chunk-3", "chunk-4")  # chunk-5 dies
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        self.scheduler.start()
        self.live_for(3 * INTERVAL, alive)
        status = self.scheduler.status()
        self.assertEqual(self.calls, [])
        self.assertEqual(status["lost_servers"]["chunk-2"]["blocked"], 1)
        self.assertEqual(status["lost_servers"]["chunk-5"]["blocked"], 1)
        outcome = self.wait_drained("chunk-2", polls=60, between=lambda: self.live_for(1, alive))
        self.assertTrue(outcome.startswith("stopped: chunk-2 cannot be drained now"), outcome)
        self.scheduler.stop()

    def test_deleted_blocked_group_is_forgotten(self) -> None:
        """A blocked group deleted meanwhile stops counting once a round over its server has
        not found it: drain --wait then waits for the move under way and ends done."""
        self.upload("/stuck", [100], ec="RS-3-3")  # chunk-0..5: nowhere to move chunk-0's
        self.place("/movable", ("chunk-0", "chunk-1", "chunk-2", "chunk-3"))
        self.ok(Delete("/movable"))
        alloc = self.ok(Allocate("/movable", "RS-2-1", ("chunk-0", "chunk-1", "chunk-2"), 1.0))
        self.ok(CommitFile("/movable", 100, ((alloc.bg_id, 100),), 1.0))
        self.ok(DrainChunkServer("chunk-0"))
        self.live_for(3, SERVERS[:6])
        self.scheduler.tick()
        self.assertEqual(len(self.calls), 1)
        self.assertEqual(self.scheduler.status()["lost_servers"]["chunk-0"]["blocked"], 1)
        self.ok(Delete("/stuck"))
        self.live_for(INTERVAL, SERVERS[:6])
        self.scheduler.tick()  # a whole round over chunk-0 without it
        self.assertEqual(self.scheduler.status()["lost_servers"]["chunk-0"]["blocked"], 0)

        def between() -> None:
            self.live_for(1, SERVERS[:6])
            if len(self.calls) == 1 and not self.calls[0][2].called:
                self.answer(self.calls[0])

        self.assertEqual(self.wait_drained("chunk-0", polls=10, between=between), "done")

    def test_second_shard_of_a_group_not_sent_where_the_first_went(self) -> None:
        """Two lost shards of one group: the second's target is chosen from the group as it
        is once the first has moved, never the server the first went to."""
        for seed in range(12):
            self.setUp()
            self.scheduler.rng = random.Random(seed)
            self.scheduler.concurrency = 1
            self.place("/one", SERVERS[:4])
            alive = ("chunk-0", "chunk-1", "chunk-4", "chunk-5")
            self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
            self.scheduler.tick()
            self.answer(self.calls[0])
            self.clock.advance(0)
            self.assertNotEqual(self.calls[1][0], self.calls[0][0], f"seed {seed}")
            self.answer(self.calls[1])
            self.assertEqual((self.scheduler.stats.rebuilt, self.scheduler.stats.failed), (2, 0))

    def test_no_lost_server_starved(self) -> None:
        """Each tick starts with the next lost server: unreadable placements of the others
        cannot take every tick's budget from a server whose shard can move."""
        self.scheduler.plan_batch = 3
        self.upload("/u", [100, 100])  # chunk-0..2, twice: unreadable once 1 and 2 die
        alloc = self.ok(Allocate("/ok", "RS-2-1", ("chunk-3", "chunk-4", "chunk-5"), 1.0))
        self.ok(CommitFile("/ok", 100, ((alloc.bg_id, 100),), 1.0))
        alive = ("chunk-0", "chunk-4", "chunk-5")  # chunk-1, 2, 3 dead
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        self.scheduler.start()
        self.live_for(4 * INTERVAL, alive)
        self.assertEqual([(c[0], c[1].index) for c in self.calls], [(self.addresses["chunk-0"], 0)])
        self.scheduler.stop()

    def test_unreadable_groups_cost_one_pass(self) -> None:
        """Unreadable groups are blocked without entering `running`: one dispatch pass, no
        storm of passes on later reactor turns."""
        for i in range(300):
            alloc = self.ok(Allocate(f"/f{i}", "RS-2-1", ("chunk-0", "chunk-1", "chunk-2"), 1.0))
            self.ok(CommitFile(f"/f{i}", 1, ((alloc.bg_id, 1),), 1.0))
        alive = ("chunk-0", "chunk-3", "chunk-4", "chunk-5")
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        passes: list[int] = []
        real = self.scheduler._dispatch
        self.scheduler._dispatch = lambda: (passes.append(1), real())[1]  # type: ignore[method-assign]
        self.scheduler.tick()
        self.clock.advance(0)
        self.assertEqual((len(passes), self.calls, len(self.scheduler.blocked)), (1, [], 600))

    def test_unregistered_live_server_not_a_target(self) -> None:
        """A server heartbeating before its registration is applied is no target: nothing is
        sent, and no dispatch loop spins."""
        self.upload("/a", [100])
        self.addresses["chunk-6"] = "127.0.0.1:9006"
        alive = ("chunk-0", "chunk-2", "chunk-6")
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, alive)
        self.scheduler.tick()
        self.clock.advance(0)
        self.assertEqual(self.calls, [])
        self.assertEqual(self.scheduler.status()["blocked"]["no_target"]["shards"], 1)

    def test_full_domain_does_not_block_others(self) -> None:
        """When the domain holding fewest of the group's shards is full, another with room
        takes the shard."""
        racks = {"chunk-0": "a", "chunk-1": "b", "chunk-2": "c", "chunk-3": "d", "chunk-4": "c", "chunk-5": "a"}
        self.upload("/a", [100])
        self.ok(DrainChunkServer("chunk-1"))
        for _ in range(4):
            for node, rack in racks.items():
                used = 10**12 if node == "chunk-3" else 0
                self.registry.heartbeat(node, self.addresses[node], 10**12, used, 0, {}, rack)
            self.clock.advance(1)
        self.scheduler.tick()
        self.assertIn(self.calls[0][0], [self.addresses["chunk-4"], self.addresses["chunk-5"]])

    def test_new_server_unblocks_at_once(self) -> None:
        """drain --wait says "add chunk servers": once one is added, what was blocked is
        tried at the next tick, and the drain finishes."""
        self.upload("/w", [100], ec="RS-3-3")
        self.ok(DrainChunkServer("chunk-2"))
        self.live_for(3, SERVERS[:6])
        self.scheduler.start()
        self.live_for(INTERVAL, SERVERS[:6])
        self.assertEqual(self.scheduler.status()["lost_servers"]["chunk-2"]["blocked"], 1)
        self.ok(RegisterChunkServer("chunk-6", "127.0.0.1:9006"))
        self.addresses["chunk-6"] = "127.0.0.1:9006"

        def between() -> None:
            self.live_for(1, SERVERS[:7])
            for call in self.calls:
                if not call[2].called:
                    self.answer(call)

        self.assertEqual(self.wait_drained("chunk-2", polls=3 * int(INTERVAL), between=between), "done")
        self.assertEqual([c[0] for c in self.calls], ["127.0.0.1:9006"])
        self.scheduler.stop()

    def test_drain_waits_for_uploads_in_progress(self) -> None:
        """drain --wait ends only once no shard of an upload in progress is on the server
        either (remove would refuse it)."""
        self.ok(Allocate("/p", "RS-2-1", SERVERS[:3], 1.0))
        self.ok(DrainChunkServer("chunk-0"))
        self.live_for(3, SERVERS[:6])
        self.assertEqual(self.wait_drained("chunk-0", polls=5, between=lambda: self.live_for(1, SERVERS[:6])),
                         "still waiting")
        self.ok(ExpireAllocations(1e9))
        self.assertEqual(self.wait_drained("chunk-0", polls=5, between=lambda: self.live_for(1, SERVERS[:6])),
                         "done")


class ReportGapTests(StateTestCase):
    """The leader finds the shards a live server no longer holds from its shard reports."""

    def setUp(self) -> None:
        super().setUp()
        from tests.test_meta_service import Harness

        self.h = Harness(self)
        self.ids: list[str] = []
        for i in range(5):
            alloc = self.h.result(Allocate(f"/f{i}", "RS-2-1", ()))
            self.h.result(CommitFile(f"/f{i}", 1, ((alloc.bg_id, 1),)))
            self.ids += [s.shard_id for s in alloc.shards if s.node_id == "chunk-1"]
        self.assertGreaterEqual(len(self.ids), 2)

    def report(self, node: str, ids: list[str], per_batch: int = 2) -> None:
        batches = [ids[i : i + per_batch] for i in range(0, len(ids), per_batch)] or [[]]
        for n, batch in enumerate(batches):
            self.h.ok(m.ShardReport(node, n, n == len(batches) - 1), "\n".join(batch).encode("ascii"))

    def move_away(self, bg_id: int, index: int) -> None:
        """Move shard ``index`` of the group from chunk-1 to a server holding none of it."""
        holders = {s.node_id for s in self.h.state.block_group(bg_id)[0].shards}
        to = min({f"chunk-{i}" for i in range(2, 7)} - holders)
        result = self.successResultOf(self.h.log.propose(MoveShard(bg_id, index, "chunk-1", to)))
        self.assertEqual(result, Ok())

    def test_left_out_twice_is_missing(self) -> None:
        """A shard left out of one report is not yet missing (it may be newer than the
        server's list); left out of two in a row, it is. Found wherever it falls: between
        batches, at the end, alone."""
        for gone in (self.ids[0], self.ids[len(self.ids) // 2], self.ids[-1]):
            self.h.handlers.forget_reports()
            held = [i for i in self.ids if i != gone]
            self.report("chunk-1", held)
            self.assertEqual(self.h.handlers.missing["chunk-1"], set())
            self.report("chunk-1", held)
            self.assertEqual(self.h.handlers.missing["chunk-1"], {parse_shard_id(gone)}, gone)
            self.report("chunk-1", self.ids)  # back (a fresh copy)
            self.assertEqual(self.h.handlers.missing["chunk-1"], set())

    def test_nothing_concluded_from_a_broken_report(self) -> None:
        """A report out of sequence (a batch skipped, restarted, another leader) or not in
        order concludes nothing."""
        held = self.ids[1:]
        self.report("chunk-1", held)
        batches = [held[i : i + 2] for i in range(0, len(held), 2)]
        self.h.ok(m.ShardReport("chunk-1", 0, False), "\n".join(batches[0]).encode("ascii"))
        self.h.ok(m.ShardReport("chunk-1", 2, True), "\n".join(batches[-1]).encode("ascii"))
        self.assertEqual(self.h.handlers.missing["chunk-1"], set())
        self.report("chunk-1", list(reversed(held)))
        self.assertEqual(self.h.handlers.missing["chunk-1"], set())

    def test_a_late_batch_of_another_report_concludes_nothing(self) -> None:
        """A late batch 0 of a report the server gave up on, arriving after the first batch
        of its next report, is not taken for part of it (the report numbers differ). Taken
        for it, it would call a shard missing that the server holds: here ids[1], left out
        of the first report (just committed, say) and of the stale batch, but listed in the
        real one."""
        ids = self.ids
        self.report("chunk-1", [ids[0]] + ids[2:])
        self.h.ok(m.ShardReport("chunk-1", 0, False, (), 8), "\n".join(ids[:2]).encode("ascii"))
        self.h.ok(m.ShardReport("chunk-1", 0, False, (), 7), ids[0].encode("ascii"))  # late
        self.h.ok(m.ShardReport("chunk-1", 1, True, (), 8), "\n".join(ids[2:]).encode("ascii"))
        self.assertEqual(self.h.handlers.missing["chunk-1"], set())
        # The next whole report is heard as usual, and finds nothing missing.
        for n, batch in enumerate([ids[:2], ids[2:]]):
            self.h.ok(m.ShardReport("chunk-1", n, n == 1, (), 9), "\n".join(batch).encode("ascii"))
        self.assertEqual(self.h.handlers.missing["chunk-1"], set())
        # While one left out of two whole reports is.
        for number in (10, 11):
            for n, batch in enumerate([ids[:2], ids[3:]]):
                self.h.ok(m.ShardReport("chunk-1", n, n == 1, (), number), "\n".join(batch).encode("ascii"))
        self.assertEqual(len(self.h.handlers.missing["chunk-1"]), 1)

    def test_scheduler_rebuilds_missing_shards(self) -> None:
        """A missing shard of a live server is rebuilt elsewhere like a lost one, from the
        group's other shards."""
        gone = self.ids[0]
        held = self.ids[1:]
        self.report("chunk-1", held)
        self.report("chunk-1", held)
        calls: list[tuple[str, Any, defer.Deferred[Reply]]] = []
        scheduler = RepairScheduler(
            self.h.clock, self.h.state, self.h.registry, self.h.log.propose, _Pool(calls), 4096,
            missing=lambda: self.h.handlers.missing, rng=random.Random(3),
        )
        scheduler.tick()
        [(address, msg, d)] = calls
        bg_id, index = parse_shard_id(gone)
        self.assertEqual((msg.shard_id, msg.index), (gone, index))
        self.assertNotIn("127.0.0.1:7101", [s[2] for s in msg.sources])  # chunk-1's port
        d.callback(Reply(m.ShardStored(gone, 10), b""))
        group = self.h.state.block_group(bg_id)[0]
        self.assertNotEqual(group.shards[index].node_id, "chunk-1")
        self.assertEqual(scheduler.stats.rebuilt, 1)

    def test_missing_of_a_server_gone_since_cost_nothing(self) -> None:
        """A server whose many missing shards were all moved away by a repair, and which
        reports no more, does not take the planning budget from another server's missing
        shard: its keys are dropped once looked at."""
        from dogfs.meta import repair as repair_module

        self.patch(repair_module, "MISSING_BATCH", 3)
        for bg_id, index in sorted(map(parse_shard_id, self.ids)):
            self.move_away(bg_id, index)
        self.h.handlers.missing["chunk-1"] = {parse_shard_id(i) for i in self.ids}  # as reported before
        alloc = self.h.result(Allocate("/victim", "RS-2-1", ()))
        self.h.result(CommitFile("/victim", 1, ((alloc.bg_id, 1),)))
        node, index = alloc.shards[0].node_id, 0
        self.h.handlers.missing[node] = {(alloc.bg_id, index)}
        scheduler = RepairScheduler(
            self.h.clock, self.h.state, self.h.registry, self.h.log.propose, _Pool([]), 4096,
            missing=lambda: self.h.handlers.missing, rng=random.Random(3),
        )
        for _ in range(4):
            scheduler.plan_slice()
        self.assertIn((alloc.bg_id, index), scheduler.tasks)
        self.assertEqual(self.h.handlers.missing["chunk-1"], set())

    def test_a_large_gap_is_found_a_slice_per_report(self) -> None:
        """A server that left out very many shards (a disk replaced under the same id) costs
        the leader a bounded amount per report: the first MAX_ABSENT are found, and the next
        ones by later reports once those have moved."""
        from dogfs.meta import service as service_module

        self.patch(service_module, "MAX_ABSENT", 2)
        self.patch(service_module, "GAP_BATCH", 5)
        placed = sorted(map(parse_shard_id, self.ids))
        self.report("chunk-1", [])
        self.report("chunk-1", [])
        first = self.h.handlers.missing["chunk-1"]
        self.assertEqual(first, set(placed[:2]))
        for bg_id, index in first:
            self.move_away(bg_id, index)
        self.report("chunk-1", [])
        self.report("chunk-1", [])
        self.assertEqual(self.h.handlers.missing["chunk-1"], set(placed[2:4]))
