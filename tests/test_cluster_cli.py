"""Tests for `dogfs cluster`: the files of a local cluster, its process control, readiness, and
(with the daemons built) the whole life of a real cluster on loopback as a user types it."""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from dogfs.cli import cluster, demo
from dogfs.cli import cluster_layout as layout
from dogfs.cli.output import USAGE, CLIError
from dogfs.config import load_chunk, load_client, load_meta

# Real-process tests give a cluster this long to serve (a loaded 2-core machine is slow).
WAIT = 60.0


def _cli(home: str, *argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run `dogfs --home HOME ARGV...` as a user would, with the venv's python."""
    return subprocess.run(
        [sys.executable, "-m", "dogfs.cli.main", "--home", home, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _daemons_missing() -> str | None:
    for kind in ("meta", "chunk"):
        module = importlib.import_module(f"dogfs.plugins.{kind}")
        if not hasattr(module, "makeService"):
            return f"dogfs-{kind} plugin not built yet"
    return None


def _kill_leftovers(home: str) -> None:
    """Last resort after a failed test: SIGKILL any daemon still running under `home`."""
    spec = layout.load_spec(home)
    if spec is None:
        return
    pids = [p for n in spec.nodes if (p := layout.node_pid(home, n)) is not None]
    layout.stop_pids(pids, sig=signal.SIGKILL)


def _spec(tls: bool = False, metas: int = 1, chunks: int = 3) -> layout.ClusterSpec:
    return layout.new_spec(metas, chunks, "RS-2-1", tls, None)


def _home(case: SynchronousTestCase) -> str:
    home = tempfile.mkdtemp(prefix="dogfs-home-", dir=os.path.abspath("."))
    return home


class LayoutTests(SynchronousTestCase):
    def test_ports_distinct(self) -> None:
        """A new cluster's ports are all different and on loopback."""
        spec = _spec(metas=3, chunks=6)
        ports = [n.port for n in spec.nodes] + [
            int(m.http_address.rpartition(":")[2]) for m in spec.metas
        ]
        self.assertEqual(len(set(ports)), len(ports))
        self.assertTrue(all(n.address.startswith("127.0.0.1:") for n in spec.nodes))
        self.assertEqual([n.id for n in spec.nodes][:4], ["meta-1", "meta-2", "meta-3", "chunk-1"])

    def test_base_port(self) -> None:
        """--base-port P: metas on P.., their HTTP on P+80.., chunk servers on P+100.."""
        # Ports a test just used may linger (TIME_WAIT): try bases until one has them all free.
        first = layout.pick_ports(1)[0] // 1000 * 1000
        candidates = [first] if 1024 <= first <= 60000 else []
        candidates += range(20000, 40000, 1000)
        for base in candidates:
            try:
                spec = layout.new_spec(2, 2, "RS-1-1", False, base)
                break
            except CLIError:
                continue
        else:
            raise SkipTest("no base port on this machine has its ports free")
        self.assertEqual(
            [n.address for n in spec.nodes],
            [
                f"127.0.0.1:{base}",
                f"127.0.0.1:{base + 1}",
                f"127.0.0.1:{base + 100}",
                f"127.0.0.1:{base + 101}",
            ],
        )
        self.assertEqual(spec.metas[1].http_address, f"127.0.0.1:{base + 81}")

    def test_configs_load(self) -> None:
        """Every config `up` writes loads with the daemon's and client's own loaders."""
        home = _home(self)
        spec = _spec(metas=3)
        layout.write_cluster(home, spec)
        peers = {m.id: m.address for m in spec.metas}
        for m in spec.metas:
            config = load_meta(layout.config_path(home, m))
            self.assertEqual((config.id, config.address), (m.id, m.address))
            self.assertEqual(dict(config.peers), peers)
            self.assertEqual(config.data_dir, layout.data_dir(home, m))
            self.assertEqual(config.default_ec, "RS-2-1")
            self.assertIsNone(config.tls)
        for c in spec.chunks:
            chunk = load_chunk(layout.config_path(home, c))
            self.assertEqual(chunk.meta, tuple(peers.values()))
            self.assertTrue(os.path.isdir(chunk.data_dir))
        client = load_client(os.path.join(home, "client.toml"))
        self.assertEqual(client.meta, tuple(peers.values()))
        self.assertEqual(layout.load_spec(home), spec)

    def test_tls_material(self) -> None:
        """With TLS every config names a CA, certificate and key that exist."""
        home = _home(self)
        spec = _spec(tls=True)
        layout.write_cluster(home, spec)
        tls_files = [load_meta(layout.config_path(home, spec.metas[0])).tls]
        tls_files += [load_chunk(layout.config_path(home, c)).tls for c in spec.chunks]
        tls_files.append(load_client(os.path.join(home, "client.toml")).tls)
        for tls in tls_files:
            assert tls is not None
            for path in (tls.ca, tls.cert, tls.key):
                self.assertTrue(os.path.isfile(path), path)
        self.assertEqual(os.stat(os.path.join(home, "client.toml")).st_mode & 0o777, 0o600)

    def test_add_chunks(self) -> None:
        """add_chunks names the new servers after the highest chunk-N, on ports of their own,
        with the given capacity and a node certificate from the cluster's CA; cluster.toml
        lists them after the others, and the existing configs are untouched."""
        home = _home(self)
        spec = _spec(tls=True)
        layout.write_cluster(home, spec)
        before = open(layout.config_path(home, spec.chunks[0])).read()
        grown, new = layout.add_chunks(home, spec, 2, capacity=1 << 30)
        self.assertEqual([n.id for n in new], ["chunk-4", "chunk-5"])
        self.assertEqual(layout.load_spec(home), grown)
        self.assertEqual(grown.nodes, spec.nodes + tuple(new))
        ports = [n.port for n in grown.nodes] + [int(m.http_address.rpartition(":")[2]) for m in grown.metas]
        self.assertEqual(len(set(ports)), len(ports))
        for node in new:
            chunk = load_chunk(layout.config_path(home, node))
            self.assertEqual((chunk.id, chunk.address, chunk.capacity_bytes), (node.id, node.address, 1 << 30))
            self.assertEqual(chunk.meta, tuple(m.address for m in spec.metas))
            assert chunk.tls is not None
            from cryptography import x509

            with open(chunk.tls.cert, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
            with open(chunk.tls.ca, "rb") as f:
                ca = x509.load_pem_x509_certificate(f.read())
            self.assertEqual(cert.issuer, ca.subject)
            self.assertIn(node.id, cert.subject.rfc4514_string())
        self.assertEqual(open(layout.config_path(home, spec.chunks[0])).read(), before)
        _, more = layout.add_chunks(home, grown, 1)
        self.assertEqual(more[0].id, "chunk-6")
        self.assertEqual(load_chunk(layout.config_path(home, more[0])).capacity_bytes, 0)

    def test_add_chunks_keeps_the_base_port_layout(self) -> None:
        """A cluster made with --base-port P gets its new chunk servers on P+100+N.., so that
        `cluster up --base-port P` still matches it; a taken port there is a clear error."""
        home = _home(self)
        for base in range(23000, 60000, 211):
            try:
                spec = layout.new_spec(1, 3, "RS-2-1", False, base)
                break
            except CLIError:
                continue
        layout.write_cluster(home, spec)
        grown, new = layout.add_chunks(home, spec, 2)
        self.assertEqual([n.port for n in new], [base + 103, base + 104])
        args = argparse.Namespace(meta=None, chunk=None, ec=None, insecure=False, block_size=None, base_port=base, capacity=None)
        cluster._check_matches(grown, args, home)  # no error
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", base + 105))
            e = self.assertRaises(CLIError, layout.add_chunks, home, grown, 1)
        self.assertIn(f"port {base + 105}", e.message)
        self.assertIn(f"--base-port {base}", e.message)

    def test_add_chunks_never_reuses_a_nodes_port(self) -> None:
        """A stopped cluster's ports are free, but the kernel's pick is checked against them."""
        home = _home(self)
        spec = _spec()
        layout.write_cluster(home, spec)
        picks = iter([[spec.chunks[0].port], [spec.metas[0].port], [1234]])
        original = layout.pick_ports
        layout.pick_ports = lambda count: next(picks)  # type: ignore[assignment]
        try:
            _, [node] = layout.add_chunks(home, spec, 1)
        finally:
            layout.pick_ports = original
        self.assertEqual(node.port, 1234)

    def test_no_cluster(self) -> None:
        """An empty HOME holds no cluster."""
        self.assertIsNone(layout.load_spec(_home(self)))

    def test_unknown_node(self) -> None:
        """An unknown node id is a usage error that lists the node ids."""
        e = self.assertRaises(CLIError, _spec().node, "chunk-9")
        self.assertEqual(e.exit_code, USAGE)
        self.assertIn("meta-1, chunk-1, chunk-2, chunk-3", e.message)


class ProcessTests(SynchronousTestCase):
    def test_pid_alive(self) -> None:
        """Our own pid is alive; a child that exited (and was reaped) is not."""
        self.assertTrue(layout.pid_alive(os.getpid()))
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        self.assertFalse(layout.pid_alive(child.pid))

    def test_zombie_is_dead(self) -> None:
        """A child that exited but is not yet reaped counts as dead (and gets reaped)."""
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, still a zombie
        self.assertFalse(layout.pid_alive(child.pid))

    def test_stale_pidfile(self) -> None:
        """A pidfile naming a dead process, or one that is not the node's daemon, is ignored."""
        home = _home(self)
        spec = _spec()
        layout.write_cluster(home, spec)
        node = spec.chunks[0]
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        with open(layout.pidfile_path(home, node), "w") as f:
            f.write(str(child.pid))
        self.assertIsNone(layout.node_pid(home, node))
        with open(layout.pidfile_path(home, node), "w") as f:
            f.write(str(os.getpid()))  # alive, but its command line is not the daemon's
        self.assertIsNone(layout.node_pid(home, node))

    def test_stop_escalates(self) -> None:
        """A process that ignores SIGTERM gets SIGKILL after the timeout."""
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import signal, sys\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
                "signal.pause()",  # until SIGKILL: SIGTERM is ignored
            ],
            stdout=subprocess.PIPE,
        )
        self.addCleanup(child.kill)
        assert child.stdout is not None
        self.assertEqual(child.stdout.readline(), b"ready\n")
        child.stdout.close()
        killed = layout.stop_pids([child.pid], timeout=0.2)
        self.assertEqual(killed, [child.pid])
        self.assertFalse(layout.pid_alive(child.pid))

    def test_log_tail(self) -> None:
        """log_tail gives the last lines of a node's log."""
        home = _home(self)
        spec = _spec()
        layout.write_cluster(home, spec)
        with open(layout.log_path(home, spec.metas[0]), "w") as f:
            f.write("".join(f"line {i}\n" for i in range(100)))
        self.assertEqual(layout.log_tail(home, spec.metas[0], 2), "line 98\nline 99")


def _answer(leader: str | None, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "cluster": {"leader": leader},
        "meta": [
            {
                "id": "meta-1",
                "role": "leader" if leader else "candidate",
                "term": 3,
                "commit_index": 9,
                "http_address": "127.0.0.1:1",
            }
        ],
        "chunks": chunks,
    }


def _chunk(node_id: str, state: str = "alive", heartbeat: float | None = 0.2) -> dict[str, Any]:
    return {
        "id": node_id,
        "state": state,
        "capacity_bytes": 100,
        "used_bytes": 10,
        "shards": 2,
        "last_heartbeat_s": heartbeat,
    }


class ReadinessTests(SynchronousTestCase):
    def test_missing(self) -> None:
        """The cluster serves once a leader is known and every chunk server is alive."""
        spec = _spec()
        address = spec.metas[0].address
        self.assertEqual(cluster._missing(spec, {}), ["no metadata node answers"])
        alive = [_chunk(c.id) for c in spec.chunks]
        self.assertEqual(
            cluster._missing(spec, {address: _answer(None, alive)}), ["no metadata leader yet"]
        )
        partly = [_chunk("chunk-1"), _chunk("chunk-2", "dead")]
        self.assertEqual(
            cluster._missing(spec, {address: _answer("meta-1", partly)}),
            ["not yet alive: chunk-2, chunk-3"],
        )
        self.assertEqual(cluster._missing(spec, {address: _answer("meta-1", alive)}), [])

    def test_restarted_needs_fresh_heartbeat(self) -> None:
        """A chunk server restarted 1 s ago is not ready on a heartbeat older than that."""
        spec = _spec()
        address = spec.metas[0].address
        chunks = [_chunk("chunk-1"), _chunk("chunk-2"), _chunk("chunk-3", heartbeat=4.0)]
        answers = {address: _answer("meta-1", chunks)}
        self.assertEqual(
            cluster._missing(spec, answers, {"chunk-3": 1.0}), ["not yet alive: chunk-3"]
        )
        self.assertEqual(cluster._missing(spec, answers, {"chunk-3": 5.0}), [])

    def test_node_views_contract(self) -> None:
        """status --json objects carry the DESIGN.md fields; stopped nodes have pid null."""
        home = _home(self)
        spec = _spec()
        layout.write_cluster(home, spec)
        answers = {spec.metas[0].address: _answer("meta-1", [_chunk("chunk-1")])}
        views = cluster.node_views(home, spec, answers)
        common = {"id", "kind", "address", "pid", "state", "data_dir"}
        meta, chunk1, chunk2 = views[0], views[1], views[2]
        self.assertTrue(common | {"role", "term", "commit_index", "http_address"} <= set(meta))
        self.assertTrue(
            common | {"capacity_bytes", "used_bytes", "shards", "last_heartbeat_s"} <= set(chunk1)
        )
        self.assertEqual((meta["pid"], meta["state"]), (None, "stopped"))
        self.assertIsNone(meta["role"])  # not running: its role is not claimed
        self.assertEqual((meta["term"], meta["commit_index"]), (3, 9))
        self.assertEqual((chunk1["shards"], chunk1["used_bytes"]), (2, 10))
        self.assertIsNone(chunk2["last_heartbeat_s"])
        self.assertTrue(os.path.isabs(chunk1["data_dir"]))


def _pretend_running(case: SynchronousTestCase, home: str, node: layout.NodeSpec) -> int:
    """A process that `node_pid` takes for the node's daemon: its command line names the
    node's config, and the pidfile names it."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import signal; signal.pause()", layout.config_path(home, node)]
    )
    case.addCleanup(lambda: (process.kill(), process.wait()))
    with open(layout.pidfile_path(home, node), "w") as f:
        f.write(str(process.pid))
    return process.pid


class ViewTests(SynchronousTestCase):
    """What `status` claims, from what the metas said."""

    def test_secondhand_role_without_term_is_unknown(self) -> None:
        """A running meta that did not answer itself, which the leader calls "follower" with
        no term (it has not heard it since its restart), has an unknown role; with a term
        from the leader's replication the role stands."""
        home = _home(self)
        spec = _spec(metas=2)
        layout.write_cluster(home, spec)
        for m in spec.metas:
            _pretend_running(self, home, m)
        leader = spec.metas[0]

        def answer(term: int | None) -> dict[str, Any]:
            return {
                "cluster": {"leader": "meta-1"},
                "meta": [
                    {"id": "meta-1", "role": "leader", "term": 4, "commit_index": 7},
                    {"id": "meta-2", "role": "follower", "term": term, "commit_index": term and 7},
                ],
                "chunks": [],
            }

        views = {v["id"]: v for v in cluster.node_views(home, spec, {leader.address: answer(None)})}
        self.assertEqual(views["meta-1"]["role"], "leader")
        self.assertIsNone(views["meta-2"]["role"])
        self.assertEqual(cluster._detail(views["meta-2"]), "role unknown")
        self.assertEqual(cluster._detail(views["meta-1"]), "leader, term 4, commit 7")
        views = {v["id"]: v for v in cluster.node_views(home, spec, {leader.address: answer(4)})}
        self.assertEqual(cluster._detail(views["meta-2"]), "follower, term 4, commit 7")

    def test_dashboard_only_when_served(self) -> None:
        """The dashboard URL is a running meta's (the leader's first); with every meta stopped
        there is none to print."""
        home = _home(self)
        spec = _spec(metas=2)
        layout.write_cluster(home, spec)
        views = cluster.node_views(home, spec, {})
        self.assertIsNone(cluster._dashboard(views))
        out = io.StringIO()
        cluster._print_summary(home, views, out)
        self.assertNotIn("dashboard", out.getvalue())
        _pretend_running(self, home, spec.metas[1])
        views = cluster.node_views(home, spec, {})
        self.assertEqual(cluster._dashboard(views), f"http://{spec.metas[1].http_address}/")


def _up_args(**kw: Any) -> argparse.Namespace:
    values = {"meta": None, "chunk": None, "ec": None, "insecure": False, "block_size": None, "base_port": None,
              "capacity": None}
    values.update(kw)
    return argparse.Namespace(**values)


class MatchTests(SynchronousTestCase):
    def test_differing_options(self) -> None:
        """`up` on an existing cluster with other sizes or policy is a usage error."""
        spec = _spec()
        cluster._check_matches(spec, _up_args(chunk=3, ec="rs-2-1"), "/h")
        e = self.assertRaises(CLIError, cluster._check_matches, spec, _up_args(chunk=6), "/h")
        self.assertEqual(e.exit_code, USAGE)
        self.assertIn("--chunk 6 (it has 3)", e.message)

    def test_capacity(self) -> None:
        """`up --capacity` writes every chunk server's capacity_bytes in a new cluster; a
        different one for an existing cluster is refused like the other options."""
        home = _home(self)
        spec = _spec()
        layout.write_cluster(home, spec, capacity=1 << 30)
        self.assertEqual({load_chunk(layout.config_path(home, n)).capacity_bytes for n in spec.chunks}, {1 << 30})
        cluster._check_matches(spec, _up_args(capacity=1 << 30), home)
        e = self.assertRaises(CLIError, cluster._check_matches, spec, _up_args(capacity=2 << 30), home)
        self.assertEqual(e.exit_code, USAGE)
        self.assertIn("--capacity 2.0 GiB (it has chunk-1 1.0 GiB", e.message)
        plain = _home(self)
        layout.write_cluster(plain, spec)
        self.assertEqual({load_chunk(layout.config_path(plain, n)).capacity_bytes for n in spec.chunks}, {0})
        e = self.assertRaises(CLIError, cluster._check_matches, spec, _up_args(capacity=1 << 30), plain)
        self.assertIn("(it has chunk-1 its disk", e.message)

    def test_block_size_and_base_port(self) -> None:
        """--block-size and --base-port that differ from an existing cluster's are refused
        like the other options, not silently ignored."""
        home = _home(self)
        spec = _spec()
        layout.write_cluster(home, spec, block_size=1 << 20)
        cluster._check_matches(spec, _up_args(block_size=1 << 20), home)
        e = self.assertRaises(CLIError, cluster._check_matches, spec, _up_args(block_size=2 << 20), home)
        self.assertEqual(e.exit_code, USAGE)
        self.assertIn("differs from --block-size 2.0 MiB (it has 1.0 MiB)", e.message)
        based = layout.ClusterSpec(
            nodes=(
                layout.NodeSpec("meta-1", "meta", "127.0.0.1:20000", "127.0.0.1:20080"),
                layout.NodeSpec("chunk-1", "chunk", "127.0.0.1:20100"),
                layout.NodeSpec("chunk-2", "chunk", "127.0.0.1:20101"),
            ),
            ec="RS-1-1",
            tls=False,
        )
        cluster._check_matches(based, _up_args(base_port=20000), "/h")
        e = self.assertRaises(CLIError, cluster._check_matches, based, _up_args(base_port=21000), "/h")
        self.assertEqual(e.exit_code, USAGE)
        self.assertIn("--base-port 21000 (its metadata nodes listen on 20000, its chunk servers on 20100, 20101)", e.message)
        # A cluster made before metadata nodes served HTTP has no HTTP addresses: still P's.
        old = layout.ClusterSpec(
            nodes=(layout.NodeSpec("meta-1", "meta", "127.0.0.1:20000"),) + based.chunks, ec="RS-1-1", tls=False
        )
        cluster._check_matches(old, _up_args(base_port=20000), "/h")
        self.assertTrue(layout.follows_base_port(old, 20000))

    def test_too_few_chunks(self) -> None:
        """A policy wider than the chunk servers is refused before anything is written."""
        e = self.assertRaises(
            CLIError, cluster._new_spec, _up_args(chunk=3, ec="RS-4-2", base_port=None)
        )
        self.assertEqual(e.exit_code, USAGE)


class WaitReadyTests(TestCase):
    """`_wait_ready` against real processes but no metadata node (the trial reactor runs)."""

    def _started(self, home: str, spec: layout.ClusterSpec, code: str) -> subprocess.Popen[bytes]:
        node = spec.chunks[0]
        with open(layout.log_path(home, node), "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT
            )
        self.addCleanup(lambda: (process.kill(), process.wait()))
        return process

    def test_daemon_exits(self) -> None:
        """A daemon that exits during start-up fails `up` with the tail of its log."""
        home = _home(self)
        spec = _spec()
        layout.write_cluster(home, spec)
        process = self._started(home, spec, "print('bad things happened'); raise SystemExit(3)")
        d: Deferred[Any] = Deferred.fromCoroutine(
            cluster._wait_ready(_reactor, home, spec, {"chunk-1": process}, 30.0)
        )
        d = self.assertFailure(d, CLIError)

        def check(e: CLIError) -> None:
            self.assertIn("chunk-1 exited with status 3", e.message)
            self.assertIn("bad things happened", e.message)

        return d.addCallback(check)

    def test_deadline(self) -> None:
        """With no metadata node answering, `up` fails at its deadline saying why."""
        home = _home(self)
        spec = _spec()
        layout.write_cluster(home, spec)
        process = self._started(home, spec, "import signal; signal.pause()")  # never answers
        d: Deferred[Any] = Deferred.fromCoroutine(
            cluster._wait_ready(_reactor, home, spec, {"chunk-1": process}, 0.3)
        )
        d = self.assertFailure(d, CLIError)
        d.addCallback(lambda e: self.assertIn("no metadata node answers", e.message))
        return d


class CommandLineTests(SynchronousTestCase):
    """The CLI as typed, on a cluster that is written but not running (no daemons needed)."""

    def test_status_of_stopped_cluster(self) -> None:
        """status --json on a stopped cluster lists every node as stopped with pid null."""
        home = _home(self)
        layout.write_cluster(home, _spec())
        result = _cli(home, "cluster", "status", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        nodes = json.loads(result.stdout)["nodes"]
        self.assertEqual([n["id"] for n in nodes], ["meta-1", "chunk-1", "chunk-2", "chunk-3"])
        self.assertTrue(all(n["state"] == "stopped" and n["pid"] is None for n in nodes))
        text = _cli(home, "cluster", "status")
        self.assertEqual(text.returncode, 0, text.stderr)
        self.assertNotIn("dashboard:", text.stdout)  # no meta runs to serve one

    def test_add_chunk_to_stopped_cluster(self) -> None:
        """add-chunk on a cluster that is not running only writes the new servers' files (up
        starts them with the rest); a count out of range is a usage error."""
        home = _home(self)
        layout.write_cluster(home, _spec())
        result = _cli(home, "--json", "cluster", "add-chunk", "2", "--capacity", "1GiB")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual([(n["id"], n["outcome"]) for n in json.loads(result.stdout)["nodes"]],
                         [("chunk-4", "added"), ("chunk-5", "added")])
        self.assertIn("the cluster is not running", result.stderr)
        spec = layout.load_spec(home)
        assert spec is not None
        self.assertEqual([c.id for c in spec.chunks], ["chunk-1", "chunk-2", "chunk-3", "chunk-4", "chunk-5"])
        self.assertEqual(load_chunk(layout.config_path(home, spec.chunks[-1])).capacity_bytes, 1 << 30)
        bad = _cli(home, "cluster", "add-chunk", "0")
        self.assertEqual(bad.returncode, USAGE, bad.stderr)
        self.assertIn("between 1 and 100", bad.stderr)

    def test_json_of_process_commands(self) -> None:
        """stop, kill, start and down honour --json (global or after the command): stdout is
        one JSON object naming the nodes acted on and what became of them."""
        home = _home(self)
        layout.write_cluster(home, _spec())
        for node, argv in (
            ("chunk-1", ("cluster", "stop", "chunk-1", "--json")),
            ("meta-1", ("--json", "cluster", "kill", "meta-1")),
        ):
            result = _cli(home, *argv)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(
                json.loads(result.stdout),
                {"nodes": [{"id": node, "pid": None, "outcome": "not running"}]},
            )
            self.assertIn(f"{node} is not running", result.stderr)  # the words go to stderr
        down = _cli(home, "--json", "cluster", "down")
        self.assertEqual(down.returncode, 0, down.stderr)
        self.assertEqual(json.loads(down.stdout), {"nodes": []})

    def test_closed_pipe(self) -> None:
        """`dogfs cluster status | head -3`: a reader that goes away ends the command quietly
        (exit 1, no traceback)."""
        home = _home(self)
        layout.write_cluster(home, _spec(chunks=40))
        read, write = os.pipe()
        os.close(read)  # every write to the pipe now fails with EPIPE
        try:
            result = subprocess.run(
                [sys.executable, "-m", "dogfs.cli.main", "--home", home, "cluster", "status"],
                stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
            )
        finally:
            os.close(write)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stderr, "")

    def test_bad_node(self) -> None:
        """stop/start/kill of an unknown node exit 2 naming the nodes."""
        home = _home(self)
        layout.write_cluster(home, _spec())
        for command in ("stop", "start", "kill"):
            result = _cli(home, "cluster", command, "chunk-42")
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertIn("chunk-42", result.stderr)
            self.assertIn("meta-1, chunk-1, chunk-2, chunk-3", result.stderr)
            self.assertTrue(result.stderr.startswith("dogfs: "))

    def test_no_cluster(self) -> None:
        """status on a HOME without a cluster exits 2 and says how to make one."""
        result = _cli(_home(self), "cluster", "status")
        self.assertEqual(result.returncode, 2)
        self.assertIn("cluster up", result.stderr)


class RealClusterTests(SynchronousTestCase):
    """A real cluster of twistd daemons on loopback: 1 meta, 3 chunk servers, RS-2-1."""

    def setUp(self) -> None:
        missing = _daemons_missing()
        if missing:
            raise SkipTest(missing)

    def _status(self, home: str) -> dict[str, dict[str, Any]]:
        result = _cli(home, "cluster", "status", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        return {n["id"]: n for n in json.loads(result.stdout)["nodes"]}

    def _up(self, home: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return _cli(
            home, "cluster", "up", "--detach", "--wait", str(WAIT), *extra, timeout=WAIT + 60
        )

    def test_life_of_a_cluster(self) -> None:
        """up --detach serves; status has the contract; stop/start change a chunk server's
        state; down stops every pid; up again reuses the ports and the data and honours a
        node's log_format = "json"; kill leaves a stale pidfile and up restarts that node."""
        home = _home(self)
        self.addCleanup(_kill_leftovers, home)
        result = self._up(home, "--meta", "1", "--chunk", "3", "--ec", "RS-2-1", "--insecure")
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        self.assertIn("chunk-3", result.stdout)
        spec = layout.load_spec(home)
        assert spec is not None

        nodes = self._status(home)
        self.assertEqual(set(nodes), {"meta-1", "chunk-1", "chunk-2", "chunk-3"})
        meta = nodes["meta-1"]
        self.assertEqual((meta["kind"], meta["state"], meta["role"]), ("meta", "running", "leader"))
        self.assertIsInstance(meta["term"], int)
        self.assertIsInstance(meta["commit_index"], int)
        for c in ("chunk-1", "chunk-2", "chunk-3"):
            chunk = nodes[c]
            self.assertEqual((chunk["kind"], chunk["state"]), ("chunk", "running"))
            self.assertIsInstance(chunk["pid"], int)
            self.assertIsInstance(chunk["capacity_bytes"], int)
            self.assertIsInstance(chunk["shards"], int)
            self.assertIsNotNone(chunk["last_heartbeat_s"])
            self.assertTrue(chunk["data_dir"].startswith(home))
        # Something only the metadata's data dir keeps across restarts.
        marker = os.path.join(layout.data_dir(home, spec.metas[0]), "kept-by-test")
        open(marker, "w").close()

        stopped = _cli(home, "cluster", "stop", "chunk-2")
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        self.assertFalse(layout.pid_alive(nodes["chunk-2"]["pid"]))
        after = self._status(home)
        self.assertEqual((after["chunk-2"]["state"], after["chunk-2"]["pid"]), ("stopped", None))
        self.assertEqual(after["chunk-1"]["state"], "running")

        began = time.monotonic()
        started = _cli(home, "cluster", "start", "chunk-2", "--wait", str(WAIT))
        self.assertEqual(started.returncode, 0, started.stderr)
        restarted = self._status(home)["chunk-2"]
        self.assertEqual(restarted["state"], "running")
        # `start` returns once the leader has heard the new process, not on the old one's last
        # heartbeat (sent before `stop`, so older than this start).
        self.assertEqual(restarted["health"], "alive")
        self.assertLessEqual(restarted["last_heartbeat_s"], time.monotonic() - began)
        again = _cli(home, "cluster", "start", "chunk-2")
        self.assertEqual(again.returncode, 0)
        self.assertIn("already running", again.stdout)

        pids = [n["pid"] for n in self._status(home).values()]
        down = _cli(home, "cluster", "down")
        self.assertEqual(down.returncode, 0, down.stderr)
        self.assertFalse(any(layout.pid_alive(p) for p in pids))
        self.assertTrue(all(n["state"] == "stopped" for n in self._status(home).values()))

        different = self._up(home, "--chunk", "5")
        self.assertEqual(different.returncode, 2)
        self.assertIn("--chunk 5 (it has 3)", different.stderr)

        # The operator switches chunk-3 to JSON logs: its restart must honour that.
        chunk3 = spec.node("chunk-3")
        with open(layout.config_path(home, chunk3)) as f:
            text = f.read()
        with open(layout.config_path(home, chunk3), "w") as f:
            f.write(text.replace('log_format = "text"', 'log_format = "json"'))
        restarted = self._up(home)
        self.assertEqual(restarted.returncode, 0, restarted.stderr + restarted.stdout)
        self.assertEqual(layout.load_spec(home), spec)  # same nodes, same ports
        nodes = self._status(home)
        self.assertEqual({n["address"] for n in nodes.values()}, {n.address for n in spec.nodes})
        self.assertEqual(nodes["meta-1"]["role"], "leader")
        self.assertTrue(os.path.exists(marker))
        with open(layout.log_path(home, chunk3)) as f:
            json_lines = [line for line in f if line.startswith("{")]
        self.assertTrue(json_lines)
        self.assertTrue(all("text" in json.loads(line) for line in json_lines))

        # kill is SIGKILL: the pidfile stays behind, stale; up restarts just that node.
        pid = nodes["chunk-1"]["pid"]
        killed = _cli(home, "cluster", "kill", "chunk-1")
        self.assertEqual(killed.returncode, 0, killed.stderr)
        self.assertFalse(layout.pid_alive(pid))
        self.assertTrue(os.path.exists(layout.pidfile_path(home, spec.node("chunk-1"))))
        self.assertEqual(self._status(home)["chunk-1"]["state"], "stopped")
        again = self._up(home)
        self.assertEqual(again.returncode, 0, again.stderr + again.stdout)
        self.assertIn("starting chunk-1\n", again.stdout)
        self.assertEqual(self._status(home)["chunk-1"]["state"], "running")
        self.assertEqual(_cli(home, "cluster", "down").returncode, 0)

    def test_paths_as_cp_and_mv_read_them(self) -> None:
        """A destination that is a directory, or ends with /, receives the file under its own
        name (put, mv); a trailing / on a file is refused (rm); get into a missing directory,
        a bad --timeout and mkdir -p with another policy each get one sentence."""
        home = _home(self)
        self.addCleanup(_kill_leftovers, home)
        self.assertEqual(self._up(home, "--meta", "1", "--chunk", "3", "--ec", "RS-2-1", "--insecure").returncode, 0)
        self.addCleanup(_cli, home, "cluster", "down")
        local = os.path.join(home, "a.csv")
        with open(local, "wb") as f:
            f.write(b"x,y\n" * 1000)

        def run(*argv: str, code: int = 0, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
            result = subprocess.run(
                [sys.executable, "-m", "dogfs.cli.main", "--home", home, *argv], capture_output=True,
                text=stdin is None, input=stdin, timeout=120, env=dict(os.environ),
            )
            self.assertEqual(result.returncode, code, (argv, result.stdout, result.stderr))
            return result

        # Not a directory yet: no file named /backups appears.
        failed = run("put", local, "/backups/", code=3)
        self.assertIn("/backups", failed.stderr)
        self.assertNotIn("backups", run("ls", "/").stdout)
        run("mkdir", "/backups")
        run("put", local, "/backups")
        run("put", local, "/backups/")  # the same file again, by its name
        listing = run("--json", "ls", "/backups").stdout
        self.assertEqual([e["name"] for e in json.loads(listing)["entries"]], ["a.csv"])
        stdin = run("put", "-", "/backups/", code=2, stdin=b"data")
        self.assertIn(b"give the name of the file", stdin.stderr)
        run("mkdir", "/dir")
        moved = json.loads(run("--json", "mv", "/backups/a.csv", "/dir").stdout)
        self.assertEqual(moved, {"moved": "/backups/a.csv", "to": "/dir/a.csv"})
        refused = run("rm", "/dir/a.csv/", code=1)
        self.assertIn("ends with / but '/dir/a.csv' is a file", refused.stderr)
        run("stat", "/dir/a.csv")
        missing = run("get", "/dir/a.csv", os.path.join(home, "nowhere") + "/", code=3)
        self.assertIn("no such local directory", missing.stderr)
        self.assertIn("positive number of seconds", run("ls", "/", "--timeout", "-1", code=2).stderr)
        self.assertIn("not a number", run("ls", "/", "--timeout", "soon", code=2).stderr)
        run("mkdir", "/p", "--ec", "RS-2-1")
        policy = run("mkdir", "-p", "/p", "--ec", "RS-3-2", code=1)
        self.assertIn("already exists with policy RS-2-1", policy.stderr)

    def test_start_meta_whose_port_is_taken(self) -> None:
        """`start` of a metadata node that cannot listen (another process holds its port)
        fails with the end of its log instead of saying it started; once the port is free it
        starts, and says so. up, stop, start and down print JSON with --json."""
        home = _home(self)
        self.addCleanup(_kill_leftovers, home)
        result = self._up(home, "--meta", "1", "--chunk", "2", "--ec", "RS-1-1", "--insecure", "--json")
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        up = json.loads(result.stdout)
        self.assertEqual(sorted(up["started"]), ["chunk-1", "chunk-2", "meta-1"])
        nodes = {n["id"]: n for n in up["nodes"]}
        self.assertEqual((nodes["meta-1"]["role"], nodes["chunk-2"]["health"]), ("leader", "alive"))
        self.assertIn("starting meta-1", result.stderr)
        spec = layout.load_spec(home)
        assert spec is not None
        meta = spec.node("meta-1")

        refused = self._up(home, "--block-size", "1MiB")
        self.assertEqual(refused.returncode, 2, refused.stderr)
        self.assertIn("--block-size 1.0 MiB (it has 64.0 MiB)", refused.stderr)

        stopped = _cli(home, "cluster", "stop", "meta-1", "--json")
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        self.assertEqual(
            json.loads(stopped.stdout),
            {"nodes": [{"id": "meta-1", "pid": nodes["meta-1"]["pid"], "outcome": "stopped"}]},
        )
        squatter = socket.socket()
        self.addCleanup(squatter.close)
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", meta.port))
        squatter.listen(16)  # accepts connections: listening alone is not serving
        failed = _cli(home, "cluster", "start", "meta-1", "--wait", "30")
        self.assertEqual(failed.returncode, 1, failed.stdout + failed.stderr)
        self.assertNotIn("started", failed.stdout)
        self.assertIn("meta-1 exited with status", failed.stderr)
        self.assertIn(layout.log_path(home, meta), failed.stderr)
        self.assertIn("Address already in use", failed.stderr)  # the log's own words
        self.assertEqual(self._status(home)["meta-1"]["state"], "stopped")

        squatter.close()
        started = _cli(home, "--json", "cluster", "start", "meta-1", "--wait", str(WAIT))
        self.assertEqual(started.returncode, 0, started.stderr)
        [node] = json.loads(started.stdout)["nodes"]
        self.assertEqual((node["id"], node["outcome"], node["address"]), ("meta-1", "started", meta.address))
        self.assertEqual(self._status(home)["meta-1"]["pid"], node["pid"])

        down = _cli(home, "cluster", "down", "--json")
        self.assertEqual(down.returncode, 0, down.stderr)
        outcomes = {n["id"]: n["outcome"] for n in json.loads(down.stdout)["nodes"]}
        self.assertEqual(outcomes, {"meta-1": "stopped", "chunk-1": "stopped", "chunk-2": "stopped"})

    def test_tls_cluster(self) -> None:
        """The default cluster runs TLS: status over mutual TLS with the admin identity."""
        if not cluster.daemons_serve_tls():
            raise SkipTest(
                "the daemons do not serve TLS yet (no SERVES_TLS = True in dogfs.plugins.meta "
                "and dogfs.plugins.chunk)"
            )
        home = _home(self)
        self.addCleanup(_kill_leftovers, home)
        result = self._up(home, "--meta", "1", "--chunk", "2", "--ec", "RS-1-1")
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        self.assertTrue(os.path.exists(os.path.join(home, "ca", "ca.pem")))
        self.assertEqual(self._status(home)["meta-1"]["role"], "leader")
        self.assertEqual(_cli(home, "cluster", "down").returncode, 0)


class DemoTests(SynchronousTestCase):
    """`make run`'s demo, without waiting for Ctrl-C."""

    def setUp(self) -> None:
        missing = _daemons_missing()
        if missing:
            raise SkipTest(missing)

    def test_demo_round_trip(self) -> None:
        """The demo starts its metadata nodes and 6 chunk servers, round-trips a file with matching SHA-256,
        prints what to type next and leaves nothing running."""
        home = _home(self)
        self.addCleanup(_kill_leftovers, home)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "dogfs.cli.demo",
                "--home",
                home,
                "--size",
                "300000",
                "--no-wait",
            ],
            capture_output=True,
            text=True,
            timeout=WAIT + 120,
        )
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        self.assertIn("SHA-256 matches", result.stdout)
        self.assertIn(f"export DOGFS_HOME={home}", result.stdout)
        self.assertIn("cluster stop chunk-2", result.stdout)
        spec = layout.load_spec(home)
        assert spec is not None
        self.assertEqual((len(spec.metas), len(spec.chunks)), (demo.DEMO_METAS, demo.DEMO_CHUNKS))
        self.assertEqual((demo.DEMO_METAS, demo.DEMO_CHUNKS), (3, 6))
        self.assertTrue(all(layout.node_pid(home, n) is None for n in spec.nodes))
