"""Tests for dogfs.meta.balance: the census, rounds of moves, and how the repair scheduler runs
them (simulated time, real LMDB state, the real registry; chunk servers are fakes that record
the RebuildShard they are sent)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from dogfs.config import ConfigError, load_meta
from dogfs.meta.balance import BALANCE, Balancer, domains_of, evens_out, may_take
from dogfs.meta.commands import Allocate, CommitFile, Delete, DrainChunkServer, MoveShard
from dogfs.meta.placement import ChunkServerLoad
from dogfs.meta.repair import RepairScheduler
from tests.test_meta_state import SERVERS, StateTestCase
from tests.test_repair import DEAD_AFTER, INTERVAL, REPAIR_AFTER, _Pool, _SchedulerCase

#: Bytes a test server can hold: a 100-byte RS-2-2 group puts 50 on each of 4 servers.
CAPACITY = 1000


class CensusTests(StateTestCase):
    """NamespaceState.placed_bytes and the balancer's census over it."""

    def setUp(self) -> None:
        super().setUp()
        self.register(6)

    def place(self, path: str, size: int, nodes: tuple[str, ...], ec: str = "RS-2-2") -> int:
        alloc = self.ok(Allocate(path, ec, nodes, 1.0))
        self.ok(CommitFile(path, size, ((alloc.bg_id, size),), 1.0))
        return int(alloc.bg_id)

    def test_counts_committed_groups_by_node(self) -> None:
        """Each shard counts ceil(size / k) bytes on its server; uncommitted groups count
        nothing; slices resume where the last stopped and add up to the whole."""
        self.place("/a", 101, SERVERS[:4])  # 51 each
        self.place("/b", 300, SERVERS[2:6], ec="RS-3-1")  # 100 each
        self.ok(Allocate("/pending", "RS-2-2", SERVERS[:4], 1.0))
        whole, resume, looked = self.state.placed_bytes()
        self.assertEqual((resume, looked), (None, 3))
        self.assertEqual(whole, {"chunk-0": 51, "chunk-1": 51, "chunk-2": 151, "chunk-3": 151,
                                 "chunk-4": 100, "chunk-5": 100})
        first, resume, looked = self.state.placed_bytes(limit=1)
        self.assertEqual((first, looked), ({n: 51 for n in SERVERS[:4]}, 1))
        self.assertIsNotNone(resume)
        total = dict(first)
        while resume is not None:
            part, resume, _ = self.state.placed_bytes(start_after=resume, limit=1)
            for node, size in part.items():
                total[node] = total.get(node, 0) + size
        self.assertEqual(total, whole)

    def test_census_pass_in_slices(self) -> None:
        """The census completes a pass only after reading every slice, and a removed file
        drops out of the next pass."""
        for i in range(5):
            self.place(f"/f{i}", 100, SERVERS[:4])
        balancer = Balancer(self.state, census_batch=2)
        self.assertEqual([balancer.census_step(float(t)) for t in range(3)], [False, False, True])
        self.assertEqual(balancer.census, {n: 250 for n in SERVERS[:4]})
        self.assertEqual(balancer.census_began, 0.0)
        self.ok(Delete("/f0"))
        while not balancer.census_step(10.0):
            pass
        self.assertEqual(balancer.census, {n: 200 for n in SERVERS[:4]})
        self.assertEqual(balancer.census_began, 10.0)


def load(node: str, capacity: int = CAPACITY, domain: str | None = None, used: int = 0) -> ChunkServerLoad:
    return ChunkServerLoad(node, used, capacity, domain)


class PlanTests(StateTestCase):
    """Balancer.plan: which shards move where."""

    def setUp(self) -> None:
        super().setUp()
        self.register(6)
        self.groups = []
        for i in range(10):  # 10 RS-2-2 groups of 100 bytes: 500 bytes on each of chunk-0..3
            alloc = self.ok(Allocate(f"/f{i}", "RS-2-2", SERVERS[:4], 1.0))
            self.ok(CommitFile(f"/f{i}", 100, ((alloc.bg_id, 100),), 1.0))
            self.groups.append(alloc.bg_id)
        self.balancer = Balancer(self.state)
        while not self.balancer.census_step(0.0):
            pass

    def test_new_servers_take_their_share(self) -> None:
        """Two empty servers join four at 50%: the average is 33%, so each full server gives
        what it holds above it (at most 3 shards of 50 bytes, not a 4th that would overshoot),
        to the empty ones, one move per block group (so 10 for the 10 groups in the first
        round). Applied, and counted again, the next round finishes the job: every server
        within the threshold of the average, and a third plans nothing."""
        loads = [load(n) for n in SERVERS[:6]]
        moves = self.balancer.plan(loads, {})
        self.assertFalse(self.balancer.balanced)
        self.assertAlmostEqual(self.balancer.average or 0, 2000 / 6000)
        self.assertEqual(len(moves), 10)
        self.assertEqual(sorted({m.from_node for m in moves}), list(SERVERS[:4]))
        self.assertTrue(all(n <= 3 for n in Counter(m.from_node for m in moves).values()))
        self.assertEqual({m.to_node for m in moves}, {"chunk-4", "chunk-5"})
        self.assertEqual(len({m.bg_id for m in moves}), len(moves))
        self.assertTrue(all(m.size == 50 and m.margin == 2 for m in moves))
        rounds = 1
        while moves:
            for m in moves:
                self.ok(MoveShard(m.bg_id, m.index, m.from_node, m.to_node))
            while not self.balancer.census_step(float(rounds)):
                pass
            moves = self.balancer.plan(loads, {})
            rounds += 1
        self.assertEqual((rounds, self.balancer.rounds, self.balancer.balanced), (3, 2, True))
        held = self.state.placed_bytes()[0]
        self.assertEqual(sum(held.values()), 2000)
        self.assertTrue(all(abs(held[n] / CAPACITY - 1 / 3) <= 0.10 for n in SERVERS[:6]), held)

    def test_balanced_cluster_plans_nothing(self) -> None:
        """Within the threshold of the average everywhere: no moves, and it says balanced."""
        moves = self.balancer.plan([load(n) for n in SERVERS[:4]], {})
        self.assertEqual((moves, self.balancer.balanced), ([], True))
        self.assertEqual(self.balancer.status(5.0)["spread"], 0.0)

    def test_capacity_decides_not_bytes(self) -> None:
        """Utilization is bytes over capacity: a server twice as large holding as much is
        the emptier, and takes shards; one of a single server plans nothing."""
        loads = [load("chunk-0", 5000)] + [load(n) for n in SERVERS[1:4]] + [load("chunk-4", 4000)]
        moves = self.balancer.plan(loads, {})
        self.assertTrue(moves)
        self.assertEqual({m.to_node for m in moves}, {"chunk-4"})
        self.assertNotIn("chunk-0", {m.from_node for m in moves})
        self.assertEqual(self.balancer.plan([load("chunk-4")], {}), [])
        self.assertIsNone(self.balancer.balanced)

    def test_full_target_takes_nothing(self) -> None:
        """A target whose disk has no room left for a shard gets none, however empty the
        namespace says it is."""
        loads = [load(n) for n in SERVERS[:4]] + [load("chunk-4", used=CAPACITY), load("chunk-5")]
        moves = self.balancer.plan(loads, {})
        self.assertTrue(moves)
        self.assertEqual({m.to_node for m in moves}, {"chunk-5"})

    def test_failure_domains_never_narrow(self) -> None:
        """With chunk-0 and chunk-1 in rack A, chunk-2 and chunk-3 in rack B, chunk-4 in rack
        A and chunk-5 in rack C: a shard may go to rack A's chunk-4 only from rack A."""
        domains = {"chunk-0": "A", "chunk-1": "A", "chunk-2": "B", "chunk-3": "B", "chunk-4": "A", "chunk-5": "C"}
        loads = [load(n, domain=d) for n, d in domains.items()]
        moves = self.balancer.plan(loads, domains_of(loads))
        self.assertTrue(moves)
        for m in moves:
            if m.to_node == "chunk-4":
                self.assertIn(m.from_node, ("chunk-0", "chunk-1"), m)

    def test_may_take(self) -> None:
        """The rule itself: never a server of the group; never a domain holding more of the
        group's other shards than the source's domain; servers without a domain are their own."""
        domains = {"a1": "domain:A", "a2": "domain:A", "b1": "domain:B", "c1": "domain:C"}
        self.assertFalse(may_take("a1", "b1", ["a1", "b1"], domains))
        self.assertTrue(may_take("a1", "a2", ["a1", "b1"], domains))  # A keeps one
        self.assertFalse(may_take("b1", "a2", ["a1", "b1"], domains))  # A would hold two
        self.assertTrue(may_take("b1", "c1", ["a1", "b1"], domains))
        self.assertTrue(may_take("a1", "x", ["a1", "b1"], domains))  # x: a domain of its own

    def test_threshold_must_be_a_fraction(self) -> None:
        for bad in (0.0, 1.0, -0.1, 2.0):
            self.assertRaises(ValueError, Balancer, self.state, threshold=bad)



class ConvergenceTests(StateTestCase):
    """Rounds end: every move makes the servers more even, so none goes back and forth."""

    def fresh(self, groups: list[tuple[str, int, tuple[str, ...]]]) -> Balancer:
        """A new namespace with eight servers and one committed file per group, and a
        balancer over it."""
        self.state, self.index = self.make_state(), 0
        self.register(len(SERVERS))
        for i, (ec, size, nodes) in enumerate(groups):
            alloc = self.ok(Allocate(f"/g{i}", ec, nodes, 1.0))
            self.ok(CommitFile(f"/g{i}", size, ((alloc.bg_id, size),), 1.0))
        return Balancer(self.state)

    def rounds(self, balancer: Balancer, loads: list[ChunkServerLoad], limit: int = 30) -> list[Any]:
        """Plan and apply rounds until one plans nothing; every move made (fails the test
        past ``limit`` rounds)."""
        made: list[Any] = []
        for r in range(limit):
            while not balancer.census_step(float(r)):
                pass
            moves = balancer.plan(loads, {})
            if not moves:
                return made
            for m in moves:
                self.ok(MoveShard(m.bg_id, m.index, m.from_node, m.to_node))
            made += moves
        self.fail(f"still moving after {limit} rounds: {[(m.from_node, m.to_node) for m in made[-6:]]}")

    def test_a_shard_too_large_does_not_go_back_and_forth(self) -> None:
        """One RS-1-1 group of 400 bytes on chunk-0 and chunk-3 of four 1000-byte servers:
        moving a shard to an empty server would only swap which server is above the average
        (the review's case: it went back and forth every round), so nothing moves, and the
        status says settled, not balanced."""
        balancer = self.fresh([("RS-1-1", 400, ("chunk-0", "chunk-3"))])
        self.assertEqual(self.rounds(balancer, [load(n) for n in SERVERS[:4]]), [])
        self.assertEqual((balancer.balanced, balancer.settled), (False, True))
        self.assertTrue(balancer.status(0.0)["settled"])

    def test_rounds_always_end(self) -> None:
        """Random small clusters (seeded): whatever the shard sizes and policies, rounds end
        within a few."""
        rng = random.Random(4)
        for trial in range(60):
            ec = rng.choice(["RS-1-1", "RS-2-1", "RS-2-2", "RS-3-2"])
            k, m = (int(x) for x in ec.split("-")[1:])
            servers = SERVERS[: rng.randint(k + m + 1, min(len(SERVERS), k + m + 4))]
            groups = [(ec, rng.choice([20, 50, 100, 200, 400, 600]) * k, tuple(rng.sample(servers, k + m)))
                      for _ in range(rng.randint(1, 8))]
            balancer = self.fresh(groups)
            made = self.rounds(balancer, [load(n) for n in servers])
            self.assertLessEqual(len(made), 4 * len(groups) * (k + m), (trial, groups))
            self.assertTrue(balancer.balanced or balancer.settled, (trial, groups))

    def test_evens_out(self) -> None:
        """The rule itself, with equal capacities: a move of s from a server g above the
        average to one r below evens them out when s < g + r."""
        self.assertTrue(evens_out(50, 40, 1000, 20, 1000))
        self.assertFalse(evens_out(60, 40, 1000, 20, 1000))  # swaps their distances
        self.assertFalse(evens_out(400, 200, 1000, 200, 1000))  # the review's case
        self.assertTrue(evens_out(300, 200, 1000, 200, 1000))
        # A large target may take more than a small source gives.
        self.assertTrue(evens_out(60, 40, 1000, 20, 100_000))


class ConfigTests(StateTestCase):
    def test_balance_settings(self) -> None:
        """[meta] balance and balance_threshold: defaults on and 0.10; a threshold outside
        (0, 1) is refused naming the key."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[meta]\nid = "meta-1"\nlisten = "tcp:7000"\naddress = "127.0.0.1:7000"\ndata_dir = "d"\n')
        config = load_meta(path)
        self.assertEqual((config.balance, config.balance_threshold), (True, 0.10))
        with open(path, "w") as f:
            f.write('[meta]\nid = "meta-1"\nlisten = "tcp:7000"\naddress = "127.0.0.1:7000"\ndata_dir = "d"\nbalance = false\nbalance_threshold = 0.05\n')
        config = load_meta(path)
        self.assertEqual((config.balance, config.balance_threshold), (False, 0.05))
        with open(path, "w") as f:
            f.write('[meta]\nid = "meta-1"\nlisten = "tcp:7000"\naddress = "127.0.0.1:7000"\ndata_dir = "d"\nbalance_threshold = 1.5\n')
        e = self.assertRaises(ConfigError, load_meta, path)
        self.assertIn("balance_threshold", str(e))


class SchedulerBalanceTests(_SchedulerCase):
    """The repair scheduler runs the balancer's moves after every repair."""

    def setUp(self) -> None:
        super().setUp()
        self.scheduler = RepairScheduler(
            self.clock, self.state, self.registry, self.propose, self.pool, cell_size=4096,
            repair_after=REPAIR_AFTER, interval=INTERVAL, concurrency=4, retry_after=30.0,
            rng=random.Random(7), balancer=Balancer(self.state),
            emit=lambda kind, **fields: self.events.append((kind, fields)),
        )
        for i in range(6):  # chunk-0..3 hold 300 bytes each; chunk-4 and chunk-5 nothing
            self.place(f"/f{i}", SERVERS[:4])

    def beat(self, *nodes: str) -> None:
        for node in nodes:
            self.registry.heartbeat(node, self.addresses[node], CAPACITY, 0, 0, {})

    def test_moves_copy_from_the_source_then_commit(self) -> None:
        """A round's moves go out as RebuildShard to the chosen target with the source's own
        shard first (a copy), and MoveShard is committed once each is stored; the next round
        waits for a census that began after the last move ended, then finds it balanced."""
        self.live_for(DEAD_AFTER + 1, SERVERS[:6])  # past the leader's grace
        self.scheduler.tick()
        self.assertTrue(self.calls)
        self.assertLessEqual(len(self.calls), 4)
        planned = {k: t for k, t in self.scheduler.tasks.items() if t.reason == BALANCE}
        for address, msg, _ in self.calls:
            [t] = [t for t in planned.values() if msg.shard_id.endswith(f"-{t.index:02d}") and
                   msg.shard_id.startswith(f"{t.bg_id:016x}")]
            self.assertEqual(address, self.addresses[t.to_node])
            self.assertEqual(msg.sources[0][0], t.index)
            self.assertEqual(msg.sources[0][2], self.addresses[t.from_node])
        total = len(planned)
        answered = 0
        while self.calls:
            call = self.calls.pop(0)
            self.answer(call, 50)
            answered += 1
            self.clock.advance(0)  # the dispatch that follows
        self.assertEqual(answered, total)
        moves = [p for p in self.proposed if type(p).__name__ == "MoveShard"]
        self.assertEqual(len(moves), total)
        census = self.state.placed_bytes()[0]
        self.assertTrue(all(abs(b / CAPACITY - 1200 / 6000) <= 0.10 for b in census.values()), census)
        status = self.scheduler.status()["balance"]
        self.assertEqual((status["moved"], status["moved_bytes"], status["queued"], status["running"]),
                         (total, 50 * total, 0, 0))
        # The dashboard hears of each (folded there to a line a second).
        said = [f["message"] for kind, f in self.events if kind == "repair"]
        self.assertEqual(len(said), total)
        self.assertTrue(all(m.startswith("balancing: shard ") and " copied to " in m for m in said), said)
        # The next tick counts again, from after the last move ended, and finds the cluster
        # balanced: no more moves.
        self.live_for(1, SERVERS[:6])
        self.scheduler.tick()
        self.assertEqual(self.calls, [])
        self.assertTrue(self.scheduler.status()["balance"]["balanced"])

    def test_not_during_a_new_leaders_grace(self) -> None:
        """A new leader has not heard every server yet: it balances nothing until its grace
        period is over."""
        self.live_for(3, SERVERS[:6])
        self.assertGreater(self.registry.grace_left(), 0)
        self.scheduler.tick()
        self.assertEqual((self.calls, self.scheduler.tasks), ([], {}))
        self.live_for(DEAD_AFTER, SERVERS[:6])
        self.scheduler.tick()
        self.assertTrue(self.calls)

    def test_repair_comes_first(self) -> None:
        """Balancing plans nothing while a server is lost, and its queued moves are dropped
        when one is: here chunk-1 starts draining."""
        self.live_for(DEAD_AFTER + 1, SERVERS[:6])  # past the leader's grace
        self.scheduler.plan_slice()
        self.assertTrue(any(t.reason == BALANCE for t in self.scheduler.tasks.values()))
        self.ok(DrainChunkServer("chunk-1"))
        self.scheduler.plan_slice()
        self.assertTrue(self.scheduler.tasks)
        self.assertFalse(any(t.reason == BALANCE for t in self.scheduler.tasks.values()))

    def test_target_changed_drops_the_move(self) -> None:
        """A move whose target now drains (or is dead, or full) is dropped at dispatch, not
        sent: the balancer plans again from new figures."""
        self.live_for(DEAD_AFTER + 1, SERVERS[:6])  # past the leader's grace
        self.scheduler.plan_slice()
        targets = {t.to_node for t in self.scheduler.tasks.values()}
        self.assertTrue(targets)
        for node in targets:
            self.registry.heartbeat(node, self.addresses[node], CAPACITY, CAPACITY, 0, {})  # full
        self.scheduler._dispatch()
        self.assertEqual(self.calls, [])
        self.assertFalse(any(t.reason == BALANCE for t in self.scheduler.tasks.values()))

    def test_failed_copy_is_retried_later(self) -> None:
        """A move the target could not make is counted failed and let go; the balancer's
        next round plans from the figures then."""
        self.live_for(DEAD_AFTER + 1, SERVERS[:6])  # past the leader's grace
        self.scheduler.tick()
        _, msg, d = self.calls.pop(0)
        from dogfs.wire.protocol import WireError

        d.errback(WireError("unavailable", "cannot copy"))
        status = self.scheduler.status()
        self.assertEqual(status["failed"], 1)
        self.assertIn("cannot copy", status["errors"][0]["error"])
        self.assertEqual(status["balance"]["moved"], 0)


class RegistryDeadTests(_SchedulerCase):
    """A dead server past repair_after: repair, and no balancing meanwhile."""

    def test_no_balancing_while_a_server_is_dead(self) -> None:
        scheduler = RepairScheduler(
            self.clock, self.state, self.registry, self.propose, _Pool(self.calls), cell_size=4096,
            repair_after=REPAIR_AFTER, interval=INTERVAL, concurrency=4, rng=random.Random(1),
            balancer=Balancer(self.state),
        )
        for i in range(6):
            self.place(f"/f{i}", SERVERS[:4])
        self.live_for(3, SERVERS[:6])
        self.live_for(DEAD_AFTER + REPAIR_AFTER + 2, SERVERS[1:6])
        scheduler.plan_slice()
        reasons = {t.reason for t in scheduler.tasks.values()}
        self.assertEqual(reasons, {"dead"})
        self.assertIsNone(scheduler.balancer.census if scheduler.balancer else None)

