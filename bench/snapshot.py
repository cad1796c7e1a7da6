# -*- test-case-name: tests.test_raft_storage -*-
"""Snapshots of a large namespace: how long they hold up a metadata member.

A Raft member that stops sending for longer than the election timeout (0.5 to 1 s by
default: ``tick_interval`` 0.05 s times ``election_ticks`` 10 to 20) loses its leadership.
Two things in a snapshot can stop it:

- the dump, serialised on a thread of its own but holding the GIL while a C call runs, so
  the reactor thread waits: measured as the longest gap of a 1 ms ticker on the main thread;
- the write of the dump into the Raft log's LMDB, on the thread the log's writes use, so
  the log's next write (and the Ready loop, its heartbeats and acknowledgements) waits for
  it: measured as the longest wait of a one-entry log write issued every 5 ms, with the
  snapshot written in one transaction (as before) and in parts (``snapshot_writes``), in the
  same run.

    .venv/bin/python bench/snapshot.py [--dirs 1000000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from dogfs.meta import commands as c  # noqa: E402
from dogfs.meta.state import NamespaceState  # noqa: E402
from dogfs.raft.core import Configuration, Entry, EntryKind, HardState, Snapshot, SnapshotMeta  # noqa: E402
from dogfs.raft.storage import LMDBRaftStorage  # noqa: E402


def build(path: str, dirs: int) -> NamespaceState:
    """A namespace with ``dirs`` directories under /m, applied in batches as Raft would."""
    state = NamespaceState(path, durable=False)
    state.open()
    state.apply(1, c.encode_command(c.Mkdir("/m", False, None, 1.0)))
    index = 2
    for start in range(0, dirs, 1000):
        batch = [
            (index + j, c.encode_command(c.Mkdir(f"/m/d{start + j}", False, None, 2.0)))
            for j in range(min(1000, dirs - start))
        ]
        index += len(batch)
        state.apply_batch(batch)
    return state


def dump_stall(state: NamespaceState) -> tuple[float, float, bytes]:
    """Seconds the dump takes on a thread, the longest gap of the main thread meanwhile,
    and the dump."""
    dump = state.dump_later()
    out: dict[str, Any] = {}

    def work() -> None:
        began = time.perf_counter()
        out["data"] = dump()
        out["seconds"] = time.perf_counter() - began

    thread = threading.Thread(target=work)
    longest, last = 0.0, time.perf_counter()
    thread.start()
    while thread.is_alive():
        time.sleep(0.001)
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    thread.join()
    return out["seconds"], longest, out["data"]


def log_stall(path: str, data: bytes, in_parts: bool) -> float:
    """The longest wait of a one-entry log write (one every 5 ms) while ``data`` is stored
    as a snapshot on the same writer thread, in one transaction or in parts."""
    storage = LMDBRaftStorage(path, map_size=1 << 33)
    storage.load()
    storage.save(HardState(1, "a", 0), [Entry(1, 1, EntryKind.NORMAL, b"x")], None)
    jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def writer() -> None:
        while (job := jobs.get()) is not None:
            work, done = job
            work()
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    snapshot = Snapshot(SnapshotMeta(1, 1, Configuration(voters=frozenset({"a"}))), data)
    steps: list[Callable[[], None]] = storage.snapshot_writes(snapshot) if in_parts else []
    steps.append(lambda: storage.save(None, [], snapshot))
    finished = threading.Event()

    def snapshotter() -> None:
        for step in steps:  # each queued once the one before is done, as the driver does
            done = threading.Event()
            jobs.put((step, done))
            done.wait()
        finished.set()

    index, longest = 2, 0.0
    threading.Thread(target=snapshotter).start()
    while not finished.is_set():
        done = threading.Event()
        entry = Entry(1, index, EntryKind.NORMAL, b"x" * 100)
        began = time.perf_counter()
        jobs.put((lambda entry=entry: storage.save(None, [entry], None), done))
        done.wait()
        longest = max(longest, time.perf_counter() - began)
        index += 1
        time.sleep(0.005)
    jobs.put(None)
    thread.join()
    storage.close()
    return longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dirs", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="dogfs-snapbench-", dir=os.path.dirname(HERE))
    try:
        began = time.perf_counter()
        state = build(os.path.join(root, "state"), args.dirs)
        print(f"{args.dirs} directories applied in {time.perf_counter() - began:.1f} s", file=sys.stderr)
        dumps, gaps, whole, parts = [], [], [], []
        for run in range(args.runs):
            seconds, gap, data = dump_stall(state)
            dumps.append(seconds)
            gaps.append(gap)
            # Alternate which goes first, so that neither always meets a warm page cache.
            for in_parts in (run % 2 == 1, run % 2 == 0):
                stall = log_stall(os.path.join(root, f"raft-{run}-{in_parts}"), data, in_parts)
                (parts if in_parts else whole).append(stall)
            print(f"run {run + 1}: dump {len(data) / 1e6:.0f} MB in {seconds:.2f} s, main thread held up "
                  f"{gap * 1000:.0f} ms; log write held up {whole[-1] * 1000:.0f} ms by a one-transaction "
                  f"snapshot, {parts[-1] * 1000:.0f} ms by one in parts", file=sys.stderr)
        state.close()
        med = statistics.median
        print(f"\n{args.dirs} directories, {len(data) / 1e6:.0f} MB snapshot, medians of {args.runs} runs")
        print(f"dump: {med(dumps):.2f} s; longest hold-up of the reactor thread {med(gaps) * 1000:.0f} ms")
        print(f"longest wait of a log write: snapshot in one transaction {med(whole) * 1000:.0f} ms, "
              f"in parts {med(parts) * 1000:.0f} ms ({med(whole) / max(med(parts), 1e-9):.0f}x shorter)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
