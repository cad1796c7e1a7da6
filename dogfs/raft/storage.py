# -*- test-case-name: tests.test_raft_storage -*-
"""Durable Raft storage: the log, the hard state and the latest snapshot, in LMDB.

Owns the on-disk format of a Raft member's state and the ``IRaftStorage`` contract that the
driver (and the simulator's in-memory storage) implement. May import ``dogfs.raft.core`` only.

Layout: one LMDB environment (a directory) holding three named databases.

- ``log``: key = entry index as 8 bytes big-endian, value = a record.
- ``meta``: ``hard_state`` and ``snapshot_meta`` records.
- ``snap``: the state machine bytes of the latest snapshot, in parts of SNAPSHOT_PART_BYTES:
  key = ``p`` + snapshot index (8 bytes) + part number (4 bytes), value = the raw bytes; the
  ``snapshot_meta`` record holds their length, CRC32C and count. (Releases before parts kept
  them as one ``data`` record; such a snapshot still loads, and the next one replaces it.)

A record is ``crc32c(payload)`` (4 bytes big-endian) followed by a msgpack payload, so a
torn or corrupt value is detected at start-up instead of being replayed. Any corruption refuses
to start, because silently dropping a vote or a committed entry breaks Raft's safety. That
includes the last entry, even past the stored commit index: the commit index is stored only
with log writes, so it may lag an entry this member acknowledged and a majority committed; and
an LMDB commit is atomic, so a crash never tears a record, and a bad one means the disk is bad.

Every ``save`` is one LMDB write transaction opened with ``sync=True`` (and meta-sync): the batch
is durable when ``save`` returns. LMDB flushes its data pages and then its meta page, which is
what makes the commit atomic on a crash; we measured ``sync=False`` plus ``env.sync()`` at about
1.3x the rate, but it lets the meta page reach the disk before the pages it points to.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import crc32c
import lmdb
import msgpack
from attrs import frozen
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import Interface, implementer

from dogfs.raft.core import (
    Configuration,
    Entry,
    EntryKind,
    HardState,
    Snapshot,
    SnapshotMeta,
)
from dogfs.wire.packing import packb

__all__ = [
    "IRaftStorage",
    "LoadedState",
    "LMDBRaftStorage",
    "MemoryRaftStorage",
    "RaftStorageCorruption",
    "RaftStorageError",
    "config_from",
]

_log = Logger()

_FORMAT_VERSION = 1
_KEY_HARD_STATE = b"hard_state"
_KEY_SNAPSHOT_META = b"snapshot_meta"
_KEY_FORMAT = b"format"
_KEY_SNAPSHOT_DATA = b"data"
_CRC = struct.Struct(">I")
_INDEX = struct.Struct(">Q")
_PART = struct.Struct(">I")
_PART_PREFIX = b"p"
#: Bytes of snapshot data per LMDB record: a snapshot staged ahead of its ``save``
#: (``snapshot_writes``) takes one write transaction per part, and log writes go in between.
SNAPSHOT_PART_BYTES = 8 << 20


class RaftStorageError(Exception):
    """The Raft storage cannot do what was asked (misuse, such as a gap in the log)."""


class RaftStorageCorruption(RaftStorageError):
    """The stored Raft state is corrupt in a way that cannot be repaired safely.

    Raised at start-up: the node refuses to run rather than forget a vote or a committed entry.
    """


@frozen
class LoadedState:
    """What a Raft member restarts from.

    ``entries`` follow the snapshot (if any) contiguously. ``config`` is the membership in force
    at the end of the log as far as storage can tell (the snapshot's configuration, or None when
    there is no snapshot: the driver then uses its bootstrap configuration, and the core replays
    configuration entries found in ``entries``).
    """

    hard_state: HardState
    snapshot: SnapshotMeta | None
    entries: list[Entry]
    config: Configuration | None


class IRaftStorage(Interface):
    """Durable storage of one Raft member: hard state, log and latest snapshot.

    Implementations may also have ``close()``; the driver calls it when it stops.
    """

    def load() -> LoadedState:  # type: ignore[misc,empty-body]
        """Read (and verify) the stored state; called once, before the node is built."""

    def save(
        hard_state: HardState | None, entries: Sequence[Entry], snapshot: Snapshot | None
    ) -> None:
        """Make one batch durable with a single sync, in this order: snapshot, entries, state.

        A snapshot replaces the log up to its index. If ``entries[0].index`` is at or below the
        last stored index, the stored log is truncated from there first.
        """

    def snapshot_data() -> Snapshot | None:  # type: ignore[misc,empty-body]
        """The latest stored snapshot with its data, or None."""


def config_from(snapshot: SnapshotMeta | None) -> Configuration | None:
    """The configuration recorded in a snapshot, if there is one."""
    return None if snapshot is None else snapshot.config


# --- record codec ---------------------------------------------------------------------------


def _seal(obj: Any) -> bytes:
    payload = packb(obj)
    return _CRC.pack(crc32c.crc32c(payload)) + payload


def _open(value: bytes, what: str) -> Any:
    """Verify and decode a record; raise RaftStorageCorruption naming ``what`` if it is bad."""
    if len(value) < _CRC.size:
        raise RaftStorageCorruption(f"{what}: record of {len(value)} bytes is truncated")
    (expected,) = _CRC.unpack_from(value)
    payload = bytes(value[_CRC.size :])
    if crc32c.crc32c(payload) != expected:
        raise RaftStorageCorruption(f"{what}: checksum mismatch")
    try:
        return msgpack.unpackb(payload, raw=False)
    except Exception as e:
        raise RaftStorageCorruption(f"{what}: undecodable record ({e})") from e


def _encode_entry(entry: Entry) -> bytes:
    return _seal([entry.index, entry.term, int(entry.kind), entry.data])


def _decode_entry(key: bytes, value: bytes) -> Entry:
    (index,) = _INDEX.unpack(key)
    what = f"log entry {index}"
    obj = _open(value, what)
    try:
        stored_index, term, kind, data = obj
        entry = Entry(term=int(term), index=int(stored_index), kind=EntryKind(kind), data=bytes(data))
    except Exception as e:
        raise RaftStorageCorruption(f"{what}: malformed record ({e})") from e
    if entry.index != index:
        raise RaftStorageCorruption(f"{what}: record claims index {entry.index}")
    return entry


def _encode_hard_state(hs: HardState) -> bytes:
    return _seal([hs.term, hs.vote, hs.commit])


def _decode_hard_state(value: bytes) -> HardState:
    obj = _open(value, "hard state")
    try:
        term, vote, commit = obj
        return HardState(term=int(term), vote=None if vote is None else str(vote), commit=int(commit))
    except Exception as e:
        raise RaftStorageCorruption(f"hard state: malformed record ({e})") from e


def _encode_config(config: Configuration) -> list[list[str]]:
    return [sorted(config.voters), sorted(config.learners)]


def _decode_config(obj: Any) -> Configuration:
    voters, learners = obj
    return Configuration(voters=frozenset(map(str, voters)), learners=frozenset(map(str, learners)))


def _encode_snapshot_meta(meta: SnapshotMeta, length: int, crc: int) -> bytes:
    # The data's length and checksum live in the meta record too, so a meta/data mismatch
    # (one written without the other) is caught as well as a corrupt data record. The data
    # is in _parts(length) records of SNAPSHOT_PART_BYTES (the last one shorter).
    return _seal([meta.index, meta.term, _encode_config(meta.config), length, crc, _parts(length)])


def _decode_snapshot_meta(value: bytes) -> tuple[SnapshotMeta, int, int, int | None]:
    """Meta, data length and checksum, and the number of parts (None: the data is one
    sealed record, as storage wrote it before snapshots were written in parts)."""
    obj = _open(value, "snapshot metadata")
    try:
        index, term, config, length, crc, *parts = obj
        if len(parts) > 1:
            raise ValueError(f"{len(obj)} fields")
        meta = SnapshotMeta(index=int(index), term=int(term), config=_decode_config(config))
        return meta, int(length), int(crc), int(parts[0]) if parts else None
    except Exception as e:
        raise RaftStorageCorruption(f"snapshot metadata: malformed record ({e})") from e


def _parts(length: int) -> int:
    return -(-length // SNAPSHOT_PART_BYTES)


def _part_key(index: int, part: int) -> bytes:
    return _PART_PREFIX + _INDEX.pack(index) + _PART.pack(part)


def _put_part(txn: Any, db: Any, index: int, data: memoryview, part: int) -> None:
    """Write part ``part`` of snapshot ``index``'s ``data``."""
    at = part * SNAPSHOT_PART_BYTES
    txn.put(_part_key(index, part), data[at : at + SNAPSHOT_PART_BYTES], db=db)


# --- LMDB implementation ---------------------------------------------------------------------


def _open_env(path: str, map_size: int) -> lmdb.Environment:
    env = lmdb.open(
        path,
        map_size=map_size,
        max_dbs=4,
        subdir=True,
        sync=True,
        metasync=True,
        # One writer thread (the driver's pool) and readers on the reactor thread.
        lock=True,
        readahead=False,
        # The log holds the metadata's commands, and snapshots its block key.
        mode=0o600,
    )
    for name in ("data.mdb", "lock.mdb"):  # made by a release that left them to the umask
        os.chmod(os.path.join(path, name), 0o600)
    return env


@implementer(IRaftStorage)
class LMDBRaftStorage:
    """``IRaftStorage`` in an LMDB environment under ``path`` (a directory, created if absent).

    The environment is opened lazily by ``load`` (call it from ``startService``: LMDB must not
    cross twistd's fork) and released by ``close``. ``save`` may run in a worker thread, one at a
    time; ``snapshot_data`` may run concurrently from another thread.
    """

    def __init__(
        self,
        path: FilePath[str] | str,
        map_size: int = 1 << 30,
        *,
        env_factory: Callable[[str, int], Any] = _open_env,
    ) -> None:
        self._path = path.path if isinstance(path, FilePath) else str(path)
        self._map_size = map_size
        self._env_factory = env_factory
        self._env: Any = None
        self._db_log: Any = None
        self._db_meta: Any = None
        self._db_snap: Any = None
        self._first_index = 1  # first index that may be in the log (snapshot index + 1)
        self._last_index = 0  # last stored index (snapshot index when the log is empty)
        self._last_term = 0
        self._snapshot_meta: SnapshotMeta | None = None
        # (index, data, crc) of the snapshot whose parts snapshot_writes wrote last, and the
        # token of the staging under way (a save of any snapshot voids both).
        self._staged: tuple[int, bytes, int] | None = None
        self._staging: object | None = None
        #: Number of durable write transactions (one per ``save``), for tests and metrics.
        self.commits = 0

    @property
    def path(self) -> str:
        """The LMDB directory."""
        return self._path

    def _ensure_open(self) -> None:
        if self._env is None:
            os.makedirs(self._path, exist_ok=True)
            self._env = self._env_factory(self._path, self._map_size)
            self._db_log = self._env.open_db(b"log")
            self._db_meta = self._env.open_db(b"meta")
            self._db_snap = self._env.open_db(b"snap")

    def close(self) -> None:
        """Release the environment; ``load`` reopens it."""
        if self._env is not None:
            self._env.close()
            self._env = None

    # load -------------------------------------------------------------------------------

    def load(self) -> LoadedState:
        """Verify and read everything; truncate a corrupt tail entry, refuse other corruption."""
        self._ensure_open()
        with self._env.begin(write=False) as txn:
            fmt = txn.get(_KEY_FORMAT, db=self._db_meta)
            if fmt is not None:
                version = _open(fmt, "format marker")
                if version != _FORMAT_VERSION:
                    raise RaftStorageError(
                        f"{self._path}: Raft storage format {version!r} is not supported"
                    )
            raw_hs = txn.get(_KEY_HARD_STATE, db=self._db_meta)
            hard_state = (
                HardState(term=0, vote=None, commit=0)
                if raw_hs is None
                else _decode_hard_state(raw_hs)
            )
            raw_meta = txn.get(_KEY_SNAPSHOT_META, db=self._db_meta)
            snapshot_meta: SnapshotMeta | None = None
            if raw_meta is not None:
                snapshot_meta = self._read_snapshot(txn, raw_meta).meta
            raw_log = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self._db_log)]
        entries = self._verify_log(raw_log, snapshot_meta, hard_state)
        base_index = snapshot_meta.index if snapshot_meta else 0
        base_term = snapshot_meta.term if snapshot_meta else 0
        self._snapshot_meta = snapshot_meta
        self._first_index = base_index + 1
        self._last_index = entries[-1].index if entries else base_index
        self._last_term = entries[-1].term if entries else base_term
        return LoadedState(
            hard_state=hard_state,
            snapshot=snapshot_meta,
            entries=entries,
            config=config_from(snapshot_meta),
        )

    def _verify_log(
        self,
        raw: list[tuple[bytes, bytes]],
        snapshot: SnapshotMeta | None,
        hard_state: HardState,
    ) -> list[Entry]:
        entries: list[Entry] = []
        prev_index = snapshot.index if snapshot else 0
        prev_term = snapshot.term if snapshot else 0
        for key, value in raw:
            try:
                if len(key) != _INDEX.size:
                    raise RaftStorageCorruption(f"log key {key!r} is malformed")
                entry = _decode_entry(key, value)
                if entry.index != prev_index + 1:
                    raise RaftStorageCorruption(
                        f"log entry {entry.index} follows {prev_index}: the log has a gap"
                    )
                if entry.term < prev_term:
                    raise RaftStorageCorruption(
                        f"log entry {entry.index} has term {entry.term} below {prev_term}"
                    )
            except RaftStorageCorruption as e:
                raise RaftStorageCorruption(
                    f"Raft storage {self._path}: {e}; refusing to start (this member may have "
                    f"acknowledged the entry, so dropping it could lose a committed write: "
                    f"remove the member and add it back with an empty data directory)"
                ) from e
            entries.append(entry)
            prev_index, prev_term = entry.index, entry.term
        last = entries[-1].index if entries else (snapshot.index if snapshot else 0)
        if hard_state.commit > last:
            raise RaftStorageCorruption(
                f"Raft storage {self._path}: commit index {hard_state.commit} is beyond the "
                f"last stored entry {last}; refusing to start"
            )
        return entries

    # save -------------------------------------------------------------------------------

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
    ) -> None:
        """One durable batch: a single LMDB write transaction, synced on commit."""
        if hard_state is None and not entries and snapshot is None:
            return
        self._ensure_open()
        self._grown(partial(self._save, hard_state, entries, snapshot))

    def _grown(self, write: Callable[[], None]) -> None:
        """Run ``write`` (one write transaction), growing the map while it is full."""
        for _attempt in range(16):
            try:
                write()
                return
            except lmdb.MapFullError:
                # The aborted transaction left nothing behind: grow the map and write again.
                self._map_size *= 2
                _log.warn(
                    "Raft storage {path}: map full, growing it to {size} bytes",
                    path=self._path,
                    size=self._map_size,
                )
                self._env.set_mapsize(self._map_size)
        raise RaftStorageError(f"Raft storage {self._path}: cannot grow the LMDB map enough")

    def _save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
    ) -> None:
        first, last, last_term = self._first_index, self._last_index, self._last_term
        snap_meta = self._snapshot_meta
        with self._env.begin(write=True) as txn:
            if self._snapshot_meta is None and txn.get(_KEY_FORMAT, db=self._db_meta) is None:
                txn.put(_KEY_FORMAT, _seal(_FORMAT_VERSION), db=self._db_meta)
            if snapshot is not None:
                first, last, last_term = self._put_snapshot(txn, snapshot, first, last)
                snap_meta = snapshot.meta
            if entries:
                last, last_term = self._put_entries(txn, entries, first, last, last_term)
            if hard_state is not None:
                txn.put(_KEY_HARD_STATE, _encode_hard_state(hard_state), db=self._db_meta)
        # Only after a successful commit does the in-memory view move.
        self.commits += 1
        self._first_index, self._last_index, self._last_term = first, last, last_term
        self._snapshot_meta = snap_meta

    def _put_snapshot(self, txn: Any, snapshot: Snapshot, first: int, last: int) -> tuple[int, int, int]:
        meta = snapshot.meta
        # Whatever happens below, staging in progress is over: its remaining parts are not
        # written, and what it staged is used only by this save (see snapshot_writes).
        staged, self._staged, self._staging = self._staged, None, None
        if self._snapshot_meta is not None and meta.index < self._snapshot_meta.index:
            raise RaftStorageError(
                f"snapshot at {meta.index} is older than the stored one at "
                f"{self._snapshot_meta.index}"
            )
        data, parts = snapshot.data, _parts(len(snapshot.data))
        if staged is not None and staged[0] == meta.index and staged[1] is data:
            crc = staged[2]  # snapshot_writes wrote the parts already
        else:
            crc, view = crc32c.crc32c(data), memoryview(data)
            for part in range(parts):
                _put_part(txn, self._db_snap, meta.index, view, part)
        txn.put(_KEY_SNAPSHOT_META, _encode_snapshot_meta(meta, len(data), crc), db=self._db_meta)
        # Only this snapshot's parts stay: not earlier snapshots', nor parts staged by a run
        # that stopped before their save, nor the single record older versions wrote.
        txn.delete(_KEY_SNAPSHOT_DATA, db=self._db_snap)
        mine = {_part_key(meta.index, part) for part in range(parts)}
        cursor = txn.cursor(db=self._db_snap)
        if cursor.set_range(_PART_PREFIX):
            while cursor.key()[:1] == _PART_PREFIX:
                moved = cursor.next() if cursor.key() in mine else cursor.delete()
                if not moved:
                    break
        # Keep the log after the snapshot only if it agrees with it (compaction of our own log);
        # otherwise the snapshot replaces the whole log, as etcd's ApplySnapshot does.
        at = txn.get(_INDEX.pack(meta.index), db=self._db_log)
        keep = at is not None and _decode_entry(_INDEX.pack(meta.index), at).term == meta.term
        upto = meta.index if keep else max(last, meta.index)
        self._delete_range(txn, first, upto)
        if keep and last > meta.index:
            return meta.index + 1, last, self._last_term
        return meta.index + 1, meta.index, meta.term

    def _put_entries(
        self, txn: Any, entries: Sequence[Entry], first: int, last: int, last_term: int
    ) -> tuple[int, int]:
        if entries[0].index < first:
            # Entries the snapshot already covers: committed ones (a snapshot holds only
            # applied entries), so the same as what it holds. The core may hand them over again
            # when a batch it was writing was cut short by a new leader while a snapshot of its
            # committed prefix was taken; writing them would put them under the snapshot.
            entries = [entry for entry in entries if entry.index >= first]
            if not entries:
                return last, last_term
        start = entries[0].index
        if start > last + 1:
            raise RaftStorageError(f"entry {start} would leave a gap after {last}")
        if start <= last:
            self._delete_range(txn, start, last)
        expected = start
        for entry in entries:
            if entry.index != expected:
                raise RaftStorageError(f"entries are not contiguous at {entry.index}")
            txn.put(_INDEX.pack(entry.index), _encode_entry(entry), db=self._db_log)
            expected += 1
        return entries[-1].index, entries[-1].term

    def _delete_range(self, txn: Any, lo: int, hi: int) -> None:
        """Delete log keys in [lo, hi]."""
        if hi < lo:
            return
        cursor = txn.cursor(db=self._db_log)
        if not cursor.set_range(_INDEX.pack(lo)):
            return
        hi_key = _INDEX.pack(hi)
        while cursor.key() and cursor.key() <= hi_key:
            if not cursor.delete():
                break

    # snapshot ---------------------------------------------------------------------------

    def snapshot_data(self) -> Snapshot | None:
        """The latest snapshot with its state machine bytes, verified, or None."""
        self._ensure_open()
        with self._env.begin(write=False) as txn:
            raw_meta = txn.get(_KEY_SNAPSHOT_META, db=self._db_meta)
            if raw_meta is None:
                return None
            return self._read_snapshot(txn, raw_meta)

    def _read_snapshot(self, txn: Any, raw_meta: bytes) -> Snapshot:
        meta, length, crc, parts = _decode_snapshot_meta(raw_meta)
        data: Any
        if parts is None:
            raw_data = txn.get(_KEY_SNAPSHOT_DATA, db=self._db_snap)
            if raw_data is None:
                raise RaftStorageCorruption("snapshot data: missing")
            data = _open(raw_data, "snapshot data")
        else:
            pieces = []
            for part in range(parts):
                piece = txn.get(_part_key(meta.index, part), db=self._db_snap)
                if piece is None:
                    raise RaftStorageCorruption(f"snapshot data: part {part} of {parts} is missing")
                pieces.append(piece)
            data = b"".join(pieces)
        if not isinstance(data, bytes) or len(data) != length or crc32c.crc32c(data) != crc:
            raise RaftStorageCorruption("snapshot data: does not match its metadata")
        return Snapshot(meta=meta, data=data)

    def snapshot_writes(self, snapshot: Snapshot) -> list[Callable[[], None]]:
        """Writes that store ``snapshot``'s data ahead of ``save(None, [], snapshot)``.

        One LMDB write transaction per part (SNAPSHOT_PART_BYTES), to run in order on the
        thread ``save`` runs on, each queued after the one before has finished: log writes
        go in between, so a large snapshot never holds the log (a leader's heartbeats, a
        follower's acknowledgements) up for longer than one part. The ``save`` that follows
        then writes only the metadata and compacts the log. Parts whose ``save`` never comes
        (a crash, a newer snapshot first) are removed by the next snapshot's.
        """
        index, data = snapshot.meta.index, snapshot.data
        parts = _parts(len(data))
        view = memoryview(data)
        token = object()

        def write(part: int) -> None:
            def put() -> None:
                with self._env.begin(write=True) as txn:
                    _put_part(txn, self._db_snap, index, view, part)

            self._ensure_open()
            if part == 0:
                self._staged, self._staging = None, token
            elif self._staging is not token:
                return  # a snapshot was saved meanwhile: this staging is void
            self._grown(put)
            if part == parts - 1:
                self._staged = (index, data, crc32c.crc32c(data))

        return [partial(write, part) for part in range(parts)]


# --- in-memory implementation (unit tests) ---------------------------------------------------


@implementer(IRaftStorage)
class MemoryRaftStorage:
    """``IRaftStorage`` in memory, with the same truncation and snapshot rules as LMDB."""

    def __init__(self) -> None:
        self.hard_state = HardState(term=0, vote=None, commit=0)
        self.entries: list[Entry] = []
        self.snapshot: Snapshot | None = None
        #: Number of ``save`` batches that wrote something.
        self.commits = 0

    def load(self) -> LoadedState:
        """The current state, as a restart would see it."""
        meta = self.snapshot.meta if self.snapshot else None
        return LoadedState(
            hard_state=self.hard_state,
            snapshot=meta,
            entries=list(self.entries),
            config=config_from(meta),
        )

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
    ) -> None:
        """Apply one batch."""
        if hard_state is None and not entries and snapshot is None:
            return
        if snapshot is not None:
            idx = snapshot.meta.index
            kept = [e for e in self.entries if e.index > idx]
            at = [e for e in self.entries if e.index == idx]
            self.entries = kept if at and at[0].term == snapshot.meta.term else []
            self.snapshot = snapshot
        base = self.snapshot.meta.index if self.snapshot else 0
        entries = [e for e in entries if e.index > base]  # the snapshot's already (see LMDB)
        if entries:
            start = entries[0].index
            self.entries = [e for e in self.entries if e.index < start]
            last = self.entries[-1].index if self.entries else base
            if start > last + 1:
                raise RaftStorageError(f"entry {start} would leave a gap after {last}")
            self.entries.extend(entries)
        if hard_state is not None:
            self.hard_state = hard_state
        self.commits += 1

    def snapshot_data(self) -> Snapshot | None:
        """The latest snapshot, or None."""
        return self.snapshot

