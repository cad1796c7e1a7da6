# -*- test-case-name: tests.test_chunk_scrub -*-
"""Tests for dogfs.chunk.scrub (the background scrubber) and for what the chunk server reports
of shards found damaged or gone.

A ShardServer over a real ShardStore in a temporary directory, with a synchronous executor
(or one that holds its calls until the test runs them) and a task.Clock: every pass runs on
simulated time, so its pacing is exact.
"""

from __future__ import annotations

import errno
import json
import math
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from dogfs import config
from dogfs.chunk.load import LoadMeter
from dogfs.chunk.scrub import (
    CHANGED,
    DAMAGED,
    GONE,
    HEALTHY,
    MAX_LOST_IN_A_ROW,
    MIN_SHARD_COST,
    PROGRESS_FILE,
    SAVE_SECONDS,
    SAVE_SHARDS,
    UNREADABLE,
    ScrubProgress,
    ShardScrubber,
    check_shard,
    load_progress,
    save_progress,
)
from dogfs.chunk.server import ShardServer, synchronous_executor
from dogfs.chunk.service import ChunkService
from dogfs.config import ChunkConfig
from dogfs.storage.shards import (
    HEADER_SIZE,
    RECORD_OVERHEAD,
    ShardInfo,
    ShardReader,
    ShardStore,
)
from dogfs.wire.messages import GetShard, PutShard
from dogfs.wire.protocol import WireError
from tests.test_chunk_service import pair

A = "000000000000000a-00"
B = "000000000000000b-01"
C = "000000000000000c-02"
FRAGMENT = 1000


def write_shard(store: ShardStore, shard_id: str, cells: int, seed: int = 1) -> int:
    """Store a shard of ``cells`` cells of FRAGMENT bytes; returns its file's size."""
    index = int(shard_id[17:])
    fragments = [bytes([(seed + i) % 256]) * FRAGMENT for i in range(cells)]
    store.write(ShardInfo(shard_id, "RS-4-2", index, FRAGMENT), fragments)
    return os.path.getsize(store.path(shard_id))


def flip_byte(store: ShardStore, shard_id: str, cell: int) -> None:
    """Damage one byte of cell ``cell``'s fragment on disk."""
    offset = HEADER_SIZE + cell * (RECORD_OVERHEAD + FRAGMENT) + RECORD_OVERHEAD + 10
    with open(store.path(shard_id), "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def messages(events: list[LogEvent], level: LogLevel) -> list[str]:
    """The text of the captured events of ``level``."""
    return [formatEvent(e) for e in events if e["log_level"] == level]


class Scrubbed:
    """A ShardServer on a temp dir and a scrubber for it, reading through a recording executor."""

    def __init__(self, root: str, *, interval: float = 1000.0, rate: int = 1000, now: float = 0.0) -> None:
        self.clock = Clock()
        self.clock.advance(now)  # a restarted server's clock goes on from where it was
        self.store = ShardStore(root)
        #: Shard ids checked by the scrubber, in order.
        self.checked: list[str] = []
        #: How many times the scrubber saved its progress.
        self.saves = 0
        #: When set, calls wait here until the test runs them (a busy disk thread).
        self.held: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] | None = None
        self.server = ShardServer(self.store, "chunk-3", self.executor, LoadMeter(self.clock))
        self.scrubber = ShardScrubber(self.clock, self.server, interval=interval, rate=rate)

    def executor(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        if f is check_shard:
            self.checked.append(args[1])
        if f is save_progress:
            self.saves += 1
        if self.held is not None:
            d: defer.Deferred[Any] = defer.Deferred()
            self.held.append((f, args, d))
            return d
        return synchronous_executor(f, *args)

    def scan(self) -> None:
        """List the store into the server, as ChunkService does before scrubbing starts."""
        self.server.scan()

    def advance(self, seconds: float) -> None:
        """Move the clock on by ``seconds``, firing each timer at its time, as a punctual
        reactor would (`Clock.advance` fires them all at the end, late)."""
        end = self.clock.seconds() + seconds
        while True:
            due = [call.getTime() for call in self.clock.getDelayedCalls()]
            if not due or min(due) > end:
                break
            self.clock.advance(max(0.0, min(due) - self.clock.seconds()))
        self.clock.advance(end - self.clock.seconds())

    def run_pass(self) -> None:
        """Start the scrubber and run its first pass to the end."""
        self.scrubber.startService()
        while self.scrubber.passes == 0:
            self.advance(0.01)


class PacingTests(SynchronousTestCase):
    """Healthy passes: every shard read in id order, at most `rate` bytes per second."""

    def test_healthy_pass_is_paced(self) -> None:
        """A pass reads every held shard in id order, one after another, waiting after each
        as long as its bytes take at `scrub_rate`: a pass over shards of known sizes takes
        their sum divided by the rate, on the clock; nothing is marked; the bytes are counted
        in the load."""
        s = Scrubbed(self.mktemp(), rate=1000)
        sizes = {
            C: write_shard(s.store, C, 3),
            A: write_shard(s.store, A, 1),
            B: write_shard(s.store, B, 2),
        }
        s.scan()
        s.scrubber.startService()
        # The first read starts at once; each next one once the bytes before it allow.
        self.assertEqual(s.checked, [A])
        s.clock.advance(sizes[A] / 1000 - 0.001)
        self.assertEqual(s.checked, [A])
        s.clock.advance(0.001)
        self.assertEqual(s.checked, [A, B])
        s.clock.advance(sizes[B] / 1000)
        self.assertEqual(s.checked, [A, B, C])
        self.assertEqual(s.scrubber.passes, 0)
        s.clock.advance(sizes[C] / 1000 - 0.001)
        self.assertEqual(s.scrubber.passes, 0)
        s.clock.advance(0.001)
        self.assertEqual(s.scrubber.passes, 1)
        scrub = s.scrubber.last_pass
        assert scrub is not None and scrub.finished is not None
        total = sum(sizes.values())
        self.assertAlmostEqual(scrub.finished - scrub.started, total / 1000)
        self.assertEqual((scrub.shards, scrub.bytes, scrub.damaged, scrub.gone, scrub.unreadable), (3, total, [], 0, 0))
        self.assertEqual(s.server.corrupt, set())
        self.assertEqual(s.server.held_ids(), [A, B, C])
        self.assertEqual(s.server.meter.totals["scrub_bytes"], total)
        self.assertEqual(s.server.meter.totals["scrub_errors"], 0)
        self.assertIn("scrub_bytes_s", s.server.load())
        s.scrubber.stopService()

    def test_passes_repeat_after_interval(self) -> None:
        """The next pass starts `scrub_interval` after the previous one started; shards
        stored meanwhile are read by it."""
        s = Scrubbed(self.mktemp(), interval=100.0, rate=1 << 30)
        write_shard(s.store, A, 1)
        s.scan()
        s.scrubber.startService()
        s.advance(1)
        self.assertEqual((s.checked, s.scrubber.passes), ([A], 1))
        write_shard(s.store, B, 1)
        s.server.shard_ids.add(B)  # as a PutShard does
        s.advance(98.5)
        self.assertEqual(s.checked, [A])
        s.advance(0.5)  # 100 s after the first pass started
        self.assertEqual(s.checked, [A, A])
        s.advance(0.01)
        self.assertEqual((s.checked, s.scrubber.passes), ([A, A, B], 2))
        s.advance(99.99)
        self.assertEqual(s.checked, [A, A, B, A])
        s.scrubber.stopService()

    def test_pass_longer_than_interval(self) -> None:
        """A pass that takes longer than `scrub_interval` is followed by the next at once."""
        s = Scrubbed(self.mktemp(), interval=1.0, rate=1000)
        size = write_shard(s.store, A, 5)
        s.scan()
        s.scrubber.startService()
        s.clock.advance(size / 1000 - 0.001)
        self.assertEqual(s.checked, [A])
        s.clock.advance(0.001)
        self.assertEqual((s.checked, s.scrubber.passes), ([A, A], 1))
        s.scrubber.stopService()

    def test_rate_zero_disables(self) -> None:
        """A `scrub_rate` of 0 reads nothing, ever, and schedules nothing."""
        s = Scrubbed(self.mktemp(), rate=0)
        write_shard(s.store, A, 1)
        s.scan()
        with capturedLogs() as events:
            s.scrubber.startService()
        self.assertEqual(s.clock.getDelayedCalls(), [])
        s.clock.advance(10**7)
        self.assertEqual((s.checked, s.scrubber.passes), ([], 0))
        self.assertIn("background scrubbing is off", messages(events, LogLevel.info)[0])
        s.scrubber.stopService()

    def test_bad_settings_refused(self) -> None:
        """A scrubber needs a positive interval and a rate of 0 or more."""
        server = ShardServer(ShardStore(self.mktemp()), "chunk-3", synchronous_executor, LoadMeter(Clock()))
        for interval, rate in ((0.0, 1), (-1.0, 1), (1.0, -1)):
            self.assertRaises(ValueError, ShardScrubber, Clock(), server, interval=interval, rate=rate)


class FindingTests(SynchronousTestCase):
    """What the scrubber does with damaged, gone and unreadable shards."""

    def test_flipped_byte(self) -> None:
        """A flipped byte in a cell makes the shard damaged: in `corrupt`, left out of the
        shard report (`held_ids`) but still counted in the heartbeat's shard count, its file
        kept, one error line naming the shard and the bad cell, counted in the load. The
        next pass does not read it again; a fresh upload of it would clear the mark."""
        s = Scrubbed(self.mktemp(), rate=1 << 30)
        write_shard(s.store, A, 1)
        write_shard(s.store, B, 4)
        write_shard(s.store, C, 1)
        flip_byte(s.store, B, 2)
        s.scan()
        with capturedLogs() as events:
            s.run_pass()
        self.assertEqual(s.server.corrupt, {B})
        self.assertEqual(s.server.held_ids(), [A, C])
        self.assertEqual(s.server.shard_ids, {A, B, C})
        self.assertTrue(os.path.exists(s.store.path(B)))
        [error] = messages(events, LogLevel.error)
        self.assertIn(f"shard {B} damaged (bad cells 2)", error)
        self.assertIn("left out of shard reports", error)
        [event] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(event["cells"], [2])
        self.assertEqual(s.scrubber.last_pass.damaged if s.scrubber.last_pass else None, [B])
        self.assertEqual(s.server.meter.totals["scrub_errors"], 1)
        load = s.server.load()
        self.assertEqual(load["corrupt_shards"], 1.0)
        self.assertGreater(load["scrub_errors_s"], 0.0)
        _capacity, _used, shards = self.successResultOf(s.server.status())
        self.assertEqual(shards, 3)
        s.checked.clear()
        s.advance(1000)
        self.assertEqual(s.checked, [A, C])
        s.scrubber.stopService()

    def test_bad_header(self) -> None:
        """A shard whose header fails its checksum is damaged too, the log saying so."""
        s = Scrubbed(self.mktemp(), rate=1 << 30)
        write_shard(s.store, A, 2)
        s.scan()
        with open(s.store.path(A), "r+b") as f:
            f.seek(20)
            f.write(b"\xee")
        with capturedLogs() as events:
            s.run_pass()
        self.assertEqual(s.server.corrupt, {A})
        self.assertEqual(s.server.held_ids(), [])
        [error] = messages(events, LogLevel.error)
        self.assertIn(f"shard {A} damaged (its header", error)
        s.scrubber.stopService()

    def test_disk_read_error(self) -> None:
        """A read the disk fails (EIO) makes the shard damaged, as on the read path; one
        failing for a passing reason of the server's (ENOMEM) leaves it alone, with a
        warning, to be read again next pass."""
        s = Scrubbed(self.mktemp(), rate=1 << 30)
        write_shard(s.store, A, 2)
        write_shard(s.store, B, 2)
        s.scan()
        real = ShardReader.read_record

        def read_record(reader: ShardReader, i: int) -> Any:
            if reader.shard_id == A:
                raise OSError(errno.EIO, "Input/output error")
            if reader.shard_id == B:
                raise OSError(errno.ENOMEM, "Cannot allocate memory")
            return real(reader, i)

        self.patch(ShardReader, "read_record", read_record)
        with capturedLogs() as events:
            s.run_pass()
        self.assertEqual(s.server.corrupt, {A})
        self.assertEqual(s.server.held_ids(), [B])
        [error] = messages(events, LogLevel.error)
        self.assertIn(f"shard {A} damaged (the disk cannot read it: [Errno 5] Input/output error)", error)
        [warning] = messages(events, LogLevel.warn)
        self.assertIn(f"could not scrub shard {B}: [Errno 12] Cannot allocate memory", warning)
        scrub = s.scrubber.last_pass
        assert scrub is not None
        self.assertEqual((scrub.damaged, scrub.unreadable), ([A], 1))
        self.assertEqual(s.server.meter.totals["scrub_errors"], 2)
        s.scrubber.stopService()

    def test_file_the_server_may_not_read(self) -> None:
        """A shard file the server may not open (EACCES: a chmod 000 by hand) is damaged
        once a shard after it reads, so its block group is repaired instead of staying a
        shard short until someone notices; the error line says why. One the pass ends on
        (nothing read after it) is not marked, and is read again next pass."""
        s = Scrubbed(self.mktemp(), rate=1 << 30)
        for shard_id in (A, B, C):
            write_shard(s.store, shard_id, 2)
        s.scan()
        real = os.open

        def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if str(path).endswith(".shard") and (A in str(path) or C in str(path)):
                raise OSError(errno.EACCES, "Permission denied")
            return real(path, flags, *args, **kwargs)

        self.patch(os, "open", open_)
        with capturedLogs() as events:
            s.run_pass()
        self.assertEqual(s.server.corrupt, {A})
        self.assertEqual(s.server.held_ids(), [B, C])
        [error] = messages(events, LogLevel.error)
        self.assertIn(f"shard {A} damaged (this server may not read it: [Errno 13] Permission denied)", error)
        [warning] = messages(events, LogLevel.warn)
        self.assertIn(f"may not read 1 shards at the end of its scrub pass (the first: {C}", warning)
        scrub = s.scrubber.last_pass
        assert scrub is not None
        self.assertEqual((scrub.damaged, scrub.unreadable), ([A], 1))
        s.scrubber.stopService()

    def _no_file_may_be_read(self, stat_too: bool) -> None:
        s = Scrubbed(self.mktemp(), rate=1 << 30, interval=10**7)
        ids = [f"{i:016x}-00" for i in range(1, MAX_LOST_IN_A_ROW + 51)]
        for shard_id in ids:
            write_shard(s.store, shard_id, 1)
        s.scan()
        real_open, real_stat = os.open, os.stat

        def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if str(path).endswith(".shard"):
                raise OSError(errno.EACCES, "Permission denied")
            return real_open(path, flags, *args, **kwargs)

        def stat(path: Any, *args: Any, **kwargs: Any) -> Any:
            if stat_too and str(path).endswith(".shard"):
                raise OSError(errno.EACCES, "Permission denied")
            return real_stat(path, *args, **kwargs)

        self.patch(os, "open", open_)
        self.patch(os, "stat", stat)
        with capturedLogs() as events:
            s.scrubber.startService()
            s.advance(3600)
        scrub = s.scrubber.last_pass
        assert scrub is not None
        self.assertIn("shards in a row were files this server may not read", scrub.stopped)
        self.assertEqual(s.server.corrupt, set())
        [error] = messages(events, LogLevel.error)
        self.assertIn("none is marked damaged", error)
        s.scrubber.stopService()
        self.assertEqual([listed.corrupt for listed in s.store.list()], [False] * len(ids))

    def test_no_file_may_be_read(self) -> None:
        """Every shard file forbidden at once (a security relabel, a `chown -R` under the
        running server): the server's permissions, not the shards', so nothing is marked
        damaged; a long run of them stops the pass, saying so, and it goes on one interval
        later. The start-up scan does not mark them either."""
        self._no_file_may_be_read(stat_too=False)

    def test_no_file_may_even_be_looked_at(self) -> None:
        """The same when stat is refused too (a bucket directory without its x bit)."""
        self._no_file_may_be_read(stat_too=True)

    def test_deleted_file(self) -> None:
        """A shard whose file vanished (an operator deleted it) is dropped from `shard_ids`,
        so the next shard report omits it; a warning says so."""
        s = Scrubbed(self.mktemp(), rate=1 << 30)
        write_shard(s.store, A, 1)
        write_shard(s.store, B, 1)
        s.scan()
        os.unlink(s.store.path(A))
        with capturedLogs() as events:
            s.run_pass()
        self.assertEqual(s.server.shard_ids, {B})
        self.assertEqual(s.server.held_ids(), [B])
        self.assertEqual(s.server.corrupt, set())
        [warning] = messages(events, LogLevel.warn)
        self.assertIn(f"no longer has shard {A}: its file is gone", warning)
        scrub = s.scrubber.last_pass
        assert scrub is not None
        self.assertEqual(scrub.gone, 1)
        s.scrubber.stopService()

    def test_removed_damaged_file_is_forgotten(self) -> None:
        """Once an operator removes a damaged shard's file, the end of the next pass forgets
        it: it no longer counts as held or damaged."""
        s = Scrubbed(self.mktemp(), interval=10.0, rate=1 << 30)
        write_shard(s.store, A, 2)
        write_shard(s.store, B, 1)
        flip_byte(s.store, A, 0)
        s.scan()
        s.run_pass()
        self.assertEqual(s.server.corrupt, {A})
        os.unlink(s.store.path(A))
        s.advance(10)
        self.assertEqual((s.server.shard_ids, s.server.corrupt), ({B}, set()))
        self.assertEqual(self.successResultOf(s.server.status())[2], 1)
        s.scrubber.stopService()

    def test_replaced_during_scrub(self) -> None:
        """A damaged file replaced by a fresh copy while it was being read is not marked:
        what the read found is about a file no longer there."""
        s = Scrubbed(self.mktemp(), rate=1 << 30)
        write_shard(s.store, A, 2)
        flip_byte(s.store, A, 1)
        s.scan()
        real = s.store.verify

        def verify(shard_id: str) -> list[int]:
            bad = real(shard_id)
            self.assertEqual(bad, [1])
            write_shard(s.store, A, 2)  # a commit renames a new file over it
            return bad

        s.store.verify = verify  # type: ignore[method-assign]
        with capturedLogs() as events:
            s.run_pass()
        self.assertEqual(s.server.corrupt, set())
        self.assertEqual(s.server.held_ids(), [A])
        self.assertEqual(messages(events, LogLevel.error), [])
        s.store.verify = real  # type: ignore[method-assign]
        self.assertEqual(check_shard(s.store, A).outcome, HEALTHY)
        s.scrubber.stopService()

    def test_deleted_during_scrub(self) -> None:
        """A shard deleted while it is read is skipped: neither marked nor complained of."""
        s = Scrubbed(self.mktemp(), rate=1 << 30)
        write_shard(s.store, A, 2)
        flip_byte(s.store, A, 1)
        s.scan()
        real = s.store.verify

        def verify(shard_id: str) -> list[int]:
            bad = real(shard_id)
            s.store.delete(shard_id)
            return bad

        s.store.verify = verify  # type: ignore[method-assign]
        self.assertEqual(check_shard(s.store, A).outcome, CHANGED)
        write_shard(s.store, A, 2)
        flip_byte(s.store, A, 1)
        with capturedLogs() as events:
            s.run_pass()
        self.assertEqual(s.server.corrupt, set())
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.warn], [])
        s.scrubber.stopService()

    def test_fresh_copy_being_written(self) -> None:
        """Damage found while a fresh copy of the shard is being uploaded is not marked: the
        upload is about to replace the file."""
        s = Scrubbed(self.mktemp(), rate=1 << 30)
        write_shard(s.store, A, 2)
        flip_byte(s.store, A, 1)
        s.scan()

        class Upload:
            msg = PutShard(A, "RS-4-2", 0, FRAGMENT)

        class Connection:
            pass

        connection = Connection()
        s.server.uploads[connection] = {Upload()}  # type: ignore[index]
        self.assertTrue(s.server.writing(A))
        s.run_pass()
        self.assertEqual(s.server.corrupt, set())
        s.scrubber.stopService()

    def test_check_outcomes(self) -> None:
        """check_shard tells a healthy shard, a damaged one and a missing one apart, with the
        file's size."""
        store = ShardStore(self.mktemp())
        size = write_shard(store, A, 3)
        write_shard(store, B, 3)
        flip_byte(store, B, 0)
        flip_byte(store, B, 2)
        self.assertEqual(check_shard(store, A).outcome, HEALTHY)
        self.assertEqual(check_shard(store, A).size, size)
        damaged = check_shard(store, B)
        self.assertEqual((damaged.outcome, damaged.bad_cells), (DAMAGED, (0, 2)))
        self.assertEqual(check_shard(store, C).outcome, GONE)
        self.assertNotIn(UNREADABLE, {check_shard(store, x).outcome for x in (A, B, C)})


class StopTests(SynchronousTestCase):
    """stopService leaves nothing behind."""

    def test_stop_while_sleeping(self) -> None:
        """Stopping between shards cancels the pacing timer: nothing is left scheduled,
        and nothing more is read."""
        s = Scrubbed(self.mktemp(), rate=1000)
        write_shard(s.store, A, 1)
        write_shard(s.store, B, 1)
        s.scan()
        s.scrubber.startService()
        self.assertEqual(len(s.clock.getDelayedCalls()), 1)
        s.scrubber.stopService()
        self.assertEqual(s.clock.getDelayedCalls(), [])
        s.clock.advance(10**6)
        self.assertEqual(s.checked, [A])

    def test_stop_while_reading(self) -> None:
        """Stopping while a read runs in the executor drops its result when it comes: a
        damaged shard found after the stop is not marked, no timer is started, no error is
        left unhandled."""
        s = Scrubbed(self.mktemp(), rate=1000)
        write_shard(s.store, A, 2)
        flip_byte(s.store, A, 0)
        s.scan()
        s.held = []
        s.scrubber.startService()
        [(f, args, d)] = s.held
        s.scrubber.stopService()
        d.callback(f(*args))  # the thread finishes after the stop
        self.assertEqual(s.server.corrupt, set())
        self.assertEqual(s.clock.getDelayedCalls(), [])
        self.assertEqual(s.scrubber.passes, 0)

    def test_stop_between_passes_and_restart(self) -> None:
        """Stopped while waiting for the next pass, the scrubber leaves no timer; started
        again, it begins the next pass when it is due, not at once."""
        s = Scrubbed(self.mktemp(), interval=100.0, rate=1 << 30)
        write_shard(s.store, A, 1)
        s.scan()
        s.run_pass()
        self.assertEqual(len(s.clock.getDelayedCalls()), 1)
        s.scrubber.stopService()
        self.assertEqual(s.clock.getDelayedCalls(), [])
        s.scrubber.startService()
        self.assertEqual(s.checked, [A])
        s.advance(100)
        self.assertEqual(s.checked, [A, A])
        s.scrubber.stopService()


def shard_ids(count: int) -> list[str]:
    """``count`` shard ids, in id order."""
    return [f"{i:016x}-00" for i in range(1, count + 1)]


class ProgressTests(SynchronousTestCase):
    """How far a pass got survives restarts (PROGRESS_FILE under the data directory)."""

    def test_restarts_resume_the_pass(self) -> None:
        """A server restarted more often than a pass lasts still scrubs every shard: each
        start goes on after the last shard the one before scrubbed (saved at stop), keeping
        the pass's start time, until the pass ends; each shard is read once."""
        root = self.mktemp()
        s = Scrubbed(root, rate=1000)
        ids = shard_ids(6)
        size = 0
        for shard_id in ids:
            size = write_shard(s.store, shard_id, 3)
        flip_byte(s.store, ids[-1], 1)
        checked: list[str] = []
        now = 0.0
        found: set[str] = set()
        for _restart in range(10):
            # A new process: a fresh server scans the store; a fresh scrubber starts.
            s = Scrubbed(root, rate=1000, now=now)
            s.scan()
            s.scrubber.startService()
            s.advance(1.6 * size / 1000)  # two shards' worth, less than a third of a pass
            now = s.clock.seconds()
            passes = s.scrubber.passes
            found |= s.server.corrupt
            self.successResultOf(defer.maybeDeferred(s.scrubber.stopService))
            checked += s.checked
            if passes:
                break
            progress = load_progress(os.path.join(s.store.root, PROGRESS_FILE))
            self.assertEqual(progress, ScrubProgress(0.0, checked[-1]))
        self.assertEqual(checked, ids)
        self.assertEqual(found, {ids[-1]})
        scrub = s.scrubber.last_pass
        assert scrub is not None and scrub.finished is not None
        # The last shard was read before the last restart; the pass ended after it.
        self.assertEqual((scrub.started, scrub.resumed_after, scrub.shards), (0.0, ids[-1], 0))
        progress = load_progress(s.scrubber.progress_path)
        self.assertEqual(progress, ScrubProgress(0.0, ids[-1], scrub.finished))

    def test_crash_resumes_from_the_last_save(self) -> None:
        """The progress is saved every SAVE_SECONDS (not per shard): a server that dies
        without stopping goes on after the last shard saved, rereading the few since."""
        root = self.mktemp()
        s = Scrubbed(root, rate=1000)
        ids = shard_ids(30)
        size = 0
        for shard_id in ids:
            size = write_shard(s.store, shard_id, 3)
        s.scan()
        s.scrubber.startService()
        s.advance(80)  # 26 shards read, then the process dies: no stopService
        self.assertEqual(len(s.checked), 26)
        self.assertEqual(s.saves, 1)
        # The first shard done 60 s or more after the pass began.
        saved = ids[math.ceil(60 / (size / 1000))]
        self.assertEqual(load_progress(s.scrubber.progress_path), ScrubProgress(0.0, saved))
        s = Scrubbed(root, rate=1000, now=80)
        s.scan()
        s.scrubber.startService()
        self.assertEqual(s.checked, [ids[ids.index(saved) + 1]])
        s.scrubber.stopService()

    def test_saved_every_so_many_shards(self) -> None:
        """A fast pass saves its progress every SAVE_SHARDS shards (and at its end), however
        little time they take: not once per shard."""
        s = Scrubbed(self.mktemp(), rate=1 << 30)
        ids = shard_ids(SAVE_SHARDS + 1)
        for shard_id in ids:
            write_shard(s.store, shard_id, 1)
        s.scan()
        saved: list[ScrubProgress] = []
        real = s.executor

        def executor(f: Any, *args: Any) -> defer.Deferred[Any]:
            if f is save_progress:
                saved.append(args[1])
            return real(f, *args)

        s.server.executor = executor
        s.run_pass()
        self.assertLess(s.clock.seconds(), SAVE_SECONDS)
        [first, last] = saved
        self.assertEqual(first, ScrubProgress(0.0, ids[SAVE_SHARDS - 1]))
        self.assertEqual((last.last, last.finished is not None), (ids[-1], True))
        s.scrubber.stopService()

    def test_finished_pass_not_repeated_early(self) -> None:
        """A restart after a finished pass waits until `scrub_interval` after that pass
        started; one long after starts the next pass at once; a pass start in the future (a
        clock set back) puts the next pass off by no more than the interval."""
        root = self.mktemp()
        s = Scrubbed(root, interval=1000.0, rate=1 << 30)
        write_shard(s.store, A, 1)
        s.scan()
        s.run_pass()
        s.scrubber.stopService()
        s = Scrubbed(root, interval=1000.0, rate=1 << 30, now=400)
        s.scan()
        s.scrubber.startService()
        s.advance(599.9)
        self.assertEqual(s.checked, [])
        s.advance(0.1)
        self.assertEqual(s.checked, [A])
        s.scrubber.stopService()
        s = Scrubbed(root, interval=1000.0, rate=1 << 30, now=5000)
        s.scan()
        s.scrubber.startService()
        self.assertEqual(s.checked, [A])
        s.scrubber.stopService()
        save_progress(s.scrubber.progress_path, ScrubProgress(1e9, A, 1e9))
        s = Scrubbed(root, interval=1000.0, rate=1 << 30, now=6000)
        s.scan()
        s.scrubber.startService()
        s.advance(999.9)
        self.assertEqual(s.checked, [])
        s.advance(0.1)
        self.assertEqual(s.checked, [A])
        s.scrubber.stopService()

    def test_garbled_file_ignored(self) -> None:
        """A progress file that is not sane is ignored with a warning naming it: a new pass
        starts at once from the first shard, and its end writes a sane file again."""
        garbage = [
            b"\x00\xff\xfe",
            b"{",
            b"[]",
            b'{"version": 2, "started": 1.0, "last": null, "finished": null}',
            b'{"version": 1, "started": "yesterday", "last": null, "finished": null}',
            b'{"version": 1, "started": NaN, "last": null, "finished": null}',
            b'{"version": 1, "started": true, "last": null, "finished": null}',
            b'{"version": 1, "started": 10.0, "last": null, "finished": 5.0}',
            b'{"version": 1, "started": 1.0, "last": "../../../etc/passwd", "finished": null}',
            b'{"version": 1, "started": 1.0, "last": null, "finished": null, "x": "' + b"x" * 5000 + b'"}',
        ]
        for data in garbage:
            root = self.mktemp()
            s = Scrubbed(root, rate=1 << 30)
            write_shard(s.store, A, 1)
            write_shard(s.store, B, 1)
            s.scan()
            with open(s.scrubber.progress_path, "wb") as f:
                f.write(data)
            with capturedLogs() as events:
                s.scrubber.startService()
                s.advance(1)
            [warning] = messages(events, LogLevel.warn)
            self.assertIn(f"chunk-3 ignores its scrub progress file {s.scrubber.progress_path}, which makes no sense", warning)
            self.assertIn("a new pass starts from the first shard", warning)
            self.assertEqual((s.checked, s.scrubber.passes), ([A, B], 1), data)
            progress = load_progress(s.scrubber.progress_path)
            assert progress is not None
            self.assertEqual((progress.started, progress.last), (0.0, B))
            s.scrubber.stopService()

    def test_unreadable_file_ignored(self) -> None:
        """A progress file that cannot be read (here a directory in its place) is ignored
        with a warning, and one that cannot be written is warned of; scrubbing goes on."""
        s = Scrubbed(self.mktemp(), rate=1 << 30)
        write_shard(s.store, A, 1)
        s.scan()
        os.mkdir(s.scrubber.progress_path)
        with capturedLogs() as events:
            s.run_pass()
        first, second = messages(events, LogLevel.warn)
        self.assertIn("ignores its scrub progress file", first)
        self.assertIn("which cannot be read", first)
        self.assertIn(f"could not save its scrub progress to {s.scrubber.progress_path}", second)
        self.assertEqual(s.checked, [A])
        s.scrubber.stopService()

    def test_file_layout(self) -> None:
        """The progress is one small JSON file in the data directory, next to shards/ and
        tmp/, replaced by a rename (no temporary file is left); the store's listing of its
        shards does not see it."""
        s = Scrubbed(self.mktemp(), rate=1 << 30)
        write_shard(s.store, A, 1)
        s.scan()
        s.clock.advance(1234.5)
        s.run_pass()
        self.assertEqual(s.scrubber.progress_path, os.path.join(s.store.root, "scrub.json"))
        self.assertEqual(sorted(os.listdir(s.store.root)), ["scrub.json", "shards", "tmp"])
        with open(s.scrubber.progress_path, encoding="ascii") as f:
            record = json.load(f)
        self.assertEqual((record["version"], record["started"], record["last"]), (1, 1234.5, A))
        self.assertAlmostEqual(record["finished"], 1234.5, places=3)
        self.assertEqual([stat.shard_id for stat in s.store.list()], [A])
        s.scrubber.stopService()


class LostDirectoryTests(SynchronousTestCase):
    """A shards directory gone or remounted, and runs of shards with nothing to read, do not
    have the server forget or mark its shards wholesale."""

    def setUp(self) -> None:
        self.s = Scrubbed(self.mktemp(), interval=1000.0, rate=1000)
        self.ids = shard_ids(5)
        for shard_id in self.ids:
            write_shard(self.s.store, shard_id, 2)
        self.s.scan()
        self.away = self.s.store.shards_dir + ".away"

    def test_vanished_shards_dir(self) -> None:
        """With the shards directory gone (an unmounted disk), the first shard found missing
        forgets nothing: one critical line, the pass stops, and goes on one interval later;
        by then the directory is back, and every shard is still held and scrubbed."""
        s = self.s
        os.rename(s.store.shards_dir, self.away)
        with capturedLogs() as events:
            s.scrubber.startService()
            s.advance(999)
        [critical] = messages(events, LogLevel.critical)
        self.assertIn(f"the shards directory of chunk-3 is gone or was remounted: {s.store.shards_dir}: No such file", critical)
        [warning] = messages(events, LogLevel.warn)
        self.assertIn("chunk-3 stopped its scrub pass after 0 shards", warning)
        self.assertIn("it goes on from the first shard in 1000s", warning)
        self.assertEqual(s.checked, [self.ids[0]])
        self.assertEqual((s.server.held_ids(), s.server.corrupt), (self.ids, set()))
        scrub = s.scrubber.last_pass
        assert scrub is not None
        self.assertIn("gone or was remounted", scrub.stopped)
        self.assertEqual(s.scrubber.passes, 0)
        os.rename(self.away, s.store.shards_dir)
        s.advance(1 + 5 * 3)
        # (A pass that ends more than an interval after it started is followed at once.)
        self.assertEqual(s.checked[:6], [self.ids[0]] + self.ids)
        self.assertEqual((s.scrubber.passes, s.server.held_ids()), (1, self.ids))
        s.scrubber.stopService()

    def test_directory_in_its_place(self) -> None:
        """Another directory where the scanned one was (a remount, one made anew) is taken
        for a lost one too: its missing files forget nothing."""
        s = self.s
        os.rename(s.store.shards_dir, self.away)
        os.mkdir(s.store.shards_dir)
        with capturedLogs() as events:
            s.scrubber.startService()
        [critical] = messages(events, LogLevel.critical)
        self.assertIn("is not the directory scanned at start", critical)
        self.assertEqual(s.server.held_ids(), self.ids)
        s.scrubber.stopService()

    def test_read_with_shards_dir_gone(self) -> None:
        """A GetShard of a held shard while the shards directory is gone answers
        storage_error and forgets nothing; the critical line is said once, not per read.
        Once the directory is back, a file really missing is not_found, and forgotten."""
        s = self.s
        client, pump = pair(dict(s.server.handlers()), s.clock)
        os.rename(s.store.shards_dir, self.away)
        with capturedLogs() as events:
            for shard_id in self.ids[:2]:
                d = client.call(GetShard(shard_id, 0, -1))
                pump.flush()
                error = self.failureResultOf(d, WireError).value
                self.assertEqual(error.code, "storage_error")
                self.assertIn(f"chunk-3 cannot read shard {shard_id}: the shards directory of chunk-3 is gone", error.message)
            d = client.call(GetShard(A, 0, -1))  # never held: not_found as ever
            pump.flush()
            self.assertEqual(self.failureResultOf(d, WireError).value.code, "not_found")
        self.assertEqual(len(messages(events, LogLevel.critical)), 1)
        self.assertEqual(s.server.held_ids(), self.ids)
        os.rename(self.away, s.store.shards_dir)
        d = client.call(GetShard(self.ids[0], 0, -1), on_part=lambda message, payload: None)
        pump.flush()
        self.successResultOf(d)
        os.unlink(s.store.path(self.ids[1]))
        d = client.call(GetShard(self.ids[1], 0, -1))
        pump.flush()
        self.assertEqual(self.failureResultOf(d, WireError).value.code, "not_found")
        self.assertNotIn(self.ids[1], s.server.shard_ids)

    def test_run_of_lost_shards_stops_the_pass(self) -> None:
        """Shards gone or damaged with no bytes to read (files missing, or empty) are paced
        as MIN_SHARD_COST each, and more than MAX_LOST_IN_A_ROW of them in a row stop the
        pass with an error line: at most that many are forgotten or marked, and the pass
        goes on, after the last one acted on, one interval later."""
        rate = 1 << 20
        s = Scrubbed(self.mktemp(), interval=10000.0, rate=rate)
        ids = shard_ids(MAX_LOST_IN_A_ROW + 10)
        for shard_id in ids:
            write_shard(s.store, shard_id, 1)
        s.scan()
        lost = ids[2:]
        for i, shard_id in enumerate(lost):
            if i % 2:
                os.unlink(s.store.path(shard_id))
            else:
                open(s.store.path(shard_id), "w").close()  # a file emptied by a broken file system
        with capturedLogs() as events:
            s.scrubber.startService()
            s.advance(3600)
        [error] = [m for m in messages(events, LogLevel.error) if "stopped its scrub pass" in m]
        self.assertIn(f"{MAX_LOST_IN_A_ROW} shards in a row were gone or could not even be looked at", error)
        self.assertIn(f"and so is shard {lost[MAX_LOST_IN_A_ROW]}", error)
        self.assertIn(f"it goes on after shard {lost[MAX_LOST_IN_A_ROW - 1]} in 10000s", error)
        acted = lost[:MAX_LOST_IN_A_ROW]
        self.assertEqual(s.checked, ids[:2] + acted + [lost[MAX_LOST_IN_A_ROW]])
        self.assertEqual(s.server.corrupt, set(acted[0::2]))
        self.assertEqual(s.server.shard_ids, set(ids) - set(acted[1::2]))
        scrub = s.scrubber.last_pass
        assert scrub is not None
        self.assertEqual((scrub.shards, len(scrub.damaged), scrub.gone), (2 + MAX_LOST_IN_A_ROW, 50, 50))
        # Each of those took at least MIN_SHARD_COST of the rate's time.
        self.assertGreaterEqual(s.clock.seconds(), 3600)
        self.assertEqual(len(s.checked), 2 + MAX_LOST_IN_A_ROW + 1)
        s.scrubber.stopService()

    def test_lost_shards_are_paced(self) -> None:
        """A shard with no file costs MIN_SHARD_COST of the rate's time, as if that much had
        been read: a run of them cannot sweep the store in no time."""
        s = Scrubbed(self.mktemp(), rate=MIN_SHARD_COST)  # one second per empty shard
        for shard_id in (A, B, C):
            write_shard(s.store, shard_id, 1)
        s.scan()
        os.unlink(s.store.path(A))
        os.unlink(s.store.path(B))
        s.scrubber.startService()
        self.assertEqual(s.checked, [A])
        s.advance(0.99)
        self.assertEqual(s.checked, [A])
        s.advance(0.01)
        self.assertEqual(s.checked, [A, B])
        s.advance(1.0)
        self.assertEqual(s.checked, [A, B, C])
        s.scrubber.stopService()


class ReportTests(SynchronousTestCase):
    """What the server reports of shards it cannot serve."""

    def test_held_ids_leave_out_damaged(self) -> None:
        """held_ids (the shard report) leaves out the damaged, sorted; a fresh upload clears
        the mark (PutShard and RebuildShard discard it) and reports the shard again."""
        store = ShardStore(self.mktemp())
        server = ShardServer(store, "chunk-3", synchronous_executor, LoadMeter(Clock()))
        for shard_id in (C, A, B):
            write_shard(store, shard_id, 1)
        server.scan()
        server.corrupt.add(B)
        self.assertEqual(server.held_ids(), [A, C])
        server.corrupt.discard(B)
        self.assertEqual(server.held_ids(), [A, B, C])

    def test_damage_is_remembered_across_restarts(self) -> None:
        """A shard found damaged stays damaged for a server started again on the same data
        (bad cells the start-up scan cannot see); a fresh copy, or the file's removal,
        clears the record; a record of a shard no longer there, or an unreadable record, is
        ignored (with a warning for the latter)."""
        from dogfs.chunk.server import DAMAGE_FILE

        root = self.mktemp()
        store = ShardStore(root)
        for shard_id in (A, B, C):
            write_shard(store, shard_id, 1)

        def restarted() -> ShardServer:
            server = ShardServer(ShardStore(root), "chunk-3", synchronous_executor, LoadMeter(Clock()))
            server.scan()
            return server

        server = restarted()
        server.mark_damaged(B)
        server.mark_damaged(C)
        self.assertEqual(restarted().corrupt, {B, C})
        server.stored(C)  # a fresh copy of C
        self.assertEqual(restarted().corrupt, {B})
        os.unlink(store.path(B))
        self.assertEqual(restarted().corrupt, set())  # B is gone: nothing to remember
        server._forget([B])
        with open(os.path.join(root, DAMAGE_FILE)) as f:
            self.assertEqual(f.read().strip(), "[]")
        with open(os.path.join(root, DAMAGE_FILE), "w") as f:
            f.write("{not json")
        with capturedLogs() as events:
            self.assertEqual(restarted().corrupt, set())
        self.assertIn("ignores its record of damaged shards", messages(events, LogLevel.warn)[0])

    def test_get_of_vanished_file(self) -> None:
        """A GetShard that finds the file of a held shard gone answers not_found and drops
        the id, so that the next shard report omits it; a damaged shard's mark goes with it."""
        clock = Clock()
        store = ShardStore(self.mktemp())
        server = ShardServer(store, "chunk-3", synchronous_executor, LoadMeter(clock))
        write_shard(store, A, 1)
        write_shard(store, B, 1)
        server.scan()
        server.corrupt.add(B)
        client, pump = pair(dict(server.handlers()), clock)
        for shard_id in (A, B):
            os.unlink(store.path(shard_id))
            with capturedLogs() as events:
                d = client.call(GetShard(shard_id, 0, -1))
                pump.flush()
            error = self.failureResultOf(d, WireError).value
            self.assertEqual((error.code, error.message), ("not_found", f"chunk-3 has no shard {shard_id}"))
            self.assertIn(f"no longer has shard {shard_id}", messages(events, LogLevel.warn)[0])
        self.assertEqual((server.shard_ids, server.corrupt, server.held_ids()), (set(), set(), []))
        # A shard never held is only not_found: nothing is logged.
        with capturedLogs() as events:
            d = client.call(GetShard(C, 0, -1))
            pump.flush()
        self.assertEqual(self.failureResultOf(d, WireError).value.code, "not_found")
        self.assertEqual(messages(events, LogLevel.warn), [])


class ServiceTests(SynchronousTestCase):
    """The scrubber in the chunk server's service tree, and its configuration."""

    def test_service_scrubs_and_stops_cleanly(self) -> None:
        """ChunkService starts a scrubber with the config's settings once the store is
        scanned; stopping the service leaves no scrub timer behind."""
        root = os.path.abspath(self.mktemp())
        store = ShardStore(root)
        write_shard(store, A, 2)
        write_shard(store, B, 2)
        flip_byte(store, B, 1)
        reactor = MemoryReactorClock()
        cfg = ChunkConfig(
            id="chunk-3", listen="tcp:7103:interface=127.0.0.1", address="127.0.0.1:7103",
            data_dir=root, meta=("127.0.0.1:1",), scrub_interval=50.0, scrub_rate=1000,
        )
        service = ChunkService(reactor, cfg, executor=synchronous_executor)
        with capturedLogs():
            service.startService()
            self.successResultOf(service.when_ready())
            assert service.scrubber is not None and service.server is not None
            self.assertEqual((service.scrubber.interval, service.scrubber.rate), (50.0, 1000))
            self.assertTrue(service.scrubber.running)
            reactor.advance(100)
            self.assertEqual(service.server.corrupt, {B})
            self.assertEqual(service.server.held_ids(), [A])
            self.successResultOf(service.stopService())
        self.assertFalse(service.scrubber.running)
        # What is left is the first heartbeat's connection attempt, which the memory reactor
        # never completes; no scrub timer.
        left = [c for c in reactor.getDelayedCalls() if c.active()]
        self.assertEqual([c for c in left if "timeItOut" not in repr(c)], [])

    def write(self, text: str) -> str:
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_config(self) -> None:
        """[chunk] scrub_interval defaults to a week and must be positive; scrub_rate
        defaults to 4 MiB/s, may be 0 (no scrubbing), and may not be negative or a float."""
        base = '[chunk]\nid = "c"\nlisten = "tcp:1"\naddress = "a:1"\ndata_dir = "d"\nmeta = ["m:1"]\n'
        chunk = config.load_chunk(self.write(base))
        self.assertEqual((chunk.scrub_interval, chunk.scrub_rate), (604800.0, 4 << 20))
        chunk = config.load_chunk(self.write(base + "scrub_interval = 3600\nscrub_rate = 0\n"))
        self.assertEqual((chunk.scrub_interval, chunk.scrub_rate), (3600.0, 0))
        for line, expected in (
            ("scrub_interval = 0", "[chunk] scrub_interval must be positive, not 0.0"),
            ("scrub_interval = -5.0", "[chunk] scrub_interval must be positive"),
            ("scrub_rate = -1", "[chunk] scrub_rate must be a number of bytes per second, or 0 for no scrubbing, not -1"),
            ("scrub_rate = 1.5", "[chunk] scrub_rate must be a int, not 1.5"),
            ('scrub_rate = "fast"', "[chunk] scrub_rate must be a int"),
        ):
            e = self.assertRaises(config.ConfigError, config.load_chunk, self.write(base + line + "\n"))
            self.assertIn(expected, str(e))
