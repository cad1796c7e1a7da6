# -*- test-case-name: tests.test_chunk_service -*-
"""The chunk server daemon as a service tree: store, thread pool, listener, heartbeats.

`ChunkService` does nothing when built (twistd forks after `makeService`); `startService`
opens the shard store, starts its own thread pool, scans the store, listens, and starts the
`HeartbeatService` and `ShardScrubber` children. `stopService` undoes all of it and returns a
Deferred.

Security (docs/security.md): the service's `DaemonSecurity` child holds the TLS of the
listener and of the connections to the metadata (from the config's [tls]; plaintext, with a
warning at every start, without one), authorizes every request by the caller's role
(`CHUNK_PERMISSIONS`), and applies the revocation list each heartbeat reply carries. The
functions `listen_endpoint`, `meta_endpoints` and `peer_endpoints` remain seams: pass
replacements to `ChunkService` (tests) and the defaults use the service's TLS.

Repair (RebuildShard) reads shards from the other chunk servers over a connection pool of
its own, dialled as the metadata is (TLS with this node's certificate when the cluster has
TLS); the peers authorize those GetShard reads by the node role.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from dogfs.chunk.heartbeat import HeartbeatService, load_block_key, load_cluster_id
from dogfs.chunk.load import LoadMeter
from dogfs.chunk.scrub import ShardScrubber
from dogfs.chunk.server import Executor, ShardServer
from dogfs.config import ChunkConfig
from dogfs.plugins.common import client_endpoints, server_endpoint
from dogfs.raft.worker import WorkerPool
from dogfs.security.authz import guard
from dogfs.security.daemon import DaemonSecurity, RevocationTap
from dogfs.storage.files import make_dirs, replace_file
from dogfs.storage.shards import ShardStore, ShardStoreError
from dogfs.wire import messages as m
from dogfs.wire.pool import ConnectionFactory, ConnectionPool, EndpointMaker

log = Logger()

#: The file under data_dir a running chunk server holds locked.
LOCK_NAME = "chunk.lock"

#: The file under data_dir holding the last revocation list the metadata leader sent.
REVOKED_FILE = "revoked.json"

#: Worker threads for disk work (appends, fsyncs, reads): a few overlap one another's waits.
DEFAULT_THREADS = 4


#: What each request needs (docs/security.md). DeleteShards is chunk-internal (garbage
#: collection, repair): a client never sends it, and a user must not delete shards behind the
#: namespace's back. PutShard is a client's write, or a node's (repair and moves). RebuildShard
#: comes from the metadata leader only: a user must not make a server read its peers.
CHUNK_PERMISSIONS: dict[type, str] = {
    m.GetShard: "read",
    m.PutShard: "write|node",
    m.DeleteShards: "node",
    m.RebuildShard: "node",
}


def listen_endpoint(reactor: Any, config: ChunkConfig) -> IStreamServerEndpoint:
    """The endpoint the chunk server listens on: TLS when the config has [tls].

    `ChunkService` uses its own `DaemonSecurity` instead of this default (so that revocation
    and SIGHUP reach the listener); this is for callers without one.
    """
    return server_endpoint(reactor, config.listen, config.tls)


def meta_endpoints(reactor: Any, config: ChunkConfig) -> EndpointMaker:
    """How the chunk server dials metadata nodes by "host:port": TLS when the config has [tls]."""
    return client_endpoints(reactor, config.tls)


def peer_endpoints(reactor: Any, config: ChunkConfig) -> EndpointMaker:
    """How the chunk server dials other chunk servers by "host:port" (repair reads their
    shards): as it dials the metadata."""
    return client_endpoints(reactor, config.tls)


class DataDirInUse(Exception):
    """Another process serves this data directory."""


class DataDirOfAnotherNode(Exception):
    """The data directory holds the shards of a chunk server with another id."""


#: The file under data_dir naming the chunk server whose shards it holds.
NODE_ID_FILE = "node-id"


def claim_data_dir(data_dir: str, node_id: str) -> None:
    """Make sure ``data_dir`` is ``node_id``'s: name it so on first use, refuse it if it
    names another node.

    The metadata places shards by node id: a server that came up under another id (an
    edited config, two directories swapped) would report every shard it holds as unknown,
    and garbage collection would delete them all.
    """
    path = os.path.join(data_dir, NODE_ID_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            owner = f.read().strip()
    except FileNotFoundError:
        replace_file(path, f"{node_id}\n".encode())
        return
    if owner != node_id:
        raise DataDirOfAnotherNode(
            f"data directory {data_dir} holds the shards of chunk server {owner!r}, not of "
            f"{node_id!r} (its {NODE_ID_FILE} file says so): give this server its old id back, or "
            "another data directory; starting under a new id would have its shards deleted as "
            "garbage"
        )


def lock_data_dir(data_dir: str) -> int:
    """Create `data_dir` (durably) if needed and lock it for this process; return the lock's fd.

    The lock dies with the process (even on kill -9), so a stale one never blocks a restart.
    A second server on the same directory would delete the first one's uploads in flight.
    """
    make_dirs(data_dir)
    fd = os.open(os.path.join(data_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise DataDirInUse(f"data directory {data_dir} is in use by another chunk server") from None
        raise
    return fd


class ChunkService(MultiService):
    """A chunk server: serves its shards and reports to the metadata leader."""

    def __init__(
        self,
        reactor: Any,
        config: ChunkConfig,
        *,
        executor: Executor | None = None,
        threads: int = DEFAULT_THREADS,
        make_listen_endpoint: Callable[[Any, ChunkConfig], IStreamServerEndpoint] = listen_endpoint,
        make_meta_endpoints: Callable[[Any, ChunkConfig], EndpointMaker] = meta_endpoints,
        make_peer_endpoints: Callable[[Any, ChunkConfig], EndpointMaker] = peer_endpoints,
        on_fatal: Callable[[], object] | None = None,
        append_in_executor: bool = True,
        security: DaemonSecurity | None = None,
        direct_io: bool | None = None,
    ) -> None:
        """Build (without I/O) a chunk server for `config`.

        `reactor` provides time, TCP and threads. `executor` replaces the service's own
        thread pool (tests). `on_fatal` is called when the server cannot start (the plugin
        stops the reactor). `security` defaults to one built from `config.tls`, which reads the
        certificate files now (raising when they are unusable). `direct_io` is the shard
        store's (see `ShardStore`): None uses O_DIRECT writes where the file system allows.
        """
        super().__init__()
        self.reactor = reactor
        self.config = config
        self._executor_arg = executor
        self.threads = threads
        self._make_listen_endpoint = make_listen_endpoint
        self._make_meta_endpoints = make_meta_endpoints
        self._make_peer_endpoints = make_peer_endpoints
        self.security = security or DaemonSecurity(
            reactor, config.tls, config.id, config.address,
            # Kept across restarts: until the leader sends it again, enforce the last list.
            keep=None if config.tls is None else os.path.join(config.data_dir, REVOKED_FILE),
        )
        self.security.setServiceParent(self)
        self._on_fatal = on_fatal
        self._append_in_executor = append_in_executor
        self._direct_io = direct_io
        self.store: ShardStore | None = None
        self.server: ShardServer | None = None
        self.heartbeat: HeartbeatService | None = None
        self.scrubber: ShardScrubber | None = None
        self.factory: ConnectionFactory | None = None
        self.port: IListeningPort | None = None
        self._threadpool: WorkerPool | None = None
        self._meta_pool: ConnectionPool | None = None
        self._peer_pool: ConnectionPool | None = None
        self._starting: defer.Deferred[None] | None = None
        self._lock_fd: int | None = None
        # How the last start ended: None while starting, True once serving, else its Failure.
        self._outcome: bool | Failure | None = None
        self._waiting: list[defer.Deferred[None]] = []

    def startService(self) -> None:
        """Lock the data directory, open the store, start threads; once the store is scanned,
        listen and start heartbeats."""
        from dogfs.codec.stripe import tune_malloc  # pyeclib: not at plugin import time

        tune_malloc()
        config = self.config
        for child in (self.heartbeat, self.scrubber):
            if child is not None and child.parent is self:
                self.removeService(child)  # a restart builds fresh ones
        self._outcome = None
        super().startService()
        try:
            self._lock_fd = lock_data_dir(config.data_dir)
            claim_data_dir(config.data_dir, config.id)
            # A data directory laid out wrong (a file where shards/ or tmp/ should be, no
            # permission) is one sentence too, not a traceback.
            self.store = ShardStore(config.data_dir, direct_io=self._direct_io)
        except (DataDirInUse, DataDirOfAnotherNode, ShardStoreError, OSError) as e:
            self._failed_to_start(Failure(e))
            return
        executor = self._executor_arg
        if executor is None:
            self._threadpool = WorkerPool(self.reactor, f"{config.id}-disk", self.threads)
            self._threadpool.start()
            executor = self._threadpool.run
        meter = LoadMeter(self.reactor)
        if self._make_peer_endpoints is peer_endpoints:
            peers = client_endpoints(self.reactor, self.security.client)
        else:
            peers = self._make_peer_endpoints(self.reactor, config)
        self._peer_pool = ConnectionPool(self.reactor, peers, node_id=config.id)
        self.server = ShardServer(
            self.store, config.id, executor, meter, append_in_executor=self._append_in_executor,
            peers=self._peer_pool,
        )
        # With TLS, an upload from an identity but a node must show it was allocated.
        self.server.check_tokens = self.security.tls_enabled
        self.factory = ConnectionFactory(
            self.reactor,
            guard(self.server.handlers(), self.security.authorize, CHUNK_PERMISSIONS),
            node_id=config.id,
            on_handshake=self.security.on_handshake,
        )
        self.factory.noisy = False  # no "Starting factory" line per connection
        if self._make_meta_endpoints is meta_endpoints:
            meta = client_endpoints(self.reactor, self.security.client)
        else:
            meta = self._make_meta_endpoints(self.reactor, config)
        self._meta_pool = ConnectionPool(self.reactor, meta, node_id=config.id)
        # Heartbeat replies carry the revocation list: the tap applies it.
        self.heartbeat = HeartbeatService(
            self.reactor, self.server, config, RevocationTap(self._meta_pool, self.security)
        )
        self.scrubber = ShardScrubber(
            self.reactor, self.server, interval=config.scrub_interval, rate=config.scrub_rate
        )
        self._starting = defer.Deferred.fromCoroutine(self._start(executor))
        self._starting.addErrback(self._failed_to_start)

    async def _start(self, executor: Executor) -> None:
        assert self.store is not None and self.server is not None and self.factory is not None
        store, config = self.store, self.config
        removed = await executor(store.clean_tmp)
        if removed:
            log.info("{node} removed {n} unfinished uploads from {dir}", node=config.id, n=removed, dir=store.tmp_dir)
        count = await self.server.scan()
        assert self.heartbeat is not None
        self.heartbeat.cluster_id = await executor(load_cluster_id, self.heartbeat.cluster_id_path)
        self.server.block_key = await executor(load_block_key, self.heartbeat.block_key_path)
        self.server.fetch_block_key = self.heartbeat.fetch_block_key
        if self._make_listen_endpoint is listen_endpoint:
            endpoint = server_endpoint(self.reactor, config.listen, self.security.server)
        else:
            endpoint = self._make_listen_endpoint(self.reactor, config)
        self.port = await endpoint.listen(self.factory)
        if not self.running:  # stopped while starting
            await defer.maybeDeferred(self.port.stopListening)
            return
        host = self.port.getHost()
        where = f"{getattr(host, 'host', '?')}:{getattr(host, 'port', '?')}"
        corrupt = len(self.server.corrupt)
        log.info(
            "{node} serving {count} shards on {where}, data in {dir}{damaged}",
            node=config.id, count=count, where=where, dir=store.root,
            damaged=f" ({corrupt} with damaged headers)" if corrupt else "",
        )
        # Heartbeats start once there is something true to report: the first goes out now.
        assert self.heartbeat is not None and self.scrubber is not None
        self.heartbeat.setServiceParent(self)
        # Scrubbing reads only shards the scan found or that were written since.
        self.scrubber.setServiceParent(self)
        self._settle(True)

    def _failed_to_start(self, failure: Failure) -> None:
        log.critical(
            "{node} cannot start: {error}", node=self.config.id, error=failure.getErrorMessage()
        )
        if self._outcome is None:
            self._settle(failure)
        if self._on_fatal is not None:
            self._on_fatal()

    def when_ready(self) -> defer.Deferred[None]:
        """Fires once the server listens; fails with the reason if it could not start.

        A new Deferred per caller, so a failure nobody waits for is only logged once.
        """
        if self._outcome is True:
            return defer.succeed(None)
        if isinstance(self._outcome, Failure):
            return defer.fail(self._outcome)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    def _settle(self, outcome: bool | Failure) -> None:
        self._outcome = outcome
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(None)

    @property
    def address(self) -> str | None:
        """The "host:port" actually listened on, once listening."""
        if self.port is None:
            return None
        host = self.port.getHost()
        return f"{host.host}:{host.port}"  # type: ignore[attr-defined]

    def stopService(self) -> defer.Deferred[None]:
        """Stop heartbeats, scrubbing, listening and connections, then the thread pool (which
        waits for a scrub's read in flight; its result is dropped)."""
        stopping = super().stopService()
        steps: list[defer.Deferred[Any]] = [stopping]
        if self.port is not None:
            steps.append(defer.maybeDeferred(self.port.stopListening))
            self.port = None
        if self.factory is not None:
            for connection in list(self.factory.connections):
                steps.append(connection.closed)
                connection.close()
        if self._meta_pool is not None:
            steps.append(self._meta_pool.close_all())
        if self.server is not None and self.server.rebuilder is not None:
            # Rebuilds in flight fail (their temporary files removed); their peer
            # connections close.
            steps.append(self.server.rebuilder.stop())
        done: defer.Deferred[Any] = defer.gatherResults(steps, consumeErrors=True)

        def release(_: object) -> None:
            if self._threadpool is not None:
                # Waits for disk work in flight (a commit's fsync) to finish.
                self._threadpool.stop()
                self._threadpool = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

        return done.addBoth(release)
