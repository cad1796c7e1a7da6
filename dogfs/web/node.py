# -*- test-case-name: tests.test_web -*-
"""L{MetaNodeSource}: the dashboard's view of a metadata node, made from its callables.

The metadata service builds one from what it already has (its status dict, whether it leads,
the leader's dashboard address) and attaches L{MetaNodeSource.meta_listener} to its handlers'
event listeners and L{MetaNodeSource.chunk_listener} to its chunk-server registry. The source
turns those into the dashboard's events (one sentence each, a burst of refused writes folded
into one line a second) and moves the node's L{Metrics} counters.

Imports L{dogfs.web.metrics} and L{dogfs.web.source}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from dogfs.web.metrics import Metrics
from dogfs.web.source import EventCallback, IClusterSource, Unsubscribe

log = Logger()


@implementer(IClusterSource)
class MetaNodeSource:
    """An L{IClusterSource} over a metadata node's callables, with its own event fan-out."""

    def __init__(
        self,
        clock: IReactorTime,
        node_id: str,
        status: Callable[[], dict[str, Any]],
        is_leader: Callable[[], bool],
        leader_http_address: Callable[[], str | None],
        metrics: Metrics | None = None,
        *,
        fold_seconds: float = 1.0,
    ) -> None:
        """Wrap the node's callables; C{metrics}, when given, is moved by the listeners."""
        self.clock = clock
        self.node_id = node_id
        self._status = status
        self._is_leader = is_leader
        self._leader_http_address = leader_http_address
        self.metrics = metrics
        self.fold_seconds = fold_seconds
        self._subscribers: list[EventCallback] = []
        self._folded: dict[tuple[str, str], tuple[float, int]] = {}
        self._told: dict[str, str] = {}

    def snapshot(self) -> dict[str, Any]:
        """The node's status dict."""
        return self._status()

    def is_leader(self) -> bool:
        """Whether the node leads now."""
        return bool(self._is_leader())

    def leader_http_address(self) -> str | None:
        """The leader's dashboard "host:port", if known."""
        return self._leader_http_address()

    def subscribe(self, callback: EventCallback) -> Unsubscribe:
        """Call C{callback(event)} for each event from now on; the result stops it."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def emit(self, event: dict[str, Any]) -> None:
        """Send C{event} (C{kind}, C{message}, C{level}, ...) to every subscriber now."""
        stored = {"t": self.clock.seconds(), **event}
        for callback in list(self._subscribers):
            try:
                callback(dict(stored))
            except Exception:
                log.failure("dashboard event subscriber failed")

    def event(self, kind: str, message: str, *, level: str = "info", **fields: Any) -> None:
        """Emit one event built from its parts."""
        self.emit({"kind": kind, "message": message, "level": level, **fields})

    # -- listeners the meta service attaches ---------------------------------------------

    def meta_listener(self, kind: str, fields: dict[str, Any]) -> None:
        """For C{MetaHandlers.listeners}: count commits, reads and refusals; log the notable.

        Known kinds: C{commit} (C{path}, C{size}), C{read} (C{path}, C{size}),
        C{write_refused} (C{path}, C{reason}), C{election} or C{leader} (C{node}, C{term}),
        C{chunk_state} (C{node}, C{old}, C{new}: as L{chunk_listener}), C{meta_state}
        (C{node}, C{state}), C{repair} (C{message}, C{level}, C{node}; folded as refusals
        are). Others are logged with their fields.
        """
        size = int(fields.get("size") or 0)
        if kind == "commit":
            if self.metrics is not None:
                self.metrics.record_commit(str(fields.get("op", "put")), size)
            return  # too many to list; the throughput chart shows them
        if kind == "read":
            if self.metrics is not None:
                self.metrics.record_read(size)
            return
        if kind == "write_refused":
            reason = str(fields.get("reason") or "refused")
            code = reason.split(":", 1)[0].strip() or "refused"
            if self.metrics is not None:
                self.metrics.record_refused(code)
            folded = self._fold(kind, code)
            if folded is None:
                return
            path = fields.get("path")
            message = f"write{' of ' + str(path) if path else ''} refused: {reason}"
            if folded:
                message += f" (and {folded} more)"
            self.event(kind, message, level="warn", reason=code)
            return
        if kind in ("election", "leader"):
            node = fields.get("node") or fields.get("leader")
            term = fields.get("term")
            if node:
                text = f"{node} elected leader" + (f" for term {term}" if term is not None else "")
            else:
                text = "no leader" + (f" in term {term}" if term is not None else "")
            self.event("election", text, level="warn", node=node, term=term)
            return
        if kind == "chunk_state":
            self.chunk_listener(
                str(fields.get("node")), str(fields.get("old")), str(fields.get("new"))
            )
            return
        if kind == "repair":
            # A dead server's shards are rebuilt by the thousand: at most one line a second.
            level = str(fields.get("level") or "info")
            folded = self._fold(kind, level)
            if folded is None:
                return
            message = str(fields.get("message") or "repair")
            if folded:
                message += f" (and {folded} more)"
            self.event(kind, message, level=level, node=fields.get("node"))
            return
        if kind == "meta_state":
            node, state = fields.get("node"), fields.get("state")
            level = "error" if state in ("dead", "unreachable") else "info"
            self.event(kind, f"metadata node {node} is {state}", level=level, node=node)
            return
        details = ", ".join(f"{k}={v}" for k, v in sorted(fields.items()))
        self.event(kind, f"{kind}: {details}" if details else kind, **_plain(fields))

    def chunk_listener(self, node_id: str, old: str, new: str) -> None:
        """For C{ChunkServerRegistry.on_change}: a chunk server changed state.

        What an operator needs is told: a server dying, coming back, or first seen alive.
        A change to "unknown" (a new leader not yet heard from it) is not news, nor is a
        state already told (the same change heard through the registry and through the
        handlers' C{chunk_state} event, or "alive" again after a leader change).
        """
        if new == "unknown" or self._told.get(node_id) == new:
            return
        previous = self._told.get(node_id)
        self._told[node_id] = new
        if new == "dead":
            self.event("chunk_state", f"{node_id} died (no heartbeat)", level="error",
                       node=node_id, state=new, previous=old)
        elif new == "alive" and previous == "dead":
            self.event("chunk_state", f"{node_id} is back", node=node_id, state=new, previous=old)
        elif new == "alive":
            self.event("chunk_state", f"{node_id} is alive", node=node_id, state=new, previous=old)
        else:
            self.event("chunk_state", f"{node_id} is {new}", level="warn", node=node_id,
                       state=new, previous=old)

    def _fold(self, kind: str, key: str) -> int | None:
        """None to stay quiet (a like event went out under a second ago), else how many were folded."""
        now = self.clock.seconds()
        last, folded = self._folded.get((kind, key), (float("-inf"), 0))
        if now - last < self.fold_seconds:
            self._folded[(kind, key)] = (last, folded + 1)
            return None
        self._folded[(kind, key)] = (now, 0)
        return folded


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields safe to pass along in an event (no clash with the event's own keys)."""
    return {k: v for k, v in fields.items() if k not in ("kind", "message", "level", "t", "seq")}
