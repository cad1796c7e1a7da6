"""Helpers shared by the benchmarks in bench/ (imported as `common`: scripts here run with
this folder on sys.path)."""

from __future__ import annotations

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


def make_file(path: str, size: int, seed: int) -> None:
    """A file of `size` pseudo-random bytes."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(rnd.randbytes(n))
            left -= n


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
