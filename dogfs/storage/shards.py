# -*- test-case-name: tests.test_shards -*-
"""The chunk server's shard files: one file per shard, every cell checksummed.

Layout under the data directory ``DATA``::

    DATA/shards/<last 2 hex digits of the block-group id>/<shard_id>.shard
    DATA/tmp/<shard_id>.<random>.tmp        files being written

A shard id is ``"%016x-%02d" % (block_group_id, index)``, e.g. ``000000000000002a-03``; ids are
checked against a strict pattern before they touch a path, so no id can escape ``DATA``.

File format (little-endian)::

    header, HEADER_SIZE (128) bytes:
        magic b"DOGSHARD", format version u16, header size u16, flags u32,
        fragment size u64, cells u64, last fragment size u64, shard index u16,
        policy name (16 bytes, NUL padded), shard id (32 bytes, NUL padded),
        zero padding, CRC32C of the bytes before it (u32, the last 4 bytes)
    then one record per cell: [u32 CRC32C of the fragment][fragment bytes]

Every fragment has the header's fragment size except the last, which may be shorter, so cell
``i`` starts at ``HEADER_SIZE + i * (4 + fragment_size)``: a range read needs no index. The
header is rewritten with the cell count at commit, so a truncated file is detected too.

Writes are durable and atomic: records go to a temporary file, then the header, one ``fsync``,
a ``rename`` over the final name and an ``fsync`` of the directory. Where the file system
allows it, records are written with direct I/O (``O_DIRECT``, whole 4 KiB blocks staged in an
aligned buffer; the last partial block through the page cache), which spares the CPU the copy
into the page cache and the commit's ``fsync`` the write-back of the whole shard; elsewhere
with ``os.writev`` (no concatenation copies). The file is the same either way. A crash leaves either the old shard or the new one, plus perhaps a
temporary file that L{ShardStore.clean_tmp} removes at start-up.

All methods block (disk I/O, fsync): the chunk server calls them from a thread pool. This module
uses no Twisted and depends on nothing else in DogFS.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import secrets
import stat as stat_module
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType

import crc32c as _crc32c
from attrs import frozen

from dogfs.storage.files import fsync_dir, make_dirs

__all__ = [
    "HEADER_SIZE",
    "RECORD_OVERHEAD",
    "InvalidShardId",
    "ShardCorrupt",
    "ShardInfo",
    "ShardNotFound",
    "ShardReader",
    "ShardStat",
    "ShardStore",
    "ShardStoreError",
    "ShardStoreFull",
    "ShardWriter",
    "CellOutOfRange",
    "make_shard_id",
    "parse_shard_id",
    "shard_damaged",
    "validate_shard_id",
]

MAGIC = b"DOGSHARD"
FORMAT_VERSION = 1
HEADER_SIZE = 128
#: Bytes each record adds to its fragment: the CRC32C.
RECORD_OVERHEAD = 4
#: Header flag: the writer committed the file (a temporary file never has it).
FLAG_COMPLETE = 1

_HEADER = struct.Struct("<8sHHIQQQH16s32s")
_HEADER_CRC_OFFSET = HEADER_SIZE - 4
_CRC = struct.Struct("<I")
_SHARD_ID_RE = re.compile(r"[0-9a-f]{16}-[0-9]{2}", re.ASCII)
_POLICY_RE = re.compile(r"[A-Za-z0-9-]{1,16}", re.ASCII)
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: Errors of a read that say the data is lost: the medium failed (EIO under a bad sector) or
#: the file system's own checks did (EBADMSG, EUCLEAN: ext4's and XFS's checksums; ENODATA).
_DAMAGE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EIO", "ENODATA", "EBADMSG", "EUCLEAN") if hasattr(errno, name)
)
#: A file the server may not read: see `shard_forbidden`.
_FORBIDDEN_ERRNOS = frozenset({errno.EACCES, errno.EPERM})
_MAX_FRAGMENT_SIZE = 1 << 32


def _crc(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    return int(_crc32c.crc32c(data, value))


class ShardStoreError(Exception):
    """Something went wrong in the shard store."""


class InvalidShardId(ShardStoreError, ValueError):
    """A shard id that is not ``<16 lowercase hex digits>-<2 decimal digits>``."""


class ShardNotFound(ShardStoreError, KeyError):
    """No shard with this id is stored here."""

    def __str__(self) -> str:
        # KeyError would quote the message; keep it a plain sentence.
        return str(self.args[0]) if self.args else ""


class CellOutOfRange(ShardStoreError, IndexError):
    """A cell index outside ``0 .. cells - 1`` of a shard."""


class ShardCorrupt(ShardStoreError):
    """A shard failed its checksums.

    ``cell`` is the index of the bad cell, or ``None`` when the header (or the file as a whole,
    e.g. its length) is bad.
    """

    def __init__(self, shard_id: str, cell: int | None, detail: str) -> None:
        where = "its header" if cell is None else f"cell {cell}"
        super().__init__(f"shard {shard_id} is corrupt: {where} {detail}")
        self.shard_id = shard_id
        self.cell = cell
        self.detail = detail


class ShardStoreFull(ShardStoreError):
    """The disk or quota is full (ENOSPC, EDQUOT, EFBIG); the partial file was removed."""


def shard_damaged(error: OSError) -> bool:
    """Whether ``error``, met reading a shard, means the shard itself is damaged.

    Only errors that say its bytes are lost do. Any other (EMFILE, ENFILE, ENOMEM, EAGAIN: the
    process or the kernel short of something for a moment; EACCES: see `shard_forbidden`) is
    the server's trouble, not the shard's: marking the shard damaged for it would have a
    healthy copy repaired, and reported as lost, for good.
    """
    return error.errno in _DAMAGE_ERRNOS


def shard_forbidden(error: OSError) -> bool:
    """Whether ``error`` says the server may not read the shard's file (EACCES, EPERM).

    Not damage on a read or at start-up: a relabel or a ``chown -R`` under a running server
    forbids every file at once. The scrubber tells that from one file's own permissions (a
    ``chmod`` by hand), which would leave its block group a shard short with nobody told:
    see `dogfs.chunk.scrub`.
    """
    return error.errno in _FORBIDDEN_ERRNOS


def validate_shard_id(shard_id: object) -> str:
    """Return ``shard_id`` if it is a well-formed shard id.

    @raise InvalidShardId: anything else, including ids that could form another path.
    """
    if not isinstance(shard_id, str) or _SHARD_ID_RE.fullmatch(shard_id) is None:
        raise InvalidShardId(
            f"invalid shard id {shard_id!r}; expected 16 lowercase hex digits, '-', "
            f"and a 2-digit index, such as 000000000000002a-03"
        )
    return shard_id


def make_shard_id(block_group_id: int, index: int) -> str:
    """The id of shard ``index`` of block group ``block_group_id``."""
    if not 0 <= block_group_id < 1 << 64 or not 0 <= index < 100:
        raise InvalidShardId(
            f"no shard id for block group {block_group_id} index {index}; expected a "
            f"64-bit block-group id and an index from 0 to 99"
        )
    return f"{block_group_id:016x}-{index:02d}"


def parse_shard_id(shard_id: str) -> tuple[int, int]:
    """Split a shard id into ``(block_group_id, index)``."""
    validate_shard_id(shard_id)
    return int(shard_id[:16], 16), int(shard_id[17:])


@frozen
class ShardInfo:
    """What a shard is: its id, policy name, index in the stripe and full fragment size.

    ``fragment_size`` is the size of every stored fragment (codec header included) except
    possibly the last, which may be shorter.
    """

    shard_id: str
    policy: str
    index: int
    fragment_size: int


@frozen
class ShardStat:
    """A stored shard as the chunk server reports it.

    ``size`` is the file's length in bytes; ``corrupt`` is set by L{ShardStore.list} for a file
    whose header is damaged or that the disk cannot read (its ``cells`` is then 0). A file that
    could not be read for a reason of the server's own (`shard_damaged` is false) is listed
    with ``cells`` 0 too, not corrupt: its reads check it.
    """

    shard_id: str
    size: int
    cells: int
    mtime: float
    corrupt: bool = False


def _check_info(info: ShardInfo) -> None:
    validate_shard_id(info.shard_id)
    if not isinstance(info.policy, str) or _POLICY_RE.fullmatch(info.policy) is None:
        raise ValueError(f"invalid policy name {info.policy!r} for shard {info.shard_id}")
    if not isinstance(info.index, int) or info.index != int(info.shard_id[17:]):
        raise ValueError(
            f"shard index {info.index!r} does not match shard id {info.shard_id}"
        )
    if not isinstance(info.fragment_size, int) or not 0 < info.fragment_size < _MAX_FRAGMENT_SIZE:
        raise ValueError(
            f"invalid fragment size {info.fragment_size!r} for shard {info.shard_id}"
        )


def _pack_header(info: ShardInfo, flags: int, cells: int, last_size: int) -> bytes:
    body = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        HEADER_SIZE,
        flags,
        info.fragment_size,
        cells,
        last_size,
        info.index,
        info.policy.encode("ascii"),
        info.shard_id.encode("ascii"),
    ).ljust(_HEADER_CRC_OFFSET, b"\0")
    return body + _CRC.pack(_crc(body))


def _unpack_header(shard_id: str, data: bytes) -> tuple[ShardInfo, int, int]:
    """Parse and check a header; return ``(info, cells, last_fragment_size)``."""
    if len(data) < HEADER_SIZE:
        raise ShardCorrupt(shard_id, None, f"is truncated ({len(data)} of {HEADER_SIZE} bytes)")
    (stored,) = _CRC.unpack_from(data, _HEADER_CRC_OFFSET)
    if _crc(memoryview(data)[:_HEADER_CRC_OFFSET]) != stored:
        raise ShardCorrupt(shard_id, None, "fails its CRC32C check")
    (magic, version, header_size, flags, fragment_size, cells, last_size, index, policy,
     stored_id) = _HEADER.unpack_from(data, 0)
    # The CRC matched, so anything odd below is a bug or a foreign file, not bit rot.
    if magic != MAGIC or header_size != HEADER_SIZE:
        raise ShardCorrupt(shard_id, None, "is not a DogFS shard header")
    if version != FORMAT_VERSION:
        raise ShardCorrupt(shard_id, None, f"has unsupported format version {version}")
    if not flags & FLAG_COMPLETE:
        raise ShardCorrupt(shard_id, None, "marks a write that never committed")
    name = stored_id.rstrip(b"\0").decode("ascii", "replace")
    if name != shard_id:
        raise ShardCorrupt(shard_id, None, f"names another shard ({name})")
    if fragment_size == 0 or (cells and not 0 < last_size <= fragment_size):
        raise ShardCorrupt(shard_id, None, "has inconsistent sizes")
    info = ShardInfo(
        shard_id=shard_id,
        policy=policy.rstrip(b"\0").decode("ascii", "replace"),
        index=index,
        fragment_size=fragment_size,
    )
    return info, cells, last_size


def _expected_size(fragment_size: int, cells: int, last_size: int) -> int:
    if cells == 0:
        return HEADER_SIZE
    return (
        HEADER_SIZE
        + (cells - 1) * (RECORD_OVERHEAD + fragment_size)
        + RECORD_OVERHEAD
        + last_size
    )


#: Direct I/O (O_DIRECT) needs file offsets, lengths and memory aligned to the device's
#: logical block size; a page is a multiple of every such size in use.
DIRECT_ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)

PwriteFunction = Callable[[int, memoryview, int], int]


def _probe_direct_io(directory: str) -> bool:
    """Whether files in ``directory`` accept aligned O_DIRECT writes (tmpfs does not)."""
    if not _O_DIRECT:
        return False
    path = os.path.join(directory, f"direct-probe.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        with mmap.mmap(-1, DIRECT_ALIGN) as block:
            return os.pwrite(fd, memoryview(block), 0) == DIRECT_ALIGN
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


#: Bytes of staging buffers the direct-I/O writers of one store may hold together (about a
#: cell each, resident from the first cell until commit or abort). Past it a new shard is
#: written through the page cache: uploads held open cannot make the server pin a cell of
#: memory each.
STAGING_BUDGET = 64 << 20


def _staging_size(fragment_size: int) -> int:
    """Bytes of a direct-I/O writer's staging buffer: a record and the header, plus the block
    left over from the records before, rounded up to whole blocks."""
    return -(-(RECORD_OVERHEAD + fragment_size + HEADER_SIZE + DIRECT_ALIGN) // DIRECT_ALIGN) * DIRECT_ALIGN


#: Cells at least this large are worth reading with direct I/O (`ShardReader.read_record_into`).
DIRECT_READ_MIN = 64 * 1024


class AlignedBuffers:
    """Page-aligned buffers for direct reads, each reused once nothing refers to it any more.

    O_DIRECT needs aligned memory, which ``bytes`` and ``bytearray`` are not; an ``mmap`` is.
    A cell read into one leaves as a memoryview of it, and every view holds a reference, so
    (as with the wire's ``BufferPool``) a buffer whose only references are the pool's own is
    free. Bounded in bytes: past ``max_bytes`` with every buffer in use, `get` answers None
    and the caller reads through the page cache instead. Thread-safe.
    """

    def __init__(self, max_bytes: int = 32 << 20) -> None:
        self.max_bytes = max_bytes
        self._buffers: list[mmap.mmap] = []
        self._bytes = 0
        self._lock = threading.Lock()

    def _free(self, i: int) -> bool:
        # The list's reference and getrefcount's own argument: no view of it is alive.
        return sys.getrefcount(self._buffers[i]) == 2

    def get(self, size: int) -> mmap.mmap | None:
        """A free buffer of at least ``size`` bytes (at most twice that), or None."""
        size = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
        with self._lock:
            buffers = self._buffers
            for i in range(len(buffers)):
                if size <= len(buffers[i]) <= 2 * size and self._free(i):
                    return buffers[i]
            # Make room by dropping free buffers (of other sizes: none fitted), if any.
            i = 0
            while self._bytes + size > self.max_bytes and i < len(buffers):
                if self._free(i):
                    self._bytes -= len(buffers[i])
                    buffers.pop(i).close()
                else:
                    i += 1
            if self._bytes + size > self.max_bytes:
                return None
            try:
                buffer = mmap.mmap(-1, size)
            except OSError:  # no memory for another: the page cache will do
                return None
            buffers.append(buffer)
            self._bytes += size
            return buffer


class ShardReader:
    """An open, header-checked shard; reads and verifies cells by index.

    Thread-safe (``pread`` only), but close it only once no read is in flight. Use as a
    context manager, or call L{close}.
    """

    def __init__(self, shard_id: str, fd: int) -> None:
        """Take ownership of ``fd`` and check the header; closes ``fd`` if that fails."""
        self._fd = fd
        # The same file opened with O_DIRECT, for read_record_into (see _use_direct).
        self._direct_fd: int | None = None
        # Cleared if the file system refuses an aligned direct read after all.
        self._direct_ok = False
        try:
            header = os.pread(fd, HEADER_SIZE, 0)
            info, cells, last_size = _unpack_header(shard_id, header)
            size = os.fstat(fd).st_size
            expected = _expected_size(info.fragment_size, cells, last_size)
            if size > expected:
                raise ShardCorrupt(
                    shard_id, None,
                    f"says the file is {expected} bytes, but it is {size}",
                )
        except BaseException:
            os.close(fd)
            raise
        #: What the shard is.
        self.info: ShardInfo = info
        #: How many cells the shard holds.
        self.cells: int = cells
        #: Length of the last cell's fragment (the others are C{info.fragment_size}).
        self.last_fragment_size: int = last_size
        #: The file's length when opened; shorter than the header says means truncation.
        self.file_size: int = size
        self._closed = False

    @property
    def shard_id(self) -> str:
        """The shard's id."""
        return self.info.shard_id

    def cell_size(self, i: int) -> int:
        """Length of cell ``i``'s fragment."""
        self._check_index(i)
        return self.last_fragment_size if i == self.cells - 1 else self.info.fragment_size

    def cell_offset(self, i: int) -> int:
        """File offset of cell ``i``'s record (its CRC, then the fragment)."""
        return HEADER_SIZE + i * (RECORD_OVERHEAD + self.info.fragment_size)

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.cells:
            raise CellOutOfRange(
                f"cell {i} is out of range for shard {self.shard_id}, "
                f"which has {self.cells} cells"
            )

    def will_need(self, first: int, count: int) -> None:
        """Hint that cells ``first .. first + count - 1`` are about to be read in order: the
        kernel starts reading them all from the disk now (best effort)."""
        if count <= 0 or not 0 <= first < self.cells:
            return
        start = self.cell_offset(first)
        end = min(self.file_size, self.cell_offset(min(first + count, self.cells)))
        try:
            os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_WILLNEED)
        except (AttributeError, OSError):
            pass

    def read_record(self, i: int) -> tuple[int, bytes]:
        """Return cell ``i`` as ``(crc32c, fragment)`` after checking one against the other.

        The CRC can travel with the fragment so the client checks it end to end.

        @raise ShardCorrupt: the cell is missing (truncated file) or fails its CRC.
        """
        if self._closed:
            raise ShardStoreError(f"the reader of shard {self.shard_id} is closed")
        size = self.cell_size(i)
        offset = self.cell_offset(i)
        # Two preads rather than one: slicing a CRC off a 1 MiB read would copy the fragment.
        crc_bytes = os.pread(self._fd, RECORD_OVERHEAD, offset)
        fragment = os.pread(self._fd, size, offset + RECORD_OVERHEAD)
        if len(crc_bytes) != RECORD_OVERHEAD or len(fragment) != size:
            raise ShardCorrupt(self.shard_id, i, "is cut short: the file is truncated")
        (stored,) = _CRC.unpack(crc_bytes)
        if _crc(fragment) != stored:
            raise ShardCorrupt(self.shard_id, i, "fails its CRC32C check")
        return stored, fragment

    def _use_direct(self, direct_fd: int) -> None:
        """Take ownership of ``direct_fd``, this file opened with O_DIRECT (`ShardStore.open`
        has checked it is the same file), for `read_record_into`."""
        self._direct_fd = direct_fd
        self._direct_ok = True

    @property
    def reads_direct(self) -> bool:
        """Whether `read_record_into` reads with direct I/O (else through the page cache)."""
        return self._direct_ok

    def read_record_into(self, i: int, buffers: AlignedBuffers) -> tuple[int, bytes | memoryview]:
        """`read_record`, with direct I/O into one of ``buffers``: the fragment comes back as
        a view of that buffer, which stays taken until the view (and every view of it) is gone.

        For cells streamed in order from a shard written with direct I/O, which is not in
        memory: read through the page cache, every byte is copied by the kernel from the
        cache into the fragment, and the cache's own pages are allocated and evicted again:
        about a third of a chunk server's CPU for a get. A direct read lands in the buffer. A
        shard opened without O_DIRECT, a file system that refuses the read, or ``buffers``
        having none free: the page cache as `read_record` does.

        @raise ShardCorrupt: the cell is missing (truncated file) or fails its CRC.
        """
        if not self._direct_ok or self._direct_fd is None:
            return self.read_record(i)
        if self._closed:
            raise ShardStoreError(f"the reader of shard {self.shard_id} is closed")
        size = self.cell_size(i)
        offset = self.cell_offset(i)
        start = offset - offset % DIRECT_ALIGN
        end = offset + RECORD_OVERHEAD + size
        span = -(-(end - start) // DIRECT_ALIGN) * DIRECT_ALIGN
        buffer = buffers.get(span)
        if buffer is None:
            return self.read_record(i)
        try:
            got = os.preadv(self._direct_fd, [memoryview(buffer)[:span]], start)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # The file system takes O_DIRECT opens but not these reads: stop trying. (The
            # descriptor stays open until close: another thread may be reading with it.)
            self._direct_ok = False
            return self.read_record(i)
        if got < end - start:
            raise ShardCorrupt(self.shard_id, i, "is cut short: the file is truncated")
        at = offset - start
        (stored,) = _CRC.unpack_from(buffer, at)
        fragment = memoryview(buffer)[at + RECORD_OVERHEAD : end - start]
        if _crc(fragment) != stored:
            raise ShardCorrupt(self.shard_id, i, "fails its CRC32C check")
        return stored, fragment

    def read_cell(self, i: int) -> bytes:
        """Return cell ``i``'s fragment, verified against its CRC32C.

        @raise ShardCorrupt: the cell is missing (truncated file) or fails its CRC.
        @raise CellOutOfRange: no such cell.
        """
        return self.read_record(i)[1]

    def read_cells(self, first: int, count: int) -> list[bytes]:
        """Return cells ``first .. first + count - 1``, each verified."""
        if count < 0 or first < 0 or first + count > self.cells:
            raise CellOutOfRange(
                f"cells {first} to {first + count - 1} are out of range for shard "
                f"{self.shard_id}, which has {self.cells} cells"
            )
        return [self.read_cell(i) for i in range(first, first + count)]

    def bad_cells(self, buffers: AlignedBuffers | None = None) -> list[int]:
        """Read every cell; return the indexes of those that are missing or corrupt. With
        ``buffers``, cells are read with direct I/O where this reader can
        (`read_record_into`)."""
        bad = []
        for i in range(self.cells):
            try:
                if buffers is None:
                    self.read_record(i)
                else:
                    self.read_record_into(i, buffers)
            except ShardCorrupt:
                bad.append(i)
        return bad

    def close(self) -> None:
        """Release the file descriptor; idempotent."""
        if not self._closed:
            self._closed = True
            os.close(self._fd)
            if self._direct_fd is not None:
                os.close(self._direct_fd)

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


WritevFunction = Callable[[int, Sequence[bytes | bytearray | memoryview]], int]


class ShardWriter:
    """Writes one shard into a temporary file; L{commit} makes it durable and visible.

    Not thread-safe: one writer is fed by one caller at a time. Usable as a context manager:
    leaving the block without committing aborts.
    """

    def __init__(
        self, store: ShardStore, info: ShardInfo, tmp_path: str, fd: int, direct_fd: int | None = None
    ) -> None:
        self._store = store
        #: The shard being written.
        self.info = info
        self._tmp_path = tmp_path
        self._fd: int | None = fd
        self._offset = HEADER_SIZE
        #: Cells appended so far.
        self.cells = 0
        self._last_size = 0
        self._closed = False
        # Direct I/O (see ShardStore): records are staged in a page-aligned buffer and written
        # in whole blocks through `direct_fd`, bypassing the page cache; the last partial
        # block goes through `fd` at commit. `_flushed` is the file offset written so far
        # (a multiple of DIRECT_ALIGN), `_staged` the bytes after it held in the buffer, and
        # `_block0` the first block as written (commit rewrites it with the final header).
        self._direct_fd = direct_fd
        self._staging: mmap.mmap | None = None
        self._flushed = 0
        self._staged = 0
        self._block0: bytes | None = None
        if direct_fd is not None:
            # The store has counted this buffer in its staging budget: _release_direct gives
            # it back.
            size = _staging_size(info.fragment_size)
            try:
                # Private, not the shared (shmem) mapping mmap.mmap(-1) makes by default: the
                # kernel pins private pages for each direct write on its fast path (chunk
                # servers spent ~20% more CPU per upload with the shared kind).
                self._staging = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
            except OSError:  # no memory for it: this shard goes through the page cache
                os.close(direct_fd)
                self._direct_fd = None
                store._release_staging(size)

    @property
    def shard_id(self) -> str:
        """The id of the shard being written."""
        return self.info.shard_id

    @property
    def direct(self) -> bool:
        """Whether this shard's records are written with direct I/O."""
        return self._staging is not None

    @property
    def size(self) -> int:
        """Bytes written so far, header included: the file's size once committed."""
        return self._offset

    def _fail(self, what: str, e: OSError) -> ShardStoreError:
        """Abort and turn ``e`` into the exception the caller should see."""
        self.abort()
        if e.errno in _FULL_ERRNOS:
            return ShardStoreFull(
                f"cannot {what} shard {self.shard_id} under {self._store.root}: "
                f"{e.strerror or e}"
            )
        return ShardStoreError(
            f"cannot {what} shard {self.shard_id} under {self._store.root}: {e.strerror or e}"
        )

    def _live_fd(self) -> int:
        if self._fd is None:
            raise ShardStoreError(f"the writer of shard {self.shard_id} is already closed")
        return self._fd

    def append(
        self, fragment: bytes | bytearray | memoryview, crc: int | None = None
    ) -> None:
        """Append the next cell's fragment.

        Every fragment but the last must be exactly C{info.fragment_size} bytes. If ``crc`` is
        given (the CRC32C the client sent), it is checked against the fragment.

        @raise ValueError: wrong fragment size, or ``crc`` does not match.
        @raise ShardStoreFull: the disk is full; the writer is aborted.
        """
        fd = self._live_fd()
        view = memoryview(fragment).cast("B")
        size = len(view)
        if self._last_size and self._last_size != self.info.fragment_size:
            raise ValueError(
                f"shard {self.shard_id} already has its short last cell; cannot append more"
            )
        if not 0 < size <= self.info.fragment_size:
            raise ValueError(
                f"fragment of {size} bytes does not fit shard {self.shard_id}, whose "
                f"fragments are {self.info.fragment_size} bytes"
            )
        value = _crc(view)
        if crc is not None and crc != value:
            raise ValueError(
                f"cell {self.cells} of shard {self.shard_id} does not match the CRC32C sent "
                f"with it ({crc:#010x} given, {value:#010x} computed)"
            )
        try:
            if self._staging is not None:
                self._stage(_CRC.pack(value), view)
            else:
                self._store._write_all(fd, [_CRC.pack(value), view])
        except OSError as e:
            raise self._fail("write", e) from e
        self._offset += RECORD_OVERHEAD + size
        self.cells += 1
        self._last_size = size

    def append_cells(
        self, cells: Sequence[tuple[bytes | bytearray | memoryview, int | None]]
    ) -> None:
        """L{append} each ``(fragment, crc)`` in order (one call for several cells: one trip
        to the thread that writes). On an error, ``cells`` tells how many were appended."""
        for fragment, crc in cells:
            self.append(fragment, crc)

    def _stage(self, *pieces: bytes | memoryview) -> None:
        """Direct I/O: add bytes after the staged ones; write every whole block staged."""
        assert self._staging is not None and self._direct_fd is not None
        buffer = memoryview(self._staging)
        try:
            end = self._staged
            for piece in pieces:
                buffer[end : end + len(piece)] = piece
                end += len(piece)
            whole = end - end % DIRECT_ALIGN
            if whole:
                if self._flushed == 0:
                    self._block0 = bytes(buffer[:DIRECT_ALIGN])
                self._store._pwrite_all(self._direct_fd, buffer[:whole], self._flushed)
                self._flushed += whole
                # The rest is shorter than a block, so it never overlaps what it is moved from.
                buffer[: end - whole] = buffer[whole:end]
            self._staged = end - whole
        finally:
            buffer.release()

    def _write_staged(self, fd: int, header: bytes) -> None:
        """Direct I/O, at commit: write the last partial block and the final header."""
        assert self._staging is not None and self._direct_fd is not None
        buffer = memoryview(self._staging)
        try:
            if self._flushed == 0:
                # Nothing written yet (a small shard): the header is in the staged bytes.
                buffer[:HEADER_SIZE] = header
            if self._staged:
                # A partial block: through the page cache (direct I/O needs whole blocks).
                done = 0
                while done < self._staged:
                    # A short write (a file-size limit) is resumed: the next one says why.
                    n = os.pwrite(fd, buffer[done : self._staged], self._flushed + done)
                    if n <= 0:
                        raise OSError(errno.EIO, "write made no progress")
                    done += n
            if self._flushed:
                assert self._block0 is not None
                buffer[:DIRECT_ALIGN] = self._block0
                buffer[:HEADER_SIZE] = header
                self._store._pwrite_all(self._direct_fd, buffer[:DIRECT_ALIGN], 0)
        finally:
            buffer.release()

    def _release_direct(self) -> None:
        # The buffer first: a close that fails must not keep it counted in the store's budget.
        staging, self._staging = self._staging, None
        if staging is not None:
            self._store._release_staging(len(staging))
            try:
                staging.close()
            except BufferError:
                pass  # a failed write's traceback still holds a view: unmapped when it goes
        direct_fd, self._direct_fd = self._direct_fd, None
        if direct_fd is not None:
            os.close(direct_fd)

    def commit(self) -> ShardStat:
        """Make the shard durable and visible under its id, replacing any older copy atomically.

        @raise ShardStoreFull: the disk filled up; nothing was left behind.
        """
        fd = self._live_fd()
        header = _pack_header(self.info, FLAG_COMPLETE, self.cells, self._last_size)
        store = self._store
        final = store._path(self.shard_id)
        try:
            if self._staging is not None:
                self._write_staged(fd, header)
            elif os.pwrite(fd, header, 0) != HEADER_SIZE:
                raise OSError(errno.EIO, "short header write")
            store._fsync(fd)
            st = os.fstat(fd)
            directory = store._bucket(self.shard_id)
            with store._names:
                old_size = store._file_size(final)
                os.rename(self._tmp_path, final)
        except OSError as e:
            raise self._fail("commit", e) from e
        self._fd = None
        self._closed = True
        os.close(fd)
        self._release_direct()
        # The rename is durable only once the directory entry is on disk.
        fsync_dir(directory)
        store._account(st.st_size - old_size)
        return ShardStat(self.shard_id, st.st_size, self.cells, st.st_mtime)

    def abort(self) -> None:
        """Drop the partial shard: close and delete the temporary file; idempotent.

        Never raises: abort runs while another error is being reported (a write that failed
        on a disk gone read-only fails its unlink too), and that first error is the one the
        caller must see. A temporary file left behind is removed by the next start's
        ``clean_tmp``.
        """
        if self._closed:
            return
        self._closed = True
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            if fd is not None:
                os.close(fd)
        with contextlib.suppress(OSError):
            self._release_direct()
        with contextlib.suppress(OSError):
            os.unlink(self._tmp_path)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._closed:
            self.abort()


class ShardStore:
    """The shards of one chunk-server data directory."""

    def __init__(
        self,
        root: str,
        *,
        writev: WritevFunction = os.writev,
        fsync: Callable[[int], None] = os.fsync,
        direct_io: bool | None = None,
        pwrite: PwriteFunction = os.pwrite,
        staging_budget: int = STAGING_BUDGET,
    ) -> None:
        """Use (and create durably if needed) ``root/shards`` and ``root/tmp``.

        ``writev``, ``pwrite`` (direct I/O) and ``fsync`` are injectable so tests can simulate
        a full disk.

        ``direct_io``: write shards with O_DIRECT, past the page cache. Copying cells into the
        page cache was the largest CPU cost of a chunk server receiving an upload, and the
        commit's fsync then had every byte still to write back; direct writes leave the copy
        to the device and the fsync only the last block and the metadata. Reads of a new
        shard then come from the disk rather than memory, and `open` with ``direct`` reads
        them with direct I/O too. None (the default) uses it where the file system accepts it
        and ``writev`` is the real one. ``staging_budget`` bounds the memory of direct
        writers' staging buffers (see `STAGING_BUDGET`).

        @raise ShardStoreError: the directories cannot be created (one is a file, no
            permission).
        """
        self.root = os.path.abspath(root)
        self.shards_dir = os.path.join(self.root, "shards")
        self.tmp_dir = os.path.join(self.root, "tmp")
        try:
            make_dirs(self.shards_dir)
            make_dirs(self.tmp_dir)
        except OSError as e:
            raise ShardStoreError(
                f"cannot keep shards in {self.root}: {e.filename or self.root}: {e.strerror or e}"
            ) from e
        self._writev = writev
        self._pwrite = pwrite
        self._fsync = fsync
        if direct_io is None:
            direct_io = writev is os.writev and _probe_direct_io(self.tmp_dir)
        #: Whether new shards are written with direct I/O.
        self.direct_io = direct_io
        self._buckets: set[str] = set()
        self._lock = threading.Lock()
        # Held while a name changes hands: a commit's rename, and delete_unless_newer's
        # look-then-unlink (which must never remove the copy a commit just put in place).
        self._names = threading.Lock()
        self._used: int | None = None
        self.staging_budget = staging_budget
        #: Bytes of staging buffers held by this store's direct writers now.
        self.staging_bytes = 0
        # Its own lock: begin takes it on the reactor thread, where usage's first scan under
        # _lock must not hold it up.
        self._staging_lock = threading.Lock()
        # verify's direct reads: a scrub reads one cell at a time (made as needed).
        self._scrub_buffers = AlignedBuffers(max_bytes=64 << 20)

    def __repr__(self) -> str:
        return f"<ShardStore {self.root}>"

    # -- paths ---------------------------------------------------------------------------

    def _bucket_path(self, shard_id: str) -> str:
        # The block-group id's last two hex digits: 256 evenly filled directories.
        return os.path.join(self.shards_dir, shard_id[14:16])

    def _path(self, shard_id: str) -> str:
        return os.path.join(self._bucket_path(shard_id), shard_id + ".shard")

    def path(self, shard_id: str) -> str:
        """The file a shard lives in (whether or not it exists)."""
        return self._path(validate_shard_id(shard_id))

    def _bucket(self, shard_id: str) -> str:
        """Return the shard's directory, creating it durably the first time."""
        path = self._bucket_path(shard_id)
        if path not in self._buckets:
            try:
                os.mkdir(path)
            except FileExistsError:
                pass
            # Even when another thread won the mkdir race, its entry may not be durable yet.
            fsync_dir(self.shards_dir)
            self._buckets.add(path)
        return path

    @staticmethod
    def _file_size(path: str) -> int:
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return 0

    def _account(self, delta: int) -> None:
        with self._lock:
            if self._used is not None:
                self._used += delta

    def _reserve_staging(self, size: int) -> bool:
        """Count a direct writer's staging buffer of ``size`` bytes, if the budget has room."""
        with self._staging_lock:
            if self.staging_bytes + size > self.staging_budget:
                return False
            self.staging_bytes += size
            return True

    def _release_staging(self, size: int) -> None:
        with self._staging_lock:
            self.staging_bytes -= size

    # -- writing -------------------------------------------------------------------------

    def _write_all(self, fd: int, pieces: list[bytes | memoryview]) -> None:
        """``writev`` every piece, resuming after short writes; raises OSError."""
        while pieces:
            n = self._writev(fd, pieces)
            if n <= 0:
                raise OSError(errno.EIO, "write made no progress")
            # A short write (a signal, a file-size limit): resume where it stopped.
            while pieces and n >= len(pieces[0]):
                n -= len(pieces[0])
                pieces.pop(0)
            if n:
                pieces[0] = memoryview(pieces[0])[n:]

    def _pwrite_all(self, fd: int, data: memoryview, offset: int) -> None:
        """Direct I/O: write whole blocks at ``offset``; raises OSError (a short write that
        leaves a partial block cannot be resumed with direct I/O)."""
        done = 0
        while done < len(data):
            n = self._pwrite(fd, data[done:], offset + done)
            if n <= 0 or (n % DIRECT_ALIGN and done + n < len(data)):
                raise OSError(errno.EIO, "direct write made no whole-block progress")
            done += n

    def begin(self, info: ShardInfo) -> ShardWriter:
        """Start writing a shard; nothing is visible until L{ShardWriter.commit}.

        @raise InvalidShardId: a malformed id.
        @raise ValueError: the info is inconsistent (index not matching the id, ...).
        @raise ShardStoreFull: no space even for the temporary file.
        """
        _check_info(info)
        tmp_path = os.path.join(
            self.tmp_dir, f"{info.shard_id}.{secrets.token_hex(8)}.tmp"
        )
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            cls = ShardStoreFull if e.errno in _FULL_ERRNOS else ShardStoreError
            raise cls(
                f"cannot create shard {info.shard_id} under {self.root}: {e.strerror or e}"
            ) from e
        direct_fd = None
        # A shard of fragments under a block would reach the disk as one partial block through
        # the page cache anyway (small files): keep their path as short as it was. So does a
        # shard whose staging buffer the budget has no room for: writing through the page
        # cache costs CPU, pinning memory for every upload held open costs the server.
        staging = _staging_size(info.fragment_size)
        if self.direct_io and info.fragment_size >= DIRECT_ALIGN and self._reserve_staging(staging):
            try:
                direct_fd = os.open(tmp_path, os.O_WRONLY | os.O_CLOEXEC | _O_DIRECT)
            except OSError:
                self._release_staging(staging)  # this shard goes through the page cache
        writer = ShardWriter(self, info, tmp_path, fd, direct_fd)
        # A placeholder header (not marked complete) until commit writes the real one.
        placeholder = _pack_header(info, 0, 0, 0)
        try:
            if writer.direct:
                writer._stage(placeholder)
            else:
                self._write_all(fd, [placeholder])
        except OSError as e:
            raise writer._fail("write", e) from e
        return writer

    def write(self, info: ShardInfo, fragments: Sequence[bytes | memoryview]) -> ShardStat:
        """Write a whole shard in one call: L{begin}, every fragment, L{ShardWriter.commit}."""
        with self.begin(info) as writer:
            for fragment in fragments:
                writer.append(fragment)
            return writer.commit()

    # -- reading -------------------------------------------------------------------------

    def open(self, shard_id: str, direct: bool = False) -> ShardReader:
        """Open a shard for reading (checks its header); with ``direct``, also for direct
        reads (`ShardReader.read_record_into`) where this store writes with direct I/O.

        @raise ShardNotFound: no such shard.
        @raise ShardCorrupt: its header is damaged (C{cell} is None).
        """
        path = self.path(shard_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ShardNotFound(f"shard {shard_id} is not stored in {self.root}") from None
        reader = ShardReader(shard_id, fd)
        if direct and self.direct_io and reader.info.fragment_size >= DIRECT_READ_MIN:
            direct_fd = None
            try:
                direct_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | _O_DIRECT)
                first, second = os.fstat(fd), os.fstat(direct_fd)
                if (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino):
                    reader._use_direct(direct_fd)
                    direct_fd = None
                # else replaced between the two opens: read only the file whose header we checked.
            except OSError:
                pass  # read through the page cache
            finally:
                if direct_fd is not None:
                    os.close(direct_fd)
        return reader

    def read_cells(self, shard_id: str, first: int, count: int) -> list[bytes]:
        """Return cells ``first .. first + count - 1`` of a shard, each verified.

        @raise ShardCorrupt: a cell (or the header) fails its check.
        @raise CellOutOfRange: the range goes past the shard's cells.
        """
        with self.open(shard_id) as reader:
            return reader.read_cells(first, count)

    def info(self, shard_id: str) -> ShardInfo:
        """What a stored shard is (from its checked header)."""
        with self.open(shard_id) as reader:
            return reader.info

    def verify(self, shard_id: str) -> list[int]:
        """Scrub a shard: return the indexes of its bad cells (empty when healthy).

        @raise ShardCorrupt: the header itself is bad.
        @raise ShardNotFound: no such shard.
        """
        with self.open(shard_id, direct=True) as reader:
            bad = reader.bad_cells(self._scrub_buffers)
            if reader.reads_direct:
                # Nothing came through the page cache: what clients read there stays.
                return bad
            try:
                # Read through the page cache (small cells, a file system without O_DIRECT):
                # a scrub reads everything once, so keep it from filling the cache, at the
                # price of evicting this file's pages that were there before.
                os.posix_fadvise(reader._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except (AttributeError, OSError):
                pass
            return bad

    # -- management ----------------------------------------------------------------------

    def delete(self, shard_id: str) -> bool:
        """Remove a shard; return whether it existed.

        The directory is not fsynced: a delete lost in a crash only brings back garbage that
        the next collection removes again.
        """
        path = self.path(shard_id)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return False
        self._account(-size)
        return True

    def delete_unless_newer(self, shard_id: str, written_before: float) -> bool:
        """Remove a shard whose file was last written at ``written_before`` or earlier;
        return whether it did. The look and the unlink are one step as far as commits go: a
        fresh copy a commit renames into place meanwhile is never the one removed."""
        path = self.path(shard_id)
        with self._names:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return False
            if st.st_mtime > written_before:
                return False
            os.unlink(path)
        self._account(-st.st_size)
        return True

    def stat(self, shard_id: str) -> ShardStat:
        """Size, cell count and mtime of a stored shard.

        @raise ShardNotFound: no such shard.
        @raise ShardCorrupt: its header is damaged.
        """
        with self.open(shard_id) as reader:
            st = os.fstat(reader._fd)
            return ShardStat(shard_id, st.st_size, reader.cells, st.st_mtime)

    def list(self) -> Iterator[ShardStat]:
        """Every shard stored here (in no particular order); damaged ones are flagged."""
        for shard_id, path in self._scan():
            try:
                stat = self.stat(shard_id)
            except ShardNotFound:
                continue  # deleted while we looked
            except ShardCorrupt:
                damaged = True
            except OSError as e:
                # A file the disk cannot read (EIO under a bad sector) is lost to us; one we
                # could not open for a reason of our own (EMFILE, ENOMEM) is not.
                damaged = shard_damaged(e)
            else:
                yield stat
                continue
            # Either way the scan goes on: one bad sector must not keep the server from
            # starting. A damaged shard is flagged, and reported as damaged (and repaired).
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            except OSError:
                yield ShardStat(shard_id, 0, 0, 0.0, corrupt=damaged)
                continue
            yield ShardStat(shard_id, st.st_size, 0, st.st_mtime, corrupt=damaged)

    def _scan(self) -> Iterator[tuple[str, str]]:
        """``(shard_id, path)`` of every well-named shard file."""
        with os.scandir(self.shards_dir) as buckets:
            bucket_paths = [b.path for b in buckets if b.is_dir(follow_symlinks=False)]
        for bucket in bucket_paths:
            try:
                entries = list(os.scandir(bucket))
            except FileNotFoundError:
                continue
            for entry in entries:
                name = entry.name
                if not name.endswith(".shard"):
                    continue
                shard_id = name[: -len(".shard")]
                if _SHARD_ID_RE.fullmatch(shard_id) and entry.is_file(follow_symlinks=False):
                    yield shard_id, entry.path

    def usage(self) -> tuple[int, int]:
        """Return ``(capacity, bytes used by shard files)``.

        The capacity is the room shards have: what they use plus what the filesystem still
        offers this process, at most the filesystem's size. So other files on the disk, and
        the blocks reserved for root, count as taken: a disk that fills up shows as full and
        placements stop coming, rather than failing with no space one upload at a time.

        The first call scans the store; later ones use a running total kept by commits and
        deletes (a commit racing that first scan may be counted twice: a heartbeat figure,
        not an invariant).
        """
        vfs = os.statvfs(self.root)
        with self._lock:
            if self._used is None:
                self._used = sum(self._file_size(path) for _, path in self._scan())
            used = self._used
        return min(vfs.f_blocks * vfs.f_frsize, used + vfs.f_bavail * vfs.f_frsize), used

    @property
    def usage_known(self) -> bool:
        """Whether `usage` has its running total already (no scan of the store to do)."""
        return self._used is not None

    def free_bytes(self) -> int:
        """Bytes still available to this (unprivileged) process on the filesystem."""
        vfs = os.statvfs(self.root)
        return vfs.f_bavail * vfs.f_frsize

    def clean_tmp(self) -> int:
        """Remove leftovers of interrupted writes; return how many. Call at start-up only."""
        removed = 0
        with os.scandir(self.tmp_dir) as entries:
            names = [
                e.name for e in entries
                if stat_module.S_ISREG(e.stat(follow_symlinks=False).st_mode)
            ]
        for name in names:
            try:
                os.unlink(os.path.join(self.tmp_dir, name))
            except FileNotFoundError:
                continue
            removed += 1
        return removed
