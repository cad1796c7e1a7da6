# -*- test-case-name: tests.test_web -*-
"""A cluster source made of plain data: for tests and for the screenshot script's demo.

L{FakeClusterSource} implements L{IClusterSource} over a status dict that the caller edits
(L{FakeClusterSource.set_chunk_state} and friends), and emits the events a real metadata
node would. Imports L{dogfs.web.source} only.
"""

from __future__ import annotations

import copy
from typing import Any

from zope.interface import implementer

from dogfs.web.source import EventCallback, IClusterSource, Unsubscribe

GiB = 1 << 30


def demo_status(meta: int = 3, chunks: int = 6, http_base: int = 9100) -> dict[str, Any]:
    """A plausible cluster: C{meta} members (meta-1 leads) and C{chunks} alive chunk servers."""
    members = [
        {
            "id": f"meta-{i}",
            "address": f"127.0.0.1:{9000 + i}",
            "http_address": f"127.0.0.1:{http_base + i}",
            "role": "leader" if i == 1 else "follower",
            "term": 3,
            "commit_index": 1207,
            "applied_index": 1207 if i == 1 else 1205,
            "last_contact_s": 0.0 if i == 1 else 0.1 * i,
            # A member reports its own durable log writes only (meta-1 answers here).
            **({"raft_writes": 96, "log_version": 1} if i == 1 else {}),
        }
        for i in range(1, meta + 1)
    ]
    servers = [
        {
            "id": f"chunk-{i}",
            "address": f"127.0.0.1:{9200 + i}",
            "state": "alive",
            "capacity_bytes": 64 * GiB,
            "used_bytes": (9 + 3 * i) * GiB,
            "shards": 1800 + 37 * i,
            "last_heartbeat_s": 0.4,
            "load": {"put_bytes_s": 0.0, "get_bytes_s": 0.0},
            "domain": f"rack-{(i - 1) % 3 + 1}",
        }
        for i in range(1, chunks + 1)
    ]
    return {
        "cluster": {
            "default_ec": "RS-4-2",
            "cell_size": 1 << 20,
            "block_size": 64 << 20,
            "leader": "meta-1",
            "log_version": 1,
        },
        "meta": members,
        "chunks": servers,
        "namespace": {
            "files": 1342,
            "dirs": 57,
            "bytes": 96 * GiB,
            "bytes_on_disk": 144 * GiB,
            "block_groups": 1912,
            "at_risk": {"0": 0, "1": 0, "2": 1912},
        },
    }


@implementer(IClusterSource)
class FakeClusterSource:
    """An L{IClusterSource} over a status dict that tests change at will."""

    def __init__(
        self,
        status: dict[str, Any] | None = None,
        node_id: str = "meta-1",
        leader: bool = True,
        leader_http: str | None = None,
    ) -> None:
        """Serve C{status} (default L{demo_status}) as node C{node_id}."""
        self.status = status if status is not None else demo_status()
        self.node_id = node_id
        self.leader = leader
        self.leader_http = leader_http
        self.subscribers: list[EventCallback] = []

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the status, so that callers cannot change ours."""
        return copy.deepcopy(self.status)

    def subscribe(self, callback: EventCallback) -> Unsubscribe:
        """Add C{callback} to the subscribers; the result removes it."""
        self.subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self.subscribers:
                self.subscribers.remove(callback)

        return unsubscribe

    def is_leader(self) -> bool:
        """What the test said."""
        return self.leader

    def leader_http_address(self) -> str | None:
        """The leader's http_address from the status, unless a test set one."""
        if self.leader_http is not None:
            return self.leader_http
        leader = self.status["cluster"].get("leader")
        for member in self.status["meta"]:
            if member["id"] == leader:
                return str(member.get("http_address"))
        return None

    def emit(self, event: dict[str, Any]) -> None:
        """Push C{event} to every subscriber."""
        for callback in list(self.subscribers):
            callback(dict(event))

    def chunk(self, node_id: str) -> dict[str, Any]:
        """The status entry of chunk server C{node_id}."""
        return next(c for c in self.status["chunks"] if c["id"] == node_id)

    def set_chunk_state(self, node_id: str, state: str, heartbeat_age: float | None = None) -> None:
        """Mark a chunk server C{"alive"}, C{"dead"} or C{"unknown"} and announce it."""
        entry = self.chunk(node_id)
        previous, entry["state"] = entry["state"], state
        if heartbeat_age is not None:
            entry["last_heartbeat_s"] = heartbeat_age
        if previous != state:
            level = "error" if state == "dead" else "info"
            verb = {"dead": "died", "alive": "is back"}.get(state, f"is {state}")
            self.emit(
                {"kind": "chunk_state", "node": node_id, "level": level,
                 "message": f"{node_id} {verb}", "state": state}
            )

    def set_leader(self, node_id: str, term: int) -> None:
        """Make C{node_id} the leader in C{term} and announce the election."""
        self.status["cluster"]["leader"] = node_id
        for member in self.status["meta"]:
            member["role"] = "leader" if member["id"] == node_id else "follower"
            member["term"] = term
        self.leader = node_id == self.node_id
        self.emit(
            {"kind": "election", "node": node_id, "level": "warn",
             "message": f"{node_id} elected leader for term {term}"}
        )
