"""What TLS costs on the data path: put and get throughput with TLS on, as a fraction of the
same runs against an `--insecure` cluster.

    .venv/bin/python bench/tls.py [--size-mib 256] [--repeats 3] [--json]

Starts two real clusters (`dogfs cluster up --detach --meta 1 --chunk 6`, one with TLS, the
default, one with `--insecure`) in temporary homes, and alternates runs between them so that
the machine's noise falls on both alike. Each run puts a SIZE file through the client API
(in this process) and gets it back. Figures are medians; the ratios are TLS / plaintext.
Target (issue 5): at least 0.7.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, task

MiB = 1 << 20
ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="33554432", MALLOC_TRIM_THRESHOLD_="1073741824")


def dogfs(home: str, *args: str) -> str:
    """Run the dogfs CLI on `home`; stdout, or exit naming the failure."""
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


async def one_run(client: Any, name: str, source: str, out: str) -> tuple[float, float]:
    """Seconds to put `source` as `name` and to get it back into `out`."""
    started = time.perf_counter()
    with open(source, "rb") as f:
        await client.put(name, f)
    put_s = time.perf_counter() - started
    started = time.perf_counter()
    with open(out, "wb") as f:
        await client.get(name, f)
    get_s = time.perf_counter() - started
    os.unlink(out)
    await client.rm(name)
    return put_s, get_s


async def measure(reactor: Any, args: argparse.Namespace, homes: dict[str, str], work: str) -> dict[str, Any]:
    """Alternate runs on the two clusters; medians and ratios."""
    from dogfs.client.api import DogFSClient
    from dogfs.config import load_client

    clients = {
        kind: DogFSClient(reactor, load_client(os.path.join(home, "client.toml")), timeout=120)
        for kind, home in homes.items()
    }
    size = args.size_mib * MiB
    source = os.path.join(work, "source")
    make_file(source, size, 1)
    out = os.path.join(work, "out")
    for client in clients.values():  # warm-up (first large writes are slow)
        await one_run(client, "/warmup", source, out)
    times: dict[str, dict[str, list[float]]] = {k: {"put": [], "get": []} for k in clients}
    for i in range(args.repeats):
        for kind in (("tls", "insecure") if i % 2 == 0 else ("insecure", "tls")):
            put_s, get_s = await one_run(clients[kind], f"/big-{i}", source, out)
            times[kind]["put"].append(put_s)
            times[kind]["get"].append(get_s)
    for client in clients.values():
        await client.close()
    results: dict[str, Any] = {"size_mib": args.size_mib, "repeats": args.repeats}
    for kind in clients:
        for op in ("put", "get"):
            results[f"{kind}_{op}_mib_s"] = size / MiB / statistics.median(times[kind][op])
    for op in ("put", "get"):
        results[f"{op}_ratio"] = results[f"tls_{op}_mib_s"] / results[f"insecure_{op}_mib_s"]
    return results


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from dogfs.codec.stripe import tune_malloc

    tune_malloc()
    root = tempfile.mkdtemp(prefix="dogfs-bench-tls-")
    homes = {"tls": os.path.join(root, "tls"), "insecure": os.path.join(root, "insecure")}
    work = os.path.join(root, "work")
    os.makedirs(work)
    try:
        dogfs(homes["tls"], "cluster", "up", "--detach", "--meta", "1", "--chunk", "6")
        dogfs(homes["insecure"], "cluster", "up", "--detach", "--meta", "1", "--chunk", "6", "--insecure")
        results: dict[str, Any] = {}

        def run(reactor: Any) -> defer.Deferred[None]:
            async def go() -> None:
                results.update(await measure(reactor, args, homes, work))

            return defer.Deferred.fromCoroutine(go())

        try:
            task.react(run)
        except SystemExit as e:
            if e.code not in (0, None):
                raise
    finally:
        for home in homes.values():
            subprocess.run([sys.executable, "-m", "dogfs.cli.main", "--home", home, "cluster", "down"],
                           capture_output=True, env=ENV)
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    r = results
    print(f"TLS on the data path, RS-4-2 over 6 chunk servers, {r['size_mib']} MiB, medians of {args.repeats}")
    for op in ("put", "get"):
        print(
            f"  {op.upper():3}  TLS {r[f'tls_{op}_mib_s']:7.0f} MiB/s   plaintext "
            f"{r[f'insecure_{op}_mib_s']:7.0f} MiB/s   ratio {r[f'{op}_ratio']:.2f} (target >= 0.7)"
        )


if __name__ == "__main__":
    main()
