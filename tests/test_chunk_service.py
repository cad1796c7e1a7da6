# -*- test-case-name: tests.test_chunk_service -*-
"""Tests for dogfs.chunk: the shard RPCs, heartbeats, shard reports, GC and the service tree.

The handlers run over an in-memory connection pair (twisted.test.iosim) against a real
ShardStore in a temporary directory, with a synchronous executor so every test is
deterministic; heartbeats run on a task.Clock against fake metadata nodes.
"""

from __future__ import annotations

import errno
import os
import random
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from dogfs.chunk.heartbeat import HeartbeatService
from dogfs.chunk.load import LoadMeter
from dogfs.chunk.server import KEY_FRESH_FOR, READ_AHEAD, ShardServer, synchronous_executor
from dogfs.chunk.service import ChunkService
from dogfs.codec.checksum import crc32c
from dogfs.config import ChunkConfig
from dogfs.plugins import chunk as chunk_plugin
from dogfs.security.roles import Identity, Role
from dogfs.security.tokens import block_token
from dogfs.storage.shards import (
    DIRECT_ALIGN,
    DIRECT_READ_MIN,
    HEADER_SIZE,
    RECORD_OVERHEAD,
    ShardReader,
    ShardStore,
    ShardWriter,
)
from dogfs.wire.messages import (
    Cell,
    DeleteShards,
    GetShard,
    GetShardEnd,
    Heartbeat,
    HeartbeatReply,
    Ok,
    PutShard,
    PutShardEnd,
    ShardReport,
    ShardReportReply,
    ShardStored,
)
from dogfs.wire.protocol import Connection, Reply, Request, WireError

SHARD = "000000000000002a-03"
OTHER = "000000000000002b-03"
FRAGMENT = 1000


def fragments(count: int, last: int = 300, seed: int = 1) -> list[bytes]:
    """`count` fragments of FRAGMENT bytes, the last one `last` bytes long."""
    out = [bytes([(seed + i) % 256]) * FRAGMENT for i in range(count)]
    out[-1] = out[-1][:last]
    return out


def pair(
    handlers: dict[type, Any], clock: Clock, server_id: str = "chunk-3", identity: Any = None
) -> tuple[Connection, IOPump]:
    """A client Connection wired in memory to a server Connection serving `handlers`; the
    server side takes the client for `identity` (as its TLS handshake would have it)."""
    server = Connection(clock, handlers, node_id=server_id)
    if identity is not None:
        server.identity = identity  # type: ignore[attr-defined]
    client = Connection(clock, {}, node_id="client")
    pump = connect(server, FakeTransport(server, True), client, FakeTransport(client, False), clock=None)
    return client, pump


HeldCalls = list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]]


def held_executor() -> tuple[HeldCalls, Any]:
    """An executor whose calls wait until the test runs them (a busy disk thread)."""
    calls: HeldCalls = []

    def executor(f: Any, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        calls.append((f, args, d))
        return d

    return calls, executor


def run_held(calls: HeldCalls, pump: IOPump, limit: int | None = None) -> list[int]:
    """Run the held calls in order (and any they lead to), at most ``limit`` of them; the
    cell counts of the appends among them."""
    written = []
    while calls and (limit is None or limit > 0):
        f, args, d = calls.pop(0)
        if getattr(f, "__name__", "") == "append_cells":
            written.append(len(args[0]))
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)
        pump.flush()
        if limit is not None:
            limit -= 1
    return written


class Harness:
    """A ShardServer on a temp dir, and a client connected to it in memory."""

    def __init__(
        self, root: str, *, writev: Any = os.writev, append_in_executor: bool = True, identity: Any = None
    ) -> None:
        self.clock = Clock()
        self.store = ShardStore(root, writev=writev)
        self.server = ShardServer(
            self.store, "chunk-3", synchronous_executor, LoadMeter(self.clock),
            append_in_executor=append_in_executor,
        )
        self.server.scan()
        self.client, self.pump = pair(dict(self.server.handlers()), self.clock, identity=identity)

    def put(
        self,
        shard_id: str,
        frags: Sequence[bytes],
        *,
        crcs: Sequence[int] | None = None,
        indexes: Sequence[int] | None = None,
        announced: int | None = None,
        fragment_size: int = FRAGMENT,
        token: str | None = None,
    ) -> defer.Deferred[Reply]:
        """Upload a shard cell by cell, optionally with wrong CRCs, order or count."""
        upload = self.client.open_stream(PutShard(shard_id, "RS-4-2", int(shard_id[17:]), fragment_size, token))
        for i, fragment in enumerate(frags):
            crc = crcs[i] if crcs is not None else crc32c(fragment)
            index = indexes[i] if indexes is not None else i
            upload.send(Cell(index, crc), fragment)
            self.pump.flush()
        d = upload.finish(PutShardEnd(len(frags) if announced is None else announced))
        self.pump.flush()
        return d

    def get(self, shard_id: str, first: int = 0, count: int = -1) -> tuple[defer.Deferred[Reply], list[tuple[Cell, bytes]]]:
        """Read cells; returns the final Deferred and the (Cell, payload) parts received."""
        parts: list[tuple[Cell, bytes]] = []
        d = self.client.call(GetShard(shard_id, first, count), on_part=lambda m, p: parts.append((m, bytes(p))))
        self.pump.flush()
        return d, parts

    def tmp_files(self) -> list[str]:
        """Files left in the store's temporary directory."""
        return os.listdir(self.store.tmp_dir)


class PutGetTests(SynchronousTestCase):
    """Uploads and reads of whole shards and ranges."""

    def setUp(self) -> None:
        self.h = Harness(self.mktemp())

    def test_round_trip(self) -> None:
        """A shard put cell by cell (the last one shorter) reads back identical, CRCs with it."""
        frags = fragments(5)
        reply = self.successResultOf(self.h.put(SHARD, frags))
        self.assertEqual(reply.msg, ShardStored(SHARD, 4 * FRAGMENT + 300))
        d, parts = self.h.get(SHARD)
        self.assertEqual(self.successResultOf(d).msg, GetShardEnd(5))
        self.assertEqual([p for _, p in parts], frags)
        self.assertEqual([m for m, _ in parts], [Cell(i, crc32c(f)) for i, f in enumerate(frags)])
        self.assertEqual(self.h.server.shard_ids, {SHARD})
        self.assertEqual(self.h.tmp_files(), [])

    def test_round_trip_appending_on_the_reactor(self) -> None:
        """With appends on the calling thread instead of the executor, the result is the same,
        and a corrupt cell is still refused."""
        h = Harness(self.mktemp(), append_in_executor=False)
        frags = fragments(3)
        self.successResultOf(h.put(SHARD, frags))
        d, parts = h.get(SHARD)
        self.successResultOf(d)
        self.assertEqual([p for _, p in parts], frags)
        crcs = [crc32c(f) for f in frags]
        crcs[2] ^= 4
        error = self.failureResultOf(h.put(OTHER, frags, crcs=crcs), WireError).value
        self.assertEqual(error.code, "corrupt_in_transit")

    def test_range_get(self) -> None:
        """first/count select cells; count -1 means to the end; an empty tail is allowed."""
        frags = fragments(5)
        self.successResultOf(self.h.put(SHARD, frags))
        for first, count, expected in [(2, 2, [2, 3]), (4, -1, [4]), (0, 1, [0]), (5, -1, []), (3, 0, [])]:
            d, parts = self.h.get(SHARD, first, count)
            self.assertEqual(self.successResultOf(d).msg, GetShardEnd(len(expected)))
            self.assertEqual([m.index for m, _ in parts], expected)
            self.assertEqual([p for _, p in parts], [frags[i] for i in expected])

    def test_large_cells_stream_with_direct_reads(self) -> None:
        """A stream of cells of DIRECT_READ_MIN or more is read with direct I/O into the
        server's pooled buffers: the same cells and CRCs arrive, every buffer is free again
        once they are sent, and a cell damaged on disk is reported as through the cache."""
        if not self.h.store.direct_io:
            raise SkipTest("this file system does not accept O_DIRECT")
        size = DIRECT_READ_MIN + 100
        rng = random.Random(5)
        frags = [rng.randbytes(size) for _ in range(5)] + [rng.randbytes(777)]
        self.successResultOf(self.h.put(SHARD, frags, fragment_size=size))
        d, parts = self.h.get(SHARD)
        self.assertEqual(self.successResultOf(d).msg, GetShardEnd(6))
        self.assertEqual([p for _, p in parts], frags)
        self.assertEqual([m for m, _ in parts], [Cell(i, crc32c(f)) for i, f in enumerate(frags)])
        pool = self.h.server.read_buffers
        self.assertTrue(pool._buffers)
        self.assertTrue(all(pool._free(i) for i in range(len(pool._buffers))))
        with self.h.store.open(SHARD) as reader:
            offset = reader.cell_offset(3) + RECORD_OVERHEAD + 5
        with open(self.h.store.path(SHARD), "r+b") as f:
            f.seek(offset)
            f.write(b"\xff\x00\xff")
        d, parts = self.h.get(SHARD, 2, -1)
        error = self.failureResultOf(d, WireError).value
        self.assertEqual(error.code, "corrupt")
        self.assertEqual(error.message, f"shard {SHARD} cell 3 on chunk-3 failed its checksum")
        self.assertEqual([m.index for m, _ in parts], [2])

    def test_range_out_of_bounds(self) -> None:
        """A range outside the shard's cells is invalid_argument and sends no cells."""
        self.successResultOf(self.h.put(SHARD, fragments(5)))
        for first, count in [(3, 5), (-1, 1), (6, -1), (0, -2), (5, 1)]:
            d, parts = self.h.get(SHARD, first, count)
            error = self.failureResultOf(d, WireError).value
            self.assertEqual(error.code, "invalid_argument", (first, count))
            self.assertIn("out of range", error.message)
            self.assertEqual(parts, [])

    def test_replace(self) -> None:
        """A second put of the same id replaces the first atomically."""
        self.successResultOf(self.h.put(SHARD, fragments(3, seed=1)))
        new = fragments(2, last=FRAGMENT, seed=9)
        self.successResultOf(self.h.put(SHARD, new))
        d, parts = self.h.get(SHARD)
        self.successResultOf(d)
        self.assertEqual([p for _, p in parts], new)

    def test_counters(self) -> None:
        """Puts and gets are counted into the heartbeat's load rates."""
        self.successResultOf(self.h.put(SHARD, fragments(2)))
        self.successResultOf(self.h.get(SHARD)[0])
        self.failureResultOf(self.h.get(OTHER)[0], WireError)
        self.h.clock.advance(1)
        load = self.h.server.load()
        self.assertEqual(load["put_ops_s"], 1.0)
        self.assertEqual(load["put_bytes_s"], FRAGMENT + 300.0)
        self.assertEqual(load["get_ops_s"], 1.0)
        self.assertEqual(load["get_bytes_s"], FRAGMENT + 300.0)
        self.assertEqual(load["errors_s"], 1.0)
        self.assertEqual(load["corrupt_shards"], 0.0)


class PutErrorTests(SynchronousTestCase):
    """Refused uploads leave nothing behind."""

    def setUp(self) -> None:
        self.h = Harness(self.mktemp())

    def assertNothingStored(self, shard_id: str = SHARD) -> None:
        self.assertFalse(os.path.exists(self.h.store.path(shard_id)))
        self.assertEqual(self.h.tmp_files(), [])
        self.assertNotIn(shard_id, self.h.server.shard_ids)

    def test_corrupt_in_transit(self) -> None:
        """A cell whose payload does not match its CRC is refused, naming cell and shard."""
        frags = fragments(3)
        crcs = [crc32c(f) for f in frags]
        crcs[1] ^= 1
        error = self.failureResultOf(self.h.put(SHARD, frags, crcs=crcs), WireError).value
        self.assertEqual(error.code, "corrupt_in_transit")
        self.assertEqual(error.message, f"cell 1 of shard {SHARD} arrived corrupted")
        self.assertNothingStored()

    def test_cells_that_queue_are_written_together(self) -> None:
        """Cells that arrive while a write is under way go to the disk thread in one call."""
        calls, executor = held_executor()
        self.h.server.executor = executor
        frags = fragments(6)
        d = self.h.put(SHARD, frags)
        self.assertEqual(run_held(calls, self.h.pump), [1, 5])
        self.assertEqual(self.successResultOf(d).msg, ShardStored(SHARD, 5 * FRAGMENT + 300))
        self.assertEqual(self.h.store.read_cells(SHARD, 0, 6), frags)

    def test_corrupt_cell_inside_a_batch(self) -> None:
        """A bad CRC in the middle of cells written together names that cell; nothing stays."""
        calls, executor = held_executor()
        self.h.server.executor = executor
        frags = fragments(6)
        crcs = [crc32c(f) for f in frags]
        crcs[3] ^= 1
        d = self.h.put(SHARD, frags, crcs=crcs)
        run_held(calls, self.h.pump)
        error = self.failureResultOf(d, WireError).value
        self.assertEqual(error.code, "corrupt_in_transit")
        self.assertEqual(error.message, f"cell 3 of shard {SHARD} arrived corrupted")
        self.assertNothingStored()

    def test_aborted_upload(self) -> None:
        """An upload the client aborts halfway leaves no shard and no temporary file."""
        upload = self.h.client.open_stream(PutShard(SHARD, "RS-4-2", 3, FRAGMENT))
        for i, fragment in enumerate(fragments(3, last=FRAGMENT)):
            upload.send(Cell(i, crc32c(fragment)), fragment)
        self.h.pump.flush()
        self.assertEqual(len(self.h.tmp_files()), 1)  # in progress
        upload.abort("client gave up")
        self.h.pump.flush()
        self.assertNothingStored()

    def test_connection_lost_midway(self) -> None:
        """An upload cut off by a lost connection leaves nothing behind."""
        upload = self.h.client.open_stream(PutShard(SHARD, "RS-4-2", 3, FRAGMENT))
        upload.send(Cell(0, crc32c(b"x" * FRAGMENT)), b"x" * FRAGMENT)
        self.h.pump.flush()
        self.h.client.transport.loseConnection()
        self.h.pump.flush()
        self.assertNothingStored()
        self.failureResultOf(upload.finish(PutShardEnd(1)), WireError)

    def test_invalid_shard_id(self) -> None:
        """A malformed shard id is invalid_argument, for puts and gets."""
        upload = self.h.client.open_stream(PutShard("../../etc-03", "RS-4-2", 3, FRAGMENT))
        d = upload.finish(PutShardEnd(0))
        self.h.pump.flush()
        self.assertEqual(self.failureResultOf(d, WireError).value.code, "invalid_argument")
        d2, _ = self.h.get("nope")
        self.assertEqual(self.failureResultOf(d2, WireError).value.code, "invalid_argument")
        self.assertEqual(self.h.tmp_files(), [])

    def test_out_of_order(self) -> None:
        """A cell that is not the next index is refused."""
        error = self.failureResultOf(self.h.put(SHARD, fragments(3), indexes=[0, 2, 1]), WireError).value
        self.assertEqual(error.code, "invalid_argument")
        self.assertIn("out of order", error.message)
        self.assertNothingStored()

    def test_count_mismatch(self) -> None:
        """PutShardEnd announcing another cell count is refused, and nothing is committed."""
        error = self.failureResultOf(self.h.put(SHARD, fragments(3), announced=4), WireError).value
        self.assertEqual(error.code, "invalid_argument")
        self.assertIn("announced 4 cells but sent 3", error.message)
        self.assertNothingStored()

    def test_short_cell_not_last(self) -> None:
        """Only the last cell may be shorter than the fragment size."""
        frags = [b"a" * FRAGMENT, b"b" * 10, b"c" * FRAGMENT]
        error = self.failureResultOf(self.h.put(SHARD, frags), WireError).value
        self.assertEqual(error.code, "invalid_argument")
        self.assertNothingStored()

    def test_oversized_cell(self) -> None:
        """A cell bigger than the announced fragment size is refused."""
        error = self.failureResultOf(self.h.put(SHARD, [b"a" * (FRAGMENT + 1)]), WireError).value
        self.assertEqual(error.code, "invalid_argument")
        self.assertNothingStored()

    def test_no_space(self) -> None:
        """ENOSPC while writing is no_space naming the node and shard; nothing is left."""
        calls = {"n": 0}

        def writev(fd: int, pieces: Sequence[Any]) -> int:
            calls["n"] += 1
            if calls["n"] > 2:  # the placeholder header and one cell fit
                raise OSError(errno.ENOSPC, "No space left on device")
            return os.writev(fd, pieces)

        h = Harness(self.mktemp(), writev=writev)
        error = self.failureResultOf(h.put(SHARD, fragments(3)), WireError).value
        self.assertEqual(error.code, "no_space")
        self.assertEqual(error.message, f"chunk-3 has no space left for shard {SHARD}")
        self.assertEqual(h.tmp_files(), [])
        self.assertFalse(os.path.exists(h.store.path(SHARD)))


class BlockTokenTests(SynchronousTestCase):
    """With tokens checked (TLS), an upload needs its block group's token unless a node
    sends it (dogfs.security.tokens)."""

    KEY = "6d" * 32

    def harness(self, role: Role, key: str | None = KEY) -> Harness:
        h = Harness(self.mktemp(), identity=Identity("alice" if role is not Role.NODE else "chunk-1", role, 7))
        h.server.check_tokens = True
        h.server.block_key = key
        return h

    def test_upload_needs_its_block_groups_token(self) -> None:
        """A user's upload without a token, with another block group's, or with a token under
        another key is refused (permission_denied, naming the identity and the shard) and
        leaves nothing; with its own token it is stored."""
        h = self.harness(Role.USER)
        bg = int(SHARD[:16], 16)
        for token in (None, block_token(self.KEY, bg + 1), block_token("d6" * 32, bg), "x" * 32):
            error = self.failureResultOf(h.put(SHARD, fragments(2), token=token), WireError).value
            self.assertEqual(error.code, "permission_denied")
            self.assertIn("identity 'alice'", error.message)
            self.assertIn(SHARD, error.message)
            self.assertEqual(h.server.shard_ids, set())
            self.assertEqual(h.tmp_files(), [])
        self.successResultOf(h.put(SHARD, fragments(2), token=block_token(self.KEY, bg)))
        self.assertEqual(h.server.shard_ids, {SHARD})

    def test_a_shard_is_written_once(self) -> None:
        """With its token still in hand, a user cannot rewrite a shard once stored (the
        shards of a committed file, behind the namespace's back): "exists", and the shard
        reads back as first written."""
        h = self.harness(Role.USER)
        token = block_token(self.KEY, int(SHARD[:16], 16))
        first = fragments(2)
        self.successResultOf(h.put(SHARD, first, token=token))
        error = self.failureResultOf(h.put(SHARD, [b"\xee" * FRAGMENT] * 2, token=token), WireError).value
        self.assertEqual(error.code, "exists")
        self.assertIn(SHARD, error.message)
        d, parts = h.get(SHARD)
        self.successResultOf(d)
        self.assertEqual([payload for _, payload in parts], first)

    def test_nodes_need_no_token(self) -> None:
        """A node (a repair, a move) writes without a token, and may write a shard again."""
        h = self.harness(Role.NODE)
        self.successResultOf(h.put(SHARD, fragments(2)))
        self.successResultOf(h.put(SHARD, fragments(2)))
        self.assertEqual(h.server.shard_ids, {SHARD})

    def test_no_key_yet_is_not_ready(self) -> None:
        """A server that has not been sent the key yet cannot check a token: "not ready"."""
        h = self.harness(Role.ADMIN, key=None)
        error = self.failureResultOf(h.put(SHARD, fragments(1), token=block_token(self.KEY, 1)), WireError).value
        self.assertEqual(error.code, "not_ready")
        self.assertEqual(h.server.shard_ids, set())

    def test_no_key_yet_is_asked_for(self) -> None:
        """A server without the key asks for it (an extra heartbeat) before it answers: the
        upload waits, counted among the connection's open ones, and goes on once the key
        comes; if the reply brings none, "not ready"."""
        h = self.harness(Role.USER, key=None)
        asked: list[defer.Deferred[str | None]] = []

        def fetch(max_age: float) -> defer.Deferred[str | None]:
            asked.append(defer.Deferred())
            return asked[-1]

        h.server.fetch_block_key = fetch
        bg = int(SHARD[:16], 16)
        stored = h.put(SHARD, fragments(2), token=block_token(self.KEY, bg))
        self.assertNoResult(stored)
        self.assertEqual(len(asked), 1)
        self.assertEqual([h.server.open_uploads(c) for c in list(h.server.uploads)], [1])
        h.server.block_key = self.KEY
        asked[0].callback(self.KEY)
        h.pump.flush()
        self.successResultOf(stored)
        self.assertEqual(h.server.shard_ids, {SHARD})

        h.server.block_key = None
        other = f"{bg + 1:016x}" + SHARD[16:]
        refused = h.put(other, fragments(1), token=block_token(self.KEY, bg + 1))
        asked[1].callback(None)
        h.pump.flush()
        self.assertEqual(self.failureResultOf(refused, WireError).value.code, "not_ready")
        self.assertEqual(h.server.shard_ids, {SHARD})

    def test_changed_key_is_asked_for(self) -> None:
        """A token the server's key refuses makes it ask for the key (it may have changed: a
        restored namespace chooses a new one), with the freshness it may skip asking for;
        under the new key the upload is stored, and a bad token is still refused."""
        new = "e7" * 32
        h = self.harness(Role.USER)
        asked: list[float] = []

        def fetch(max_age: float) -> defer.Deferred[str | None]:
            asked.append(max_age)
            h.server.block_key = new
            return defer.succeed(new)

        h.server.fetch_block_key = fetch
        bg = int(SHARD[:16], 16)
        self.successResultOf(h.put(SHARD, fragments(1), token=block_token(new, bg)))
        self.assertEqual(asked, [KEY_FRESH_FOR])
        other = f"{bg + 1:016x}" + SHARD[16:]
        error = self.failureResultOf(h.put(other, fragments(1), token=block_token(self.KEY, bg + 1)), WireError)
        self.assertEqual(error.value.code, "permission_denied")
        self.assertEqual(len(asked), 2)
        self.assertEqual(h.server.shard_ids, {SHARD})

    def test_unchecked_without_tls(self) -> None:
        """Without TLS (no identities) nothing is checked, as for every permission."""
        h = Harness(self.mktemp())
        self.successResultOf(h.put(SHARD, fragments(1)))
        self.assertEqual(h.server.shard_ids, {SHARD})


class UploadLimitTests(SynchronousTestCase):
    """Uploads held open cost the server a bounded amount, whatever the client does."""

    def setUp(self) -> None:
        self.h = Harness(self.mktemp())

    def open_upload(self, group: int, cell: bytes, fragment_size: int = FRAGMENT) -> Any:
        """Open an upload of shard 03 of block group ``group`` and send it one cell."""
        upload = self.h.client.open_stream(PutShard(f"{group:016x}-03", "RS-4-2", 3, fragment_size))
        upload.send(Cell(0, crc32c(cell)), cell)
        self.h.pump.flush()
        return upload

    def test_open_uploads_hold_no_cell(self) -> None:
        """An upload waiting for its next frame holds no reference to the cells it already
        wrote: a client opening many uploads and sending one cell each cannot pin a cell's
        buffer per upload (the wire stopped counting them when it handed them over)."""
        written: list[memoryview] = []
        real = ShardWriter.append_cells

        def append_cells(writer: ShardWriter, cells: Any) -> None:
            written.extend(view for view, _crc in cells)
            real(writer, cells)

        self.patch(ShardWriter, "append_cells", append_cells)
        uploads = [self.open_upload(group, bytes([group]) * FRAGMENT) for group in range(20)]
        self.assertEqual(len(written), 20)
        while written:
            view = written.pop()
            # Our variable and getrefcount's argument: the server holds none of them.
            self.assertEqual(sys.getrefcount(view), 2)
        del view
        for upload in uploads:
            upload.finish(PutShardEnd(1))
        self.h.pump.flush()
        self.assertEqual(len(self.h.server.shard_ids), 20)

    def test_uploads_per_connection_are_bounded(self) -> None:
        """Past max_uploads open PutShard streams on one connection, another is refused at
        once with busy, naming the limit, and leaves no file; once one ends, the next is
        taken. Another connection has its own count."""
        server = self.h.server
        server.max_uploads = 3
        uploads = [self.open_upload(group, b"a" * FRAGMENT) for group in range(3)]
        connection = self.h.pump.server
        self.assertEqual(server.open_uploads(connection), 3)
        refused = self.open_upload(3, b"b" * FRAGMENT)
        self.assertTrue(refused.done)
        error = self.failureResultOf(refused.finish(PutShardEnd(1)), WireError).value
        self.assertEqual(error.code, "busy")
        self.assertEqual(
            error.message,
            "chunk-3 is already receiving 3 uploads on this connection, the most it takes at "
            f"once: send shard {3:016x}-03 once one of them has ended",
        )
        self.h.pump.flush()
        self.assertEqual(len(self.h.tmp_files()), 3)
        other, other_pump = pair(dict(server.handlers()), self.h.clock)
        elsewhere = other.open_stream(PutShard(f"{9:016x}-03", "RS-4-2", 3, FRAGMENT))
        d = elsewhere.finish(PutShardEnd(0))
        other_pump.flush()
        self.assertEqual(self.successResultOf(d).msg, ShardStored(f"{9:016x}-03", 0))
        d = uploads[0].finish(PutShardEnd(1))
        self.h.pump.flush()
        self.successResultOf(d)
        self.assertEqual(server.open_uploads(connection), 2)
        accepted = self.open_upload(3, b"b" * FRAGMENT)
        self.assertFalse(accepted.done)
        self.assertEqual(server.open_uploads(connection), 3)
        # Uploads cut off (aborted, or by a lost connection) count no more.
        uploads[1].abort("client gave up")
        self.h.pump.flush()
        self.assertEqual(server.open_uploads(connection), 2)
        self.h.client.transport.loseConnection()
        self.h.pump.flush()
        self.assertEqual(server.open_uploads(connection), 0)
        self.assertEqual(self.h.tmp_files(), [])
        for upload in (uploads[2], accepted):
            self.failureResultOf(upload.finish(PutShardEnd(1)), WireError)

    def test_aborted_upload_frees_its_slot_at_once(self) -> None:
        """An upload its client aborts stops counting at once, though its handler is still
        waiting for a disk write: the client freed its slot for it, and its next upload on
        the connection must not meet busy."""
        held: list[tuple[Any, defer.Deferred[Any]]] = []

        def holding(work: Any, *args: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            held.append((lambda: work(*args), d))
            return d

        server = ShardServer(self.h.store, "chunk-3", holding, LoadMeter(self.h.clock), max_uploads=1)
        client, pump = pair(dict(server.handlers()), self.h.clock)
        first = client.open_stream(PutShard(f"{1:016x}-03", "RS-4-2", 3, FRAGMENT))
        first.send(Cell(0, crc32c(b"a" * FRAGMENT)), b"a" * FRAGMENT)
        pump.flush()
        self.assertTrue(held)  # its cell's write waits in the executor
        first.abort("another shard of the block group failed")
        pump.flush()
        self.assertEqual(server.open_uploads(pump.server), 0)
        second = client.open_stream(PutShard(f"{2:016x}-03", "RS-4-2", 3, FRAGMENT))
        pump.flush()
        self.assertFalse(second.done)  # taken, not refused with busy
        while held:
            work, d = held.pop(0)
            d.callback(work())
            pump.flush()
        second.abort("done")
        pump.flush()

    def test_direct_staging_is_bounded(self) -> None:
        """Uploads held open with direct I/O hold staging buffers within the store's budget;
        the others write through the page cache, and every shard is stored whole."""
        if not self.h.store.direct_io:
            raise SkipTest("this file system does not accept O_DIRECT writes")
        size = 2 * DIRECT_ALIGN
        budget = self.h.store.staging_budget = 2 * (size + 2 * DIRECT_ALIGN)
        cells = [bytes([group]) * size for group in range(5)]
        uploads = [self.open_upload(group, cell, size) for group, cell in enumerate(cells)]
        self.assertEqual(self.h.store.staging_bytes, budget)
        for upload in uploads:
            upload.finish(PutShardEnd(1))
        self.h.pump.flush()
        self.assertEqual(self.h.store.staging_bytes, 0)
        for group, cell in enumerate(cells):
            self.assertEqual(self.h.store.read_cells(f"{group:016x}-03", 0, 1), [cell])


class ReadErrorTests(SynchronousTestCase):
    """Missing and damaged shards."""

    def setUp(self) -> None:
        self.h = Harness(self.mktemp())

    def test_not_found(self) -> None:
        """A shard that is not here is not_found, naming node and shard."""
        d, _ = self.h.get(SHARD)
        error = self.failureResultOf(d, WireError).value
        self.assertEqual((error.code, error.message), ("not_found", f"chunk-3 has no shard {SHARD}"))

    def test_corrupt_on_disk(self) -> None:
        """A flipped byte in cell 2 is caught: cells before it arrive, then a 'corrupt' error
        naming shard and cell, and the shard is remembered as corrupt."""
        frags = fragments(4)
        self.successResultOf(self.h.put(SHARD, frags))
        path = self.h.store.path(SHARD)
        offset = HEADER_SIZE + 2 * (RECORD_OVERHEAD + FRAGMENT) + RECORD_OVERHEAD + 10
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))
        d, parts = self.h.get(SHARD)
        error = self.failureResultOf(d, WireError).value
        self.assertEqual(error.code, "corrupt")
        self.assertEqual(error.message, f"shard {SHARD} cell 2 on chunk-3 failed its checksum")
        self.assertEqual([m.index for m, _ in parts], [0, 1])
        self.assertEqual(self.h.server.corrupt, {SHARD})
        self.assertEqual(self.h.server.load()["corrupt_shards"], 1.0)
        # A cell before the damage still reads.
        d, parts = self.h.get(SHARD, 1, 1)
        self.successResultOf(d)
        # A fresh upload replaces the damaged copy and clears the mark.
        self.successResultOf(self.h.put(SHARD, frags))
        self.assertEqual(self.h.server.corrupt, set())

    def test_unreadable_on_disk(self) -> None:
        """A cell the disk cannot read (EIO) ends the stream with 'corrupt' naming the error,
        and the shard is remembered as damaged (reported for repair), as a bad checksum is."""
        frags = fragments(4)
        self.successResultOf(self.h.put(SHARD, frags))
        real = ShardReader.read_record

        def read_record(reader: ShardReader, i: int) -> Any:
            if i == 2:
                raise OSError(errno.EIO, "Input/output error")
            return real(reader, i)

        self.patch(ShardReader, "read_record", read_record)
        d, parts = self.h.get(SHARD)
        error = self.failureResultOf(d, WireError).value
        self.assertEqual(error.code, "corrupt")
        self.assertEqual(error.message, f"shard {SHARD} cell 2 on chunk-3 cannot be read: [Errno 5] Input/output error")
        self.assertEqual([m.index for m, _ in parts], [0, 1])
        self.assertEqual(self.h.server.corrupt, {SHARD})

    def test_file_the_server_may_not_read(self) -> None:
        """A shard file the server may not open (EACCES) is storage_error on a read, not
        damage: a relabel or a chown under a running server forbids every file at once, and
        marking them all would have the whole disk rebuilt. The scrubber tells one file's own
        permissions from that (tests.test_chunk_scrub)."""
        frags = fragments(4)
        self.successResultOf(self.h.put(SHARD, frags))
        real = os.open

        def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if str(path).endswith(".shard"):
                raise OSError(errno.EACCES, "Permission denied")
            return real(path, flags, *args, **kwargs)

        self.patch(os, "open", open_)
        d, parts = self.h.get(SHARD)
        error = self.failureResultOf(d, WireError).value
        self.assertEqual(error.code, "storage_error")
        self.assertIn("Permission denied", error.message)
        self.assertEqual(parts, [])
        self.assertEqual(self.h.server.corrupt, set())

    def test_out_of_descriptors(self) -> None:
        """A shard the server cannot open for want of file descriptors (EMFILE) is
        storage_error, which the client answers by reading another shard; it is not marked
        damaged, and the next get, once descriptors are free, succeeds."""
        frags = fragments(4)
        self.successResultOf(self.h.put(SHARD, frags))
        real = os.open
        failing = [True]

        def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if failing[0] and str(path).endswith(".shard"):
                raise OSError(errno.EMFILE, "Too many open files")
            return real(path, flags, *args, **kwargs)

        self.patch(os, "open", open_)
        d, parts = self.h.get(SHARD)
        error = self.failureResultOf(d, WireError).value
        self.assertEqual(error.code, "storage_error")
        self.assertEqual(error.message, f"shard {SHARD} on chunk-3 cannot be read: [Errno 24] Too many open files")
        self.assertEqual(parts, [])
        self.assertEqual(self.h.server.corrupt, set())
        self.assertEqual(self.h.server.load()["corrupt_shards"], 0.0)
        failing[0] = False
        d, parts = self.h.get(SHARD)
        self.assertEqual(self.successResultOf(d).msg, GetShardEnd(4))
        self.assertEqual([p for _, p in parts], frags)

    def test_passing_read_error(self) -> None:
        """A cell read failing for want of memory (ENOMEM) ends the stream with
        storage_error; the shard stays healthy and reads whole next time."""
        frags = fragments(4)
        self.successResultOf(self.h.put(SHARD, frags))
        real = ShardReader.read_record
        failing = [True]

        def read_record(reader: ShardReader, i: int) -> Any:
            if failing[0] and i == 2:
                raise OSError(errno.ENOMEM, "Cannot allocate memory")
            return real(reader, i)

        self.patch(ShardReader, "read_record", read_record)
        d, parts = self.h.get(SHARD)
        error = self.failureResultOf(d, WireError).value
        self.assertEqual(error.code, "storage_error")
        self.assertIn("cell 2", error.message)
        self.assertEqual([m.index for m, _ in parts], [0, 1])
        self.assertEqual(self.h.server.corrupt, set())
        failing[0] = False
        d, parts = self.h.get(SHARD)
        self.assertEqual([p for _, p in parts], frags)

    def test_read_ahead_and_close_after_reads(self) -> None:
        """GetShard keeps READ_AHEAD cells being read behind the one it sends, and when a cell
        fails its checksum, the file stays open until the reads still in flight end."""
        frags = fragments(8)
        self.successResultOf(self.h.put(SHARD, frags))
        self.corrupt_cell(1)
        calls, held = held_executor()
        outcomes: list[str] = []

        def executor(f: Any, *args: Any) -> defer.Deferred[Any]:
            # Record each read's own outcome before the server awaits it (which swallows it).
            d = held(f, *args)
            if getattr(f, "__name__", "") == "read_record":
                d.addBoth(lambda r: outcomes.append(type(r).__name__ if not isinstance(r, Failure) else r.type.__name__) or r)
            return d

        self.h.server.executor = executor
        d, parts = self.h.get(SHARD)
        run_held(calls, self.h.pump, limit=2)  # open the shard, then the will_need hint
        self.assertEqual([f.__name__ for f, _, _ in calls], ["read_record"] * READ_AHEAD)
        self.assertEqual([args for _, args, _ in calls], [(i,) for i in range(READ_AHEAD)])
        run_held(calls, self.h.pump, limit=1)  # cell 0 read: sent, and cell 3 is asked for
        self.assertEqual([m.index for m, _ in parts], [0])
        self.assertEqual([args for _, args, _ in calls], [(i,) for i in range(1, READ_AHEAD + 1)])
        run_held(calls, self.h.pump, limit=1)  # cell 1 is corrupt: no answer yet
        self.assertNoResult(d)
        run_held(calls, self.h.pump)
        # Cell 1 failed its check; the reads still in flight then ran against an open file.
        self.assertEqual(outcomes, ["tuple", "ShardCorrupt"] + ["tuple"] * (READ_AHEAD - 1))
        self.assertEqual(self.failureResultOf(d, WireError).value.code, "corrupt")
        self.assertEqual([m.index for m, _ in parts], [0])

    def test_read_ahead_shrinks_for_a_slow_client(self) -> None:
        """While the connection to the client is write-blocked (it is not keeping up), no
        cell is read for a stream with nothing read ahead, and a stream that has one reads
        only one more; all cells still arrive, in order."""
        frags = fragments(6)
        self.successResultOf(self.h.put(SHARD, frags))
        calls, executor = held_executor()
        self.h.server.executor = executor
        server_side = self.h.pump.server
        server_side.pauseProducing()
        d, parts = self.h.get(SHARD)
        run_held(calls, self.h.pump, limit=2)  # open the shard, then the will_need hint
        self.assertEqual(calls, [])
        server_side.resumeProducing()
        self.h.pump.flush()
        self.assertEqual([args for _, args, _ in calls], [(i,) for i in range(READ_AHEAD)])
        server_side.pauseProducing()
        run_held(calls, self.h.pump, limit=1)  # cell 0 sent into a blocked connection
        self.assertEqual([args for _, args, _ in calls], [(1,), (2,)])  # nothing more
        server_side.resumeProducing()
        run_held(calls, self.h.pump)
        self.assertEqual(self.successResultOf(d).msg, GetShardEnd(6))
        self.assertEqual([p for _, p in parts], frags)

    def test_many_streams_on_one_connection_are_bounded(self) -> None:
        """Streams of one connection together hold at most the connection's budget of cells
        read and not yet sent, and once the client stops reading, none reads more: opening
        many streams and reading none of them cannot make the server hold a cell per
        stream. When the client reads again, every stream completes."""
        frags = fragments(4)
        self.successResultOf(self.h.put(SHARD, frags))
        calls, executor = held_executor()
        self.h.server.executor = executor
        self.h.server.connection_budget = 3 * FRAGMENT
        server_side = self.h.pump.server
        gets = [self.h.get(SHARD) for _ in range(20)]
        while any(f.__name__ != "read_record" for f, _, _ in calls):
            i = next(i for i, (f, _, _) in enumerate(calls) if f.__name__ != "read_record")
            f, args, d = calls.pop(i)
            d.callback(f(*args))
            self.h.pump.flush()
        # The first stream's READ_AHEAD cells fill the connection's budget; the other 19
        # streams read nothing yet.
        self.assertEqual([args for _, args, _ in calls], [(0,), (1,), (2,)])
        budget = self.h.server._budgets[server_side]
        server_side.pauseProducing()  # the client stops reading
        run_held(calls, self.h.pump)
        # Cell 0 went to the transport; cells 1 and 2 wait, read, within the budget; no
        # other stream read anything.
        self.assertEqual(calls, [])
        self.assertEqual(self.h.server.read_ahead_bytes, 2 * FRAGMENT)
        self.assertEqual(budget.used, 2 * FRAGMENT)
        server_side.resumeProducing()
        for _ in range(200):
            if not calls:
                break
            run_held(calls, self.h.pump)
            self.h.pump.flush()
        for d, parts in gets:
            self.assertEqual(self.successResultOf(d).msg, GetShardEnd(4))
            self.assertEqual([p for _, p in parts], frags)
        self.assertEqual(budget.used, 0)
        self.assertEqual(self.h.server.read_ahead_bytes, 0)

    def test_read_ahead_budget_is_shared(self) -> None:
        """All streams together read ahead at most read_ahead_budget bytes: past it, another
        stream reads one cell at a time. Every cell still arrives, and the count returns to 0."""
        frags = fragments(6)
        self.successResultOf(self.h.put(SHARD, frags))
        calls, executor = held_executor()
        self.h.server.executor = executor
        self.h.server.read_ahead_budget = 2 * FRAGMENT

        def run_call(name: str) -> None:
            """Run the first held call of function ``name`` (and pump what it leads to)."""
            i = next(i for i, (f, _, _) in enumerate(calls) if f.__name__ == name)
            f, args, d = calls.pop(i)
            d.callback(f(*args))
            self.h.pump.flush()

        first, first_parts = self.h.get(SHARD)
        run_call("open")
        run_call("will_need")
        self.assertEqual([args for _, args, _ in calls], [(0,), (1,)])  # two cells fill it
        self.assertEqual(self.h.server.read_ahead_bytes, 2 * FRAGMENT)
        second, second_parts = self.h.get(SHARD)
        run_call("open")
        run_call("will_need")
        # The second stream may read its next cell, but no further while the budget is spent.
        self.assertEqual([args for _, args, _ in calls], [(0,), (1,), (0,)])
        run_held(calls, self.h.pump)
        self.assertEqual(self.successResultOf(first).msg, GetShardEnd(6))
        self.assertEqual(self.successResultOf(second).msg, GetShardEnd(6))
        self.assertEqual([p for _, p in first_parts], frags)
        self.assertEqual([p for _, p in second_parts], frags)
        self.assertEqual(self.h.server.read_ahead_bytes, 0)

    def corrupt_cell(self, cell: int) -> None:
        """Flip a byte in the middle of a cell's fragment on disk."""
        offset = HEADER_SIZE + cell * (RECORD_OVERHEAD + FRAGMENT) + RECORD_OVERHEAD + 10
        with open(self.h.store.path(SHARD), "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))

    def test_damaged_header(self) -> None:
        """A damaged header is 'corrupt' too, naming the shard."""
        self.successResultOf(self.h.put(SHARD, fragments(2)))
        with open(self.h.store.path(SHARD), "r+b") as f:
            f.seek(20)
            f.write(b"\xff\xff")
        d, parts = self.h.get(SHARD)
        error = self.failureResultOf(d, WireError).value
        self.assertEqual(error.code, "corrupt")
        self.assertIn(SHARD, error.message)
        self.assertEqual(parts, [])


class StatusTests(SynchronousTestCase):
    """What a chunk server's heartbeats report, and how soon."""

    def test_status_does_not_queue_behind_disk_work(self) -> None:
        """Once the store's usage is known, status answers at once, whatever waits in the
        executor: a heartbeat behind a long queue of disk work would make a busy server look
        dead. The first status (a scan of the store) goes through the executor."""
        held: list[tuple[Any, defer.Deferred[Any]]] = []

        def holding(work: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            held.append((work, d))
            return d

        store = ShardStore(self.mktemp())
        server = ShardServer(store, "chunk-3", holding, LoadMeter(Clock()))
        first = server.status()
        self.assertNoResult(first)
        work, d = held.pop()
        d.callback(work())
        capacity, used, shards = self.successResultOf(first)
        self.assertEqual((used, shards), (0, 0))
        self.assertGreater(capacity, 0)
        holding(lambda: None)  # disk work that does not finish
        later = self.successResultOf(server.status())
        self.assertEqual(later[1:], (0, 0))
        self.assertGreater(later[0], 0)  # the disk's free room may have moved meanwhile


class DeleteTests(SynchronousTestCase):
    """DeleteShards."""

    def test_delete(self) -> None:
        """Present shards are deleted, absent ones ignored; the answer is Ok."""
        h = Harness(self.mktemp())
        self.successResultOf(h.put(SHARD, fragments(2)))
        self.successResultOf(h.put(OTHER, fragments(2)))
        d = h.client.call(DeleteShards([SHARD, "00000000000000ff-01"]))
        h.pump.flush()
        self.assertEqual(self.successResultOf(d).msg, Ok())
        self.assertEqual(self.failureResultOf(h.get(SHARD)[0], WireError).value.code, "not_found")
        self.successResultOf(h.get(OTHER)[0])
        self.assertEqual(h.server.shard_ids, {OTHER})

    def test_delete_invalid_id(self) -> None:
        """A malformed id refuses the whole request before anything is deleted."""
        h = Harness(self.mktemp())
        self.successResultOf(h.put(SHARD, fragments(2)))
        d = h.client.call(DeleteShards([SHARD, "../x"]))
        h.pump.flush()
        self.assertEqual(self.failureResultOf(d, WireError).value.code, "invalid_argument")
        self.successResultOf(h.get(SHARD)[0])


class LoadMeterTests(SynchronousTestCase):
    """Sliding-window rates on the injected clock."""

    def test_window(self) -> None:
        """Rates average over the window and forget events older than it."""
        clock = Clock()
        clock.advance(100)
        meter = LoadMeter(clock, window=10.0)
        for _ in range(10):
            meter.add("put_bytes", 100)
            clock.advance(1)
        self.assertEqual(meter.rates(("get_ops",)), {"put_bytes_s": 100.0, "get_ops_s": 0.0})
        clock.advance(5)
        self.assertEqual(meter.rates()["put_bytes_s"], 50.0)
        clock.advance(20)
        self.assertEqual(meter.rates().get("put_bytes_s", 0.0), 0.0)
        self.assertEqual(meter.totals["put_bytes"], 1000)


# --- heartbeats ---------------------------------------------------------------------------


class FakeMetaNetwork:
    """Metadata nodes by address, reached over in-memory connections like a ConnectionPool."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.nodes: dict[str, dict[type, Callable[[Request], Any]]] = {}
        self.open: dict[str, Connection] = {}
        self.pumps: list[IOPump] = []
        self.received: list[tuple[str, Any, bytes]] = []
        self.dropped: list[str] = []

    def add(self, address: str, heartbeat: Callable[[Request], Any], report: Callable[[Request], Any] | None = None) -> None:
        """A node at `address` answering heartbeats (and reports) with these functions."""

        def record(fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
            def handler(request: Request) -> Any:
                self.received.append((address, request.msg, bytes(request.payload)))
                return fn(request)

            return handler

        handlers: dict[type, Callable[[Request], Any]] = {Heartbeat: record(heartbeat)}
        if report is not None:
            handlers[ShardReport] = record(report)
        self.nodes[address] = handlers

    def get(self, address: str) -> defer.Deferred[Connection]:
        connection = self.open.get(address)
        if connection is not None and connection.is_open:
            return defer.succeed(connection)
        handlers = self.nodes.get(address)
        if handlers is None:
            return defer.fail(WireError("unreachable", f"cannot connect to {address}"))
        client, pump = pair(handlers, self.clock, server_id=address)
        self.pumps.append(pump)
        self.open[address] = client
        return defer.succeed(client)

    def drop(self, address: str) -> None:
        self.dropped.append(address)
        connection = self.open.pop(address, None)
        if connection is not None:
            connection.close()

    def flush(self) -> None:
        """Move bytes on every connection (including ones made meanwhile) until all are quiet."""
        moved = True
        while moved:
            moved = False
            for pump in list(self.pumps):
                if pump.flush():
                    moved = True

    def heartbeats(self) -> list[tuple[str, Heartbeat]]:
        return [(a, m) for a, m, _ in self.received if isinstance(m, Heartbeat)]

    def reports(self) -> list[tuple[str, ShardReport, bytes]]:
        return [(a, m, p) for a, m, p in self.received if isinstance(m, ShardReport)]


def ok(request: Request) -> HeartbeatReply:
    return HeartbeatReply(None, False)


class HeartbeatTests(SynchronousTestCase):
    """The heartbeat loop against fake metadata nodes on a task.Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)  # a plausible "now" to compare file mtimes with
        self.root = self.mktemp()
        self.store = ShardStore(self.root)
        self.server = ShardServer(self.store, "chunk-3", synchronous_executor, LoadMeter(self.clock))
        self.net = FakeMetaNetwork(self.clock)

    def start(self, meta: Sequence[str], cluster_id: str | None = None, **config: Any) -> HeartbeatService:
        self.server.scan()
        settings: dict[str, Any] = dict(heartbeat_interval=1.0, report_interval=30.0, gc_grace=600.0, capacity_bytes=10**12)
        settings.update(config)
        cfg = ChunkConfig(
            id="chunk-3", listen="tcp:0", address="127.0.0.1:7103", data_dir=self.root, meta=tuple(meta), **settings
        )
        service = HeartbeatService(self.clock, self.server, cfg, self.net, report_batch=2)
        service.cluster_id = cluster_id  # as ChunkService sets it, from the data directory
        service.startService()
        self.addCleanup(service.stopService)
        self.net.flush()
        return service

    def beat(self, seconds: float = 1.0) -> None:
        self.clock.advance(seconds)
        self.net.flush()

    def store_shard(self, shard_id: str, age: float) -> None:
        """A shard file last written `age` seconds before the clock's now."""
        from dogfs.storage.shards import ShardInfo

        self.store.write(ShardInfo(shard_id, "RS-4-2", int(shard_id[17:]), 10), [b"x" * 10])
        when = self.clock.seconds() - age
        os.utime(self.store.path(shard_id), (when, when))

    def test_heartbeat_contents(self) -> None:
        """The first beat goes out at start with identity, capacity, usage and shard count."""
        import dogfs.storage.shards as shards_module

        # The disk's free space as statvfs says, fixed: other processes write to this disk.
        disk = os.statvfs_result((4096, 4096, 250_000_000, 2_000, 2_000, 0, 0, 0, 0, 255))
        self.patch(shards_module.os, "statvfs", lambda path: disk)
        self.store_shard(SHARD, 0)
        self.net.add("m1:1", ok)
        service = self.start(["m1:1"])
        [(address, hb)] = self.net.heartbeats()
        self.assertEqual(address, "m1:1")
        self.assertEqual((hb.node_id, hb.address, hb.shards), ("chunk-3", "127.0.0.1:7103", 1))
        # The configured capacity (10**12) is a cap: the room the disk really has bounds it
        # too, what the shards use plus what is free.
        used = os.path.getsize(self.store.path(SHARD))
        self.assertEqual(hb.capacity_bytes, used + 2_000 * 4096)
        self.assertEqual(hb.used_bytes, os.path.getsize(self.store.path(SHARD)))
        self.assertIn("put_bytes_s", hb.load)
        self.assertIsNone(hb.domain)
        self.beat()
        self.assertEqual(len(self.net.heartbeats()), 2)
        self.assertEqual(service.beats, 2)

    def test_failover_when_unreachable(self) -> None:
        """An unreachable first address moves heartbeats to the next, which is kept."""
        self.net.add("m2:1", ok)
        service = self.start(["m1:1", "m2:1"])
        self.assertEqual([a for a, _ in self.net.heartbeats()], ["m2:1"])
        self.assertEqual(service.current, "m2:1")
        self.beat()
        self.assertEqual([a for a, _ in self.net.heartbeats()], ["m2:1", "m2:1"])

    def test_failover_on_timeout(self) -> None:
        """A metadata node that never answers is dropped after the call timeout; the next one
        gets the heartbeat."""
        self.net.add("m1:1", lambda r: defer.Deferred())
        self.net.add("m2:1", ok)
        service = self.start(["m1:1", "m2:1"])
        self.assertEqual(service.beats, 0)
        self.beat(service.call_timeout)
        self.assertEqual(self.net.dropped, ["m1:1"])
        self.assertEqual([a for a, _ in self.net.heartbeats()], ["m1:1", "m2:1"])
        self.assertEqual(service.beats, 1)
        self.assertEqual(service.current, "m2:1")

    def test_follow_not_leader(self) -> None:
        """A not_leader answer naming the leader is followed at once, even outside the list."""

        def not_leader(request: Request) -> None:
            raise WireError("not_leader", "m1 is not the leader", {"leader": "m3:1"})

        self.net.add("m1:1", not_leader)
        self.net.add("m3:1", ok)
        service = self.start(["m1:1", "m2:1"])
        self.assertEqual([a for a, _ in self.net.heartbeats()], ["m1:1", "m3:1"])
        self.assertEqual(service.current, "m3:1")
        self.assertEqual(service.beats, 1)

    def test_no_meta_reachable_keeps_beating(self) -> None:
        """With no metadata node up, beats continue and the failure is logged once a minute,
        not once a beat; a metadata node coming up is found."""
        with capturedLogs() as events:
            service = self.start(["m1:1", "m2:1"])
            for _ in range(59):
                self.beat()
            self.assertEqual(service.beats, 0)
            warnings = [e for e in events if e["log_level"] == LogLevel.warn]
            self.assertEqual(len(warnings), 1)
            self.beat()
            warnings = [e for e in events if e["log_level"] == LogLevel.warn]
            self.assertEqual(len(warnings), 2)
        self.net.add("m1:1", ok)
        self.beat()
        self.assertEqual(service.beats, 1)

    def test_no_quorum_moves_on(self) -> None:
        """A member that says "no quorum" is cut off in a minority: the same beat goes on to
        the next member, which may lead, and heartbeats stay there."""

        def minority(request: Request) -> None:
            raise WireError("no_quorum", "the metadata group has no quorum: 1 of 3 members reachable")

        self.net.add("m1:1", minority)
        self.net.add("m2:1", ok)
        service = self.start(["m1:1", "m2:1"])
        self.assertEqual([a for a, _ in self.net.heartbeats()], ["m1:1", "m2:1"])
        self.assertEqual((service.current, service.beats), ("m2:1", 1))
        self.beat()
        self.assertEqual([a for a, _ in self.net.heartbeats()][2:], ["m2:1"])

    def test_errors_do_not_stop_the_loop(self) -> None:
        """A metadata node that fails in other ways (a crash, a refusal) is retried next beat."""
        answers: list[Any] = [ZeroDivisionError("boom"), WireError("permission_denied", "not a node")]

        def flaky(request: Request) -> HeartbeatReply:
            if answers:
                raise answers.pop(0)
            return HeartbeatReply()

        self.net.add("m1:1", flaky)
        service = self.start(["m1:1"])
        self.flushLoggedErrors(ZeroDivisionError)
        self.beat()
        self.beat()
        self.assertEqual(service.beats, 1)
        self.assertEqual(len(self.net.heartbeats()), 3)

    def test_report_and_gc(self) -> None:
        """want_report triggers a batched shard report. Of the unreferenced shards it names,
        none goes at once: a shard is deleted once it has been named for gc_grace (readers
        of a file just replaced hold its old block map) and its file is as old (uploads not
        committed yet); ids never reported are ignored."""
        old, young, kept = "0000000000000001-00", "0000000000000002-01", "0000000000000003-02"
        self.store_shard(old, 700)
        self.store_shard(young, 700)
        self.store_shard(kept, 700)
        stranger = "0000000000000009-00"
        ask = [True]

        def report(request: Request) -> Reply:
            if request.msg.last:
                return Reply(ShardReportReply(), "\n".join([old, young, stranger]).encode())
            return Reply(ShardReportReply(), b"")

        def heartbeat(request: Request) -> HeartbeatReply:
            return HeartbeatReply("m1:1", want_report=ask[0])

        self.net.add("m1:1", heartbeat, report)
        service = self.start(["m1:1"], report_interval=10_000.0)  # reports when asked only
        ask[0] = False
        reports = self.net.reports()
        self.assertEqual([(m.node_id, m.batch, m.last, m.report) for _, m, _ in reports],
                         [("chunk-3", 0, False, 1), ("chunk-3", 1, True, 1)])  # one report, numbered
        self.assertEqual(b"\n".join(p for _, _, p in reports).split(b"\n"), [old.encode(), young.encode(), kept.encode()])
        self.assertEqual(service.collected, 0)  # named just now: old files, but kept for readers
        self.assertEqual(set(self.server.unreferenced_since), {old, young})
        for _ in range(6):
            self.beat(100.0)
        self.store_shard(young, 100)  # written again since (an upload under that id)
        ask[0] = True
        self.beat()
        ask[0] = False
        self.assertEqual({m.report for _, m, _ in self.net.reports()[2:]}, {2})  # the next one
        self.assertEqual(service.collected, 1)
        self.assertFalse(os.path.exists(self.store.path(old)))
        self.assertTrue(os.path.exists(self.store.path(young)))
        self.assertTrue(os.path.exists(self.store.path(kept)))
        self.assertEqual(self.server.shard_ids, {young, kept})
        self.assertEqual(set(self.server.unreferenced_since), {young})

    def test_cluster_id_kept_and_sent(self) -> None:
        """The first cluster a leader names is kept in the data directory (before any
        report) and sent with every heartbeat and report from then on; a server that starts
        with one keeps it."""
        from dogfs.chunk.heartbeat import CLUSTER_ID_FILE, load_cluster_id

        named: list[str | None] = [None]

        def heartbeat(request: Request) -> HeartbeatReply:
            return HeartbeatReply("m1:1", want_report=True, cluster_id=named[0])

        self.net.add("m1:1", heartbeat, lambda r: Reply(ShardReportReply(), b""))
        service = self.start(["m1:1"], report_interval=10_000.0)
        path = os.path.join(self.root, CLUSTER_ID_FILE)
        # No cluster named yet (a new namespace): reports go on as before.
        self.assertEqual([m.cluster_id for _, m, _ in self.net.reports()], [None])
        self.assertFalse(os.path.exists(path))
        named[0] = "cid-a"
        self.beat()
        self.assertEqual(service.cluster_id, "cid-a")
        self.assertEqual(load_cluster_id(path), "cid-a")
        self.beat()
        self.assertEqual(self.net.heartbeats()[-1][1].cluster_id, "cid-a")
        self.assertEqual(self.net.reports()[-1][1].cluster_id, "cid-a")
        with open(path, "w") as f:
            f.write("not a cluster id!\n")
        with self.assertRaises(ValueError) as raised:
            load_cluster_id(path)
        self.assertIn(path, str(raised.exception))

    def test_block_key_not_asked_for_in_the_clear(self) -> None:
        """A server that checks no tokens (plaintext: --insecure) does not ask for the block
        key, so it never crosses a wire in the clear."""
        self.net.add("m1:1", lambda request: HeartbeatReply("m1:1", cluster_id="cid-a"))
        self.assertFalse(self.server.check_tokens)
        self.start(["m1:1"])
        self.beat()
        self.assertEqual([hb.wants_block_key for _, hb in self.net.heartbeats()], [False, False])

    def test_block_key_kept(self) -> None:
        """A server that checks tokens (TLS) asks for the block key in its heartbeats; the first one sent is kept in the data directory
        (readable by the server's user alone) and given to the shard server; a malformed one
        is ignored, and a damaged key file is refused naming it."""
        from dogfs.chunk.heartbeat import BLOCK_KEY_FILE, load_block_key

        sent: list[str | None] = [None]

        def heartbeat(request: Request) -> HeartbeatReply:
            return HeartbeatReply("m1:1", cluster_id="cid-a", block_key=sent[0])

        self.net.add("m1:1", heartbeat)
        self.server.check_tokens = True  # as with TLS
        self.start(["m1:1"])
        path = os.path.join(self.root, BLOCK_KEY_FILE)
        self.assertTrue(self.net.heartbeats()[0][1].wants_block_key)
        self.assertIsNone(self.server.block_key)
        sent[0] = "not a key"
        self.beat()
        self.assertIsNone(self.server.block_key)
        self.assertFalse(os.path.exists(path))
        sent[0] = "ab" * 32
        self.beat()
        self.assertEqual(self.server.block_key, "ab" * 32)
        self.assertEqual(load_block_key(path), "ab" * 32)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path, "w") as f:
            f.write("ab" * 31 + "\n")
        with self.assertRaises(ValueError) as raised:
            load_block_key(path)
        self.assertIn(path, str(raised.exception))

    def test_block_key_fetched_out_of_turn(self) -> None:
        """`fetch_block_key` sends one heartbeat at once, shared by the callers waiting, and
        fires each with the key its reply brought (None when it brought none)."""
        sent: list[str | None] = [None]
        self.net.add("m1:1", lambda request: HeartbeatReply("m1:1", cluster_id="cid-a", block_key=sent[0]))
        service = self.start(["m1:1"])
        before = len(self.net.heartbeats())
        first = service.fetch_block_key()
        self.assertNoResult(first)
        sent[0] = "ef" * 32
        second = service.fetch_block_key()
        self.net.flush()
        self.assertEqual(len(self.net.heartbeats()), before + 1)
        self.assertEqual(self.successResultOf(first), "ef" * 32)
        self.assertEqual(self.successResultOf(second), "ef" * 32)
        self.assertEqual(self.server.block_key, "ef" * 32)
        # Asked again within max_age of that reply: the key as it is, no heartbeat.
        self.assertEqual(self.successResultOf(service.fetch_block_key(1.0)), "ef" * 32)
        self.assertEqual(len(self.net.heartbeats()), before + 1)
        self.clock.advance(1.5)
        self.net.flush()  # the loop's own beat, a reply with the key
        beats = len(self.net.heartbeats())
        self.clock.advance(1.1)  # past max_age since that reply, before the next beat
        sent[0] = "fe" * 32
        fresh = service.fetch_block_key(1.0)
        self.net.flush()
        self.assertEqual(self.successResultOf(fresh), "fe" * 32)
        self.assertGreater(len(self.net.heartbeats()), beats)

    def test_no_report_to_another_cluster(self) -> None:
        """A server keeping cluster A's id sends no shard report to a leader naming cluster
        B, or naming none: such a leader would call every shard garbage. Nothing is
        collected, however long it goes on, and it reports again once a leader of A answers."""
        shard = "0000000000000001-00"
        self.store_shard(shard, 10_000)
        named: list[str | None] = ["cid-b"]

        def heartbeat(request: Request) -> HeartbeatReply:
            return HeartbeatReply("m1:1", want_report=True, cluster_id=named[0])

        def report(request: Request) -> Reply:
            return Reply(ShardReportReply(), shard.encode())  # "all garbage"

        self.net.add("m1:1", heartbeat, report)
        service = self.start(["m1:1"], "cid-a", report_interval=1.0, gc_grace=0.0)
        for cluster in ("cid-b", None):
            named[0] = cluster
            for _ in range(5):
                self.beat(2.0)
        self.assertGreater(service.beats, 10)
        self.assertEqual(self.net.reports(), [])
        self.assertEqual(service.collected, 0)
        self.assertTrue(os.path.exists(self.store.path(shard)))
        self.assertEqual(service.cluster_id, "cid-a")
        self.assertEqual({m.cluster_id for _, m in self.net.heartbeats()}, {"cid-a"})
        named[0] = "cid-a"
        self.beat(2.0)
        self.assertEqual([m.cluster_id for _, m, _ in self.net.reports()], ["cid-a"])

    def test_damaged_shards_named_apart_and_collected(self) -> None:
        """A shard known damaged stays out of the report's ids but is named in the last
        batch's `damaged`; once the leader names it unreferenced (rebuilt elsewhere) it is
        collected after gc_grace like any garbage, and forgotten as damaged; one the leader
        still places here is kept."""
        moved, placed, good = "0000000000000001-00", "0000000000000002-01", "0000000000000003-02"
        for shard_id in (moved, placed, good):
            self.store_shard(shard_id, 700)
        ask = [False]

        def report(request: Request) -> Reply:
            named = [d for d in request.msg.damaged if d == moved]
            return Reply(ShardReportReply(), "\n".join(named).encode())

        def heartbeat(request: Request) -> HeartbeatReply:
            return HeartbeatReply("m1:1", want_report=ask[0])

        self.net.add("m1:1", heartbeat, report)
        self.start(["m1:1"], report_interval=10_000.0)
        self.server.corrupt.update({moved, placed})  # as the scrubber or a read finds them
        ask[0] = True
        self.beat()
        ask[0] = False
        [(_, msg, payload)] = self.net.reports()
        self.assertEqual((msg.last, msg.damaged, bytes(payload)), (True, (moved, placed), good.encode()))
        self.assertEqual(set(self.server.unreferenced_since), {moved})
        for _ in range(6):
            self.beat(100.0)
        ask[0] = True
        self.beat()
        self.assertFalse(os.path.exists(self.store.path(moved)))
        self.assertTrue(os.path.exists(self.store.path(placed)))
        self.assertEqual(self.server.corrupt, {placed})
        self.assertEqual(self.server.shard_ids, {placed, good})

    def test_collected_shard_put_back_meanwhile_is_kept(self) -> None:
        """A shard the collector deleted, but which a commit put back before the collection
        ended on the reactor (a move brought it here again), stays known here; one being
        written is not collected at all."""
        old, back = "0000000000000001-00", "0000000000000002-01"
        self.store_shard(old, 1000)
        self.store_shard(back, 1000)
        self.server.scan()
        self.server.unreferenced_since = {old: 0.0, back: 0.0}
        real = self.server._collect

        def collect_then_commit(ids: list[str], written_before: float) -> list[str]:
            deleted = real(ids, written_before)
            self.store_shard(back, 0)  # a fresh copy committed right after the unlink,
            self.server.stored(back)  # and noted on the reactor before the collection ends
            return deleted

        self.server._collect = collect_then_commit  # type: ignore[method-assign]
        deleted = self.successResultOf(self.server.collect_garbage([old, back], self.clock.seconds(), 600.0))
        self.assertEqual(deleted, [old])
        self.assertEqual(self.server.shard_ids, {back})
        self.assertTrue(os.path.exists(self.store.path(back)))
        self.assertEqual((self.server._collecting, self.server._stored_while_collecting), (0, set()))

    def test_periodic_report(self) -> None:
        """Without being asked, a report goes out every report_interval."""
        self.net.add("m1:1", ok, lambda r: Reply(ShardReportReply(), b""))
        service = self.start(["m1:1"], report_interval=5.0)
        self.assertEqual(self.net.reports(), [])
        for _ in range(5):
            self.beat()
        self.assertEqual(service.reports, 1)
        [(_, msg, payload)] = self.net.reports()
        self.assertEqual((msg.batch, msg.last, payload), (0, True, b""))

    def test_failed_report_is_retried(self) -> None:
        """A report that fails is sent again at the next beat."""
        calls = {"n": 0}

        def report(request: Request) -> Reply:
            calls["n"] += 1
            if calls["n"] == 1:
                raise WireError("internal", "the report could not be stored")
            return Reply(ShardReportReply(), b"")

        self.net.add("m1:1", lambda r: HeartbeatReply(want_report=calls["n"] == 0), report)
        service = self.start(["m1:1"])
        self.assertEqual(service.reports, 0)
        self.beat()
        self.assertEqual(service.reports, 1)


# --- the service tree and the plugin ----------------------------------------------------


def write_config(path: str, body: str) -> str:
    with open(path, "w") as f:
        f.write(body)
    return path


class ChunkServiceTests(SynchronousTestCase):
    """ChunkService on a memory reactor: start, listen, stop."""

    def test_direct_io_choice(self) -> None:
        """The service passes its direct_io choice to the shard store it opens."""
        for choice in (False, True):
            root = os.path.abspath(self.mktemp())
            config = ChunkConfig(
                id="chunk-3", listen="tcp:7103:interface=127.0.0.1", address="127.0.0.1:7103",
                data_dir=root, meta=("127.0.0.1:1",),
            )
            service = ChunkService(
                MemoryReactorClock(), config, executor=synchronous_executor, direct_io=choice
            )
            service.startService()
            assert service.store is not None
            self.assertEqual(service.store.direct_io, choice)
            self.successResultOf(service.stopService())

    def test_start_and_stop(self) -> None:
        """startService cleans tmp, scans, listens on the config's endpoint; stopService
        returns a Deferred that fires."""
        root = os.path.abspath(self.mktemp())
        store = ShardStore(root)
        from dogfs.storage.shards import ShardInfo

        store.write(ShardInfo(SHARD, "RS-4-2", 3, 10), [b"y" * 10])
        with open(os.path.join(store.tmp_dir, "junk.tmp"), "w") as f:
            f.write("partial")
        reactor = MemoryReactorClock()
        config = ChunkConfig(
            id="chunk-3", listen="tcp:7103:interface=127.0.0.1", address="127.0.0.1:7103",
            data_dir=root, meta=("127.0.0.1:1",),
        )
        service = ChunkService(reactor, config, executor=synchronous_executor)
        service.startService()
        self.successResultOf(service.when_ready())
        self.assertEqual(os.listdir(store.tmp_dir), [])
        [(port, factory, _backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (7103, "127.0.0.1"))
        assert service.server is not None
        self.assertEqual(service.server.shard_ids, {SHARD})
        self.assertTrue(reactor.tcpClients)  # the first heartbeat dials metadata
        self.successResultOf(service.stopService())

    def test_data_dir_of_another_node(self) -> None:
        """A data directory is named after the first chunk server that used it; a server
        with another id refuses it (its shards would all be deleted as garbage), says why,
        and calls on_fatal."""
        root = os.path.abspath(self.mktemp())

        def config(node_id: str) -> ChunkConfig:
            return ChunkConfig(
                id=node_id, listen="tcp:7103", address="127.0.0.1:7103", data_dir=root, meta=("127.0.0.1:1",)
            )

        first = ChunkService(MemoryReactorClock(), config("chunk-3"), executor=synchronous_executor)
        first.startService()
        self.successResultOf(first.when_ready())
        self.successResultOf(first.stopService())
        with open(os.path.join(root, "node-id")) as f:
            self.assertEqual(f.read().strip(), "chunk-3")
        fatal: list[bool] = []
        other = ChunkService(
            MemoryReactorClock(), config("chunk-9"), executor=synchronous_executor, on_fatal=lambda: fatal.append(True)
        )
        other.startService()
        message = str(self.failureResultOf(other.when_ready()).value)
        self.assertIn("holds the shards of chunk server 'chunk-3', not of 'chunk-9'", message)
        self.assertEqual(fatal, [True])
        self.successResultOf(other.stopService())
        again = ChunkService(MemoryReactorClock(), config("chunk-3"), executor=synchronous_executor)
        again.startService()
        self.successResultOf(again.when_ready())
        self.successResultOf(again.stopService())

    def test_cluster_id_read_at_start(self) -> None:
        """The cluster id kept in the data directory is what heartbeats carry from the first;
        a cluster_id file that holds no valid id stops the server, naming the file (whose
        shards they are is unknown, and a guess could have them all collected)."""
        root = os.path.abspath(self.mktemp())
        ShardStore(root)
        config = ChunkConfig(id="chunk-3", listen="tcp:7103", address="127.0.0.1:7103", data_dir=root, meta=("127.0.0.1:1",))
        path = os.path.join(root, "cluster_id")
        with open(path, "w") as f:
            f.write("cid-a\n")
        service = ChunkService(MemoryReactorClock(), config, executor=synchronous_executor)
        service.startService()
        self.successResultOf(service.when_ready())
        assert service.heartbeat is not None
        self.assertEqual(service.heartbeat.cluster_id, "cid-a")
        self.successResultOf(service.stopService())
        with open(path, "w") as f:
            f.write("cid a\n")
        fatal: list[bool] = []
        broken = ChunkService(MemoryReactorClock(), config, executor=synchronous_executor, on_fatal=lambda: fatal.append(True))
        broken.startService()
        message = str(self.failureResultOf(broken.when_ready()).value)
        self.assertIn(f"{path} does not hold a cluster id", message)
        self.assertEqual(fatal, [True])
        self.successResultOf(broken.stopService())

    def test_block_key_read_at_start(self) -> None:
        """The block key kept in the data directory is the shard server's from the start
        (uploads need not wait for a heartbeat), and the service checks tokens only with
        TLS."""
        root = os.path.abspath(self.mktemp())
        ShardStore(root)
        config = ChunkConfig(id="chunk-3", listen="tcp:7103", address="127.0.0.1:7103", data_dir=root, meta=("127.0.0.1:1",))
        with open(os.path.join(root, "block_key"), "w") as f:
            f.write("cd" * 32 + "\n")
        service = ChunkService(MemoryReactorClock(), config, executor=synchronous_executor)
        service.startService()
        self.successResultOf(service.when_ready())
        assert service.server is not None
        self.assertEqual(service.server.block_key, "cd" * 32)
        self.assertFalse(service.server.check_tokens)
        self.successResultOf(service.stopService())

    def test_data_dir_in_use(self) -> None:
        """A second server on a data directory that one already serves refuses to start,
        says why, and calls on_fatal; the first keeps its directory."""
        root = os.path.abspath(self.mktemp())
        config = ChunkConfig(
            id="chunk-3", listen="tcp:7103", address="127.0.0.1:7103", data_dir=root, meta=("127.0.0.1:1",)
        )
        first = ChunkService(MemoryReactorClock(), config, executor=synchronous_executor)
        first.startService()
        self.successResultOf(first.when_ready())
        fatal: list[bool] = []
        second = ChunkService(MemoryReactorClock(), config, executor=synchronous_executor, on_fatal=lambda: fatal.append(True))
        second.startService()
        self.assertIn("in use by another chunk server", str(self.failureResultOf(second.when_ready()).value))
        self.assertEqual(fatal, [True])
        self.successResultOf(second.stopService())
        self.successResultOf(first.stopService())
        # Released on stop: a restart can lock it again.
        third = ChunkService(MemoryReactorClock(), config, executor=synchronous_executor)
        third.startService()
        self.successResultOf(third.when_ready())
        self.successResultOf(third.stopService())

    def test_bad_data_dir_layout(self) -> None:
        """A data directory whose layout is wrong (a file where shards/ should be) keeps the
        server from starting with one sentence naming the path, not a traceback, and calls
        on_fatal."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        with open(os.path.join(root, "shards"), "wb"):
            pass
        config = ChunkConfig(
            id="chunk-3", listen="tcp:7103", address="127.0.0.1:7103", data_dir=root, meta=("127.0.0.1:1",)
        )
        fatal: list[bool] = []
        service = ChunkService(
            MemoryReactorClock(), config, executor=synchronous_executor, on_fatal=lambda: fatal.append(True)
        )
        with capturedLogs() as events:
            service.startService()
        message = f"cannot keep shards in {root}: {os.path.join(root, 'shards')}: Not a directory"
        self.assertEqual(str(self.failureResultOf(service.when_ready()).value), message)
        self.assertEqual(fatal, [True])
        [event] = [e for e in events if e["log_level"] == LogLevel.critical]
        self.assertEqual(event["log_format"].format(**event), f"chunk-3 cannot start: {message}")
        self.successResultOf(service.stopService())

    def test_makeService_does_no_io(self) -> None:
        """makeService reads the config and builds a stopped tree: no data directory yet."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        path = write_config(
            os.path.join(base, "chunk.toml"),
            '[chunk]\nid = "chunk-9"\nlisten = "tcp:0"\naddress = "127.0.0.1:1"\n'
            'data_dir = "data"\nmeta = ["127.0.0.1:2"]\n',
        )
        options = chunk_plugin.Options()
        options.parseOptions(["--config", path])
        service = chunk_plugin.makeService(options)
        self.assertIsInstance(service, ChunkService)
        self.assertFalse(service.running)
        self.assertFalse(os.path.exists(os.path.join(base, "data")))

    def test_bad_config_is_one_sentence(self) -> None:
        """A missing or bad config file exits with status 2 after one sentence, no traceback."""
        options = chunk_plugin.Options()
        options.parseOptions(["-c", os.path.abspath(self.mktemp())])
        self.assertRaises(usage.UsageError, chunk_plugin.load_config, options)
        exit = self.assertRaises(SystemExit, chunk_plugin.makeService, options)
        self.assertEqual(exit.code, 2)

    def test_default_config_path(self) -> None:
        """--config defaults to etc/chunk.toml."""
        options = chunk_plugin.Options()
        options.parseOptions([])
        self.assertEqual(options["config"], "etc/chunk.toml")
