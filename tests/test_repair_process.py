# -*- test-case-name: tests.test_repair_process -*-
"""Repair, drain and removal of chunk servers with real processes (roadmap phase 4).

A TLS cluster from `dogfs cluster up` (the default), so that a rebuilding chunk server reads
its peers' shards with its own node certificate, as in production. The metadata node's
`repair_after` and `chunk_dead_after` are cut to seconds in its meta.toml. Files are RS-3-2
on six chunk servers: each block group misses one server, so three servers down would lose
some groups; after a repair, no two are enough to.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from tests.test_datapath_process import Cluster, sha256

DEAD_AFTER = 2.0
REPAIR_AFTER = 3.0


async def until(condition: Callable[[], Any], within: float, what: str) -> Any:
    """Re-check ``condition()`` every 0.2 s of the reactor's clock until it is true, and
    return it; fail naming ``what`` past ``within`` seconds."""
    deadline = reactor.seconds() + within
    while True:
        result = condition()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {within:g}s: {what}")
        await task.deferLater(reactor, 0.2, lambda: None)


def configure(cluster: Cluster, meta: str, chunk: str = "") -> None:
    """Stop ``cluster`` and add ``meta`` to every meta.toml's [meta] table and ``chunk`` to
    every chunk.toml's [chunk] table; `cluster.up()` starts it again with them."""
    cluster.run("cluster", "down")
    for name in os.listdir(os.path.join(cluster.home, "nodes")):
        kind = name.split("-")[0]
        path = os.path.join(cluster.home, "nodes", name, f"{kind}.toml")
        with open(path) as f:
            text = f.read()
        extra = meta if kind == "meta" else chunk
        with open(path, "w") as f:
            f.write(text.replace(f"[{kind}]\n", f"[{kind}]\n{extra}", 1))


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[Any], defer.Deferred[None]]:
    """A trial test method from a coroutine method."""
    return lambda self: defer.Deferred.fromCoroutine(test(self))  # type: ignore[call-arg]


class RepairProcessTests(TestCase):
    timeout = 300  # clusters start, servers die and shards are rebuilt

    def setUp(self) -> None:
        self.cluster = Cluster()
        self.addCleanup(self.cluster.destroy)

    def start(self, metas: int) -> None:
        self.cluster.create(metas)
        configure(self.cluster, f"chunk_dead_after = {DEAD_AFTER}\nrepair_after = {REPAIR_AFTER}\n"
                                "repair_interval = 0.5\n")
        self.cluster.up()
        self.local = self.cluster.local("data", 7 * (1 << 20) + 4321, 11)  # 3 block groups
        self.cluster.run("put", "--ec", "RS-3-2", self.local, "/f")

    def meta_leader(self) -> str | None:
        """The metadata node that says it leads, if one does now."""
        return next((n for n, v in self.cluster.nodes().items()
                     if v.get("kind") == "meta" and v.get("role") == "leader"), None)

    def holders(self) -> dict[str, int]:
        """Chunk server -> how many shards of /f the namespace places on it."""
        out: dict[str, int] = {}
        for group in self.cluster.json("stat", "/f")["block_groups"]:
            for shard in group["shards"]:
                out[shard["chunk_server"]] = out.get(shard["chunk_server"], 0) + 1
        return out

    def reads_back(self) -> None:
        out = os.path.join(self.cluster.work, "out")
        self.cluster.run("get", "/f", out, "--timeout", "30")
        self.assertEqual(sha256(out), sha256(self.local))
        os.unlink(out)

    @run
    async def test_dead_server_shards_rebuilt_elsewhere(self) -> None:
        """kill -9 of a chunk server, then of the metadata leader (3 members): once the server
        has been dead for repair_after, the new leader rebuilds its shards on the server that
        held none of their group, the status says so, and the file then survives two more
        servers killed, which it would not have before."""
        self.start(metas=3)
        before = self.holders()
        victim = max(sorted(before), key=lambda n: before[n])
        self.cluster.run("cluster", "kill", victim)
        old_leader = await until(self.meta_leader, 30, "a metadata leader")
        self.cluster.run("cluster", "kill", old_leader)
        await until(lambda: self.meta_leader() not in (None, old_leader), 30, "a new metadata leader")
        after = await until(
            lambda: (h := self.holders()) and victim not in h and h,
            90, f"the shards of {victim} rebuilt elsewhere",
        )
        self.assertEqual(sum(after.values()), sum(before.values()))
        status = self.cluster.json("admin", "repair", "status")
        self.assertEqual(status["rebuilt"], before[victim])
        self.assertEqual(status["lost_servers"], {})
        text = self.cluster.run("admin", "repair", "status").stdout
        self.assertIn(f"rebuilt {before[victim]}, failed", text)
        # Every group now has its five shards on the five live servers: any two more can go.
        survivors = sorted(after)
        self.assertEqual(len(survivors), 5)
        for node in survivors[:2]:
            self.cluster.run("cluster", "kill", node)
        self.reads_back()

    @run
    async def test_drain_then_remove(self) -> None:
        """drain --wait moves every shard off a running server while the file stays readable;
        remove refuses it while it runs and forgets it once stopped."""
        self.start(metas=1)
        before = self.holders()
        node = max(sorted(before), key=lambda n: before[n])
        # RS-4-2 on six servers: its shard on the draining one has nowhere to go, and
        # waiting for it would never end: drain --wait says so once only that shard is left.
        self.cluster.run("put", "--ec", "RS-4-2", self.cluster.local("wide", 1000, 12), "/wide")
        stuck = self.cluster.run("admin", "chunk", "drain", node, "--wait", check=False)
        self.assertEqual(stuck.returncode, 1, stuck.stderr)
        self.assertIn(f"{node} cannot be drained now: none of the 1 shard left can move", stuck.stderr)
        self.assertIn("holds a shard of the group already", stuck.stderr)
        self.cluster.run("rm", "/wide")
        result = self.cluster.json("admin", "chunk", "drain", node, "--wait")
        self.assertEqual(result, {"node": node, "draining": True, "shards_left": 0, "pending": 0})
        after = self.holders()
        self.assertNotIn(node, after)
        self.assertEqual(sum(after.values()), sum(before.values()))
        self.reads_back()
        refused = self.cluster.run("admin", "chunk", "remove", node, check=False)
        self.assertEqual(refused.returncode, 1, refused.stderr)
        self.assertIn(f"{node} is running: stop it first", refused.stderr)
        self.cluster.run("cluster", "stop", node)
        await until(lambda: self.cluster.nodes()[node].get("state") != "running", 30, f"{node} stopped")
        await until(
            lambda: self.cluster.run("admin", "chunk", "remove", node, check=False).returncode == 0,
            30, f"{node} removed once the metadata calls it dead",
        )
        gone = self.cluster.run("admin", "chunk", "drain", node, check=False)
        self.assertNotEqual(gone.returncode, 0)
        self.assertIn("is not registered", gone.stderr)
        self.reads_back()


class ScrubRepairProcessTests(TestCase):
    timeout = 300

    @run
    async def test_damaged_shard_found_by_the_scrubber_is_rebuilt(self) -> None:
        """A byte flipped in a shard file on a running chunk server: its scrubber finds the
        bad cell, its shard reports leave the shard out, and the leader rebuilds it on the
        server that held none of its group; the damaged file is then collected, and the file
        survives two more servers killed."""
        cluster = self.cluster = Cluster()
        self.addCleanup(cluster.destroy)
        cluster.create(1)
        configure(cluster, "repair_interval = 0.5\n",
                  "report_interval = 1.0\nscrub_interval = 1.0\nscrub_rate = 1073741824\ngc_grace = 2.0\n")
        cluster.up()
        local = cluster.local("data", 2 * (1 << 20) + 99, 13)  # one RS-3-2 block group (1 MiB blocks)
        cluster.run("put", "--ec", "RS-3-2", local, "/f")
        [group] = cluster.json("stat", "/f")["block_groups"]
        victim = group["shards"][0]
        path = cluster.shard_file(victim["chunk_server"], victim["shard_id"])
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        moved = await until(
            lambda: (s := cluster.json("stat", "/f")["block_groups"][0]["shards"][0])["chunk_server"]
            != victim["chunk_server"] and s,
            60, f"the damaged shard {victim['shard_id']} rebuilt off {victim['chunk_server']}",
        )
        holders = {s["chunk_server"] for s in cluster.json("stat", "/f")["block_groups"][0]["shards"]}
        self.assertNotIn(victim["chunk_server"], holders)
        self.assertEqual(len(holders), 5)
        self.assertEqual(cluster.json("admin", "repair", "status")["rebuilt"], 1)
        # The damaged copy, no longer placed there, is collected as garbage (gc_grace 2 s).
        await until(lambda: not os.path.exists(path), 30, f"the damaged copy on {victim['chunk_server']} deleted")
        for node in sorted(holders - {moved["chunk_server"]})[:2]:
            cluster.run("cluster", "kill", node)
        out = os.path.join(cluster.work, "out")
        cluster.run("get", "/f", out, "--timeout", "30")
        self.assertEqual(sha256(out), sha256(local))


class BalanceProcessTests(TestCase):
    timeout = 300

    @run
    async def test_added_servers_take_their_share_while_files_read(self) -> None:
        """Two chunk servers added (`cluster add-chunk`, TLS certificates from the cluster's
        CA) to four that are half full: the balancer copies shards onto them, over TLS, while
        every file keeps reading back; it stops once every server is within the threshold of
        the average; the old servers' garbage collection then deletes the moved copies, so the
        space is really freed."""
        cluster = self.cluster = Cluster()
        self.addCleanup(cluster.destroy)
        capacity = 16 << 20
        cluster.up("--meta", "1", "--chunk", "4", "--ec", "RS-2-2", "--block-size", str(1 << 20))
        configure(cluster, "repair_interval = 0.5\n",
                  f"capacity_bytes = {capacity}\nreport_interval = 1.0\ngc_grace = 2.0\n")
        cluster.up()
        files = {f"/f{i}": cluster.local(f"f{i}", 3 << 20, 20 + i) for i in range(6)}  # 2 groups each
        for name, local in files.items():
            cluster.run("put", local, name)
        digests = {name: sha256(local) for name, local in files.items()}
        out = os.path.join(cluster.work, "out")

        def reads(name: str) -> None:
            cluster.run("get", name, out, "--timeout", "30")
            self.assertEqual(sha256(out), digests[name], name)

        added = cluster.json("cluster", "add-chunk", "2", "--capacity", str(capacity))
        self.assertEqual([n["id"] for n in added["nodes"]], ["chunk-5", "chunk-6"])
        reads_done = 0

        def balanced() -> dict[str, Any] | None:
            nonlocal reads_done
            reads(sorted(files)[reads_done % len(files)])  # a read between every look
            reads_done += 1
            b = cluster.json("admin", "repair", "status")["balance"]
            return b if b["moved"] and b["balanced"] and not b["queued"] and not b["running"] else None

        balance = await until(balanced, 120, "the balancer moving shards onto chunk-5 and chunk-6")
        self.assertGreaterEqual(reads_done, 1)
        util = balance["utilization"]
        self.assertEqual(sorted(util), [f"chunk-{i}" for i in range(1, 7)])
        self.assertLessEqual(max(util.values()) - min(util.values()), 2 * balance["threshold"])
        self.assertGreater(min(util["chunk-5"], util["chunk-6"]), 0)
        placed: dict[str, int] = {}
        for name in files:
            for group in cluster.json("stat", name)["block_groups"]:
                for shard in group["shards"]:
                    placed[shard["chunk_server"]] = placed.get(shard["chunk_server"], 0) + 1
        self.assertEqual(sum(placed.values()), 6 * 2 * 4)
        self.assertEqual(placed["chunk-5"] + placed["chunk-6"], balance["moved"])
        logs = "".join(open(os.path.join(cluster.home, "nodes", n, "twistd.log")).read() for n in ("chunk-5", "chunk-6"))
        self.assertIn("copied shard", logs)

        def on_disk(node: str) -> int:
            return len(glob.glob(os.path.join(cluster.home, "nodes", node, "data", "shards", "*", "*.shard")))

        await until(lambda: all(on_disk(n) == placed.get(n, 0) for n in placed), 60,
                    "the old servers deleting the shards moved away")
        for name in files:
            reads(name)


class ClusterIdProcessTests(TestCase):
    timeout = 240

    @run
    async def test_chunk_server_pointed_at_another_cluster_keeps_its_shards(self) -> None:
        """A chunk server of cluster A started against cluster B's metadata (plaintext, or
        one CA for both, so TLS does not stop it), with garbage collection cut to nothing:
        B refuses it, naming both clusters, so B, whose namespace references none of its
        shards, never has them collected. Pointed back at A, it serves A's file again."""
        import signal
        import subprocess

        from dogfs.cli import cluster_layout as layout

        a, b = Cluster(), Cluster()
        self.addCleanup(a.destroy)
        self.addCleanup(b.destroy)
        for cluster in (a, b):
            cluster.up("--insecure", "--meta", "1", "--chunk", "3", "--ec", "RS-2-1")
        local = a.local("f", (3 << 20) + 7, 31)
        a.run("put", local, "/f")
        ids = [await until(lambda c=c: c.json("cluster", "status")["cluster_id"], 30, "a cluster id")
               for c in (a, b)]
        self.assertNotEqual(ids[0], ids[1])
        node_dir = os.path.join(a.home, "nodes", "chunk-1")
        kept = os.path.join(node_dir, "data", "cluster_id")

        def kept_id() -> str | None:
            try:
                with open(kept) as f:
                    return f.read().strip()
            except FileNotFoundError:
                return None

        await until(lambda: kept_id() == ids[0], 30, "chunk-1 keeping cluster A's id")
        a.run("cluster", "stop", "chunk-1")

        def shard_files() -> list[str]:
            return sorted(glob.glob(os.path.join(node_dir, "data", "shards", "**", "*"), recursive=True))

        before = shard_files()
        self.assertTrue(before)
        config = os.path.join(node_dir, "chunk.toml")
        with open(config) as f:
            original = f.read()
        spec_a, spec_b = layout.load_spec(a.home), layout.load_spec(b.home)
        assert spec_a is not None and spec_b is not None
        meta_a, meta_b = f'"{spec_a.metas[0].address}"', f'"{spec_b.metas[0].address}"'
        self.assertIn(meta_a, original)
        with open(config, "w") as f:
            f.write(original.replace("[chunk]\n", "[chunk]\ngc_grace = 0.001\nreport_interval = 1.0\n", 1)
                    .replace(meta_a, meta_b))
        stray: subprocess.Popen[bytes] = layout.start_node(a.home, spec_a.node("chunk-1"))
        log = os.path.join(node_dir, "twistd.log")

        def refused() -> bool:
            with open(log, errors="replace") as f:
                return f"holds the shards of cluster {ids[0]}, and this is cluster {ids[1]}" in f.read()

        await until(refused, 30, "cluster B refusing chunk-1 of cluster A")
        self.assertEqual(shard_files(), before)
        stray.send_signal(signal.SIGTERM)
        stray.wait(30)
        with open(config, "w") as f:
            f.write(original)
        a.run("cluster", "start", "chunk-1")
        a.run("cluster", "stop", "chunk-2")  # /f now needs chunk-1's shards
        out = os.path.join(a.work, "out")
        a.run("get", "/f", out, "--timeout", "30")
        self.assertEqual(sha256(out), sha256(local))
        self.assertEqual(shard_files(), before)
