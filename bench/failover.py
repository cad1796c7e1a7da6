# -*- test-case-name: tests.test_meta_raft_process -*-
"""Leader failover: time from `kill -9` of the metadata leader to the next acknowledged write.

A 3-node metadata group (real `dogfs cluster up` daemons on loopback) serves a steady stream of
writes from 8 clients: metadata writes (mkdir) and 4 KiB puts, in turns. Each try kills the
leader with SIGKILL, notes the first write *begun after the kill* that is acknowledged, then
restarts the killed node and lets it catch up. Prints every try and the medians. Anchor: etcd
on this machine, about 1.5 s; target: under 1.0 s.

    .venv/bin/python bench/failover.py [--tries 5]

    .venv/bin/python bench/failover.py --planned [--tries 5]

measures a planned hand-over instead (`dogfs admin meta lead`, before restarting a leader for
an upgrade, say): under the same stream of writes, the longest pause between acknowledged
writes while leadership moves, against the longest pause in the second before it (the
machine's own noise, measured in the same try).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from common import run_reactor  # noqa: E402
from twisted.internet import defer, threads  # noqa: E402


def start_writers(
    clients: list[Any], kind: str, tag: str, stop: list[bool], acknowledged: Any
) -> list[defer.Deferred[None]]:
    """One writer per client, each making mkdirs or 4 KiB puts until ``stop[0]``; each write
    acknowledged calls ``acknowledged(time it began)``."""
    payload = os.urandom(4096)

    async def writer(w: int, client: Any) -> None:
        n = 0
        while not stop[0]:
            n += 1
            began = time.monotonic()
            try:
                if kind == "mkdir":
                    await client.mkdir(f"/f/{tag}-w{w}-{n}")
                else:
                    await client.put(f"/f/{tag}-w{w}-{n}", io.BytesIO(payload))
            except Exception:
                continue
            acknowledged(began)

    return [defer.Deferred.fromCoroutine(writer(w, c)) for w, c in enumerate(clients)]


async def one_try(cluster: Any, clients: list[Any], kind: str, tag: str) -> float:
    """Kill the leader under load; seconds to the first write begun after it and acknowledged."""
    from twisted.internet import reactor

    from dogfs.client.api import sleep
    from tests.test_meta_raft_process import wait_for_leader

    killed_at: list[float] = []
    first: list[float] = []
    stop = [False]

    def acknowledged(began: float) -> None:
        if killed_at and began >= killed_at[0]:
            first.append(time.monotonic())
            stop[0] = True

    leader = await wait_for_leader(cluster)
    writers = start_writers(clients, kind, tag, stop, acknowledged)
    await sleep(reactor, 1.0)
    killed_at.append(time.monotonic())
    cluster.kill(leader)
    deadline = time.monotonic() + 30
    while not first and time.monotonic() < deadline:
        await sleep(reactor, 0.01)
    stop[0] = True
    await defer.gatherResults(writers, consumeErrors=True)
    took = (first[0] - killed_at[0]) if first else float("inf")
    print(f"  {kind:5} kill -9 {leader}: next acknowledged write after {took:.3f} s", file=sys.stderr)
    await threads.deferToThread(cluster.start, leader)
    await sleep(reactor, 2.0)  # let it catch up before the next try
    return took


async def planned_try(cluster: Any, clients: list[Any], kind: str, tag: str) -> tuple[float, float]:
    """Hand leadership over under load: the longest pause between acknowledged writes while it
    moves, and the longest in the second before (the baseline)."""
    from twisted.internet import reactor

    from dogfs.client.api import sleep
    from tests.test_meta_raft_process import wait_for_leader

    acks: list[float] = []
    stop = [False]

    def longest_pause(start: float, end: float) -> float:
        times = sorted(t for t in acks if start <= t <= end)
        edges = [start, *times, end]
        return max(b - a for a, b in zip(edges, edges[1:], strict=False))

    leader = await wait_for_leader(cluster)
    target = next(m for m in cluster.meta_ids() if m != leader)
    writers = start_writers(clients, kind, tag, stop, lambda began: acks.append(time.monotonic()))
    await sleep(reactor, 2.0)
    issued = time.monotonic()
    await clients[0]._query("member_lead", "", {"id": target})
    done = time.monotonic()
    await sleep(reactor, 1.0)
    stop[0] = True
    await defer.gatherResults(writers, consumeErrors=True)
    pause = longest_pause(issued, done + 1.0)
    baseline = longest_pause(issued - 1.0, issued)
    print(f"  {kind:5} hand-over {leader} -> {target}: longest pause {pause:.3f} s "
          f"(the second before: {baseline:.3f} s; the command took {done - issued:.3f} s)", file=sys.stderr)
    await sleep(reactor, 1.0)
    return pause, baseline


async def bench(args: argparse.Namespace) -> None:
    from tests.test_meta_raft_process import RealCluster

    cluster = RealCluster(metas=3, chunks=3, ec="RS-2-1")
    try:
        await threads.deferToThread(cluster.up)
        clients = [cluster.client(timeout=30) for _ in range(8)]
        await clients[0].mkdir("/f")
        results: dict[str, list[float]] = {"mkdir": [], "put": []}
        baselines: dict[str, list[float]] = {"mkdir": [], "put": []}
        for t in range(args.tries):
            for kind in ("mkdir", "put"):
                if args.planned:
                    pause, baseline = await planned_try(cluster, clients, kind, f"t{t}{kind}")
                    results[kind].append(pause)
                    baselines[kind].append(baseline)
                else:
                    results[kind].append(await one_try(cluster, clients, kind, f"t{t}{kind}"))
        for c in clients:
            await c.close()
    finally:
        cluster.destroy()
    if args.planned:
        print(f"\nplanned hand-over (admin meta lead) under load, {args.tries} tries each (3 metadata nodes)")
        for kind, values in results.items():
            shown = ", ".join(f"{v:.3f}" for v in values)
            print(f"{kind:6} longest pause: median {statistics.median(values):.3f} s  ({shown}); "
                  f"the second before, median {statistics.median(baselines[kind]):.3f} s")
        return
    print(f"\nleader kill -9 -> next acknowledged write, {args.tries} tries each (3 metadata nodes)")
    for kind, values in results.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"{kind:6} median {statistics.median(values):.3f} s  ({shown})")
    print("anchor: etcd ~1.5 s; target < 1.0 s")


def main() -> None:
    """Parse the options and run on the global reactor."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=5)
    parser.add_argument("--planned", action="store_true", help="hand leadership over instead of killing the leader")
    args = parser.parse_args()
    run_reactor(lambda reactor: bench(args))


if __name__ == "__main__":
    main()
