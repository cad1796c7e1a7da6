# -*- test-case-name: tests.test_cli_bench -*-
"""`dogfs bench`: a load generator against a running cluster, like `rados bench`.

    dogfs bench put --size 4KiB --count 1000 --concurrency 16
    dogfs bench get --prefix /bench/run-1 --concurrency 16   (every file under the prefix)
    dogfs bench mkdir --count 2000 --concurrency 64

Operations run through the real client API with CONCURRENCY in flight; the result is ops/s,
MB/s and latency percentiles (p50, p90, p99, max), as text or `--json`.
"""

from __future__ import annotations

import argparse
import io
import os
import time
import uuid
from typing import Any

from dogfs.cli import output

#: Operations of a put or mkdir run without --count.
DEFAULT_COUNT = 1000


def register(subparsers: Any) -> None:
    """Add `dogfs bench` to the dogfs parser."""
    from dogfs.cli.cluster import _size

    bench = subparsers.add_parser(
        "bench",
        help="load-test a running cluster: ops/s, MB/s, latency percentiles",
        description="Load-test a running cluster through the client API. Files are written "
        "under --prefix (default: a fresh /bench/<id>); `get` reads what a previous "
        "`put` wrote there (every file under --prefix, or with --count N the first N names "
        "`put` gives), and `--cleanup` removes them afterwards.",
    )
    bench.add_argument("op", choices=["put", "get", "mkdir"], help="what to do")
    bench.add_argument("--size", type=_size, default=4096, metavar="BYTES",
                       help="bytes per file for put (default 4KiB; e.g. 1MiB)")
    bench.add_argument("--count", type=int, default=None, metavar="N",
                       help=f"operations (default {DEFAULT_COUNT}; for get, every file under --prefix)")
    bench.add_argument("--concurrency", type=int, default=16, metavar="C",
                       help="operations in flight (default 16)")
    bench.add_argument("--prefix", default=None, metavar="PATH", help="directory to work in")
    bench.add_argument("--ec", default=None, metavar="RS-K-M", help="policy for put")
    bench.add_argument("--cleanup", action="store_true", help="remove --prefix afterwards")
    bench.add_argument("--timeout", type=output.seconds, default=None, metavar="SECONDS",
                       help="per-operation timeout (default: the config's)")
    bench.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    bench.set_defaults(func=cmd_bench)


def percentiles(latencies: list[float]) -> dict[str, float]:
    """p50, p90, p99 and max of `latencies` (seconds), in milliseconds."""
    if not latencies:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(latencies)

    def at(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))] * 1000

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": ordered[-1] * 1000}


async def run_bench(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns its figures."""
    from twisted.internet import defer

    clock = client.clock
    from dogfs.client.api import DogFSError

    prefix = (args.prefix or f"/bench/{uuid.uuid4().hex[:8]}").rstrip("/")
    if args.op in ("put", "mkdir"):
        await client.mkdir(prefix, parents=True, ec=args.ec)
    if args.op == "get" and args.count is None:
        # What is there, not the names a put of another --count would have written: a missing
        # prefix fails here (not_found, exit 3) instead of as one error per name.
        names = [e.path for e in await client.ls(prefix) if e.type == "file"]
        if not names:
            raise DogFSError("not_found", f"{prefix} holds no files to read; `dogfs bench put --prefix {prefix}` writes some")
    else:
        names = [f"{prefix}/{i:08d}" for i in range(DEFAULT_COUNT if args.count is None else args.count)]
    payload = os.urandom(args.size) if args.op == "put" else b""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    moved = 0
    queue = list(reversed(names))

    async def worker() -> None:
        nonlocal moved
        while queue:
            name = queue.pop()
            started = clock.seconds()
            try:
                if args.op == "put":
                    await client.put(name, io.BytesIO(payload))
                    moved += len(payload)
                elif args.op == "get":
                    sink = io.BytesIO()
                    await client.get(name, sink)
                    moved += sink.tell()
                else:
                    await client.mkdir(name)
            except DogFSError as e:
                errors[e.code] = errors.get(e.code, 0) + 1
                continue
            latencies.append(clock.seconds() - started)

    wall = time.monotonic()
    workers = [defer.Deferred.fromCoroutine(worker()) for _ in range(max(1, args.concurrency))]
    await defer.gatherResults(workers, consumeErrors=True)
    elapsed = max(time.monotonic() - wall, 1e-9)
    if args.cleanup:
        await client.rm(prefix, recursive=True)
    done = len(latencies)
    return {
        "op": args.op,
        "prefix": prefix,
        "count": len(names),
        "concurrency": args.concurrency,
        "size": args.size if args.op == "put" else None,
        "ok": done,
        "errors": errors,
        "seconds": elapsed,
        "ops_per_s": done / elapsed,
        "mb_per_s": moved / elapsed / 1e6,
        "latency_ms": percentiles(latencies),
    }


def cmd_bench(args: argparse.Namespace) -> int:
    """dogfs bench OP"""
    from dogfs.cli.main import run_client

    if (args.count is not None and args.count < 1) or args.concurrency < 1:
        raise output.CLIError("--count and --concurrency must be at least 1", output.USAGE)
    if args.op == "get" and not args.prefix:
        raise output.CLIError("bench get needs --prefix: the directory a previous bench put wrote", output.USAGE)
    result = run_client(args, lambda client: run_bench(client, args))
    if args.json:
        output.print_json(result)
    else:
        lat = result["latency_ms"]
        print(f"{result['op']}: {result['ok']} ok, {sum(result['errors'].values())} failed "
              f"in {result['seconds']:.2f}s with {result['concurrency']} in flight ({result['prefix']})")
        print(f"  {result['ops_per_s']:.0f} ops/s, {result['mb_per_s']:.1f} MB/s")
        print(f"  latency ms: p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  max {lat['max']:.2f}")
        for code, n in sorted(result["errors"].items()):
            print(f"  {n} failed: {code}")
    return output.OK if not result["errors"] else output.FAILED
