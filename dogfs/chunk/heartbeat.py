# -*- test-case-name: tests.test_chunk_service -*-
"""The chunk server's side of META_PROTOCOL: heartbeats, shard reports, garbage collection.

Every `heartbeat_interval` seconds (on the injected clock) the chunk server sends `Heartbeat`
to the metadata node it believes leads. Connection failures and timeouts move on to the next
configured address; a "not_leader" error naming the leader is followed at once. When the
leader asks (`want_report`) or every `report_interval`, the server sends its shard list in
`ShardReport` batches and deletes the shards the leader says it no longer references, but
only those it has named so for `gc_grace` seconds (a read of a file just replaced still uses
them) and whose file is as old (an upload in flight is not yet referenced). Nothing here ever
stops the loop: failures are logged and retried next beat.

The first heartbeat reply that names the cluster (`HeartbeatReply.cluster_id`) has the id
kept in `CLUSTER_ID_FILE` in the data directory, and sent with every heartbeat and report from
then on. Shards are reported (and so collected) only to a leader naming that same cluster: a
server pointed at another cluster's metadata, whose namespace would call every shard it holds
garbage, is refused by that cluster and reports nothing to it.

The cluster's block key (`HeartbeatReply.block_key`, see dogfs.security.tokens) is kept the
same way, in `BLOCK_KEY_FILE` (readable by the server's user alone), for the server to check
the block token of each upload it takes; a restart has it before the first heartbeat.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dogfs.chunk.server import ShardServer
from dogfs.config import ChunkConfig
from dogfs.security.tokens import valid_block_key
from dogfs.storage.files import replace_file
from dogfs.wire.messages import (
    MAX_DAMAGED,
    Heartbeat,
    HeartbeatReply,
    ShardReport,
    valid_cluster_id,
)
from dogfs.wire.pool import split_address
from dogfs.wire.protocol import Connection, Reply, WireError

log = Logger()

#: Shard ids per ShardReport frame (META_PROTOCOL.md).
REPORT_BATCH = 20_000
#: Errors after which another metadata address may do better. "no_quorum" comes from a
#: member cut off in a minority: a member on the other side may well lead.
_MOVE_ON = frozenset({"unreachable", "connection_closed", "timeout", "bad_address", "no_quorum"})
#: Seconds between repeats of the same complaint in the log.
_COMPLAIN_EVERY = 60.0
#: The file, in the data directory, that keeps the id of the cluster the shards belong to.
CLUSTER_ID_FILE = "cluster_id"
#: The file, in the data directory, that keeps the cluster's block key.
BLOCK_KEY_FILE = "block_key"


def _read_kept(path: str) -> str | None:
    """Blocking: the (short, one-line) text kept at ``path``, or None if there is no file."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(1024).strip()
    except FileNotFoundError:
        return None


def load_cluster_id(path: str) -> str | None:
    """Blocking: the cluster id kept at ``path``; None if there is none yet. A file that does
    not hold a valid id raises ``ValueError``: the server must not guess whose shards it has."""
    text = _read_kept(path)
    if text is None:
        return None
    if not valid_cluster_id(text):
        raise ValueError(
            f"{path} does not hold a cluster id ({text[:80]!r}): restore it, or remove it if "
            "this data directory's shards belong to the cluster its metadata nodes serve"
        )
    return text


def load_block_key(path: str) -> str | None:
    """Blocking: the block key kept at ``path``; None if there is none yet (the first
    heartbeat brings it). A file that does not hold a valid key raises ``ValueError``."""
    text = _read_kept(path)
    if text is None:
        return None
    if not valid_block_key(text):
        raise ValueError(
            f"{path} does not hold a block key: remove it, and the metadata leader's next "
            "heartbeat reply brings the key again"
        )
    return text


class MetaConnections(Protocol):
    """What the heartbeat needs from a connection pool (`dogfs.wire.pool.ConnectionPool`)."""

    def get(self, address: str) -> defer.Deferred[Connection]:
        """An open connection to `address`."""

    def drop(self, address: str) -> None:
        """Forget (close) the connection to `address`."""


class HeartbeatService(Service):
    """Sends heartbeats and shard reports to the metadata leader; collects garbage."""

    def __init__(
        self,
        clock: IReactorTime,
        server: ShardServer,
        config: ChunkConfig,
        connections: MetaConnections,
        *,
        call_timeout: float | None = None,
        report_timeout: float = 30.0,
        report_batch: int = REPORT_BATCH,
    ) -> None:
        """Beat on `clock` for `server`, reaching metadata through `connections`."""
        self._clock: Any = clock
        self.server = server
        self.config = config
        self.connections = connections
        self.call_timeout = (
            call_timeout
            if call_timeout is not None
            else max(1.0, min(5.0, 2 * config.heartbeat_interval))
        )
        self.report_timeout = report_timeout
        self.report_batch = report_batch
        #: The metadata address heartbeats go to now.
        self.current: str = config.meta[0]
        self._index = 0  # position in config.meta to move on from
        self._loop: LoopingCall | None = None
        self._reporting = False
        self._report_due = False
        self._last_report = self._clock.seconds()
        self._reached: str | None = None
        self._complaint: tuple[str, float] | None = None
        #: Successful heartbeats, shard reports, and shards collected (for tests and logs).
        self.beats = 0
        self.reports = 0
        #: Numbers this server's shard reports (every batch of one carries it), from 1.
        self.report_number = 0
        self.collected = 0
        #: The cluster whose shards this server holds (`CLUSTER_ID_FILE`); None until a leader
        #: names one. Set `load_cluster_id` before the service starts.
        self.cluster_id: str | None = None
        self.cluster_id_path = os.path.join(server.store.root, CLUSTER_ID_FILE)
        #: Where the block key is kept (`load_block_key`); the key itself is the server's.
        self.block_key_path = os.path.join(server.store.root, BLOCK_KEY_FILE)
        self._key_waiters: list[defer.Deferred[str | None]] = []
        # When the last reply of this server's cluster was taken in (its key with it).
        self._key_heard: float | None = None

    # --- service ---------------------------------------------------------------------

    def startService(self) -> None:
        """Start beating; the first heartbeat goes out at once."""
        super().startService()
        self._loop = LoopingCall(self.beat)
        self._loop.clock = self._clock
        self._loop.start(self.config.heartbeat_interval, now=True).addErrback(
            lambda f: log.failure("{node}: the heartbeat loop stopped", f, node=self.config.id)
        )

    def stopService(self) -> None:
        """Stop beating (calls in flight fail when the connections close)."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    # --- one beat ----------------------------------------------------------------------

    def beat(self) -> defer.Deferred[None]:
        """Send one heartbeat (and start a shard report if due); never fails.

        The LoopingCall waits for the returned Deferred, so beats never overlap.
        """
        d = defer.Deferred.fromCoroutine(self._beat())
        d.addErrback(self._unexpected, "heartbeat")
        return d

    async def _beat(self) -> None:
        server = self.server
        capacity, used, shards = await server.status()
        heartbeat = Heartbeat(
            node_id=self.config.id,
            address=self.config.address,
            # A configured capacity is a cap: a disk filling with other data still shows.
            capacity_bytes=min(self.config.capacity_bytes, capacity) if self.config.capacity_bytes else capacity,
            used_bytes=used,
            shards=shards,
            load=server.load(),
            domain=self.config.domain or None,
            # "": this server knows cluster ids and keeps none yet (so it is told the id).
            cluster_id=self.cluster_id or "",
            # Only a server that checks tokens (TLS) needs the key; one on plaintext does not
            # ask, so the key never crosses a wire an eavesdropper can read.
            wants_block_key=server.check_tokens,
        )
        reply = await self._call(heartbeat, b"", self.call_timeout)
        if reply is None:
            return
        self.beats += 1
        msg = reply.msg
        if isinstance(msg, HeartbeatReply):
            self._follow_hint(msg.leader_hint)
            if msg.want_report:
                self._report_due = True
            if not await self._same_cluster(msg.cluster_id):
                return
            await self._keep_block_key(msg.block_key)
            self._key_heard = self._clock.seconds()
        if self._clock.seconds() - self._last_report >= self.config.report_interval:
            self._report_due = True
        if self._report_due and not self._reporting:
            self._reporting = True
            d = defer.Deferred.fromCoroutine(self._report())
            d.addErrback(self._unexpected, "shard report")
            d.addBoth(self._report_finished)

    async def _same_cluster(self, named: str | None) -> bool:
        """Whether shards may be reported to the leader that named cluster ``named``.

        The first cluster named is kept (durably, before any report); a server that keeps
        one reports to no leader naming another, or none (a leader that has not applied its
        cluster's id yet, or of a release before ids).
        """
        mine = self.cluster_id
        if named == mine:
            return True
        if named is None:
            self._complain(
                f"the metadata leader {self.current} names no cluster, and this server holds "
                f"the shards of cluster {mine}: no shard report until it does"
            )
            return False
        if mine is not None or not valid_cluster_id(named):
            self._complain(
                f"the metadata leader {self.current} serves cluster {named!r}, and this server "
                f"holds the shards of cluster {mine}: no shard report, nothing collected"
            )
            return False
        try:
            await self.server.executor(replace_file, self.cluster_id_path, named.encode("ascii") + b"\n")
        except OSError as e:
            self._complain(f"cannot keep the cluster id in {self.cluster_id_path}: {e.strerror or e}")
            return False
        self.cluster_id = named
        log.info("{node} holds the shards of cluster {cluster}", node=self.config.id, cluster=named)
        return True

    async def _keep_block_key(self, key: str | None) -> None:
        """Keep the block key the leader of this server's cluster sent (durably first)."""
        server = self.server
        if key is None or key == server.block_key:
            return
        if not valid_block_key(key):
            self._complain(f"the metadata leader {self.current} sent a malformed block key")
            return
        try:
            await server.executor(replace_file, self.block_key_path, key.encode("ascii") + b"\n", 0o600)
        except OSError as e:
            self._complain(f"cannot keep the block key in {self.block_key_path}: {e.strerror or e}")
            return
        server.block_key = key
        log.info("{node} has the cluster's block key", node=self.config.id)

    def fetch_block_key(self, max_age: float = 0.0) -> defer.Deferred[str | None]:
        """One heartbeat now, out of turn, for the block key (`ShardServer.fetch_block_key`):
        fires with the server's key once the reply is in (None if it brought none). Callers
        waiting at the same time share one heartbeat. With ``max_age``, the key as it is if a
        reply brought it within that many seconds (so refusals cannot make heartbeats)."""
        heard = self._key_heard
        if max_age > 0 and heard is not None and self._clock.seconds() - heard < max_age:
            return defer.succeed(self.server.block_key)
        d: defer.Deferred[str | None] = defer.Deferred()
        self._key_waiters.append(d)
        if len(self._key_waiters) == 1:

            def answer(_: object) -> None:
                waiters, self._key_waiters = self._key_waiters, []
                for waiter in waiters:
                    waiter.callback(self.server.block_key)

            self.beat().addBoth(answer)
        return d

    def _follow_hint(self, hint: str | None) -> None:
        """Adopt a leader address the reply names (ignoring node ids and garbage)."""
        if not hint or hint == self.current:
            return
        try:
            split_address(hint)
        except ValueError:
            return
        self.current = hint

    async def _call(self, msg: Any, payload: bytes, timeout: float) -> Reply | None:
        """Send `msg` to the leader, moving between addresses; None (logged) on failure."""
        attempts = len(self.config.meta) + 1
        failure = ""
        for _ in range(attempts):
            address = self.current
            try:
                connection = await self.connections.get(address)
                reply: Reply = await connection.call(msg, payload, timeout=timeout)
            except WireError as e:
                failure = f"{type(msg).__name__} to {address} failed: {e.message}"
                if e.code == "not_leader":
                    leader = e.details.get("leader")
                    if isinstance(leader, str) and leader and leader != address:
                        self.current = leader
                        continue
                    self._move_on()  # no leader known yet: ask another member next time
                    break
                if e.code in _MOVE_ON:
                    if e.code == "timeout":
                        self.connections.drop(address)
                    self._move_on()
                    continue
                break  # unsupported, permission_denied, ...: another address would not help
            if self._reached != address:
                self._reached = address
                self._complaint = None
                log.info("{node} reached metadata node {address}", node=self.config.id, address=address)
            return reply
        self._reached = None
        self._complain(failure)
        return None

    def _move_on(self) -> None:
        """Aim at the next configured metadata address."""
        meta = self.config.meta
        if self.current in meta:
            self._index = meta.index(self.current)
        self._index = (self._index + 1) % len(meta)
        self.current = meta[self._index]

    def _complain(self, message: str) -> None:
        """Log a failure: at once after a success, then at most once a minute while it lasts
        (metadata may be down for long, and the failing address rotates)."""
        now = self._clock.seconds()
        if self._complaint is None or now - self._complaint[1] >= _COMPLAIN_EVERY:
            self._complaint = (message, now)
            log.warn("{node}: {message}; retrying", node=self.config.id, message=message)

    def _unexpected(self, failure: Failure, what: str) -> None:
        log.failure("{node}: {what} failed", failure, node=self.config.id, what=what)

    # --- shard reports and garbage collection ----------------------------------------------

    async def _report(self) -> None:
        ids = self.server.held_ids()
        # Damaged copies kept on disk: the leader says which it no longer places here.
        damaged = sorted(self.server.corrupt)[:MAX_DAMAGED]
        batches: Sequence[list[str]] = [
            ids[i : i + self.report_batch] for i in range(0, len(ids), self.report_batch)
        ] or [[]]
        unreferenced: list[str] = []
        self.report_number += 1
        for n, batch in enumerate(batches):
            last = n == len(batches) - 1
            message = ShardReport(
                self.config.id, n, last, damaged if last else (), self.report_number, self.cluster_id
            )
            payload = "\n".join(batch).encode("ascii")
            reply = await self._call(message, payload, self.report_timeout)
            if reply is None:
                return  # _report_due stays set: the next beat tries again
            named = bytes(reply.payload).decode("ascii", "replace").split("\n")
            unreferenced.extend(x for x in named if x)
        self._report_due = False
        self._last_report = self._clock.seconds()
        self.reports += 1
        # Only what we reported: a confused leader must not make us delete anything else.
        reported = set(ids).union(damaged)
        doomed = [x for x in unreferenced if x in reported]
        if not doomed:
            return
        deleted = await self.server.collect_garbage(
            doomed, self._clock.seconds(), self.config.gc_grace
        )
        self.collected += len(deleted)
        log.info(
            "{node} deleted {deleted} unreferenced shards ({kept} kept until {grace:g}s old)",
            node=self.config.id, deleted=len(deleted), kept=len(doomed) - len(deleted),
            grace=self.config.gc_grace,
        )

    def _report_finished(self, _: object) -> None:
        self._reporting = False
