"""How fast DogFS balances: chunk servers added to a cluster whose servers are half full
(roadmap phase 4, "automatic rebalancing", "adding chunk servers without downtime").

    .venv/bin/python bench/balance.py [--size-mib 1024] [--chunks 4] [--add 2] [--ec RS-2-2] [--insecure]

Starts a real cluster (`dogfs cluster up --detach`, 1 metadata node, TLS unless --insecure)
of CHUNKS chunk servers, each given a capacity (`capacity_bytes`) so that SIZE of files
fills them to half (every local server shares one disk: capacities are what make their
utilizations differ). Puts SIZE as 8 MiB files, then adds ADD empty servers of the same
capacity (`dogfs cluster add-chunk --capacity`) and polls `dogfs admin repair status` until
the balancer says balanced (or settled) with nothing queued or running. Prints the time from
the add to the first move and to the end, the shards and bytes moved, the rate, the rounds,
and the utilizations before and after. Then reads every file back and checks its SHA-256.
The metadata node plans every 0.5 s here (`repair_interval`, 10 s by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MiB, dogfs, make_file, sha256_file  # noqa: E402

FILE_MIB = 8



def status(home: str) -> dict:
    return json.loads(dogfs(home, "--json", "admin", "repair", "status"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--add", type=int, default=2)
    parser.add_argument("--ec", default="RS-2-2")
    parser.add_argument("--insecure", action="store_true")
    args = parser.parse_args()
    k, m = (int(x) for x in args.ec.split("-")[1:])
    # Each server holds SIZE * (k + m) / k / CHUNKS of shards: half its capacity.
    capacity = int(args.size_mib * MiB * (k + m) / k / args.chunks * 2)
    base = tempfile.mkdtemp(prefix="dogfs-balancebench-")
    home = os.path.join(base, "home")
    try:
        dogfs(home, "cluster", "up", "--detach", "--meta", "1", "--chunk", str(args.chunks), "--ec", args.ec,
              "--block-size", str(8 * MiB), *(["--insecure"] if args.insecure else []))
        dogfs(home, "cluster", "down")
        for node in os.listdir(os.path.join(home, "nodes")):
            kind = node.split("-")[0]
            path = os.path.join(home, "nodes", node, f"{kind}.toml")
            extra = "repair_interval = 0.5\n" if kind == "meta" else f"capacity_bytes = {capacity}\n"
            with open(path) as f:
                text = f.read()
            with open(path, "w") as f:
                f.write(text.replace(f"[{kind}]\n", f"[{kind}]\n{extra}", 1))
        dogfs(home, "cluster", "up", "--detach")
        local = os.path.join(base, "data")
        digests = {}
        for i in range(args.size_mib // FILE_MIB):
            make_file(local, FILE_MIB * MiB, 100 + i)
            dogfs(home, "put", local, f"/f{i}")
            digests[f"/f{i}"] = sha256_file(local)
        before = status(home)["balance"]
        added = time.monotonic()
        dogfs(home, "cluster", "add-chunk", str(args.add), "--capacity", str(capacity))
        first = None
        while True:
            s = status(home)
            b = s["balance"]
            if first is None and (b["running"] or b["moved"]):
                first = time.monotonic()
            if b["moved"] and (b["balanced"] or b["settled"]) and not b["queued"] and not b["running"]:
                break
            if time.monotonic() - added > 900:
                raise SystemExit(f"not balanced within 900 s: {b}")
            time.sleep(0.2)
        done = time.monotonic()
        assert first is not None
        kind = "plaintext" if args.insecure else "TLS"
        print(f"{args.size_mib} MiB of {args.ec} files on {args.chunks} chunk servers of "
              f"{capacity / MiB:.0f} MiB each ({kind}); {args.add} empty ones added")
        print(f"  before: average {100 * (before['average'] or 0):.1f}%, "
              + ", ".join(f"{n} {100 * u:.1f}%" for n, u in sorted(before["utilization"].items())))
        print(f"  after:  average {100 * b['average']:.1f}%, "
              + ", ".join(f"{n} {100 * u:.1f}%" for n, u in sorted(b["utilization"].items())))
        print(f"  moved {b['moved']} shards ({b['moved_bytes'] / MiB:.0f} MiB) in {b['rounds']} rounds; "
              f"first move {first - added:.1f} s after the add, the last {done - added:.1f} s after: "
              f"{b['moved_bytes'] / MiB / max(done - first, 1e-9):.0f} MiB/s; "
              f"{'balanced' if b['balanced'] else 'settled'}, spread {100 * b['spread']:.1f} points, "
              f"failed {s['failed']}")
        out = os.path.join(base, "back")
        bad = []
        for name, digest in digests.items():
            dogfs(home, "get", name, out)
            if sha256_file(out) != digest:
                bad.append(name)
        print("read back:", "every SHA-256 matches" if not bad else f"DIFFERS: {bad}")
    finally:
        try:
            dogfs(home, "cluster", "down")
        except SystemExit:
            pass
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
