# -*- test-case-name: tests.test_registry -*-
"""The chunk-server liveness registry: soft state the metadata leader keeps from heartbeats.

Which chunk servers are alive, how full they are and what they report lives here, in
memory, on the leader only; the persistent list of registered servers (their ids, addresses
and domains) is in the namespace state. A new leader starts with every known server
"unknown" and waits C{grace_after_start} before declaring anyone dead, so that a leader change
does not set off a storm of repairs. Time comes from an injected C{IReactorTime}.

Imports L{dogfs.meta.placement} (for L{ChunkServerLoad}) only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from attrs import define, field, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dogfs.meta.placement import ChunkServerLoad

log = Logger()

ALIVE = "alive"
DEAD = "dead"
UNKNOWN = "unknown"

ChangeListener = Callable[[str, str, str], None]


@frozen
class ChunkServerView:
    """One chunk server as the dashboard and C{cluster status} show it.

    C{last_heartbeat_age} is seconds since its last heartbeat, None if none since this
    registry started.
    """

    node_id: str
    address: str
    state: str
    last_heartbeat_age: float | None
    capacity: int
    used: int
    shards: int
    load: dict[str, Any]
    domain: str | None = None


@define
class _Entry:
    node_id: str
    address: str
    domain: str | None = None
    last_heartbeat: float | None = None
    capacity: int = 0
    used: int = 0
    shards: int = 0
    load: dict[str, Any] = field(factory=dict)
    state: str = UNKNOWN


class ChunkServerRegistry:
    """Liveness of chunk servers from their heartbeats.

    A server is "alive" from a heartbeat until C{dead_after} seconds pass without one, then
    "dead" (it comes back to "alive" with its next heartbeat). A server that is not alive is
    "unknown", not dead, until C{max(grace_after_start, dead_after)} seconds have passed since
    L{start}: a new leader declares nobody dead on the strength of silence it has not itself
    observed. That covers servers never heard from and servers whose last heartbeat (relayed
    by the previous leader) is old because they had nobody to report to. Listeners added with L{on_change}
    hear every transition, from L{heartbeat} or from the periodic L{check} that L{start} runs
    every C{check_interval} seconds (default: a quarter of C{dead_after}).
    """

    def __init__(
        self,
        clock: IReactorTime,
        dead_after: float,
        grace_after_start: float = 0,
        check_interval: float | None = None,
    ) -> None:
        self.clock = clock
        self.dead_after = dead_after
        self.grace_after_start = grace_after_start
        self.check_interval = check_interval if check_interval is not None else dead_after / 4
        self._entries: dict[str, _Entry] = {}
        self._listeners: list[ChangeListener] = []
        self._started_at = self._now()
        self._loop: LoopingCall | None = None

    def _now(self) -> float:
        # zope interfaces declare methods without self, which mypy cannot see through.
        return float(self.clock.seconds())  # type: ignore[misc]

    # --- lifecycle ---

    def start(self) -> None:
        """Start the grace period now and check liveness periodically."""
        if self._loop is not None:
            return
        self._started_at = self._now()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        d = self._loop.start(self.check_interval, now=False)
        d.addErrback(lambda f: log.failure("Chunk-server liveness check stopped", f))

    def stop(self) -> None:
        """Stop the periodic checks (the soft state is kept)."""
        if self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()

    # --- input ---

    def known(self, node_id: str, address: str, domain: str | None = None) -> None:
        """Declare a server from the persistent registry (state "unknown" until heard from)."""
        entry = self._entries.get(node_id)
        if entry is None:
            self._entries[node_id] = _Entry(node_id, address, domain)
        else:
            entry.address = address
            entry.domain = domain

    def known_all(self, records: Iterable[Any]) -> None:
        """Declare every record (anything with node_id, address, domain) via L{known}."""
        for record in records:
            self.known(record.node_id, record.address, getattr(record, "domain", None))

    def known_only(self, records: Iterable[Any]) -> None:
        """L{known_all}, and forget every server that is not among ``records``: a new leader
        does so with the persistent registry, since a server removed under the leader before
        was forgotten only there (L{forget}), while the heartbeats relayed before its removal
        left it here. A server heard but not yet registered is heard again within a heartbeat."""
        records = list(records)
        keep = {record.node_id for record in records}
        for node_id in [n for n in self._entries if n not in keep]:
            self.forget(node_id)
        self.known_all(records)

    def forget(self, node_id: str) -> None:
        """Drop a server entirely (it was removed from the cluster); no change is reported."""
        self._entries.pop(node_id, None)

    def heartbeat(
        self,
        node_id: str,
        address: str,
        capacity_bytes: int,
        used_bytes: int,
        shards: int,
        load: dict[str, Any],
        domain: str | None = None,
    ) -> None:
        """Record a heartbeat: the server is alive now with this usage and load.

        C{domain}, when given, updates the server's failure domain.
        """
        entry = self._entries.get(node_id)
        if entry is None:
            entry = self._entries[node_id] = _Entry(node_id, address, domain)
        entry.address = address
        if domain is not None:
            entry.domain = domain
        entry.last_heartbeat = self._now()
        entry.capacity = capacity_bytes
        entry.used = used_bytes
        entry.shards = shards
        entry.load = dict(load)
        self._transition(entry, ALIVE)

    def check(self) -> None:
        """Re-evaluate every server's state now and report transitions."""
        now = self._now()
        for node_id in sorted(self._entries):
            entry = self._entries.get(node_id)
            if entry is not None:
                self._transition(entry, self._state_at(entry, now))

    # --- output ---

    def on_change(self, callback: ChangeListener) -> Callable[[], None]:
        """Call C{callback(node_id, old_state, new_state)} on every transition.

        Return a function that removes the listener. A listener that raises is logged, not
        propagated.
        """
        self._listeners.append(callback)

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return remove

    def state(self, node_id: str) -> str | None:
        """The state of one server, or None when it is not known at all."""
        entry = self._entries.get(node_id)
        return None if entry is None else self._state_at(entry, self._now())

    def is_alive(self, node_id: str) -> bool:
        """Whether the server has heartbeated within C{dead_after} seconds."""
        return self.state(node_id) == ALIVE

    def dead_for(self, node_id: str) -> float | None:
        """Seconds a dead server has been silent (since its last heartbeat, or since this
        registry started when it has none); None when it is not dead (alive, unknown, or not
        known at all). Repair waits on this before rebuilding what the server held."""
        entry = self._entries.get(node_id)
        now = self._now()
        if entry is None or self._state_at(entry, now) != DEAD:
            return None
        since = entry.last_heartbeat if entry.last_heartbeat is not None else self._started_at
        return now - since

    def grace_left(self) -> float:
        """Seconds before this registry may call a silent server dead (0 once past)."""
        return max(0.0, self._started_at + max(self.grace_after_start, self.dead_after) - self._now())

    def live(self) -> list[ChunkServerLoad]:
        """The alive servers as the placement planner wants them, sorted by node id."""
        now = self._now()
        return [
            ChunkServerLoad(e.node_id, e.used, e.capacity, e.domain)
            for _, e in sorted(self._entries.items())
            if self._state_at(e, now) == ALIVE
        ]

    def any_unknown(self) -> bool:
        """Whether some known server is "unknown" (not heard from within the grace period)."""
        # Asked for every command on the leader: past the grace period (the usual case) the
        # answer is no without looking at any server.
        now = self._now()
        if now - self._started_at >= max(self.grace_after_start, self.dead_after):
            return False
        return any(self._state_at(e, now) == UNKNOWN for e in self._entries.values())

    def awaiting(self, needed: int) -> bool:
        """Whether fewer than C{needed} servers are alive now but enough may be once the
        "unknown" ones report: a new leader should wait for them rather than refuse."""
        if not self.any_unknown():
            return False
        now = self._now()
        states = [self._state_at(e, now) for e in self._entries.values()]
        alive = states.count(ALIVE)
        return alive < needed <= alive + states.count(UNKNOWN)

    def view(self) -> list[ChunkServerView]:
        """Every known server with its state and last report, sorted by node id."""
        now = self._now()
        return [
            ChunkServerView(
                e.node_id,
                e.address,
                self._state_at(e, now),
                None if e.last_heartbeat is None else now - e.last_heartbeat,
                e.capacity,
                e.used,
                e.shards,
                dict(e.load),
                e.domain,
            )
            for _, e in sorted(self._entries.items())
        ]

    # --- internals ---

    def _state_at(self, entry: _Entry, now: float) -> str:
        if entry.last_heartbeat is not None and now - entry.last_heartbeat <= self.dead_after:
            return ALIVE
        # Silent, but not for a whole grace period (at least one dead_after) since this
        # registry started: it may have had nobody to report to. Not dead yet.
        if now - self._started_at < max(self.grace_after_start, self.dead_after):
            return UNKNOWN
        return DEAD

    def _transition(self, entry: _Entry, new: str) -> None:
        old = entry.state
        if old == new:
            return
        entry.state = new
        for listener in list(self._listeners):
            try:
                listener(entry.node_id, old, new)
            except Exception:
                log.failure(
                    "Listener {listener!r} failed on {node_id} {old} -> {new}",
                    listener=listener,
                    node_id=entry.node_id,
                    old=old,
                    new=new,
                )
