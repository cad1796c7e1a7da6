"""Tests for dogfs.web: metrics, the feed's messages, and the site over real loopback sockets."""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from zope.interface.verify import verifyObject

from dogfs.web.fake import FakeClusterSource, demo_status
from dogfs.web.feed import EventLog, Feed, ThroughputHistory, meta_state, page_status
from dogfs.web.metrics import Metrics
from dogfs.web.node import MetaNodeSource
from dogfs.web.site import STATIC_DIR, dashboard_origins, make_site
from dogfs.web.source import IClusterSource


def families(text: str) -> dict[str, Any]:
    """Parse Prometheus text into {family name: family}; raises if it does not parse."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample C{name} with exactly C{labels} in exposition C{text}."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise KeyError((name, labels))


class MetricsTests(SynchronousTestCase):
    """L{Metrics}: counters the meta service moves, gauges read from the snapshot."""

    def setUp(self) -> None:
        self.source = FakeClusterSource()
        self.metrics = Metrics(self.source.snapshot, node_id="meta-1")

    def render(self) -> str:
        return self.metrics.render().decode("utf-8")

    def test_parses_and_counts_puts_and_gets(self) -> None:
        """The exposition parses; commits of PUTs and reads move the byte and op counters."""
        before = self.render()
        self.assertEqual(sample(before, "dogfs_put_bytes_total"), 0.0)
        self.metrics.record_commit("put", 1000)
        self.metrics.record_commit("put", 24)
        self.metrics.record_commit("mkdir")
        self.metrics.record_commit("CommitFile", 0)
        self.metrics.record_read(500)
        after = self.render()
        self.assertEqual(sample(after, "dogfs_put_bytes_total"), 1024.0)
        self.assertEqual(sample(after, "dogfs_put_ops_total"), 3.0)
        self.assertEqual(sample(after, "dogfs_get_bytes_total"), 500.0)
        self.assertEqual(sample(after, "dogfs_get_ops_total"), 1.0)
        self.assertEqual(sample(after, "dogfs_meta_commands_total", op="put"), 2.0)
        self.assertEqual(sample(after, "dogfs_meta_commands_total", op="mkdir"), 1.0)
        self.assertEqual(
            self.metrics.totals(),
            {"put_bytes": 1024.0, "get_bytes": 500.0, "put_ops": 3.0, "get_ops": 1.0},
        )

    def test_refused_by_reason(self) -> None:
        """Refused writes are counted by reason."""
        self.metrics.record_refused("no_quorum")
        self.metrics.record_refused("no_quorum")
        self.metrics.record_refused("not_leader")
        text = self.render()
        self.assertEqual(sample(text, "dogfs_writes_refused_total", reason="no_quorum"), 2.0)
        self.assertEqual(sample(text, "dogfs_writes_refused_total", reason="not_leader"), 1.0)

    def test_gauges_from_snapshot(self) -> None:
        """Chunk servers by state, Raft term, namespace and risk levels come from the snapshot."""
        self.source.chunk("chunk-2")["state"] = "dead"
        self.source.status["namespace"]["at_risk"] = {"0": 3, "1": 10, "2": 99}
        text = self.render()
        self.assertEqual(sample(text, "dogfs_chunk_servers", state="alive"), 5.0)
        self.assertEqual(sample(text, "dogfs_chunk_servers", state="dead"), 1.0)
        self.assertEqual(sample(text, "dogfs_raft_term"), 3.0)
        self.assertEqual(sample(text, "dogfs_raft_commit_index"), 1207.0)
        self.assertEqual(sample(text, "dogfs_raft_log_writes"), 96.0)
        self.assertEqual(sample(text, "dogfs_meta_log_version"), 1.0)
        self.assertEqual(sample(text, "dogfs_meta_group_log_version"), 1.0)
        self.assertEqual(sample(text, "dogfs_meta_is_leader"), 1.0)
        self.assertEqual(sample(text, "dogfs_files"), 1342.0)
        self.assertEqual(sample(text, "dogfs_block_groups_at_risk", survivable_losses="0"), 3.0)
        self.assertEqual(sample(text, "dogfs_block_groups_at_risk", survivable_losses="2"), 99.0)
        self.assertEqual(
            sample(text, "dogfs_chunk_server_used_bytes", node="chunk-1"), 12.0 * (1 << 30)
        )

    def test_failing_snapshot_still_scrapes(self) -> None:
        """A source that raises costs the gauges, not the counters: the scrape still answers."""

        def broken() -> dict[str, Any]:
            raise RuntimeError("registry gone")

        self.metrics.bind(broken)
        self.metrics.record_commit("put", 7)
        text = self.render()
        self.assertEqual(sample(text, "dogfs_put_bytes_total"), 7.0)
        self.assertNotIn("dogfs_files", families(text))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_registries_are_separate(self) -> None:
        """Two Metrics never share counts (each has its own registry, not the global one)."""
        other = Metrics()
        self.metrics.record_commit("put", 5)
        self.assertEqual(other.totals()["put_bytes"], 0.0)


class StateMappingTests(SynchronousTestCase):
    """How the status dict's entries become the page's C{data-state}."""

    def test_chunk_states(self) -> None:
        """Chunk "alive" is shown "running"; "dead" and "unknown" keep their names."""
        status = demo_status(chunks=3)
        status["chunks"][1]["state"] = "dead"
        status["chunks"][2]["state"] = "unknown"
        node = {"id": "meta-1"}
        shown = page_status(status, node, dead_after=5.0)
        self.assertEqual([c["state"] for c in shown["chunks"]], ["running", "dead", "unknown"])
        self.assertEqual(shown["chunks"][0]["source_state"], "alive")
        self.assertEqual(status["chunks"][0]["state"], "alive", "input left unchanged")

    def test_meta_states(self) -> None:
        """Silence past dead_after, or a down role, shows a member dead; the reporter is running.

        A follower's silence about another follower is no sign of death (they do not talk).
        """
        self.assertEqual(meta_state({"id": "meta-2", "role": "follower", "last_contact_s": 0.2}, "meta-1", 5.0), "running")
        self.assertEqual(meta_state({"id": "meta-2", "role": "follower", "last_contact_s": 9.0}, "meta-1", 5.0), "dead")
        self.assertEqual(meta_state({"id": "meta-2", "role": "unreachable"}, "meta-1", 5.0), "dead")
        self.assertEqual(meta_state({"id": "meta-2", "state": "stopped"}, "meta-1", 5.0), "stopped")
        self.assertEqual(meta_state({"id": "meta-1", "role": "candidate", "last_contact_s": 99}, "meta-1", 5.0), "running")
        follower = {"id": "meta-3", "role": "follower", "last_contact_s": 60.0}
        self.assertEqual(meta_state(follower, "meta-2", 5.0, reporter_leads=False), "running")
        leader = {"id": "meta-1", "role": "leader", "last_contact_s": 60.0}
        self.assertEqual(meta_state(leader, "meta-2", 5.0, reporter_leads=False), "dead")


class HistoryTests(SynchronousTestCase):
    """L{ThroughputHistory} and L{EventLog}."""

    def test_rates_from_counters(self) -> None:
        """Rates are counter differences over the interval; the first sample gives no point."""
        history = ThroughputHistory(window_s=10)
        zero = {"put_bytes": 0.0, "get_bytes": 0.0, "put_ops": 0.0, "get_ops": 0.0}
        self.assertIsNone(history.sample(100.0, zero, []))
        point = history.sample(102.0, {**zero, "put_bytes": 2000.0, "put_ops": 4.0}, [])
        assert point is not None
        self.assertEqual((point["put_bytes_s"], point["put_ops_s"], point["get_ops_s"]), (1000.0, 2.0, 0.0))

    def test_chunk_load_gives_bytes(self) -> None:
        """When alive chunk servers report put/get bytes/s, their sum is the cluster's rate."""
        history = ThroughputHistory()
        zero = {"put_bytes": 0.0, "get_bytes": 0.0, "put_ops": 0.0, "get_ops": 0.0}
        chunks = [
            {"state": "alive", "load": {"put_bytes_s": 10, "get_bytes_s": 1}},
            {"state": "alive", "load": {"put_bytes_s": 5}},
            {"state": "dead", "load": {"put_bytes_s": 1000}},
        ]
        history.sample(0.0, zero, chunks)
        point = history.sample(1.0, zero, chunks)
        assert point is not None
        self.assertEqual((point["put_bytes_s"], point["get_bytes_s"]), (15.0, 1.0))

    def test_window(self) -> None:
        """Points older than the window are dropped."""
        history = ThroughputHistory(window_s=5)
        zero = {"put_bytes": 0.0, "get_bytes": 0.0, "put_ops": 0.0, "get_ops": 0.0}
        for t in range(20):
            history.sample(float(t), zero, [])
        self.assertEqual([p["t"] for p in history.points], [14.0, 15.0, 16.0, 17.0, 18.0, 19.0])
        self.assertEqual([p["t"] for p in history.since(17.0)], [18.0, 19.0])

    def test_event_log(self) -> None:
        """Events are numbered, stamped when unstamped, and only the last `limit` are kept."""
        log = EventLog(limit=2)
        log.add({"kind": "election", "message": "a"}, 1.0)
        log.add({"kind": "chunk_state", "message": "b", "t": 0.5}, 2.0)
        third = log.add({"kind": "write_refused", "message": "c", "level": "warn"}, 3.0)
        self.assertEqual(third, {"kind": "write_refused", "message": "c", "level": "warn", "seq": 3, "t": 3.0})
        self.assertEqual([(e["seq"], e["t"]) for e in log.events], [(2, 0.5), (3, 3.0)])


class _Client:
    """Stands in for a FeedProtocol: keeps what the feed sends it."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.closed = False

    def send_json(self, message: dict[str, Any]) -> None:
        self.messages.append(json.loads(json.dumps(message)))

    def sendClose(self) -> None:
        self.closed = True


class FeedTests(SynchronousTestCase):
    """The feed's messages and timers, on a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.source = FakeClusterSource()
        self.metrics = Metrics()
        self.feed = Feed(
            self.clock,
            self.source,
            self.metrics,
            ["http://127.0.0.1:9101"],
            push_interval=0.5,
            sample_interval=10.0,
        )
        self.feed.start()
        self.addCleanup(self.feed.stop)

    def test_no_wildcard_origin(self) -> None:
        """A feed open to every origin ("*") cannot be built."""
        self.assertRaises(ValueError, Feed, self.clock, self.source, self.metrics, ["*"])
        self.assertRaises(ValueError, Feed, self.clock, self.source, self.metrics, [])

    def test_snapshot_first(self) -> None:
        """A new page gets one full snapshot at once: nodes with page states, history, events."""
        self.source.emit({"kind": "election", "message": "meta-1 elected", "node": "meta-1"})
        client = _Client()
        self.feed.add_client(client)  # type: ignore[arg-type]
        [message] = client.messages
        self.assertEqual(message["type"], "snapshot")
        self.assertEqual(message["node"]["id"], "meta-1")
        self.assertTrue(message["node"]["is_leader"])
        self.assertFalse(message["node"]["stale"])
        self.assertEqual([c["state"] for c in message["chunks"]], ["running"] * 6)
        self.assertEqual(message["cluster"]["leader"], "meta-1")
        self.assertEqual([e["message"] for e in message["events"]], ["meta-1 elected"])
        self.assertIn("points", message["throughput"])

    def test_delta_at_most_every_interval(self) -> None:
        """Changes go out as one delta per push interval, holding only the changed sections."""
        client = _Client()
        self.feed.add_client(client)  # type: ignore[arg-type]
        self.source.set_chunk_state("chunk-3", "dead")
        self.source.status["namespace"]["files"] += 1
        self.clock.advance(0.25)
        self.assertEqual([m["type"] for m in client.messages], ["snapshot", "event"])
        self.clock.advance(0.25)
        delta = client.messages[-1]
        self.assertEqual(delta["type"], "delta")
        self.assertEqual(
            {c["id"]: c["state"] for c in delta["chunks"]}["chunk-3"], "dead"
        )
        self.assertEqual(delta["namespace"]["files"], 1343)
        self.assertNotIn("meta", delta)
        count = len(client.messages)
        self.clock.advance(0.5)
        self.assertEqual(len(client.messages), count, "nothing changed: nothing sent")

    def test_throughput_points_pushed(self) -> None:
        """New throughput samples reach the page in the next delta (rates from the counters).

        The chunk servers report no load here, so bytes/s come from the committed sizes.
        """
        for chunk in self.source.status["chunks"]:
            chunk["load"] = {}
        client = _Client()
        self.feed.add_client(client)  # type: ignore[arg-type]
        self.metrics.record_commit("put", 40960)
        self.clock.advance(10.0)
        self.clock.advance(0.5)
        points = [p for m in client.messages for p in m.get("throughput_points", [])]
        self.assertEqual(len(points), 1)
        self.assertEqual(points[0]["put_bytes_s"], 4096.0)
        self.assertEqual(points[0]["put_ops_s"], 0.1)

    def test_event_pushed_at_once(self) -> None:
        """An event from the source goes to every page immediately, stamped with the clock."""
        first, second = _Client(), _Client()
        self.feed.add_client(first)  # type: ignore[arg-type]
        self.feed.add_client(second)  # type: ignore[arg-type]
        self.clock.advance(3.0)
        self.source.emit({"kind": "write_refused", "message": "no quorum", "level": "warn"})
        for client in (first, second):
            event = client.messages[-1]
            self.assertEqual(event["type"], "event")
            self.assertEqual(event["event"]["message"], "no quorum")
            self.assertEqual(event["event"]["t"], 3.0)

    def test_timers_stop_with_last_page(self) -> None:
        """The push loop runs only while a page is connected; stop() leaves no timer behind."""
        client = _Client()
        self.feed.add_client(client)  # type: ignore[arg-type]
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # sampler and pusher
        self.feed.remove_client(client)  # type: ignore[arg-type]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # sampler only
        self.feed.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.source.subscribers, [])

    def test_follower_is_stale(self) -> None:
        """A follower's snapshot says it is stale and where the leader's dashboard is."""
        self.source.leader = False
        self.source.node_id = "meta-2"
        self.source.leader_http = "127.0.0.1:9101"
        client = _Client()
        self.feed.add_client(client)  # type: ignore[arg-type]
        node = client.messages[0]["node"]
        self.assertEqual(
            node,
            {"id": "meta-2", "is_leader": False, "leader": "meta-1",
             "leader_http_address": "127.0.0.1:9101", "stale": True},
        )


class SourceTests(SynchronousTestCase):
    """The fake source and the origin helper."""

    def test_fake_provides_interface(self) -> None:
        """FakeClusterSource implements IClusterSource fully."""
        self.assertTrue(verifyObject(IClusterSource, FakeClusterSource()))

    def test_dashboard_origins(self) -> None:
        """Every node's origin is listed; loopback addresses bring their other names."""
        self.assertEqual(
            dashboard_origins(["10.0.0.5:8080", "127.0.0.1:9101"], secure=True),
            ["https://10.0.0.5:8080", "https://127.0.0.1:9101", "https://localhost:9101",
             "https://[::1]:9101"],
        )


class MetaNodeSourceTests(SynchronousTestCase):
    """L{MetaNodeSource}: the meta service's callables and events, as the dashboard wants them."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.status = demo_status()
        self.source = MetaNodeSource(
            self.clock, "meta-1", lambda: self.status, lambda: True,
            lambda: "127.0.0.1:9101", self.metrics,
        )
        self.events: list[dict[str, Any]] = []
        self.unsubscribe = self.source.subscribe(self.events.append)

    def test_provides_interface(self) -> None:
        """It is a full IClusterSource over the callables it was given."""
        self.assertTrue(verifyObject(IClusterSource, self.source))
        self.assertIs(self.source.snapshot(), self.status)
        self.assertEqual(self.source.leader_http_address(), "127.0.0.1:9101")

    def test_commits_and_reads_count(self) -> None:
        """Commit and read events move the counters and stay out of the event log."""
        self.source.meta_listener("commit", {"path": "/a", "size": 100})
        self.source.meta_listener("read", {"path": "/a", "size": 100})
        self.assertEqual(
            self.metrics.totals(),
            {"put_bytes": 100.0, "get_bytes": 100.0, "put_ops": 1.0, "get_ops": 1.0},
        )
        self.assertEqual(self.events, [])

    def test_refused_writes_folded(self) -> None:
        """Each refusal is counted; a burst shows as one line a second, with how many it folds."""
        for _ in range(5):
            self.source.meta_listener("write_refused", {"path": "/x", "reason": "no_quorum: 1 of 3"})
        self.clock.advance(1.5)
        self.source.meta_listener("write_refused", {"path": "/y", "reason": "no_quorum: 1 of 3"})
        self.assertEqual(
            [e["message"] for e in self.events],
            ["write of /x refused: no_quorum: 1 of 3",
             "write of /y refused: no_quorum: 1 of 3 (and 4 more)"],
        )
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "dogfs_writes_refused_total", {"reason": "no_quorum"}
            ),
            6.0,
        )

    def test_repairs_folded(self) -> None:
        """Repairs show as one line a second per level, failures as warnings."""
        for i in range(3):
            self.source.meta_listener("repair", {"level": "info", "node": "chunk-2", "message": f"shard {i} rebuilt"})
        self.source.meta_listener("repair", {"level": "warn", "node": "chunk-2", "message": "repair failed: x"})
        self.clock.advance(1.5)
        self.source.meta_listener("repair", {"level": "info", "node": "chunk-2", "message": "shard 3 rebuilt"})
        self.assertEqual(
            [(e["message"], e["level"], e["node"]) for e in self.events],
            [("shard 0 rebuilt", "info", "chunk-2"), ("repair failed: x", "warn", "chunk-2"),
             ("shard 3 rebuilt (and 2 more)", "info", "chunk-2")],
        )

    def test_chunk_and_election_events(self) -> None:
        """Registry changes and elections become one sentence each, stamped with the clock."""
        self.clock.advance(7)
        self.source.chunk_listener("chunk-2", "alive", "dead")
        self.source.chunk_listener("chunk-2", "dead", "alive")
        self.source.meta_listener("election", {"node": "meta-3", "term": 9})
        self.assertEqual(
            [(e["message"], e["level"], e["t"]) for e in self.events],
            [("chunk-2 died (no heartbeat)", "error", 7.0), ("chunk-2 is back", "info", 7.0),
             ("meta-3 elected leader for term 9", "warn", 7.0)],
        )
        self.unsubscribe()
        self.source.chunk_listener("chunk-2", "alive", "dead")
        self.assertEqual(len(self.events), 3)

    def test_chunk_change_told_once(self) -> None:
        """A change heard twice, or "alive" again after a leader change, is told once."""
        self.source.chunk_listener("chunk-5", "unknown", "alive")
        self.source.chunk_listener("chunk-5", "alive", "dead")
        self.source.meta_listener("chunk_state", {"node": "chunk-5", "old": "alive", "new": "dead"})
        self.clock.advance(30)
        self.source.meta_listener("chunk_state", {"node": "chunk-5", "old": "dead", "new": "alive"})
        self.source.chunk_listener("chunk-5", "alive", "unknown")  # a new leader
        self.source.chunk_listener("chunk-5", "unknown", "alive")
        self.assertEqual(
            [e["message"] for e in self.events],
            ["chunk-5 is alive", "chunk-5 died (no heartbeat)", "chunk-5 is back"],
        )


# ---- over real loopback sockets ------------------------------------------------------------


class _FeedClient(WebSocketClientProtocol):
    """Keeps the feed's messages; each waiter gets the next one."""

    factory: _FeedClientFactory

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received.append(json.loads(payload))
        waiters, self.factory.waiters = self.factory.waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(reason))
        self.factory.closed.callback(None)


class _FeedClientFactory(WebSocketClientFactory):
    protocol = _FeedClient  # type: ignore[assignment]

    def __init__(self, url: str, origin: str) -> None:
        super().__init__(url, origin=origin)
        self.opened: Deferred[_FeedClient] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.received: list[dict[str, Any]] = []
        self.waiters: list[Deferred[None]] = []

    async def message(self, index: int) -> dict[str, Any]:
        while len(self.received) <= index:
            waiter: Deferred[None] = Deferred()
            self.waiters.append(waiter)
            await waiter.addTimeout(10, reactor)
        return self.received[index]


class _RawHTTP(Protocol):
    """Sends one request and keeps the whole answer until the server closes or headers end."""

    def __init__(self, request: bytes, done: Deferred[bytes]) -> None:
        self.request, self.done, self.data = request, done, b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data and not self.done.called:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        if not self.done.called:
            self.done.callback(self.data)


class SiteTests(TestCase):
    """The site on a real loopback port: HTTP resources and the WebSocket feed."""

    def setUp(self) -> None:
        self.source = FakeClusterSource()
        self.metrics = Metrics()
        self.site = make_site(
            reactor, self.source, self.metrics, ["http://127.0.0.1:1"], push_interval=0.1
        )
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.number = self.port.getHost().port
        self.origin = f"http://127.0.0.1:{self.number}"
        self.site.feed.set_allowed_origins([self.origin])
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.number}"

    async def get(self, path: str) -> tuple[int, dict[bytes, list[bytes]], bytes]:
        response = await Agent(reactor).request(b"GET", (self.base + path).encode("ascii"))
        body = await readBody(response)
        return response.code, dict(response.headers.getAllRawHeaders()), body

    async def test_healthz(self) -> None:
        """/healthz answers 200 with JSON naming the node, its role and the leader."""
        code, headers, body = await self.get("/healthz")
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"Content-Type"], [b"application/json"])
        self.assertEqual(
            json.loads(body),
            {"ok": True, "node": "meta-1", "role": "leader", "leader": "meta-1",
             "leader_http_address": "127.0.0.1:9101"},
        )

    async def test_metrics_move(self) -> None:
        """/metrics parses as Prometheus text and its counters move with puts and reads."""
        code, headers, body = await self.get("/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(headers[b"Content-Type"][0].startswith(b"text/plain"))
        self.assertEqual(sample(body.decode(), "dogfs_put_bytes_total"), 0.0)
        self.metrics.record_commit("put", 3 << 20)
        self.metrics.record_read(1 << 20)
        _, _, body = await self.get("/metrics")
        text = body.decode()
        self.assertEqual(sample(text, "dogfs_put_bytes_total"), float(3 << 20))
        self.assertEqual(sample(text, "dogfs_get_ops_total"), 1.0)
        self.assertEqual(sample(text, "dogfs_chunk_servers", state="alive"), 6.0)

    async def test_page_and_static(self) -> None:
        """/ is the page; its script and style sheet come from the package, with a strict CSP."""
        code, headers, body = await self.get("/")
        self.assertEqual(code, 200)
        self.assertIn(b'<script src="/static/app.js"', body)
        self.assertIn(b"default-src 'self'", headers[b"Content-Security-Policy"][0])
        for name, kind in (("app.js", b"javascript"), ("style.css", b"text/css")):
            code, headers, body = await self.get(f"/static/{name}")
            self.assertEqual(code, 200)
            self.assertIn(kind, headers[b"Content-Type"][0])
            self.assertEqual(body, (STATIC_DIR / name).read_bytes())
        code, _, _ = await self.get("/static/nope.js")
        self.assertEqual(code, 404)

    async def test_websocket_snapshot_then_event(self) -> None:
        """A page from an allowed origin gets the snapshot first, then events as they happen."""
        factory = _FeedClientFactory(f"ws://127.0.0.1:{self.number}/ws", origin=self.origin)
        reactor.connectTCP("127.0.0.1", self.number, factory)
        client = await factory.opened.addTimeout(10, reactor)
        first = await factory.message(0)
        self.assertEqual(first["type"], "snapshot")
        self.assertEqual([m["id"] for m in first["meta"]], ["meta-1", "meta-2", "meta-3"])
        self.source.emit({"kind": "chunk_state", "message": "chunk-4 died", "node": "chunk-4"})
        self.source.chunk("chunk-4")["state"] = "dead"
        seen: list[dict[str, Any]] = []
        index = 1
        while not any(m.get("type") == "delta" for m in seen):
            seen.append(await factory.message(index))
            index += 1
        event = next(m for m in seen if m["type"] == "event")
        self.assertEqual(event["event"]["message"], "chunk-4 died")
        delta = next(m for m in seen if m["type"] == "delta")
        self.assertEqual({c["id"]: c["state"] for c in delta["chunks"]}["chunk-4"], "dead")
        client.sendClose()
        await factory.closed.addTimeout(10, reactor)

    async def test_foreign_origin_refused(self) -> None:
        """A WebSocket handshake from another site's page (foreign Origin) gets 403, no feed."""
        done: Deferred[bytes] = Deferred()
        request = (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{self.number}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "Origin: http://evil.example:80\r\n\r\n"
        ).encode("ascii")
        factory = ClientFactory.forProtocol(lambda: _RawHTTP(request, done))
        reactor.connectTCP("127.0.0.1", self.number, factory)
        answer = await done.addTimeout(10, reactor)
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer[:200])
        self.assertNotIn(b"101 Switching", answer)
        self.assertEqual(self.site.feed.clients, [])
