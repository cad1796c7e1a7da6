# -*- test-case-name: tests.test_chunk_scrub -*-
"""The chunk server's background scrubber: every shard it holds is read whole and checked on a
schedule, so that damage is found while the rest of its block group can still rebuild it, not
when a reader (or a repair that needs it as a source) meets it at last.

`ShardScrubber` walks the held shards in id order, one at a time, each verified with
`ShardStore.verify` (every cell against its CRC32C, and the header) in the server's executor,
never on the reactor. Between shards it sleeps on the injected clock, so that it reads at most
``rate`` bytes per second on average (a shard with no bytes to read counts as `MIN_SHARD_COST`);
a pass starts every ``interval`` seconds after the one before it started (at once if that one
took longer).

How far the pass got is kept in ``DATA/scrub.json`` (`ScrubProgress`: when the pass started on
the clock, which is wall time in the daemon, the last shard id scrubbed, and when it finished),
saved every `SAVE_SECONDS` or `SAVE_SHARDS` shards, at the end of a pass and at stop, by a
rename over the old file (no fsync: a crash costs a few minutes of rereading). A restart goes on
with the interrupted pass after that id, or, if the last pass finished, waits until ``interval``
after it started: a server restarted more often than a pass lasts still reaches its highest ids.
A file that cannot be read or makes no sense is ignored (a warning), and a new pass begins.

What it finds:

- bad cells or a bad header, or a read the disk fails (EIO and its kin: `shard_damaged`): the
  shard is damaged. It joins the server's `corrupt` set, so the next shard report leaves it out
  and the metadata leader rebuilds it elsewhere; its file is kept. One error line names the
  shard and its bad cells.
- no file: the shard is gone, and the server forgets it (`ShardServer.file_gone`).
- no file, or no bytes to read, because the shards directory itself is gone or is another one
  (the disk's mount dropped, a remount: `ShardServer.check_shards_dir`): nothing is forgotten or
  marked, one critical line says so, and the pass stops, to go on ``interval`` later. After
  `MAX_LOST_IN_A_ROW` shards in a row gone or damaged with no bytes read, the pass stops too,
  with an error line: that is the disk's trouble, not so many shards'.
- a file the server may not read (EACCES, EPERM: `shard_forbidden`): damaged too, once a
  shard after it reads (that file's own permissions: a chmod by hand, which would otherwise
  leave its block group a shard short with nobody told). A run of `MAX_LOST_IN_A_ROW` such
  files stops the pass with nothing marked (a relabel or a `chown -R`: the server's
  permissions, not so many shards'); so does a run the pass ends on.
- any other read error (EMFILE, ENOMEM): the server's passing trouble, not the shard's. A
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

import bisect
import json
import math
import os
from typing import Any

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from dogfs.chunk.server import ShardsDirLost, ShardServer
from dogfs.storage.shards import (
    ShardCorrupt,
    ShardNotFound,
    ShardStore,
    ShardStoreError,
    shard_damaged,
    shard_forbidden,
    validate_shard_id,
)

log = Logger()

#: Seconds from the start of one pass to the next: a week, as Ceph's weekly deep scrub.
DEFAULT_INTERVAL = 7 * 24 * 3600.0

#: Bytes per second the scrubber reads at most, on average: a small share of one disk's
#: bandwidth (about 2.4 TB a week).
DEFAULT_RATE = 4 << 20

#: Bytes a shard counts as at least in the pacing: a run of shards with nothing to read (gone,
#: or not even stat-able) must not sweep the whole store in no time.
MIN_SHARD_COST = 64 << 10

#: Shards in a row found gone, or damaged with no bytes read, that stop a pass: past this many
#: the disk is in trouble, not the shards.
MAX_LOST_IN_A_ROW = 100

#: The file under the data directory (next to shards/ and tmp/) holding a `ScrubProgress`.
PROGRESS_FILE = "scrub.json"

#: How often the progress of a pass is saved: after this many seconds or shards, whichever
#: comes first (and at the end of a pass, and at stop).
SAVE_SECONDS = 60.0
SAVE_SHARDS = 1000

_PROGRESS_VERSION = 1
_PROGRESS_MAX_BYTES = 4096

#: What `check_shard` can find.
HEALTHY = "healthy"
DAMAGED = "damaged"
GONE = "gone"
UNREADABLE = "unreadable"
FORBIDDEN = "forbidden"
CHANGED = "changed"


@frozen
class ShardCheck:
    """What reading one shard whole found."""

    shard_id: str
    #: HEALTHY, DAMAGED, GONE, UNREADABLE, FORBIDDEN (the server may not read it) or CHANGED
    #: (replaced or deleted during the read).
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
    if shard_forbidden(e):
        return ShardCheck(shard_id, FORBIDDEN, size, detail=f"this server may not read it: {e}")
    return ShardCheck(shard_id, UNREADABLE, size, detail=str(e))


@frozen
class ScrubProgress:
    """How far a pass got: what `PROGRESS_FILE` keeps across restarts."""

    #: When the pass started, on the scrubber's clock (wall time in the daemon).
    started: float
    #: The last shard id scrubbed, None before the first.
    last: str | None = None
    #: When the pass finished; None while it is under way (or was interrupted).
    finished: float | None = None


def _is_time(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def load_progress(path: str) -> ScrubProgress | None:
    """Blocking: the progress kept at ``path``; None if there is no such file.

    @raise ValueError: the file makes no sense (not JSON, values out of place, too large).
    @raise OSError: it cannot be read.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(_PROGRESS_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > _PROGRESS_MAX_BYTES:
        raise ValueError(f"it is larger than {_PROGRESS_MAX_BYTES} bytes")
    try:
        record = json.loads(data)
    except ValueError:
        raise ValueError("it is not JSON") from None
    if not isinstance(record, dict) or record.get("version") != _PROGRESS_VERSION:
        raise ValueError(f"it is not a version {_PROGRESS_VERSION} scrub progress record")
    started, last, finished = record.get("started"), record.get("last"), record.get("finished")
    if not (_is_time(started) and (finished is None or (_is_time(finished) and finished >= started))):
        raise ValueError(f"its times make no sense (started {started!r}, finished {finished!r})")
    if last is not None:
        validate_shard_id(last)  # an InvalidShardId is a ValueError
    assert isinstance(started, (int, float))
    return ScrubProgress(float(started), last, None if finished is None else float(finished))


def save_progress(path: str, progress: ScrubProgress) -> None:
    """Blocking: replace ``path`` with ``progress``, atomically (a temporary file renamed over
    it), not durably: a crash may lose the last save, which costs rereading a few shards."""
    record = {
        "version": _PROGRESS_VERSION,
        "started": progress.started,
        "last": progress.last,
        "finished": progress.finished,
    }
    temp = path + ".tmp"
    with open(temp, "w", encoding="ascii") as f:
        json.dump(record, f)
        f.write("\n")
    os.replace(temp, path)


def _removed(store: ShardStore, ids: list[str]) -> list[str]:
    """Blocking: those of ``ids`` that have no file any more."""
    return [shard_id for shard_id in ids if not os.path.lexists(store.path(shard_id))]


@define
class ScrubPass:
    """What one pass over the held shards found."""

    #: When it started, on the scrubber's clock (before a restart, for a pass resumed);
    #: `finished` once it has.
    started: float
    finished: float | None = None
    #: The shard id it went on after, for a pass resumed (after a restart or a stop).
    resumed_after: str | None = None
    #: Why it stopped short of the end ("" while it runs, or once it finished).
    stopped: str = ""
    #: Shards read, and their bytes.
    shards: int = 0
    bytes: int = 0
    #: Ids of the shards found damaged, in the order found.
    damaged: list[str] = field(factory=list)
    #: Shards whose files were gone, and shards that could not be read for a passing reason.
    gone: int = 0
    unreadable: int = 0


class _PassStopped(Exception):
    """The pass cannot go on sensibly now (see `MAX_LOST_IN_A_ROW`)."""


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
        ``rate`` bytes read per second; a ``rate`` of 0 scrubs nothing. The progress is kept
        in `PROGRESS_FILE` under the server's data directory."""
        if interval <= 0 or rate < 0:
            raise ValueError(f"scrub interval {interval!r} must be positive and rate {rate!r} not negative")
        self._clock: Any = clock
        self.server = server
        self.interval = interval
        self.rate = rate
        #: Where the progress is kept.
        self.progress_path = os.path.join(server.store.root, PROGRESS_FILE)
        self._loop: defer.Deferred[None] | None = None
        #: The pass under way, if one is; the last one that ended (finished or stopped).
        self.current: ScrubPass | None = None
        self.last_pass: ScrubPass | None = None
        #: Passes finished since start.
        self.passes = 0
        #: How far the pass under way (or the last one) got; what was last saved of it, when,
        #: and shards scrubbed since.
        self.progress: ScrubProgress | None = None
        self._saved: ScrubProgress | None = None
        self._saved_at = 0.0
        self._unsaved = 0
        self._lost_in_a_row = 0
        #: Files the server may not read since the last shard it could (see `_found`).
        self._forbidden: list[ShardCheck] = []

    # --- service ---------------------------------------------------------------------

    def startService(self) -> None:
        """Go on with the pass the last run left unfinished, or start the next pass once it is
        due (at once if none is known); unless ``rate`` is 0."""
        super().startService()
        if self.rate == 0:
            log.info("{node}: background scrubbing is off (scrub_rate = 0)", node=self.server.node_id)
            return
        # A small local file, read once at start (as the node-id file is).
        try:
            self.progress = load_progress(self.progress_path)
        except (OSError, ValueError) as e:
            log.warn(
                "{node} ignores its scrub progress file {path}, which {problem}: a new pass starts "
                "from the first shard",
                node=self.server.node_id, path=self.progress_path,
                problem=f"cannot be read ({e})" if isinstance(e, OSError) else f"makes no sense ({e})",
            )
            self.progress = None
        self._saved = self.progress
        self._loop = defer.Deferred.fromCoroutine(self._run())
        self._loop.addErrback(self._ended)

    def stopService(self) -> defer.Deferred[None] | None:
        """Stop at once: a sleep's timer is cancelled, and the result of a read still running
        in the executor is dropped when it comes. The progress is saved (in the executor; the
        Deferred fires once it is) if it moved since the last save."""
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.cancel()
        self.current = None
        progress = self.progress
        if progress is None or progress == self._saved:
            return None
        self._saved = progress
        d: defer.Deferred[None] = self.server.executor(save_progress, self.progress_path, progress)
        return d.addErrback(self._not_saved)

    def _ended(self, failure: Failure) -> None:
        if not failure.check(defer.CancelledError):
            log.failure("{node}: the scrubber stopped", failure, node=self.server.node_id)

    def _not_saved(self, failure: Failure) -> None:
        failure.trap(OSError)
        log.warn(
            "{node} could not save its scrub progress to {path}: {error}",
            node=self.server.node_id, path=self.progress_path, error=failure.getErrorMessage(),
        )

    async def _save(self) -> None:
        """Save the progress, if it moved since the last save."""
        progress = self.progress
        self._saved_at, self._unsaved = self._clock.seconds(), 0
        if progress is None or progress == self._saved:
            return
        # Marked saved before the write: stopService must not start a second one meanwhile.
        self._saved = progress
        try:
            await self.server.executor(save_progress, self.progress_path, progress)
        except OSError:
            self._not_saved(Failure())

    # --- passes ----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            progress = self.progress
            if progress is None or progress.finished is not None:
                if progress is not None:
                    # Due `interval` after the last pass started; never more than `interval`
                    # from now, should the clock have been set back.
                    wait = min(progress.started + self.interval - self._clock.seconds(), self.interval)
                    if wait > 0:
                        await deferLater(self._clock, wait)
                progress = self.progress = ScrubProgress(self._clock.seconds())
            try:
                stopped = await self._pass(progress)
            except defer.CancelledError:
                raise
            except Exception:
                # A bug must not end scrubbing for good: say so, and try again next time.
                log.failure("{node}: a scrub pass failed", node=self.server.node_id)
                self.current = None
                self.progress = ScrubProgress(progress.started, finished=self._clock.seconds())
                continue
            if stopped:
                # Go on with it (after the last shard scrubbed) one interval from now.
                await deferLater(self._clock, self.interval)

    async def _pass(self, progress: ScrubProgress) -> bool:
        """Run the pass of ``progress`` from after its last shard; return whether it stopped
        short of the end."""
        server = self.server
        started = progress.started
        scrub = self.current = ScrubPass(started, resumed_after=progress.last)
        self._saved_at, self._unsaved, self._lost_in_a_row = self._clock.seconds(), 0, 0
        self._forbidden = []
        ids = server.held_ids()
        if progress.last is not None:
            ids = ids[bisect.bisect_right(ids, progress.last):]
        try:
            for shard_id in ids:
                if shard_id not in server.shard_ids or shard_id in server.corrupt:
                    continue  # deleted, or found damaged, since the pass began
                began = self._clock.seconds()
                check: ShardCheck = await server.executor(check_shard, server.store, shard_id)
                await self._found(check, scrub)
                self.progress = ScrubProgress(started, shard_id)
                self._unsaved += 1
                if self._unsaved >= SAVE_SHARDS or self._clock.seconds() - self._saved_at >= SAVE_SECONDS:
                    await self._save()
                # Pace: the next read starts no sooner than this one's bytes allow.
                cost = check.size or MIN_SHARD_COST
                wait = began + cost / self.rate - self._clock.seconds()
                if wait > 0:
                    await deferLater(self._clock, wait)
            self._forbidden_unconfirmed(scrub)
            damaged = sorted(server.corrupt)
            if damaged:
                for shard_id in await server.executor(_removed, server.store, damaged):
                    await server.file_gone(shard_id)
        except ShardsDirLost as e:
            # The server said so in a critical line; the pass says where it stopped.
            return await self._stopped(scrub, str(e), log.warn)
        except _PassStopped as e:
            return await self._stopped(scrub, str(e), log.error)
        scrub.finished = self._clock.seconds()
        self.progress = ScrubProgress(started, self.progress.last if self.progress else None, scrub.finished)
        await self._save()
        self.current, self.last_pass = None, scrub
        self.passes += 1
        log.info(
            "{node} scrubbed {shards} shards ({bytes} bytes) in {seconds:.0f}s{resumed}: {damaged} "
            "found damaged, {gone} gone, {unreadable} unreadable",
            node=server.node_id, shards=scrub.shards, bytes=scrub.bytes,
            seconds=scrub.finished - started, damaged=len(scrub.damaged), gone=scrub.gone,
            unreadable=scrub.unreadable,
            resumed="" if scrub.resumed_after is None else f" (since shard {scrub.resumed_after})",
        )
        return False

    async def _stopped(self, scrub: ScrubPass, reason: str, say: Any) -> bool:
        scrub.stopped = reason
        self.current, self.last_pass = None, scrub
        await self._save()
        last = self.progress.last if self.progress else None
        say(
            "{node} stopped its scrub pass after {shards} shards: {reason}; it goes on "
            "{after} in {interval:.0f}s",
            node=self.server.node_id, shards=scrub.shards, reason=reason, interval=self.interval,
            after="from the first shard" if last is None else f"after shard {last}",
        )
        return True

    async def _found(self, check: ShardCheck, scrub: ScrubPass) -> None:
        """Act on what reading one shard found (on the reactor thread, where the server's sets
        are changed).

        @raise ShardsDirLost: the shard has no file, or no bytes to read, because the shards
            directory itself is gone or is another one: nothing is done.
        @raise _PassStopped: it is one shard too many in a row with none.
        """
        server = self.server
        shard_id = check.shard_id
        if check.outcome == FORBIDDEN:
            # Marked only once a shard after it reads: a relabel or a `chown -R` under a
            # running server forbids every file, and that is no shard's damage.
            scrub.shards += 1
            self._forbidden.append(check)
            if len(self._forbidden) > MAX_LOST_IN_A_ROW:
                self._forbidden = []
                raise _PassStopped(
                    f"{MAX_LOST_IN_A_ROW} shards in a row were files this server may not read, and "
                    f"so is shard {shard_id} ({check.detail}): its permissions (owner, mode, "
                    "security label) are wrong, not the shards, and none is marked damaged"
                )
            return
        if self._forbidden and check.outcome in (HEALTHY, DAMAGED) and check.size:
            # A shard read: the files before it that it may not read are their own trouble.
            forbidden, self._forbidden = self._forbidden, []
            for earlier in forbidden:
                self._mark(earlier, scrub)
        if check.outcome == GONE or (check.outcome == DAMAGED and not check.size):
            # An unmounted or remounted disk has every file missing or unreadable at once.
            await server.check_shards_dir()
            self._lost_in_a_row += 1
            if self._lost_in_a_row > MAX_LOST_IN_A_ROW:
                raise _PassStopped(
                    f"{MAX_LOST_IN_A_ROW} shards in a row were gone or could not even be looked at, "
                    f"and so is shard {shard_id} ({check.detail or 'no file'}): the disk is in "
                    "trouble, not the shards"
                )
        else:
            self._lost_in_a_row = 0
        scrub.shards += 1
        scrub.bytes += check.size
        if check.size:
            server.meter.add("scrub_bytes", check.size)
        if check.outcome == GONE:
            if await server.file_gone(shard_id):
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
            self._mark(check, scrub)

    def _mark(self, check: ShardCheck, scrub: ScrubPass) -> None:
        """Mark the shard ``check`` found damaged (or forbidden, and confirmed), and say so."""
        server, shard_id = self.server, check.shard_id
        # Deleted meanwhile, or a fresh copy on its way in: the damage is no more.
        if shard_id not in server.shard_ids or server.writing(shard_id):
            return
        server.mark_damaged(shard_id)
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

    def _forbidden_unconfirmed(self, scrub: ScrubPass) -> None:
        """The pass ends on files the server may not read, with no shard read after them:
        nothing tells their own trouble from the server's, so none is marked."""
        forbidden, self._forbidden = self._forbidden, []
        if forbidden:
            scrub.unreadable += len(forbidden)
            self.server.meter.add("scrub_errors", len(forbidden))
            log.warn(
                "{node} may not read {n} shards at the end of its scrub pass (the first: {shard}, "
                "{detail}); they are read again next pass",
                node=self.server.node_id, n=len(forbidden), shard=forbidden[0].shard_id,
                detail=forbidden[0].detail,
            )
