# -*- test-case-name: tests.test_cluster_cli -*-
"""`make run`: start a local cluster, upload and download a demo file, show what to try next.

    python -m dogfs.cli.demo --home DIR

Runs the `dogfs` CLI as subprocesses, exactly as a user types it: `cluster up --detach`,
`put`, `get`; compares the SHA-256 of what went up with what came back; prints the commands
to try next; waits for Ctrl-C and runs `cluster down` (the data stays in DIR, so the next
`make run` restarts the same cluster).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
from typing import Any

from dogfs.cli.output import FAILED, INTERRUPTED, OK, format_bytes

#: Metadata nodes and chunk servers of the demo cluster.
DEMO_METAS = 3
DEMO_CHUNKS = 6
#: Size of the generated demo file: a few MiB, so more than one stripe of RS-4-2 cells.
DEMO_SIZE = 6 << 20
DEMO_PATH = "/demo/hello.bin"
SEED = 20261127


def _dogfs(home: str) -> list[str]:
    return [sys.executable, "-m", "dogfs.cli.main", "--home", home]


def _shown_dogfs() -> str:
    """How the user should type the command: the venv's console script, if there is one."""
    script = os.path.join(os.path.dirname(sys.executable), "dogfs")
    if os.path.exists(script):
        return os.path.relpath(script) if not os.path.relpath(script).startswith("..") else script
    return f"{sys.executable} -m dogfs.cli.main"


def _run(home: str, *argv: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    """Run one dogfs command; its output goes to the terminal unless captured."""
    print(f"$ dogfs {shlex.join(argv)}", flush=True)
    return subprocess.run(
        _dogfs(home) + list(argv),
        text=True,
        stdout=subprocess.PIPE if capture else None,
    )


def _demo_file(path: str, size: int) -> str:
    """Write `size` bytes of seeded pseudo-random data to `path`; return their SHA-256."""
    rng = random.Random(SEED)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = rng.randbytes(min(left, 1 << 20))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _dashboard(home: str) -> str | None:
    result = subprocess.run(
        _dogfs(home) + ["cluster", "status", "--json"], text=True, capture_output=True
    )
    if result.returncode != 0:
        return None
    try:
        nodes: list[dict[str, Any]] = json.loads(result.stdout)["nodes"]
    except (ValueError, KeyError):
        return None
    metas = [n for n in nodes if n.get("kind") == "meta" and n.get("http_address")]
    metas.sort(key=lambda n: n.get("role") != "leader")
    return f"http://{metas[0]['http_address']}/" if metas else None


def _next_steps(home: str) -> str:
    dogfs = _shown_dogfs()
    lines = [
        "",
        "The cluster is yours. In another terminal:",
        "",
        f"  export DOGFS_HOME={shlex.quote(home)}",
        f"  {dogfs} ls /demo",
        f"  {dogfs} stat {DEMO_PATH}",
        f"  {dogfs} put README.md /readme.md",
        f"  {dogfs} get /readme.md /tmp/readme.md",
        f"  {dogfs} cluster status",
        f"  {dogfs} cluster stop chunk-2      # reads still work: RS-4-2 survives two losses",
        f"  {dogfs} get {DEMO_PATH} /tmp/hello.bin",
        f"  {dogfs} cluster start chunk-2",
    ]
    url = _dashboard(home)
    if url:
        lines += ["", f"Dashboard: {url}"]
    lines += ["", "Ctrl-C here stops the cluster (its data stays in the home directory)."]
    return "\n".join(lines)


def _wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(3600):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run(home: str, size: int = DEMO_SIZE, wait: bool = True) -> int:
    """The demo; returns the exit status. With `wait` false it stops the cluster at once."""
    home = os.path.abspath(home)
    os.makedirs(home, exist_ok=True)
    up = ["cluster", "up", "--detach"]
    if not os.path.exists(os.path.join(home, "cluster.toml")):
        up += ["--meta", str(DEMO_METAS), "--chunk", str(DEMO_CHUNKS)]
    if _run(home, *up).returncode != 0:
        print("dogfs demo: the cluster did not start; see the messages above", file=sys.stderr)
        return FAILED
    status = OK
    try:
        work = os.path.join(home, "demo")
        os.makedirs(work, exist_ok=True)
        local = os.path.join(work, "hello.bin")
        back = os.path.join(work, "hello.roundtrip.bin")
        print(f"\nmaking a demo file of {format_bytes(size)}: {local}", flush=True)
        digest = _demo_file(local, size)
        parent = os.path.dirname(DEMO_PATH)
        made = subprocess.run(_dogfs(home) + ["mkdir", parent], text=True, capture_output=True)
        if made.returncode != 0 and "exist" not in made.stderr:
            sys.stderr.write(made.stderr)
        steps = [("put", local, DEMO_PATH), ("get", DEMO_PATH, back)]
        for step in steps:
            if _run(home, *step).returncode != 0:
                print(f"dogfs demo: `dogfs {step[0]}` failed; see above", file=sys.stderr)
                status = FAILED
                break
        if status == OK:
            if _sha256(back) != digest:
                print(
                    "dogfs demo: the file read back differs from the one written!", file=sys.stderr
                )
                status = FAILED
            else:
                print(f"\nread back {format_bytes(size)}: SHA-256 matches ({digest[:16]}...)")
        if status != OK:
            return status
        print(_next_steps(home), flush=True)
        if wait:
            _wait_for_interrupt()
    except KeyboardInterrupt:
        status = INTERRUPTED if status != OK else OK
    finally:
        print("", flush=True)
        # Ctrl-C may have reached us again; `down` must still run to the end.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _run(home, "cluster", "down")
    return status


def main(argv: list[str] | None = None) -> None:
    """`python -m dogfs.cli.demo --home DIR`."""
    parser = argparse.ArgumentParser(
        prog="python -m dogfs.cli.demo",
        description="Start a local DogFS cluster, round-trip a demo file, wait for Ctrl-C.",
    )
    parser.add_argument("--home", required=True, metavar="DIR", help="the cluster's home")
    parser.add_argument(
        "--size", type=int, default=DEMO_SIZE, metavar="BYTES", help="size of the demo file"
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="stop the cluster right after the round trip"
    )
    args = parser.parse_args(argv)
    raise SystemExit(run(args.home, args.size, wait=not args.no_wait))


if __name__ == "__main__":
    main()
