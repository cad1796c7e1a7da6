# -*- test-case-name: tests.test_chunk_rebuild -*-
"""Tests for dogfs.chunk.rebuild: RebuildShard, a chunk server making a lost shard again.

Integration: every chunk server here is a real `ShardServer` over a real `ShardStore` in a
temporary directory, with its own disk threads, listening on 127.0.0.1 and dialled over real
loopback TCP; block groups are encoded with the real codec and uploaded with PutShard as the
client does. Nothing sleeps: each test waits on the Deferreds of its requests, or on a fake
peer having received what it waits for. Data comes from seeded generators.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dogfs.chunk import rebuild as rebuild_module
from dogfs.chunk.load import LoadMeter
from dogfs.chunk.rebuild import REBUILD_BATCH, InvalidRebuild, Source, plan_rebuild
from dogfs.chunk.server import ShardServer, synchronous_executor
from dogfs.chunk.service import CHUNK_PERMISSIONS, ChunkService
from dogfs.codec.checksum import crc32c
from dogfs.codec.policy import ECPolicy
from dogfs.codec.stripe import FRAGMENT_HEADER_SIZE, StripeCodec
from dogfs.config import ChunkConfig
from dogfs.raft.worker import WorkerPool
from dogfs.security.authz import guard, make_authorizer
from dogfs.security.roles import Identity, Role
from dogfs.storage.shards import HEADER_SIZE, RECORD_OVERHEAD, ShardStore, make_shard_id
from dogfs.wire.messages import (
    Cell,
    DeleteShards,
    GetShard,
    GetShardEnd,
    PutShard,
    PutShardEnd,
    RebuildShard,
    ShardStored,
)
from dogfs.wire.pool import ConnectionFactory, ConnectionPool, tcp_endpoints
from dogfs.wire.protocol import Request, WireError

CELL = 4096
GROUP = 0x2A


def deferred(coroutine: Any) -> defer.Deferred[Any]:
    """Run a test's coroutine, failing it rather than hanging if something never answers."""
    return defer.Deferred.fromCoroutine(coroutine).addTimeout(60, reactor)  # type: ignore[arg-type]


def group_bytes(size: int, seed: int) -> bytes:
    """A block group's bytes, the same for the same seed."""
    return random.Random(seed).randbytes(size)


def encode_group(policy: str, data: bytes) -> list[list[bytes]]:
    """The fragments of every shard of a block group, by shard index then stripe."""
    codec = StripeCodec(ECPolicy.parse(policy), CELL)
    shards: list[list[bytes]] = [[] for _ in range(codec.width)]
    for stripe in codec.stripes(data):
        for index, fragment in enumerate(codec.encode(stripe)):
            shards[index].append(fragment)
    return shards


Handler = Callable[[Request], Any]


class Peer:
    """A chunk server on 127.0.0.1: a ShardServer over a ShardStore of its own, its disk work
    on two threads, requests authorized as the daemon does (plaintext: all allowed).
    `get_shard`, given the store, makes a GetShard handler to serve instead of the server's."""

    def __init__(
        self, test: TestCase, name: str, get_shard: Callable[[ShardStore], Handler] | None = None
    ) -> None:
        self.name = name
        self.store = ShardStore(test.mktemp())
        self.threads = WorkerPool(reactor, f"{name}-disk", 2)  # type: ignore[arg-type]
        self.threads.start()
        self.peers = ConnectionPool(reactor, tcp_endpoints(reactor), node_id=name)  # type: ignore[arg-type]
        self.server = ShardServer(self.store, name, self.threads.run, LoadMeter(reactor), peers=self.peers)  # type: ignore[arg-type]
        handlers = dict(self.server.handlers())
        if get_shard is not None:
            handlers[GetShard] = get_shard(self.store)
        self.factory = ConnectionFactory(
            reactor,  # type: ignore[arg-type]
            guard(handlers, make_authorizer(False), CHUNK_PERMISSIONS),
            node_id=name,
        )
        self.port: Any = reactor.listenTCP(0, self.factory, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        self.address = f"127.0.0.1:{self.port.getHost().port}"  # type: ignore[attr-defined]
        test.addCleanup(lambda: defer.Deferred.fromCoroutine(self.stop()))

    async def stop(self) -> None:
        """Stop listening and serving (a chunk server gone); idempotent."""
        if self.port is not None:
            port, self.port = self.port, None
            await defer.maybeDeferred(port.stopListening)
        for connection in list(self.factory.connections):
            connection.close()
            await connection.closed
        assert self.server.rebuilder is not None
        await self.server.rebuilder.stop()
        if self.threads.running:
            self.threads.stop()

    def file_bytes(self, shard_id: str) -> bytes:
        """The whole shard file, header and records."""
        with open(self.store.path(shard_id), "rb") as f:
            return f.read()

    def tmp_files(self) -> list[str]:
        return os.listdir(self.store.tmp_dir)


def lying_get_shard(store: ShardStore, bad_cell: int) -> Handler:
    """A GetShard handler that sends cell `bad_cell` with one byte flipped under the CRC of
    the true bytes (a cell damaged on the way)."""

    async def serve(request: Request) -> GetShardEnd:
        msg: GetShard = request.msg
        with store.open(msg.shard_id) as reader:
            count = reader.cells - msg.first if msg.count == -1 else msg.count
            for i in range(msg.first, msg.first + count):
                crc, fragment = reader.read_record(i)
                if i == bad_cell:
                    # In the payload, past the codec's header: only the CRC32C can tell.
                    at = FRAGMENT_HEADER_SIZE + 10
                    fragment = fragment[:at] + bytes([fragment[at] ^ 0xFF]) + fragment[at + 1 :]
                await request.send_part(Cell(i, crc), fragment)
        return GetShardEnd(count)

    return lambda request: defer.Deferred.fromCoroutine(serve(request))


class SilentSource:
    """A GetShard handler that answers nothing until `release` (a hung chunk server)."""

    def __init__(self) -> None:
        self.held: list[defer.Deferred[Any]] = []
        self._waiting: list[tuple[int, defer.Deferred[None]]] = []

    def __call__(self, request: Request) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.held.append(d)
        for wanted, waiter in list(self._waiting):
            if len(self.held) >= wanted:
                self._waiting.remove((wanted, waiter))
                waiter.callback(None)
        return d

    def received(self, count: int) -> defer.Deferred[None]:
        """Fires once `count` GetShard requests have arrived."""
        if len(self.held) >= count:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((count, d))
        return d

    def release(self) -> None:
        """Answer every held request with an error."""
        for d in self.held:
            if not d.called:
                d.errback(WireError("not_found", "this server lost its shards"))


def damage_on_disk(peer: Peer, shard_id: str, cell: int) -> None:
    """Flip a byte of cell `cell` in `peer`'s shard file (past the header): rot on the disk,
    which the peer's GetShard finds by its checksum."""
    with open(peer.store.path(shard_id), "r+b") as f:
        f.seek(HEADER_SIZE + cell * (RECORD_OVERHEAD + FRAGMENT_HEADER_SIZE + CELL) + 100)
        [byte] = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0xFF]))


def record_fetches(target: Peer) -> list[tuple[int, int]]:
    """(source index, first cell) of every GetShard the target's rebuilder sends from now on,
    in order."""
    rebuilder = target.server.rebuilder
    assert rebuilder is not None
    fetch = rebuilder._fetch
    fetched: list[tuple[int, int]] = []

    def recording(plan: Any, source: Source, first: int, count: int) -> Any:
        fetched.append((source.index, first))
        return fetch(plan, source, first, count)

    rebuilder._fetch = recording  # type: ignore[method-assign]
    return fetched


class RebuildCase(TestCase):
    """Chunk servers on loopback, and a metadata leader's connections to them."""

    def setUp(self) -> None:
        self.leader = ConnectionPool(reactor, tcp_endpoints(reactor), node_id="meta-1")  # type: ignore[arg-type]
        self.addCleanup(self.leader.close_all)

    def peers(self, count: int) -> list[Peer]:
        return [Peer(self, f"chunk-{i}") for i in range(count)]

    async def write_group(self, holders: Sequence[Peer], policy: str, data: bytes) -> list[list[bytes]]:
        """Upload a block group as the client does: shard i to holders[i], every cell with its
        CRC32C, `fragment_size` a full stripe's fragment. Returns the fragments."""
        shards = encode_group(policy, data)
        codec = StripeCodec(ECPolicy.parse(policy), CELL)
        fragment_size = codec.fragment_size(codec.stripe_size)
        for index, (holder, fragments) in enumerate(zip(holders, shards, strict=True)):
            connection = await self.leader.get(holder.address)
            upload = connection.open_stream(PutShard(make_shard_id(GROUP, index), policy, index, fragment_size))
            for i, fragment in enumerate(fragments):
                await upload.send(Cell(i, crc32c(fragment)), fragment)
            reply = await upload.finish(PutShardEnd(len(fragments)))
            self.assertEqual(reply.msg, ShardStored(make_shard_id(GROUP, index), sum(map(len, fragments))))
        return shards

    async def rebuild(
        self, target: Peer, policy: str, index: int, size: int, sources: Sequence[tuple[int, Peer]],
        group: int = GROUP,
    ) -> ShardStored:
        connection = await self.leader.get(target.address)
        msg = RebuildShard(
            make_shard_id(group, index), policy, index, size, CELL,
            [(i, make_shard_id(group, i), peer.address) for i, peer in sources],
        )
        reply = await connection.call(msg, timeout=60)
        return reply.msg  # type: ignore[no-any-return]

    async def rebuild_fails(self, target: Peer, *args: Any, **kwargs: Any) -> WireError:
        try:
            await self.rebuild(target, *args, **kwargs)
        except WireError as e:
            return e
        self.fail("the rebuild succeeded")

    async def read_back(self, peer: Peer, shard_id: str) -> list[bytes]:
        """Every cell of a shard, read with GetShard and checked against its CRC32C."""
        connection = await self.leader.get(peer.address)
        cells: list[bytes] = []

        def part(msg: Cell, payload: memoryview) -> None:
            self.assertEqual((msg.index, msg.crc), (len(cells), crc32c(payload)))
            cells.append(bytes(payload))

        reply = await connection.call(GetShard(shard_id), on_part=part)
        self.assertEqual(reply.msg, GetShardEnd(len(cells)))
        return cells

    async def assert_rebuilt(self, target: Peer, index: int, shards: list[list[bytes]], original: bytes) -> None:
        """The target holds shard `index` with every cell as encoded, in a file identical to
        the one the client's upload made, and knows it holds it."""
        shard_id = make_shard_id(GROUP, index)
        self.assertEqual(await self.read_back(target, shard_id), shards[index])
        self.assertEqual(target.file_bytes(shard_id), original)
        self.assertIn(shard_id, target.server.shard_ids)
        self.assertEqual(target.tmp_files(), [])


class RebuildTests(RebuildCase):
    """A lost shard is rebuilt byte for byte from k others."""

    def test_data_shard_of_rs_3_2(self) -> defer.Deferred[None]:
        """RS-3-2, 21 stripes (three batches, the last stripe short): shard 1 is deleted and
        rebuilt on a sixth server from the four others; every cell, and the file itself, is
        what the upload made. One info line says so; the meter counts it."""

        async def run() -> None:
            *holders, target = self.peers(6)
            size = 20 * 3 * CELL + 1000
            shards = await self.write_group(holders, "RS-3-2", group_bytes(size, 1))
            lost = make_shard_id(GROUP, 1)
            original = holders[1].file_bytes(lost)
            connection = await self.leader.get(holders[1].address)
            await connection.call(DeleteShards([lost]))
            with capturedLogs() as events:
                stored = await self.rebuild(target, "RS-3-2", 1, size, [(i, holders[i]) for i in (0, 2, 3, 4)])
            self.assertEqual(stored, ShardStored(lost, sum(map(len, shards[1]))))
            await self.assert_rebuilt(target, 1, shards, original)
            self.assertEqual(target.server.meter.totals["rebuild_ops"], 1)
            self.assertEqual(target.server.meter.totals["rebuild_bytes"], stored.size)
            [line] = [e for e in events if e["log_level"] == LogLevel.info and "rebuilt" in e["log_format"]]
            self.assertEqual((line["shard"], line["size"], line["dropped"]), (lost, stored.size, ""))

        return deferred(run())

    def test_parity_shard_of_rs_4_2(self) -> defer.Deferred[None]:
        """RS-4-2, a group of 10 full stripes and a part: parity shard 5 is rebuilt."""

        async def run() -> None:
            *holders, target = self.peers(7)
            size = 10 * 4 * CELL + 5000
            shards = await self.write_group(holders, "RS-4-2", group_bytes(size, 2))
            original = holders[5].file_bytes(make_shard_id(GROUP, 5))
            stored = await self.rebuild(target, "RS-4-2", 5, size, [(i, holders[i]) for i in range(5)])
            self.assertEqual(stored.size, sum(map(len, shards[5])))
            await self.assert_rebuilt(target, 5, shards, original)

        return deferred(run())

    def test_group_smaller_than_a_stripe(self) -> defer.Deferred[None]:
        """A group of 100 bytes has one short stripe; its last data shard carries padding
        only, and is rebuilt with the full stripe's fragment size in its header, as the
        client announced."""

        async def run() -> None:
            *holders, target = self.peers(7)
            shards = await self.write_group(holders, "RS-4-2", group_bytes(100, 3))
            original = holders[3].file_bytes(make_shard_id(GROUP, 3))
            await self.rebuild(target, "RS-4-2", 3, 100, [(i, holders[i]) for i in (5, 4, 0, 1, 2)])
            await self.assert_rebuilt(target, 3, shards, original)
            self.assertEqual(target.store.info(make_shard_id(GROUP, 3)).fragment_size, FRAGMENT_HEADER_SIZE + CELL)

        return deferred(run())

    def test_replaces_a_damaged_copy(self) -> defer.Deferred[None]:
        """A server holding a damaged copy of the shard gets a good one in its place, and no
        longer counts the shard corrupt."""

        async def run() -> None:
            holders = self.peers(5)
            size = 9 * 3 * CELL
            shards = await self.write_group(holders, "RS-3-2", group_bytes(size, 4))
            shard_id = make_shard_id(GROUP, 0)
            original = holders[0].file_bytes(shard_id)
            with open(holders[0].store.path(shard_id), "r+b") as f:
                f.seek(HEADER_SIZE + 3 * (RECORD_OVERHEAD + FRAGMENT_HEADER_SIZE + CELL) + 100)
                f.write(b"\0\1\2")
            holders[0].server.corrupt.add(shard_id)
            await self.rebuild(holders[0], "RS-3-2", 0, size, [(i, holders[i]) for i in (1, 2, 3)])
            await self.assert_rebuilt(holders[0], 0, shards, original)
            self.assertNotIn(shard_id, holders[0].server.corrupt)

        return deferred(run())


class SourceFailureTests(RebuildCase):
    """Sources that fail are replaced; too few good ones fail the rebuild, leaving nothing."""

    def test_one_down_and_one_corrupt(self) -> defer.Deferred[None]:
        """RS-3-3, rebuilding shard 0: shard 1's server is stopped and shard 2's sends a
        damaged cell in the second batch; shards 3, 4 and 5 take their places (5 from that
        batch on) and the shard comes out whole."""

        async def run() -> None:
            holders = self.peers(2)
            lying = Peer(self, "chunk-2", get_shard=lambda store: lying_get_shard(store, REBUILD_BATCH + 1))
            holders += [lying, *self.peers(4)[1:]]
            target = Peer(self, "chunk-9")
            size = 20 * 3 * CELL + 7
            shards = await self.write_group(holders, "RS-3-3", group_bytes(size, 5))
            original = holders[0].file_bytes(make_shard_id(GROUP, 0))
            await holders[1].stop()
            with capturedLogs() as events:
                stored = await self.rebuild(target, "RS-3-3", 0, size, [(i, holders[i]) for i in range(1, 6)])
            self.assertEqual(stored.size, sum(map(len, shards[0])))
            await self.assert_rebuilt(target, 0, shards, original)
            [line] = [e for e in events if e["log_level"] == LogLevel.info and "rebuilt" in e["log_format"]]
            self.assertIn(f"shard 1 at {holders[1].address}: cannot connect", line["dropped"])
            self.assertIn(f"shard 2 at {lying.address}: cell {REBUILD_BATCH + 1} failed its checksum", line["dropped"])

        return deferred(run())

    def test_source_corrupt_on_disk(self) -> defer.Deferred[None]:
        """A source whose stored cell fails its checksum answers `corrupt`; the next source
        replaces it."""

        async def run() -> None:
            *holders, target = self.peers(6)
            size = 12 * 3 * CELL
            shards = await self.write_group(holders, "RS-3-2", group_bytes(size, 6))
            original = holders[4].file_bytes(make_shard_id(GROUP, 4))
            with open(holders[1].store.path(make_shard_id(GROUP, 1)), "r+b") as f:
                f.seek(HEADER_SIZE + 10 * (RECORD_OVERHEAD + FRAGMENT_HEADER_SIZE + CELL) + 500)
                f.write(b"rot")
            await self.rebuild(target, "RS-3-2", 4, size, [(i, holders[i]) for i in range(4)])
            await self.assert_rebuilt(target, 4, shards, original)

        return deferred(run())

    def test_too_few_sources(self) -> defer.Deferred[None]:
        """Two of four sources down leaves two of the three needed: `unavailable`, naming
        each source that failed and why; nothing is left on the target."""

        async def run() -> None:
            *holders, target = self.peers(6)
            size = 5 * 3 * CELL
            await self.write_group(holders, "RS-3-2", group_bytes(size, 7))
            await holders[1].stop()
            await holders[3].stop()
            with capturedLogs() as events:
                error = await self.rebuild_fails(target, "RS-3-2", 0, size, [(i, holders[i]) for i in range(1, 5)])
            self.assertEqual(error.code, "unavailable")
            self.assertIn(f"cannot rebuild shard {make_shard_id(GROUP, 0)}: it needs 3", error.message)
            self.assertIn(f"shard 1 at {holders[1].address}: cannot connect", error.message)
            self.assertIn(f"shard 3 at {holders[3].address}: cannot connect", error.message)
            self.assertEqual(target.tmp_files(), [])
            self.assertFalse(os.path.exists(target.store.path(make_shard_id(GROUP, 0))))
            self.assertEqual(target.server.shard_ids, set())
            [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
            self.assertEqual(warning["error"], error.message)

        return deferred(run())

    def test_failure_after_cells_were_written(self) -> defer.Deferred[None]:
        """With exactly k sources, one sending a damaged cell in the second batch fails the
        rebuild after the first batch was written: the partial file is removed."""

        async def run() -> None:
            holders = self.peers(2)
            lying = Peer(self, "chunk-2", get_shard=lambda store: lying_get_shard(store, REBUILD_BATCH + 2))
            holders += [lying, *self.peers(3)[1:]]
            target = Peer(self, "chunk-9")
            size = 20 * 3 * CELL
            await self.write_group(holders, "RS-3-2", group_bytes(size, 8))
            error = await self.rebuild_fails(target, "RS-3-2", 4, size, [(i, holders[i]) for i in range(3)])
            self.assertEqual(error.code, "unavailable")
            self.assertIn(f"shard 2 at {lying.address}: cell {REBUILD_BATCH + 2} failed its checksum", error.message)
            self.assertEqual(target.tmp_files(), [])
            self.assertFalse(os.path.exists(target.store.path(make_shard_id(GROUP, 4))))

        return deferred(run())

    def test_source_without_the_shard(self) -> defer.Deferred[None]:
        """A source that answers not_found is replaced, and named if the rebuild fails."""

        async def run() -> None:
            *holders, target = self.peers(6)
            size = 3 * CELL
            await self.write_group(holders, "RS-3-2", group_bytes(size, 9))
            error = await self.rebuild_fails(target, "RS-3-2", 0, size, [(1, holders[1]), (2, holders[2]), (3, target)])
            self.assertEqual(error.code, "unavailable")
            self.assertIn(f"shard 3 at {target.address}: chunk-5 has no shard", error.message)
            self.assertIn("(not_found)", error.message)

        return deferred(run())

    def test_silent_source_is_replaced(self) -> defer.Deferred[None]:
        """A source that answers nothing within the rebuilder's source timeout is dropped for
        the next one."""

        async def run() -> None:
            silent = SilentSource()
            self.addCleanup(silent.release)
            *holders, target = self.peers(6)
            hung = Peer(self, "chunk-hung", get_shard=lambda store: silent)
            size = 4 * 3 * CELL
            shards = await self.write_group(holders, "RS-3-2", group_bytes(size, 10))
            original = holders[0].file_bytes(make_shard_id(GROUP, 0))
            assert target.server.rebuilder is not None
            target.server.rebuilder.source_timeout = 0.2
            await self.rebuild(target, "RS-3-2", 0, size, [(1, hung), (2, holders[2]), (3, holders[3]), (4, holders[4])])
            await self.assert_rebuilt(target, 0, shards, original)
            self.assertEqual(len(silent.held), 1)

        return deferred(run())


class CopyTests(RebuildCase):
    """A shard still readable elsewhere (named among the sources as itself) is copied as it
    is: one source, no decoding; if the copy fails, the others decode the rest."""

    def no_decoding(self) -> None:
        """Fail the test if the rebuilder decodes anything."""

        def decode(*args: Any) -> bytes:
            self.fail("a copy called the codec")

        self.patch(rebuild_module, "_rebuild_fragment", decode)

    def count_decoding(self) -> list[int]:
        """The shard index of every fragment the rebuilder decodes, in order."""
        decode = rebuild_module._rebuild_fragment
        decoded: list[int] = []

        def counting(codec: StripeCodec, fragments: dict[int, Any], index: int) -> bytes:
            decoded.append(index)
            return decode(codec, fragments, index)

        self.patch(rebuild_module, "_rebuild_fragment", counting)
        return decoded

    def test_copy_without_other_sources(self) -> defer.Deferred[None]:
        """RS-3-2, 21 stripes (three batches, the last stripe short): shard 1 is copied to a
        sixth server from its holder, the only source named; the file is the one the upload
        made, nothing is decoded, one info line says "copied" and the meter counts it."""

        async def run() -> None:
            *holders, target = self.peers(6)
            size = 20 * 3 * CELL + 1000
            shards = await self.write_group(holders, "RS-3-2", group_bytes(size, 11))
            shard_id = make_shard_id(GROUP, 1)
            original = holders[1].file_bytes(shard_id)
            self.no_decoding()
            fetched = record_fetches(target)
            with capturedLogs() as events:
                stored = await self.rebuild(target, "RS-3-2", 1, size, [(1, holders[1])])
            self.assertEqual(stored, ShardStored(shard_id, sum(map(len, shards[1]))))
            await self.assert_rebuilt(target, 1, shards, original)
            self.assertEqual(fetched, [(1, 0), (1, REBUILD_BATCH), (1, 2 * REBUILD_BATCH)])
            self.assertEqual(target.server.meter.totals["rebuild_ops"], 1)
            self.assertEqual(target.server.meter.totals["rebuild_bytes"], stored.size)
            lines = [e for e in events if e["log_level"] == LogLevel.info and e.get("shard") == shard_id]
            [line] = lines
            self.assertIn("copied", line["log_format"])
            self.assertNotIn("rebuilt", line["log_format"])
            self.assertEqual((line["address"], line["size"]), (holders[1].address, stored.size))

        return deferred(run())

    def test_copy_reads_no_other_source(self) -> defer.Deferred[None]:
        """Named after k others, the copy source is still the only one read: the others are
        not asked for a cell."""

        async def run() -> None:
            *holders, target = self.peers(7)
            size = 10 * 4 * CELL + 5000
            shards = await self.write_group(holders, "RS-4-2", group_bytes(size, 12))
            original = holders[5].file_bytes(make_shard_id(GROUP, 5))
            self.no_decoding()
            fetched = record_fetches(target)
            await self.rebuild(target, "RS-4-2", 5, size, [*[(i, holders[i]) for i in range(5)], (5, holders[5])])
            await self.assert_rebuilt(target, 5, shards, original)
            self.assertEqual(fetched, [(5, 0), (5, REBUILD_BATCH)])

        return deferred(run())

    def test_copy_damaged_midway_falls_back_to_decoding(self) -> defer.Deferred[None]:
        """Batches of 2 cells: the copy source's cell 5 rots on its disk, so its third batch
        fails (`corrupt`). The cells of the first two batches stay as copied, the rest are
        decoded from the three others from that batch on, the copy source is not read again,
        and the file is still the one the upload made; the info line says "rebuilt" and
        names the failed copy source."""

        async def run() -> None:
            *holders, target = self.peers(6)
            size = 9 * 3 * CELL + 100  # 10 stripes, the last short: 5 batches of 2
            shards = await self.write_group(holders, "RS-3-2", group_bytes(size, 13))
            shard_id = make_shard_id(GROUP, 1)
            original = holders[1].file_bytes(shard_id)
            damage_on_disk(holders[1], shard_id, 5)
            assert target.server.rebuilder is not None
            target.server.rebuilder.batch = 2
            decoded = self.count_decoding()
            fetched = record_fetches(target)
            with capturedLogs() as events:
                stored = await self.rebuild(target, "RS-3-2", 1, size, [(1, holders[1]), *[(i, holders[i]) for i in (0, 2, 3, 4)]])
            self.assertEqual(stored, ShardStored(shard_id, sum(map(len, shards[1]))))
            await self.assert_rebuilt(target, 1, shards, original)
            self.assertEqual(decoded, [1] * 6)  # stripes 4 to 9
            self.assertEqual(fetched[:3], [(1, 0), (1, 2), (1, 4)])
            self.assertEqual(sorted(fetched[3:]), [(i, first) for i in (0, 2, 3) for first in (4, 6, 8)])
            [line] = [e for e in events if e["log_level"] == LogLevel.info and e.get("shard") == shard_id]
            self.assertIn("rebuilt", line["log_format"])
            self.assertEqual(
                line["dropped"],
                f", without failed sources (shard 1 at {holders[1].address}: shard {shard_id} cell 5 "
                f"on chunk-1 failed its checksum (corrupt))",
            )

        return deferred(run())

    def test_copy_source_without_the_shard(self) -> defer.Deferred[None]:
        """A copy source that answers not_found at once: the whole shard is decoded from the
        others, and the copy source is named among the failed."""

        async def run() -> None:
            *holders, target = self.peers(6)
            size = 5 * 3 * CELL
            shards = await self.write_group(holders, "RS-3-2", group_bytes(size, 14))
            shard_id = make_shard_id(GROUP, 0)
            original = holders[0].file_bytes(shard_id)
            decoded = self.count_decoding()
            with capturedLogs() as events:
                await self.rebuild(target, "RS-3-2", 0, size, [(0, holders[4]), *[(i, holders[i]) for i in (1, 2, 3)]])
            await self.assert_rebuilt(target, 0, shards, original)
            self.assertEqual(len(decoded), 5)
            [line] = [e for e in events if e["log_level"] == LogLevel.info and e.get("shard") == shard_id]
            self.assertIn("rebuilt", line["log_format"])
            self.assertIn(f"shard 0 at {holders[4].address}: chunk-4 has no shard {shard_id} (not_found)", line["dropped"])

        return deferred(run())

    def test_copy_source_down_and_too_few_others(self) -> defer.Deferred[None]:
        """A copy source that cannot be reached, and one other source of the three a rebuild
        needs: `unavailable`, naming the copy source's failure; nothing is left on the
        target."""

        async def run() -> None:
            *holders, target = self.peers(6)
            size = 5 * 3 * CELL
            await self.write_group(holders, "RS-3-2", group_bytes(size, 15))
            shard_id = make_shard_id(GROUP, 2)
            await holders[2].stop()
            with capturedLogs() as events:
                error = await self.rebuild_fails(target, "RS-3-2", 2, size, [(2, holders[2]), (0, holders[0])])
            self.assertEqual(error.code, "unavailable")
            self.assertIn(
                f"cannot copy or rebuild shard {shard_id}: its copy at {holders[2].address} could not be "
                f"read, and rebuilding it needs 3 other shards of its block group but only 1 of the 1 others "
                f"named could be read",
                error.message,
            )
            self.assertIn(f"(shard 2 at {holders[2].address}: cannot connect", error.message)
            self.assertEqual(target.tmp_files(), [])
            self.assertFalse(os.path.exists(target.store.path(shard_id)))
            self.assertEqual(target.server.shard_ids, set())
            [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
            self.assertEqual(warning["error"], error.message)

        return deferred(run())

    def test_copy_fails_after_cells_were_written(self) -> defer.Deferred[None]:
        """The copy source's second batch fails and only two others are named: `unavailable`
        after the first batch was written; the partial file is removed."""

        async def run() -> None:
            *holders, target = self.peers(6)
            size = 20 * 3 * CELL
            await self.write_group(holders, "RS-3-2", group_bytes(size, 16))
            shard_id = make_shard_id(GROUP, 3)
            damage_on_disk(holders[3], shard_id, REBUILD_BATCH + 1)
            fetched = record_fetches(target)
            error = await self.rebuild_fails(target, "RS-3-2", 3, size, [(3, holders[3]), (0, holders[0]), (1, holders[1])])
            self.assertEqual(error.code, "unavailable")
            self.assertIn(
                f"shard 3 at {holders[3].address}: shard {shard_id} cell {REBUILD_BATCH + 1} on chunk-3 "
                f"failed its checksum (corrupt)",
                error.message,
            )
            self.assertEqual(fetched, [(3, 0), (3, REBUILD_BATCH)])
            self.assertEqual(target.tmp_files(), [])
            self.assertFalse(os.path.exists(target.store.path(shard_id)))

        return deferred(run())


class LimitTests(RebuildCase):
    """Rebuilds are bounded per server, refused when the request is wrong, and stop with the
    server."""

    def test_busy(self) -> defer.Deferred[None]:
        """With two rebuilds running, a third is refused with `busy`, and so is a second
        rebuild of a shard being rebuilt; the two fail once their sources answer errors."""

        async def run() -> None:
            silent = SilentSource()
            self.addCleanup(silent.release)
            hung = Peer(self, "chunk-hung", get_shard=lambda store: silent)
            [target] = self.peers(1)
            sources = [(1, hung), (2, hung), (3, hung)]
            first = deferred(self.rebuild_fails(target, "RS-3-2", 0, 1000, sources, group=1))
            second = deferred(self.rebuild_fails(target, "RS-3-2", 0, 1000, sources, group=2))
            await silent.received(6)
            third = await self.rebuild_fails(target, "RS-3-2", 0, 1000, sources, group=3)
            self.assertEqual(third.code, "busy")
            self.assertIn("is already rebuilding 2 shards, the most it rebuilds at once", third.message)
            again = await self.rebuild_fails(target, "RS-3-2", 0, 1000, sources, group=1)
            self.assertEqual(again.code, "busy")
            self.assertEqual(again.message, f"chunk-0 is already rebuilding shard {make_shard_id(1, 0)}")
            silent.release()
            for failed in (await first, await second):
                self.assertEqual(failed.code, "unavailable")
                self.assertIn("this server lost its shards (not_found)", failed.message)
            self.assertEqual(target.tmp_files(), [])

        return deferred(run())

    def test_invalid_requests(self) -> defer.Deferred[None]:
        """Requests that cannot be right are refused with invalid_argument and one sentence,
        before anything is read or written."""

        async def run() -> None:
            [target, source] = self.peers(2)
            a = source.address
            good: dict[str, Any] = {"shard_id": make_shard_id(7, 0), "policy": "RS-3-2", "index": 0, "group_size": 5000,
                    "cell_size": CELL, "sources": [(i, make_shard_id(7, i), a) for i in (1, 2, 3)]}
            cases: list[tuple[dict[str, Any], str]] = [
                ({"shard_id": "../../etc/passwd"}, "invalid shard id"),
                ({"index": 1}, "shard index 1 does not match shard id"),
                ({"shard_id": make_shard_id(7, 5), "index": 5}, "are 0 to 4"),
                ({"policy": "XOR-2"}, "unknown erasure-coding policy"),
                ({"cell_size": 0}, "cell size 0 is out of range"),
                ({"cell_size": 16 << 20}, "more than the 16777216 bytes a frame carries"),
                ({"group_size": 0}, "block group size 0 is not between"),
                ({"group_size": 1 << 62}, "is not between 1 byte and"),
                ({"sources": [(1, make_shard_id(7, 1), a), (2, make_shard_id(7, 2), a)]},
                 "copied from itself or rebuilt from 3 others of its block group, but only 2 others were named"),
                ({"sources": [(1, make_shard_id(7, 1), a), (1, make_shard_id(7, 1), a), (2, make_shard_id(7, 2), a)]},
                 "shard 1 is named twice"),
                ({"sources": [(0, make_shard_id(7, 0), a), (0, make_shard_id(7, 0), a)]}, "shard 0 is named twice"),
                ({"sources": [(0, make_shard_id(7, 1), a)]}, "is not shard 0 of block group 0000000000000007"),
                ({"sources": [(1, make_shard_id(7, 1), a), (2, make_shard_id(7, 2), a), (9, make_shard_id(7, 9), a)]},
                 "source index 9 is out of range"),
                ({"sources": [(1, make_shard_id(8, 1), a), (2, make_shard_id(7, 2), a), (3, make_shard_id(7, 3), a)]},
                 "is not shard 1 of block group 0000000000000007"),
                ({"sources": [(1, make_shard_id(7, 1), "nowhere"), (2, make_shard_id(7, 2), a), (3, make_shard_id(7, 3), a)]},
                 "bad address 'nowhere'"),
            ]
            connection = await self.leader.get(target.address)
            for change, expected in cases:
                msg = RebuildShard(**{**good, **change})
                with self.assertRaises(WireError) as raised:
                    await connection.call(msg)
                self.assertEqual(raised.exception.code, "invalid_argument", change)
                self.assertIn(expected, raised.exception.message)
                self.assertNotIn("\n", raised.exception.message)
            self.assertEqual(target.tmp_files(), [])
            self.assertEqual(len(source.factory.connections), 0)  # no source was ever dialled

        return deferred(run())

    def test_stop_aborts_rebuilds(self) -> defer.Deferred[None]:
        """Stopping the rebuilder (the server stopping) fails a rebuild in flight with
        `aborted` and removes its temporary file."""

        async def run() -> None:
            silent = SilentSource()
            self.addCleanup(silent.release)
            hung = Peer(self, "chunk-hung", get_shard=lambda store: silent)
            [target] = self.peers(1)
            failing = deferred(self.rebuild_fails(target, "RS-3-2", 0, 1000, [(1, hung), (2, hung), (3, hung)]))
            await silent.received(3)
            self.assertEqual(len(target.tmp_files()), 1)
            assert target.server.rebuilder is not None
            await target.server.rebuilder.stop()
            error = await failing
            self.assertEqual(error.code, "aborted")
            self.assertEqual(error.message, f"chunk-0 stopped while rebuilding shard {make_shard_id(GROUP, 0)}")
            self.assertEqual(target.tmp_files(), [])

        return deferred(run())


class _Connection:
    def __init__(self, identity: Identity | None) -> None:
        self.identity = identity


class _Request:
    def __init__(self, identity: Identity | None, msg: Any) -> None:
        self.connection = _Connection(identity)
        self.msg = msg
        self.payload = b""
        self.oneway = False


class AuthorizationTests(SynchronousTestCase):
    """Only the node role may ask for a rebuild (with TLS; plaintext checks nothing)."""

    def test_only_nodes(self) -> None:
        """Readers, users and admins are refused with permission_denied; a node's request
        reaches the handler (which refuses this one for its own reasons)."""
        store = ShardStore(self.mktemp())
        peers = ConnectionPool(MemoryReactorClock(), tcp_endpoints(MemoryReactorClock()))
        server = ShardServer(store, "chunk-1", synchronous_executor, LoadMeter(MemoryReactorClock()), peers=peers)
        handlers = guard(server.handlers(), make_authorizer(True), CHUNK_PERMISSIONS)
        msg = RebuildShard(make_shard_id(1, 0), "RS-3-2", 0, 100, CELL, [])
        for role in (Role.READER, Role.USER, Role.ADMIN):
            with self.assertRaises(WireError) as raised:
                handlers[RebuildShard](_Request(Identity("someone", role, 5), msg))  # type: ignore[arg-type]
            self.assertEqual(raised.exception.code, "permission_denied")
        with self.assertRaises(WireError) as raised:
            handlers[RebuildShard](_Request(None, msg))  # type: ignore[arg-type]
        self.assertEqual(raised.exception.code, "permission_denied")
        failure = self.failureResultOf(handlers[RebuildShard](_Request(Identity("meta-1", Role.NODE, 6), msg)))  # type: ignore[arg-type]
        self.assertEqual(failure.value.code, "invalid_argument")

    def test_without_peers(self) -> None:
        """A ShardServer built without a pool to its peers refuses RebuildShard."""
        server = ShardServer(ShardStore(self.mktemp()), "chunk-1", synchronous_executor, LoadMeter(MemoryReactorClock()))
        msg = RebuildShard(make_shard_id(1, 0), "RS-3-2", 0, 100, CELL, [])
        failure = self.failureResultOf(server.handlers()[RebuildShard](_Request(None, msg)))  # type: ignore[arg-type]
        self.assertEqual(failure.value.code, "unsupported")


class PlanTests(SynchronousTestCase):
    """plan_rebuild: what a request says, checked."""

    def test_fragment_size_is_a_full_stripes(self) -> None:
        """The rebuilt shard's fragment size is a full stripe's fragment, whatever the group's
        size, as the client's PutShard announces it; stripes follow the group's size."""
        sources = [(i, make_shard_id(3, i), "127.0.0.1:1") for i in (1, 2, 3, 4)]
        plan = plan_rebuild(RebuildShard(make_shard_id(3, 0), "rs-4-2", 0, 5 * 4 * CELL + 1, CELL, sources), 16 << 20)
        self.assertEqual(plan.fragment_size, FRAGMENT_HEADER_SIZE + CELL)
        self.assertEqual(plan.policy, "RS-4-2")
        self.assertEqual(plan.stripes, 6)
        self.assertEqual([plan.stripe_length(s) for s in (0, 5)], [4 * CELL, 1])
        small = plan_rebuild(RebuildShard(make_shard_id(3, 0), "RS-4-2", 0, 10, CELL, sources), 16 << 20)
        self.assertEqual((small.fragment_size, small.stripes), (FRAGMENT_HEADER_SIZE + CELL, 1))

    def test_copy_source(self) -> None:
        """The shard itself among the sources is the copy source, kept apart from the others
        (in their order); alone, it is enough."""
        copy = (1, make_shard_id(3, 1), "127.0.0.1:9")
        others = [(i, make_shard_id(3, i), "127.0.0.1:1") for i in (4, 0, 2)]
        plan = plan_rebuild(RebuildShard(make_shard_id(3, 1), "RS-3-2", 1, 10, CELL, [others[0], copy, *others[1:]]), 16 << 20)
        self.assertEqual(plan.copy_from, Source(*copy))
        self.assertEqual(plan.sources, tuple(Source(*s) for s in others))
        alone = plan_rebuild(RebuildShard(make_shard_id(3, 1), "RS-3-2", 1, 10, CELL, [copy]), 16 << 20)
        self.assertEqual((alone.copy_from, alone.sources), (Source(*copy), ()))
        without = plan_rebuild(RebuildShard(make_shard_id(3, 1), "RS-3-2", 1, 10, CELL, others), 16 << 20)
        self.assertIsNone(without.copy_from)

    def test_copy_source_refused(self) -> None:
        """A copy source named twice, or with another shard's id, is refused as another source
        would be; so is a request naming neither the shard itself nor k others."""
        copy = (1, make_shard_id(3, 1), "127.0.0.1:9")
        others = [(i, make_shard_id(3, i), "127.0.0.1:1") for i in (0, 2)]
        cases: list[tuple[list[tuple[int, str, str]], str]] = [
            ([copy, *others, copy], "shard 1 is named twice among the sources"),
            ([(1, make_shard_id(3, 2), "127.0.0.1:9"), *others],
             f"source {make_shard_id(3, 2)!r} is not shard 1 of block group 0000000000000003"),
            ([(1, make_shard_id(4, 1), "127.0.0.1:9")],
             f"source {make_shard_id(4, 1)!r} is not shard 1 of block group 0000000000000003"),
            ([(1, make_shard_id(3, 1), "nowhere")], "bad address 'nowhere'"),
            (others, f"shard {make_shard_id(3, 1)} is copied from itself or rebuilt from 3 others of its "
                     f"block group, but only 2 others were named"),
            ([], "but only 0 others were named"),
        ]
        for sources, expected in cases:
            with self.assertRaises(InvalidRebuild) as raised:
                plan_rebuild(RebuildShard(make_shard_id(3, 1), "RS-3-2", 1, 10, CELL, sources), 16 << 20)
            self.assertIn(expected, str(raised.exception))

    def test_cell_must_fit_a_frame(self) -> None:
        """A cell whose fragment is larger than the frame limit is refused."""
        sources = [(i, make_shard_id(3, i), "127.0.0.1:1") for i in (1, 2, 3)]
        with self.assertRaises(InvalidRebuild):
            plan_rebuild(RebuildShard(make_shard_id(3, 0), "RS-3-2", 0, 10, 1 << 20, sources), 1 << 20)


class ServiceTests(SynchronousTestCase):
    """ChunkService wires a rebuilder with its own pool to the peers, and stops it."""

    def test_wiring(self) -> None:
        """The service serves RebuildShard (node only) through a pool of its own, distinct
        from the metadata's; stopping the service stops the rebuilder."""
        root = os.path.abspath(self.mktemp())
        config = ChunkConfig(
            id="chunk-3", listen="tcp:7103:interface=127.0.0.1", address="127.0.0.1:7103",
            data_dir=root, meta=("127.0.0.1:1",),
        )
        service = ChunkService(MemoryReactorClock(), config, executor=synchronous_executor)
        service.startService()
        self.successResultOf(service.when_ready())
        assert service.server is not None and service.factory is not None
        rebuilder = service.server.rebuilder
        assert rebuilder is not None
        self.assertIs(rebuilder.peers, service._peer_pool)
        self.assertIsNot(rebuilder.peers, service._meta_pool)
        self.assertIn(RebuildShard, service.factory.handlers)
        self.assertEqual(CHUNK_PERMISSIONS[RebuildShard], "node")
        self.successResultOf(service.stopService())
        self.assertTrue(rebuilder.stopped)
