# -*- test-case-name: tests.test_shards -*-
"""Tests for dogfs.storage.shards: durable, checksummed shard files."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from dogfs.storage import shards as shards_module
from dogfs.storage.shards import (
    DIRECT_ALIGN,
    DIRECT_READ_MIN,
    HEADER_SIZE,
    RECORD_OVERHEAD,
    AlignedBuffers,
    CellOutOfRange,
    InvalidShardId,
    ShardCorrupt,
    ShardInfo,
    ShardNotFound,
    ShardStat,
    ShardStore,
    ShardStoreError,
    ShardStoreFull,
    make_shard_id,
    parse_shard_id,
    shard_damaged,
    validate_shard_id,
)
from tests.test_storage_files import identity, record_fsyncs

FRAGMENT = 300
SHARD_ID = "000000000000002a-03"
OTHER_ID = "000000000000002b-03"
INFO = ShardInfo(shard_id=SHARD_ID, policy="RS-4-2", index=3, fragment_size=FRAGMENT)

BAD_IDS: list[object] = [
    "", "000000000000002a", "000000000000002A-03", "000000000000002a-3", "00000000000002a-03",
    "000000000000002a-003", "../../../etc/passwd", "000000000000002a-03/../x",
    "000000000000002a-03\n", " 000000000000002a-03", "000000000000002g-03",
    "000000000000002a_03", "ｆ00000000000002a-03", b"000000000000002a-03", None, 42,
    "000000000000002a-0٣",
]


def fragments_for(seed: int, cells: int, last: int = FRAGMENT) -> list[bytes]:
    """``cells`` deterministic fragments, the last one ``last`` bytes long."""
    rng = random.Random(seed)
    out = [rng.randbytes(FRAGMENT) for _ in range(cells - 1)]
    out.append(rng.randbytes(last))
    return out


class FullDisk:
    """A writev that accepts ``room`` bytes, the last of them as a short write, then fails."""

    def __init__(self, room: int, error: int = errno.ENOSPC) -> None:
        self.room = room
        self.error = error

    def __call__(self, fd: int, buffers: Sequence[bytes | bytearray | memoryview]) -> int:
        if self.room <= 0:
            raise OSError(self.error, os.strerror(self.error))
        data = b"".join(bytes(b) for b in buffers)[: self.room]
        written = os.write(fd, data)
        self.room -= written
        return written


def trickle_writev(fd: int, buffers: Sequence[bytes | bytearray | memoryview]) -> int:
    """A writev that writes at most 7 bytes per call, as a signal-interrupted one might."""
    return os.write(fd, b"".join(bytes(b) for b in buffers)[:7])


class StoreTestCase(SynchronousTestCase):
    """Gives each test a fresh store in its own directory."""

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.store = ShardStore(self.root)

    def write(self, fragments: Sequence[bytes], info: ShardInfo = INFO) -> ShardStat:
        """Write a whole shard through begin/append/commit."""
        writer = self.store.begin(info)
        for fragment in fragments:
            writer.append(fragment)
        return writer.commit()

    def leftovers(self) -> list[str]:
        """Files under tmp/."""
        return os.listdir(os.path.join(self.root, "tmp"))


class ShardIdTests(SynchronousTestCase):
    """Shard ids are strict, so they can never name a path outside the store."""

    def test_make_and_parse(self) -> None:
        """make_shard_id and parse_shard_id are inverses."""
        self.assertEqual(make_shard_id(42, 3), SHARD_ID)
        self.assertEqual(parse_shard_id(SHARD_ID), (42, 3))
        self.assertEqual(parse_shard_id(make_shard_id(2**64 - 1, 99)), (2**64 - 1, 99))
        self.assertRaises(InvalidShardId, make_shard_id, 2**64, 0)
        self.assertRaises(InvalidShardId, make_shard_id, 1, 100)

    def test_bad_ids_refused(self) -> None:
        """Every malformed id raises InvalidShardId, from every store method."""
        store = ShardStore(self.mktemp())
        for bad in BAD_IDS:
            self.assertRaises(InvalidShardId, validate_shard_id, bad)
            for method in (store.open, store.delete, store.stat, store.verify, store.path):
                self.assertRaises(InvalidShardId, method, bad)
            self.assertRaises(InvalidShardId, store.read_cells, bad, 0, 1)
            self.assertRaises(InvalidShardId, store.begin,
                              ShardInfo(bad, "RS-4-2", 3, FRAGMENT))  # type: ignore[arg-type]
        self.assertEqual(os.listdir(os.path.join(store.root, "tmp")), [])

    def test_bad_info_refused(self) -> None:
        """begin refuses an index that disagrees with the id, bad policies and sizes."""
        store = ShardStore(self.mktemp())
        for info in [ShardInfo(SHARD_ID, "RS-4-2", 4, FRAGMENT),
                     ShardInfo(SHARD_ID, "RS/4-2", 3, FRAGMENT),
                     ShardInfo(SHARD_ID, "RS-4-2", 3, 0)]:
            self.assertRaises(ValueError, store.begin, info)

    def test_layout(self) -> None:
        """Shards live in shards/<last 2 hex digits>/<id>.shard under the root."""
        store = ShardStore(self.mktemp())
        self.assertEqual(
            store.path(SHARD_ID),
            os.path.join(store.root, "shards", "2a", SHARD_ID + ".shard"),
        )


class LayoutDurabilityTests(SynchronousTestCase):
    """The store's directories survive a crash once the store is open."""

    def test_new_directories_are_fsynced(self) -> None:
        """A new store fsyncs the root's parent (the root's entry) and the root (shards/ and
        tmp/); on a root that exists, only the root; on a whole store, nothing."""
        parent = os.path.abspath(self.mktemp())
        os.makedirs(parent)
        root = os.path.join(parent, "data")
        synced = record_fsyncs(self)
        ShardStore(root)
        self.assertEqual(synced, [identity(parent), identity(root), identity(root)])
        del synced[:]
        ShardStore(root)
        self.assertEqual(synced, [])
        os.rmdir(os.path.join(root, "tmp"))
        ShardStore(root)
        self.assertEqual(synced, [identity(root)])

    def test_bad_layout_is_one_sentence(self) -> None:
        """A file where a directory of the store should be is ShardStoreError naming it."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        with open(os.path.join(root, "tmp"), "wb"):
            pass
        error = self.assertRaises(ShardStoreError, ShardStore, root)
        self.assertEqual(
            str(error), f"cannot keep shards in {root}: {os.path.join(root, 'tmp')}: Not a directory"
        )


class RoundTripTests(StoreTestCase):
    """What is written is what is read, with sizes and offsets as documented."""

    def test_round_trip(self) -> None:
        """Cells come back verified and in order; the short last cell keeps its length."""
        fragments = fragments_for(1, 5, last=123)
        stat = self.write(fragments)
        expected_size = HEADER_SIZE + 5 * RECORD_OVERHEAD + 4 * FRAGMENT + 123
        self.assertEqual((stat.shard_id, stat.cells, stat.size), (SHARD_ID, 5, expected_size))
        self.assertEqual(os.path.getsize(self.store.path(SHARD_ID)), expected_size)
        self.assertEqual(self.store.read_cells(SHARD_ID, 0, 5), fragments)
        self.assertEqual(self.store.read_cells(SHARD_ID, 2, 2), fragments[2:4])
        self.assertEqual(self.store.read_cells(SHARD_ID, 5, 0), [])
        with self.store.open(SHARD_ID) as reader:
            self.assertEqual(reader.info, INFO)
            self.assertEqual(reader.cells, 5)
            self.assertEqual(reader.read_cell(4), fragments[4])
            crc, fragment = reader.read_record(1)
            self.assertEqual(fragment, fragments[1])
            self.assertEqual(crc, __import__("crc32c").crc32c(fragments[1]))
        self.assertEqual(self.store.info(SHARD_ID), INFO)
        self.assertEqual(self.store.verify(SHARD_ID), [])
        self.assertEqual(self.leftovers(), [])

    def test_memoryview_fragments(self) -> None:
        """Fragments given as memoryviews or bytearrays are stored byte for byte."""
        fragments = fragments_for(2, 3)
        writer = self.store.begin(INFO)
        writer.append(memoryview(fragments[0]))
        writer.append(bytearray(fragments[1]))
        writer.append(memoryview(fragments[2]), crc=__import__("crc32c").crc32c(fragments[2]))
        size = writer.size
        self.assertEqual(writer.commit().size, size)
        self.assertEqual(self.store.read_cells(SHARD_ID, 0, 3), fragments)

    def test_short_writes_resumed(self) -> None:
        """A writev that writes a few bytes at a time still produces the exact file."""
        store = ShardStore(self.mktemp(), writev=trickle_writev)
        fragments = fragments_for(3, 3, last=50)
        store.write(INFO, fragments)
        self.assertEqual(store.read_cells(SHARD_ID, 0, 3), fragments)

    def test_empty_shard(self) -> None:
        """A shard with no cells is valid and has only a header."""
        stat = self.write([])
        self.assertEqual((stat.cells, stat.size), (0, HEADER_SIZE))
        self.assertEqual(self.store.verify(SHARD_ID), [])

    def test_append_rules(self) -> None:
        """Oversized fragments, cells after a short one, and wrong CRCs are refused."""
        with self.store.begin(INFO) as writer:
            self.assertRaises(ValueError, writer.append, b"x" * (FRAGMENT + 1))
            self.assertRaises(ValueError, writer.append, b"")
            self.assertRaises(ValueError, writer.append, b"x" * 10, crc=1234)
            writer.append(b"x" * 10)
            self.assertRaises(ValueError, writer.append, b"x" * 10)
        self.assertEqual(self.leftovers(), [])
        self.assertRaises(ShardNotFound, self.store.open, SHARD_ID)

    def test_out_of_range(self) -> None:
        """Reading past the last cell raises CellOutOfRange."""
        self.write(fragments_for(4, 2))
        self.assertRaises(CellOutOfRange, self.store.read_cells, SHARD_ID, 1, 2)
        self.assertRaises(CellOutOfRange, self.store.read_cells, SHARD_ID, -1, 1)
        with self.store.open(SHARD_ID) as reader:
            self.assertRaises(CellOutOfRange, reader.read_cell, 2)
        self.assertRaises(ShardStoreError, reader.read_cell, 0)

    def test_replace_atomically(self) -> None:
        """Committing a shard id again replaces the old copy; usage follows."""
        self.write(fragments_for(5, 4))
        newer = fragments_for(6, 2, last=7)
        stat = self.write(newer)
        self.assertEqual(self.store.read_cells(SHARD_ID, 0, 2), newer)
        self.assertEqual(self.store.usage()[1], stat.size)
        self.assertEqual(len(list(self.store.list())), 1)


class InterruptedWriteTests(StoreTestCase):
    """Writes that never commit are invisible and cleaned up."""

    def test_uncommitted_invisible(self) -> None:
        """A writer left open shows no shard; clean_tmp removes its file."""
        writer = self.store.begin(INFO)
        self.addCleanup(writer.abort)  # close the descriptor
        writer.append(fragments_for(7, 1)[0])
        self.assertRaises(ShardNotFound, self.store.open, SHARD_ID)
        self.assertEqual(list(self.store.list()), [])
        self.assertEqual(self.store.usage()[1], 0)
        self.assertEqual(len(self.leftovers()), 1)
        # A restarted chunk server finds the leftover.
        self.assertEqual(ShardStore(self.root).clean_tmp(), 1)
        self.assertEqual(self.leftovers(), [])
        self.assertEqual(self.store.clean_tmp(), 0)

    def test_abort(self) -> None:
        """abort removes the temporary file, keeps an older copy, and is idempotent."""
        old = fragments_for(8, 2)
        self.write(old)
        writer = self.store.begin(INFO)
        writer.append(fragments_for(9, 1)[0])
        writer.abort()
        writer.abort()
        self.assertEqual(self.leftovers(), [])
        self.assertEqual(self.store.read_cells(SHARD_ID, 0, 2), old)

    def test_context_manager_aborts(self) -> None:
        """Leaving a writer's block by an exception aborts it."""
        with self.assertRaises(ZeroDivisionError):
            with self.store.begin(INFO) as writer:
                writer.append(b"x")
                raise ZeroDivisionError("the client went away")
        self.assertEqual(self.leftovers(), [])
        self.assertRaises(ShardNotFound, self.store.stat, SHARD_ID)

    def test_tmp_file_never_valid(self) -> None:
        """A temporary file moved into place by hand is refused: it was never committed."""
        writer = self.store.begin(INFO)
        self.addCleanup(writer.abort)
        writer.append(b"x" * FRAGMENT)
        (name,) = self.leftovers()
        os.makedirs(os.path.dirname(self.store.path(SHARD_ID)), exist_ok=True)
        os.rename(os.path.join(self.root, "tmp", name), self.store.path(SHARD_ID))
        with self.assertRaises(ShardCorrupt) as caught:
            self.store.open(SHARD_ID)
        self.assertIsNone(caught.exception.cell)


class FullDiskTests(StoreTestCase):
    """ENOSPC, EDQUOT and EFBIG abort the write and leave nothing behind."""

    def check_nothing_left(self, store: ShardStore) -> None:
        """No temporary file, no shard."""
        self.assertEqual(os.listdir(store.tmp_dir), [])
        self.assertRaises(ShardNotFound, store.open, SHARD_ID)

    def test_full_during_append(self) -> None:
        """Running out of space mid-cell raises ShardStoreFull and removes the partial file."""
        for error in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            for room in (HEADER_SIZE + 1, HEADER_SIZE + 2 * (FRAGMENT + 4) + 3):
                store = ShardStore(self.mktemp(), writev=FullDisk(room, error))
                writer = store.begin(INFO)
                with self.assertRaises(ShardStoreFull) as caught:
                    for fragment in fragments_for(10, 5):
                        writer.append(fragment)
                self.assertIn(SHARD_ID, str(caught.exception))
                self.check_nothing_left(store)
                self.assertRaises(ShardStoreError, writer.append, b"x")
                writer.abort()

    def test_full_at_begin(self) -> None:
        """No room even for the header: ShardStoreFull from begin, no file left."""
        store = ShardStore(self.mktemp(), writev=FullDisk(0, errno.EDQUOT))
        self.assertRaises(ShardStoreFull, store.begin, INFO)
        self.check_nothing_left(store)
        store = ShardStore(self.mktemp(), writev=FullDisk(10))
        self.assertRaises(ShardStoreFull, store.begin, INFO)
        self.check_nothing_left(store)

    def test_full_at_fsync(self) -> None:
        """fsync reporting ENOSPC (delayed allocation) fails the commit cleanly."""

        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        store = ShardStore(self.mktemp(), fsync=fsync)
        writer = store.begin(INFO)
        writer.append(b"x" * FRAGMENT)
        self.assertRaises(ShardStoreFull, writer.commit)
        self.check_nothing_left(store)

    def test_file_size_limit(self) -> None:
        """With a real RLIMIT_FSIZE (in a child process), the write fails as ShardStoreFull."""
        root = os.path.abspath(self.mktemp())
        script = f"""
import json, os, resource, sys
from dogfs.storage.shards import ShardInfo, ShardStore, ShardStoreFull
store = ShardStore({root!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
writer = store.begin(ShardInfo({SHARD_ID!r}, "RS-4-2", 3, {FRAGMENT}))
try:
    for _ in range(10):
        writer.append(b"x" * {FRAGMENT})
    writer.commit()
    print(json.dumps("committed"))
except ShardStoreFull as e:
    print(json.dumps(str(e)))
"""
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        message = json.loads(result.stdout)
        self.assertIn(SHARD_ID, message)
        self.assertIn("too large", message)
        self.check_nothing_left(ShardStore(root))


class CorruptionTests(StoreTestCase):
    """Every damaged byte is caught and blamed on the right cell (or the header)."""

    CELLS = 4
    LAST = 77

    def setUp(self) -> None:
        super().setUp()
        self.fragments = fragments_for(11, self.CELLS, last=self.LAST)
        self.write(self.fragments)
        self.path = self.store.path(SHARD_ID)
        with open(self.path, "rb") as f:
            self.pristine = f.read()

    def damage(self, position: int, flip: int = 0x01) -> None:
        """Flip bits of one byte of the shard file."""
        data = bytearray(self.pristine)
        data[position] ^= flip
        with open(self.path, "wb") as f:
            f.write(data)

    def cell_at(self, position: int) -> int | None:
        """The cell a file position belongs to; None for the header."""
        if position < HEADER_SIZE:
            return None
        return (position - HEADER_SIZE) // (RECORD_OVERHEAD + FRAGMENT)

    def assert_detected(self, position: int) -> None:
        """Reading everything raises ShardCorrupt naming the damaged cell; verify agrees."""
        cell = self.cell_at(position)
        with self.assertRaises(ShardCorrupt) as caught:
            self.store.read_cells(SHARD_ID, 0, self.CELLS)
        self.assertEqual(caught.exception.cell, cell)
        self.assertEqual(caught.exception.shard_id, SHARD_ID)
        self.assertIn(SHARD_ID, str(caught.exception))
        self.assertIn("header" if cell is None else f"cell {cell}", str(caught.exception))
        if cell is None:
            self.assertRaises(ShardCorrupt, self.store.verify, SHARD_ID)
            self.assertRaises(ShardCorrupt, self.store.stat, SHARD_ID)
            (stat,) = self.store.list()
            self.assertTrue(stat.corrupt)
        else:
            self.assertEqual(self.store.verify(SHARD_ID), [cell])
            healthy = [i for i in range(self.CELLS) if i != cell]
            with self.store.open(SHARD_ID) as reader:
                for i in healthy:
                    self.assertEqual(reader.read_cell(i), self.fragments[i])

    def test_every_region(self) -> None:
        """Header fields, header padding and CRC, each cell's CRC and data: all detected."""
        cell0 = HEADER_SIZE
        last = HEADER_SIZE + (self.CELLS - 1) * (RECORD_OVERHEAD + FRAGMENT)
        positions = [0, 7, 8, 12, 16, 40, 60, 90, 100, HEADER_SIZE - 5, HEADER_SIZE - 1,
                     cell0, cell0 + 3, cell0 + 4, cell0 + 4 + FRAGMENT - 1,
                     last, last + 4, len(self.pristine) - 1]
        for position in positions:
            self.damage(position)
            self.assert_detected(position)

    @settings(deadline=None, max_examples=80)
    @given(st.data())
    def test_any_byte(self, data: st.DataObject) -> None:
        """A corrupted byte anywhere in the file is detected as ShardCorrupt for its cell."""
        position = data.draw(st.integers(0, len(self.pristine) - 1), "position")
        flip = data.draw(st.integers(1, 255), "flip")
        self.damage(position, flip)
        self.assert_detected(position)

    def test_truncated(self) -> None:
        """A truncated file: header damage, or the cut cells reported as bad."""
        record = RECORD_OVERHEAD + FRAGMENT
        for length in [0, 10, HEADER_SIZE - 1]:
            with open(self.path, "wb") as f:
                f.write(self.pristine[:length])
            with self.assertRaises(ShardCorrupt) as caught:
                self.store.open(SHARD_ID)
            self.assertIsNone(caught.exception.cell)
        for length, first_bad in [(HEADER_SIZE, 0), (HEADER_SIZE + 2, 0),
                                  (HEADER_SIZE + record, 1), (HEADER_SIZE + 2 * record + 5, 2),
                                  (len(self.pristine) - 1, 3)]:
            with open(self.path, "wb") as f:
                f.write(self.pristine[:length])
            self.assertEqual(self.store.verify(SHARD_ID), list(range(first_bad, self.CELLS)))
            with self.assertRaises(ShardCorrupt) as caught:
                self.store.read_cells(SHARD_ID, 0, self.CELLS)
            self.assertEqual(caught.exception.cell, first_bad)
            self.assertIn("truncated", str(caught.exception))

    def test_extended(self) -> None:
        """Bytes appended after the last cell make the header's length claim false."""
        with open(self.path, "ab") as f:
            f.write(b"junk")
        with self.assertRaises(ShardCorrupt) as caught:
            self.store.open(SHARD_ID)
        self.assertIsNone(caught.exception.cell)

    def test_misplaced_file(self) -> None:
        """A valid shard file renamed to another id is refused: the header names its id."""
        other = make_shard_id(0x2a, 4)
        os.rename(self.path, self.store.path(other))
        with self.assertRaises(ShardCorrupt) as caught:
            self.store.open(other)
        self.assertIn("another shard", str(caught.exception))


class ManagementTests(StoreTestCase):
    """delete, list, stat, usage and clean_tmp."""

    def test_delete(self) -> None:
        """delete removes a shard and says whether there was one."""
        self.write(fragments_for(12, 2))
        self.assertTrue(self.store.delete(SHARD_ID))
        self.assertFalse(self.store.delete(SHARD_ID))
        self.assertRaises(ShardNotFound, self.store.open, SHARD_ID)
        self.assertRaises(ShardNotFound, self.store.read_cells, SHARD_ID, 0, 1)

    def test_delete_unless_newer(self) -> None:
        """delete_unless_newer removes a shard last written at the given time or before, and
        keeps a newer one (a fresh copy committed since the garbage collector looked); the
        store's usage follows."""
        self.write(fragments_for(12, 2))
        mtime = os.stat(self.store.path(SHARD_ID)).st_mtime
        used = self.store.usage()[1]
        self.assertFalse(self.store.delete_unless_newer(SHARD_ID, mtime - 1))
        self.assertTrue(os.path.exists(self.store.path(SHARD_ID)))
        self.assertEqual(self.store.usage()[1], used)
        self.assertTrue(self.store.delete_unless_newer(SHARD_ID, mtime))
        self.assertFalse(os.path.exists(self.store.path(SHARD_ID)))
        self.assertEqual(self.store.usage()[1], 0)
        self.assertFalse(self.store.delete_unless_newer(SHARD_ID, mtime))

    def test_unreadable_shard_does_not_stop_the_scan(self) -> None:
        """A shard the disk cannot read (EIO) is listed as damaged; the others are listed as
        they are (one bad sector must not keep a whole server from starting)."""
        good = make_shard_id(1, 7)
        bad = make_shard_id(2, 7)
        for group, shard_id in ((1, good), (2, bad)):
            self.write(fragments_for(group, 2), ShardInfo(shard_id, "RS-6-3", 7, FRAGMENT))
        real = self.store.stat

        def stat(shard_id: str) -> ShardStat:
            if shard_id == bad:
                raise OSError(errno.EIO, "Input/output error")
            return real(shard_id)

        self.store.stat = stat  # type: ignore[method-assign]
        listed = {s.shard_id: s for s in self.store.list()}
        self.assertEqual(set(listed), {good, bad})
        self.assertTrue(listed[bad].corrupt)
        self.assertFalse(listed[good].corrupt)

    def test_passing_errors_do_not_mark_shards_damaged(self) -> None:
        """A shard the scan cannot open for a reason of the server's own (out of descriptors
        or memory, or a file it may not read: a relabel forbids them all at once) is listed
        as held, not damaged; only errors saying its bytes are lost mark it."""
        shard_id = make_shard_id(1, 7)
        self.write(fragments_for(1, 2), ShardInfo(shard_id, "RS-6-3", 7, FRAGMENT))
        failure: list[int] = []
        real = os.open

        def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if str(path).endswith(".shard"):
                raise OSError(failure[0], os.strerror(failure[0]))
            return real(path, flags, *args, **kwargs)

        self.patch(os, "open", open_)
        for error in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EACCES, errno.EPERM):
            failure[:] = [error]
            [listed] = self.store.list()
            self.assertEqual((listed.shard_id, listed.corrupt), (shard_id, False))
            self.assertFalse(shard_damaged(OSError(error, os.strerror(error))))
        for error in (errno.EIO, errno.ENODATA, errno.EBADMSG, errno.EUCLEAN):
            failure[:] = [error]
            [listed] = self.store.list()
            self.assertEqual((listed.shard_id, listed.corrupt), (shard_id, True))
            self.assertTrue(shard_damaged(OSError(error, os.strerror(error))))

    def test_capacity_counts_what_the_disk_has_left(self) -> None:
        """The capacity reported is the shards' bytes plus what the filesystem still offers,
        so a disk filled by other data shows as full."""
        import dogfs.storage.shards as shards_module

        self.write(fragments_for(1, 2))
        used = self.store.usage()[1]
        real = shards_module.os.statvfs

        class Almost:
            f_frsize = 4096
            f_blocks = 1_000_000
            f_bavail = 0  # nothing left for us: other files, root's reserve

        def statvfs(path: str) -> Any:
            return Almost()

        shards_module.os.statvfs = statvfs  # type: ignore[assignment]
        self.addCleanup(setattr, shards_module.os, "statvfs", real)
        self.assertEqual(self.store.usage(), (used, used))
        Almost.f_bavail = 10
        self.assertEqual(self.store.usage(), (used + 40960, used))

    def test_abort_after_a_disk_error_does_not_raise(self) -> None:
        """abort never raises: it runs while the first error is being reported (a disk gone
        read-only fails the unlink too), and that first error is the one to see."""
        import dogfs.storage.shards as shards_module

        writer = self.store.begin(INFO)
        writer.append(fragments_for(1, 1)[0])
        real = os.unlink

        def unlink(path: str) -> None:
            raise OSError(errno.EROFS, "Read-only file system")

        shards_module.os.unlink = unlink  # type: ignore[assignment]
        self.addCleanup(setattr, shards_module.os, "unlink", real)
        writer.abort()
        writer.abort()

    def test_list_stat_usage(self) -> None:
        """list and stat agree with the files; usage tracks commits and deletes."""
        capacity, used = self.store.usage()
        self.assertGreater(capacity, 0)
        self.assertEqual(used, 0)
        stats = {}
        for group, cells in [(1, 1), (0x2a, 3), (0x12a, 2), (2**64 - 1, 5)]:
            info = ShardInfo(make_shard_id(group, 7), "RS-6-3", 7, FRAGMENT)
            stats[info.shard_id] = self.write(fragments_for(group % 1000, cells), info)
        listed = {s.shard_id: s for s in self.store.list()}
        self.assertEqual(listed, stats)
        for shard_id, stat in stats.items():
            self.assertEqual(self.store.stat(shard_id), stat)
            self.assertEqual(stat.size, os.path.getsize(self.store.path(shard_id)))
        total = sum(s.size for s in stats.values())
        self.assertEqual(self.store.usage()[1], total)
        # A fresh store (a restarted server) computes the same by scanning.
        self.assertEqual(ShardStore(self.root).usage()[1], total)
        gone = make_shard_id(0x2a, 7)
        self.store.delete(gone)
        self.assertEqual(self.store.usage()[1], total - stats[gone].size)
        self.assertGreater(self.store.free_bytes(), 0)

    def test_list_ignores_strangers(self) -> None:
        """Files that are not well-named shards are not listed."""
        self.write(fragments_for(13, 1))
        bucket = os.path.dirname(self.store.path(SHARD_ID))
        for name in ["notes.txt", "000000000000002A-03.shard", SHARD_ID + ".shard.bak"]:
            with open(os.path.join(bucket, name), "wb") as f:
                f.write(b"x")
        self.assertEqual([s.shard_id for s in self.store.list()], [SHARD_ID])

    def test_missing(self) -> None:
        """stat, verify and open of an absent shard raise ShardNotFound naming it."""
        for method in (self.store.stat, self.store.verify, self.store.open):
            with self.assertRaises(ShardNotFound) as caught:
                method(SHARD_ID)
            self.assertIn(SHARD_ID, str(caught.exception))


class DirectPwrite:
    """A pwrite for direct I/O that accepts ``room`` bytes, then fails with ``error``."""

    def __init__(self, room: int, error: int = errno.ENOSPC) -> None:
        self.room = room
        self.error = error
        self.calls = 0

    def __call__(self, fd: int, data: memoryview, offset: int) -> int:
        self.calls += 1
        if self.room < len(data):
            raise OSError(self.error, os.strerror(self.error))
        self.room -= len(data)
        return os.pwrite(fd, data, offset)


class DirectIOTests(SynchronousTestCase):
    """Shards written with O_DIRECT are the same files, byte for byte, as through the page
    cache, and fail as cleanly."""

    def setUp(self) -> None:
        self.direct = ShardStore(self.mktemp(), direct_io=True)
        self.buffered = ShardStore(self.mktemp(), direct_io=False)
        if not ShardStore(self.mktemp()).direct_io:
            raise SkipTest("this file system does not accept O_DIRECT writes")

    def write(self, store: ShardStore, info: ShardInfo, fragments: Sequence[bytes]) -> bytes:
        writer = store.begin(info)
        self.assertEqual(writer.direct, store.direct_io and info.fragment_size >= DIRECT_ALIGN)
        for fragment in fragments:
            writer.append(fragment)
        writer.commit()
        with open(store.path(info.shard_id), "rb") as f:
            return f.read()

    def test_default_follows_the_file_system(self) -> None:
        """A store uses direct I/O by default where it works, never with an injected writev."""
        self.assertTrue(ShardStore(self.mktemp()).direct_io)
        self.assertFalse(ShardStore(self.mktemp(), writev=trickle_writev).direct_io)

    @settings(deadline=None, max_examples=25)
    @given(st.integers(1, 3 * DIRECT_ALIGN), st.integers(0, 6), st.integers(1, 3 * DIRECT_ALIGN))
    def test_same_file_as_through_the_page_cache(self, size: int, cells: int, last: int) -> None:
        """Any fragment size and count (records straddling blocks in every way) gives the
        file the buffered writer gives, and it reads back."""
        info = ShardInfo(SHARD_ID, "RS-4-2", 3, size)
        rng = random.Random(size * 31 + cells)
        fragments = [rng.randbytes(size) for _ in range(cells)]
        if cells:
            fragments[-1] = fragments[-1][: min(last, size)]
        direct = self.write(self.direct, info, fragments)
        self.assertEqual(direct, self.write(self.buffered, info, fragments))
        self.assertEqual(self.direct.read_cells(SHARD_ID, 0, cells), fragments)
        self.assertEqual(os.listdir(self.direct.tmp_dir), [])

    def test_large_cells(self) -> None:
        """1 MiB cells (whole blocks go straight to the disk) read back and verify."""
        info = ShardInfo(SHARD_ID, "RS-4-2", 3, (1 << 20) + 80)
        rng = random.Random(3)
        fragments = [rng.randbytes(info.fragment_size) for _ in range(3)] + [rng.randbytes(5000)]
        data = self.write(self.direct, info, fragments)
        self.assertEqual(data, self.write(self.buffered, info, fragments))
        self.assertEqual(self.direct.verify(SHARD_ID), [])

    def test_full_disk(self) -> None:
        """ENOSPC or EDQUOT from a direct write (mid-shard or in the first block rewritten at
        commit) is ShardStoreFull and leaves nothing behind."""
        big = ShardInfo(SHARD_ID, "RS-4-2", 3, 3 * DIRECT_ALIGN)
        for error in (errno.ENOSPC, errno.EDQUOT):
            for room in (0, 2 * DIRECT_ALIGN, 5 * DIRECT_ALIGN, 9 * DIRECT_ALIGN):
                pwrite = DirectPwrite(room, error)
                store = ShardStore(self.mktemp(), direct_io=True, pwrite=pwrite)
                writer = store.begin(big)
                with self.assertRaises(ShardStoreFull):
                    for fragment in [b"a" * big.fragment_size] * 3:
                        writer.append(fragment)
                    writer.commit()
                self.assertGreater(pwrite.calls, 0)
                self.assertEqual(os.listdir(store.tmp_dir), [])
                self.assertRaises(ShardNotFound, store.open, SHARD_ID)

    def test_abort_releases_everything(self) -> None:
        """An aborted direct writer leaves no file and refuses more cells."""
        info = ShardInfo(SHARD_ID, "RS-4-2", 3, 2 * DIRECT_ALIGN)
        writer = self.direct.begin(info)
        self.assertTrue(writer.direct)
        writer.append(b"x" * info.fragment_size)
        writer.abort()
        self.assertEqual(os.listdir(self.direct.tmp_dir), [])
        self.assertRaises(ShardStoreError, writer.append, b"x")
        self.assertRaises(ShardNotFound, self.direct.open, SHARD_ID)
        self.assertEqual(self.direct.staging_bytes, 0)

    def test_staging_memory_is_bounded(self) -> None:
        """Direct writers' staging buffers stay within the store's staging budget: writers
        begun past it write through the page cache (the same file), and a buffer given back
        at commit or abort makes room for the next direct writer."""
        size = 2 * DIRECT_ALIGN
        staging = shards_module._staging_size(size)
        store = ShardStore(self.mktemp(), direct_io=True, staging_budget=3 * staging)
        infos = [ShardInfo(make_shard_id(group, 3), "RS-4-2", 3, size) for group in range(5)]
        writers = [store.begin(info) for info in infos]
        self.assertEqual([w.direct for w in writers], [True, True, True, False, False])
        self.assertEqual(store.staging_bytes, 3 * staging)
        rng = random.Random(5)
        fragments = [[rng.randbytes(size), rng.randbytes(size // 3)] for _ in infos]
        for writer, cells in zip(writers, fragments, strict=True):
            for fragment in cells:
                writer.append(fragment)
        writers[0].commit()
        writers[1].abort()
        self.assertEqual(store.staging_bytes, staging)
        again = store.begin(ShardInfo(make_shard_id(9, 3), "RS-4-2", 3, size))
        self.assertTrue(again.direct)
        again.abort()
        for writer in writers[2:]:
            writer.commit()
        self.assertEqual(store.staging_bytes, 0)
        for i in (0, 2, 3, 4):
            self.assertEqual(store.read_cells(infos[i].shard_id, 0, 2), fragments[i])
            buffered = self.buffered
            self.write(buffered, infos[i], fragments[i])
            with open(store.path(infos[i].shard_id), "rb") as a, open(buffered.path(infos[i].shard_id), "rb") as b:
                self.assertEqual(a.read(), b.read())

    def test_no_memory_for_staging(self) -> None:
        """A staging buffer that cannot be mapped (ENOMEM) leaves the shard to the page
        cache, with no descriptor or budget kept for it."""

        def no_memory(*args: Any, **kwargs: Any) -> Any:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

        self.patch(shards_module.mmap, "mmap", no_memory)
        info = ShardInfo(SHARD_ID, "RS-4-2", 3, 2 * DIRECT_ALIGN)
        writer = self.direct.begin(info)
        self.assertFalse(writer.direct)
        self.assertEqual(self.direct.staging_bytes, 0)
        writer.append(b"y" * info.fragment_size)
        writer.commit()
        self.assertEqual(self.direct.read_cells(SHARD_ID, 0, 1), [b"y" * info.fragment_size])


class ReadAheadTests(StoreTestCase):
    """`ShardReader.will_need` is a hint: it never fails and never changes what is read."""

    def test_will_need_any_range(self) -> None:
        """In-range, overlong, empty and out-of-range hints are all accepted; cells read back."""
        fragments = fragments_for(4, 6, last=50)
        self.write(fragments)
        with self.store.open(SHARD_ID) as reader:
            for first, count in [(0, 6), (2, 100), (5, 1), (0, 0), (6, 3), (-1, 2)]:
                reader.will_need(first, count)
            self.assertEqual(reader.read_cells(0, 6), fragments)


class DirectReadTests(SynchronousTestCase):
    """`ShardReader.read_record_into`: direct reads into pooled aligned buffers give what
    `read_record` gives, fail the same way, and fall back to the page cache cleanly."""

    def setUp(self) -> None:
        self.store = ShardStore(self.mktemp())
        if not self.store.direct_io:
            raise SkipTest("this file system does not accept O_DIRECT")
        # Records of DIRECT_READ_MIN + 1,004 bytes start at a different offset in a 4 KiB
        # block each; the last cell is short.
        size = DIRECT_READ_MIN + 1000
        self.info = ShardInfo(SHARD_ID, "RS-4-2", 3, size)
        rng = random.Random(11)
        self.fragments = [rng.randbytes(size) for _ in range(9)] + [rng.randbytes(123)]
        writer = self.store.begin(self.info)
        for fragment in self.fragments:
            writer.append(fragment)
        writer.commit()

    def test_same_records_as_through_the_page_cache(self) -> None:
        """Every cell, read directly, is a view into a pooled buffer with the same CRC and
        bytes as `read_record` returns."""
        buffers = AlignedBuffers()
        with self.store.open(SHARD_ID, direct=True) as reader:
            self.assertTrue(reader.reads_direct)
            for i, fragment in enumerate(self.fragments):
                crc, data = reader.read_record_into(i, buffers)
                self.assertIsInstance(data, memoryview)
                self.assertEqual((crc, bytes(data)), (reader.read_record(i)[0], fragment))

    def test_buffer_is_taken_while_a_view_lives(self) -> None:
        """A buffer is not handed out again while a fragment read into it is alive, and is
        once the fragment (every view of it) is gone."""
        buffers = AlignedBuffers()
        with self.store.open(SHARD_ID, direct=True) as reader:
            _, first = reader.read_record_into(0, buffers)
            held = first[10:20]
            del first
            _, second = reader.read_record_into(1, buffers)
            self.assertEqual(bytes(held), self.fragments[0][10:20])
            self.assertEqual(bytes(second), self.fragments[1])
            self.assertEqual(len(buffers._buffers), 2)
            del held, second
            _, third = reader.read_record_into(2, buffers)
            self.assertEqual(bytes(third), self.fragments[2])
            self.assertEqual(len(buffers._buffers), 2)

    def test_pool_exhausted_reads_through_the_page_cache(self) -> None:
        """With no free buffer and no room for another, the cell comes through the page
        cache (bytes), still checked."""
        buffers = AlignedBuffers(max_bytes=DIRECT_READ_MIN + 4 * DIRECT_ALIGN)  # room for one
        with self.store.open(SHARD_ID, direct=True) as reader:
            _, held = reader.read_record_into(0, buffers)
            self.assertIsInstance(held, memoryview)
            _, fallback = reader.read_record_into(1, buffers)
            self.assertIsInstance(fallback, bytes)
            self.assertEqual(fallback, self.fragments[1])
            del held
            _, again = reader.read_record_into(2, buffers)
            self.assertIsInstance(again, memoryview)

    def test_verify_reads_around_the_page_cache(self) -> None:
        """A scrub (`verify`) of a shard of large cells reads them with direct I/O: none of
        its pages enters the page cache, so it evicts nothing clients read there either (it
        used to read through the cache and drop the whole file's pages after). A bad cell is
        still found."""
        self.assertEqual(self.store.verify(SHARD_ID), [])
        advised: list[int] = []
        self.patch(os, "posix_fadvise", lambda fd, offset, length, advice: advised.append(advice))
        self.assertEqual(self.store.verify(SHARD_ID), [])
        self.assertEqual(advised, [])  # nothing to drop: no read went through the cache
        reads: list[int] = []
        real = os.pread

        def pread(fd: int, size: int, offset: int) -> bytes:
            if size > 4096:  # a cell (the header is read once at open)
                reads.append(offset)
            return real(fd, size, offset)

        self.patch(os, "pread", pread)
        path = self.store.path(SHARD_ID)
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) - 3000)
            f.write(b"\xff" * 8)
        self.assertEqual(self.store.verify(SHARD_ID), [8])  # the last cell (9) has 123 bytes
        self.assertEqual(reads, [])  # every cell read with preadv on the O_DIRECT descriptor

    def test_not_opened_direct(self) -> None:
        """A reader opened without ``direct`` (or on a store without direct I/O) reads
        through the page cache."""
        with self.store.open(SHARD_ID) as reader:
            self.assertFalse(reader.reads_direct)
            self.assertEqual(reader.read_record_into(3, AlignedBuffers())[1], self.fragments[3])
        plain = ShardStore(self.mktemp(), direct_io=False)
        writer = plain.begin(self.info)
        for fragment in self.fragments:
            writer.append(fragment)
        writer.commit()
        with plain.open(SHARD_ID, direct=True) as reader:
            self.assertFalse(reader.reads_direct)
        small = ShardInfo(OTHER_ID, "RS-4-2", 3, DIRECT_READ_MIN - 1)
        writer = self.store.begin(small)
        writer.append(b"s" * (DIRECT_READ_MIN - 1))
        writer.commit()
        before = len(os.listdir("/proc/self/fd"))
        with self.store.open(OTHER_ID, direct=True) as reader:
            # Cells too small to be worth it: no direct descriptor is even opened.
            self.assertFalse(reader.reads_direct)
            self.assertEqual(len(os.listdir("/proc/self/fd")), before + 1)

    def test_no_memory_for_a_buffer(self) -> None:
        """When a new buffer cannot be mapped (ENOMEM), the cell comes through the page
        cache: a shard is not taken for damaged for want of memory."""

        def no_memory(*args: Any) -> Any:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

        buffers = AlignedBuffers()
        self.patch(shards_module.mmap, "mmap", no_memory)
        self.assertIsNone(buffers.get(DIRECT_ALIGN))
        with self.store.open(SHARD_ID, direct=True) as reader:
            self.assertEqual(reader.read_record_into(1, buffers)[1], self.fragments[1])

    def test_corrupt_and_truncated(self) -> None:
        """A flipped bit fails the cell's CRC; a truncated file is 'cut short': as
        `read_record` reports them."""
        path = self.store.path(SHARD_ID)
        with self.store.open(SHARD_ID) as reader:
            offset = reader.cell_offset(4) + RECORD_OVERHEAD + 77
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x10]))
        buffers = AlignedBuffers()
        with self.store.open(SHARD_ID, direct=True) as reader:
            with self.assertRaises(ShardCorrupt) as caught:
                reader.read_record_into(4, buffers)
            self.assertIn("CRC32C", str(caught.exception))
            self.assertEqual(bytes(reader.read_record_into(5, buffers)[1]), self.fragments[5])
            os.truncate(path, reader.cell_offset(8) + 100)
            with self.assertRaises(ShardCorrupt) as caught:
                reader.read_record_into(8, buffers)
            self.assertIn("cut short", str(caught.exception))

    def test_refused_direct_read_falls_back(self) -> None:
        """A file system that opens with O_DIRECT but refuses the read (EINVAL) gets the
        page cache from then on; other errors propagate."""
        calls = []

        def refuse(fd: int, buffers: Any, offset: int) -> int:
            calls.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

        self.patch(os, "preadv", refuse)
        with self.store.open(SHARD_ID, direct=True) as reader:
            self.assertEqual(reader.read_record_into(0, AlignedBuffers())[1], self.fragments[0])
            self.assertFalse(reader.reads_direct)
            self.assertEqual(reader.read_record_into(1, AlignedBuffers())[1], self.fragments[1])
            self.assertEqual(len(calls), 1)

        def broken(fd: int, buffers: Any, offset: int) -> int:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        self.patch(os, "preadv", broken)
        with self.store.open(SHARD_ID, direct=True) as reader:
            self.assertRaises(OSError, reader.read_record_into, 0, AlignedBuffers())

    def test_close_releases_both_descriptors(self) -> None:
        """Closing the reader closes the direct descriptor too (and a failed open closes
        both)."""
        before = len(os.listdir("/proc/self/fd"))
        reader = self.store.open(SHARD_ID, direct=True)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before + 2)
        reader.close()
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)
        with open(self.store.path(SHARD_ID), "r+b") as f:
            f.write(b"\0" * 8)  # a damaged header
        self.assertRaises(ShardCorrupt, self.store.open, SHARD_ID, True)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)

    def test_replaced_between_opens_reads_the_opened_file(self) -> None:
        """If the shard is replaced between the reader's two opens, the reader keeps to the
        file whose header it checked and reads it through the page cache."""
        opens = []
        real_open = os.open
        other = self.store.path(SHARD_ID) + ".other"
        with open(self.store.path(SHARD_ID), "rb") as f, open(other, "wb") as g:
            g.write(f.read())

        def open_then_replace(path: str, flags: int, *args: Any) -> int:
            opens.append(flags)
            fd = real_open(path, flags, *args)
            if len(opens) == 1:
                os.rename(other, path)  # a new file (same bytes) takes the name
            return fd

        self.patch(os, "open", open_then_replace)
        with self.store.open(SHARD_ID, direct=True) as reader:
            self.assertEqual(len(opens), 2)
            self.assertFalse(reader.reads_direct)
            self.assertEqual(reader.read_record_into(2, AlignedBuffers())[1], self.fragments[2])

    def test_pool_makes_room_for_another_size(self) -> None:
        """A pool full of free buffers of a size no longer asked for drops as many of them as
        a buffer of the new size needs, and keeps those still in use."""
        buffers = AlignedBuffers(max_bytes=8 * DIRECT_ALIGN)
        small = [buffers.get(DIRECT_ALIGN) for _ in range(4)]
        self.assertTrue(all(b is not None for b in small))
        held = memoryview(small[0])  # type: ignore[arg-type]
        del small
        big = buffers.get(6 * DIRECT_ALIGN)
        self.assertIsNotNone(big)
        # Two free ones went, the one in use and one free one stayed: 8 blocks in all.
        self.assertEqual(sorted(len(b) for b in buffers._buffers), [DIRECT_ALIGN] * 2 + [6 * DIRECT_ALIGN])
        # No room for 3 blocks even without the last free one: it goes, and the answer is None.
        self.assertIsNone(buffers.get(3 * DIRECT_ALIGN))
        self.assertEqual(sorted(len(b) for b in buffers._buffers), [DIRECT_ALIGN, 6 * DIRECT_ALIGN])
        held.release()
