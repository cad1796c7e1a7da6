# -*- test-case-name: tests.test_meta_raft_process -*-
"""Metadata benchmark: a 3-node metadata Raft group (real `dogfs cluster up` daemons on
loopback) under 64 concurrent clients, against etcd 3.4 in the same run.

Measures metadata writes per second (mkdir: one Raft entry each, replicated to a majority
with fsync) and 4 KiB puts per second (allocate + 3 shard writes + commit), with p50/p99
latency as a client sees it. Each client is its own DogFSClient (its own session), all as
coroutines in this process. If ``etcd`` is on PATH, the same run measures etcd's
``/v3/kv/put`` with the same number of clients (bench/raft.py's driver).

    .venv/bin/python bench/meta.py [--clients 64] [--seconds 5] [--runs 1] [--metas 1,3] [--ops mkdir,put] [--no-etcd]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import process_cpu_seconds, run_reactor, summarise  # noqa: E402
from twisted.internet import defer  # noqa: E402


async def run_load(clients: list[Any], seconds: float, op: Any) -> tuple[float, float, float, int]:
    """Every client runs ``op(client, worker, n)`` in a loop for ``seconds``."""
    latencies: list[float] = []
    errors = [0]
    stop_at = time.perf_counter() + seconds

    async def worker(w: int, client: Any) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            n += 1
            t0 = time.perf_counter()
            try:
                await op(client, w, n)
            except Exception as e:
                errors[0] += 1
                if errors[0] <= 3:
                    print(f"  error: {e}", file=sys.stderr)
                continue
            latencies.append(time.perf_counter() - t0)

    began = time.perf_counter()
    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(worker(w, c)) for w, c in enumerate(clients)], consumeErrors=True
    )
    rate, p50, p99 = summarise(latencies, time.perf_counter() - began)
    return rate, p50, p99, errors[0]


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds used so far by this process ("bench") and each of ``pids``."""
    return {"bench": time.process_time(), **{name: process_cpu_seconds(pid) for name, pid in pids.items()}}


def raft_counters(cluster: Any) -> dict[str, tuple[float, float]]:
    """(commit index, durable log writes) of each metadata member, from its /metrics."""
    import urllib.request

    out = {}
    for node_id, node in cluster.nodes().items():
        if node.get("kind") != "meta" or not node.get("http_address"):
            continue
        try:
            with urllib.request.urlopen(f"http://{node['http_address']}/metrics", timeout=5) as r:
                lines = r.read().decode().splitlines()
        except OSError:
            continue
        values = dict(line.split(" ", 1) for line in lines if line.startswith("dogfs_raft_"))
        out[node_id] = (float(values.get("dogfs_raft_commit_index", "nan")), float(values.get("dogfs_raft_log_writes", "nan")))
    return out


def group_commit(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> str:
    """Entries committed per durable log write on each member over a window."""
    parts = []
    for node_id in sorted(after):
        if node_id in before:
            writes = after[node_id][1] - before[node_id][1]
            parts.append(f"{node_id} {(after[node_id][0] - before[node_id][0]) / max(1.0, writes):.1f}")
    return "entries/fsync " + ", ".join(parts)


def cpu_per_op(
    before: dict[str, float], after: dict[str, float], ops: float, leader: str | None = None
) -> tuple[float, str]:
    """CPU microseconds per operation, in all and as text by process (the leader starred):
    what an operation costs when the cores are shared, and where; robust to other loads on
    the machine, unlike operations per second."""
    used = {k: (after[k] - before[k]) / max(1.0, ops) * 1e6 for k in after if k in before}
    parts = ", ".join(f"{k}{'*' if k == leader else ''} {v:.0f}" for k, v in sorted(used.items()) if v >= 1)
    total = sum(used.values())
    return total, f"CPU us/op {total:.0f} = {parts}"


async def bench(reactor: Any, args: argparse.Namespace) -> None:
    from tests.test_meta_raft_process import RealCluster

    metas_list = [int(x) for x in args.metas.split(",")]
    results: dict[str, list[tuple[float, float, float, int]]] = {}
    for metas in metas_list:
        results[f"mkdir {metas}m"] = []
        results[f"put 4K {metas}m"] = []
    results["etcd put"] = []
    cpu: dict[str, list[float]] = {name: [] for name in results}
    payload = os.urandom(4096)
    for run in range(args.runs):
        for metas in metas_list:
            cluster = RealCluster(metas=metas, chunks=3, ec="RS-2-1")
            try:
                cluster.up()
                clients = [cluster.client(timeout=30) for _ in range(args.clients)]
                await clients[0].mkdir("/m")
                await clients[0].mkdir("/p")

                phase = [f"warm-r{run}"]

                async def mkdir(client: Any, w: int, n: int, phase: list[str] = phase) -> None:
                    await client.mkdir(f"/m/{phase[0]}-w{w}-{n}")

                async def put(client: Any, w: int, n: int, phase: list[str] = phase) -> None:
                    await client.put(f"/p/{phase[0]}-w{w}-{n}", io.BytesIO(payload))

                await run_load(clients, 1.0, mkdir)  # warm-up: connections, leader known
                phase[0] = f"run-r{run}"
                ops = {f"mkdir {metas}m": mkdir, f"put 4K {metas}m": put}
                for name, op in ops.items():
                    if name.split()[0] not in args.ops:
                        continue
                    pids = cluster.pids()
                    raft0 = raft_counters(cluster)
                    cpu0, t0 = cpu_seconds(pids), time.perf_counter()
                    r = await run_load(clients, args.seconds, op)
                    # CPU per operation of the bench's clients and of each daemon: what an
                    # operation costs when the cores are shared, and where.
                    cpu1 = cpu_seconds(pids)
                    done = r[0] * (time.perf_counter() - t0)
                    results[name].append(r)
                    total, text = cpu_per_op(cpu0, cpu1, done, cluster.leader())
                    cpu[name].append(total)
                    print(f"run {run + 1} dogfs {name:11} clients={args.clients}: {r[0]:.0f}/s "
                          f"p50 {r[1]:.1f} ms p99 {r[2]:.1f} ms ({r[3]} errors); {text}; "
                          f"{group_commit(raft0, raft_counters(cluster))}", file=sys.stderr)
                for c in clients:
                    await c.close()
            finally:
                cluster.destroy()
        if args.no_etcd or shutil.which("etcd") is None:
            continue
        import raft as raftbench

        base = tempfile.mkdtemp(prefix="etcdbench-")
        procs, ports = raftbench.start_etcd(base)
        try:
            port = await raftbench.etcd_leader_port(reactor, ports, time.monotonic() + 30)
            await raftbench.etcd_load(reactor, port, 16, 1.0, 128)
            etcd_pids = {f"e{i + 1}": p.pid for i, p in enumerate(procs)}
            cpu0, t0 = cpu_seconds(etcd_pids), time.perf_counter()
            r3 = await raftbench.etcd_load(reactor, port, args.clients, args.seconds, 128)
            results["etcd put"].append((*r3, 0))
            total, text = cpu_per_op(cpu0, cpu_seconds(etcd_pids), r3[0] * (time.perf_counter() - t0))
            cpu["etcd put"].append(total)
            print(f"run {run + 1} etcd  put       clients={args.clients}: {r3[0]:.0f}/s "
                  f"p50 {r3[1]:.1f} ms p99 {r3[2]:.1f} ms; {text}", file=sys.stderr)
        finally:
            raftbench.stop_group(procs)
            shutil.rmtree(base, ignore_errors=True)

    def median(rs: list[tuple[float, float, float, int]], i: int) -> float:
        values = sorted(r[i] for r in rs)
        return values[len(values) // 2]

    print(f"\nN m = N metadata nodes (1: the single-node log, no Raft); {args.clients} concurrent "
          f"clients, {args.seconds:g} s per run, median of {args.runs} run(s)")
    print(f"{'operation':12} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/op':>10}")
    for name, rs in results.items():
        if rs:
            spent = sorted(cpu[name])[len(cpu[name]) // 2] if cpu[name] else float("nan")
            print(f"{name:12} {median(rs, 0):8.0f} {median(rs, 1):8.1f} {median(rs, 2):8.1f} {spent:10.0f}")
    raft = [k for k in results if k.startswith("mkdir") and not k.endswith(" 1m") and results[k]]
    if results["etcd put"] and raft:
        ratio = median(results[raft[0]], 0) / max(1.0, median(results["etcd put"], 0))
        print(f"metadata writes ({raft[0]}) / etcd puts (3 members): {ratio:.2f}x")


def main() -> None:
    """Parse the options and run the benchmark on the global reactor."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-etcd", action="store_true")
    parser.add_argument("--metas", default="3", help="metadata group sizes to measure, e.g. 1,3")
    parser.add_argument("--ops", default="mkdir,put", help="operations to measure: mkdir, put")
    args = parser.parse_args()
    run_reactor(lambda reactor: bench(reactor, args))


if __name__ == "__main__":
    main()
