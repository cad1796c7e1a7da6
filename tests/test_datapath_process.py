# -*- test-case-name: tests.test_datapath_process -*-
"""The data path as a user meets it: real daemons from `dogfs cluster up`, the `dogfs` CLI,
`kill -9`, corrupted and deleted shard files, restarts.

Every command here is run the way a user types it, as a separate process.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

BLOCK_SIZE = 1 << 20  # small blocks, so a 20 MiB file spans several block groups
ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="33554432", MALLOC_TRIM_THRESHOLD_="1073741824")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Cluster:
    """A cluster in a temporary home, driven only through the dogfs command."""

    def __init__(self) -> None:
        self.home = tempfile.mkdtemp(prefix="dogfs-test-")
        self.work = os.path.join(self.home, "work")
        os.makedirs(self.work)

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "dogfs.cli.main", "--home", self.home, *args],
            capture_output=True, text=True, timeout=timeout, env=ENV, stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"dogfs {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.run("--json", *args).stdout)

    def up(self, *extra: str) -> None:
        self.run("cluster", "up", "--detach", *extra)

    def create(self, metas: int = 1) -> None:
        """A new cluster with small blocks, so that files span several block groups."""
        self.up("--meta", str(metas), "--chunk", "6", "--block-size", str(BLOCK_SIZE))

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["id"]: n for n in self.json("cluster", "status")["nodes"]}

    def local(self, name: str, size: int, seed: int) -> str:
        path = os.path.join(self.work, name)
        rnd = random.Random(seed)
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 1 << 20)
                f.write(rnd.randbytes(n))
                left -= n
        return path

    def shard_file(self, node: str, shard_id: str) -> str:
        [path] = glob.glob(os.path.join(self.home, "nodes", node, "data", "**", f"*{shard_id}*"), recursive=True)
        return path

    def destroy(self) -> None:
        self.run("cluster", "down", check=False)
        shutil.rmtree(self.home, ignore_errors=True)


class DataPathTests(SynchronousTestCase):
    """Roadmap phases 1 and 2 with real processes."""

    def setUp(self) -> None:
        # Each test gets its own cluster: tests kill, corrupt and delete things.
        self.cluster = Cluster()
        self.addCleanup(self.cluster.destroy)
        self.cluster.create()
        self.files = {}
        for name, size, seed in [("empty", 0, 1), ("one", 1, 2), ("odd", (1 << 20) + 12345, 3),
                                 ("big", 20 * (1 << 20) + 7, 4)]:
            local = self.cluster.local(name, size, seed)
            self.cluster.run("put", local, f"/{name}")
            self.files[f"/{name}"] = local

    def assert_reads_back(self, path: str, local: str, *args: str) -> None:
        out = os.path.join(self.cluster.work, "out-" + path.strip("/").replace("/", "_"))
        self.cluster.run("get", path, out, *args)
        self.assertEqual(sha256(out), sha256(local), f"{path} read back differently")
        os.unlink(out)

    def test_1_round_trips_placement_ls_rm(self) -> None:
        """0 B, 1 B, just over 1 MiB and 20 MiB files read back with identical SHA-256; stat
        shows k+m shards per block group on k+m different chunk servers; ls lists; rm removes."""
        for path, local in self.files.items():
            self.assert_reads_back(path, local)
        self.check_placement()
        self.check_ls_and_rm()
        self.check_bench()

    def check_bench(self) -> None:
        """dogfs bench puts and gets files concurrently and reports what it measured."""
        put = self.cluster.json("bench", "put", "--count", "20", "--concurrency", "4", "--size", "10000")
        self.assertEqual((put["ok"], put["errors"]), (20, {}))
        self.assertGreater(put["ops_per_s"], 0)
        self.assertLessEqual(put["latency_ms"]["p50"], put["latency_ms"]["max"])
        get = self.cluster.json("bench", "get", "--prefix", put["prefix"], "--count", "20", "--cleanup")
        self.assertEqual((get["ok"], get["errors"]), (20, {}))
        self.assertAlmostEqual(get["mb_per_s"] * get["seconds"] * 1e6, 20 * 10000, delta=1)
        self.assertNotIn(put["prefix"].rsplit("/", 1)[1],
                         {e["name"] for e in self.cluster.json("ls", "/bench")["entries"]})

    def check_placement(self) -> None:
        """Every block group has k+m shards, indexed 0..5, on k+m different chunk servers."""
        info = self.cluster.json("stat", "/big")
        self.assertEqual((info["path"], info["type"], info["ec"]), ("/big", "file", "RS-4-2"))
        self.assertEqual(info["size"], 20 * (1 << 20) + 7)
        groups = info["block_groups"]
        self.assertEqual(len(groups), 6)  # 4 MiB of data per group with 1 MiB blocks
        self.assertEqual(sum(g["size"] for g in groups), info["size"])
        chunk_ids = {n for n, v in self.cluster.nodes().items() if v["kind"] == "chunk"}
        for group in groups:
            shards = group["shards"]
            self.assertEqual([s["index"] for s in shards], list(range(6)))
            self.assertEqual(len({s["chunk_server"] for s in shards}), 6)
            self.assertTrue({s["chunk_server"] for s in shards} <= chunk_ids)
            for s in shards:
                self.assertTrue(os.path.exists(self.cluster.shard_file(s["chunk_server"], s["shard_id"])))

    def check_ls_and_rm(self) -> None:
        """ls lists the files; rm removes one, after which get says it does not exist (exit 3)."""
        listing = self.cluster.json("ls", "/")
        self.assertTrue({"empty", "one", "odd", "big"} <= {e["name"] for e in listing["entries"]})
        local = self.cluster.local("victim", 5000, 9)
        self.cluster.run("put", local, "/victim")
        self.cluster.run("rm", "/victim")
        self.assertNotIn("victim", {e["name"] for e in self.cluster.json("ls", "/")["entries"]})
        result = self.cluster.run("get", "/victim", os.path.join(self.cluster.work, "v"), check=False)
        self.assertEqual(result.returncode, 3)
        self.assertIn("/victim", result.stderr)

    def test_2_bad_requests(self) -> None:
        """Missing path, put under a file, unknown --ec, unreachable cluster: clear errors, nothing changed."""
        before = self.cluster.json("ls", "/")
        missing = self.cluster.run("get", "/nope", os.path.join(self.cluster.work, "n"), check=False)
        self.assertEqual(missing.returncode, 3)
        self.assertIn("'/nope' does not exist", missing.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.cluster.work, "n")))
        under = self.cluster.run("put", self.files["/one"], "/one/child", check=False)
        self.assertEqual(under.returncode, 1)
        self.assertIn("/one", under.stderr)
        bad_ec = self.cluster.run("put", self.files["/one"], "/x", "--ec", "RS-4", check=False)
        self.assertEqual(bad_ec.returncode, 2)
        self.assertIn("RS-4", bad_ec.stderr)
        self.assertEqual(self.cluster.json("ls", "/"), before)
        config = os.path.join(self.cluster.work, "dead.toml")
        with open(config, "w") as f:
            f.write('[client]\nmeta = ["127.0.0.1:9"]\n')
        started = time.monotonic()
        unreachable = subprocess.run(
            [sys.executable, "-m", "dogfs.cli.main", "--config", config, "ls", "/", "--timeout", "3"],
            capture_output=True, text=True, timeout=60, env=ENV,
        )
        self.assertEqual(unreachable.returncode, 1)
        self.assertIn("127.0.0.1:9", unreachable.stderr)
        self.assertLess(time.monotonic() - started, 3 + 5)  # the timeout plus interpreter start-up

    def test_3_corrupted_and_deleted_shards(self) -> None:
        """A flipped byte in a data shard is caught by its checksum, and m shard files of every
        block group deleted by hand still let the file be rebuilt."""
        self.check_corrupted_shard()
        self.check_deleted_shards()

    def check_corrupted_shard(self) -> None:
        """A flipped byte in a data shard is caught by its checksum; the read is still right."""
        shard = self.cluster.json("stat", "/odd")["block_groups"][0]["shards"][0]
        path = self.cluster.shard_file(shard["chunk_server"], shard["shard_id"])
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            position = random.Random(5).randrange(200, size)
            f.seek(position)
            byte = f.read(1)
            f.seek(position)
            f.write(bytes([byte[0] ^ 0x10]))
        self.assert_reads_back("/odd", self.files["/odd"])

    def check_deleted_shards(self) -> None:
        """Deleting m shard files of every block group by hand still lets the file be rebuilt."""
        local = self.cluster.local("deleted", 9 * (1 << 20) + 3, 11)
        self.cluster.run("put", local, "/deleted")
        rnd = random.Random(6)
        for group in self.cluster.json("stat", "/deleted")["block_groups"]:
            for shard in rnd.sample(group["shards"], 2):
                os.unlink(self.cluster.shard_file(shard["chunk_server"], shard["shard_id"]))
        self.assert_reads_back("/deleted", local)

    def test_4_killed_chunk_servers(self) -> None:
        """With any m servers killed, reads work; with m+1 they fail in time, leaving no file; restarts heal."""
        first = self.cluster.json("stat", "/big")["block_groups"][0]["shards"]
        victims = [first[0]["chunk_server"], first[1]["chunk_server"]]  # two data shards: decoding needed
        for node in victims:
            self.cluster.run("cluster", "kill", node)
        for path, local in self.files.items():
            self.assert_reads_back(path, local)
        third = first[2]["chunk_server"]
        self.cluster.run("cluster", "kill", third)
        out = os.path.join(self.cluster.work, "partial")
        started = time.monotonic()
        failed = self.cluster.run("get", "/big", out, "--timeout", "10", check=False)
        self.assertEqual(failed.returncode, 1)
        self.assertIn("/big", failed.stderr)
        self.assertLess(time.monotonic() - started, 10 + 5)
        self.assertEqual(os.listdir(self.cluster.work).count("partial"), 0)
        self.assertEqual([n for n in os.listdir(self.cluster.work) if n.endswith(".part")], [])
        for node in [*victims, third]:
            self.cluster.run("cluster", "start", node)  # returns once the leader hears it
        for path, local in self.files.items():
            self.assert_reads_back(path, local)

    def test_5_full_restart_keeps_files(self) -> None:
        """cluster down then cluster up on the same home keeps every file."""
        self.cluster.run("cluster", "down")
        self.cluster.up()  # returns once every chunk server is alive again
        for path, local in self.files.items():
            self.assert_reads_back(path, local)

    def test_6_full_local_disk(self) -> None:
        """A get into a local disk that fills up fails naming the file and the reason, and
        leaves no partial file behind; the file still reads back elsewhere."""
        if os.geteuid() != 0 or shutil.which("mount") is None:
            raise SkipTest("needs root to mount a small tmpfs")
        small = tempfile.mkdtemp(prefix="dogfs-small-")
        self.addCleanup(shutil.rmtree, small, ignore_errors=True)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", small],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            raise SkipTest(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", small], capture_output=True)
        full = self.cluster.run("get", "/big", os.path.join(small, "big"), check=False)
        self.assertEqual(full.returncode, 1, full.stderr)
        self.assertIn("cannot save /big: No space left on device", full.stderr)
        self.assertEqual(os.listdir(small), [])
        self.assert_reads_back("/big", self.files["/big"])
