"""How fast DogFS moves shards: a draining chunk server's (copied from it) and a dead one's
(rebuilt from k others), in the same run (roadmap phase 4, repair).

    .venv/bin/python bench/repair.py [--size-mib 512] [--block-mib 8] [--chunks 7] [--ec RS-4-2] [--insecure]

Starts a real cluster (`dogfs cluster up --detach`, 1 metadata node, TLS unless --insecure)
whose metadata node calls a silent chunk server dead after 2 s and repairs after 1 s more, and
puts a SIZE file. Then:

1. drains the chunk server holding most of its shards (`dogfs admin chunk drain`): each shard
   is copied from it to another server, one shard's traffic; timed from the first move the
   leader starts to the last MoveShard; then undoes the drain;
2. kills (SIGKILL) the chunk server now holding most shards: each is rebuilt from k others,
   k shards' traffic and a decode; timed the same way, and from the kill (which includes the
   dead-after and repair-after waits, set short here; 10 s and 600 s by default).

Both poll `dogfs admin repair status`. Prints the shard bytes moved per second of each, and
their ratio. Then reads the file back and checks its SHA-256.
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


def holders(home: str, path: str) -> dict[str, int]:
    """Chunk server -> shards of ``path`` placed on it."""
    out: dict[str, int] = {}
    for group in json.loads(dogfs(home, "--json", "stat", path))["block_groups"]:
        for shard in group["shards"]:
            out[shard["chunk_server"]] = out.get(shard["chunk_server"], 0) + 1
    return out



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=7)
    parser.add_argument("--ec", default="RS-4-2")
    parser.add_argument("--block-mib", type=int, default=8, help="shard bytes per block group")
    parser.add_argument("--insecure", action="store_true")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="dogfs-repairbench-")
    home = os.path.join(base, "home")
    try:
        up = ["cluster", "up", "--detach", "--meta", "1", "--chunk", str(args.chunks),
              "--block-size", str(args.block_mib * MiB)]
        dogfs(home, *up, *(["--insecure"] if args.insecure else []))
        dogfs(home, "cluster", "down")
        config = os.path.join(home, "nodes", "meta-1", "meta.toml")
        with open(config) as f:
            text = f.read()
        with open(config, "w") as f:
            f.write(text.replace("[meta]\n", "[meta]\nchunk_dead_after = 2.0\nrepair_after = 1.0\nrepair_interval = 0.5\n", 1))
        dogfs(home, "cluster", "up", "--detach")
        local = os.path.join(base, "data")
        make_file(local, args.size_mib * MiB, 7)
        dogfs(home, "put", "--ec", args.ec, local, "/f")
        groups = json.loads(dogfs(home, "--json", "stat", "/f"))["block_groups"]
        k = int(args.ec.split("-")[1])
        shard_bytes = sum(-(-g["size"] // k) for g in groups) / len(groups)  # a shard, on average
        kind = "plaintext" if args.insecure else "TLS"
        before = holders(home, "/f")
        victim = max(sorted(before), key=lambda n: before[n])
        began = time.monotonic()
        dogfs(home, "admin", "chunk", "drain", victim)
        first, done, status = wait_moves(home, began, "copied")
        drained = status["copied"]
        drain_rate = drained * shard_bytes / MiB / max(done - first, 1e-9)
        print(f"drained {victim}, which held {before[victim]} of {sum(before.values())} shards of a "
              f"{args.size_mib} MiB {args.ec} file ({kind}, {args.chunks} chunk servers)")
        print(f"  copied {drained} shards (about {drained * shard_bytes / MiB:.0f} MiB) in {done - first:.1f} s: "
              f"{drain_rate:.0f} MiB/s of shards; failed {status['failed']}")
        assert victim not in holders(home, "/f") and drained == before[victim], status
        dogfs(home, "admin", "chunk", "drain", victim, "--undo")
        before = holders(home, "/f")
        victim = max(sorted(before), key=lambda n: before[n])
        killed = time.monotonic()
        dogfs(home, "cluster", "kill", victim)
        first, done, status = wait_moves(home, killed, "rebuilt", status["rebuilt"])
        rebuilt = status["rebuilt"] - status["copied"]
        rebuild_rate = rebuilt * shard_bytes / MiB / max(done - first, 1e-9)
        print(f"killed {victim}, which held {before[victim]} shards")
        print(f"  rebuilt {rebuilt} shards (about {rebuilt * shard_bytes / MiB:.0f} MiB) in "
              f"{done - first:.1f} s: {rebuild_rate:.0f} MiB/s of shards; {done - killed:.1f} s from "
              f"the kill (2 s dead-after + 1 s repair-after here); failed {status['failed']}")
        print(f"copy (drain) / rebuild (dead server): {drain_rate / max(rebuild_rate, 1e-9):.2f}x")
        after = holders(home, "/f")
        assert victim not in after and sum(after.values()) == sum(before.values()), after
        out = os.path.join(base, "back")
        dogfs(home, "get", "/f", out)
        print("read back:", "SHA-256 matches" if sha256_file(out) == sha256_file(local) else "DIFFERS")
    finally:
        subprocess_down(home)
        shutil.rmtree(base, ignore_errors=True)


def wait_moves(home: str, began: float, counter: str, already: int = 0) -> tuple[float, float, dict]:
    """Poll `repair status` until nothing is lost or running: (when the poll before the one
    that first saw a move began, when the last ended, the status then). ``counter`` past
    ``already`` counts as a move. Moves all done within one poll still take a poll's time:
    they began after the poll before began, and no earlier is known."""
    first = None
    previous = began
    while True:
        asked = time.monotonic()
        status = json.loads(dogfs(home, "--json", "admin", "repair", "status"))
        if first is None and (status["running"] or status[counter] > already):
            first = previous
        if first is not None and not status["lost_servers"] and not status["running"]:
            return first, time.monotonic(), status
        previous = asked
        if time.monotonic() - began > 600:
            raise SystemExit(f"the moves did not finish within 600 s: {status}")
        time.sleep(0.1)


def subprocess_down(home: str) -> None:
    try:
        dogfs(home, "cluster", "down")
    except SystemExit:
        pass


if __name__ == "__main__":
    main()
