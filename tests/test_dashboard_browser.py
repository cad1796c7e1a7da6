"""The dashboard in a real headless Chromium (Debian's `chromium`), driven over DevTools.

L{DashboardScenario} holds the checks an operator's eye makes, against any dashboard URL:
every node listed with its state, a chunk server's death and return shown without a reload,
the leader marked. L{FakeClusterDashboardTests} runs them against L{FakeClusterSource}
served by C{make_site} on a real port; a real-cluster test subclasses the scenario with
C{kill -9} and a restart as C{kill_chunk} and C{restart_chunk}. Skipped, saying why, when
Chromium is not installed (CI installs it: `apt-get install -y chromium`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
import struct
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor, ssl, utils
from twisted.trial.unittest import SkipTest, TestCase

from dogfs.web.chromium import Chromium, Page, dashboard_url, find_chromium
from dogfs.web.fake import FakeClusterSource
from dogfs.web.metrics import Metrics
from dogfs.web.site import DashboardSite, dashboard_origins, make_site

NO_CHROMIUM = "chromium is not installed: apt-get install -y chromium (CI's .ci/run must do it)"


def _rows(selector: str) -> str:
    """A JS expression: [[data-node-id, data-state, data-role], ...] of the matching rows."""
    return (
        f"Array.from(document.querySelectorAll({json.dumps(selector)})).map("
        "r => [r.dataset.nodeId, r.dataset.state, r.dataset.role || null])"
    )


class DashboardScenario:
    """Browser checks that hold for any DogFS dashboard; subclasses say where and how.

    A subclass (also a trial C{TestCase}) calls the C{check_*} methods on the page that
    L{open_dashboard} returns, and sets C{dashboard_url}, C{meta_ids}, C{chunk_ids},
    C{leader_id}, C{victim} (a chunk server to kill) and C{death_timeout} (the liveness
    timeout plus a few seconds), and implements L{kill_chunk} and L{restart_chunk}.
    """

    dashboard_url: str
    meta_ids: list[str]
    chunk_ids: list[str]
    leader_id: str
    victim: str
    death_timeout: float = 10.0
    load_timeout: float = 30.0
    #: A local cluster's HTTPS dashboard has a certificate from the cluster's own CA.
    ignore_certificate_errors: bool = False

    async def kill_chunk(self, node_id: str) -> None:
        """Make chunk server C{node_id} die (a real cluster: C{kill -9})."""
        raise NotImplementedError

    async def restart_chunk(self, node_id: str) -> None:
        """Bring chunk server C{node_id} back."""
        raise NotImplementedError

    async def open_dashboard(self) -> Page:
        """Start Chromium, open the dashboard and wait until it is live and lists every node."""
        if find_chromium() is None:
            raise SkipTest(NO_CHROMIUM)
        browser = await Chromium.launch(
            reactor, ignore_certificate_errors=self.ignore_certificate_errors
        )
        self.addCleanup(browser.close)  # type: ignore[attr-defined]
        page = await browser.open(self.dashboard_url)
        expected = len(self.meta_ids) + len(self.chunk_ids)
        await page.wait_for(
            "document.body.dataset.conn === 'open' && "
            "document.querySelectorAll('tr[data-node-id]').length",
            self.load_timeout,
            check=lambda n: n == expected,
        )
        return page

    async def check_every_node_listed(self, page: Page) -> None:
        """Every metadata node and chunk server is a row with its id and `running`."""
        meta = await page.evaluate(_rows("#meta-rows tr[data-node-id]"))
        chunks = await page.evaluate(_rows("#chunk-rows tr[data-node-id]"))
        assert_equal = self.assertEqual  # type: ignore[attr-defined]
        assert_equal(sorted(row[0] for row in meta), sorted(self.meta_ids))
        assert_equal(sorted(row[0] for row in chunks), sorted(self.chunk_ids))
        await page.wait_for(
            "Array.from(document.querySelectorAll('tr[data-node-id]')).map(r => r.dataset.state)",
            self.death_timeout,
            check=lambda states: set(states) == {"running"},
        )

    async def check_leader_marked(self, page: Page) -> None:
        """Exactly one metadata row is the leader (data-role and a visible badge)."""
        leaders = await page.wait_for(
            "Array.from(document.querySelectorAll('#meta-rows tr[data-role=leader]'))"
            ".map(r => [r.dataset.nodeId, !!r.querySelector('.badge-leader')])",
            self.death_timeout,
            check=lambda rows: len(rows) == 1,
        )
        self.assertEqual(leaders, [[self.leader_id, True]])  # type: ignore[attr-defined]

    async def check_death_and_return(self, page: Page) -> None:
        """A dead chunk server's row turns `dead` in time, then `running` again, in one page load."""
        # A page reload would lose this mark: its survival proves the rows changed in place.
        await page.evaluate("window.__dogfsMark = 42")
        row = f"document.querySelector('#chunk-rows tr[data-node-id={json.dumps(self.victim)}]')"
        await self.kill_chunk(self.victim)
        await page.wait_for(
            f"{row}.dataset.state", self.death_timeout, check=lambda s: s == "dead"
        )
        await self.restart_chunk(self.victim)
        await page.wait_for(
            f"{row}.dataset.state", self.death_timeout, check=lambda s: s == "running"
        )
        self.assertEqual(await page.evaluate("window.__dogfsMark"), 42)  # type: ignore[attr-defined]


class FakeClusterDashboardTests(DashboardScenario, TestCase):
    """The scenario against a fake cluster served by make_site on a real loopback port."""

    meta_ids = ["meta-1", "meta-2", "meta-3"]
    chunk_ids = [f"chunk-{i}" for i in range(1, 7)]
    leader_id = "meta-1"
    victim = "chunk-3"
    death_timeout = 5.0
    load_timeout = 15.0

    def setUp(self) -> None:
        if find_chromium() is None:
            raise SkipTest(NO_CHROMIUM)
        self.source = FakeClusterSource()
        self.site, self.port = self.serve(self.source)
        self.address = f"127.0.0.1:{self.port.getHost().port}"
        self.source.status["meta"][0]["http_address"] = self.address
        self.dashboard_url = f"http://{self.address}/"

    def serve(self, source: FakeClusterSource, port: int = 0) -> tuple[DashboardSite, Any]:
        """Serve C{source} on a loopback port (any free one by default) until the test ends."""
        site = make_site(reactor, source, Metrics(), ["http://127.0.0.1:1"], push_interval=0.2)
        listening = reactor.listenTCP(port, site, interface="127.0.0.1")
        site.feed.set_allowed_origins(dashboard_origins([f"127.0.0.1:{listening.getHost().port}"]))
        self.addCleanup(self.stop, listening)
        return site, listening

    async def stop(self, listening: Any) -> None:
        """Stop listening (the feed closes its pages) unless already stopped."""
        if listening.connected:
            await listening.stopListening()

    async def test_every_node_listed_with_state(self) -> None:
        """Every node is a row carrying its id and state."""
        await self.check_every_node_listed(await self.open_dashboard())

    async def test_leader_marked(self) -> None:
        """The leader's row is marked."""
        await self.check_leader_marked(await self.open_dashboard())

    async def test_chunk_death_and_return_without_reload(self) -> None:
        """A chunk server's death and return show in place, without a reload."""
        await self.check_death_and_return(await self.open_dashboard())

    async def kill_chunk(self, node_id: str) -> None:
        """The fake's chunk server misses its heartbeats and is declared dead."""
        self.source.set_chunk_state(node_id, "dead", heartbeat_age=12.5)

    async def restart_chunk(self, node_id: str) -> None:
        """The fake's chunk server heartbeats again."""
        self.source.set_chunk_state(node_id, "alive", heartbeat_age=0.3)

    async def test_event_log_and_follower_banner(self) -> None:
        """Events appear in the log as they happen; a follower's page says its view is stale."""
        page = await self.open_dashboard()
        self.source.set_leader("meta-2", term=4)
        self.source.leader_http = "127.0.0.1:1"  # unreachable: the page stays on this node
        await page.wait_for(
            "Array.from(document.querySelectorAll('#events li')).map(li => li.textContent)",
            self.death_timeout,
            check=lambda texts: any("meta-2 elected leader for term 4" in t for t in texts),
        )
        banner = await page.wait_for(
            "document.getElementById('banner').hidden ? null : "
            "[document.getElementById('banner').dataset.kind, "
            "document.getElementById('banner').textContent]",
            self.death_timeout,
            check=lambda v: v is not None and v[0] == "stale",
        )
        self.assertIn("meta-1 is a follower", banner[1])
        leaders = await page.evaluate(_rows("#meta-rows tr[data-role=leader]"))
        self.assertEqual([row[0] for row in leaders], ["meta-2"])

    async def test_reconnects_to_another_node(self) -> None:
        """When its node dies the page says so, then goes on with another metadata node's feed."""
        other_source = FakeClusterSource(node_id="meta-2", leader=False)
        other_site, other_port = self.serve(other_source)
        other = f"127.0.0.1:{other_port.getHost().port}"
        origins = dashboard_origins([self.address, other])
        for source in (self.source, other_source):
            source.status["meta"][0]["http_address"] = self.address
            source.status["meta"][1]["http_address"] = other
        for site in (self.site, other_site):
            site.feed.set_allowed_origins(origins)
        page = await self.open_dashboard()
        await page.evaluate("window.__dogfsMark = 7")
        await self.port.stopListening()
        # The follower now leads, so the page should stay with it (and not call it stale).
        other_source.set_leader("meta-2", term=5)
        state = await page.wait_for(
            "[window.dogfsDashboard.conn.target, document.body.dataset.conn, "
            "document.querySelector('#meta-rows tr[data-role=leader]').dataset.nodeId]",
            self.load_timeout,
            check=lambda v: v[0] == other and v[1] == "open" and v[2] == "meta-2",
        )
        self.assertEqual(state, [other, "open", "meta-2"])
        self.assertEqual(await page.evaluate("window.__dogfsMark"), 7)

    async def test_follower_page_shows_leader_view(self) -> None:
        """A page opened on a follower goes to the leader's feed when it can reach it."""
        follower_source = FakeClusterSource(node_id="meta-2", leader=False)
        follower_site, follower_port = self.serve(follower_source)
        follower = f"127.0.0.1:{follower_port.getHost().port}"
        origins = dashboard_origins([self.address, follower])
        for source in (self.source, follower_source):
            source.status["meta"][0]["http_address"] = self.address
            source.status["meta"][1]["http_address"] = follower
        for site in (self.site, follower_site):
            site.feed.set_allowed_origins(origins)
        self.dashboard_url = f"http://{follower}/"
        page = await self.open_dashboard()
        state = await page.wait_for(
            "[window.dogfsDashboard.conn.target, document.body.dataset.stale, "
            "document.getElementById('via').textContent]",
            self.load_timeout,
            check=lambda v: v[0] == self.address and v[1] == "false",
        )
        self.assertIn("via meta-1", state[2])


class ScreenshotScriptTests(TestCase):
    """scripts/dashboard_screenshot.py saves a PNG of a live page with a chunk server down."""

    async def test_shoot(self) -> None:
        """The script's shoot() waits for the dead row and writes a full-page PNG."""
        if find_chromium() is None:
            raise SkipTest(NO_CHROMIUM)
        path = Path(__file__).resolve().parent.parent / "scripts" / "dashboard_screenshot.py"
        spec = importlib.util.spec_from_file_location("dashboard_screenshot", path)
        assert spec is not None and spec.loader is not None
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        source = FakeClusterSource()
        source.set_chunk_state("chunk-3", "dead", heartbeat_age=30.0)
        site = make_site(reactor, source, Metrics(), ["http://127.0.0.1:1"])
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = f"127.0.0.1:{port.getHost().port}"
        site.feed.set_allowed_origins(dashboard_origins([address]))
        output = Path(self.mktemp()) / "dashboard.png"
        await script.shoot(reactor, f"http://{address}/", output, width=1200, timeout=15.0,
                           min_points=0, settle=0)
        png = output.read_bytes()
        self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
        width, height = struct.unpack(">II", png[16:24])
        self.assertEqual(width, 1200)
        self.assertGreater(height, 900, "the whole page, not only the first screen")


class HTTPSDashboardTests(TestCase):
    """Over HTTPS the page opens its feed with wss: on the same TLS port."""

    async def test_live_over_tls(self) -> None:
        """A page served over TLS goes live (wss) and lists every node."""
        if find_chromium() is None:
            raise SkipTest(NO_CHROMIUM)
        key = ssl.KeyPair.generate(size=2048)
        certificate = key.selfSignedCert(1, CN="127.0.0.1")
        source = FakeClusterSource()
        site = make_site(reactor, source, Metrics(), ["https://127.0.0.1:1"], push_interval=0.2)
        port = reactor.listenSSL(0, site, certificate.options(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = f"127.0.0.1:{port.getHost().port}"
        site.feed.set_allowed_origins(dashboard_origins([address], secure=True))
        browser = await Chromium.launch(reactor, ignore_certificate_errors=True)
        self.addCleanup(browser.close)
        page = await browser.open(f"https://{address}/")
        rows = await page.wait_for(
            "document.body.dataset.conn === 'open' && "
            "document.querySelectorAll('tr[data-node-id]').length",
            15.0,
            check=lambda n: n == 9,
        )
        self.assertEqual(rows, 9)
        self.assertEqual(await page.evaluate("location.protocol"), "https:")


class RealClusterDashboardTests(DashboardScenario, TestCase):
    """The scenario against a real local cluster: `dogfs cluster up`, `kill -9`, `cluster start`.

    Runs once the metadata daemon serves the dashboard (C{dogfs.plugins.meta.SERVES_DASHBOARD}).
    """

    victim = "chunk-3"
    ignore_certificate_errors = True
    load_timeout = 60.0

    async def setUp(self) -> None:
        if find_chromium() is None:
            raise SkipTest(NO_CHROMIUM)
        if not getattr(importlib.import_module("dogfs.plugins.meta"), "SERVES_DASHBOARD", False):
            raise SkipTest("the metadata daemon does not serve the dashboard yet "
                           "(dogfs.plugins.meta.SERVES_DASHBOARD)")
        self.home = os.path.abspath(self.mktemp())
        # Registered first, so that a cluster half started is taken down too.
        self.addCleanup(self.dogfs, "cluster", "down")
        await self.dogfs("cluster", "up", "--meta", "3", "--chunk", "6", "--detach")
        nodes = await self.nodes()
        self.meta_ids = [n["id"] for n in nodes if n["kind"] == "meta"]
        self.chunk_ids = [n["id"] for n in nodes if n["kind"] == "chunk"]
        leader = next(n for n in nodes if n["kind"] == "meta" and n.get("role") == "leader")
        self.leader_id = leader["id"]
        self.dashboard_url = dashboard_url(leader["http_address"])
        # The liveness timeout (chunk_dead_after, 10 s by default) plus a few seconds.
        self.death_timeout = float(os.environ.get("DOGFS_CHUNK_DEAD_AFTER", "10")) + 8.0

    async def dogfs(self, *args: str) -> str:
        """Run the `dogfs` CLI on this test's cluster; its stdout (fails the test on an error)."""
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-m", "dogfs.cli.main", "--home", self.home, *args],
            env=dict(os.environ), reactor=reactor,
        )
        if code != 0:
            self.fail(f"dogfs {' '.join(args)} exited {code}: {err.decode(errors='replace')}")
        return out.decode()

    async def nodes(self) -> list[dict[str, Any]]:
        """`dogfs cluster status --json`'s nodes."""
        return list(json.loads(await self.dogfs("--json", "cluster", "status"))["nodes"])

    async def kill_chunk(self, node_id: str) -> None:
        """`kill -9` the chunk server's process."""
        pid = next(n["pid"] for n in await self.nodes() if n["id"] == node_id)
        os.kill(int(pid), signal.SIGKILL)

    async def restart_chunk(self, node_id: str) -> None:
        """`dogfs cluster start NODE`."""
        await self.dogfs("cluster", "start", node_id)

    async def test_dashboard_on_real_cluster(self) -> None:
        """On a real cluster: every node listed, the leader marked, a kill -9 shown and undone."""
        page = await self.open_dashboard()
        await self.check_every_node_listed(page)
        await self.check_leader_marked(page)
        await self.check_death_and_return(page)
