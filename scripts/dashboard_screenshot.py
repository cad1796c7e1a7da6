#!/usr/bin/env python
# -*- test-case-name: tests.test_dashboard_browser -*-
"""Save a PNG of a DogFS dashboard, as an operator would see it, with headless Chromium.

    python scripts/dashboard_screenshot.py --cluster /tmp/dogfs-shot docs/dashboard.png
    python scripts/dashboard_screenshot.py https://127.0.0.1:9101/ /tmp/dashboard.png
    python scripts/dashboard_screenshot.py --demo /tmp/dashboard.png

C{--cluster DIR} makes the picture of docs/dashboard.png: it starts a real local cluster in
DIR (`dogfs cluster up --detach`), puts and reads a few files, stops one chunk server
(`dogfs cluster stop chunk-N`), shoots the leader's dashboard and takes the cluster down.
A URL shoots a running dashboard as it is. Either way the script waits until the page is live
and lists the nodes, and for C{--wait-dead} (default 1) chunk servers shown dead, so the
picture shows the state it was taken for. C{--demo} serves a made-up cluster
(dogfs.web.fake) with one chunk server down and some traffic, to work on the page itself.
Needs Debian's chromium (apt-get install chromium). Certificates are not checked (a local
cluster's dashboard is served with its own CA's certificate).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.task import deferLater, react

from dogfs.web.chromium import Chromium, dashboard_url
from dogfs.web.fake import FakeClusterSource
from dogfs.web.metrics import Metrics
from dogfs.web.site import make_site

GiB = 1 << 30


def _demo(reactor: Any) -> tuple[str, Any]:
    """Serve the fake cluster on a free loopback port; return its URL and the port."""
    source = FakeClusterSource()
    metrics = Metrics()

    site = make_site(reactor, source, metrics, ["http://127.0.0.1:0"], push_interval=0.25,
                     sample_interval=0.25)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    number = port.getHost().port
    site.feed.setProtocolOptions(allowedOrigins=[f"http://127.0.0.1:{number}"])
    # Five minutes of made-up history, so that the chart looks like a node that has been up.
    now = reactor.seconds()
    for step in range(300, 0, -1):
        wave = math.sin(step / 23.0)
        site.feed.history.points.append({
            "t": round(now - step, 3),
            "put_bytes_s": (48 + 20 * wave + 6 * math.sin(step / 4.0)) * (1 << 20),
            "get_bytes_s": (100 + 25 * math.cos(step / 31.0) + 8 * math.sin(step / 3.0)) * (1 << 20),
            "put_ops_s": 0.8 + 0.3 * wave,
            "get_ops_s": 3.0 + 0.5 * math.cos(step / 31.0),
        })
    for i, member in enumerate(source.status["meta"], start=1):
        member["http_address"] = f"127.0.0.1:{number if i == 1 else number + 100 + i}"
    source.emit({"kind": "election", "node": "meta-1", "level": "warn",
                 "message": "meta-1 elected leader for term 3"})
    source.emit({"kind": "chunk_state", "node": "chunk-5", "level": "info",
                 "message": "chunk-5 registered (rack-2)"})
    # Some traffic for the chart: a few put and get rates as if files were flowing.
    ticks = {"n": 0}

    def traffic() -> None:
        ticks["n"] += 1
        n = ticks["n"]
        for c in source.status["chunks"]:
            if c["state"] == "alive":
                c["load"] = {"put_bytes_s": (48 + 6 * math.sin(n / 2.0)) * (1 << 20) / 5,
                             "get_bytes_s": (100 + 8 * math.cos(n / 3.0)) * (1 << 20) / 5}
        metrics.record_commit("put", 64 << 20)
        metrics.record_read(32 << 20)
        if n == 12:
            source.set_chunk_state("chunk-3", "dead", heartbeat_age=41.7)
            source.chunk("chunk-3")["load"] = {}
            namespace = source.status["namespace"]
            namespace["at_risk"] = {"0": 0, "1": 861, "2": 1051}
            source.emit({"kind": "repair", "level": "warn",
                         "message": "repair scheduled for 861 block groups on chunk-3"})
            source.emit({"kind": "write_refused", "level": "warn",
                         "message": "PUT /logs/app.log refused: chunk-3 chosen while dying, retried"})
        if n < 40:
            reactor.callLater(0.25, traffic)

    traffic()
    return f"http://127.0.0.1:{number}/", port


def _dogfs(home: str, *args: str) -> str:
    """Run the `dogfs` CLI on the cluster in C{home}; its stdout, or exit with its error."""
    command = [sys.executable, "-m", "dogfs.cli.main", "--home", home, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout


def _cluster(home: str, chunks: int, victim: str) -> str:
    """Start a cluster in C{home} with traffic and C{victim} stopped; the leader's dashboard URL."""
    _dogfs(home, "cluster", "up", "--meta", "3", "--chunk", str(chunks), "--detach")
    _dogfs(home, "mkdir", "/demo")
    with tempfile.TemporaryDirectory() as scratch:
        for i, size in enumerate((3 << 20, 17 << 20, 64 << 20, 5 << 20)):
            local = os.path.join(scratch, f"f{i}")
            with open(local, "wb") as f:
                f.write(os.urandom(size))
            _dogfs(home, "put", local, f"/demo/file-{i}.bin")
            _dogfs(home, "get", f"/demo/file-{i}.bin", local + ".back")
    _dogfs(home, "cluster", "stop", victim)
    nodes = json.loads(_dogfs(home, "cluster", "status", "--json"))["nodes"]
    leader = next(
        (n for n in nodes if n.get("kind") == "meta" and n.get("role") == "leader"), None
    ) or next(n for n in nodes if n.get("kind") == "meta" and n.get("http_address"))
    return dashboard_url(leader["http_address"])


async def shoot(
    reactor: Any,
    url: str,
    output: Path,
    width: int = 1400,
    wait_dead: int = 1,
    timeout: float = 60.0,
    min_points: int = 8,
    settle: float = 3.0,
) -> None:
    """Open C{url}, wait for a live page with its nodes (and dead ones), save a PNG.

    C{min_points} throughput samples are waited for too, so the chart is not empty, and
    C{settle} seconds more for the event log.
    """
    browser = await Chromium.launch(reactor, ignore_certificate_errors=True)
    try:
        page = await browser.open(url, width=width, height=900)
        await page.wait_for(
            "document.body.dataset.conn === 'open' && "
            "document.querySelectorAll('#chunk-rows [data-node-id]').length",
            timeout,
        )
        if wait_dead:
            await page.wait_for(
                "document.querySelectorAll('#chunk-rows [data-state=dead]').length",
                timeout,
                check=lambda n: isinstance(n, int) and n >= wait_dead,
            )
        await page.wait_for("window.dogfsDashboard.model.points.length", timeout,
                            check=lambda n: isinstance(n, int) and n >= min_points)
        # The registry's sweep announces a death a moment after a status first shows it:
        # give the event log the time to catch up.
        await deferLater(reactor, settle, lambda: None)
        png = await page.screenshot(width=width)
    finally:
        await browser.close()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(png)
    print(f"saved {output} ({len(png)} bytes) from {url}")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and take the screenshot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("url", nargs="?", help="the dashboard URL, e.g. http://127.0.0.1:9101/")
    parser.add_argument("output", help="where to save the PNG")
    parser.add_argument("--demo", action="store_true", help="serve a made-up cluster instead")
    parser.add_argument("--cluster", metavar="DIR",
                        help="start a real local cluster in DIR, stop one chunk server, shoot")
    parser.add_argument("--chunks", type=int, default=6, help="chunk servers for --cluster")
    parser.add_argument("--victim", default="chunk-3", help="the chunk server --cluster stops")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--wait-dead", type=int, default=1,
                        help="wait until this many chunk servers show dead (0: do not wait)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--min-points", type=int, default=8,
                        help="throughput samples (one a second) to wait for on the chart")
    args = parser.parse_args(argv)
    if not args.demo and not args.url and not args.cluster:
        parser.error("give a URL, --cluster DIR or --demo")

    async def run(reactor: Any) -> None:
        url = args.url
        port = None
        if args.demo:
            url, port = _demo(reactor)
        try:
            await shoot(reactor, url, Path(args.output), args.width, args.wait_dead, args.timeout,
                        args.min_points)
        finally:
            if port is not None:
                await port.stopListening()

    from twisted.internet.defer import Deferred

    try:
        if args.cluster:
            args.url = _cluster(args.cluster, args.chunks, args.victim)
        react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    finally:
        if args.cluster:
            _dogfs(args.cluster, "cluster", "down")


if __name__ == "__main__":
    main(sys.argv[1:])
