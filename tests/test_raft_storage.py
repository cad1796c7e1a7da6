# -*- test-case-name: tests.test_raft_storage -*-
"""Tests for dogfs.raft.storage: the LMDB log, hard state and snapshot store."""

from __future__ import annotations

import struct
from typing import Any

import lmdb
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import capturedLogs, formatEvent
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dogfs.raft.core import Configuration, Entry, EntryKind, HardState, Snapshot, SnapshotMeta
from dogfs.raft.storage import (
    IRaftStorage,
    LMDBRaftStorage,
    MemoryRaftStorage,
    RaftStorageCorruption,
    RaftStorageError,
)

CONFIG = Configuration(voters=frozenset({"a", "b", "c"}), learners=frozenset({"d"}))


def entries(lo: int, hi: int, term: int = 1) -> list[Entry]:
    """Entries lo..hi inclusive in ``term``."""
    return [
        Entry(term=term, index=i, kind=EntryKind.NORMAL, data=b"cmd-%d" % i) for i in range(lo, hi + 1)
    ]


class CountingTxn:
    """A write transaction that counts the bytes put into it (on its environment)."""

    def __init__(self, env: CountingEnv, txn: Any) -> None:
        self._env = env
        self._txn = txn

    def put(self, key: bytes, value: Any, *args: Any, **kwargs: Any) -> Any:
        self._env.put_bytes += len(value)
        return self._txn.put(key, value, *args, **kwargs)

    def __enter__(self) -> CountingTxn:
        self._txn.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._txn.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)


class CountingEnv:
    """Wraps an LMDB environment and counts durable write transactions and explicit syncs."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.write_txns = 0
        self.syncs = 0
        self.put_bytes = 0

    def begin(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("write"):
            self.write_txns += 1
            return CountingTxn(self, self.env.begin(*args, **kwargs))
        return self.env.begin(*args, **kwargs)

    def sync(self, force: bool = False) -> None:
        self.syncs += 1
        self.env.sync(force)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)


class LMDBRaftStorageTests(SynchronousTestCase):
    """The LMDB storage keeps what it was given, checks it, and repairs only a torn tail."""

    def setUp(self) -> None:
        self.dir = FilePath(self.mktemp())
        self.envs: list[CountingEnv] = []

    def open(self) -> LMDBRaftStorage:
        """A storage on ``self.dir`` whose environment is counted."""

        def factory(path: str, map_size: int) -> CountingEnv:
            env = CountingEnv(lmdb.open(path, map_size=map_size, max_dbs=4, sync=True))
            self.envs.append(env)
            return env

        storage = LMDBRaftStorage(self.dir, map_size=1 << 24, env_factory=factory)
        self.addCleanup(storage.close)
        return storage

    def raw_put(self, db: bytes, key: bytes, value: bytes) -> None:
        """Write bytes into the environment directly, behind the storage's back."""
        env = lmdb.open(self.dir.path, max_dbs=4, map_size=1 << 24)
        try:
            handle = env.open_db(db)
            with env.begin(write=True, db=handle) as txn:
                txn.put(key, value)
        finally:
            env.close()

    def raw_get(self, db: bytes, key: bytes) -> bytes:
        """Read bytes from the environment directly."""
        env = lmdb.open(self.dir.path, max_dbs=4, map_size=1 << 24)
        try:
            handle = env.open_db(db)
            with env.begin(db=handle) as txn:
                value = txn.get(key)
                assert value is not None
                return bytes(value)
        finally:
            env.close()

    def test_interface(self) -> None:
        """Both implementations provide IRaftStorage."""
        self.assertTrue(verifyObject(IRaftStorage, LMDBRaftStorage(self.dir)))
        self.assertTrue(verifyObject(IRaftStorage, MemoryRaftStorage()))

    def test_no_env_until_load(self) -> None:
        """Constructing the storage does not open LMDB (it must not cross twistd's fork)."""
        LMDBRaftStorage(self.dir)
        self.assertFalse(self.dir.exists())

    def test_empty(self) -> None:
        """A fresh directory loads as term 0, no vote, no log, no snapshot."""
        state = self.open().load()
        self.assertEqual(state.hard_state, HardState(term=0, vote=None, commit=0))
        self.assertEqual((state.entries, state.snapshot, state.config), ([], None, None))

    def test_roundtrip_and_restart(self) -> None:
        """Hard state and entries survive closing and reopening the environment."""
        s = self.open()
        s.load()
        s.save(HardState(term=3, vote="b", commit=2), entries(1, 5, term=3), None)
        s.close()
        state = self.open().load()
        self.assertEqual(state.hard_state, HardState(term=3, vote="b", commit=2))
        self.assertEqual(state.entries, entries(1, 5, term=3))

    def test_one_write_transaction_per_save(self) -> None:
        """A batch of hard state plus many entries is one LMDB write transaction (one sync)."""
        s = self.open()
        s.load()
        env = self.envs[-1]
        before = env.write_txns
        s.save(HardState(term=1, vote="a", commit=0), entries(1, 200), None)
        s.save(HardState(term=1, vote="a", commit=200), [], None)
        self.assertEqual(env.write_txns - before, 2)
        self.assertEqual(env.syncs, 0)  # the sync is the commit's own (sync=True)
        self.assertEqual(s.commits, 2)

    def test_truncate_conflicting_suffix(self) -> None:
        """Entries starting at or below the last index replace the stored suffix."""
        s = self.open()
        s.load()
        s.save(None, entries(1, 10, term=1), None)
        s.save(None, entries(6, 7, term=2), None)
        s.close()
        self.assertEqual(self.open().load().entries, entries(1, 5) + entries(6, 7, term=2))

    def test_gap_refused(self) -> None:
        """Entries that would leave a hole in the log are refused and nothing is written."""
        s = self.open()
        s.load()
        s.save(None, entries(1, 3), None)
        self.assertRaises(RaftStorageError, s.save, HardState(5, "a", 0), entries(5, 6), None)
        s.close()
        state = self.open().load()
        self.assertEqual(state.entries, entries(1, 3))
        self.assertEqual(state.hard_state.term, 0)

    def test_snapshot_compacts(self) -> None:
        """A snapshot matching the log drops entries up to it and keeps the rest."""
        s = self.open()
        s.load()
        s.save(HardState(2, "a", 8), entries(1, 10, term=2), None)
        snap = Snapshot(meta=SnapshotMeta(index=6, term=2, config=CONFIG), data=b"state@6")
        s.save(None, [], snap)
        s.close()
        s = self.open()
        state = s.load()
        self.assertEqual(state.snapshot, snap.meta)
        self.assertEqual(state.config, CONFIG)
        self.assertEqual(state.entries, entries(7, 10, term=2))
        self.assertEqual(s.snapshot_data(), snap)

    def test_snapshot_replaces_divergent_log(self) -> None:
        """A snapshot that disagrees with the log (a follower catching up) replaces it all."""
        s = self.open()
        s.load()
        s.save(HardState(1, "a", 0), entries(1, 10, term=1), None)
        snap = Snapshot(meta=SnapshotMeta(index=20, term=4, config=CONFIG), data=b"s")
        s.save(HardState(4, None, 20), entries(21, 22, term=4), snap)
        s.close()
        state = self.open().load()
        self.assertEqual(state.entries, entries(21, 22, term=4))
        self.assertEqual(state.hard_state, HardState(4, None, 20))

    def test_entries_under_the_snapshot_are_skipped(self) -> None:
        """A batch that starts at or below the stored snapshot (entries the core handed over
        again after a snapshot of its committed prefix) keeps only what follows the snapshot:
        the member goes on instead of halting."""
        for s in (self.open(), MemoryRaftStorage()):
            s.load()
            s.save(HardState(1, "a", 0), entries(1, 10, term=1), None)
            snap = Snapshot(meta=SnapshotMeta(index=8, term=1, config=CONFIG), data=b"s")
            s.save(HardState(2, None, 8), [], snap)
            s.save(None, entries(5, 8, term=1) + entries(9, 9, term=2), None)
            self.assertEqual(s.load().entries, entries(9, 9, term=2))
            s.save(None, entries(5, 7, term=1), None)  # wholly under the snapshot: nothing
            self.assertEqual(s.load().entries, entries(9, 9, term=2))
            if isinstance(s, LMDBRaftStorage):
                s.close()

    def test_corrupt_tail_refused(self) -> None:
        """A corrupt last entry refuses to start even past the stored commit index: that index
        may lag an entry this member acknowledged and a majority committed (dropping it could
        lose an acknowledged write), and an LMDB commit never tears a record."""
        s = self.open()
        s.load()
        s.save(HardState(1, "a", 3), entries(1, 5), None)
        s.close()
        key = struct.pack(">Q", 5)
        value = bytearray(self.raw_get(b"log", key))
        value[-1] ^= 0xFF
        self.raw_put(b"log", key, bytes(value))
        refused = self.open()
        e = self.assertRaises(RaftStorageCorruption, refused.load)
        refused.close()
        self.assertIn("log entry 5", str(e))
        self.assertIn("refusing to start", str(e))
        # Nothing was dropped: the record is still there for an operator to look at.
        self.assertEqual(self.raw_get(b"log", key), bytes(value))

    def test_corrupt_committed_tail_refused(self) -> None:
        """A corrupt last entry at or below the commit index refuses to start."""
        s = self.open()
        s.load()
        s.save(HardState(1, "a", 5), entries(1, 5), None)
        s.close()
        self.raw_put(b"log", struct.pack(">Q", 5), b"\x00\x01garbage")
        e = self.assertRaises(RaftStorageCorruption, self.open().load)
        self.assertIn("log entry 5", str(e))

    def test_corrupt_middle_refused(self) -> None:
        """Corruption before the tail is a hard error naming the entry."""
        s = self.open()
        s.load()
        s.save(HardState(1, "a", 0), entries(1, 5), None)
        s.close()
        key = struct.pack(">Q", 3)
        value = bytearray(self.raw_get(b"log", key))
        value[6] ^= 0x01
        self.raw_put(b"log", key, bytes(value))
        e = self.assertRaises(RaftStorageCorruption, self.open().load)
        self.assertIn("log entry 3", str(e))
        self.assertIn("refusing to start", str(e))

    def test_corrupt_hard_state_refused(self) -> None:
        """A corrupt hard state (term and vote) refuses to start rather than forget a vote."""
        s = self.open()
        s.load()
        s.save(HardState(7, "c", 0), [], None)
        s.close()
        value = bytearray(self.raw_get(b"meta", b"hard_state"))
        value[-1] ^= 0x10
        self.raw_put(b"meta", b"hard_state", bytes(value))
        e = self.assertRaises(RaftStorageCorruption, self.open().load)
        self.assertIn("hard state", str(e))

    def test_corrupt_snapshot_refused(self) -> None:
        """Corrupt snapshot data is detected at load."""
        s = self.open()
        s.load()
        s.save(HardState(1, "a", 1), entries(1, 1), None)
        s.save(None, [], Snapshot(meta=SnapshotMeta(1, 1, CONFIG), data=b"abcdef"))
        s.close()
        key = b"p" + struct.pack(">QI", 1, 0)
        value = bytearray(self.raw_get(b"snap", key))
        value[-2] ^= 0x01
        self.raw_put(b"snap", key, bytes(value))
        self.assertRaises(RaftStorageCorruption, self.open().load)

    def small_parts(self, size: int = 4) -> None:
        import dogfs.raft.storage as module

        self.patch(module, "SNAPSHOT_PART_BYTES", size)

    def part_keys(self) -> list[bytes]:
        env = lmdb.open(self.dir.path, max_dbs=4, map_size=1 << 24)
        try:
            with env.begin(db=env.open_db(b"snap")) as txn:
                return [bytes(k) for k, _ in txn.cursor()]
        finally:
            env.close()

    def test_snapshot_in_parts(self) -> None:
        """Snapshot data is kept in parts: read back whole, a missing part is corruption."""
        self.small_parts()
        s = self.open()
        s.load()
        s.save(HardState(1, "a", 1), entries(1, 3), None)
        s.save(None, [], Snapshot(meta=SnapshotMeta(2, 1, CONFIG), data=b"0123456789"))
        self.assertEqual(s.snapshot_data(), Snapshot(meta=SnapshotMeta(2, 1, CONFIG), data=b"0123456789"))
        s.close()
        self.assertEqual(self.part_keys(), [b"p" + struct.pack(">QI", 2, n) for n in range(3)])
        s = self.open()
        self.assertEqual([e.index for e in s.load().entries], [3])
        s.close()
        env = lmdb.open(self.dir.path, max_dbs=4, map_size=1 << 24)
        with env.begin(write=True, db=env.open_db(b"snap")) as txn:
            txn.delete(b"p" + struct.pack(">QI", 2, 1))
        env.close()
        e = self.assertRaises(RaftStorageCorruption, self.open().load)
        self.assertIn("part 1 of 3 is missing", str(e))

    def test_staged_snapshot(self) -> None:
        """snapshot_writes writes the parts one transaction each, log writes may go between
        them, and the save that follows writes only the metadata (and compacts)."""
        self.small_parts(128)
        s = self.open()
        s.load()
        s.save(HardState(1, "a", 2), entries(1, 2), None)
        snapshot = Snapshot(meta=SnapshotMeta(2, 1, CONFIG), data=bytes(range(256)) + b"tail")
        jobs = s.snapshot_writes(snapshot)
        self.assertEqual(len(jobs), 3)
        env = self.envs[-1]
        commits = env.write_txns
        jobs[0]()
        s.save(None, entries(3, 3), None)  # the log goes on between parts
        jobs[1]()
        jobs[2]()
        self.assertEqual(env.write_txns, commits + 4)
        self.assertIsNone(s.snapshot_data())  # staged parts are not a snapshot yet
        before = env.put_bytes
        s.save(None, [], snapshot)
        self.assertLess(env.put_bytes - before, len(snapshot.data))  # the metadata only
        self.assertEqual(s.snapshot_data(), snapshot)
        s.close()
        s = self.open()
        state = s.load()
        self.assertEqual(state.snapshot, snapshot.meta)
        self.assertEqual([e.index for e in state.entries], [3])
        # Data that was not staged (even equal, another object) is written whole.
        env = self.envs[-1]
        before = env.put_bytes
        later = Snapshot(meta=SnapshotMeta(3, 1, CONFIG), data=bytes(bytearray(snapshot.data)))
        s.save(None, [], later)
        self.assertGreaterEqual(env.put_bytes - before, len(snapshot.data))
        self.assertEqual(s.snapshot_data(), later)

    def test_snapshot_saved_while_staging_voids_it(self) -> None:
        """A snapshot saved while another is being staged (a leader's, installed meanwhile)
        voids the staging: its remaining parts are not written over the saved one's, so what
        is stored reads back whole, never parts of two snapshots."""
        self.small_parts()
        s = self.open()
        s.load()
        s.save(HardState(1, "a", 4), entries(1, 4), None)
        staged = Snapshot(meta=SnapshotMeta(3, 1, CONFIG), data=b"staged snapshot")
        jobs = s.snapshot_writes(staged)
        jobs[0]()
        other = Snapshot(meta=SnapshotMeta(3, 1, CONFIG), data=b"the other one, longer")
        s.save(None, [], other)
        for job in jobs[1:]:
            job()
        self.assertEqual(s.snapshot_data(), other)
        s.close()
        s = self.open()
        self.assertEqual(s.load().snapshot, other.meta)
        self.assertEqual(s.snapshot_data(), other)
        # The next snapshot, staged undisturbed, is used as staged.
        later = Snapshot(meta=SnapshotMeta(4, 1, CONFIG), data=b"the next snapshot")
        for job in s.snapshot_writes(later):
            job()
        s.save(None, [], later)
        self.assertEqual(s.snapshot_data(), later)

    def test_orphan_parts_removed(self) -> None:
        """Parts staged for a snapshot whose save never came (a crash) are not read, and the
        next snapshot removes them with the earlier snapshot's parts."""
        self.small_parts()
        s = self.open()
        s.load()
        s.save(HardState(1, "a", 6), entries(1, 6), None)
        s.save(None, [], Snapshot(meta=SnapshotMeta(2, 1, CONFIG), data=b"first"))
        for job in s.snapshot_writes(Snapshot(meta=SnapshotMeta(4, 1, CONFIG), data=b"never saved")):
            job()
        s.close()
        s = self.open()
        self.assertEqual(s.load().snapshot, SnapshotMeta(2, 1, CONFIG))
        self.assertEqual(s.snapshot_data().data, b"first")  # type: ignore[union-attr]
        s.save(None, [], Snapshot(meta=SnapshotMeta(5, 1, CONFIG), data=b"third"))
        s.close()
        self.assertEqual(self.part_keys(), [b"p" + struct.pack(">QI", 5, n) for n in range(2)])
        self.assertEqual(self.open().snapshot_data().data, b"third")  # type: ignore[union-attr]

    def test_snapshot_of_earlier_versions_read(self) -> None:
        """A snapshot stored as one record (before parts) loads, and the next one replaces it."""
        s = self.open()
        s.load()
        s.save(HardState(1, "a", 4), entries(1, 4), None)
        s.save(None, [], Snapshot(meta=SnapshotMeta(2, 1, CONFIG), data=b"x"))
        s.close()
        import crc32c
        import msgpack

        def sealed(obj: Any) -> bytes:
            payload = msgpack.packb(obj, use_bin_type=True)
            return struct.pack(">I", crc32c.crc32c(payload)) + payload

        data = b"old format"
        env = lmdb.open(self.dir.path, max_dbs=4, map_size=1 << 24)
        with env.begin(write=True) as txn:
            meta = [2, 1, [["a", "b", "c"], ["d"]], len(data), crc32c.crc32c(data)]
            txn.put(b"snapshot_meta", sealed(meta), db=env.open_db(b"meta", txn=txn))
            snap = env.open_db(b"snap", txn=txn)
            txn.drop(snap, delete=False)
            txn.put(b"data", sealed(data), db=snap)
        env.close()
        s = self.open()
        self.assertEqual(s.load().snapshot, SnapshotMeta(2, 1, CONFIG))
        self.assertEqual(s.snapshot_data().data, data)  # type: ignore[union-attr]
        s.save(None, [], Snapshot(meta=SnapshotMeta(3, 1, CONFIG), data=b"new"))
        s.close()
        self.assertEqual(self.part_keys(), [b"p" + struct.pack(">QI", 3, 0)])
        s = self.open()
        self.assertEqual(s.snapshot_data().data, b"new")  # type: ignore[union-attr]

    def test_map_grows_when_full(self) -> None:
        """A batch larger than the LMDB map grows the map instead of failing."""
        s = LMDBRaftStorage(self.dir, map_size=1 << 20)
        self.addCleanup(s.close)
        s.load()
        big = [Entry(term=1, index=i, kind=EntryKind.NORMAL, data=b"x" * 4096) for i in range(1, 600)]
        with capturedLogs() as events:
            s.save(HardState(1, "a", 0), big, None)
        self.assertTrue(any("map full" in formatEvent(e) for e in events))
        s.close()
        self.assertEqual(len(LMDBRaftStorage(self.dir).load().entries), 599)

    def test_missing_first_entry_refused(self) -> None:
        """Without a snapshot the log must start at index 1: a missing head is corruption."""
        s = self.open()
        s.load()
        s.save(HardState(1, "a", 0), entries(1, 4), None)
        s.close()
        env = lmdb.open(self.dir.path, max_dbs=4, map_size=1 << 24)
        with env.begin(write=True, db=env.open_db(b"log")) as txn:
            txn.delete(struct.pack(">Q", 1))
        env.close()
        self.assertRaises(RaftStorageCorruption, self.open().load)

    def test_index_mismatch_detected(self) -> None:
        """A valid record stored under the wrong key (a misdirected write) is corruption."""
        s = self.open()
        s.load()
        s.save(HardState(1, "a", 0), entries(1, 4), None)
        s.close()
        self.raw_put(b"log", struct.pack(">Q", 2), self.raw_get(b"log", struct.pack(">Q", 3)))
        self.assertRaises(RaftStorageCorruption, self.open().load)


class ModelTests(SynchronousTestCase):
    """LMDB storage and the in-memory storage agree on any sequence of batches."""

    @settings(deadline=None, max_examples=25)
    @given(
        st.lists(
            st.tuples(st.integers(0, 3), st.integers(0, 4), st.booleans()),
            min_size=1,
            max_size=12,
        )
    )
    def test_same_as_memory(self, ops: list[tuple[int, int, bool]]) -> None:
        """Appends that overwrite a suffix and snapshots give the same state in both stores."""
        lmdb_store = LMDBRaftStorage(self.mktemp(), map_size=1 << 22)
        memory = MemoryRaftStorage()
        lmdb_store.load()
        term = 1
        last = 0
        snap_index = 0
        try:
            for back, count, snapshot in ops:
                term += 1
                if snapshot and last > snap_index:
                    snap = Snapshot(SnapshotMeta(last, self._term_at(memory, last), CONFIG), b"x")
                    snap_index = last
                    for store in (lmdb_store, memory):
                        store.save(None, [], snap)
                    continue
                start = max(snap_index + 1, last + 1 - back)
                batch = entries(start, start + count - 1, term=term) if count else []
                hs = HardState(term, "a", snap_index)
                for store in (lmdb_store, memory):
                    store.save(hs, batch, None)
                if batch:
                    last = batch[-1].index
            lmdb_store.close()
            again = LMDBRaftStorage(lmdb_store.path)
            try:
                self.assertEqual(again.load(), memory.load())
            finally:
                again.close()
        finally:
            lmdb_store.close()

    @staticmethod
    def _term_at(store: MemoryRaftStorage, index: int) -> int:
        for e in store.entries:
            if e.index == index:
                return e.term
        raise AssertionError(index)
