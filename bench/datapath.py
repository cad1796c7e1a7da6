"""Data path benchmark: RS-4-2 over 6 local chunk servers, against this machine's limits.

    .venv/bin/python bench/datapath.py [--size-mib 256] [--repeats 3] [--small 200]

Starts a real cluster (`dogfs cluster up --detach --meta 1 --chunk 6`) in a temporary home and
measures, in one run:

- PUT of a SIZE file through the client API, as a fraction of the machine's limit measured in
  the same run: writing the 1.5x encoded bytes to 6 files (in parallel) with fsync.
- GET of the same file as a fraction of copying it through the page cache.
- Degraded GET (the servers of 2 data shards killed) as a fraction of the healthy GET.
- 4 KiB file PUT and GET latency, p50 and p99.
- Peak RSS of a `dogfs put` of a 1 GiB stream.

Medians over --repeats; the machine is noisy, so the same-run ratios are the figures to quote.
Every timed step (baselines included) starts with `settle_memory` (bench/common.py): this
virtual machine returns freed memory to its host, and first writes to it run ~8x slower.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ENV, MiB, dogfs, make_file, process_cpu_seconds, react_for, settle_memory  # noqa: E402


def drop(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)


def baseline_fsync_write(directory: str, size: int) -> float:
    """Seconds to write 1.5 x size bytes as 6 files in parallel, each fsynced at its end."""
    per_file = size * 3 // 2 // 6
    block = os.urandom(MiB)

    def write(i: int) -> None:
        path = os.path.join(directory, f"baseline-{i}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = per_file
            while left:
                n = min(left, MiB)
                os.write(fd, block[:n])
                left -= n
            os.fsync(fd)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    for i in range(6):
        drop(os.path.join(directory, f"baseline-{i}"))
    return elapsed


def baseline_copy(source: str, target: str) -> float:
    """Seconds to copy a file through the page cache (no fsync), 1 MiB at a time."""
    started = time.perf_counter()
    with open(source, "rb") as src, open(target, "wb") as dst:
        while block := src.read(MiB):
            dst.write(block)
    elapsed = time.perf_counter() - started
    drop(target)
    return elapsed


def chunk_pids(home: str) -> list[int]:
    """The running chunk servers' process ids."""
    nodes = json.loads(dogfs(home, "--json", "cluster", "status"))["nodes"]
    return [n["pid"] for n in nodes if n["kind"] == "chunk" and n["pid"]]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class ZeroStream(io.RawIOBase):
    """A stream of `size` pseudo-random bytes that is never held in memory at once."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.block = os.urandom(MiB)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left, MiB)
        buffer[:n] = self.block[:n]
        self.left -= n
        return n


def peak_rss_put(home: str, size: int) -> int:
    """Peak RSS (bytes) of a `dogfs put -` process streaming `size` bytes from stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dogfs.cli.main", "--home", home, "put", "-", "/rss-probe"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
    )
    assert proc.stdin is not None
    block = os.urandom(MiB)
    left = size
    while left:
        n = min(left, MiB)
        proc.stdin.write(block[:n])
        left -= n
    proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"dogfs put - failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return usage.ru_maxrss * 1024


async def measure(reactor: Any, args: argparse.Namespace, home: str, work: str) -> dict[str, Any]:
    from dogfs.client.api import DogFSClient
    from dogfs.config import load_client

    client = DogFSClient(reactor, load_client(os.path.join(home, "client.toml")), timeout=60)
    size = args.size_mib * MiB
    source = os.path.join(work, "source")
    make_file(source, size, 1)
    out = os.path.join(work, "out")
    results: dict[str, Any] = {"size_mib": args.size_mib}

    # Warm-up: the first large write on a fresh machine is slow (PERFORMANCE.md).
    with open(source, "rb") as f:
        await client.put("/warmup", f)
    baseline_fsync_write(work, size)

    put_ratios, get_ratios, puts, gets, limits, copies = [], [], [], [], [], []
    # CPU seconds the PUTs cost (this client process, every chunk server): robust where the
    # machine is shared and wall-clock figures are not.
    servers = chunk_pids(home)
    put_cpu_client = put_cpu_servers = 0.0
    get_cpu_client = get_cpu_servers = 0.0
    # New page cache a step may need: a get's output file plus the shards it reads.
    settle = 2 * size + size // 2
    for i in range(args.repeats):
        settle_memory(settle)
        limit = baseline_fsync_write(work, size)
        settle_memory(settle)
        client_cpu, servers_cpu = time.process_time(), sum(map(process_cpu_seconds, servers))
        started = time.perf_counter()
        with open(source, "rb") as f:
            await client.put(f"/big-{i}", f)
        put_s = time.perf_counter() - started
        put_cpu_client += time.process_time() - client_cpu
        put_cpu_servers += sum(map(process_cpu_seconds, servers)) - servers_cpu
        settle_memory(settle)
        copy = baseline_copy(source, out)
        settle_memory(settle)
        client_cpu, servers_cpu = time.process_time(), sum(map(process_cpu_seconds, servers))
        started = time.perf_counter()
        with open(out, "wb") as f:
            await client.get(f"/big-{i}", f)
        get_s = time.perf_counter() - started
        get_cpu_client += time.process_time() - client_cpu
        get_cpu_servers += sum(map(process_cpu_seconds, servers)) - servers_cpu
        drop(out)
        limits.append(limit)
        copies.append(copy)
        puts.append(put_s)
        gets.append(get_s)
        put_ratios.append(limit / put_s)
        get_ratios.append(copy / get_s)
    results["limit_write_mib_s"] = size / MiB / statistics.median(limits)
    results["put_mib_s"] = size / MiB / statistics.median(puts)
    results["put_ratio"] = statistics.median(put_ratios)
    results["put_ratios"] = [round(r, 3) for r in put_ratios]
    put_gib = args.repeats * size / (1 << 30)
    results["put_cpu_s_per_gib"] = {
        "client": put_cpu_client / put_gib, "chunk_servers": put_cpu_servers / put_gib,
    }
    results["get_cpu_s_per_gib"] = {
        "client": get_cpu_client / put_gib, "chunk_servers": get_cpu_servers / put_gib,
    }
    results["copy_mib_s"] = size / MiB / statistics.median(copies)
    results["get_mib_s"] = size / MiB / statistics.median(gets)
    results["get_ratio"] = statistics.median(get_ratios)

    # Degraded: kill the servers of data shards 0 and 1 of the first block group.
    info = await client.stat("/big-0")
    victims = [s.node_id for s in info.block_groups[0].shards if s.index in (0, 1)]
    for node in victims:
        dogfs(home, "cluster", "kill", node)
    degraded = []
    healthy_now = []
    for _ in range(args.repeats):
        settle_memory(settle)
        started = time.perf_counter()
        with open(out, "wb") as f:
            await client.get("/big-0", f)
        degraded.append(time.perf_counter() - started)
        drop(out)
    for node in victims:
        dogfs(home, "cluster", "start", node)
    await _wait_alive(reactor, client)
    for _ in range(args.repeats):
        settle_memory(settle)
        started = time.perf_counter()
        with open(out, "wb") as f:
            await client.get("/big-0", f)
        healthy_now.append(time.perf_counter() - started)
        drop(out)
    results["degraded_get_mib_s"] = size / MiB / statistics.median(degraded)
    results["degraded_ratio"] = statistics.median(healthy_now) / statistics.median(degraded)

    small = os.urandom(4096)
    put_lat, get_lat = [], []
    for i in range(args.small):
        started = time.perf_counter()
        await client.put(f"/s{i}", io.BytesIO(small))
        put_lat.append(time.perf_counter() - started)
    for i in range(args.small):
        sink = io.BytesIO()
        started = time.perf_counter()
        await client.get(f"/s{i}", sink)
        get_lat.append(time.perf_counter() - started)
        assert sink.getvalue() == small
    results["small_put_ms"] = {"p50": percentile(put_lat, 50) * 1000, "p99": percentile(put_lat, 99) * 1000}
    results["small_get_ms"] = {"p50": percentile(get_lat, 50) * 1000, "p99": percentile(get_lat, 99) * 1000}
    await client.close()
    return results


async def _wait_alive(reactor: Any, client: Any, deadline_s: float = 60) -> None:
    from dogfs.client.api import sleep

    deadline = reactor.seconds() + deadline_s
    while reactor.seconds() < deadline:
        status = await client.status()
        if all(c["state"] == "alive" for c in status["chunks"]):
            return
        await sleep(reactor, 0.2)
    raise SystemExit("chunk servers did not come back")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", type=int, default=200, help="4 KiB files for the latency figures")
    parser.add_argument("--rss-mib", type=int, default=1024, help="size of the peak-RSS put")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from dogfs.codec.stripe import tune_malloc

    tune_malloc()
    home = tempfile.mkdtemp(prefix="dogfs-bench-")
    work = os.path.join(home, "work")
    os.makedirs(work)
    try:
        dogfs(home, "cluster", "up", "--detach", "--meta", "1", "--chunk", "6", "--insecure")
        results: dict[str, Any] = react_for(lambda reactor: measure(reactor, args, home, work))
        results["peak_rss_put_mib"] = peak_rss_put(home, args.rss_mib * MiB) / MiB
        results["rss_put_size_mib"] = args.rss_mib
    finally:
        subprocess.run([sys.executable, "-m", "dogfs.cli.main", "--home", home, "cluster", "down"],
                       capture_output=True, env=ENV)
        shutil.rmtree(home, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    r = results
    print(f"data path, RS-4-2 over 6 chunk servers, {r['size_mib']} MiB, medians of {args.repeats}")
    print(f"  machine limit (1.5x bytes to 6 files, fsync) {r['limit_write_mib_s']:8.0f} MiB/s of user data")
    print(f"  PUT                                         {r['put_mib_s']:8.0f} MiB/s  ratio {r['put_ratio']:.2f} (target >= 0.5)")
    print(f"    each run's ratio {' '.join(f'{x:.2f}' for x in r['put_ratios'])}")
    cpu = r["put_cpu_s_per_gib"]
    print(f"    CPU s per GiB put: client {cpu['client']:.2f}, chunk servers {cpu['chunk_servers']:.2f}, "
          f"total {cpu['client'] + cpu['chunk_servers']:.2f}")
    print(f"  page-cache copy                             {r['copy_mib_s']:8.0f} MiB/s")
    print(f"  GET                                         {r['get_mib_s']:8.0f} MiB/s  ratio {r['get_ratio']:.2f} (target >= 0.3)")
    cpu = r["get_cpu_s_per_gib"]
    print(f"    CPU s per GiB get: client {cpu['client']:.2f}, chunk servers {cpu['chunk_servers']:.2f}, "
          f"total {cpu['client'] + cpu['chunk_servers']:.2f}")
    print(f"  degraded GET (2 servers down)               {r['degraded_get_mib_s']:8.0f} MiB/s  ratio {r['degraded_ratio']:.2f} of healthy (target >= 0.7)")
    print(f"  4 KiB PUT latency  p50 {r['small_put_ms']['p50']:6.2f} ms  p99 {r['small_put_ms']['p99']:6.2f} ms")
    print(f"  4 KiB GET latency  p50 {r['small_get_ms']['p50']:6.2f} ms  p99 {r['small_get_ms']['p99']:6.2f} ms")
    print(f"  peak client RSS, put of {r['rss_put_size_mib']} MiB   {r['peak_rss_put_mib']:8.1f} MiB (target < 150)")


if __name__ == "__main__":
    main()
