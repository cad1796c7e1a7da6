# -*- test-case-name: tests.test_web -*-
"""The HTTP side of a metadata node: one twisted.web C{Site} with the dashboard in it.

C{make_site} builds it: C{/} the page, C{/static/...} its files (from the package, no build
step), C{/ws} the live feed (autobahn's C{WebSocketResource}, origins checked), C{/metrics}
(Prometheus text) and C{/healthz}. The meta service listens on it with an endpoint string
(C{endpoints.serverFromString}), so C{ssl:} gives HTTPS and WSS with nothing else to do.

Imports L{dogfs.web.feed}, L{dogfs.web.metrics} and L{dogfs.web.source}.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from dogfs.web.feed import Feed
from dogfs.web.metrics import Metrics
from dogfs.web.source import IClusterSource

log = Logger()

#: The page, its script and its style sheet, shipped in the package (setup.cfg package_data).
STATIC_DIR = Path(__file__).resolve().parent / "static"

# The page talks only to metadata nodes (its own or, when that one is down, another one):
# scripts and styles from this origin only, WebSockets to any dashboard.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'"
)


def dashboard_origins(http_addresses: Iterable[str], *, secure: bool = False) -> list[str]:
    """The C{allowed_origins} for dashboards at these "host:port" addresses.

    A page served by any metadata node may reconnect to another one, so every node should
    allow them all. A loopback address also allows its other loopback names.
    """
    scheme = "https" if secure else "http"
    origins: list[str] = []
    for address in http_addresses:
        host, _, port = address.rpartition(":")
        hosts = [host]
        if host in ("127.0.0.1", "localhost", "[::1]"):
            hosts = ["127.0.0.1", "localhost", "[::1]"]
        for name in hosts:
            origin = f"{scheme}://{name}:{port}"
            if origin not in origins:
                origins.append(origin)
    return origins


class MetricsResource(Resource):
    """C{/metrics}: the node's registry in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        """Serve C{metrics}."""
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        """The exposition text, generated now."""
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.render()


class HealthResource(Resource):
    """C{/healthz}: 200 with this node's role and who leads, as JSON."""

    isLeaf = True

    def __init__(self, source: IClusterSource) -> None:
        """Report on C{source}."""
        super().__init__()
        self.source = source

    def render_GET(self, request: Request) -> bytes:
        """C{{"ok": true, "node", "role", "leader", "leader_http_address"}}."""
        is_leader = bool(self.source.is_leader())
        body: dict[str, Any] = {
            "ok": True,
            "node": self.source.node_id,
            "role": "leader" if is_leader else "follower",
            "leader": None,
            "leader_http_address": self.source.leader_http_address(),
        }
        try:
            status = self.source.snapshot()
            body["leader"] = (status.get("cluster") or {}).get("leader")
            me = next(
                (m for m in status.get("meta") or [] if m.get("id") == self.source.node_id), None
            )
            if me is not None and me.get("role"):
                body["role"] = me["role"]
        except Exception:
            log.failure("cluster snapshot failed during /healthz")
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode("utf-8") + b"\n"


class DashboardSite(Site):
    """A C{Site} that runs its L{Feed} while it listens and sets safe headers on every answer."""

    def __init__(self, resource: Resource, feed: Feed) -> None:
        """Serve C{resource}; start and stop C{feed} with the listening ports."""
        super().__init__(resource)
        self.feed = feed

    def startFactory(self) -> None:
        """The first port listens: subscribe to events, sample throughput."""
        super().startFactory()
        self.feed.start()

    def stopFactory(self) -> None:
        """The last port closed: stop the feed's timers and close its pages."""
        self.feed.stop()
        super().stopFactory()

    def getResourceFor(self, request: Request) -> Any:
        """Route as usual, after setting headers that keep the page from being framed or sniffed."""
        request.setHeader(b"content-security-policy", _CSP.encode("ascii"))
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-cache")
        return super().getResourceFor(request)


def make_site(
    clock: IReactorTime,
    source: IClusterSource,
    metrics: Metrics,
    allowed_origins: list[str],
    *,
    push_interval: float = 0.5,
    sample_interval: float = 1.0,
    meta_dead_after: float = 5.0,
) -> DashboardSite:
    """Build the dashboard's site for one metadata node.

    @param clock: the reactor's time (timers of the feed).
    @param source: this node's view of the cluster.
    @param metrics: this node's metrics; its gauges get bound to C{source}.
    @param allowed_origins: origins whose pages may open the feed, as
        C{"scheme://host:port"} (see L{dashboard_origins}); C{"*"} is refused.
    @param push_interval: least seconds between two pushes of changes to a page.
    @param sample_interval: seconds between two throughput samples.
    @param meta_dead_after: seconds of silence after which a metadata member is shown dead.
    """
    metrics.bind(source.snapshot, source.node_id)
    feed = Feed(
        clock,
        source,
        metrics,
        allowed_origins,
        push_interval=push_interval,
        sample_interval=sample_interval,
        meta_dead_after=meta_dead_after,
    )
    root = Resource()
    root.putChild(b"", File(str(STATIC_DIR / "index.html"), defaultType="text/html"))
    root.putChild(b"static", File(str(STATIC_DIR)))
    root.putChild(b"ws", WebSocketResource(feed))
    root.putChild(b"metrics", MetricsResource(metrics))
    root.putChild(b"healthz", HealthResource(source))
    return DashboardSite(root, feed)
