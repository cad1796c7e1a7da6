# -*- test-case-name: tests.test_meta_raft_process -*-
"""The metadata Raft group as real processes on loopback: `dogfs cluster up` with three
metadata nodes, `kill -9` of the leader during a stream of concurrent puts, one and two nodes
down, restarts, and a full `cluster down` / `cluster up`.

The cluster is driven through the `dogfs` command as a user types it; the stream of puts comes
from in-process clients (DogFSClient on the test's reactor), so every acknowledgement is known.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import attrs
from twisted.internet import defer, threads
from twisted.trial.unittest import SkipTest, TestCase

# What a client says when a majority of the metadata group is gone: the survivor's "no quorum",
# or, when the client last tried a dead member, that no member is reachable.
CLEAR_FAILURE = r"no quorum|no metadata node is reachable"
ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="33554432", MALLOC_TRIM_THRESHOLD_="1073741824")


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def sleep(seconds: float) -> defer.Deferred[None]:
    """Fire after ``seconds`` of real time."""
    from dogfs.client.api import sleep as client_sleep

    return client_sleep(_reactor(), seconds)


class RealCluster:
    """A local cluster under a temporary home, managed with the dogfs command."""

    def __init__(self, metas: int = 3, chunks: int = 3, ec: str = "RS-2-1", env: dict[str, str] | None = None) -> None:
        if shutil.which("twistd", path=os.path.dirname(sys.executable)) is None and shutil.which("twistd") is None:
            raise SkipTest("twistd is not installed")
        self.home = tempfile.mkdtemp(prefix="dogfs-raft-")
        self.metas, self.chunks, self.ec = metas, chunks, ec
        self.env = dict(ENV, **(env or {}))

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``dogfs --home HOME args...`` and return the completed process."""
        result = subprocess.run(
            [sys.executable, "-m", "dogfs.cli.main", "--home", self.home, *args],
            capture_output=True, text=True, timeout=timeout, env=self.env, stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"dogfs {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def up(self) -> None:
        """Start (or restart) the cluster and wait until it serves."""
        self.run(
            "cluster", "up", "--detach", "--insecure", "--meta", str(self.metas), "--chunk",
            str(self.chunks), "--ec", self.ec, timeout=180,
        )

    def down(self) -> None:
        """Stop every node, keeping the data."""
        self.run("cluster", "down", check=False)

    def destroy(self) -> None:
        """Stop everything (SIGKILL what is left) and delete the home."""
        self.down()
        for pid in self.pids().values():
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.home, ignore_errors=True)

    def nodes(self) -> dict[str, dict[str, Any]]:
        """`cluster status --json`, by node id."""
        out = self.run("--json", "cluster", "status", check=False).stdout
        try:
            return {n["id"]: n for n in json.loads(out)["nodes"]}
        except ValueError:
            return {}

    def pids(self) -> dict[str, int]:
        """Pids of the running nodes, from their pidfiles."""
        from dogfs.cli import cluster_layout as layout

        spec = layout.load_spec(self.home)
        if spec is None:
            return {}
        out = {}
        for node in spec.nodes:
            pid = layout.node_pid(self.home, node)
            if pid is not None:
                out[node.id] = pid
        return out

    def meta_ids(self) -> list[str]:
        """The metadata nodes' ids."""
        return [f"meta-{i}" for i in range(1, self.metas + 1)]

    def leader(self) -> str | None:
        """The id of the metadata node that says it leads, if one does."""
        for node_id, node in self.nodes().items():
            if node.get("kind") == "meta" and node.get("role") == "leader" and node.get("state") == "running":
                return node_id
        return None

    def client(self, timeout: float = 20.0) -> Any:
        """A DogFSClient for this cluster on the test's reactor."""
        from dogfs.client.api import DogFSClient
        from dogfs.config import load_client

        return DogFSClient(_reactor(), load_client(os.path.join(self.home, "client.toml")), timeout=timeout)

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a node's process."""
        os.kill(self.pids()[node_id], sig)

    def start(self, node_id: str) -> None:
        """Start one stopped node."""
        self.run("cluster", "start", node_id, timeout=120)


async def wait_for_leader(cluster: RealCluster, within: float = 30.0) -> str:
    """The leader's id, once one is elected."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        leader = await threads.deferToThread(cluster.leader)
        if leader is not None:
            return leader
        await sleep(0.2)
    raise AssertionError("no metadata leader elected")


def content(tag: str, size: int = 4096) -> bytes:
    """A file body that names its writer, so a mix-up cannot go unnoticed."""
    head = tag.encode() + b"|"
    return (head * (size // len(head) + 1))[:size]


class MetaRaftProcessTests(TestCase):
    """Three metadata nodes as real processes."""

    timeout = 400

    async def _stream(
        self, cluster: RealCluster, prefix: str, writers: int, stop_at: list[float],
        acked: dict[str, tuple[bytes, float]], tried: dict[str, bytes], begun: dict[str, float],
    ) -> None:
        async def writer(w: int) -> None:
            # One client (one session) per writer: a session orders its commands one at a time.
            client = cluster.client()
            self.addCleanup(client.close)
            n = 0
            while time.monotonic() < stop_at[0]:
                n += 1
                path = f"{prefix}/w{w}-{n}"
                body = content(path)
                tried[path] = body
                started = time.monotonic()
                try:
                    await client.put(path, io.BytesIO(body))
                except Exception:
                    continue
                acked[path] = (body, time.monotonic())
                begun[path] = started

        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(writer(w)) for w in range(writers)], consumeErrors=True
        )

    async def _check_files(self, client: Any, acked: dict[str, tuple[bytes, float]], tried: dict[str, bytes]) -> None:
        from dogfs.client.api import DogFSError

        for path, body in tried.items():
            sink = io.BytesIO()
            try:
                await client.get(path, sink)
            except DogFSError as e:
                self.assertNotIn(path, acked, f"acknowledged {path} is missing: {e}")
                self.assertEqual(e.code, "not_found", f"{path}: {e}")
                continue
            # Acknowledged or not, a visible file is whole and right: never half-visible.
            self.assertEqual(sink.getvalue(), body, f"{path} reads back wrong")

    def test_failover_and_quorum(self) -> defer.Deferred[None]:
        """kill -9 of the leader during concurrent puts: writes resume (the time to the next
        acknowledged write is printed), every acknowledged file reads back, no file is
        half-visible; with one node down every command works; with two down a write fails
        with "no quorum" within --timeout; after restarts writes work and nothing
        acknowledged is missing; `cluster down` + `cluster up` keeps every file."""
        return defer.Deferred.fromCoroutine(self._failover_and_quorum())

    async def _failover_and_quorum(self) -> None:
        cluster = RealCluster()
        self.addCleanup(cluster.destroy)
        await threads.deferToThread(cluster.up)
        client = cluster.client()
        self.addCleanup(client.close)
        await client.mkdir("/s")
        acked: dict[str, tuple[bytes, float]] = {}
        tried: dict[str, bytes] = {}
        begun: dict[str, float] = {}
        stop_at = [time.monotonic() + 9.0]
        stream = defer.Deferred.fromCoroutine(self._stream(cluster, "/s", 8, stop_at, acked, tried, begun))
        await sleep(3.0)
        leader = await wait_for_leader(cluster)
        killed_at = time.monotonic()
        cluster.kill(leader)
        await stream
        # The next write: the first one begun after the kill that was acknowledged.
        after = sorted(t for p, (_, t) in acked.items() if begun[p] >= killed_at)
        self.assertTrue(after, "no write was acknowledged after the leader was killed")
        print(f"\nkill -9 of leader {leader} -> next acknowledged write: {after[0] - killed_at:.3f} s")
        self.assertGreater(len(acked), 20)
        await self._check_files(client, acked, tried)

        # One node down: every command works (as a user types them).
        def one_down() -> None:
            local = os.path.join(cluster.home, "one.bin")
            with open(local, "wb") as f:
                f.write(content("one", 10_000))
            cluster.run("put", local, "/one", "--timeout", "20")
            cluster.run("mkdir", "/dir", "--timeout", "20")
            cluster.run("mv", "/one", "/dir/one", "--timeout", "20")
            self.assertIn("one", cluster.run("ls", "/dir", "--timeout", "20").stdout)
            stat = json.loads(cluster.run("--json", "stat", "/dir/one", "--timeout", "20").stdout)
            self.assertEqual(stat["size"], 10_000)
            back = os.path.join(cluster.home, "back.bin")
            cluster.run("get", "/dir/one", back, "--timeout", "20")
            with open(back, "rb") as f:
                self.assertEqual(f.read(), content("one", 10_000))
            cluster.run("rm", "/dir/one", "--timeout", "20")
            status = cluster.nodes()
            roles = sorted(str(status[m].get("role")) for m in cluster.meta_ids())
            self.assertEqual(roles.count("leader"), 1, roles)

        await threads.deferToThread(one_down)

        # Two of three down: a clear error within --timeout, and nothing acknowledged.
        second = await wait_for_leader(cluster)
        cluster.kill(second)

        def two_down() -> None:
            local = os.path.join(cluster.home, "two.bin")
            with open(local, "wb") as f:
                f.write(content("two"))
            began = time.monotonic()
            result = cluster.run("put", local, "/two", "--timeout", "4", check=False)
            took = time.monotonic() - began
            self.assertEqual(result.returncode, 1, result.stderr)
            self.assertRegex(result.stderr, CLEAR_FAILURE)
            self.assertLess(took, 4 + 6, "the failure took far longer than --timeout")
            result = cluster.run("ls", "/", "--timeout", "3", check=False)
            self.assertEqual(result.returncode, 1, result.stderr)
            self.assertRegex(result.stderr, CLEAR_FAILURE)
            for node in (leader, second):
                cluster.start(node)

        await threads.deferToThread(two_down)
        await wait_for_leader(cluster)
        await client.put("/after", io.BytesIO(content("/after")))
        acked["/after"] = (content("/after"), time.monotonic())
        tried["/after"] = content("/after")
        tried.pop("/two", None)
        await self._check_files(client, acked, tried)
        await client.close()

        # Durability: down and up on the same home keeps every file.
        await threads.deferToThread(cluster.down)
        await threads.deferToThread(cluster.up)
        fresh = cluster.client()
        self.addCleanup(fresh.close)
        names = {e.name for e in await fresh.ls("/s")}
        for path in acked:
            if path.startswith("/s/"):
                self.assertIn(path[3:], names)
        await self._check_files(fresh, acked, tried)

        # Log versions (rolling upgrades): the leader raised the group's to this release's,
        # and every member says so in `cluster status --json`.
        from dogfs.meta.commands import LOG_VERSION

        deadline = time.monotonic() + 30.0
        while True:
            nodes = await threads.deferToThread(cluster.nodes)
            seen = [(nodes.get(m, {}).get("log_version"), nodes.get(m, {}).get("group_log_version"))
                    for m in cluster.meta_ids()]
            if seen == [(LOG_VERSION, LOG_VERSION)] * len(seen):
                break
            self.assertLess(time.monotonic(), deadline, f"log versions (release, group) per member: {seen}")
            await sleep(0.2)


class MembershipProcessTests(TestCase):
    """`dogfs admin meta add` / `remove` on a running group of real processes."""

    timeout = 300

    def test_add_after_many_commits_and_remove_leader(self) -> defer.Deferred[None]:
        """A member added after thousands of commits (the log compacted meanwhile) catches up
        from a snapshot and becomes a voter; removing the leader hands leadership over, and
        the group keeps serving with every file."""
        return defer.Deferred.fromCoroutine(self._membership())

    async def _membership(self) -> None:
        cluster = RealCluster(env={"DOGFS_RAFT_SNAPSHOT_EVERY": "500"})
        self.addCleanup(cluster.destroy)
        await threads.deferToThread(cluster.up)
        clients = [cluster.client() for _ in range(32)]
        for client in clients:
            self.addCleanup(client.close)
        await clients[0].mkdir("/many")

        async def make(w: int) -> None:
            for n in range(70):
                await clients[w].mkdir(f"/many/d{w}-{n}")

        await defer.gatherResults([defer.Deferred.fromCoroutine(make(w)) for w in range(32)])
        added = await threads.deferToThread(cluster.run, "--json", "admin", "meta", "add", "--local", "--timeout", "60")
        members = {m["id"]: m for m in json.loads(added.stdout)["meta"]}
        self.assertEqual(members["meta-4"]["role"], "follower", members)
        self.assertTrue(members["meta-4"]["voter"])
        own = await clients[0].status()
        self.assertEqual(len([m for m in own["meta"] if m.get("voter")]), 4)

        # The new member holds everything, from a snapshot.
        def new_member() -> dict[str, Any]:
            import attrs

            from dogfs.config import load_client

            config = load_client(os.path.join(cluster.home, "client.toml"))
            address = cluster.nodes()["meta-4"]["address"]
            return {"address": address, "config": attrs.evolve(config, meta=(address,))}

        info = await threads.deferToThread(new_member)
        from dogfs.client.api import DogFSClient

        direct = DogFSClient(_reactor(), info["config"], timeout=10)
        self.addCleanup(direct.close)
        status = await direct.status()
        me = next(m for m in status["meta"] if m["id"] == "meta-4")
        self.assertGreater(me["snapshot_index"] or 0, 0, me)
        self.assertGreaterEqual(me["applied_index"], 32 * 70)

        # Remove the leader: it hands over; the rest serve, with every directory.
        leader = await wait_for_leader(cluster)
        await threads.deferToThread(cluster.run, "admin", "meta", "remove", leader, "--timeout", "30")
        after = await wait_for_leader(cluster)
        self.assertNotEqual(after, leader)
        # cluster status shows the result: the removed node is gone from the local cluster.
        nodes = await threads.deferToThread(cluster.nodes)
        self.assertNotIn(leader, nodes)
        self.assertEqual(len([n for n in nodes.values() if n["kind"] == "meta"]), 3)
        fresh = cluster.client()
        self.addCleanup(fresh.close)
        await fresh.mkdir("/after-removal")
        status = await fresh.status()
        voters = sorted(m["id"] for m in status["meta"] if m.get("voter"))
        self.assertEqual(len(voters), 3)
        self.assertNotIn(leader, voters)
        names = {e.name for e in await fresh.ls("/many")}
        self.assertEqual(len(names), 32 * 70)


# Loaded by a daemon's Python at start (PYTHONPATH): makes it a release that applies metadata
# log version 0, as every release before log versions does. Only the version number differs
# from the code under test, which is what a rolling upgrade's mixed group hinges on.
_OLDER_RELEASE = """\
import dogfs.meta.commands, dogfs.meta.log, dogfs.meta.state, dogfs.meta.versions
for module in (dogfs.meta.commands, dogfs.meta.log, dogfs.meta.state, dogfs.meta.versions):
    module.LOG_VERSION = 0
"""


class _Upgrades(TestCase):
    """Helpers: a group started from another release's code, upgraded member by member."""

    timeout = 300

    async def older_group(self, pythonpath: str) -> tuple[RealCluster, Any, dict[str, bytes]]:
        """A cluster whose CLI and daemons run the code on ``pythonpath`` (then switched to
        this release for what follows), a client, and the files written so far."""
        cluster = RealCluster(env={"PYTHONPATH": pythonpath})
        self.addCleanup(cluster.destroy)
        await threads.deferToThread(cluster.up)
        cluster.env = dict(ENV)  # from here on, the release under test
        client = cluster.client()
        self.addCleanup(client.close)
        written = {"/before": content("/before")}
        await client.put("/before", io.BytesIO(written["/before"]))
        return cluster, client, written

    @staticmethod
    def versions(cluster: RealCluster) -> list[tuple[Any, Any]]:
        """(log version its release applies, its group's) per member, from `cluster status`."""
        nodes = cluster.nodes()
        return [(nodes.get(m, {}).get("log_version"), nodes.get(m, {}).get("group_log_version"))
                for m in cluster.meta_ids()]

    async def upgrade(self, cluster: RealCluster, client: Any, member: str, written: dict[str, bytes]) -> None:
        """Restart ``member`` with the release under test, then put a file."""
        await threads.deferToThread(cluster.run, "cluster", "stop", member)
        await threads.deferToThread(cluster.start, member)
        await wait_for_leader(cluster)
        path = f"/after-upgrading-{member}"
        written[path] = content(path)
        await client.put(path, io.BytesIO(written[path]))

    async def all_upgraded(self, cluster: RealCluster, client: Any, written: dict[str, bytes]) -> None:
        """Wait until every member applies, and its group uses, log version 1; then check
        that every file written reads back."""
        deadline = time.monotonic() + 30.0
        while (seen := await threads.deferToThread(self.versions, cluster)) != [(1, 1)] * 3:
            self.assertLess(time.monotonic(), deadline, f"log versions (release, group) per member: {seen}")
            await sleep(0.2)
        for path, body in written.items():
            sink = io.BytesIO()
            await client.get(path, sink)
            self.assertEqual(sink.getvalue(), body, path)


class RollingUpgradeProcessTests(_Upgrades):
    """A metadata group upgraded one member at a time, serving throughout."""

    def test_rolling_upgrade_and_refused_downgrade(self) -> defer.Deferred[None]:
        """A group whose members all apply log version 0 (an older release) is upgraded one
        member at a time: puts work after each step. The first member upgraded is made leader
        (`admin meta lead`); it hears the others apply 0 and leaves the group's version at 0.
        Once the last member runs the new release, the version rises to 1 by itself. Every
        file reads back. A member then started with the older release exits, saying why, and
        the others serve."""
        return defer.Deferred.fromCoroutine(self._rolling())

    async def _rolling(self) -> None:
        overlay = tempfile.mkdtemp(prefix="dogfs-older-")
        self.addCleanup(shutil.rmtree, overlay, True)
        with open(os.path.join(overlay, "sitecustomize.py"), "w") as f:
            f.write(_OLDER_RELEASE)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        older = os.pathsep.join(p for p in (overlay, root, os.environ.get("PYTHONPATH")) if p)
        cluster, client, written = await self.older_group(older)
        self.assertEqual(await threads.deferToThread(self.versions, cluster), [(0, 0)] * 3)
        leader = await wait_for_leader(cluster)
        first = next(m for m in cluster.meta_ids() if m != leader)

        # One member upgraded, and made the leader (`admin meta lead`): it asks the others,
        # hears that they apply 0, and must not raise the group's version.
        await self.upgrade(cluster, client, first, written)
        await threads.deferToThread(cluster.run, "admin", "meta", "lead", first)
        self.assertEqual(await wait_for_leader(cluster), first)
        address = (await threads.deferToThread(cluster.nodes))[first]["address"]

        async def leader_view() -> dict[str, Any]:
            from dogfs.client.api import DogFSClient
            from dogfs.config import load_client

            config = attrs.evolve(load_client(os.path.join(cluster.home, "client.toml")), meta=(address,))
            direct = DogFSClient(_reactor(), config, timeout=10.0)
            try:
                return await direct.status()  # type: ignore[no-any-return]
            finally:
                await direct.close()

        expected = {m: (1 if m == first else 0) for m in cluster.meta_ids()}
        deadline = time.monotonic() + 30.0
        while True:
            view = await leader_view()
            if {mm["id"]: mm.get("log_version") for mm in view["meta"]} == expected:
                break
            self.assertLess(time.monotonic(), deadline, f"the new leader's view of the members: {view['meta']}")
            await sleep(0.2)
        # A put commits after anything that round proposed: the leader has applied it by then.
        await client.put("/under-new-leader", io.BytesIO(content("/under-new-leader")))
        written["/under-new-leader"] = content("/under-new-leader")
        self.assertEqual((await leader_view())["cluster"]["log_version"], 0)
        for member in cluster.meta_ids():
            if member != first:
                await self.upgrade(cluster, client, member, written)
        await self.all_upgraded(cluster, client, written)

        # A downgrade after the group moved on: the member refuses to start, in one sentence.
        leader = await wait_for_leader(cluster)
        follower = next(m for m in cluster.meta_ids() if m != leader)
        await threads.deferToThread(cluster.run, "cluster", "stop", follower)
        cluster.env = dict(ENV, PYTHONPATH=older)
        await threads.deferToThread(cluster.run, "cluster", "start", follower, check=False)
        from dogfs.cli import cluster_layout as layout

        spec = layout.load_spec(cluster.home)
        assert spec is not None
        node = next(n for n in spec.nodes if n.id == follower)
        deadline = time.monotonic() + 30.0
        while layout.node_pid(cluster.home, node) is not None:
            self.assertLess(time.monotonic(), deadline, f"{follower} of the older release kept running")
            await sleep(0.2)
        with open(layout.log_path(cluster.home, node)) as f:
            self.assertIn("uses metadata log version 1, and this release of DogFS applies up to 0", f.read())
        await client.put("/after", io.BytesIO(content("/after")))


class UpgradeFromPreviousReleaseTests(_Upgrades):
    """The upgrade from the release before log versions, run from its own code."""

    #: The last commit before log versions (its daemons answer "unknown query" when asked
    #: their log version, and decode Raft messages strictly).
    PREVIOUS = "0b2d6b6"

    def test_rolling_upgrade_from_the_previous_release(self) -> defer.Deferred[None]:
        """A group of the previous release's daemons is upgraded to this one, leader first,
        one member at a time: every step keeps serving puts, the group's log version stays 0
        while a member of the previous release is left, then rises to 1; every file reads
        back."""
        return defer.Deferred.fromCoroutine(self._upgrade())

    def previous_release(self) -> str:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        git = shutil.which("git")
        if git is None:
            raise SkipTest("git is not installed")
        archive = subprocess.run([git, "-C", root, "archive", self.PREVIOUS], capture_output=True)
        if archive.returncode != 0:
            raise SkipTest(f"commit {self.PREVIOUS} is not in this clone: {archive.stderr.decode().strip()}")
        tree = tempfile.mkdtemp(prefix="dogfs-previous-")
        self.addCleanup(shutil.rmtree, tree, True)
        subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
        return tree

    async def _upgrade(self) -> None:
        tree = await threads.deferToThread(self.previous_release)
        cluster, client, written = await self.older_group(tree)
        # The previous release says nothing of log versions.
        self.assertEqual(await threads.deferToThread(self.versions, cluster), [(None, None)] * 3)
        leader = await wait_for_leader(cluster)
        order = [leader] + [m for m in cluster.meta_ids() if m != leader]
        for step, member in enumerate(order, 1):
            await self.upgrade(cluster, client, member, written)
            if step < len(order):
                seen = await threads.deferToThread(self.versions, cluster)
                self.assertEqual({group for _, group in seen} - {None}, {0}, seen)
        await self.all_upgraded(cluster, client, written)
