# -*- test-case-name: tests.test_jepsen_partition -*-
"""A Jepsen-style partition test of the metadata Raft group, on real processes in network
namespaces.

Each metadata node runs (`ip netns exec`) in its own network namespace with its own address
(tests/netns.py): the nodes talk to each other over a veth per pair, which the nemesis cuts
and heals; chunk servers and clients stay in the root namespace and reach every node through
a bridge that the nemesis never cuts. Clients are of two kinds, as in Jepsen:

- free clients see every node and find the leader themselves;
- a bound client per node reaches only that node (its connections to the other metadata nodes
  are refused), so a client on the minority side of a partition can only ask the minority.

They run put, get, ls, rm and mv on three names (the model of tests.test_jepsen) and mkdir of
unique directories, while the nemesis applies a seeded schedule of partition shapes: the
leader isolated alone, the leader in a minority of two, the leader in a majority (a minority
of followers cut off), a bridge (two halves that each see one node in the middle) and a ring
(each node sees its two neighbours). When a shape leaves the leader without a quorum of
direct peers, the test asserts that it steps down (check-quorum) and that a node with a quorum
is elected in a higher term, and probes the minority: its bound client can neither write nor
read (a get of a file the majority just wrote must fail, never answer "not found"), and the
write it tried never appears after the heal. The deposed leader is then killed (SIGKILL) and
restarted from its disk while still partitioned, so that whatever it appended but never
committed meets the new leader's log at the heal.

At the end every link is healed, a final read joins the history, the history must be
linearizable (dogfs.raft.checker), and every acknowledged mkdir and probe write must be there.
DOGFS_JEPSEN_SEED replays a schedule (the shapes and their order; which node leads, and so
which links a shape cuts, depends on timing); DOGFS_JEPSEN_METAS picks 3 or 5 metadata nodes;
DOGFS_JEPSEN_ROUNDS repeats the schedule; DOGFS_JEPSEN_KEEP_LOGS keeps the nodes' logs (they
are kept anyway when the test fails, and the path is printed).
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, threads
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

import tests.test_jepsen as jepsen
from dogfs.raft.checker import check_linearizable
from tests.netns import NetnsTopology, netns_unavailable, sweep_stale
from tests.test_meta_raft_process import RealCluster, sleep

DIR = jepsen.DIR
NAMES = jepsen.NAMES
LOG_DIR = "/jd"
PROBE_DIR = "/jp"
META_PORT = 7100
HTTP_PORT = 7180
FREE_CLIENTS = 3
# Generous for this 2-core machine: an election takes 0.5-1 s of Raft time.
STEP_DOWN_WITHIN = 10.0
ELECT_WITHIN = 15.0



def _require_netns() -> None:
    """Skip (with the reason) where namespaces cannot be made: not root, no iproute2."""
    reason = netns_unavailable()
    if reason is not None:
        raise SkipTest(reason)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class NetnsCluster(RealCluster):
    """A local cluster whose metadata nodes live in the namespaces of ``topology``.

    Chunk servers listen on the root namespace's bridge address, so nodes and clients reach
    them; the cluster's files are the ones `dogfs cluster up` writes (so `cluster down`,
    pidfiles and logs work as usual), with addresses chosen here.
    """

    def __init__(self, topology: NetnsTopology, chunks: int = 3, ec: str = "RS-2-1") -> None:
        super().__init__(metas=topology.count, chunks=chunks, ec=ec)
        self.topology = topology
        self.processes: list[subprocess.Popen[bytes]] = []

    def up(self) -> None:
        """Write the cluster's files and start every daemon (metas in their namespaces)."""
        from dogfs.cli import cluster_layout as layout

        t = self.topology
        chunk_ports = layout.pick_ports(self.chunks)
        nodes = [
            layout.NodeSpec(f"meta-{i}", "meta", f"{t.address(i)}:{META_PORT}", f"{t.address(i)}:{HTTP_PORT}")
            for i in t.nodes()
        ]
        nodes += [layout.NodeSpec(f"chunk-{k + 1}", "chunk", f"{t.gateway}:{p}") for k, p in enumerate(chunk_ports)]
        spec = layout.ClusterSpec(nodes=tuple(nodes), ec=self.ec, tls=False)
        layout.write_cluster(self.home, spec, timeout=20.0)
        for i in t.nodes():
            self.start(f"meta-{i}")
        for node in spec.chunks:
            self.start(node.id)

    def start(self, node_id: str) -> None:
        """Start one node's daemon (a metadata node inside its namespace)."""
        from dogfs.cli import cluster_layout as layout

        spec = layout.load_spec(self.home)
        assert spec is not None
        node = spec.node(node_id)
        argv = layout.daemon_argv(self.home, node)
        if node.kind == "meta":
            argv = self.topology.exec_prefix(int(node_id.split("-")[1])) + argv
        self.processes.append(layout.start_node(self.home, node, argv))

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a node; after SIGKILL, wait until it is gone (and reaped: the
        daemons are our children, and twistd refuses to start over a live pid's pidfile)."""
        pid = self.pids()[node_id]
        os.kill(pid, sig)
        if sig == signal.SIGKILL:
            for process in self.processes:
                if process.pid == pid:
                    process.wait(timeout=30)

    def destroy(self) -> None:
        """Stop everything, delete the home, and reap the daemons we started."""
        super().destroy()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except Exception:
                process.kill()

    def keep_logs(self, label: str) -> str:
        """Copy every node's log out of the home (which destroy deletes); returns where."""
        import glob
        import shutil
        import tempfile

        out = tempfile.mkdtemp(prefix=f"dogfs-jepsen-partition-{label}-")
        for log in glob.glob(os.path.join(self.home, "nodes", "*", "twistd.log")):
            shutil.copy(log, os.path.join(out, os.path.basename(os.path.dirname(log)) + ".log"))
        return out

    def address(self, i: int) -> str:
        """Metadata node i's address."""
        return f"{self.topology.address(i)}:{META_PORT}"

    def chunk_addresses(self) -> list[str]:
        """Every chunk server's address."""
        from dogfs.cli import cluster_layout as layout

        spec = layout.load_spec(self.home)
        assert spec is not None
        return [c.address for c in spec.chunks]

    def bound_client(self, i: int, timeout: float) -> Any:
        """A client that can reach metadata node i and the chunk servers, and nothing else:
        a client on node i's side of any partition."""
        from dogfs.client.api import DogFSClient
        from dogfs.config import load_client
        from dogfs.wire.pool import tcp_endpoints

        allowed = {self.address(i), *self.chunk_addresses()}
        real = tcp_endpoints(_reactor(), timeout=min(5.0, timeout))

        def endpoints(address: str) -> Any:
            if address in allowed:
                return real(address)
            return _Refused()

        config = attrs.evolve(load_client(os.path.join(self.home, "client.toml")), meta=(self.address(i),))
        return DogFSClient(_reactor(), config, endpoints=endpoints, timeout=timeout)


class _Refused:
    """A client endpoint for a node across the partition: the connection is refused."""

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        from twisted.internet.error import ConnectionRefusedError

        return defer.fail(ConnectionRefusedError("across the partition"))


@attrs.define
class MemberView:
    """What one metadata node says of itself."""

    node: int
    role: str | None
    term: int


def _roles(views: dict[int, MemberView]) -> str:
    """The members' roles and terms, briefly (L leader, F follower, C candidate...)."""
    return " ".join(f"{i}:{(v.role or '?')[0].upper()}{v.term}" for i, v in sorted(views.items()))


def highest_leader(views: dict[int, MemberView]) -> MemberView | None:
    """The node that says it leads in the highest term (a deposed leader may still say so in
    a lower one), if any does."""
    leaders = [v for v in views.values() if v.role == "leader"]
    return max(leaders, key=lambda v: v.term, default=None)


def answers(node: int) -> Callable[[dict[int, MemberView]], bool]:
    """Whether ``node`` answered."""
    return lambda views: node in views


def follows(node: int, after_term: int) -> Callable[[dict[int, MemberView]], bool]:
    """Whether ``node`` answered, does not lead, and knows a term past ``after_term``."""
    return lambda views: node in views and views[node].role != "leader" and views[node].term > after_term


class Views:
    """Each metadata node's own status answer, polled from the root namespace."""

    def __init__(self, cluster: NetnsCluster) -> None:
        from dogfs.wire.pool import ConnectionPool, tcp_endpoints

        self.cluster = cluster
        self.pool = ConnectionPool(_reactor(), tcp_endpoints(_reactor(), timeout=1.0), handshake_timeout=1.0)
        self.raw: dict[int, dict[str, Any]] = {}

    async def poll(self) -> dict[int, MemberView]:
        """Node -> its own view, for the nodes that answered within a second."""
        from dogfs.cli.cluster import query_status

        nodes = self.cluster.topology.nodes()
        addresses = [self.cluster.address(i) for i in nodes]
        replies = await query_status(_reactor(), self.pool, addresses, 1.0)
        out = {}
        self.raw = {}
        for i in nodes:
            answer = replies.get(self.cluster.address(i))
            if answer is None:
                # Dial afresh next time: a connection held across a silence waits out TCP's
                # retransmission backoff after the heal (seconds) before it carries anything.
                self.pool.drop(self.cluster.address(i))
                continue
            self.raw[i] = answer
            me = next((m for m in answer.get("meta") or [] if m.get("id") == f"meta-{i}"), None)
            if me is not None:
                out[i] = MemberView(i, me.get("role"), int(me.get("term") or 0))
        return out

    async def until(self, what: str, within: float, test: Callable[[dict[int, MemberView]], Any]) -> Any:
        """Poll until ``test(views)`` is truthy (returns it); AssertionError after ``within``."""
        deadline = time.monotonic() + within
        views: dict[int, MemberView] = {}
        while time.monotonic() < deadline:
            views = await self.poll()
            found = test(views)
            if found:
                return found
            await sleep(0.1)
        raise AssertionError(f"{what}: not within {within:g} s; the members say {views}")

    def close(self) -> defer.Deferred[None]:
        """Close the pool's connections."""
        return self.pool.close_all()


# -- partition shapes ----------------------------------------------------------------------


def _cut_between(nodes: list[int], *components: list[int]) -> list[tuple[int, int]]:
    side = {i: k for k, comp in enumerate(components) for i in comp}
    return [(i, j) for i in nodes for j in nodes if i < j and side.get(i, -i) != side.get(j, -j)]


def shape_links(shape: str, nodes: list[int], leader: int, rng: random.Random) -> list[tuple[int, int]]:
    """The links to cut for ``shape`` (Jepsen's partition nemeses, sized to ``nodes``)."""
    others = [i for i in nodes if i != leader]
    rng.shuffle(others)
    minority = (len(nodes) - 1) // 2
    if shape in ("isolate-leader", "silence-leader"):
        # silence-leader also cuts the leader from clients and chunk servers (see the nemesis).
        return _cut_between(nodes, [leader], others)
    if shape == "isolate-follower":
        return _cut_between(nodes, [others[0]], [leader, *others[1:]])
    if shape == "leader-in-minority":
        return _cut_between(nodes, [leader, *others[: minority - 1]], others[minority - 1:])
    if shape == "leader-in-majority":
        return _cut_between(nodes, [leader, *others[minority:]], others[:minority])
    if shape == "bridge":
        # Two halves that cannot see each other, and one node that sees both.
        order = [leader, *others]
        rng.shuffle(order)
        rest = order[1:]  # order[0] is the middle: it keeps every link
        half = len(rest) // 2
        return sorted((min(a, b), max(a, b)) for a in rest[:half] for b in rest[half:])
    if shape == "ring":
        order = [leader, *others]
        rng.shuffle(order)
        n = len(order)
        near = {frozenset((order[k], order[(k + 1) % n])) for k in range(n)}
        return [(i, j) for i in nodes for j in nodes if i < j and frozenset((i, j)) not in near]
    raise ValueError(f"unknown shape {shape!r}")


def reach(nodes: list[int], cut: list[tuple[int, int]], i: int) -> set[int]:
    """i and the nodes it talks to directly (what check-quorum counts)."""
    gone = {frozenset(p) for p in cut}
    return {j for j in nodes if j == i or frozenset((i, j)) not in gone}


def shapes_for(count: int) -> list[str]:
    """The shapes that differ from each other for ``count`` nodes."""
    if count >= 5:
        return ["isolate-leader", "silence-leader", "leader-in-minority", "leader-in-majority",
                "isolate-follower", "bridge", "ring"]
    return ["isolate-leader", "silence-leader", "isolate-follower", "bridge"]


# -- the test --------------------------------------------------------------------------------


class PartitionTests(TestCase):
    """Concurrent clients and a partition nemesis against metadata nodes in namespaces."""

    timeout = 300

    def setUp(self) -> None:
        _require_netns()

    # The operations and their recording are tests.test_jepsen's, so both tests check the
    # same model of the namespace.
    _mutate = jepsen.JepsenTests._mutate
    _get = jepsen.JepsenTests._get
    _ls = jepsen.JepsenTests._ls

    def test_linearizable_under_partitions(self) -> defer.Deferred[None]:
        """Partitions (leader isolated, leader in a minority or majority, bridge, ring) and
        heals during put/get/ls/rm/mv/mkdir from free and node-bound clients: an isolated
        leader steps down and the majority elects another; the minority neither writes nor
        reads; the history is linearizable and nothing acknowledged is lost."""
        seed = int(os.environ.get("DOGFS_JEPSEN_SEED", "7"))
        metas = int(os.environ.get("DOGFS_JEPSEN_METAS", "5"))
        return defer.Deferred.fromCoroutine(self._scenario(seed, metas))

    def _setup(self, metas: int) -> tuple[NetnsTopology, NetnsCluster]:
        sweep_stale()
        topology = NetnsTopology(metas)

        def remove_topology() -> None:
            topology.destroy()
            left = topology.leftovers()
            if left:
                raise AssertionError(f"the test left network namespaces or links behind: {left}")

        # Cleanups run last-in first-out: the daemons stop before their namespaces go.
        self.addCleanup(remove_topology)
        topology.create()
        cluster = NetnsCluster(topology)
        self.addCleanup(cluster.destroy)
        return topology, cluster

    async def _scenario(self, seed: int, metas: int) -> None:
        topology, cluster = await threads.deferToThread(self._setup, metas)
        try:
            await self._under_partitions(seed, topology, cluster)
            if os.environ.get("DOGFS_JEPSEN_KEEP_LOGS"):
                kept = await threads.deferToThread(cluster.keep_logs, f"seed{seed}")
                print(f"the nodes' logs are in {kept}")
        except BaseException:
            # The member logs are the evidence: keep them past the cleanup.
            kept = await threads.deferToThread(cluster.keep_logs, f"seed{seed}")
            print(f"\nseed {seed} failed; the nodes' logs are in {kept}")
            raise

    async def _under_partitions(self, seed: int, topology: NetnsTopology, cluster: NetnsCluster) -> None:
        await threads.deferToThread(cluster.up)
        views = Views(cluster)
        self.addCleanup(views.close)
        await views.until("a leader", 60.0, highest_leader)
        await self._until_chunks_alive(views, len(cluster.chunk_addresses()))
        setup = cluster.client(timeout=20)
        self.addCleanup(setup.close)
        for d in (DIR, LOG_DIR, PROBE_DIR):
            await setup.mkdir(d)

        history = jepsen.History()
        stop = [False]
        rng = random.Random(seed)
        faults: list[str] = []
        made: dict[str, bool] = {}  # unique directories: path -> acknowledged
        probes: dict[str, str] = {}  # probe path -> what must be true of it after the heal
        rounds = int(os.environ.get("DOGFS_JEPSEN_ROUNDS", "1"))
        nodes = topology.nodes()
        quorum = len(nodes) // 2 + 1

        async def client_loop(label: str, client: Any, writes: float) -> None:
            crng = random.Random(f"{seed}-{label}")
            k = 0
            while not stop[0]:
                k += 1
                await self._one_op(client, label, crng, k, history, made, writes)

        async def nemesis() -> None:
            try:
                await partitions()
            finally:
                stop[0] = True  # the clients stop with the nemesis, even when it fails

        async def partitions() -> None:
            await sleep(2.0)
            # isolate-leader first, so every run deposes a leader; then the others, shuffled;
            # DOGFS_JEPSEN_ROUNDS > 1 repeats that (a longer soak, by hand).
            schedule = []
            for _ in range(rounds):
                rest = [s for s in shapes_for(len(nodes)) if s != "isolate-leader"]
                rng.shuffle(rest)
                schedule += ["isolate-leader", *rest]
            for shape in schedule:
                before = await views.until("a leader", ELECT_WITHIN, highest_leader)
                cut = shape_links(shape, nodes, before.node, rng)
                # `ip` commands block: run them off the reactor, which the clients share.
                await threads.deferToThread(topology.cut_all, cut)
                silent = shape == "silence-leader"
                if silent:
                    await threads.deferToThread(topology.silence, before.node)
                began = time.monotonic()
                note = f"{history.now() / 1e6:.1f}s {shape} (leader {before.node}, term {before.term}) cut {cut}"
                deposed = len(reach(nodes, cut, before.node)) < quorum
                if deposed:
                    note += await self._deposed(views, nodes, cut, before, quorum, began, silent)
                note += await self._probe(cluster, nodes, cut, quorum, probes)
                if deposed and not silent:
                    # The deposed leader may hold entries it never committed: it restarts
                    # from its disk under the partition, and must drop them at the heal.
                    old = before.node
                    await threads.deferToThread(cluster.kill, f"meta-{old}")
                    await threads.deferToThread(cluster.start, f"meta-{old}")
                    await views.until(f"meta-{old} answers after its restart", ELECT_WITHIN, answers(old))
                    note += f"; {old} killed -9 and restarted"
                # The clients keep going under the partition for a while.
                await sleep(rng.uniform(1.0, 2.5))
                under = await views.poll()
                await threads.deferToThread(topology.heal)
                healed = time.monotonic()
                note += f"; before the heal {_roles(under)}; healed at {history.now() / 1e6:.1f}s"
                after = await views.until("a leader after the heal", ELECT_WITHIN, highest_leader)
                note += f", then {after.node} leads in term {after.term}"
                if silent:
                    # Unseen while silenced, the deposed leader must follow now.
                    await views.until(f"{before.node} answers after the heal", ELECT_WITHIN, answers(before.node))
                    seen = time.monotonic() - healed
                    await views.until(f"{before.node} follows after the heal", ELECT_WITHIN,
                                      follows(before.node, before.term))
                    note += (f"; {before.node} answered {seen:.1f}s after the heal and followed after "
                             f"{time.monotonic() - healed:.1f}s")
                faults.append(note)
                await sleep(rng.uniform(0.5, 1.5))

        loops = []
        for n in range(FREE_CLIENTS):
            client = cluster.client(timeout=4.0)
            self.addCleanup(client.close)
            loops.append(client_loop(f"c{n}", client, 0.6))
        for i in nodes:
            client = cluster.bound_client(i, timeout=2.0)
            self.addCleanup(client.close)
            # Bound clients mostly read: their writes succeed only while their node leads.
            loops.append(client_loop(f"n{i}", client, 0.25))
        running = [defer.Deferred.fromCoroutine(c) for c in loops]
        chaos = defer.Deferred.fromCoroutine(nemesis())
        # Wait for every loop (a failing nemesis stops the clients), then report the first
        # failure, the nemesis's first: its assertions say the most.
        results = await defer.DeferredList([chaos, *running], consumeErrors=True)
        await threads.deferToThread(topology.heal)
        for ok, value in results:
            if not ok:
                value.raiseException()

        # Healed: every link is up (as the kernel says) and a leader serves.
        links = await threads.deferToThread(topology.link_states)
        self.assertTrue(all(links.values()), links)
        await views.until("a leader after the final heal", ELECT_WITHIN, highest_leader)
        final = cluster.client(timeout=20)
        self.addCleanup(final.close)
        for i in range(len(NAMES)):
            await self._get(final, "final", i, history, strict=True)
        await self._ls(final, "final", history, strict=True)

        completed = sum(1 for op in history.ops if op.ret is not None)
        unknown = len(history.ops) - completed
        by_client: dict[str, int] = {}
        for op in history.ops:
            if op.ret is not None:
                by_client[op.client] = by_client.get(op.client, 0) + 1
        print(f"\nseed {seed}, {len(nodes)} metadata nodes: {len(history.ops)} operations ({completed} "
              f"completed, {unknown} of unknown outcome; by client {by_client}); "
              f"{sum(made.values())} of {len(made)} mkdirs acknowledged; errors: {history.errors}")
        print("faults:\n  " + "\n  ".join(faults))
        self.assertTrue(any("stepped down" in f for f in faults), "no partition deposed a leader")
        self.assertEqual(sorted(f.split()[1] for f in faults), sorted(shapes_for(len(nodes)) * rounds))
        self.assertGreater(completed, 100, "too few operations completed to say anything")

        # No acknowledged write is lost; the minority's probe writes never appear.
        present = {e.name for e in await final.ls(LOG_DIR)}
        lost = sorted(p for p, acked in made.items() if acked and p.rsplit("/", 1)[1] not in present)
        self.assertEqual(lost, [], "acknowledged mkdirs are missing after the heal")
        in_probe = {e.name for e in await final.ls(PROBE_DIR)}
        for path, expect in sorted(probes.items()):
            name = path.rsplit("/", 1)[1]
            if expect == "present":
                self.assertIn(name, in_probe, f"{path}, acknowledged by the majority, is missing")
                sink = io.BytesIO()
                await final.get(path, sink)
                self.assertEqual(sink.getvalue(), jepsen.body(path), f"{path} reads back wrong")
            else:
                self.assertNotIn(name, in_probe, f"{path}, tried only on the minority side, exists")

        result = await threads.deferToThread(check_linearizable, history.ops, jepsen.NamespaceModel, 5_000_000)
        self.assertTrue(result.ok, f"seed {seed}: " + result.explain(jepsen.NamespaceModel))
        self.assertFalse(result.inconclusive, "the checker's search budget ran out")

    async def _until_chunks_alive(self, views: Views, count: int) -> None:
        def alive(_: dict[int, MemberView]) -> bool:
            for answer in views.raw.values():
                if answer.get("cluster", {}).get("leader"):
                    states = [c.get("state") for c in answer.get("chunks") or []]
                    if states.count("alive") >= count:
                        return True
            return False

        await views.until("every chunk server alive", 60.0, alive)

    async def _deposed(
        self, views: Views, nodes: list[int], cut: list[tuple[int, int]], before: MemberView,
        quorum: int, began: float, silent: bool,
    ) -> str:
        """The leader lost its quorum: it steps down (check-quorum; not seen when it is
        silenced), and a node with a quorum leads in a higher term. Returns what happened."""
        old = before.node

        def stepped_down(v: dict[int, MemberView]) -> bool:
            return old in v and v[old].role != "leader"

        said = ""
        if not silent:
            await views.until(f"the isolated leader {old} steps down", STEP_DOWN_WITHIN, stepped_down)
            said = f"; {old} stepped down after {time.monotonic() - began:.2f}s"

        def elected(v: dict[int, MemberView]) -> MemberView | None:
            return next((m for m in v.values() if m.role == "leader" and m.term > before.term
                         and m.node != old), None)

        new = await views.until("a new leader with a quorum", ELECT_WITHIN, elected)
        self.assertGreaterEqual(len(reach(nodes, cut, new.node)), quorum,
                                f"node {new.node} leads without a quorum of peers (cut {cut})")
        return said + f"; {new.node} leads in term {new.term} after {time.monotonic() - began:.2f}s"

    async def _probe(
        self, cluster: NetnsCluster, nodes: list[int], cut: list[tuple[int, int]], quorum: int,
        probes: dict[str, str],
    ) -> str:
        """Under the partition: a write through a free client succeeds (the side with a quorum
        serves), and the client bound to each node without a quorum of peers can neither read
        that new file (not even as "not found": that would be a stale read) nor write."""
        from dogfs.client.api import DogFSError

        tag = len(probes)
        fresh = f"{PROBE_DIR}/major-{tag}"
        majority = cluster.client(timeout=ELECT_WITHIN)
        began = time.monotonic()
        try:
            await majority.put(fresh, io.BytesIO(jepsen.body(fresh)))
        finally:
            await majority.close()
        took = time.monotonic() - began
        probes[fresh] = "present"
        minority = [i for i in nodes if len(reach(nodes, cut, i)) < quorum]

        async def no_read(client: Any, i: int) -> None:
            try:
                await client.get(fresh, io.BytesIO())
            except DogFSError as e:
                self.assertNotEqual(e.code, "not_found",
                                    f"stale read: node {i}, without a quorum, says {fresh} does not exist")
            else:
                self.fail(f"node {i}, without a quorum, served a read of {fresh}")

        async def no_write(client: Any, i: int) -> None:
            tried = f"{PROBE_DIR}/minor-{tag}-{i}"
            try:
                await client.mkdir(tried)
            except DogFSError:
                probes[tried] = "absent"
            else:
                self.fail(f"node {i}, without a quorum, acknowledged mkdir {tried}")

        # Every probe at once: each waits out the bound client's timeout.
        clients = {i: cluster.bound_client(i, timeout=2.0) for i in minority}
        try:
            await defer.gatherResults(
                [defer.Deferred.fromCoroutine(probe(client, i))
                 for i, client in clients.items() for probe in (no_read, no_write)],
                consumeErrors=True,
            ).addErrback(lambda f: f.value.subFailure)
        finally:
            for client in clients.values():
                await client.close()
        return f"; the majority wrote (a put took {took:.1f}s), {minority or 'no node'} refused reads and writes"

    async def _one_op(
        self, client: Any, name: str, rng: random.Random, k: int, history: jepsen.History,
        made: dict[str, bool], writes: float,
    ) -> None:
        """One random operation: a write with probability ``writes``, else a read."""
        from dogfs.client.api import DogFSError

        i = rng.randrange(len(NAMES))
        if rng.random() < writes:
            roll = rng.random()
            if roll < 0.5:
                value = f"{name}-{k}"
                await self._mutate(client, name, ("put", i, value), history,
                                   lambda: client.put(f"{DIR}/{NAMES[i]}", io.BytesIO(jepsen.body(value))))
            elif roll < 0.65:
                await self._mutate(client, name, ("rm", i), history, lambda: client.rm(f"{DIR}/{NAMES[i]}"))
            elif roll < 0.85:
                j = (i + rng.randrange(1, len(NAMES))) % len(NAMES)
                await self._mutate(client, name, ("mv", i, j), history,
                                   lambda: client.mv(f"{DIR}/{NAMES[i]}", f"{DIR}/{NAMES[j]}"))
            else:
                path = f"{LOG_DIR}/{name}-{k}"
                made[path] = False
                try:
                    await client.mkdir(path)
                except DogFSError as e:
                    history.errors[e.code] = history.errors.get(e.code, 0) + 1
                    return
                made[path] = True
        elif rng.random() < 0.65:
            await self._get(client, name, i, history)
        else:
            await self._ls(client, name, history)
        if client.timeout < 3.0:
            # A bound client whose node cannot serve fails fast; do not spin on it.
            await sleep(0.05)


class ShapeTests(SynchronousTestCase):
    """The partition shapes cut what their names say (so the nemesis tests what it claims)."""

    def test_shapes(self) -> None:
        """For 3 and 5 nodes and every leader: isolate-leader leaves the leader alone;
        leader-in-minority / -in-majority put it on the side their name says; isolate-follower
        leaves one follower alone; a bridge's middle node sees all, the halves not each
        other; in a ring each node sees exactly two others."""
        for count in (3, 5):
            nodes = list(range(1, count + 1))
            quorum = count // 2 + 1
            for leader in nodes:
                for shape in shapes_for(count):
                    rng = random.Random(f"{count}-{leader}-{shape}")
                    cut = shape_links(shape, nodes, leader, rng)
                    sees = {i: reach(nodes, cut, i) for i in nodes}
                    said = f"{shape} of {count} nodes, leader {leader}: cut {cut}"
                    alone = [i for i in nodes if sees[i] == {i}]
                    if shape in ("isolate-leader", "silence-leader"):
                        self.assertEqual(alone, [leader], said)
                    elif shape == "isolate-follower":
                        self.assertEqual(len(alone), 1, said)
                        self.assertNotEqual(alone[0], leader, said)
                    elif shape == "leader-in-minority":
                        self.assertEqual(len(sees[leader]), quorum - 1, said)
                        self.assertTrue(all(len(sees[i]) == quorum for i in nodes if i not in sees[leader]), said)
                    elif shape == "leader-in-majority":
                        self.assertEqual(len(sees[leader]), quorum, said)
                    elif shape == "bridge":
                        middle = [i for i in nodes if sees[i] == set(nodes)]
                        self.assertEqual(len(middle), 1, said)
                        self.assertTrue(all(len(sees[i]) == quorum for i in nodes if i not in middle), said)
                    elif shape == "ring":
                        self.assertTrue(all(len(sees[i]) == 3 for i in nodes), said)
                    # Every shape leaves some node a quorum of direct peers: the group can serve.
                    self.assertTrue(any(len(sees[i]) >= quorum for i in nodes), said)


class TopologyTests(TestCase):
    """tests/netns.py on the real kernel: links cut and heal as recorded."""

    timeout = 60

    def setUp(self) -> None:
        _require_netns()

    def test_cut_and_heal(self) -> defer.Deferred[None]:
        """TCP from each namespace reaches a peer exactly when their link is up, and the root
        namespace reaches every node whatever is cut between nodes, and not a silenced one;
        heal restores every link; destroy leaves no namespace, bridge or veth behind."""
        return threads.deferToThread(self._cut_and_heal)

    def _cut_and_heal(self) -> None:
        import socket
        import sys

        topology = NetnsTopology(3)
        servers: list[subprocess.Popen[bytes]] = []

        def cleanup() -> None:
            for server in servers:
                server.kill()
                server.wait()
            topology.destroy()

        self.addCleanup(cleanup)
        topology.create()
        listen = ("import socket, sys\ns = socket.create_server((sys.argv[1], 9000))\n"
                  "print('ok', flush=True)\nwhile True:\n    s.accept()[0].close()\n")
        for i in topology.nodes():
            server = subprocess.Popen([*topology.exec_prefix(i), sys.executable, "-c", listen, topology.address(i)],
                                      stdout=subprocess.PIPE)
            servers.append(server)
            assert server.stdout is not None
            self.assertEqual(server.stdout.readline().strip(), b"ok")
        # ip netns exec runs the command in place: the pid we started is the server's.
        self.assertIn(b"create_server", open(f"/proc/{servers[0].pid}/cmdline", "rb").read())
        dial = ("import socket, sys\ntry:\n    socket.create_connection((sys.argv[1], 9000), timeout=1.0)\n"
                "except OSError:\n    sys.exit(1)\n")

        def talks(i: int, j: int) -> bool:
            argv = [*topology.exec_prefix(i), sys.executable, "-c", dial, topology.address(j)]
            return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0

        def from_root(j: int) -> bool:
            try:
                socket.create_connection((topology.address(j), 9000), timeout=1.0).close()
            except OSError:
                return False
            return True

        topology.cut_all([(1, 2)])
        self.assertEqual({(i, j): talks(i, j) for i in (1, 2, 3) for j in (1, 2, 3) if i != j},
                         {(1, 2): False, (2, 1): False, (1, 3): True, (3, 1): True, (2, 3): True, (3, 2): True})
        self.assertTrue(all(from_root(j) for j in topology.nodes()))
        self.assertFalse(topology.link_states()[(1, 2)])
        topology.silence(3)
        self.assertFalse(from_root(3))
        self.assertTrue(talks(1, 3))
        topology.heal()
        self.assertTrue(talks(1, 2) and talks(2, 1))
        self.assertTrue(from_root(3))
        self.assertTrue(all(topology.link_states().values()))
        cleanup()
        servers.clear()
        self.assertEqual(topology.leftovers(), [])
