# -*- test-case-name: tests.test_chunk_service -*-
"""The chunk server's data RPCs: PutShard, GetShard, DeleteShards and RebuildShard over a
ShardStore.

`ShardServer` owns what the daemon knows about its shards (the set of ids it holds, those found
corrupt, traffic counters) and serves the wire handlers. It does no listening and runs no
timers; blocking store calls that fsync or scan go through an injected `Executor` (a thread
pool in the daemon, a synchronous call in unit tests).

PutShard answers `ShardStored(shard_id, size)` where `size` is the number of fragment bytes
stored (what the client sent, without the file's header and per-cell CRCs). RebuildShard (the
metadata leader's repair) is served by a `dogfs.chunk.rebuild.ShardRebuilder`, which reads the
other shards of the group from the peers and answers the same way; its own errors are listed
there (``unavailable``, ``busy``, ``aborted``).

Error codes a client can see:
    invalid_argument    bad shard id, fragment size, cell order, range or stream shape
    corrupt_in_transit  a cell's payload does not match the CRC32C sent with it
    busy                the connection already has `max_uploads` PutShard streams open
    no_space            the disk (or quota) is full
    storage_error       any other failure of the local disk, or of the server's means to use
                        it (out of file descriptors or memory for now): the shard is fine
    not_found           no such shard here (one the server thought it held is forgotten:
                        see `file_gone`; while the shards directory itself is gone or was
                        remounted, such a read is a storage_error and nothing is forgotten)
    corrupt             a stored cell or header failed its checksum, or the disk lost its
                        bytes (EIO: see `shard_damaged`); logged, remembered

A shard found damaged (by a read, or by the background scrubber of `dogfs.chunk.scrub`) stays
in `shard_ids`, and its file stays on the disk for whoever wants to see what happened to it,
but it is left out of shard reports (`held_ids`): the metadata leader, missing it from two
reports in a row, rebuilds it elsewhere. A fresh copy written here (an upload or a rebuild)
replaces the file and clears the mark.

A shard whose file is missing is forgotten (`file_gone`) only while the store's shards directory
is the one scanned at start (same device and inode): an unmounted or remounted disk has every
file missing at once, which says nothing of the shards (`ShardsDirLost`).
"""

from __future__ import annotations

import json
import os
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from dogfs.chunk.rebuild import MAX_REBUILDS, ShardRebuilder
from dogfs.security.roles import Role
from dogfs.security.tokens import valid_block_token
from dogfs.storage.shards import (
    AlignedBuffers,
    CellOutOfRange,
    InvalidShardId,
    ShardCorrupt,
    ShardInfo,
    ShardNotFound,
    ShardReader,
    ShardStat,
    ShardStore,
    ShardStoreError,
    ShardStoreFull,
    ShardWriter,
    shard_damaged,
    validate_shard_id,
)
from dogfs.wire.frame import FrameLimits
from dogfs.wire.messages import (
    Cell,
    DeleteShards,
    GetShard,
    GetShardEnd,
    Ok,
    PutShard,
    PutShardEnd,
    RebuildShard,
    ShardStored,
)
from dogfs.wire.pool import ConnectionPool
from dogfs.wire.protocol import Handler, Request, WireError

log = Logger()

_T = TypeVar("_T")
#: Seconds a block key just heard from the metadata is taken as current: a token it refuses
#: within them is refused without asking again (see `ShardServer._check_token`).
KEY_FRESH_FOR = 1.0
#: Runs a blocking function off the reactor: ``executor(f, *args) -> Deferred[f's result]``.
Executor = Callable[..., "defer.Deferred[Any]"]

#: Most cells of one upload written in one trip to the disk thread.
MAX_CELLS_PER_WRITE = 8

#: Cells of a GetShard read from the disk ahead of the one being sent: enough to keep a cold
#: read's disk queue busy while the network takes the cell before.
READ_AHEAD = 3

#: Most bytes of page-aligned buffers kept for GetShard's direct reads (about 30 cells).
READ_BUFFER_BYTES = 32 << 20

#: Bytes of cells all GetShard streams together may have read ahead of what they send. Past
#: it each stream reads one cell at a time: many readers cannot make the server hold
#: READ_AHEAD cells each.
READ_AHEAD_BUDGET = 64 << 20

#: Bytes of cells one connection's GetShard streams together may have read and not yet
#: handed to its transport. A client opening many streams on one connection (up to
#: `max_inflight`) and reading none of them would otherwise have each stream hold a cell
#: read for it and one sent into the transport's buffer: a gigabyte per connection. An
#: honest client reads one stream per connection (`GroupReader` leases its own), READ_AHEAD
#: cells ahead, far below this.
CONNECTION_READ_BUDGET = 16 << 20

#: PutShard streams one connection may have open at once; more are refused with ``busy``.
#: Each open upload holds two file descriptors, a temporary file and (with direct I/O) a
#: staging buffer until it ends, whether or not the client sends anything: without a bound of
#: its own, one connection could open `max_inflight` (1024) of them. A client needs one
#: stream per put in flight on each server's connection (a block group has one shard per
#: chunk server, and a put writes its groups one after another): 16 for `dogfs bench`.
MAX_UPLOADS_PER_CONNECTION = 64


class _ByteBudget:
    """Bytes one connection's streams hold between reading a cell and handing it to the
    transport. A request for more than is left waits, in order, for holders to hand theirs
    on; one is always let through while nothing is held (a cell larger than the budget)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: deque[tuple[int, defer.Deferred[None]]] = deque()
        self._waking = False

    def _fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.limit

    def try_acquire(self, size: int) -> bool:
        if self._waiting or not self._fits(size):
            return False
        self.used += size
        return True

    def acquire(self, size: int) -> defer.Deferred[None]:
        if self.try_acquire(size):
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((size, d))
        return d

    def release(self, size: int) -> None:
        self.used -= size
        if self._waking:
            return  # a waiter woken below gave some back: the loop below goes on
        self._waking = True
        try:
            while self._waiting and self._fits(self._waiting[0][0]):
                size, d = self._waiting.popleft()
                self.used += size
                d.callback(None)
        finally:
            self._waking = False


#: The counters `ShardServer.load` always reports, as "<name>_s" rates.
LOAD_COUNTERS = (
    "put_bytes", "put_ops", "get_bytes", "get_ops", "rebuild_bytes", "rebuild_ops", "errors",
    "scrub_bytes", "scrub_errors",
)


class ShardsDirLost(Exception):
    """The store's shards directory is gone, or another one is in its place (the disk's mount
    dropped, a remount, a directory made anew): a file missing from it says nothing of its shard."""


def synchronous_executor(f: Callable[..., _T], *args: Any, **kwargs: Any) -> defer.Deferred[_T]:
    """Run `f` at once on the calling thread (unit tests: deterministic, no threads)."""
    return defer.maybeDeferred(f, *args, **kwargs)


#: The file, in the data directory, naming the shards found damaged (JSON list of ids).
DAMAGE_FILE = "damaged.json"


def save_damage(path: str, ids: list[str]) -> None:
    """Blocking: replace ``path`` with ``ids``, atomically, not durably (a crash may lose the
    last change: a damaged shard then reports as held until a read or a scrub finds it
    again; a fresh copy shows as damaged and is rebuilt elsewhere, once)."""
    temp = path + ".tmp"
    with open(temp, "w", encoding="ascii") as f:
        json.dump(ids, f)
        f.write("\n")
    os.replace(temp, path)


def load_damage(path: str, node_id: str) -> set[str]:
    """Blocking: the ids ``save_damage`` wrote; none if there is no record, and none, with a
    warning, if it is unreadable (the scrubber finds the damage again)."""
    try:
        with open(path, encoding="ascii") as f:
            ids = json.load(f)
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as e:
        log.warn("{node} ignores its record of damaged shards {path}: {error}", node=node_id, path=path, error=e)
        return set()
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        log.warn("{node} ignores its record of damaged shards {path}: not a list of ids", node=node_id, path=path)
        return set()
    return set(ids)


class ShardServer:
    """Serves one ShardStore's shards over the DogFS wire protocol."""

    def __init__(
        self,
        store: ShardStore,
        node_id: str,
        executor: Executor,
        meter: Any,
        *,
        limits: FrameLimits = FrameLimits(),
        append_in_executor: bool = True,
        read_ahead_budget: int = READ_AHEAD_BUDGET,
        connection_budget: int = CONNECTION_READ_BUDGET,
        max_uploads: int = MAX_UPLOADS_PER_CONNECTION,
        peers: ConnectionPool | None = None,
        max_rebuilds: int = MAX_REBUILDS,
    ) -> None:
        """Serve `store` as node `node_id`.

        `meter` counts traffic (a `LoadMeter`); `append_in_executor` chooses where cell
        writes run (see the module's report: in the pool, the next frame is read from the
        socket while the previous one is written). `max_uploads` bounds the PutShard streams
        open on one connection. `peers` is how RebuildShard reaches the other chunk servers
        (a pool of this server's own); without one, RebuildShard is not served.
        `max_rebuilds` bounds the rebuilds running at once.
        """
        self.store = store
        #: Whether an upload must carry its block group's block token, unless a node sends it
        #: (dogfs.security.tokens; set with TLS, where callers have identities).
        self.check_tokens = False
        #: The cluster's block key, from the metadata (see `HeartbeatService`); None until
        #: the first heartbeat reply brings it.
        self.block_key: str | None = None
        #: Asks the metadata for the block key out of turn (the chunk service sets it: one
        #: extra heartbeat, none if a reply came within the seconds given); fires with the
        #: key, or None if the reply did not bring it.
        self.fetch_block_key: Callable[[float], defer.Deferred[str | None]] | None = None
        #: Where the ids of the shards known damaged are kept across restarts.
        self.damage_path = os.path.join(store.root, DAMAGE_FILE)
        self._damage_saved: defer.Deferred[Any] = defer.succeed(None)
        self.node_id = node_id
        self.executor = executor
        self.meter = meter
        self.limits = limits
        self.append_in_executor = append_in_executor
        self.read_ahead_budget = read_ahead_budget
        self.connection_budget = connection_budget
        self._budgets: weakref.WeakKeyDictionary[Any, _ByteBudget] = weakref.WeakKeyDictionary()
        self.max_uploads = max_uploads
        #: PutShard streams open on each connection.
        self.uploads: weakref.WeakKeyDictionary[Any, set[Request]] = weakref.WeakKeyDictionary()
        #: Where GetShard streams read cells with direct I/O (a few cells per stream: those
        #: read ahead and the one being sent); streams it cannot serve read through the cache.
        self.read_buffers = AlignedBuffers(READ_BUFFER_BYTES)
        #: Bytes of cells being read for GetShard streams and not sent yet (all streams).
        self.read_ahead_bytes = 0
        #: Ids of the shards held here; filled by `load`, kept up to date by the handlers.
        self.shard_ids: set[str] = set()
        #: Ids of shards found damaged on disk since start (a subset of `shard_ids`): kept
        #: on disk, left out of shard reports so that the metadata leader rebuilds them.
        self.corrupt: set[str] = set()
        #: Shard id -> when the metadata first named it unreferenced (as of the last report):
        #: the grace before deleting it runs from then (see `collect_garbage`).
        self.unreferenced_since: dict[str, float] = {}
        # Garbage collections in flight, and the shards committed here meanwhile: a copy
        # put back while its old file is deleted must stay known (`_forget_collected`).
        self._collecting = 0
        self._stored_while_collecting: set[str] = set()
        #: True once `scan` has listed the store.
        self.ready = False
        #: (st_dev, st_ino) of the store's shards directory when `scan` listed it: a file
        #: missing from another directory in its place is not a lost shard.
        self.shards_dir_id: tuple[int, int] | None = None
        # Whether the shards directory was last found gone: it is said once, not per read.
        self._shards_dir_lost = False
        #: Serves RebuildShard; None without `peers`.
        self.rebuilder: ShardRebuilder | None = None
        if peers is not None:
            self.rebuilder = ShardRebuilder(self, peers, max_rebuilds=max_rebuilds)

    # --- start-up and status -------------------------------------------------------------

    def scan(self) -> defer.Deferred[int]:
        """List the store (in the executor) into `shard_ids`, damaged headers into `corrupt`.

        Also primes the store's used-bytes total. Fires with the number of shards.
        """
        return self.executor(self._scan).addCallback(self._scanned)

    def _scan(self) -> tuple[set[str], set[str], tuple[int, int]]:
        ids: set[str] = set()
        corrupt: set[str] = set()
        st = os.stat(self.store.shards_dir)
        for stat in self.store.list():
            ids.add(stat.shard_id)
            if stat.corrupt:
                corrupt.add(stat.shard_id)
        # Shards found damaged before the restart (bad cells the header check cannot see).
        corrupt |= load_damage(self.damage_path, self.node_id) & ids
        self.store.usage()
        return ids, corrupt, (st.st_dev, st.st_ino)

    def _scanned(self, found: tuple[set[str], set[str], tuple[int, int]]) -> int:
        self.shard_ids, self.corrupt, self.shards_dir_id = found
        self.ready = True
        return len(self.shard_ids)

    def handlers(self) -> Mapping[type, Handler]:
        """The wire handlers this server provides."""
        return {
            PutShard: self.put_shard,
            GetShard: self.get_shard,
            DeleteShards: self.delete_shards,
            RebuildShard: self.rebuild_shard,
        }

    def load(self) -> dict[str, float]:
        """The heartbeat's `load`: traffic rates and the count of known-corrupt shards."""
        rates = self.meter.rates(LOAD_COUNTERS)
        rates["corrupt_shards"] = float(len(self.corrupt))
        return rates

    def _error(self, code: str, message: str) -> WireError:
        self.meter.add("errors")
        return WireError(code, message)

    # --- PutShard ------------------------------------------------------------------------

    def put_shard(self, request: Request) -> defer.Deferred[ShardStored]:
        """Receive a streamed upload; answer ShardStored once the shard is durable."""
        return defer.Deferred.fromCoroutine(self._put_shard(request))

    async def _check_token(self, request: Request, msg: PutShard) -> None:
        """Refuse an upload that does not carry its block group's token (see
        dogfs.security.tokens), or that would rewrite a shard held here, unless tokens are
        not checked here or a node sends it."""
        if not self.check_tokens:
            return
        identity = getattr(request.connection, "identity", None)
        if identity is not None and identity.role is Role.NODE:
            return  # a repair or a move between chunk servers: a cluster member
        key = self.block_key
        if key is None and self.fetch_block_key is not None:
            # The key was chosen after this server's last heartbeat (a new cluster's first
            # second): ask for it now rather than fail the upload.
            key = await self.fetch_block_key(0.0)
        if key is None:
            raise self._error(
                "not_ready",
                f"{self.node_id} has not yet been sent the cluster's block key by the metadata "
                f"leader, so it cannot check the upload of shard {msg.shard_id}: try again",
            )
        # The id is valid (checked before): its first 16 hex digits are the block group's.
        bg_id = int(msg.shard_id[:16], 16)
        if not valid_block_token(key, bg_id, msg.token) and self.fetch_block_key is not None:
            # The key may have changed since the last heartbeat (a namespace restored from a
            # backup chooses a new one): ask, unless a reply came within the last second.
            fresh = await self.fetch_block_key(KEY_FRESH_FOR)
            key = fresh if fresh is not None else key
        if not valid_block_token(key, bg_id, msg.token):
            who = f"identity '{identity.name}'" if identity is not None else "this connection"
            raise self._error(
                "permission_denied",
                f"{who} may not write shard {msg.shard_id}: the upload does not carry its block "
                f"group's block token, which only the metadata's allocation of that block group "
                f"gives (a client of a release before block tokens sends none)",
            )
        if msg.shard_id in self.shard_ids:
            # A client writes each shard once (a failed group is written again under a new
            # block group id), so this would be its holder's token reused to rewrite the
            # shards of a committed file behind the namespace's back.
            raise self._error(
                "exists",
                f"{self.node_id} already holds shard {msg.shard_id}: a client writes a shard once, "
                "and a failed upload is written again under a new block group",
            )

    async def _put_shard(self, request: Request) -> ShardStored:
        msg: PutShard = request.msg
        shard_id = msg.shard_id
        try:
            validate_shard_id(shard_id)
        except InvalidShardId as e:
            raise self._error("invalid_argument", str(e)) from None
        if not 0 < msg.fragment_size <= self.limits.max_payload:
            raise self._error(
                "invalid_argument",
                f"fragment size {msg.fragment_size} of shard {shard_id} is not between 1 and "
                f"{self.limits.max_payload} bytes",
            )
        connection = request.connection
        open_uploads = self.open_uploads(connection)
        if open_uploads >= self.max_uploads:
            raise self._error(
                "busy",
                f"{self.node_id} is already receiving {open_uploads} uploads on this connection, "
                f"the most it takes at once: send shard {shard_id} once one of them has ended",
            )
        info = ShardInfo(shard_id, msg.policy, msg.index, msg.fragment_size)
        streams = self.uploads.setdefault(connection, set())
        streams.add(request)
        try:
            # Counted among the open uploads meanwhile: it may wait for the block key.
            await self._check_token(request, msg)
            data_bytes = await self._store_upload(request, info)
        finally:
            streams.discard(request)
        self.stored(shard_id)
        self.meter.add("put_ops")
        self.meter.add("put_bytes", data_bytes)
        return ShardStored(shard_id, data_bytes)

    def open_uploads(self, connection: Any) -> int:
        """PutShard streams still live on ``connection``: one its client aborted (or that was
        answered) no longer counts, though its handler may still be finishing a write; the
        client has freed its slot for it already."""
        return sum(1 for request in self.uploads.get(connection, ()) if not request.failed)

    async def _store_upload(self, request: Request, info: ShardInfo) -> int:
        """Write the upload's cells into a new shard and commit it; returns its fragment bytes."""
        shard_id = info.shard_id
        with self.storing(shard_id):
            try:
                # Creating the temporary file and writing its 128-byte placeholder is a short
                # page-cache operation: not worth a thread hop.
                writer = self.store.begin(info)
            except ValueError as e:  # policy name or index not matching the id
                raise self._error("invalid_argument", str(e)) from None
        committed = False
        try:
            _stat, data_bytes = await self._receive(request, writer)
            committed = True
        finally:
            if not committed:
                writer.abort()
        return data_bytes

    async def _receive(self, request: Request, writer: ShardWriter) -> tuple[ShardStat, int]:
        """Append every cell of the upload, then commit; returns (stat, fragment bytes).

        Cells that arrived while the previous ones were being written go to the writing
        thread together, in one trip.
        """
        shard_id = writer.shard_id
        fragment_size = writer.info.fragment_size
        data_bytes = 0
        short_seen = False
        batch: list[tuple[memoryview, int]] = []
        while True:
            part = await request.next_part()  # WireError if the client aborts or vanishes
            if part is None:
                raise self._error(
                    "invalid_argument", f"the upload of shard {shard_id} ended without PutShardEnd"
                )
            msg, payload = part
            if isinstance(msg, PutShardEnd):
                break
            if not isinstance(msg, Cell):
                raise self._error(
                    "invalid_argument",
                    f"unexpected {type(msg).__name__} in the upload of shard {shard_id}",
                )
            expected = writer.cells + len(batch)
            if msg.index != expected:
                raise self._error(
                    "invalid_argument",
                    f"cell {msg.index} of shard {shard_id} arrived out of order: "
                    f"expected cell {expected}",
                )
            size = len(payload)
            if short_seen or not 0 < size <= fragment_size:
                raise self._error(
                    "invalid_argument",
                    f"cell {msg.index} of shard {shard_id} has {size} bytes; every cell but "
                    f"the last must have {fragment_size}",
                )
            short_seen = size < fragment_size
            batch.append((payload, msg.crc))
            data_bytes += size
            # The wire stopped counting the cell once it handed it over: an upload left open
            # must not pin it (its receive buffer) while it waits for the next frame.
            del part, payload
            if not request.part_ready or len(batch) >= MAX_CELLS_PER_WRITE:
                await self._append(writer, batch)
                batch = []
        if batch:
            await self._append(writer, batch)
        if msg.cells != writer.cells:
            raise self._error(
                "invalid_argument",
                f"the upload of shard {shard_id} announced {msg.cells} cells but sent "
                f"{writer.cells}",
            )
        with self.storing(shard_id):
            stat: ShardStat = await self.executor(writer.commit)  # fsync: never on the reactor
        return stat, data_bytes

    async def _append(self, writer: ShardWriter, cells: list[tuple[memoryview, int]]) -> None:
        shard_id = writer.shard_id
        # The sizes are checked by the caller, so a ValueError from append means the CRC.
        with self.storing(shard_id):
            try:
                if self.append_in_executor:
                    await self.executor(writer.append_cells, cells)
                else:
                    writer.append_cells(cells)
            except ValueError:
                raise self._error(
                    "corrupt_in_transit", f"cell {writer.cells} of shard {shard_id} arrived corrupted"
                ) from None

    @contextmanager
    def storing(self, shard_id: str) -> Iterator[None]:
        """Answer a failure of the store while writing ``shard_id`` as the wire does: a full
        store is `no_space`; any other store or disk error (OSError too) is this server's
        storage failing, `storage_error`, and the client writes elsewhere."""
        try:
            yield
        except ShardStoreFull:
            raise self._no_space(shard_id) from None
        except (ShardStoreError, OSError) as e:
            raise self._storage_error(shard_id, e) from None

    def _no_space(self, shard_id: str) -> WireError:
        log.warn("{node} has no space left for shard {shard}", node=self.node_id, shard=shard_id)
        return self._error("no_space", f"{self.node_id} has no space left for shard {shard_id}")

    def _storage_error(self, shard_id: str, e: Exception) -> WireError:
        log.error("{node} cannot store shard {shard}: {error}", node=self.node_id, shard=shard_id, error=e)
        return self._error("storage_error", f"{self.node_id} could not store shard {shard_id}: {e}")

    # --- GetShard ------------------------------------------------------------------------

    def get_shard(self, request: Request) -> defer.Deferred[GetShardEnd]:
        """Stream the requested cells (Cell(i, crc) + fragment each), then GetShardEnd."""
        return defer.Deferred.fromCoroutine(self._get_shard(request))

    async def _get_shard(self, request: Request) -> GetShardEnd:
        msg: GetShard = request.msg
        shard_id = msg.shard_id
        try:
            validate_shard_id(shard_id)
        except InvalidShardId as e:
            raise self._error("invalid_argument", str(e)) from None
        try:
            # A stream of several large cells reads them with direct I/O where it can
            # (_send_cells; ShardStore.open decides from the header whether they are large).
            reader: ShardReader = await self.executor(self.store.open, shard_id, msg.count != 1)
        except ShardNotFound:
            try:
                await self.file_gone(shard_id)
            except ShardsDirLost as e:
                raise self._error("storage_error", f"{self.node_id} cannot read shard {shard_id}: {e}") from None
            raise self._error("not_found", f"{self.node_id} has no shard {shard_id}") from None
        except ShardCorrupt as e:
            raise self._corrupt(e) from None
        except OSError as e:
            raise self._unreadable(shard_id, None, e) from None
        try:
            cells = reader.cells
            first, count = msg.first, msg.count
            if count == -1:
                count = cells - first
            if first < 0 or count < 0 or first + count > cells:
                raise self._error(
                    "invalid_argument",
                    f"cells {first} to {first + msg.count - 1 if msg.count >= 0 else 'end'} "
                    f"are out of range for shard {shard_id}, which has {cells} cells",
                )
            await self._send_cells(request, reader, first, count)
        finally:
            reader.close()
        self.meter.add("get_ops")
        return GetShardEnd(count)

    async def _send_cells(self, request: Request, reader: ShardReader, first: int, count: int) -> None:
        """Send cells, with the next `READ_AHEAD` being read in the executor meanwhile (one,
        while the client is slow or every stream's read-ahead fills `read_ahead_budget`).
        Large cells are read with direct I/O into `read_buffers` where the reader allows it
        (`ShardReader.read_record_into`), the others through the page cache.

        Memory is bounded per connection too: a stream with nothing read ahead waits, before
        its next read, until the client takes what was sent (the transport is writable) and
        until the connection's `connection_budget` has room for the cell; read-ahead beyond
        that takes only room that is free.
        """
        end = first + count
        connection = request.connection
        budget = self._budgets.get(connection)
        if budget is None:
            budget = self._budgets[connection] = _ByteBudget(self.connection_budget)
        pending: deque[tuple[defer.Deferred[tuple[int, bytes | memoryview]], int]] = deque()
        read: Callable[[int], tuple[int, bytes | memoryview]] = reader.read_record
        if count > 1 and reader.reads_direct:
            # Straight from the disk into buffers of our own (see read_record_into), with
            # READ_AHEAD cells in flight keeping the disk busy.
            read = partial(reader.read_record_into, buffers=self.read_buffers)
        elif count > 1:
            # Shards written with direct I/O are not in memory: have the disk read the
            # whole range at once rather than as our reads reach it.
            await self.executor(reader.will_need, first, count)
        following = first
        held = 0  # bytes of this stream's cells counted in the connection's budget

        def read_next(size: int) -> None:
            """Start reading cell ``following``, whose ``size`` the budget has granted."""
            nonlocal following, held
            held += size
            pending.append((self.executor(read, following), size))
            self.read_ahead_bytes += size
            following += 1

        try:
            for i in range(first, end):
                if not pending:
                    size = reader.cell_size(following)
                    while True:
                        await connection.wait_writable()
                        await budget.acquire(size)
                        if not connection.write_blocked:
                            break
                        budget.release(size)  # blocked while we waited: wait for the client
                    read_next(size)
                # A client that is not keeping up (its connection is write-blocked) gets one
                # cell read ahead, not READ_AHEAD: memory held for slow readers stays small.
                depth = 1 if connection.write_blocked else READ_AHEAD
                while (
                    following < end
                    and len(pending) < depth
                    and self.read_ahead_bytes < self.read_ahead_budget
                    and budget.try_acquire(size := reader.cell_size(following))
                ):
                    read_next(size)
                reading, size = pending.popleft()
                try:
                    crc, fragment = await reading
                except ShardCorrupt as e:
                    raise self._corrupt(e) from None
                except OSError as e:
                    raise self._unreadable(reader.shard_id, i, e) from None
                except CellOutOfRange as e:  # the file changed under us
                    raise self._error("invalid_argument", str(e)) from None
                finally:
                    self.read_ahead_bytes -= size
                # send_part hands the cell to the transport, then waits until the transport
                # drains: the client sets the pace.
                sent = request.send_part(Cell(i, crc), fragment)
                sent_bytes = len(fragment)
                # The transport has it (or a copy); a direct read's buffer is free once this
                # view is gone, not only after the client has caught up.
                del fragment
                held -= size
                budget.release(size)
                await sent
                self.meter.add("get_bytes", sent_bytes)
        finally:
            # Never close the file while a thread still reads it.
            for d, size in pending:
                try:
                    await d
                except Exception:
                    pass
                finally:
                    self.read_ahead_bytes -= size
            if held:
                budget.release(held)

    def _unreadable(self, shard_id: str, cell: int | None, e: OSError) -> WireError:
        """A shard that could not be read; the client reads the stripe from other shards.

        If the disk lost its bytes (EIO under a bad sector: `shard_damaged`), the shard is as
        good as damaged, and reported for repair. Any other error (EMFILE, ENOMEM: the server
        short of something for a moment) is the server's, not the shard's: storage_error,
        and the shard stays healthy, to be read again next time.
        """
        where = "" if cell is None else f" cell {cell}"
        message = f"shard {shard_id}{where} on {self.node_id} cannot be read: {e}"
        if shard_damaged(e):
            return self._damaged(shard_id, message, type(e).__name__)
        log.warn("{message}", message=message)
        return self._error("storage_error", message)

    def _corrupt(self, e: ShardCorrupt) -> WireError:
        if e.cell is None:
            message = f"shard {e.shard_id} on {self.node_id} has a damaged header"
        else:
            message = f"shard {e.shard_id} cell {e.cell} on {self.node_id} failed its checksum"
        return self._damaged(e.shard_id, message, str(e))

    def file_gone(self, shard_id: str) -> defer.Deferred[bool]:
        """Forget ``shard_id``, which the disk turned out not to have (an operator deleted its
        file, a broken disk lost it): the next shard report leaves it out, and the metadata
        leader rebuilds it elsewhere. Fires with whether it was held.

        A shard with a fresh copy being written here (an upload, a rebuild) is kept: the miss
        may predate that copy, which is about to take its place. So is every shard while the
        shards directory is not the one scanned (`check_shards_dir`): the Deferred fails with
        `ShardsDirLost`.
        """
        return defer.Deferred.fromCoroutine(self._file_gone(shard_id))

    async def _file_gone(self, shard_id: str) -> bool:
        if shard_id not in self.shard_ids or self.writing(shard_id):
            return False
        await self.check_shards_dir()
        if shard_id not in self.shard_ids or self.writing(shard_id):
            return False  # deleted, or a fresh copy begun, while we looked
        self.shard_ids.discard(shard_id)
        self._undamaged(shard_id)
        self.unreferenced_since.pop(shard_id, None)
        log.warn(
            "{node} no longer has shard {shard}: its file is gone from the disk; it is left "
            "out of shard reports from now on",
            node=self.node_id, shard=shard_id,
        )
        return True

    def check_shards_dir(self) -> defer.Deferred[None]:
        """Make sure (with a stat, in the executor) that the store's shards directory is the
        one `scan` listed: there, on the same device, the same directory.

        @raise ShardsDirLost: it is not. The first time since it was last found well, one
        critical line says so.
        """
        return defer.Deferred.fromCoroutine(self._check_shards_dir())

    async def _check_shards_dir(self) -> None:
        trouble = await self.executor(self._shards_dir_trouble)
        if trouble is None:
            self._shards_dir_lost = False
            return
        message = f"the shards directory of {self.node_id} is gone or was remounted: {trouble}"
        if not self._shards_dir_lost:
            self._shards_dir_lost = True
            log.critical(
                "{lost}; no shard is forgotten for a missing file meanwhile (reads of them "
                "answer storage_error, scrubbing stops); if another disk or file system is "
                "there now, restart the server once the right one is mounted",
                lost=message,
            )
        raise ShardsDirLost(message)

    def _shards_dir_trouble(self) -> str | None:
        """Blocking: what is wrong with the store's shards directory, or None."""
        path = self.store.shards_dir
        try:
            st = os.stat(path)
        except OSError as e:
            return f"{path}: {e.strerror or e}"
        if self.shards_dir_id is not None and (st.st_dev, st.st_ino) != self.shards_dir_id:
            return (
                f"{path} is not the directory scanned at start (device and inode "
                f"{self.shards_dir_id[0]}:{self.shards_dir_id[1]} then, {st.st_dev}:{st.st_ino} now)"
            )
        return None

    def stored(self, shard_id: str) -> None:
        """A fresh copy of ``shard_id`` is committed here (an upload or a rebuild)."""
        self.shard_ids.add(shard_id)
        self._undamaged(shard_id)  # a fresh copy replaces a damaged one
        if self._collecting:
            self._stored_while_collecting.add(shard_id)

    def writing_ids(self) -> set[str]:
        """The ids of the shards being written here now (uploads and rebuilds not answered)."""
        ids = {request.msg.shard_id for streams in self.uploads.values() for request in streams}
        if self.rebuilder is not None:
            ids.update(self.rebuilder.running)
        return ids

    def writing(self, shard_id: str) -> bool:
        """Whether a copy of ``shard_id`` is being written here now (an upload or a rebuild,
        not yet answered)."""
        if self.rebuilder is not None and shard_id in self.rebuilder.running:
            return True
        return any(
            request.msg.shard_id == shard_id
            for streams in self.uploads.values()
            for request in streams
        )

    def mark_damaged(self, shard_id: str) -> None:
        """Remember ``shard_id`` as damaged: left out of shard reports (so the leader has it
        rebuilt elsewhere) and named in their `damaged`, across restarts too (`DAMAGE_FILE`)."""
        if shard_id not in self.corrupt:
            self.corrupt.add(shard_id)
            self._save_damage()

    def _undamaged(self, shard_id: str) -> None:
        """``shard_id`` is damaged no more here (a fresh copy, or no copy at all)."""
        if shard_id in self.corrupt:
            self.corrupt.discard(shard_id)
            self._save_damage()

    def _save_damage(self) -> None:
        """Write the damaged ids to `DAMAGE_FILE` in the executor, one save after another
        (each writes the set as it is when it starts, so the last one is the latest)."""

        def save(_: object) -> defer.Deferred[None]:
            return self.executor(save_damage, self.damage_path, sorted(self.corrupt))

        def failed(failure: Failure) -> None:
            failure.trap(OSError)
            log.warn("{node} could not record its damaged shards in {path}: {error}",
                     node=self.node_id, path=self.damage_path, error=failure.getErrorMessage())

        self._damage_saved = self._damage_saved.addBoth(save).addErrback(failed)

    def _damaged(self, shard_id: str, message: str, detail: str) -> WireError:
        """Remember ``shard_id`` as damaged (reported for repair) and say so to the client."""
        self.mark_damaged(shard_id)
        log.error("{message}: {detail}", message=message, detail=detail)
        return self._error("corrupt", message)

    # --- RebuildShard --------------------------------------------------------------------

    def rebuild_shard(self, request: Request) -> defer.Deferred[ShardStored]:
        """Rebuild a shard from its peers and store it (`ShardRebuilder`); answer ShardStored."""
        if self.rebuilder is None:
            return defer.fail(
                self._error("unsupported", f"{self.node_id} cannot rebuild shards: it has no way to its peers")
            )
        return self.rebuilder.rebuild_shard(request)

    # --- DeleteShards, reports and garbage collection -----------------------------------

    def delete_shards(self, request: Request) -> defer.Deferred[Ok]:
        """Delete every named shard that is present; answer Ok."""
        ids = request.msg.shard_ids
        for shard_id in ids:
            try:
                validate_shard_id(shard_id)
            except InvalidShardId as e:
                return defer.fail(self._error("invalid_argument", str(e)))
        return self.delete(ids).addCallback(lambda _: Ok())

    def delete(self, ids: Iterable[str]) -> defer.Deferred[list[str]]:
        """Delete shards (unlinks, in the executor); fires with the ids that were present."""
        return self.executor(self._unlink, list(ids)).addCallback(self._forget)

    def _unlink(self, ids: list[str]) -> list[str]:
        """Blocking: delete shards; return the ids that were present."""
        return [shard_id for shard_id in ids if self.store.delete(shard_id)]

    def _forget(self, deleted: list[str]) -> list[str]:
        # On the reactor thread: the sets are only ever changed there.
        for shard_id in deleted:
            self.shard_ids.discard(shard_id)
            self._undamaged(shard_id)
            self.unreferenced_since.pop(shard_id, None)
        return deleted

    def collect_garbage(
        self, ids: Iterable[str], now: float, grace: float
    ) -> defer.Deferred[list[str]]:
        """Delete those of `ids` (what the metadata named unreferenced in a whole shard
        report) that it has named so for `grace` seconds, and whose file was last written
        `grace` seconds before `now` or earlier.

        The file's age protects uploads the metadata has not committed yet. The time since it
        was first named protects readers of a file that was just replaced or removed: they
        hold the old block map, and its shards, old files most of the time, would otherwise
        go at the next report, seconds later. A shard no longer named is forgotten here.

        Fires with the ids deleted. Invalid and absent ids are ignored.
        """
        named = list(ids)
        since = self.unreferenced_since
        self.unreferenced_since = {i: since.get(i, now) for i in named}
        # Not one being written here now: its commit would put a fresh copy in place.
        busy = self.writing_ids()
        due = [i for i in named if now - self.unreferenced_since[i] >= grace and i not in busy]
        self._collecting += 1
        d = self.executor(self._collect, due, now - grace).addCallback(self._forget_collected)

        def ended(result: Any) -> Any:
            self._collecting -= 1
            if not self._collecting:
                self._stored_while_collecting.clear()
            return result

        return d.addBoth(ended)

    def _collect(self, ids: list[str], written_before: float) -> list[str]:
        deleted = []
        for shard_id in ids:
            try:
                if self.store.delete_unless_newer(shard_id, written_before):
                    deleted.append(shard_id)
            except InvalidShardId:
                continue
        return deleted

    def _forget_collected(self, deleted: list[str]) -> list[str]:
        """`_forget` the collected shards, but for one a commit has put back since the
        collection began, or that is being written again (a rebuild or move that brings it
        here while its old copy is deleted): all known on the reactor, no disk access."""
        back = self._stored_while_collecting | self.writing_ids()
        gone = [i for i in deleted if i not in back]
        self._forget(gone)
        return gone

    def held_ids(self) -> list[str]:
        """The ids of the shards held here and fit to serve, sorted (for shard reports).

        Those known damaged (`corrupt`) are left out, though their files stay on the disk:
        the metadata leader takes a shard missing from its server's reports for lost, and
        rebuilds it elsewhere. The reports name them apart (`ShardReport.damaged`): once the
        leader no longer places one here (rebuilt elsewhere), it names it unreferenced and
        it is collected as garbage; until then its file stays, for inspection, unless a fresh
        copy replaces it or a DeleteShards names it.
        """
        return sorted(self.shard_ids - self.corrupt)

    def status(self) -> defer.Deferred[tuple[int, int, int]]:
        """``(filesystem capacity, bytes used by shards, shard count)``.

        The count is of every shard file held, damaged ones included (they take room in the
        bytes used too; the load's ``corrupt_shards`` says how many of them are damaged), so
        it can exceed the length of a shard report.

        The first call scans the store in the executor; later ones need only a statvfs and a
        running total, and are answered at once: behind the queue of disk work (a busy
        server's reads and writes), a heartbeat could come late enough for the metadata to
        call a busy, healthy server dead.
        """
        d: defer.Deferred[tuple[int, int]]
        if self.store.usage_known:
            d = defer.maybeDeferred(self.store.usage)
        else:
            d = self.executor(self.store.usage)
        return d.addCallback(lambda usage: (usage[0], usage[1], len(self.shard_ids)))
