# -*- test-case-name: tests.test_chunk_scrub -*-
"""The chunk server's background scrubber: every shard it holds is read whole and checked on a
schedule, so that damage is found while the rest of its block group can still rebuild it, not
when a reader (or a repair that needs it as a source) meets it at last.

`ShardScrubber` walks the held shards in id order, one at a time, each verified with
`ShardStore.verify` (every cell against its CRC32C, and the header) in the server's executor,
never on the reactor. Between shards it sleeps on the injected clock, so that it reads at most
``rate`` bytes per second on average; a pass starts every ``interval`` seconds after the one
before it started (at once if that one took longer). What it finds:

- bad cells or a bad header, or a read the disk fails (EIO and its kin: `shard_damaged`): the
  shard is damaged. It joins the server's `corrupt` set, so the next shard report leaves it out
  and the metadata leader rebuilds it elsewhere; its file is kept. One error line names the
  shard and its bad cells.
- no file: the shard is gone, and the server forgets it (`ShardServer.file_gone`).
- any other read error (EMFILE, ENOMEM, EACCES): the server's trouble, not the shard's. A
  warning, and the shard is read again next pass.
- a file replaced or deleted while it was read (an upload or a rebuild committing a fresh copy,
  a DeleteShards): what was found is about a file no longer there, and goes unheeded.

Damaged shards whose files have gone since (an operator removed them, done looking) are
forgotten at the end of each pass. Only shards the server holds are read: an upload's
temporary file under tmp/ never is.

The traffic counts in the server's `LoadMeter`: ``scrub_bytes`` (file bytes read) and
``scrub_errors`` (shards found damaged, gone or unreadable), reported in the heartbeat's load
as ``scrub_bytes_s`` and ``scrub_errors_s``.

May import dogfs.chunk.server and dogfs.storage.
"""

from __future__ import annotations

import os
from typing import Any

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from dogfs.chunk.server import ShardServer
from dogfs.storage.shards import (
    ShardCorrupt,
    ShardNotFound,
    ShardStore,
    ShardStoreError,
    shard_damaged,
)

log = Logger()

#: Seconds from the start of one pass to the next: a week, as Ceph's weekly deep scrub.
DEFAULT_INTERVAL = 7 * 24 * 3600.0

#: Bytes per second the scrubber reads at most, on average: a small share of one disk's
#: bandwidth (about 2.4 TB a week).
DEFAULT_RATE = 4 << 20

#: What `check_shard` can find.
HEALTHY = "healthy"
DAMAGED = "damaged"
GONE = "gone"
UNREADABLE = "unreadable"
CHANGED = "changed"


@frozen
class ShardCheck:
    """What reading one shard whole found."""

    shard_id: str
    #: HEALTHY, DAMAGED, GONE, UNREADABLE or CHANGED (replaced or deleted during the read).
    outcome: str
    #: Bytes of the file, which the read cost (0 when there was no file).
    size: int = 0
    #: Indexes of the cells that failed their checksums (or were cut off).
    bad_cells: tuple[int, ...] = ()
    #: Why a shard is damaged other than by bad cells, or why it could not be read.
    detail: str = ""


def check_shard(store: ShardStore, shard_id: str) -> ShardCheck:
    """Blocking: verify ``shard_id``'s file whole (`ShardStore.verify`).

    The file's identity is taken before and after: a file renamed over (a fresh copy
    committed) or deleted during the read is CHANGED, whatever the read found.
    """
    path = store.path(shard_id)
    try:
        before = os.stat(path)
    except FileNotFoundError:
        return ShardCheck(shard_id, GONE)
    except OSError as e:
        return _read_error(shard_id, 0, e)
    size = before.st_size
    found: ShardCheck
    try:
        bad = store.verify(shard_id)
    except ShardNotFound:
        return ShardCheck(shard_id, CHANGED, size)
    except ShardCorrupt as e:
        if e.cell is None:
            found = ShardCheck(shard_id, DAMAGED, size, detail=f"its header {e.detail}")
        else:
            found = ShardCheck(shard_id, DAMAGED, size, bad_cells=(e.cell,))
    except OSError as e:
        found = _read_error(shard_id, size, e)
    except ShardStoreError as e:
        found = ShardCheck(shard_id, UNREADABLE, size, detail=str(e))
    else:
        found = ShardCheck(shard_id, DAMAGED if bad else HEALTHY, size, bad_cells=tuple(bad))
    try:
        after = os.stat(path)
    except FileNotFoundError:
        return ShardCheck(shard_id, CHANGED, size)
    except OSError:
        return found  # the read's finding stands
    if (before.st_dev, before.st_ino) != (after.st_dev, after.st_ino):
        return ShardCheck(shard_id, CHANGED, size)
    return found


def _read_error(shard_id: str, size: int, e: OSError) -> ShardCheck:
    if shard_damaged(e):
        return ShardCheck(shard_id, DAMAGED, size, detail=f"the disk cannot read it: {e}")
    return ShardCheck(shard_id, UNREADABLE, size, detail=str(e))


def _removed(store: ShardStore, ids: list[str]) -> list[str]:
    """Blocking: those of ``ids`` that have no file any more."""
    return [shard_id for shard_id in ids if not os.path.lexists(store.path(shard_id))]


@define
class ScrubPass:
    """What one pass over the held shards found."""

    #: When it started, on the scrubber's clock; `finished` once it has.
    started: float
    finished: float | None = None
    #: Shards read, and their bytes.
    shards: int = 0
    bytes: int = 0
    #: Ids of the shards found damaged, in the order found.
    damaged: list[str] = field(factory=list)
    #: Shards whose files were gone, and shards that could not be read for a passing reason.
    gone: int = 0
    unreadable: int = 0


class ShardScrubber(Service):
    """Reads every shard a `ShardServer` holds, paced, once per interval; marks the damaged."""

    def __init__(
        self,
        clock: IReactorTime,
        server: ShardServer,
        *,
        interval: float = DEFAULT_INTERVAL,
        rate: int = DEFAULT_RATE,
    ) -> None:
        """Scrub ``server``'s shards on ``clock``: a pass every ``interval`` seconds, at most
        ``rate`` bytes read per second; a ``rate`` of 0 scrubs nothing."""
        if interval <= 0 or rate < 0:
            raise ValueError(f"scrub interval {interval!r} must be positive and rate {rate!r} not negative")
        self._clock: Any = clock
        self.server = server
        self.interval = interval
        self.rate = rate
        self._loop: defer.Deferred[None] | None = None
        #: The pass under way, if one is; the last one finished.
        self.current: ScrubPass | None = None
        self.last_pass: ScrubPass | None = None
        #: Passes finished since start.
        self.passes = 0

    # --- service ---------------------------------------------------------------------

    def startService(self) -> None:
        """Start the first pass at once (unless ``rate`` is 0)."""
        super().startService()
        if self.rate == 0:
            log.info("{node}: background scrubbing is off (scrub_rate = 0)", node=self.server.node_id)
            return
        self._loop = defer.Deferred.fromCoroutine(self._run())
        self._loop.addErrback(self._ended)

    def stopService(self) -> None:
        """Stop at once: a sleep's timer is cancelled, and the result of a read still running
        in the executor is dropped when it comes."""
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.cancel()
        self.current = None

    def _ended(self, failure: Failure) -> None:
        if not failure.check(defer.CancelledError):
            log.failure("{node}: the scrubber stopped", failure, node=self.server.node_id)

    # --- passes ----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            started = self._clock.seconds()
            try:
                await self._pass(started)
            except defer.CancelledError:
                raise
            except Exception:
                # A bug must not end scrubbing for good: say so, and try again next time.
                log.failure("{node}: a scrub pass failed", node=self.server.node_id)
            wait = started + self.interval - self._clock.seconds()
            if wait > 0:
                await deferLater(self._clock, wait)

    async def _pass(self, started: float) -> None:
        server = self.server
        scrub = self.current = ScrubPass(started)
        for shard_id in server.held_ids():
            if shard_id not in server.shard_ids or shard_id in server.corrupt:
                continue  # deleted, or found damaged, since the pass began
            began = self._clock.seconds()
            check: ShardCheck = await server.executor(check_shard, server.store, shard_id)
            self._found(check, scrub)
            # Pace: the next read starts no sooner than this one's bytes allow.
            wait = began + check.size / self.rate - self._clock.seconds()
            if wait > 0:
                await deferLater(self._clock, wait)
        damaged = sorted(server.corrupt)
        if damaged:
            for shard_id in await server.executor(_removed, server.store, damaged):
                server.file_gone(shard_id)
        scrub.finished = self._clock.seconds()
        self.current, self.last_pass = None, scrub
        self.passes += 1
        log.info(
            "{node} scrubbed {shards} shards ({bytes} bytes) in {seconds:.0f}s: {damaged} found "
            "damaged, {gone} gone, {unreadable} unreadable",
            node=server.node_id, shards=scrub.shards, bytes=scrub.bytes,
            seconds=scrub.finished - started, damaged=len(scrub.damaged), gone=scrub.gone,
            unreadable=scrub.unreadable,
        )

    def _found(self, check: ShardCheck, scrub: ScrubPass) -> None:
        """Act on what reading one shard found (on the reactor thread, where the server's sets
        are changed)."""
        server = self.server
        shard_id = check.shard_id
        scrub.shards += 1
        scrub.bytes += check.size
        if check.size:
            server.meter.add("scrub_bytes", check.size)
        if check.outcome == GONE:
            if server.file_gone(shard_id):
                scrub.gone += 1
                server.meter.add("scrub_errors")
        elif check.outcome == UNREADABLE:
            scrub.unreadable += 1
            server.meter.add("scrub_errors")
            log.warn(
                "{node} could not scrub shard {shard}: {detail}; it is read again next pass",
                node=server.node_id, shard=shard_id, detail=check.detail,
            )
        elif check.outcome == DAMAGED:
            # Deleted meanwhile, or a fresh copy on its way in: the damage is no more.
            if shard_id not in server.shard_ids or server.writing(shard_id):
                return
            server.corrupt.add(shard_id)
            scrub.damaged.append(shard_id)
            server.meter.add("scrub_errors")
            if check.bad_cells:
                what = "bad cells " + ", ".join(str(i) for i in check.bad_cells)
            else:
                what = check.detail
            log.error(
                "{node} scrub found shard {shard} damaged ({what}): it is left out of shard "
                "reports from now on, for the metadata leader to rebuild elsewhere; its file is kept",
                node=server.node_id, shard=shard_id, what=what, cells=list(check.bad_cells),
            )
