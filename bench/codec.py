# -*- test-case-name: tests.test_codec -*-
"""Erasure-coding throughput: encode and decode GB/s of 4 MiB stripes, per policy and malloc setup.

Re-executes itself in child processes (one per figure) so all figures come from one run:

- ``default``: glibc malloc as shipped (the ``MALLOC_*`` variables removed);
- ``env``: ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``;
- ``tune_malloc``: default environment, ``dogfs.codec.stripe.tune_malloc()`` called at start.

For each it reports medians over ``--repeats`` runs of: encode, decode with every data fragment
present (the no-Reed-Solomon path), decode with ``m`` data fragments missing, the degraded
read's rebuild of those ``m`` (ISA-L on the received buffers, ``StripeCodec.rebuild_data``),
and rebuilding one lost fragment; also the median time of one call, and the raw pyeclib
``isa_l_rs_cauchy`` vs ``isa_l_rs_vand`` figures behind the choice of backend.

Usage: ``.venv/bin/python bench/codec.py [--repeats 7] [--policies RS-4-2,RS-6-3,RS-10-4]``;
``--store DIR`` times the shard store instead (durable writes, verified reads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

STRIPE = 4 << 20
MODES = ("default", "env", "tune_malloc")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def measure(call: Callable[[], object], nbytes: int, repeats: int, calls: int) -> dict[str, float]:
    """Median GB/s and ms per call of ``call`` over ``repeats`` timed batches of ``calls``."""
    for _ in range(3):  # warm-up: first touches of fresh memory are slow here
        call()
    rates, latencies = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        elapsed = time.perf_counter() - start
        rates.append(nbytes * calls / elapsed / 1e9)
        latencies.append(elapsed / calls * 1e3)
    return {"gbps": statistics.median(rates), "ms": statistics.median(latencies)}


OPS = (
    "encode", "decode", "decode_degraded", "rebuild_data_degraded", "reconstruct_1",
    "raw_isa_l_rs_cauchy_encode", "raw_isa_l_rs_vand_encode",
    "raw_isa_l_rs_cauchy_decode_degraded", "raw_isa_l_rs_vand_decode_degraded",
)


def reuse(buffers: list[bytearray]) -> Callable[[int], bytearray]:
    """An allocator handing out ``buffers`` in turn (a pool that is never empty)."""
    it = iter(buffers)
    return lambda size: next(it)


def child(mode: str, policy_name: str, op: str, repeats: int, calls: int) -> dict[str, float]:
    """Measure one operation of one policy in this fresh process; ``mode`` is the malloc setup.

    One process per measurement: glibc raises its mmap threshold after big frees, so in a
    shared process the first measurements would pay for the later ones' warm malloc.
    """
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from pyeclib.ec_iface import ECDriver

    from dogfs.codec.checksum import crc32c
    from dogfs.codec.policy import ECPolicy
    from dogfs.codec.stripe import StripeCodec, tune_malloc

    if mode == "tune_malloc":
        tune_malloc()
    data = os.urandom(STRIPE)
    if op == "crc32c_1MiB":
        cell = data[: 1 << 20]
        return measure(lambda: crc32c(cell), 1 << 20, repeats, calls * 4)
    policy = ECPolicy.parse(policy_name)
    k, m = policy.k, policy.m
    codec = StripeCodec(policy, cell_size=-(-STRIPE // k))
    call: Callable[[], object]
    if op.startswith("raw_"):
        ec_type = op[len("raw_"):].rsplit("_", 2 if op.endswith("_degraded") else 1)[0]
        driver = ECDriver(k=k, m=m, ec_type=ec_type)
        raw = driver.encode(data)
        # Data fragments dropped first: they must really be rebuilt.
        raw_degraded = raw[min(m, k):]
        if op.endswith("_encode"):
            call = lambda: driver.encode(data)  # noqa: E731
        else:
            call = lambda: driver.decode(raw_degraded)  # noqa: E731
        return measure(call, STRIPE, repeats, calls)
    fragments = codec.encode(data)
    data_only = {i: fragments[i] for i in range(k)}
    degraded = {i: fragments[i] for i in range(min(m, k), k + m)}
    repair_from = {i: fragments[i] for i in range(1, k + 1)}
    # What a degraded GET does: the same fragments as received (writable buffers), the lost
    # data rebuilt in place by ISA-L into reused buffers (StripeCodec.rebuild_data).
    received = {i: memoryview(bytearray(f)) for i, f in degraded.items()}
    outputs = [bytearray(len(fragments[0])) for _ in range(k)]
    calls_by_op: dict[str, Callable[[], object]] = {
        "encode": lambda: codec.encode(data),
        "decode": lambda: codec.decode(data_only),
        "decode_degraded": lambda: codec.decode(degraded),
        "rebuild_data_degraded": lambda: codec.rebuild_data(received, range(k), reuse(outputs)),
        "reconstruct_1": lambda: codec.reconstruct(repair_from, [0]),
    }
    return measure(calls_by_op[op], STRIPE, repeats, calls)


def parent(args: argparse.Namespace) -> None:
    """Run one child per (malloc mode, policy, operation) and print a comparison table."""

    def run(mode: str, policy: str, op: str) -> dict[str, float]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        if mode == "env":
            env.update(MALLOC_ENV)
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", mode, "--op", op,
             "--repeats", str(args.repeats), "--calls", str(args.calls),
             "--policies", policy],
            env=env, check=True, capture_output=True, text=True,
        ).stdout
        result: dict[str, float] = json.loads(out)
        return result

    runs: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for name in args.policies:
        runs[name] = {op: {mode: run(mode, name, op) for mode in MODES} for op in OPS}
    crc = {mode: run(mode, args.policies[0], "crc32c_1MiB") for mode in MODES}
    if args.json:
        print(json.dumps({"policies": runs, "crc32c_1MiB": crc}, indent=2))
        return
    print(f"4 MiB stripes, medians of {args.repeats} x {args.calls} calls, one process per "
          f"figure; GB/s (ms per call)")
    print(f"columns: default malloc | {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}"
          f" | tune_malloc()")
    for name in args.policies:
        print(f"\n{name}")
        for op in OPS:
            text = " | ".join(
                f"{runs[name][op][mode]['gbps']:6.2f} ({runs[name][op][mode]['ms']:5.2f} ms)"
                for mode in MODES
            )
            print(f"  {op:38s} {text}")
    crc_text = " | ".join(f"{crc[mode]['gbps']:.2f}" for mode in MODES)
    print(f"\ncrc32c of 1 MiB cells: {crc_text} GB/s")


def store_bench(directory: str, repeats: int, shard_mib: int) -> None:
    """Time durable shard writes (one fsync per shard) and verified reads, 1 MiB cells."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from dogfs.codec.stripe import FRAGMENT_HEADER_SIZE, tune_malloc
    from dogfs.storage.shards import ShardInfo, ShardStore, make_shard_id

    tune_malloc()
    store = ShardStore(directory)
    fragment_size = (1 << 20) + FRAGMENT_HEADER_SIZE
    fragments = [os.urandom(fragment_size) for _ in range(shard_mib)]
    nbytes = fragment_size * shard_mib
    writes, reads, fsyncs = [], [], []
    for n in range(repeats + 1):
        info = ShardInfo(make_shard_id(n, 0), "RS-4-2", 0, fragment_size)
        start = time.perf_counter()
        writer = store.begin(info)
        for fragment in fragments:
            writer.append(fragment)
        before_commit = time.perf_counter()
        writer.commit()
        end = time.perf_counter()
        with store.open(info.shard_id) as reader:
            read_start = time.perf_counter()
            reader.read_cells(0, reader.cells)
            read_end = time.perf_counter()
        if n:  # the first round warms up fresh memory and the filesystem
            writes.append(nbytes / (end - start) / 1e9)
            fsyncs.append((end - before_commit) * 1e3)
            reads.append(nbytes / (read_end - read_start) / 1e9)
        store.delete(info.shard_id)
    print(f"shard store in {directory}: {shard_mib} x 1 MiB cells per shard, medians of {repeats}")
    print(f"  write + commit (fsync, rename, dir fsync)  {statistics.median(writes):6.2f} GB/s"
          f"  (commit {statistics.median(fsyncs):.1f} ms)")
    print(f"  read_cells, verified (page cache)          {statistics.median(reads):6.2f} GB/s")


def main() -> None:
    """Parse arguments; run as the parent, or as a child measuring one malloc mode."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10, help="calls per timed batch")
    parser.add_argument("--policies", type=lambda s: s.split(","),
                        default=["RS-4-2", "RS-6-3", "RS-10-4"])
    parser.add_argument("--json", action="store_true", help="print raw results as JSON")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--op", choices=(*OPS, "crc32c_1MiB"), help=argparse.SUPPRESS)
    parser.add_argument("--store", metavar="DIR",
                        help="instead, time the shard store writing and reading under DIR")
    parser.add_argument("--shard-mib", type=int, default=64, help="shard size for --store")
    args = parser.parse_args()
    if args.store:
        store_bench(args.store, args.repeats, args.shard_mib)
    elif args.child:
        result = child(args.child, args.policies[0], args.op, args.repeats, args.calls)
        print(json.dumps(result))
    else:
        parent(args)


if __name__ == "__main__":
    main()
