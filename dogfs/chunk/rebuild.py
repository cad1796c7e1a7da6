# -*- test-case-name: tests.test_chunk_rebuild -*-
"""Shard repair on the chunk server: RebuildShard makes one lost shard of a block group again
from the others, or copies one still readable elsewhere, and stores it here.

The metadata leader names the shard to make, the group's size and cell size, and where the
other shards are (`dogfs.wire.messages.RebuildShard`). Among them it may name, once, the
shard itself on a server that still holds it (a *copy source*: same index, same id), to move
a shard (draining a server, rebalancing) at the cost of one shard's bytes on the network
instead of ``k``. `ShardRebuilder` then:

- checks the request (`plan_rebuild`): a well-formed id matching the index, a known policy,
  sizes a client could have written, and a copy source or at least ``k`` other sources,
  each a shard of the same group named once;
- with a copy source, reads its cells `REBUILD_BATCH` at a time, checks each as below (its
  fragment header naming this very shard and the stripe) and appends them as they are, each
  with the CRC32C it was checked against (the store checks the bytes it writes against it):
  no decoding. If the copy source fails at some batch, it is dropped and the rebuild goes on
  from that batch as below, from the other sources (the cells already copied stay: decoding
  gives the same bytes);
- otherwise (or from the batch where the copy failed) reads ``k`` other sources,
  `REBUILD_BATCH` cells at a time with ``GetShard(id, first, count)`` over connections of
  its own pool (as a client's read leases its own), so that memory stays at about
  ``k * REBUILD_BATCH`` cells whatever the shard's size, and checks every cell as a client's
  read does: order, CRC32C, and a fragment header naming this shard and stripe;
- rebuilds each stripe's missing fragment with the codec, one stripe per call in the
  server's executor (pyeclib holds the GIL for a call: short calls keep the reactor
  responsive);
- writes the fragments into a new shard as a PutShard upload of the same group would
  (same fragment size, same cells), committed with an fsync in the executor. A shard of the
  same id already here is replaced atomically at the commit (a rename), as a fresh upload
  replaces one; readers of the old file keep reading it.

A source that fails (unreachable, closed, an error reply, no answer within
`SOURCE_TIMEOUT`, a cell failing its checks, too few cells) is dropped for the rest of the
rebuild and the next unused one reads the stripes still to do, from the batch where the other
failed; a copy source that fails is never read again either. A failed rebuild leaves
nothing behind: the temporary file is removed.

Error codes:
    invalid_argument    the request cannot be right (see `plan_rebuild`)
    busy                `MAX_REBUILDS` rebuilds are running here already, or this very shard
                        is being rebuilt
    unavailable         no copy source could be read and fewer than ``k`` other sources
                        could; the message names why each one failed, the copy source
                        included
    no_space            the disk (or quota) is full
    storage_error       any other failure of the local disk
    aborted             the server stopped during the rebuild

May import dogfs.wire, dogfs.storage and dogfs.codec; the codec (pyeclib) only once a
rebuild is asked for, never at plugin import time.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from attrs import define, field, frozen
from twisted.internet import defer
from twisted.logger import Logger

from dogfs.codec.checksum import crc32c
from dogfs.codec.policy import ECPolicy, UnknownPolicy
from dogfs.storage.shards import (
    InvalidShardId,
    ShardInfo,
    ShardWriter,
    make_shard_id,
    parse_shard_id,
)
from dogfs.wire.messages import Cell, GetShard, GetShardEnd, RebuildShard, ShardStored
from dogfs.wire.pool import ConnectionPool, split_address
from dogfs.wire.protocol import ConnectionClosed, Request, RequestTimeout, WireError

if TYPE_CHECKING:
    from dogfs.chunk.server import ShardServer
    from dogfs.codec.stripe import StripeCodec

log = Logger()

#: Rebuilds one chunk server runs at once; more are refused with ``busy``. Each reads ``k``
#: shards from its peers and writes one: a few keep the disk and the network busy, more
#: would take them from the clients.
MAX_REBUILDS = 2

#: Cells read from each source per GetShard: the rebuild holds about ``k`` times this many.
REBUILD_BATCH = 8

#: Seconds a source has to send one batch (its cells and the end) before it is dropped
#: for another (dialling it has the pool's own time limits).
SOURCE_TIMEOUT = 30.0

#: Most cells a rebuilt shard may have: far beyond any block group (64 with the defaults),
#: low enough to refuse a size that is no block group's.
MAX_SHARD_CELLS = 1 << 24


class InvalidRebuild(ValueError):
    """A RebuildShard request that cannot be right; the message is one sentence."""


@frozen
class Source:
    """One shard to rebuild from: its index in the block group, its id, who holds it."""

    index: int
    shard_id: str
    address: str


@frozen(eq=False)
class RebuildPlan:
    """A checked RebuildShard: what to make and what to make it from.

    ``sources`` are the other shards of the group, the preferred first; ``copy_from`` the
    shard itself on another server, read first and copied as it is, if the request named it.
    """

    shard_id: str
    index: int
    group_size: int
    codec: StripeCodec
    sources: tuple[Source, ...]
    copy_from: Source | None = None

    @property
    def policy(self) -> str:
        """The policy's canonical name, as the shard's header records it."""
        return self.codec.policy.name

    @property
    def stripes(self) -> int:
        """Stripes of the block group: the cells of each of its shards."""
        return -(-self.group_size // self.codec.stripe_size)

    def stripe_length(self, stripe: int) -> int:
        """Bytes of user data in stripe ``stripe``: a full stripe's but for the last."""
        return min(self.codec.stripe_size, self.group_size - stripe * self.codec.stripe_size)

    @property
    def fragment_size(self) -> int:
        """What a client's PutShard of the group announces: a full stripe's fragment size
        (codec header included), whatever the group's size."""
        return self.codec.fragment_size(self.codec.stripe_size)


def plan_rebuild(msg: RebuildShard, max_payload: int) -> RebuildPlan:
    """Check a RebuildShard request; `max_payload` is the largest frame payload (a cell).

    @raise InvalidRebuild: saying what is wrong, in one sentence.
    """
    from dogfs.codec.stripe import StripeCodec  # pyeclib: not at plugin import time

    shard_id = msg.shard_id
    try:
        group, index = parse_shard_id(shard_id)
    except InvalidShardId as e:
        raise InvalidRebuild(str(e)) from None
    try:
        policy = ECPolicy.parse(msg.policy)
    except UnknownPolicy as e:
        raise InvalidRebuild(str(e)) from None
    if msg.index != index:
        raise InvalidRebuild(f"shard index {msg.index} does not match shard id {shard_id}")
    if not index < policy.width:
        raise InvalidRebuild(
            f"shard {shard_id} has index {index}, but the shards of an {policy} block group "
            f"are 0 to {policy.width - 1}"
        )
    try:
        codec = StripeCodec(policy, msg.cell_size)
    except ValueError as e:
        raise InvalidRebuild(str(e)) from None
    fragment_size = codec.fragment_size(codec.stripe_size)
    if fragment_size > max_payload:
        raise InvalidRebuild(
            f"cells of {msg.cell_size} bytes make {fragment_size}-byte fragments, more than the "
            f"{max_payload} bytes a frame carries"
        )
    if msg.group_size < 1 or -(-msg.group_size // codec.stripe_size) > MAX_SHARD_CELLS:
        raise InvalidRebuild(
            f"block group size {msg.group_size} is not between 1 byte and {MAX_SHARD_CELLS} "
            f"stripes of {codec.stripe_size} bytes"
        )
    named: list[Source] = []
    for source_index, source_id, address in msg.sources:
        if not 0 <= source_index < policy.width:
            raise InvalidRebuild(
                f"source index {source_index} is out of range for an {policy} block group"
            )
        if any(s.index == source_index for s in named):
            raise InvalidRebuild(f"shard {source_index} is named twice among the sources")
        if source_id != make_shard_id(group, source_index):
            raise InvalidRebuild(
                f"source {source_id!r} is not shard {source_index} of block group {group:016x}"
            )
        try:
            split_address(address)
        except ValueError as e:
            raise InvalidRebuild(f"source {source_id} has a {e}") from None
        named.append(Source(source_index, source_id, address))
    # The shard itself (at most once, checked above) is a copy source; the others decode.
    copy_from = next((s for s in named if s.index == index), None)
    sources = tuple(s for s in named if s.index != index)
    if copy_from is None and len(sources) < policy.k:
        raise InvalidRebuild(
            f"shard {shard_id} is copied from itself or rebuilt from {policy.k} others of its "
            f"block group, but only {len(sources)} "
            f"{'other was' if len(sources) == 1 else 'others were'} named"
        )
    return RebuildPlan(shard_id, index, msg.group_size, codec, sources, copy_from)


class _BadCell(Exception):
    """A source sent a cell that fails a check (order, checksum, header)."""


@define(eq=False)
class _Reading:
    """The sources of one rebuild: the copy source while it serves, the other sources in
    use, those left, and why others failed."""

    plan: RebuildPlan
    copying: Source | None = field(init=False)
    active: list[Source] = field(init=False)
    unused: deque[Source] = field(init=False)
    failures: list[tuple[Source, str]] = field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        k = self.plan.codec.k
        self.copying = self.plan.copy_from
        # The preferred first, as the leader ordered them (read only once a copy fails).
        self.active = list(self.plan.sources[:k])
        self.unused = deque(self.plan.sources[k:])

    def drop_copy(self, reason: str) -> None:
        """Drop the copy source for good: the rest is decoded from the other sources."""
        assert self.copying is not None
        self.failures.append((self.copying, reason))
        self.copying = None

    def replace(self, source: Source, reason: str) -> Source | None:
        """Drop ``source`` for good; the next unused one in its place, or None if none is left."""
        self.active.remove(source)
        self.failures.append((source, reason))
        if not self.unused:
            return None
        replacement = self.unused.popleft()
        self.active.append(replacement)
        return replacement


def _rebuild_fragment(codec: StripeCodec, fragments: dict[int, Any], index: int) -> bytes:
    """Blocking (pyeclib): fragment ``index`` of a stripe, from ``k`` others."""
    return codec.reconstruct(fragments, [index])[index]


class ShardRebuilder:
    """Serves RebuildShard for a `ShardServer`, reading its peers through ``peers``."""

    def __init__(
        self,
        server: ShardServer,
        peers: ConnectionPool,
        *,
        max_rebuilds: int = MAX_REBUILDS,
        batch: int = REBUILD_BATCH,
        source_timeout: float = SOURCE_TIMEOUT,
    ) -> None:
        """Rebuild into ``server``'s store, at most ``max_rebuilds`` at once, reading
        ``batch`` cells per GetShard and giving each source ``source_timeout`` seconds per
        batch. ``peers`` (a pool of the server's own) also gives the clock."""
        self.server = server
        self.peers = peers
        self.clock: Any = peers.clock
        self.max_rebuilds = max_rebuilds
        self.batch = batch
        self.source_timeout = source_timeout
        #: Ids of the shards being rebuilt now.
        self.running: set[str] = set()
        self.stopped = False

    def stop(self) -> defer.Deferred[None]:
        """Fail the rebuilds in flight (their temporary files go) and close the connections
        to the peers; fires once they are closed."""
        self.stopped = True
        return self.peers.close_all()

    def rebuild_shard(self, request: Request) -> defer.Deferred[ShardStored]:
        """The RebuildShard handler: answers ShardStored once the rebuilt shard is durable."""
        return defer.Deferred.fromCoroutine(self._rebuild_shard(request.msg))

    async def _rebuild_shard(self, msg: RebuildShard) -> ShardStored:
        server = self.server
        shard_id = msg.shard_id
        try:
            try:
                plan = plan_rebuild(msg, server.limits.max_payload)
            except InvalidRebuild as e:
                raise server._error("invalid_argument", str(e)) from None
            self._check_running(shard_id)
            if shard_id in self.running:
                raise server._error(
                    "busy", f"{server.node_id} is already rebuilding shard {shard_id}"
                )
            if len(self.running) >= self.max_rebuilds:
                raise server._error(
                    "busy",
                    f"{server.node_id} is already rebuilding {len(self.running)} shards, the most "
                    f"it rebuilds at once: ask for shard {shard_id} once one of them has ended",
                )
            self.running.add(shard_id)
            started = self.clock.seconds()
            reading = _Reading(plan)
            try:
                size = await self._store_rebuilt(reading)
            finally:
                self.running.discard(shard_id)
        except WireError as e:
            log.warn(
                "{node} did not rebuild shard {shard}: {error}",
                node=server.node_id, shard=shard_id, error=e.message,
            )
            raise
        server.stored(shard_id)
        server.meter.add("rebuild_ops")
        server.meter.add("rebuild_bytes", size)
        # Sources that failed are worth an operator's look (a cell damaged on its way here is
        # logged nowhere else), in the same line.
        if reading.copying is not None:
            log.info(
                "{node} copied shard {shard} from {address}: {size} bytes in {seconds:.3f}s",
                node=server.node_id, shard=shard_id, address=reading.copying.address, size=size,
                seconds=self.clock.seconds() - started,
            )
            return ShardStored(shard_id, size)
        dropped = "; ".join(f"shard {s.index} at {s.address}: {why}" for s, why in reading.failures)
        log.info(
            "{node} rebuilt shard {shard}: {size} bytes in {seconds:.3f}s{dropped}",
            node=server.node_id, shard=shard_id, size=size,
            seconds=self.clock.seconds() - started,
            dropped=f", without failed sources ({dropped})" if dropped else "",
        )
        return ShardStored(shard_id, size)

    async def _store_rebuilt(self, reading: _Reading) -> int:
        """Rebuild the shard into a new file and commit it; returns its fragment bytes."""
        server = self.server
        plan = reading.plan
        shard_id = plan.shard_id
        info = ShardInfo(shard_id, plan.policy, plan.index, plan.fragment_size)
        with server.storing(shard_id):
            # A short page-cache operation, as for PutShard: not worth a thread hop.
            writer = server.store.begin(info)
        committed = False
        try:
            size = await self._write_cells(reading, writer)
            self._check_running(shard_id)
            with server.storing(shard_id):
                await server.executor(writer.commit)  # fsync: never on the reactor
            committed = True
        finally:
            if not committed:
                writer.abort()
        return size

    async def _write_cells(self, reading: _Reading, writer: ShardWriter) -> int:
        """Copy or read and rebuild, then append, every cell, batch by batch; returns the
        fragment bytes."""
        server = self.server
        plan = reading.plan
        size = 0
        for first in range(0, plan.stripes, self.batch):
            count = min(self.batch, plan.stripes - first)
            if reading.copying is not None:
                copied = await self._copy_batch(reading, first, count)
                if copied is not None:
                    with server.storing(plan.shard_id):
                        # The CRC32C checked on receipt: the store checks what it writes.
                        await server.executor(writer.append_cells, copied)
                    size += sum(len(f) for f, _ in copied)
                    del copied
                    continue
            cells = await self._read_batch(reading, first, count)
            rebuilt = []
            for j in range(count):
                stripe = {index: got[j][0] for index, got in cells.items()}
                rebuilt.append(
                    await server.executor(_rebuild_fragment, plan.codec, stripe, plan.index)
                )
            # The sources' cells (receive buffers) are let go before the next batch is read.
            del cells, stripe
            self._check_running(plan.shard_id)
            with server.storing(plan.shard_id):
                # No CRC to check against: the store computes the one it keeps.
                await server.executor(writer.append_cells, [(f, None) for f in rebuilt])
            size += sum(len(f) for f in rebuilt)
        return size

    def _check_running(self, shard_id: str) -> None:
        if self.stopped:
            raise self.server._error(
                "aborted", f"{self.server.node_id} stopped while rebuilding shard {shard_id}"
            )

    async def _copy_batch(
        self, reading: _Reading, first: int, count: int
    ) -> list[tuple[memoryview, int]] | None:
        """Cells ``first .. first + count - 1`` of the copy source, each with its checked
        CRC32C; or None once it failed (it is dropped, and the rebuild decodes from here).

        @raise WireError: ``unavailable`` if fewer than ``k`` other sources are named.
        """
        plan = reading.plan
        assert reading.copying is not None
        result = await self._fetch(plan, reading.copying, first, count)
        # Stopping closes the connections: the failure that follows is not the source's.
        self._check_running(plan.shard_id)
        if isinstance(result, list):
            return result
        reading.drop_copy(result)
        if len(reading.active) < plan.codec.k:
            raise self._unavailable(reading)
        return None

    async def _read_batch(
        self, reading: _Reading, first: int, count: int
    ) -> dict[int, list[tuple[memoryview, int]]]:
        """Cells ``first .. first + count - 1`` of ``k`` sources, by source index. A source
        that fails is dropped, and an unused one reads the whole batch in its place.

        @raise WireError: ``unavailable`` once fewer than ``k`` sources are left.
        """
        got: dict[int, list[tuple[memoryview, int]]] = {}
        todo = list(reading.active)
        while todo:
            results = await defer.gatherResults(
                [defer.Deferred.fromCoroutine(self._fetch(reading.plan, s, first, count)) for s in todo],
                consumeErrors=True,
            )
            # Stopping closes the connections: the failures that follow are not the sources'.
            self._check_running(reading.plan.shard_id)
            asked, todo = todo, []
            for source, result in zip(asked, results, strict=True):
                if isinstance(result, list):
                    got[source.index] = result
                    continue
                replacement = reading.replace(source, result)
                if replacement is None:
                    raise self._unavailable(reading)
                todo.append(replacement)
        return got

    def _unavailable(self, reading: _Reading) -> WireError:
        plan = reading.plan
        reasons = "; ".join(
            f"shard {source.index} at {source.address}: {reason}"
            for source, reason in reading.failures
        )
        if plan.copy_from is not None:
            return self.server._error(
                "unavailable",
                f"cannot copy or rebuild shard {plan.shard_id}: its copy at "
                f"{plan.copy_from.address} could not be read, and rebuilding it needs "
                f"{plan.codec.k} other shards of its block group but only {len(reading.active)} "
                f"of the {len(plan.sources)} others named could be read ({reasons})",
            )
        return self.server._error(
            "unavailable",
            f"cannot rebuild shard {plan.shard_id}: it needs {plan.codec.k} other shards of its "
            f"block group but only {len(reading.active)} of the {len(plan.sources)} named could "
            f"be read ({reasons})",
        )

    async def _fetch(
        self, plan: RebuildPlan, source: Source, first: int, count: int
    ) -> list[tuple[memoryview, int]] | str:
        """Cells ``first .. first + count - 1`` of ``source``, each checked, with its CRC32C;
        or why not.

        The connection is leased, ours alone for the read, as a client's read leases its
        own; it is kept for the next batch when the source answered in full (or with an
        error), closed when the read was cut short (cells may still be on their way).
        """
        try:
            connection = await self.peers.lease(source.address)
        except WireError as e:
            return e.message
        if self.stopped:  # dialled while the pool was being closed: not the pool's any more
            connection.close()
            return "the rebuild was stopped"
        cells: list[tuple[memoryview, int]] = []

        def part(msg: Any, payload: memoryview) -> None:
            self._check_cell(plan, source, first + len(cells), first + count, msg, payload)
            cells.append((payload, msg.crc))

        answered = False
        try:
            reply = await connection.call(
                GetShard(source.shard_id, first, count), timeout=self.source_timeout, on_part=part
            )
            answered = True
        except _BadCell as e:
            return str(e)
        except (ConnectionClosed, RequestTimeout) as e:
            return e.message
        except WireError as e:  # the source answered with an error (not_found, corrupt...)
            answered = True
            return f"{e.message} ({e.code})"
        finally:
            if answered:
                self.peers.give_back(source.address, connection)
            else:
                connection.close()
        if not isinstance(reply.msg, GetShardEnd) or len(cells) != count:
            return f"sent {len(cells)} of cells {first} to {first + count - 1}"
        return cells

    @staticmethod
    def _check_cell(
        plan: RebuildPlan, source: Source, expected: int, end: int, msg: Any, payload: memoryview
    ) -> None:
        """Check a cell as a client's read does (`GroupReader._part`); raise _BadCell if bad."""
        if expected >= end:
            raise _BadCell(f"sent a cell after cell {end - 1}, the last one asked for")
        if not isinstance(msg, Cell) or msg.index != expected:
            raise _BadCell(f"sent cell {getattr(msg, 'index', '?')} where cell {expected} was due")
        if crc32c(payload) != msg.crc:
            raise _BadCell(f"cell {msg.index} failed its checksum")
        try:
            found = plan.codec.fragment_info(payload)
        except ValueError as e:  # BadFragment
            raise _BadCell(f"cell {msg.index} is not a fragment: {e}") from None
        if found != (source.index, plan.stripe_length(msg.index)):
            # A valid fragment of another shard or stripe: never trust it for this one.
            raise _BadCell(f"cell {msg.index} is a fragment of another shard or stripe")
