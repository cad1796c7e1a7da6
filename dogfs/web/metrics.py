# -*- test-case-name: tests.test_web -*-
"""Prometheus metrics of a metadata node, on a registry of its own.

L{Metrics} owns a C{CollectorRegistry} (never the global one, so that several nodes in one
process, and tests, stay apart). The meta service records what passes through it: each
metadata commit (L{Metrics.record_commit}), each file read it serves a block map for
(L{Metrics.record_read}) and each refused write (L{Metrics.record_refused}). Gauges
(chunk servers by state, Raft term and indexes, namespace totals, block groups at risk) are
read from the cluster snapshot at scrape time, so they are never stale.

Data bytes flow between clients and chunk servers, not through the metadata node: the byte
counters here count the sizes of files committed and opened for reading, and the live
throughput of the dashboard adds the chunk servers' own heartbeat load (see
L{dogfs.web.feed.ThroughputHistory}).

Imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.logger import Logger

log = Logger()

SnapshotProvider = Callable[[], dict[str, Any]]

#: Commands whose commit stores a new file version: they count as PUTs (compared lower-case,
#: without underscores, so "CommitFile" and "commit_file" both match).
PUT_OPS = frozenset({"put", "commit", "commitfile"})


class Metrics:
    """The counters a metadata node increments, and gauges read from its snapshot.

    @ivar registry: the node's own C{CollectorRegistry}; serve it with L{Metrics.render}.
    """

    def __init__(self, snapshot: SnapshotProvider | None = None, node_id: str | None = None) -> None:
        """Create the registry and counters; C{snapshot} feeds the gauges (see L{bind})."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.node_id = node_id
        self._snapshot = snapshot
        self.put_bytes = Counter(
            "dogfs_put_bytes", "Bytes of files committed (PUT).", registry=self.registry
        )
        self.get_bytes = Counter(
            "dogfs_get_bytes", "Bytes of files opened for reading (GET).", registry=self.registry
        )
        self.put_ops = Counter("dogfs_put_ops", "Files committed (PUT).", registry=self.registry)
        self.get_ops = Counter(
            "dogfs_get_ops", "Files opened for reading (GET).", registry=self.registry
        )
        self.meta_commands = Counter(
            "dogfs_meta_commands",
            "Metadata commands committed through Raft, by operation.",
            ["op"],
            registry=self.registry,
        )
        self.writes_refused = Counter(
            "dogfs_writes_refused",
            "Writes refused (no quorum, not leader, no space, ...), by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(self))

    def bind(self, snapshot: SnapshotProvider, node_id: str | None = None) -> None:
        """Read gauges from C{snapshot} from now on (C{make_site} binds the cluster source)."""
        self._snapshot = snapshot
        if node_id is not None:
            self.node_id = node_id

    def record_commit(self, op: str, size: int = 0) -> None:
        """Count one committed metadata command; a PUT (see L{PUT_OPS}) adds C{size} bytes."""
        self.meta_commands.labels(op=op).inc()
        if op.lower().replace("_", "") in PUT_OPS:
            self.put_ops.inc()
            if size > 0:
                self.put_bytes.inc(size)

    def record_read(self, size: int) -> None:
        """Count one file opened for reading (its block map served), of C{size} bytes."""
        self.get_ops.inc()
        if size > 0:
            self.get_bytes.inc(size)

    def record_refused(self, reason: str) -> None:
        """Count one write refused, e.g. C{reason="no_quorum"} or C{"not_leader"}."""
        self.writes_refused.labels(reason=reason).inc()

    def totals(self) -> dict[str, float]:
        """The four client counters now: put/get bytes and ops (the throughput sampler reads it)."""
        return {
            name: self.registry.get_sample_value(f"dogfs_{name}_total") or 0.0
            for name in ("put_bytes", "get_bytes", "put_ops", "get_ops")
        }

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any] | None:
        """The bound snapshot, or None if unbound; an error in the source is not a scrape error."""
        if self._snapshot is None:
            return None
        try:
            return self._snapshot()
        except Exception:
            log.failure("cluster snapshot failed during a metrics scrape")
            return None


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


class _SnapshotCollector(Collector):
    """Gauges computed from the cluster snapshot when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        # Describing nothing keeps registration from calling collect() (and the source) early.
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self._metrics.snapshot()
        if snap is None:
            return
        chunks = snap.get("chunks") or []
        by_state = GaugeMetricFamily(
            "dogfs_chunk_servers", "Chunk servers by state, as this node sees them.", labels=["state"]
        )
        counts = {"alive": 0, "dead": 0, "unknown": 0}
        for chunk in chunks:
            state = str(chunk.get("state", "unknown"))
            counts[state] = counts.get(state, 0) + 1
        for state, count in sorted(counts.items()):
            by_state.add_metric([state], count)
        yield by_state
        capacity = GaugeMetricFamily(
            "dogfs_chunk_server_capacity_bytes", "Capacity of each chunk server.", labels=["node"]
        )
        used = GaugeMetricFamily(
            "dogfs_chunk_server_used_bytes", "Bytes used on each chunk server.", labels=["node"]
        )
        shards = GaugeMetricFamily(
            "dogfs_chunk_server_shards", "Shards held by each chunk server.", labels=["node"]
        )
        for chunk in chunks:
            node = str(chunk.get("id", "?"))
            capacity.add_metric([node], _num(chunk.get("capacity_bytes")))
            used.add_metric([node], _num(chunk.get("used_bytes")))
            shards.add_metric([node], _num(chunk.get("shards")))
        yield capacity
        yield used
        yield shards

        members = snap.get("meta") or []
        me = next((m for m in members if m.get("id") == self._metrics.node_id), None)
        leader = (snap.get("cluster") or {}).get("leader")
        yield GaugeMetricFamily(
            "dogfs_meta_is_leader",
            "1 if this metadata node is the Raft leader.",
            value=1.0 if leader is not None and leader == self._metrics.node_id else 0.0,
        )
        yield GaugeMetricFamily(
            "dogfs_meta_members", "Metadata members this node knows of.", value=len(members)
        )
        if me is not None:
            for key, help_text in (
                ("term", "Raft term of this metadata node."),
                ("commit_index", "Raft commit index of this metadata node."),
                ("applied_index", "Raft applied index of this metadata node."),
            ):
                yield GaugeMetricFamily(f"dogfs_raft_{key}", help_text, value=_num(me.get(key)))
            yield GaugeMetricFamily(
                "dogfs_meta_log_version",
                "The metadata log version this node's release applies (rolling upgrades: "
                "docs/operations.md).",
                value=_num(me.get("log_version")),
            )
            yield GaugeMetricFamily(
                "dogfs_meta_group_log_version",
                "The log version this node's metadata group uses; below dogfs_meta_log_version "
                "while a member of an older release is left.",
                value=_num((snap.get("cluster") or {}).get("log_version")),
            )
            yield GaugeMetricFamily(
                "dogfs_raft_log_writes",
                "Durable Raft log writes (each one fsync) by this metadata node since it started: "
                "entries written over it is the group-commit factor.",
                value=_num(me.get("raft_writes")),
            )

        namespace = snap.get("namespace") or {}
        for key, name, help_text in (
            ("files", "dogfs_files", "Files in the namespace."),
            ("dirs", "dogfs_dirs", "Directories in the namespace."),
            ("bytes", "dogfs_bytes_stored", "Bytes of file data stored (logical)."),
            ("bytes_on_disk", "dogfs_bytes_on_disk", "Bytes on chunk-server disks, parity included."),
            ("block_groups", "dogfs_block_groups", "Block groups in the namespace."),
        ):
            yield GaugeMetricFamily(name, help_text, value=_num(namespace.get(key)))
        at_risk = GaugeMetricFamily(
            "dogfs_block_groups_at_risk",
            "Block groups by how many more chunk-server losses they survive.",
            labels=["survivable_losses"],
        )
        for level, count in sorted(
            (namespace.get("at_risk") or {}).items(), key=lambda kv: _num(kv[0])
        ):
            at_risk.add_metric([str(level)], _num(count))
        yield at_risk
