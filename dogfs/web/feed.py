# -*- test-case-name: tests.test_web -*-
"""The dashboard's live feed: a WebSocket that pushes the cluster's state to each page.

On connect a page gets one full C{snapshot} message; after that, at most every
C{push_interval} seconds, a C{delta} with the top-level sections that changed, and an
C{event} message as each cluster event happens. docs/dashboard.md describes the messages.

The feed also keeps what a snapshot of the source does not: the rolling throughput history
(L{ThroughputHistory}, sampled every second from the L{Metrics} counters and the chunk
servers' heartbeat load) and the recent events (L{EventLog}), so that a page opened now sees
the last few minutes. Timers run on the injected clock: the sampler while the feed is
started (L{Feed.start}, called when the site starts listening), the push loop only while at
least one page is connected.

Imports L{dogfs.web.source} and L{dogfs.web.metrics}.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from attrs import define, field
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dogfs.web.metrics import Metrics
from dogfs.web.source import IClusterSource, Unsubscribe

log = Logger()

#: The page's node states (C{data-state}); chunk "alive" is shown as "running".
CHUNK_STATES = {"alive": "running", "dead": "dead", "unknown": "unknown", "stopped": "stopped"}
#: Roles that say a metadata member is not there.
DOWN_ROLES = {"dead": "dead", "unreachable": "dead", "down": "dead", "stopped": "stopped"}
#: Sections of the status dict that the page renders; others are passed through as they are.
SECTIONS = ("node", "cluster", "meta", "chunks", "namespace")
#: The load keys a chunk server's heartbeat may carry (bytes and operations per second).
LOAD_KEYS = ("put_bytes_s", "get_bytes_s", "put_ops_s", "get_ops_s")


def chunk_state(entry: dict[str, Any]) -> str:
    """The page's state for a chunk server entry of the status dict."""
    return CHUNK_STATES.get(str(entry.get("state", "unknown")), str(entry.get("state")))


def meta_state(
    entry: dict[str, Any], me: str, dead_after: float, reporter_leads: bool = True
) -> str:
    """The page's state for a metadata member: explicit C{state}, a down role, or silence.

    A member the reporting node has not heard from in C{dead_after} seconds is "dead" when
    the reporter leads (a leader hears from every member) or the member is the leader (a
    follower hears from its leader); followers do not talk to each other, so a follower's
    silence about another follower means nothing. The reporter itself is always "running".
    """
    if entry.get("id") == me:
        return "running"
    if "state" in entry and entry["state"] is not None:
        return CHUNK_STATES.get(str(entry["state"]), str(entry["state"]))
    role = str(entry.get("role", ""))
    if role in DOWN_ROLES:
        return DOWN_ROLES[role]
    contact = entry.get("last_contact_s")
    heard_from = reporter_leads or role == "leader"
    if heard_from and isinstance(contact, int | float) and contact > dead_after:
        return "dead"
    if not role or role == "unknown":
        return "unknown"
    return "running"


def page_status(
    status: dict[str, Any], node: dict[str, Any], dead_after: float
) -> dict[str, Any]:
    """The status dict with the page's C{state} added to every node and C{node} (who reports).

    Nothing of C{status} is changed in place.
    """
    out = {k: v for k, v in status.items() if k not in ("throughput", "events")}
    out["node"] = node
    out["meta"] = [
        {
            **m,
            "kind": "meta",
            "state": meta_state(m, node["id"], dead_after, bool(node.get("is_leader", True))),
        }
        for m in status.get("meta") or []
    ]
    out["chunks"] = [
        {**c, "kind": "chunk", "source_state": c.get("state"), "state": chunk_state(c)}
        for c in status.get("chunks") or []
    ]
    out.setdefault("cluster", {})
    out.setdefault("namespace", {})
    return out


@define
class ThroughputHistory:
    """Cluster throughput over the last C{window_s} seconds, one point per sample.

    Operations per second come from the L{Metrics} counters (what the metadata node sees);
    bytes per second from the sum of the chunk servers' heartbeat load when any reports
    C{put_bytes_s}/C{get_bytes_s}, else from the counters too.
    """

    window_s: float = 300.0
    points: deque[dict[str, float]] = field(factory=deque)
    _last: tuple[float, dict[str, float]] | None = None

    def sample(
        self, now: float, totals: dict[str, float], chunks: list[dict[str, Any]]
    ) -> dict[str, float] | None:
        """Add the point for the interval since the last sample; None for the first sample."""
        last, self._last = self._last, (now, dict(totals))
        if last is None or now <= last[0]:
            return None
        elapsed = now - last[0]
        rates = {
            f"{name}_s": max(0.0, (totals.get(name, 0.0) - last[1].get(name, 0.0)) / elapsed)
            for name in ("put_bytes", "get_bytes", "put_ops", "get_ops")
        }
        loads = [c.get("load") or {} for c in chunks if c.get("state") == "alive"]
        for key in ("put_bytes_s", "get_bytes_s"):
            reported = [float(load[key]) for load in loads if isinstance(load.get(key), int | float)]
            if reported:
                rates[key] = sum(reported)
        point = {"t": round(now, 3), **{k: round(v, 3) for k, v in rates.items()}}
        self.points.append(point)
        while self.points and self.points[0]["t"] < now - self.window_s:
            self.points.popleft()
        return point

    def since(self, t: float) -> list[dict[str, float]]:
        """The points taken after time C{t}."""
        return [p for p in self.points if p["t"] > t]


@define
class EventLog:
    """The last C{limit} cluster events, each numbered (C{seq}) and stamped (C{t})."""

    limit: int = 200
    events: deque[dict[str, Any]] = field(factory=deque)
    seq: int = 0

    def add(self, event: dict[str, Any], now: float) -> dict[str, Any]:
        """Store a copy of C{event} with C{seq}, C{t} and C{level} filled in; return it."""
        self.seq += 1
        stored = {"level": "info", "kind": "event", "message": "", **event, "seq": self.seq}
        stored.setdefault("t", now)
        if stored.get("t") is None:
            stored["t"] = now
        self.events.append(stored)
        while len(self.events) > self.limit:
            self.events.popleft()
        return stored


class FeedProtocol(WebSocketServerProtocol):
    """One page's WebSocket: registered with the L{Feed} while open; what it sends is ignored."""

    factory: Feed

    def failHandshake(
        self, reason: str, code: int = 400, responseHeaders: Any = None
    ) -> None:
        """Refuse a handshake; a page from a foreign origin is told 403 Forbidden, not 400."""
        if "origin" in reason and "not allowed" in reason:
            code = 403
        super().failHandshake(reason, code, responseHeaders)

    def onOpen(self) -> None:
        """Send the full snapshot and start receiving pushes."""
        self.factory.add_client(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Pages have nothing to say; a message is ignored (the feed is read-only)."""

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        """Stop pushing to this page."""
        self.factory.remove_client(self)

    def send_json(self, message: dict[str, Any]) -> None:
        """Send one message as a JSON text frame, unless the connection is already closing."""
        # A page that is going away is between its close frame and onClose: nothing to say.
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        data = json.dumps(message, separators=(",", ":"), default=str).encode("utf-8")
        self.sendMessage(data, isBinary=False)


class Feed(WebSocketServerFactory):
    """The WebSocket factory: builds snapshots and deltas and pushes them to every page."""

    protocol = FeedProtocol  # type: ignore[assignment]

    def __init__(
        self,
        clock: IReactorTime,
        source: IClusterSource,
        metrics: Metrics,
        allowed_origins: list[str],
        *,
        push_interval: float = 0.5,
        sample_interval: float = 1.0,
        window_s: float = 300.0,
        meta_dead_after: float = 5.0,
    ) -> None:
        """Set up the feed; nothing runs until L{start} and the first page."""
        super().__init__()
        self.set_allowed_origins(allowed_origins)
        # Pages send nothing of use: a small cap keeps a hostile client from filling memory.
        self.setProtocolOptions(maxFramePayloadSize=65536, maxMessagePayloadSize=65536)
        self.clock = clock
        self.source = source
        self.metrics = metrics
        self.push_interval = push_interval
        self.meta_dead_after = meta_dead_after
        self.history = ThroughputHistory(window_s=window_s)
        self.events = EventLog()
        self.clients: list[FeedProtocol] = []
        self._sample_interval = sample_interval
        self._sampler = LoopingCall(self._sample)
        self._sampler.clock = clock
        self._pusher = LoopingCall(self._push)
        self._pusher.clock = clock
        self._unsubscribe: Unsubscribe | None = None
        self._sent: dict[str, str] = {}
        self._sent_point_t = 0.0
        self._seq = 0

    def set_allowed_origins(self, allowed_origins: list[str]) -> None:
        """Accept pages from these C{"scheme://host:port"} origins only (never C{"*"}).

        A connection with another C{Origin} is refused at the handshake (HTTP 403). Clients
        that send no C{Origin} at all (scripts, not browsers) are let in: the check is there
        to stop other sites' pages from reading the feed through a visitor's browser.
        """
        if not allowed_origins or any("*" in o for o in allowed_origins):
            raise ValueError("allowed_origins must list the dashboard's origins, never '*'")
        self.setProtocolOptions(allowedOrigins=list(allowed_origins), allowNullOrigin=False)

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to the source's events and start sampling throughput."""
        if self._unsubscribe is None:
            self._unsubscribe = self.source.subscribe(self.on_event)
        if not self._sampler.running:
            self._sampler.start(self._sample_interval, now=True).addErrback(
                lambda f: log.failure("throughput sampler stopped", f)
            )

    def stop(self) -> None:
        """Unsubscribe, stop every timer and close the pages' connections."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._sampler.running:
            self._sampler.stop()
        if self._pusher.running:
            self._pusher.stop()
        for client in list(self.clients):
            client.sendClose()
        self.clients.clear()

    def add_client(self, client: FeedProtocol) -> None:
        """Send C{client} a full snapshot and include it in the pushes from now on."""
        self.clients.append(client)
        message = self.snapshot_message()
        client.send_json(message)
        if not self._pusher.running:
            self._remember(message)
            self._pusher.start(self.push_interval, now=False).addErrback(
                lambda f: log.failure("dashboard push loop stopped", f)
            )

    def remove_client(self, client: FeedProtocol) -> None:
        """Forget C{client}; with no page left, stop the push loop."""
        if client in self.clients:
            self.clients.remove(client)
        if not self.clients and self._pusher.running:
            self._pusher.stop()

    # -- messages -----------------------------------------------------------------------

    def _status(self) -> dict[str, Any]:
        status = self.source.snapshot()
        leader_id = (status.get("cluster") or {}).get("leader")
        is_leader = bool(self.source.is_leader())
        node = {
            "id": self.source.node_id,
            "is_leader": is_leader,
            "leader": leader_id,
            "leader_http_address": self.source.leader_http_address(),
            # A follower's registry of chunk servers is not kept live: say so on the page.
            "stale": not is_leader,
        }
        return page_status(status, node, self.meta_dead_after)

    def snapshot_message(self) -> dict[str, Any]:
        """The full state: every section, the throughput history and the recent events."""
        self._seq += 1
        return {
            "type": "snapshot",
            "seq": self._seq,
            "time": self.clock.seconds(),
            **self._status(),
            "throughput": {
                "window_s": self.history.window_s,
                "interval_s": self._sample_interval,
                "points": list(self.history.points),
            },
            "events": list(self.events.events),
        }

    def delta_message(self) -> dict[str, Any] | None:
        """The sections that changed since the last push and the new throughput points."""
        status = self._status()
        changed = {
            key: value
            for key, value in status.items()
            if self._sent.get(key) != _canonical(value)
        }
        points = self.history.since(self._sent_point_t)
        if not changed and not points:
            return None
        self._seq += 1
        message: dict[str, Any] = {
            "type": "delta",
            "seq": self._seq,
            "time": self.clock.seconds(),
            **changed,
        }
        if points:
            message["throughput_points"] = points
        return message

    def _remember(self, message: dict[str, Any]) -> None:
        for key, value in message.items():
            if key not in ("type", "seq", "time", "throughput", "throughput_points", "events"):
                self._sent[key] = _canonical(value)
        points = message.get("throughput_points") or (message.get("throughput") or {}).get(
            "points"
        )
        if points:
            self._sent_point_t = max(self._sent_point_t, max(p["t"] for p in points))

    def broadcast(self, message: dict[str, Any]) -> None:
        """Send C{message} to every connected page."""
        for client in list(self.clients):
            try:
                client.send_json(message)
            except Exception:
                # One broken page must not stop the others' pushes.
                log.failure("pushing to a dashboard page failed")
                self.remove_client(client)

    def _push(self) -> None:
        try:
            message = self.delta_message()
        except Exception:
            log.failure("building the dashboard delta failed")
            return
        if message is not None:
            self._remember(message)
            self.broadcast(message)

    def _sample(self) -> None:
        try:
            chunks = self.source.snapshot().get("chunks") or []
            self.history.sample(self.clock.seconds(), self.metrics.totals(), chunks)
        except Exception:
            log.failure("sampling throughput failed")

    def on_event(self, event: dict[str, Any]) -> None:
        """Store a cluster event and push it to every page at once."""
        stored = self.events.add(dict(event), self.clock.seconds())
        self.broadcast({"type": "event", "event": stored})


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
