"""Helpers shared by the benchmarks in bench/ (imported as `common`: scripts here run with
this folder on sys.path)."""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import sys
from collections.abc import Callable, Coroutine
from typing import Any

MiB = 1 << 20
# Daemons and the CLI run with malloc tuned for pyeclib's large buffers (PERFORMANCE.md).
ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="33554432", MALLOC_TRIM_THRESHOLD_="1073741824")


def dogfs(home: str, *args: str) -> str:
    """Run the dogfs CLI on `home`; its stdout, or exit naming the failure."""
    result = subprocess.run(
        [sys.executable, "-m", "dogfs.cli.main", "--home", home, *args],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    if result.returncode != 0:
        raise SystemExit(f"dogfs {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def sha256_file(path: str) -> str:
    """The SHA-256 of a file's bytes, hex."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def make_file(path: str, size: int, seed: int) -> None:
    """A file of `size` pseudo-random bytes."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(rnd.randbytes(n))
            left -= n


def settle_memory(size: int) -> None:
    """Write to ``size`` bytes of fresh memory, then free it, just before a timed step.

    This virtual machine hands the memory its kernel frees back to the host after about two
    seconds (virtio-balloon free page reporting), and the first write to such memory runs
    about 8x slower than to memory freed a moment ago: writing 256 MiB into a new file takes
    0.5 s after a pause, 0.06 s right after another such write. A step that needs new page
    cache (a get writes its output file, a chunk server reads cold shards into the cache)
    would be timed partly on the host's page faults, a cost bare metal does not have and the
    same-run baselines (which reuse memory freed just before them) escape. Settling first
    gives the step and its baseline the same start: memory the guest holds. Most of the
    time: the kernel does not always hand out the pages just freed, and a get then still
    writes its file at about 0.5 GB/s (the README's Benchmarks section).
    """
    block = b"\x01" * MiB
    with mmap.mmap(-1, size) as memory:
        for _ in range(size // MiB):
            memory.write(block)
    try:
        # Forget this process's peak RSS ("5": reset the high-water mark): a child it starts
        # reports that peak as its own, its ru_maxrss being inherited until it execs.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def summarise(latencies: list[float], elapsed: float) -> tuple[float, float, float]:
    """(completed per second, p50 ms, p99 ms)."""
    latencies.sort()
    if not latencies:
        return 0.0, float("nan"), float("nan")
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    return len(latencies) / elapsed, p50, p99


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used so far (Linux /proc); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def run_reactor(bench: Callable[[Any], Coroutine[Any, Any, Any]]) -> None:
    """Run `bench(reactor)` on the global reactor; print its traceback and exit 1 if it fails."""
    from twisted.internet import defer, reactor

    failed: list[Any] = []

    def run() -> None:
        d = defer.Deferred.fromCoroutine(bench(reactor))
        d.addErrback(failed.append)
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(run)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if failed:
        failed[0].printTraceback()
        raise SystemExit(1)


def react_for(measure: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    """Run `measure(reactor)` with `task.react` and return what it returned."""
    from twisted.internet import defer, task

    out: list[Any] = []

    def run(reactor: Any) -> Any:
        async def go() -> None:
            out.append(await measure(reactor))

        return defer.Deferred.fromCoroutine(go())

    try:
        task.react(run)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    return out[0]
