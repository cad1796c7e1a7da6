# -*- test-case-name: tests.test_meta_service -*-
"""The metadata node's service: the wire handlers in front of the namespace.

Mutations arrive as `MetaCommand` frames carrying a command from dogfs.meta.commands; this
service fills in what only the leader may decide (placement, timestamps) and hands the
command to an `ICommandLog` (the single-node log, or Raft). Reads (`MetaQuery`) are served
from the local LMDB state after the log's read barrier. Chunk servers send heartbeats and
shard reports here; liveness is soft state in a `ChunkServerRegistry`.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import secrets
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import msgpack
from twisted.application.service import MultiService
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dogfs.codec.policy import ECPolicy, UnknownPolicy
from dogfs.config import MetaConfig
from dogfs.interfaces import ICommandLog
from dogfs.meta import commands as c
from dogfs.meta.balance import Balancer
from dogfs.meta.placement import NotEnoughChunkServers, choose_placement
from dogfs.meta.registry import ALIVE, UNKNOWN, ChunkServerRegistry
from dogfs.meta.repair import RepairScheduler
from dogfs.meta.state import LogVersionError, NamespaceState
from dogfs.meta.versions import LogVersionKeeper
from dogfs.wire import messages as m
from dogfs.wire.pool import ConnectionPool, EndpointMaker, tcp_endpoints
from dogfs.wire.protocol import Reply, Request, WireError

#: LMDB map size of a metadata node's namespace (see MetaService).
NAMESPACE_MAP_SIZE = 1 << 38
#: Bytes of namespace per frame of a backup (`MetaHandlers._backup`).
BACKUP_PART = 4 << 20
#: Seconds a backup may take to send: its read transaction keeps LMDB from reusing the pages
#: later writes free, so a client that reads slowly must not hold it open for good.
BACKUP_MAX_SECONDS = 3600.0

log = Logger()

# Commands a client may send; the rest are the leader's own (registration, expiry, moves).
CLIENT_COMMANDS = (
    c.Mkdir, c.Allocate, c.RenewAllocations, c.CommitFile, c.Delete, c.Rename, c.SetDefaultPolicy,
    c.DrainChunkServer, c.RemoveChunkServer,
)
# Client commands that need the admin role.
ADMIN_COMMANDS = (c.SetDefaultPolicy, c.DrainChunkServer, c.RemoveChunkServer)
REPORT_BATCH = 20_000
# Shards found absent from one report at most, and placements looked at per batch beyond the
# ids it lists: what bounds the leader's work on a report that leaves out very many.
MAX_ABSENT = 20_000
GAP_BATCH = 5_000


def _check_heartbeat(msg: m.Heartbeat) -> None:
    """Refuse a heartbeat whose figures cannot be true: they feed placement and the status
    page (a NaN load would make ``cluster status --json`` print invalid JSON)."""
    for name in ("capacity_bytes", "used_bytes", "shards"):
        if getattr(msg, name) < 0:
            raise WireError("invalid_argument", f"heartbeat from {msg.node_id}: {name} is negative")
    for key, value in msg.load.items():
        if not math.isfinite(value) or value < 0:
            raise WireError(
                "invalid_argument", f"heartbeat from {msg.node_id}: load {key!r} is {value!r}, "
                "not a finite non-negative number"
            )


def error_from_result(result: c.MetaError) -> WireError:
    """The wire error for a state machine's MetaError (code names are lower-case)."""
    return WireError(result.code.name.lower(), result.message)


def _nobody_to_ask(member: str) -> defer.Deferred[int]:
    return defer.fail(WireError("unavailable", f"no way to ask {member} its log version"))


def encode_status(status: dict[str, Any]) -> bytes:
    """The payload of a status reply."""
    return msgpack.packb(status, use_bin_type=True)  # type: ignore[no-any-return]


@attrs.define
class _ReportGap:
    """A shard report in progress: the batches seen and the shards found absent so far."""

    report: int = 0  # the chunk server's number for it (ShardReport.report)
    after: tuple[int, int] | None = None
    next_batch: int = 0
    absent: set[tuple[int, int]] = attrs.field(factory=set)
    truncated: bool = False  # found as many as one report looks for: the rest next time


class MetaHandlers:
    """The metadata node's request handlers, independent of how it listens."""

    def __init__(
        self,
        clock: IReactorTime,
        config: MetaConfig,
        state: NamespaceState,
        log_: ICommandLog,
        registry: ChunkServerRegistry,
        rng: random.Random | None = None,
        authorize: Callable[[Request, str], None] | None = None,
    ) -> None:
        self.clock = clock
        self.config = config
        # authorize(request, permission) raises WireError("permission_denied") when the
        # caller may not; permissions are "read", "write", "admin" and "node".
        self.authorize = authorize or (lambda request, permission: None)
        # The same, with the revocation list read afresh from the state first: for a read,
        # once its barrier has applied everything committed before it (a revocation
        # included) and this member's poll of the list may not have caught up yet.
        self.authorize_fresh: Callable[[Request, str], None] = lambda request, permission: None
        self.state = state
        self.log = log_
        self.registry = registry
        self.rng = rng or random.Random(os.urandom(16))
        self.reported: set[str] = set()
        self.registering: set[str] = set()
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        #: The leader's LogVersionKeeper (MetaService sets it): what each member last said.
        self.versions: LogVersionKeeper | None = None
        # Shard report gaps (see _find_gaps): the report in progress of each chunk server,
        # the shards absent from its last full report, and those absent from its last two:
        # missing, for repair to rebuild elsewhere.
        self._gaps: dict[str, _ReportGap] = {}
        self._absent: dict[str, set[tuple[int, int]]] = {}
        self.missing: dict[str, set[tuple[int, int]]] = {}
        # (client id, seq) -> callers of a resend, for each sessioned command proposed here
        # and not yet answered.
        self._in_flight: dict[tuple[str, int], list[defer.Deferred[Any]]] = {}
        # The leader's repair scheduler (MetaService sets it), for `repair_status`.
        self.repair: Any = None
        # Runs a blocking function off the reactor (MetaService gives it a worker thread):
        # a backup's dump of a large namespace.
        self.in_thread: Callable[[Callable[[], Any]], defer.Deferred[Any]] = defer.maybeDeferred
        #: Backups' dumps running (on other threads, from read transactions of the state).
        self.dumping: set[defer.Deferred[Any]] = set()
        #: The connections backups are being sent on (cut when the node stops).
        self.backups: set[Any] = set()

    def handlers(self) -> dict[type, Callable[[Request], Any]]:
        """The wire handler table."""
        return {
            m.MetaCommand: self.command,
            m.MetaQuery: self.query,
            m.Heartbeat: self.heartbeat,
            m.ShardReport: self.shard_report,
            # A replicated log adds its peers' messages and its membership queries.
            **(self.log.wire_handlers(self) if hasattr(self.log, "wire_handlers") else {}),
        }

    def emit(self, kind: str, **fields: Any) -> None:
        """Tell listeners (the dashboard, metrics) that something happened."""
        for listener in list(self.listeners):
            try:
                listener(kind, fields)
            except Exception:
                log.failure("event listener failed for {kind}", kind=kind)

    # --- commands ---------------------------------------------------------------------

    def _require_leader(self) -> None:
        require = getattr(self.log, "require_leader", None)
        if require is not None:
            # The Raft log's answer says "no quorum" when that is why no one leads.
            require()
            return
        if not self.log.is_leader:
            leader = self.log.leader_address()
            details = {"leader": leader} if leader else {}
            where = f"; the leader is {leader}" if leader else "; no leader is known"
            raise WireError("not_leader", f"{self.config.id} is not the metadata leader{where}", details)

    def command(self, request: Request) -> defer.Deferred[Reply]:
        """A namespace mutation from a client."""
        msg: m.MetaCommand = request.msg
        try:
            command = c.decode_command(bytes(request.payload))
        except ValueError as e:
            raise WireError("invalid_argument", str(e)) from None
        if not isinstance(command, CLIENT_COMMANDS):
            raise WireError("permission_denied", f"{type(command).__name__} is not a client command")
        self.authorize(request, "admin" if isinstance(command, ADMIN_COMMANDS) else "write")
        self._require_leader()
        needed = c.since(type(command))
        if needed and needed > (group := self.state.log_version()):
            caught_up = getattr(self.log, "caught_up", None)
            raise WireError(
                # A leader that took over recently may not have applied the version yet.
                "not_ready" if caught_up is not None and not caught_up() else "unsupported",
                f"{type(command).__name__} needs metadata log version {needed}, and the group is at "
                f"{group}: it is raised once every metadata member runs a release that applies it "
                "(`dogfs cluster status --json` shows each member's log_version)",
            )
        key = (msg.client_id, msg.seq)
        waiting = self._in_flight.get(key) if msg.client_id else None
        if waiting is not None:
            # A resend of a command this leader is still deciding (the client timed out
            # first): it gets the first try's answer, without a second entry in the log.
            resent: defer.Deferred[Any] = defer.Deferred()
            waiting.append(resent)
            return resent.addCallback(self._answer, None, msg.wants_tokens)
        try:
            command = self.prepare(command)
        except WireError as e:
            if not msg.client_id:
                raise
            return self._retried(msg, command, e)
        # A session makes a retried command take effect once, remembered in the replicated
        # state itself (so it survives restarts and leader changes).
        if not msg.client_id:
            return self.log.propose(command).addCallback(self._answer, command, msg.wants_tokens)
        d = self.log.propose(c.Sessioned(msg.client_id, msg.seq, command, self.clock.seconds()))
        waiters: list[defer.Deferred[Any]] = []
        self._in_flight[key] = waiters

        def decided(result: Any) -> Any:
            if self._in_flight.get(key) is waiters:
                del self._in_flight[key]
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
            return result

        return d.addBoth(decided).addCallback(self._answer, command, msg.wants_tokens)

    def _answer(self, result: Any, command: Any, tokens: bool = True) -> Reply:
        """The reply to a command (None: a resend, whose first try emitted its events);
        without ``tokens``, an `Allocation` goes without its block token (the client's
        release would not read it)."""
        if isinstance(result, c.MetaError):
            raise error_from_result(result)
        if not tokens and isinstance(result, c.Allocation) and result.token is not None:
            result = attrs.evolve(result, token=None)
        if isinstance(command, c.CommitFile):
            self.emit("commit", path=command.path, size=command.size)
        elif isinstance(command, c.RemoveChunkServer):
            self.registry.forget(command.node_id)
        return Reply(m.MetaReply(self.log.leader_address()), c.encode_result(result))

    def _retried(self, msg: m.MetaCommand, command: Any, error: WireError) -> defer.Deferred[Reply]:
        """Answer a command the leader cannot prepare (no placement for an Allocate, say) that
        is the retry of one that already took effect, say under the leader before, as the
        first try was answered: the client must not be told it failed. Otherwise ``error``,
        or "not ready" while this leader's state may still lack what its predecessors
        committed."""
        cached = self.state.session_result(msg.client_id, msg.seq)
        if cached is None:
            caught_up = getattr(self.log, "caught_up", None)
            if caught_up is not None and not caught_up():
                raise WireError(
                    "not_ready",
                    f"{error.message} (this metadata leader took over recently and has not yet "
                    "applied everything committed before; the client retries)",
                    error.details,
                )
            raise error
        return defer.succeed(self._answer(cached, None, msg.wants_tokens))

    def prepare(self, command: Any) -> Any:
        """Fill in what only the leader decides: placement and timestamps."""
        now = self.clock.seconds()
        if isinstance(command, c.Allocate):
            ec = command.ec or self._inherited_policy(command.path)
            try:
                policy = ECPolicy.parse(ec)
            except UnknownPolicy as e:
                raise WireError("invalid_argument", str(e)) from None
            if self.state.block_key() is None:
                # A new cluster's first moments: its first leader is choosing the key that
                # the allocation's token needs (MetaService._seed_secrets).
                raise WireError(
                    "not_ready",
                    f"cannot write {command.path} yet: the new cluster's block key is still being "
                    "chosen (the client retries)",
                )
            draining = {r.node_id for r in self.state.chunk_servers() if r.draining}
            try:
                placement = choose_placement(
                    policy.width, self.registry.live(), self.rng,
                    exclude=draining.union(command.avoid), policy=policy.name,
                )
            except NotEnoughChunkServers as e:
                if self.registry.awaiting(e.needed):
                    # A leader that took over recently has not heard every chunk server yet:
                    # the ones still to report may well be alive. The client retries.
                    raise WireError(
                        "not_ready",
                        f"cannot write {command.path} yet: {e}, and this metadata leader has not "
                        "heard from every chunk server since it took over",
                        {"needed": e.needed, "alive": e.alive},
                    ) from None
                self.emit("write_refused", path=command.path, reason=f"not_enough_chunk_servers: {e}")
                avoided = f" (without {', '.join(command.avoid)}, which failed this upload)" if command.avoid else ""
                raise WireError(
                    "not_enough_chunk_servers", f"cannot write {command.path}{avoided}: {e}",
                    {"needed": e.needed, "alive": e.alive},
                ) from None
            # An inherited policy is logged as such: the state machine resolves it when it
            # applies the command, from the directory as it is then. This member's state may
            # lag its log (a directory made or moved, or the default changed, by a command not
            # applied yet), so its guess only sizes the placement.
            logged = policy.name if command.ec else None
            return attrs.evolve(command, ec=logged, placement=tuple(placement), now=now, avoid=())
        # Built directly: attrs.evolve reads the class's fields on every call, and the leader
        # prepares every mkdir and commit.
        if type(command) is c.Mkdir:
            return c.Mkdir(command.path, command.parents, command.ec, now)
        if type(command) is c.CommitFile:
            return c.CommitFile(
                command.path, command.size, command.block_groups, now, command.ec, command.expected_version
            )
        if isinstance(command, c.RenewAllocations):
            return c.RenewAllocations(command.block_groups, now)
        if isinstance(command, c.RemoveChunkServer):
            # Only a server this leader has seen go silent: one still heartbeating would
            # register again, and one a new leader has not heard from yet may be running.
            liveness = self.registry.state(command.node_id)
            if liveness == ALIVE:
                raise WireError(
                    "failed_precondition",
                    f"chunk server {command.node_id} is running: stop it first (its next "
                    "heartbeat would register it again)",
                )
            if liveness == UNKNOWN:
                raise WireError(
                    "not_ready",
                    f"cannot remove chunk server {command.node_id} yet: this metadata leader took "
                    f"over {self.registry.grace_left():.0f}s too recently to know whether it runs",
                )
        if isinstance(command, c.SetDefaultPolicy):
            try:
                return c.SetDefaultPolicy(ECPolicy.parse(command.ec).name, command.seed)
            except UnknownPolicy as e:
                raise WireError("invalid_argument", str(e)) from None
        return command

    def _inherited_policy(self, path: str) -> str:
        parent = path.rstrip("/").rpartition("/")[0] or "/"
        info = self.state.stat(parent)
        if isinstance(info, c.DirInfo):
            return info.ec
        return self.state.default_policy()

    # --- queries ----------------------------------------------------------------------

    def query(self, request: Request) -> defer.Deferred[Reply]:
        """A read: stat, list, status or cluster_info."""
        msg: m.MetaQuery = request.msg
        self.authorize(request, "read")
        if msg.op == "status":
            # Status answers from any member, leader or not, without a barrier: it is a view.
            return defer.succeed(Reply(m.MetaReply(self.log.leader_address()), encode_status(self.status())))
        if msg.op == "version":
            # Any member answers, for the leader's LogVersionKeeper: what its release applies.
            answer = {"log_version": c.LOG_VERSION, "group_log_version": self.state.log_version()}
            return defer.succeed(Reply(m.MetaReply(self.log.leader_address()), encode_status(answer)))
        if msg.op == "repair_status":
            # Repair runs on the leader: its view only, no barrier.
            self.authorize(request, "admin")
            self._require_leader()
            if self.repair is None:
                raise WireError("unsupported", f"{self.config.id} runs no repair scheduler")
            return defer.succeed(Reply(m.MetaReply(self.log.leader_address()), encode_status(self.repair.status())))
        if msg.op == "backup":
            self.authorize(request, "admin")
            barrier = self.log.read_barrier()
            barrier.addCallback(lambda _: defer.Deferred.fromCoroutine(self._backup(request)))
            return barrier
        if msg.op not in ("stat", "list", "cluster_info"):
            raise WireError("invalid_argument", f"unknown query {msg.op!r}")
        d = self.log.read_barrier()
        d.addCallback(self._read_allowed, request, msg)
        return d

    async def _backup(self, request: Request) -> Reply:
        """Stream the namespace as of now (after the read barrier: every write acknowledged
        before the request is in it) in parts, then its size and checksum (dogfs.meta.backup).

        The namespace is read from an LMDB read transaction, a part at a time on a worker
        thread, and each part is sent before the next is read: this member goes on applying
        and serving meanwhile, and holds one part in memory, not the namespace (as etcd's
        snapshot save streams from a read transaction). The client's flow control paces it.
        """
        self.authorize_fresh(request, "admin")
        if self.dumping:
            # Each holds a read transaction open (pages LMDB cannot reuse meanwhile).
            raise WireError("busy", f"{self.config.id} is already making a backup: try again once it is sent")
        term = getattr(getattr(self.log, "driver", None), "term", 0)
        index, pieces, end = self.state.dump_parts_at()
        hasher = hashlib.sha256()
        pending = bytearray()
        finished = [False]

        def next_part() -> bytes:
            # On a worker thread: read on until a part's worth (or the end), and hash it.
            while len(pending) < BACKUP_PART and not finished[0]:
                piece = next(pieces, None)
                if piece is None:
                    finished[0] = True
                else:
                    pending.extend(piece)
            part = bytes(pending[:BACKUP_PART])
            del pending[:BACKUP_PART]
            hasher.update(part)
            return part

        # The node closes the namespace only once this is done (MetaService.stopService),
        # and cuts the connection of a backup still being sent when it stops.
        done: defer.Deferred[None] = defer.Deferred()
        self.dumping.add(done)
        self.backups.add(request.connection)
        size = 0
        began = self.clock.seconds()
        try:
            while part := await self.in_thread(next_part):
                size += len(part)
                await request.send_part(m.MetaReply(None), part)
                if self.clock.seconds() - began > BACKUP_MAX_SECONDS:
                    raise WireError(
                        "timeout",
                        f"the backup took more than {BACKUP_MAX_SECONDS:g}s to send ({size} bytes so far) and "
                        "was stopped: while it runs the leader cannot reuse freed pages; take it from a "
                        "host with a faster link to the leader",
                    )
        finally:
            end()  # no thread is reading: each step was awaited
            self.backups.discard(request.connection)
            self.dumping.discard(done)
            done.callback(None)
        info = {
            "index": index, "term": term, "size": size, "sha256": hasher.hexdigest(),
            "cluster_id": self.state.cluster_id(), "node": self.config.id, "taken": self.clock.seconds(),
        }
        log.info("{node} sent a backup of the namespace at index {index} ({size} bytes)",
                 node=self.config.id, index=index, size=size)
        return Reply(m.MetaReply(self.log.leader_address()), encode_status(info))

    def _read_allowed(self, _: object, request: Request, msg: m.MetaQuery) -> Reply:
        # Nothing a revoked identity asks after its revocation was acknowledged is served,
        # on a follower as on the leader (whose list the revocation itself refreshed).
        self.authorize_fresh(request, "read")
        return self._read(msg)

    def _read(self, msg: m.MetaQuery) -> Reply:
        leader = self.log.leader_address()
        if msg.op == "cluster_info":
            return Reply(m.MetaReply(leader), encode_status(self.cluster_info()))
        result: Any
        if msg.op == "stat":
            result = self.state.stat(msg.path)
            if isinstance(result, c.FileInfo):
                # Data bypasses metadata; a GET starts with this stat, so count it as a read.
                self.emit("read", path=msg.path, size=result.size)
        else:
            start_after = msg.args.get("start_after")
            limit = msg.args.get("limit", 1000)
            if not isinstance(limit, int) or not 0 < limit <= 100_000:
                raise WireError("invalid_argument", "list limit must be between 1 and 100000")
            if start_after is not None and not isinstance(start_after, str):
                raise WireError("invalid_argument", "list start_after must be a name")
            result = self.state.listing(msg.path, start_after=start_after, limit=limit)
        if isinstance(result, c.MetaError):
            raise error_from_result(result)
        return Reply(m.MetaReply(leader), c.encode_result(result))

    def cluster_info(self) -> dict[str, Any]:
        """What a client needs to encode: the default policy and the cell and block sizes."""
        return {
            "cluster_id": self.state.cluster_id(),
            "default_ec": self.state.default_policy(),
            "cell_size": self.config.cell_size,
            "block_size": self.config.block_size,
            # An upload that may outlast this renews its allocations (RenewAllocations).
            "allocation_ttl": self.config.allocation_ttl,
            "leader": self.log.leader_address(),
        }

    def status(self) -> dict[str, Any]:
        """The whole cluster as this node sees it (see docs: `MetaQuery("status")`)."""
        chunks = []
        alive = set()
        for view in self.registry.view():
            if view.state == ALIVE:
                alive.add(view.node_id)
            chunks.append({
                "id": view.node_id,
                "address": view.address,
                "state": view.state,
                "capacity_bytes": view.capacity,
                "used_bytes": view.used,
                "shards": view.shards,
                "last_heartbeat_s": view.last_heartbeat_age,
                "load": view.load,
                "domain": view.domain,
            })
        summary = self.state.summary()
        # Block groups by how many more chunk-server losses they survive (negative: unreadable).
        at_risk = {str(margin): n for margin, n in self.state.redundancy(alive).items()}
        info = self.cluster_info()
        members = self.log.members()
        leader_id = next((mm["id"] for mm in members if mm.get("role") == "leader"), None)
        if self.versions is not None and self.log.is_leader:
            # The log version each member's release applies, as it last told this leader.
            for mm in members:
                if "log_version" not in mm and mm["id"] in self.versions.known:
                    mm["log_version"] = self.versions.known[mm["id"]]
        return {
            "cluster": {
                **info, "leader": leader_id, "leader_address": info["leader"],
                "log_version": self.state.log_version(),
            },
            "meta": members,
            "chunks": chunks,
            "namespace": {
                "files": summary.files,
                "dirs": summary.dirs,
                "bytes": summary.bytes_stored,
                "bytes_on_disk": summary.bytes_on_disk,
                "block_groups": summary.block_groups,
                "pending_block_groups": summary.pending_block_groups,
                "at_risk": at_risk,
            },
        }

    # --- chunk servers ------------------------------------------------------------------

    def heartbeat(self, request: Request) -> Any:
        """A chunk server reports itself; the first time, it is registered durably."""
        msg: m.Heartbeat = request.msg
        self.authorize(request, "node")
        _check_heartbeat(msg)
        self._require_leader()
        record = next((r for r in self.state.chunk_servers() if r.node_id == msg.node_id), None)
        if record is None and self.state.shards_on(msg.node_id, limit=1):
            # Removed with --force while block groups still placed shards on it: those are
            # being rebuilt elsewhere. Registered again, it would be trusted with shards a
            # fresh disk under the same id does not hold.
            raise WireError(
                "permission_denied",
                f"chunk server {msg.node_id} was removed while block groups still placed shards "
                "on it; they are being rebuilt elsewhere: start it under another id, or once "
                "`dogfs admin repair status` lists no shards left on it",
            )
        cluster_id = self._check_cluster(msg.node_id, msg.cluster_id)
        self.registry.heartbeat(
            msg.node_id, msg.address, msg.capacity_bytes, msg.used_bytes, msg.shards,
            dict(msg.load), msg.domain or None,
        )
        if (
            record is None or record.address != msg.address or (record.domain or "") != (msg.domain or "")
        ) and msg.node_id not in self.registering:
            self.registering.add(msg.node_id)
            d = self.log.propose(c.RegisterChunkServer(msg.node_id, msg.address, msg.domain or None))
            d.addErrback(lambda f: log.failure("registering {node} failed", f, node=msg.node_id))
            d.addBoth(lambda _: self.registering.discard(msg.node_id))
        return m.HeartbeatReply(
            self.log.leader_address(),
            msg.node_id not in self.reported,
            # A server of the release before ids (no field: None) reads no fourth field, nor
            # one of the release before block tokens a fifth.
            cluster_id=None if msg.cluster_id is None else cluster_id,
            # Only over an authenticated (TLS) connection: never in the clear, where anyone on
            # the wire could keep it for the day the cluster turns TLS on.
            block_key=(
                self.state.block_key()
                if msg.wants_block_key and getattr(request.connection, "identity", None) is not None
                else None
            ),
        )

    def _check_cluster(self, node_id: str, theirs: str | None) -> str | None:
        """This cluster's id; ``permission_denied`` if chunk server ``node_id`` holds another's."""
        ours = self.state.cluster_id()
        if not theirs:
            return ours  # a server that keeps no id yet (a new data directory), or of an older release
        if ours is None:
            # A new cluster whose id is not applied here yet, or a leader behind its log: the
            # server may be another cluster's, so it is neither registered nor answered yet.
            raise WireError(
                "not_ready",
                f"this metadata leader does not know its cluster's id yet, and chunk server "
                f"{node_id} keeps cluster {theirs}'s: try again in a moment",
            )
        if theirs != ours:
            # Its shards belong to another cluster's files: every one of them would look
            # unreferenced here, and be collected. Refused before it counts as a server.
            raise WireError(
                "permission_denied",
                f"chunk server {node_id} holds the shards of cluster {theirs}, and this is "
                f"cluster {ours}: point it at its own cluster's metadata nodes (if this "
                "cluster's namespace was recreated or restored from a backup taken before it "
                "had an id, remove the server's data_dir/cluster_id instead)",
            )
        return ours

    def shard_report(self, request: Request) -> defer.Deferred[Reply]:
        """Part of a chunk server's shard list; answered with the ids no longer referenced.

        Only after the read barrier: a new leader that has not applied everything committed
        before it would call the shards of a just-committed block group garbage.
        """
        self.authorize(request, "node")
        self._require_leader()
        return self.log.read_barrier().addCallback(lambda _: self._answer_report(request))

    def forget_reports(self) -> None:
        """A new leader starts over: what the previous one learnt from reports is not here."""
        self._gaps.clear()
        self._absent.clear()
        self.missing.clear()

    def _find_gaps(self, msg: m.ShardReport, ids: list[str]) -> None:
        """Note the committed shards placed on the reporting server that its report leaves
        out (it lost or cannot serve them; chunk servers report their held ids sorted, and
        leave out shards they know damaged).

        Each batch covers the ids from the end of the one before to its own last (the last
        batch: to the end). A shard left out of two full reports in a row is ``missing``: one
        left out of a single report may have been written after the server listed its
        shards, and committed since; by its next report it is listed. A report out of
        sequence (restarted, or begun under another leader), or with a batch of another
        report (`ShardReport.report`) in it, notes nothing.
        """
        node = msg.node_id
        if msg.batch == 0:
            self._gaps[node] = _ReportGap(report=msg.report)
        gap = self._gaps.get(node)
        if gap is None or msg.batch != gap.next_batch or msg.report != gap.report:
            # Out of sequence, or a batch of another report (a late one of a report the
            # server gave up on): nothing is concluded from this report.
            self._gaps.pop(node, None)
            return
        listed = sorted(p for p in map(c.parse_shard_id, ids) if p is not None)
        upto = None if msg.last else (listed[-1] if listed else gap.after)
        if listed and gap.after is not None and listed[0] <= gap.after:
            self._gaps.pop(node, None)  # not sorted as promised: no conclusion
            return
        if not gap.truncated:
            # Bounded work per batch: a server that lost thousands of shards (a disk replaced
            # under the same id) has its first MAX_ABSENT found now, the next ones by later
            # reports as repair moves these away.
            room = min(len(listed) + GAP_BATCH, MAX_ABSENT - len(gap.absent) + len(listed))
            placed = self.state.committed_between(node, gap.after, upto, limit=room)
            gap.absent.update(set(placed).difference(listed))
            if len(placed) >= room:
                gap.truncated = True
        gap.after, gap.next_batch = upto, gap.next_batch + 1
        if msg.last:
            del self._gaps[node]
            self.missing[node] = self._absent.get(node, set()) & gap.absent
            self._absent[node] = gap.absent
            if self.missing[node]:
                log.warn("{node} no longer holds {n} shards the namespace places on it: repair "
                         "rebuilds them elsewhere", node=node, n=len(self.missing[node]))

    def _answer_report(self, request: Request) -> Reply:
        msg: m.ShardReport = request.msg
        # After the barrier: this state holds the cluster id if one was ever committed.
        self._check_cluster(msg.node_id, msg.cluster_id)
        ids = [s for s in bytes(request.payload).decode("ascii", "replace").split("\n") if s]
        if len(ids) > REPORT_BATCH:
            raise WireError("invalid_argument", f"a shard report batch holds at most {REPORT_BATCH} ids")
        if len(msg.damaged) > m.MAX_DAMAGED:
            raise WireError("invalid_argument", f"a shard report names at most {m.MAX_DAMAGED} damaged shards")
        status = self.state.shard_status(ids, msg.node_id)
        garbage = [sid for sid, s in status.items() if s == "garbage"]
        if msg.damaged:
            # Damaged copies the namespace no longer places here (rebuilt elsewhere, or their
            # file deleted): the server may collect them like any unreferenced shard.
            damaged = self.state.shard_status(msg.damaged, msg.node_id)
            garbage += [sid for sid, s in damaged.items() if s == "garbage"]
        self._find_gaps(msg, ids)
        if msg.last:
            self.reported.add(msg.node_id)
        return Reply(m.ShardReportReply(), "\n".join(garbage).encode("ascii"))


class MetaService(MultiService):
    """A metadata node: LMDB state, command log, registry, listeners and timers.

    Nothing is opened in __init__ (twistd forks after building services); everything starts in
    startService and stops, returning a Deferred, in stopService.
    """

    def __init__(
        self,
        reactor: Any,
        config: MetaConfig,
        *,
        listen: Callable[[Any], defer.Deferred[Any]],
        make_log: Callable[[NamespaceState], ICommandLog] | None = None,
        on_fatal: Callable[[], object] | None = None,
        dial: EndpointMaker | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.listen = listen
        self.make_log = make_log
        # Called when this node cannot go on (cannot listen, its Raft member halted): the
        # plugin stops twistd with exit status 1.
        self.on_fatal = on_fatal
        # Behind a replicated log (make_log), the log is the durable record and replays what
        # an unsynced LMDB commit lost in a crash: the state itself need not fsync.
        self.state = NamespaceState(
            os.path.join(config.data_dir, "namespace"), durable=make_log is None,
            # The most the namespace may grow to (address space, not disk: the file grows as
            # needed). Reaching it halts every member at the same entry, so it is generous:
            # some hundreds of millions of files.
            map_size=NAMESPACE_MAP_SIZE,
        )
        self.registry = ChunkServerRegistry(
            reactor, config.chunk_dead_after, grace_after_start=config.chunk_dead_after
        )
        self.handlers: MetaHandlers | None = None
        self.log: ICommandLog | None = None
        self._ports: list[Any] = []
        self.metrics: Any = None
        self._pool: Any = None
        self._expiry: LoopingCall | None = None
        # How this node dials chunk servers (repair): TLS with its node certificate when the
        # cluster has TLS (the plugin passes it), plain TCP otherwise.
        self._chunk_pool = ConnectionPool(reactor, dial or tcp_endpoints(reactor), node_id=config.id)
        self.repair: RepairScheduler | None = None
        # Whether _seed_secrets has proposals in flight (a failed round tries again once).
        self._seeding = False
        self.versions: LogVersionKeeper | None = None

    def startService(self) -> None:
        from dogfs.codec.stripe import tune_malloc
        from dogfs.meta.log import LocalCommandLog
        from dogfs.raft.worker import SerialWorker

        tune_malloc()
        os.makedirs(self.config.data_dir, exist_ok=True)
        try:
            self.state.open()
        except LogVersionError as e:
            # A later release wrote it (a downgrade): one sentence, not a traceback.
            log.critical("{node} cannot start: {error}", node=self.config.id, error=str(e))
            self._stop_failed()
            return
        if self.make_log is not None:
            self.log = self.make_log(self.state)
        else:
            # The single-node log applies each batch (one LMDB transaction, fsynced) here.
            self._pool = SerialWorker(self.reactor, f"{self.config.id}-lmdb")
            self._pool.start()
            self.log = LocalCommandLog(
                self.reactor, self.state, self._pool, node_id=self.config.id,
                address=self.config.address, http_address=self.config.http_address,
            )
        self.registry.known_all(self.state.chunk_servers())
        self.registry.start()
        self.handlers = MetaHandlers(self.reactor, self.config, self.state, self.log, self.registry)
        self.handlers.in_thread = partial(self._in_thread, self.reactor)
        replicated: Any = self.log
        if getattr(replicated, "service", None) is not None:
            replicated.service.setServiceParent(self)
            replicated.on_leadership.append(self._leadership_changed)
            if hasattr(replicated, "driver"):
                replicated.driver.on_failure = self._member_failed
        self.registry.on_change(
            lambda node, old, new: self.handlers.emit("chunk_state", node=node, old=old, new=new)  # type: ignore[union-attr]
        )
        handlers = self.handlers
        self.repair = RepairScheduler(
            self.reactor, self.state, self.registry, self.log.propose, self._chunk_pool,
            self.config.cell_size, repair_after=self.config.repair_after,
            interval=self.config.repair_interval, concurrency=self.config.repair_concurrency,
            emit=self.handlers.emit, missing=lambda: handlers.missing,
            balancer=Balancer(self.state, threshold=self.config.balance_threshold) if self.config.balance else None,
        )
        self.handlers.repair = self.repair
        if self.log.is_leader:
            self.repair.start()
        log_ = self.log
        self.versions = LogVersionKeeper(
            self.reactor, self.state.log_version,
            getattr(log_, "other_members", list), getattr(log_, "member_version", _nobody_to_ask),
            log_.propose, lambda: log_.is_leader,
        )
        self.handlers.versions = self.versions
        if log_.is_leader:
            self.versions.start()
        self._expiry = LoopingCall(self._expire_allocations)
        self._expiry.clock = self.reactor
        self._expiry.start(max(1.0, self.config.allocation_ttl / 4), now=False).addErrback(
            lambda f: log.failure("allocation expiry stopped", f)
        )
        try:
            super().startService()  # the Raft member restores its snapshot, replays its log
        except LogVersionError as e:
            log.critical("{node} cannot start: {error}", node=self.config.id, error=str(e))
            self._stop_failed()
            return
        if self.log.is_leader:
            self._seed_default_policy()
            self._seed_secrets()
        d = self.listen(self.handlers)

        def listening(port: Any) -> None:
            self._ports.append(port)
            log.info(
                "{node} serving metadata on {address} (data in {data})",
                node=self.config.id, address=self.config.address, data=self.config.data_dir,
            )

        d.addCallback(listening)
        d.addErrback(self._fatal)
        if self.config.http:
            self._start_dashboard()

    def _leader_http_address(self) -> str | None:
        members = self.log.members() if self.log is not None else []
        leader = next((mm for mm in members if mm.get("role") == "leader"), None)
        if leader is None:
            return None
        return leader.get("http_address") or self.config.http_peers.get(leader["id"])

    def _start_dashboard(self) -> None:
        """Serve the dashboard, WebSocket feed, /metrics and /healthz on [meta] http."""
        from twisted.internet import endpoints

        from dogfs.web.metrics import Metrics
        from dogfs.web.node import MetaNodeSource
        from dogfs.web.site import dashboard_origins, make_site

        assert self.handlers is not None
        self.metrics = Metrics()
        source = MetaNodeSource(
            self.reactor, self.config.id, self.handlers.status,
            lambda: bool(self.log is not None and self.log.is_leader),
            self._leader_http_address, self.metrics,
        )
        self.handlers.listeners.append(source.meta_listener)
        self.registry.on_change(source.chunk_listener)
        addresses = [a for a in [self.config.http_address, *self.config.http_peers.values()] if a]
        site = make_site(self.reactor, source, self.metrics, dashboard_origins(addresses))
        d = endpoints.serverFromString(self.reactor, self.config.http).listen(site)

        def listening(port: Any) -> None:
            self._ports.append(port)
            log.info("{node} dashboard on http://{address}/", node=self.config.id, address=self.config.http_address)

        d.addCallbacks(listening, lambda f: log.failure("{node} cannot serve its dashboard", f, node=self.config.id))

    def _leadership_changed(self, leading: bool) -> None:
        """A Raft member became leader (or stopped leading): rebuild the soft state."""
        if not leading and self.repair is not None:
            self.repair.stop()
        if self.versions is not None:
            if leading:
                self.versions.start()
            else:
                self.versions.stop()
        if not leading or self.log is None:
            return
        # Liveness is soft state, known here from heartbeats the previous leader relayed (see
        # RaftCommandLog.wire_handlers); a chunk server not heard from gets a fresh grace period
        # to heartbeat here before it is called dead.
        self.registry.stop()
        self.registry.known_only(self.state.chunk_servers())
        self.registry.start()
        if self.handlers is not None:
            self.handlers.reported.clear()
            self.handlers.forget_reports()
            me = next((mm for mm in self.log.members() if mm["id"] == self.config.id), {})
            # The dashboard's event log shows elections.
            self.handlers.emit("election", node=self.config.id, term=me.get("term"))
        log.info("{node} leads the metadata group", node=self.config.id)
        self._seed_default_policy()
        self._seed_secrets()
        if self.repair is not None:
            self.repair.start()

    def _seed_default_policy(self) -> None:
        # The config's default_ec seeds a namespace that never had one; after that an admin's
        # choice stands (a leader change must not revert it). This member's state may lag
        # the log, so the command itself is conditional: the state decides when it applies.
        if self.log is not None and not self.state.default_policy_set():
            d = self.log.propose(
                c.SetDefaultPolicy(ECPolicy.parse(self.config.default_ec).name, seed=True)
            )

            def failed(failure: Failure) -> None:
                if self.running:  # stopping: the next start seeds it again
                    log.failure("setting the default policy failed", failure)

            d.addErrback(failed)

    @staticmethod
    def _in_thread(reactor: Any, f: Callable[[], Any]) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f)

    def _seed_secrets(self) -> None:
        """Give a namespace without them a cluster id and a block key (random ones).

        A new namespace, or one from a release before them, has neither. Several leaders in
        turn may propose each: the state keeps the first applied. Until the cluster is named,
        chunk servers that keep an id are not answered, and until it has a block key no
        upload is allocated: so a proposal that fails (a lost quorum, say) is tried again
        while this member leads.
        """
        if self.log is None or not self.running or not self.log.is_leader:
            return
        wanted: list[tuple[Any, str]] = []
        if self.state.cluster_id() is None:
            wanted.append((c.SetClusterId(str(uuid.uuid4())), "naming the cluster"))
        if self.state.block_key() is None:
            wanted.append((c.SetBlockKey(secrets.token_hex(32)), "choosing the block key"))
        if not wanted or self._seeding:
            return
        self._seeding = True

        def failed(failure: Failure, what: str) -> bool:
            if self.running:
                log.failure("{what} failed; trying again", failure, what=what)
            return False

        def done(results: list[bool]) -> None:
            self._seeding = False
            # One try again for the round, however many of its proposals failed; stopping:
            # the next start chooses them.
            if not all(results) and self.running:
                self.reactor.callLater(1.0, self._seed_secrets)

        rounds = [self.log.propose(command).addCallbacks(lambda _: True, failed, errbackArgs=(what,))
                  for command, what in wanted]
        defer.gatherResults(rounds).addCallback(done)

    def _member_failed(self, failure: Any) -> None:
        # The Raft member halted (its disk or state failed): it must not keep answering as if
        # it could lead or serve reads, so the daemon exits and its peers carry on.
        if failure.check(LogVersionError):
            log.critical("{node} halts: {error}", node=self.config.id, error=failure.getErrorMessage())
        else:
            log.critical(
                "{node} halts: its Raft log or namespace failed ({error}); restart it once its disk is fixed",
                node=self.config.id, error=failure.getErrorMessage(),
            )
        self._stop_failed()

    def _stop_failed(self) -> None:
        if self.on_fatal is not None:
            self.on_fatal()
        elif self.reactor.running:
            self.reactor.stop()

    def _fatal(self, failure: Any) -> None:
        log.failure("{node} cannot listen on {listen}", failure, node=self.config.id, listen=self.config.listen)
        self._stop_failed()

    def _expire_allocations(self) -> None:
        if self.log is not None and self.log.is_leader:
            before = self.reactor.seconds() - self.config.allocation_ttl
            d = self.log.propose(c.ExpireAllocations(before))
            d.addErrback(lambda f: log.failure("expiring allocations failed", f))

    def stopService(self) -> defer.Deferred[None]:
        d: defer.Deferred[Any] = defer.maybeDeferred(super().stopService)
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        if self.repair is not None:
            self.repair.stop()
        if self.versions is not None:
            self.versions.stop()
        self.registry.stop()
        ports, self._ports = self._ports, []

        def stop_listening(_: Any) -> defer.Deferred[Any]:
            return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])

        d.addCallback(stop_listening)

        d.addCallback(lambda _: self._chunk_pool.close_all())
        # A backup reads the namespace on another thread: cut the connections backups are
        # sent on (a client that stopped reading would hold the stop up), and let it end.
        def end_backups(_: Any) -> defer.Deferred[Any]:
            if self.handlers is None:
                return defer.succeed(None)
            for connection in list(self.handlers.backups):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abortConnection()
            return defer.DeferredList(list(self.handlers.dumping))

        d.addCallback(end_backups)

        def close(_: Any) -> None:
            if self._pool is not None:
                self._pool.stop()
                self._pool = None
            self.state.close()

        d.addCallback(close)
        return d
