# -*- test-case-name: tests.test_meta_state -*-
"""The namespace state machine: C{apply(index, command) -> result} over LMDB.

Owns the persistent metadata of one Raft group: the directory tree (inodes and dirents), the
block groups of files and of uploads in progress, the persistent chunk-server registry, and
the counters. Any replica that applies the same log gets the same bytes: nothing here reads
the clock, randomness or the network (times come inside the commands, from the proposer).

Layout (named LMDB databases, all keys big-endian so byte order is numeric order):

  - C{inodes}: u64 inode -> msgpack C{[0, parent, name, ec|None, mtime]} for a directory or
    C{[1, parent, name, ec, mtime, size, version, [bg ids]]} for a file. The root is inode 1.
  - C{dirents}: u64 parent + UTF-8 name -> u64 child. C{mv} touches one dirent and one
    inode; C{ls} is a range scan over one parent's prefix, sorted by name.
  - C{bgroups}: u64 block group -> C{[committed, ec, size, allocated_at, [node per shard]]}.
  - C{pending}: u64 block group -> b"" for uncommitted allocations (so expiry scans only them).
  - C{servers}: UTF-8 node id -> C{[address, domain|None, draining]}.
  - C{nodeshards}: node id + NUL + u64 block group + u8 index -> b"": which shards each chunk
    server should hold (pending or committed), so repair finds a dead server's shards without
    scanning every block group.
  - C{sessions}: client id -> C{[last seq, last index, encoded result, leader time]} (the
    time is missing from records written before it was kept); C{sessionlru}: u64 last index
    + client id -> b"", to evict the least recently seen client deterministically.
  - C{meta}: counters, the cluster default policy, totals and the applied Raft index, which is
    written in the same transaction as the effects of the command at that index.

Every command runs in a nested transaction: a command that fails leaves no trace, while the
batch around it (and the applied index) still commits. A batch decodes what its commands share
once (inode records, the counters and totals in C{meta}) and writes the meta values back once,
at its end: the bytes are the same however the log is cut into batches.

Imports: lmdb, msgpack, L{dogfs.meta.commands}, L{dogfs.meta.paths}, and the
C{IRaftStateMachine} interface of L{dogfs.raft.driver} (for L{RaftStateMachine}).
"""

from __future__ import annotations

import builtins
import hashlib
import itertools
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import lmdb
import msgpack
from twisted.logger import Logger
from zope.interface import implementer

from dogfs.meta import paths
from dogfs.meta.commands import (
    DEFAULT_POLICY,
    LOG_VERSION,
    Allocate,
    Allocation,
    BlockGroupInfo,
    ChunkServerRecord,
    Command,
    CommitFile,
    Count,
    Delete,
    DirInfo,
    DrainChunkServer,
    EntryInfo,
    ErrorCode,
    ExpireAllocations,
    FileInfo,
    Listing,
    MetaError,
    Mkdir,
    MoveShard,
    Ok,
    RegisterChunkServer,
    Reinstate,
    RemoveChunkServer,
    Rename,
    RenewAllocations,
    Result,
    Revoke,
    Sessioned,
    SetBlockKey,
    SetClusterId,
    SetDefaultPolicy,
    SetLogVersion,
    ShardLocation,
    Summary,
    UnknownCommand,
    canonical_policy,
    decode_command,
    decode_result,
    encode_result,
    parse_policy,
    parse_shard_id,
    shard_id,
    since,
)
from dogfs.raft.driver import CannotApply, IRaftStateMachine
from dogfs.security.tokens import block_token, valid_block_key
from dogfs.storage.files import fsync_dir, owner_only, replace_file
from dogfs.wire.messages import valid_cluster_id
from dogfs.wire.packing import packb

log = Logger()

#: In a non-durable state's directory while it is open: the boot it was opened in.
_UNSYNCED = "unsynced-since-boot"
# The cluster's totals are kept as msgpack integers: signed 64-bit, never negative.
_TOTAL_LIMIT = 1 << 63
_TOTAL_NAMES = {
    "files": "files",
    "dirs": "directories",
    "bytes": "bytes stored",
    "disk": "bytes on disk",
    "bgs": "block groups",
}


def _boot_id() -> str | None:
    """This boot's id (Linux), or None where the system does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


ROOT = 1
_DIR = 0
_FILE = 1

_DB_NAMES = (
    b"inodes",
    b"dirents",
    b"bgroups",
    b"pending",
    b"servers",
    b"nodeshards",
    b"sessions",
    b"sessionlru",
    b"meta",
)

#: Clients whose last command and result the state remembers (see L{Sessioned}); the same on
#: every replica, since eviction must be decided by the log alone.
MAX_SESSIONS = 100_000
#: Seconds (of the leaders' clocks) for which a client's session is kept since it was last
#: seen, whatever the count: far longer than any client retries a command.
SESSION_MIN_AGE = 600.0
#: However recent, sessions beyond this many times C{max_sessions} are forgotten, least
#: recently seen first: the table's size stays bounded whatever the rate of new clients.
SESSION_HARD_LIMIT = 4

_APPLIED = b"applied"
_NEXT_INO = b"next_ino"
_NEXT_BG = b"next_bg"
_DEFAULT_EC = b"default_ec"
_STATS = b"stats"
_FORMAT = b"format"
_REVOKED = b"revoked"
_CLUSTER_ID = b"cluster_id"
_BLOCK_KEY = b"block_key"
#: The group's log version (L{SetLogVersion}); absent: 0.
_LOG_VERSION = b"log_version"
#: Set in a namespace restored from a backup until its new block key is applied.
_RESTORED = b"restored"
_FORMAT_VERSION = 1
#: How far block group ids move on in a namespace restored from a backup (see
#: NamespaceState.start_over_from_backup): past any the old cluster allocated after it.
RESTORE_BG_GAP = 1 << 32
#: Block group ids restores do not move past (shard ids name up to 2^64).
_MAX_RESTORED_BG = 1 << 62

_DUMP_MAGIC = "dogfs-meta-dump"

#: Records packed per call while a dump is made (see NamespaceState._dump).
_DUMP_STEP = 4096


class LogVersionError(CannotApply):
    """The group's log needs a later release than this one: this member must not go on.

    Raised by apply (which makes the Raft member halt, rather than diverge from members that
    apply what it cannot) and by opening or loading a state a later release wrote.
    """


def _beyond_this_release(version: int, where: str) -> LogVersionError:
    return LogVersionError(
        f"{where} uses metadata log version {version}, and this release of DogFS applies up to "
        f"{LOG_VERSION}: run this member with the release the rest of its group runs "
        "(docs/operations.md, \"Upgrading\")"
    )


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _from_u64(b: bytes | memoryview) -> int:
    return int.from_bytes(b, "big")


def _pack(value: Any) -> bytes:
    return packb(value)


def _unpack(data: bytes | memoryview) -> Any:
    return msgpack.unpackb(data, raw=False)


def _superseded(client: str, seq: int, last_seq: int) -> MetaError:
    """The answer to command C{seq} of a session that has run command C{last_seq} since."""
    return MetaError(
        ErrorCode.SESSION_EXPIRED,
        f"Command {seq} of client {client!r} was superseded by command {last_seq}.",
    )


class _Replay(Exception):
    """An optimistic batch must be applied again with savepoints (see L{_Ctx.run})."""


class _Abort(Exception):
    """Raised inside a command to abandon it and return C{error}."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.error = MetaError(code, message)


MAX_ID_BYTES = 255


def _id_key(value: Any) -> bytes | None:
    """The LMDB key of a node or client id, or None when it cannot be a valid id.

    Ids are 1 to 255 bytes of UTF-8 without NUL: LMDB refuses empty keys and keys over 511
    bytes, and the node index separates the id from the rest of its key with a NUL.
    """
    if not isinstance(value, str):
        return None
    try:
        key = value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    if not 0 < len(key) <= MAX_ID_BYTES or b"\x00" in key:
        return None
    return key


def _node_key(node: str, bg_id: int, index: int) -> bytes:
    return node.encode("utf-8") + b"\x00" + _u64(bg_id) + bytes([index])


def _q(path: str) -> str:
    return repr(path)


def _bg_name(bg_id: int) -> str:
    return f"{bg_id:016x}"


def _decode_stats(raw: bytes | memoryview | None) -> dict[str, Any]:
    if raw is None:
        return {"files": 0, "dirs": 0, "bytes": 0, "disk": 0, "bgs": 0, "widths": []}
    stats: dict[str, Any] = _unpack(raw)
    return stats


def _decode_ec(raw: bytes | memoryview | None) -> str:
    return DEFAULT_POLICY if raw is None else bytes(raw).decode("utf-8")


def _decode_counter(raw: bytes | memoryview | None) -> int:
    return 0 if raw is None else _from_u64(raw)


# How the meta values a write batch caches (see _Ctx) are stored.
_DECODE_META: dict[bytes, Callable[[Any], Any]] = {
    _NEXT_INO: _decode_counter,
    _NEXT_BG: _decode_counter,
    _STATS: _decode_stats,
    _DEFAULT_EC: _decode_ec,
}
_ENCODE_META: dict[bytes, Callable[[Any], bytes]] = {
    _NEXT_INO: _u64,
    _NEXT_BG: _u64,
    _STATS: _pack,
    _DEFAULT_EC: lambda ec: ec.encode("utf-8"),
}


class _Ctx:
    """One transaction's view of the namespace, with the helpers commands and reads share.

    A write batch keeps one context for all its commands (see L{run}), so what several
    commands of a batch touch is decoded once: inode records, directory entries, and the
    meta values every command updates (the id counters, the totals, the default policy),
    which are written back once by L{flush}. Records handed out are copies, so a handler cannot change the cache
    without writing the record.
    """

    def __init__(self, txn: lmdb.Transaction, dbs: dict[bytes, Any]) -> None:
        self.txn = txn
        self.inodes = dbs[b"inodes"]
        self.dirents = dbs[b"dirents"]
        self.bgroups = dbs[b"bgroups"]
        self.pending = dbs[b"pending"]
        self.servers = dbs[b"servers"]
        self.nodeshards = dbs[b"nodeshards"]
        self.meta = dbs[b"meta"]
        self._addresses: dict[str, str] = {}
        self._inodes: dict[int, list[Any]] = {}
        # (parent, name) -> child inode or None, as looked up or written in this batch.
        self._children: dict[tuple[int, str], int | None] = {}
        # Decoded meta values (counters: int, stats: dict, default policy: str) and which of
        # them are newer than the transaction's copy.
        self._values: dict[bytes, Any] = {}
        self._dirty: set[bytes] = set()
        # Whether handlers that make every check before their first write (_CHECKS_FIRST)
        # run in the batch's own transaction (see run).
        self.optimistic = False

    # --- commands in a write batch ---

    def run(self, env: lmdb.Environment, handler: Any, index: int, command: Any) -> Result:
        """Run one command's handler in a nested transaction: a failure leaves no trace, in
        LMDB or in this context's caches.

        When ``optimistic``, a handler of _CHECKS_FIRST runs in the batch's transaction
        itself, without the cost of a nested one: when it refuses (_Abort) it has written
        nothing. Any other exception from it raises _Replay, and the batch is applied again
        from its start with nested transactions throughout.
        """
        if self.optimistic and handler in _CHECKS_FIRST:
            values, dirty = dict(self._values), set(self._dirty)
            try:
                return handler(self, index, command)  # type: ignore[no-any-return]
            except _Abort as e:
                self._values, self._dirty = values, dirty
                self._inodes.clear()
                self._children.clear()
                self._addresses.clear()
                return e.error
            except lmdb.Error:
                raise
            except Exception as e:
                raise _Replay() from e
        parent = self.txn
        values, dirty = dict(self._values), set(self._dirty)
        self.txn = child = env.begin(write=True, parent=parent)
        try:
            result: Result = handler(self, index, command)
        except BaseException as e:
            child.abort()
            self.txn = parent
            self._values, self._dirty = values, dirty
            self._inodes.clear()
            self._children.clear()
            self._addresses.clear()
            if isinstance(e, _Abort):
                return e.error
            if isinstance(e, lmdb.Error) or not isinstance(e, Exception):
                raise
            # A command built in-process with ill-typed fields; deterministic, so a result.
            log.failure("Command {command!r} failed", command=command)
            return MetaError(
                ErrorCode.INVALID_ARGUMENT, f"{type(command).__name__} is malformed: {e}."
            )
        child.commit()
        self.txn = parent
        return result

    def flush(self) -> None:
        """Write the meta values changed since the last flush into the transaction."""
        for key in sorted(self._dirty):
            value = self._values[key]
            self.txn.put(key, _ENCODE_META[key](value), db=self.meta)
        self._dirty.clear()

    # --- raw records ---

    def inode(self, ino: int) -> list[Any]:
        return list(self._record(ino))

    def _record(self, ino: int) -> list[Any]:
        """The cached record itself, to read only (L{inode} hands out copies)."""
        rec = self._inodes.get(ino)
        if rec is None:
            raw = self.txn.get(_u64(ino), db=self.inodes)
            if raw is None:
                raise RuntimeError(f"Inode {ino} is missing: the namespace is corrupt.")
            rec = self._inodes[ino] = _unpack(raw)
        return rec

    def put_inode(self, ino: int, rec: list[Any]) -> None:
        self.txn.put(_u64(ino), _pack(rec), db=self.inodes)
        self._inodes[ino] = list(rec)

    def delete_inode(self, ino: int) -> None:
        self.txn.delete(_u64(ino), db=self.inodes)
        self._inodes.pop(ino, None)

    def child(self, parent: int, name: str) -> int | None:
        key = (parent, name)
        try:
            return self._children[key]
        except KeyError:
            raw = self.txn.get(_u64(parent) + name.encode("utf-8"), db=self.dirents)
            ino = self._children[key] = None if raw is None else _from_u64(raw)
            return ino

    def put_child(self, parent: int, name: str, ino: int) -> None:
        self.txn.put(_u64(parent) + name.encode("utf-8"), _u64(ino), db=self.dirents)
        self._children[(parent, name)] = ino

    def delete_child(self, parent: int, name: str) -> None:
        self.txn.delete(_u64(parent) + name.encode("utf-8"), db=self.dirents)
        self._children[(parent, name)] = None

    def children(self, parent: int, start_after: str | None = None) -> Iterator[tuple[str, int]]:
        prefix = _u64(parent)
        cursor = self.txn.cursor(db=self.dirents)
        start = prefix if start_after is None else prefix + start_after.encode("utf-8") + b"\x00"
        if not cursor.set_range(start):
            return
        for raw_key, value in cursor:
            key = bytes(raw_key)
            if not key.startswith(prefix):
                return
            yield key[8:].decode("utf-8"), _from_u64(value)

    def has_children(self, parent: int) -> bool:
        return next(self.children(parent), None) is not None

    def _value(self, key: bytes) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raw = self.txn.get(key, db=self.meta)
            value = self._values[key] = _DECODE_META[key](raw)
            return value

    def _set_value(self, key: bytes, value: Any) -> None:
        self._values[key] = value
        self._dirty.add(key)

    def next_id(self, key: bytes) -> int:
        value: int = self._value(key)
        self._set_value(key, value + 1)
        return value

    def default_ec(self) -> str:
        return str(self._value(_DEFAULT_EC))

    def set_default_ec(self, ec: str) -> None:
        self._set_value(_DEFAULT_EC, ec)

    def default_ec_set(self) -> bool:
        """Whether a default policy was ever set (this batch's commands included)."""
        return _DEFAULT_EC in self._dirty or self.txn.get(_DEFAULT_EC, db=self.meta) is not None

    def log_version(self) -> int:
        """The group's log version (L{SetLogVersion}), this batch's commands included."""
        return _decode_counter(self.txn.get(_LOG_VERSION, db=self.meta))

    def bgroup(self, bg_id: int) -> list[Any] | None:
        if not 0 <= bg_id < 1 << 64:
            return None
        raw = self.txn.get(_u64(bg_id), db=self.bgroups)
        return None if raw is None else _unpack(raw)

    def put_bgroup(self, bg_id: int, rec: list[Any]) -> None:
        self.txn.put(_u64(bg_id), _pack(rec), db=self.bgroups)

    def index_shards(self, bg_id: int, nodes: Sequence[str], add: bool) -> None:
        """Add or remove the (node -> shard) index entries of a block group."""
        for index, node in enumerate(nodes):
            key = _node_key(node, bg_id, index)
            if add:
                self.txn.put(key, b"", db=self.nodeshards)
            else:
                self.txn.delete(key, db=self.nodeshards)

    def delete_bgroup(self, bg_id: int, rec: list[Any]) -> None:
        """Forget a block group (pending or committed) and its index entries."""
        self.txn.delete(_u64(bg_id), db=self.bgroups)
        self.txn.delete(_u64(bg_id), db=self.pending)
        self.index_shards(bg_id, rec[4], add=False)

    def server(self, node_id: str) -> list[Any] | None:
        key = _id_key(node_id)
        if key is None:
            return None
        raw = self.txn.get(key, db=self.servers)
        return None if raw is None else _unpack(raw)

    def put_server(self, node_id: str, rec: list[Any]) -> None:
        self.txn.put(node_id.encode("utf-8"), _pack(rec), db=self.servers)
        self._addresses.pop(node_id, None)

    def delete_server(self, node_id: str) -> None:
        self.txn.delete(node_id.encode("utf-8"), db=self.servers)
        self._addresses.pop(node_id, None)

    def address(self, node_id: str) -> str:
        if node_id not in self._addresses:
            rec = self.server(node_id)
            self._addresses[node_id] = "" if rec is None else rec[0]
        return self._addresses[node_id]

    # --- totals ---

    def stats(self) -> dict[str, Any]:
        return dict(self._value(_STATS))

    def adjust(
        self,
        files: int = 0,
        dirs: int = 0,
        bgs: Sequence[tuple[str, int]] = (),
        sign: int = 1,
    ) -> None:
        """Add files and dirs, and add (sign 1) or remove (sign -1) committed block groups.

        A total that would leave what its record can hold (0 to 2**63 - 1) refuses the
        command here, inside its handler: found only when the batch writes its totals, it
        would fail the whole batch on every member, and again on every replay of the log.
        """
        stats = self.stats()
        stats["files"] += files
        stats["dirs"] += dirs
        if bgs:
            widths = dict(stats["widths"])
            for ec, size in bgs:
                k, m = parse_policy(ec)
                stats["bytes"] += sign * size
                stats["disk"] += sign * (-(-size // k)) * (k + m)
                stats["bgs"] += sign
                widths[k + m] = widths.get(k + m, 0) + sign
            stats["widths"] = sorted([w, c] for w, c in widths.items() if c)
        for key in ("files", "dirs", "bytes", "disk", "bgs"):
            if not 0 <= stats[key] < _TOTAL_LIMIT:
                raise _Abort(
                    ErrorCode.INVALID_ARGUMENT,
                    f"This change would take the cluster's total of {_TOTAL_NAMES[key]} to "
                    f"{stats[key]}, beyond what DogFS counts (0 to 2**63 - 1).",
                )
        self._set_value(_STATS, stats)

    # --- paths ---

    def parts(self, path: str) -> tuple[str, ...]:
        try:
            return paths.split(path)
        except paths.InvalidPath as e:
            raise _Abort(ErrorCode.INVALID_PATH, str(e)) from None

    def resolve(self, path: str, parts: tuple[str, ...]) -> tuple[int, list[Any]]:
        """Return (inode, record) of an existing path, or abort with NOT_FOUND/NOT_A_DIRECTORY."""
        ino = ROOT
        rec = self.inode(ROOT)
        for i, name in enumerate(parts):
            if rec[0] != _DIR:
                raise _Abort(
                    ErrorCode.NOT_A_DIRECTORY,
                    f"{_q(paths.join(parts[:i]))} is a file, not a directory, in {_q(path)}.",
                )
            child = self.child(ino, name)
            if child is None:
                raise _Abort(ErrorCode.NOT_FOUND, f"{_q(path)} does not exist.")
            ino, rec = child, self.inode(child)
        return ino, rec

    def resolve_parent(self, path: str, parts: tuple[str, ...]) -> tuple[int, list[Any]]:
        """Return (inode, record) of the parent directory of a non-root path."""
        parent = paths.join(parts[:-1])
        try:
            ino, rec = self.resolve(parent, parts[:-1])
        except _Abort as e:
            if e.error.code == ErrorCode.NOT_FOUND:
                raise _Abort(
                    ErrorCode.NOT_FOUND,
                    f"The parent directory {_q(parent)} of {_q(path)} does not exist.",
                ) from None
            raise
        if rec[0] != _DIR:
            raise _Abort(
                ErrorCode.NOT_A_DIRECTORY,
                f"The parent {_q(parent)} of {_q(path)} is a file, not a directory.",
            )
        return ino, rec

    def path_of(self, ino: int) -> str:
        names: list[str] = []
        while ino != ROOT:
            rec = self.inode(ino)
            names.append(rec[2])
            ino = rec[1]
        return paths.join(names[::-1])

    def effective_ec(self, ino: int) -> str:
        """The policy of a directory: its own, else its nearest ancestor's, else the default."""
        while True:
            rec = self._record(ino)
            if rec[0] == _DIR and rec[3] is not None:
                return str(rec[3])
            if ino == ROOT:
                return self.default_ec()
            ino = rec[1]

    # --- views ---

    def shards(self, bg_id: int, nodes: Sequence[str]) -> tuple[ShardLocation, ...]:
        return tuple(
            ShardLocation(i, shard_id(bg_id, i), node, self.address(node))
            for i, node in enumerate(nodes)
        )

    def bg_info(self, bg_id: int, rec: list[Any]) -> BlockGroupInfo:
        return BlockGroupInfo(bg_id, rec[2], rec[1], self.shards(bg_id, rec[4]))

    def info(self, path: str, ino: int, rec: list[Any]) -> FileInfo | DirInfo:
        if rec[0] == _DIR:
            return DirInfo(path, self.effective_ec(ino), float(rec[4]))
        groups = []
        for bg_id in rec[7]:
            bg = self.bgroup(bg_id)
            if bg is None:
                raise RuntimeError(f"Block group {bg_id} of {path!r} is missing.")
            groups.append(self.bg_info(bg_id, bg))
        return FileInfo(path, rec[5], rec[3], float(rec[4]), rec[6], tuple(groups))

    def entry(self, path: str, ino: int, rec: list[Any]) -> EntryInfo:
        name = rec[2]
        if rec[0] == _DIR:
            return EntryInfo(name, path, "dir", 0, self.effective_ec(ino), float(rec[4]), 0)
        return EntryInfo(name, path, "file", rec[5], rec[3], float(rec[4]), rec[6])

    # --- removal ---

    def drop_bgroups(self, bg_ids: Iterable[int]) -> None:
        """Forget committed block groups: their shards become garbage on the chunk servers."""
        dropped = []
        for bg_id in bg_ids:
            rec = self.bgroup(bg_id)
            if rec is None:
                continue
            self.delete_bgroup(bg_id, rec)
            dropped.append((rec[1], rec[2]))
        self.adjust(bgs=dropped, sign=-1)

    def remove_tree(self, ino: int, rec: list[Any]) -> None:
        """Delete an inode and, for a directory, everything under it (not its own dirent)."""
        stack = [(ino, rec)]
        files = dirs = 0
        while stack:
            cur, cur_rec = stack.pop()
            if cur_rec[0] == _FILE:
                self.drop_bgroups(cur_rec[7])
                files += 1
            else:
                dirs += 1
                for name, child in list(self.children(cur)):
                    stack.append((child, self.inode(child)))
                    self.delete_child(cur, name)
            self.delete_inode(cur)
        self.adjust(files=-files, dirs=-dirs)


def _check_policy(ec: Any) -> str:
    """The canonical name of a policy, or abort with INVALID_ARGUMENT."""
    try:
        return canonical_policy(ec)
    except ValueError as e:
        raise _Abort(ErrorCode.INVALID_ARGUMENT, str(e)) from None


def _check_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise _Abort(ErrorCode.INVALID_ARGUMENT, f"{what} {value!r} is not a number.")
    return float(value)


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
        raise _Abort(ErrorCode.INVALID_ARGUMENT, f"{what} {value!r} is not a valid count.")
    return value


def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise _Abort(ErrorCode.INVALID_ARGUMENT, f"{what} {value!r} is not a valid name.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Abort(ErrorCode.INVALID_ARGUMENT, f"{what} {value!r} is not valid UTF-8.") from None
    return value


class NamespaceState:
    """The metadata namespace of one Raft group, stored in an LMDB environment at C{path}.

    Call L{open} before use (not done in C{__init__}: twistd forks after building services,
    and an LMDB environment must not cross a fork) and L{close} after. Writes go through
    L{apply} / L{apply_batch} only; reads (L{stat}, L{list}, ...) use read transactions and
    may run while writes happen.

    With C{durable=False} commits are not fsynced: right behind Raft, whose log is durable
    and replays whatever a crash undid (the applied index moves with the effects), and for
    tests. That holds when only the process dies: the page cache keeps every commit. When the
    machine itself goes down (power, kernel), LMDB without sync may be torn, not merely
    behind: so while open, such a state keeps a marker naming the boot it was opened in, and
    L{open} sets aside a state left unclosed in an earlier boot and starts empty, for Raft to
    restore from its snapshot and log. C{max_sessions} must be the same on every replica.
    """

    def __init__(
        self,
        path: str,
        *,
        durable: bool = True,
        map_size: int = 1 << 34,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.path = path
        self.max_sessions = max_sessions
        self.durable = durable
        self.map_size = map_size
        self._env: lmdb.Environment | None = None
        self._dbs: dict[bytes, Any] = {}

    # --- lifecycle ---

    def open(self) -> None:
        """Open (creating if needed) the environment and initialise an empty namespace."""
        if self._env is not None:
            return
        os.makedirs(self.path, exist_ok=True)
        if not self.durable:
            self._set_aside_if_torn()
        env = lmdb.open(
            self.path,
            map_size=self.map_size,
            max_dbs=len(_DB_NAMES) + 2,
            sync=self.durable,
            metasync=self.durable,
            readahead=False,
            mode=0o600,  # it holds the cluster's block key
        )
        owner_only(self.path)
        self._env = env
        with env.begin(write=True) as txn:
            self._dbs = {name: env.open_db(name, txn=txn) for name in _DB_NAMES}
            self._initialise(txn)
            version = _decode_counter(txn.get(_LOG_VERSION, db=self._dbs[b"meta"]))
        if version > LOG_VERSION:
            env.close()
            self._env = None
            self._dbs = {}
            raise _beyond_this_release(version, f"The namespace at {self.path}")
        if not self.durable:
            replace_file(os.path.join(self.path, _UNSYNCED), (_boot_id() or "unknown").encode())

    def _set_aside_if_torn(self) -> None:
        """A non-durable state left open (unsynced) in an earlier boot: move it aside."""
        marker = os.path.join(self.path, _UNSYNCED)
        try:
            with open(marker) as f:
                opened_in = f.read().strip()
        except FileNotFoundError:
            return  # closed cleanly (synced), or new
        boot = _boot_id()
        if boot is not None and opened_in == boot:
            return  # only the process died: the page cache kept every commit
        aside = f"{self.path}.torn-{opened_in[:8]}-{os.getpid()}"
        log.warn(
            "The namespace at {path} was not closed before the machine restarted, and its "
            "unsynced commits may be torn: it is moved to {aside}, and this member restores "
            "the namespace from its Raft snapshot and log",
            path=self.path, aside=aside,
        )
        os.rename(self.path, aside)
        os.makedirs(self.path)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def _initialise(self, txn: lmdb.Transaction) -> None:
        meta = self._dbs[b"meta"]
        if txn.get(_FORMAT, db=meta) is not None:
            return
        # Every replica writes exactly these bytes, so fresh states have equal digests.
        txn.put(_FORMAT, _u64(_FORMAT_VERSION), db=meta)
        txn.put(_u64(ROOT), _pack([_DIR, 0, "", None, 0.0]), db=self._dbs[b"inodes"])
        txn.put(_NEXT_INO, _u64(ROOT + 1), db=meta)
        txn.put(_NEXT_BG, _u64(1), db=meta)
        txn.put(_APPLIED, _u64(0), db=meta)
        ctx = _Ctx(txn, self._dbs)
        ctx.adjust(dirs=1)
        ctx.flush()

    def close(self) -> None:
        """Close the environment (syncing a non-durable one first); it can be opened again."""
        if self._env is not None:
            if not self.durable:
                self._env.sync(True)
            self._env.close()
            self._env = None
            self._dbs = {}
            if not self.durable:
                try:
                    os.unlink(os.path.join(self.path, _UNSYNCED))
                except FileNotFoundError:
                    pass
                fsync_dir(self.path)

    @property
    def env(self) -> lmdb.Environment:
        """The open LMDB environment (raise C{RuntimeError} when closed)."""
        if self._env is None:
            raise RuntimeError(f"The namespace state at {self.path!r} is not open.")
        return self._env

    def _read(self) -> lmdb.Transaction:
        return self.env.begin(write=False, buffers=False)

    # --- writes ---

    @property
    def applied_index(self) -> int:
        """The Raft index of the last command applied (0 for a fresh state)."""
        with self._read() as txn:
            return _decode_counter(txn.get(_APPLIED, db=self._dbs[b"meta"]))

    def apply(self, index: int, command: Command | bytes | None) -> Result | None:
        """Apply the command at Raft index C{index} and return its result.

        C{command} may be a command, its encoding, or None (a no-op entry that only advances
        the applied index, result L{Ok}). An index not above L{applied_index} is a replay and
        returns None without touching anything. Failures are L{MetaError} results, never
        exceptions; only LMDB errors (a full map, a broken disk) propagate, since carrying on
        would let this replica diverge.
        """
        return self.apply_batch([(index, command)])[0]

    def apply_batch(
        self, entries: Sequence[tuple[int, Command | bytes | None]]
    ) -> builtins.list[Result | None]:
        """Apply several (index, command) entries in one write transaction (one fsync).

        Equivalent to applying them one by one with L{apply}.
        """
        try:
            return self._apply_batch(entries, optimistic=True)
        except _Replay:
            # A command failed in a way that may have left writes behind (see _Ctx.run):
            # the transaction is gone with them; this time every command has a savepoint.
            return self._apply_batch(entries, optimistic=False)

    def _apply_batch(
        self, entries: Sequence[tuple[int, Command | bytes | None]], optimistic: bool
    ) -> builtins.list[Result | None]:
        results: builtins.list[Result | None] = []
        env = self.env
        with env.begin(write=True) as txn:
            meta = self._dbs[b"meta"]
            applied = _decode_counter(txn.get(_APPLIED, db=meta))
            start = applied
            # One context for the batch: what its commands share is decoded once.
            ctx = _Ctx(txn, self._dbs)
            ctx.optimistic = optimistic
            for index, command in entries:
                if index <= applied:
                    results.append(None)
                    continue
                results.append(self._apply_one(ctx, index, command))
                applied = index
            ctx.flush()
            if applied != start:
                txn.put(_APPLIED, _u64(applied), db=meta)
        return results

    def _apply_one(self, ctx: _Ctx, index: int, command: Command | bytes | None) -> Result:
        if command is None:
            return Ok()
        if isinstance(command, bytes | bytearray | memoryview):
            try:
                command = decode_command(bytes(command))
            except UnknownCommand as e:
                # A leader of a later release proposed it: applying anything else here would
                # leave this member's state unlike the others'. Halt (LogVersionError).
                raise LogVersionError(
                    f"Entry {index} of the metadata log holds a command this release cannot apply "
                    f"({e}): run this member with the release the rest of its group runs "
                    "(docs/operations.md, \"Upgrading\")"
                ) from None
            except ValueError as e:
                return MetaError(ErrorCode.INVALID_ARGUMENT, f"Undecodable command: {e}")
        if isinstance(command, Sessioned):
            return self._apply_sessioned(ctx, index, command)
        return self._execute(ctx, index, command)

    def _execute(self, ctx: _Ctx, index: int, command: Any) -> Result:
        handler = _HANDLERS.get(type(command))
        if handler is None:
            return MetaError(
                ErrorCode.INVALID_ARGUMENT, f"{type(command).__name__} is not a metadata command."
            )
        needed = since(type(command))
        if needed:
            if type(command) is SetLogVersion:
                if command.version > LOG_VERSION:
                    # Outside ctx.run, so it halts this member (see LogVersionError).
                    raise _beyond_this_release(command.version, f"The metadata group (entry {index})")
            elif needed > (group := ctx.log_version()):
                # A leader checks this before it proposes (MetaHandlers.command): this is the
                # same check, made alike on every member, should a leader not have.
                return MetaError(
                    ErrorCode.VERSION_MISMATCH,
                    f"{type(command).__name__} needs metadata log version {needed}, and the group "
                    f"is at {group}: upgrade every member first.",
                )
        return ctx.run(self.env, handler, index, command)

    def _apply_sessioned(self, ctx: _Ctx, index: int, cmd: Sessioned) -> Result:
        client, seq = cmd.client_id, cmd.seq
        key = _id_key(client)
        if key is None:
            return MetaError(ErrorCode.INVALID_ARGUMENT, f"Client id {client!r} is not valid.")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 < seq < 1 << 63:
            return MetaError(ErrorCode.INVALID_ARGUMENT, f"Sequence number {seq!r} is not valid.")
        if isinstance(cmd.command, Sessioned):
            return MetaError(ErrorCode.INVALID_ARGUMENT, "A session cannot wrap another session.")
        txn = ctx.txn
        sessions, lru = self._dbs[b"sessions"], self._dbs[b"sessionlru"]
        raw = txn.get(key, db=sessions)
        now = cmd.now if type(cmd.now) is float and math.isfinite(cmd.now) else 0.0
        if raw is not None:
            last_seq, last_index, cached = _unpack(raw)[:3]
            if seq < last_seq:
                return _superseded(client, seq, last_seq)
            txn.delete(_u64(last_index) + key, db=lru)
            if seq == last_seq:
                # A retry of a command that already ran: answer as the first time.
                txn.put(key, _pack([seq, index, cached, now]), db=sessions)
                txn.put(_u64(index) + key, b"", db=lru)
                return decode_result(cached)
        result = self._execute(ctx, index, cmd.command)
        txn.put(key, _pack([seq, index, encode_result(result), now]), db=sessions)
        txn.put(_u64(index) + key, b"", db=lru)
        if raw is None:
            self._evict_sessions(txn, now)
        return result

    def _evict_sessions(self, txn: lmdb.Transaction, now: float) -> None:
        """Past C{max_sessions}, forget the clients least recently seen in the log, but
        none seen within C{SESSION_MIN_AGE} seconds (by the leaders' clocks): a retry comes
        within the client's timeout, and forgetting its session first would run it twice.
        The table may then hold more than C{max_sessions} for a while: about as many clients
        as begin sessions in C{SESSION_MIN_AGE}, and never more than C{SESSION_HARD_LIMIT}
        times C{max_sessions}. A time more than C{SESSION_MIN_AGE} ahead of C{now} (a
        leader's clock far off) does not protect a session: it would hold every later one
        in the table until the clocks met."""
        sessions, lru = self._dbs[b"sessions"], self._dbs[b"sessionlru"]
        count = txn.stat(sessions)["entries"]
        cursor = txn.cursor(db=lru)
        while count > self.max_sessions and cursor.first():
            oldest = bytes(cursor.key())
            raw = txn.get(oldest[8:], db=sessions)
            fields = [] if raw is None else _unpack(raw)
            seen = fields[3] if len(fields) > 3 else 0.0  # recorded before times were
            recent = now - SESSION_MIN_AGE < seen <= now + SESSION_MIN_AGE
            if raw is not None and recent and count <= self.max_sessions * SESSION_HARD_LIMIT:
                return
            cursor.delete()
            txn.delete(oldest[8:], db=sessions)
            count -= 1

    def session_result(self, client_id: str, seq: int) -> Result | None:
        """What command C{seq} of session C{client_id} answered, if it already took effect
        here; L{ErrorCode.SESSION_EXPIRED} if a later command of the session did; else None."""
        key = _id_key(client_id)
        if key is None:
            return None
        with self._read() as txn:
            raw = txn.get(key, db=self._dbs[b"sessions"])
        if raw is None:
            return None
        last_seq, _, cached = _unpack(raw)[:3]
        if seq < last_seq:
            return _superseded(client_id, seq, last_seq)
        return decode_result(cached) if seq == last_seq else None

    # --- reads ---

    def stat(self, path: str) -> FileInfo | DirInfo | MetaError:
        """Describe the file or directory at C{path}."""
        with self._read() as txn:
            ctx = _Ctx(txn, self._dbs)
            try:
                parts = ctx.parts(path)
                ino, rec = ctx.resolve(path, parts)
                return ctx.info(paths.join(parts), ino, rec)
            except _Abort as e:
                return e.error

    def listing(
        self, path: str, *, start_after: str | None = None, limit: int | None = None
    ) -> Listing | MetaError:
        """List a directory by name, C{limit} entries at most after the name C{start_after}.

        Listing a file gives that one entry, as C{ls} does.
        """
        if start_after is not None:
            try:
                if not isinstance(start_after, str):
                    raise TypeError
                if len(start_after.encode("utf-8")) > paths.MAX_NAME_BYTES:
                    raise TypeError
            except (TypeError, UnicodeEncodeError):
                return MetaError(
                    ErrorCode.INVALID_ARGUMENT, f"Cannot list {path!r} after {start_after!r}."
                )
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            return MetaError(ErrorCode.INVALID_ARGUMENT, f"Listing limit {limit!r} is not valid.")
        with self._read() as txn:
            ctx = _Ctx(txn, self._dbs)
            try:
                parts = ctx.parts(path)
                ino, rec = ctx.resolve(path, parts)
            except _Abort as e:
                return e.error
            base = paths.join(parts)
            if rec[0] == _FILE:
                return Listing(base, (ctx.entry(base, ino, rec),), False)
            entries: builtins.list[EntryInfo] = []
            more = False
            for name, child in ctx.children(ino, start_after):
                if limit is not None and len(entries) >= limit:
                    more = True
                    break
                child_path = base.rstrip("/") + "/" + name
                entries.append(ctx.entry(child_path, child, ctx.inode(child)))
            return Listing(base, tuple(entries), more)

    def list(
        self, path: str, *, start_after: str | None = None, limit: int | None = None
    ) -> builtins.list[EntryInfo] | MetaError:
        """The entries of L{listing} as a list (sorted by name), or the error."""
        result = self.listing(path, start_after=start_after, limit=limit)
        if isinstance(result, MetaError):
            return result
        return list(result.entries)

    def block_groups(self, path: str) -> tuple[BlockGroupInfo, ...] | MetaError:
        """The block groups of the file at C{path}, in file order."""
        info = self.stat(path)
        if isinstance(info, MetaError):
            return info
        if isinstance(info, DirInfo):
            return MetaError(ErrorCode.IS_A_DIRECTORY, f"{_q(info.path)} is a directory.")
        return info.block_groups

    def block_group(self, bg_id: int) -> tuple[BlockGroupInfo, bool] | None:
        """A block group by id and whether it is committed, or None when unknown."""
        with self._read() as txn:
            ctx = _Ctx(txn, self._dbs)
            rec = ctx.bgroup(bg_id)
            return None if rec is None else (ctx.bg_info(bg_id, rec), bool(rec[0]))

    def all_block_groups(
        self, *, start_after: int | None = None, limit: int | None = None
    ) -> builtins.list[BlockGroupInfo]:
        """Committed block groups in id order, a page at a time (for repair and rebalance)."""
        out: builtins.list[BlockGroupInfo] = []
        with self._read() as txn:
            ctx = _Ctx(txn, self._dbs)
            cursor = txn.cursor(db=ctx.bgroups)
            start = b"" if start_after is None else _u64(start_after + 1)
            if not cursor.set_range(start):
                return out
            for key, raw in cursor:
                rec = _unpack(raw)
                if not rec[0]:
                    continue
                out.append(ctx.bg_info(_from_u64(key), rec))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def _placements(
        self, txn: lmdb.Transaction, node_id: str, after: tuple[int, int] | None
    ) -> Iterator[tuple[int, int, bytes]]:
        """(bg_id, index, block group key) of each shard placed on C{node_id} past C{after}
        (None: from the first), in id order, read within C{txn}."""
        node_key = _id_key(node_id)
        if node_key is None:
            return
        prefix = node_key + b"\x00"
        start = prefix if after is None else _node_key(node_id, *after) + b"\x00"
        cursor = txn.cursor(db=self._dbs[b"nodeshards"])
        if not cursor.set_range(start):
            return
        for raw_key in cursor.iternext(keys=True, values=False):
            key = bytes(raw_key)
            if not key.startswith(prefix) or len(key) != len(prefix) + 9:
                return
            yield _from_u64(key[-9:-1]), key[-1], key[-9:-1]

    def shards_on(
        self,
        node_id: str,
        *,
        start_after: tuple[int, int] | None = None,
        limit: int | None = None,
    ) -> builtins.list[tuple[int, int, bool]]:
        """The shards placed on C{node_id}: (block group id, index, committed), in id order.

        Covers pending uploads too (committed False). Page with C{start_after} = the last
        (id, index) seen. This is how repair finds what a dead chunk server held.
        """
        out: builtins.list[tuple[int, int, bool]] = []
        with self._read() as txn:
            ctx = _Ctx(txn, self._dbs)
            for bg_id, index, _ in self._placements(txn, node_id, start_after):
                rec = ctx.bgroup(bg_id)
                out.append((bg_id, index, bool(rec is not None and rec[0])))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def placed_on(
        self, node_id: str, *, start_after: tuple[int, int] | None = None, limit: int = 1000
    ) -> tuple[builtins.list[tuple[int, int, str, int, builtins.list[str]]], tuple[int, int] | None, int]:
        """A page of the committed block groups with a shard on C{node_id}, raw and cheap
        (no addresses): C{(bg_id, index, ec, size, nodes)} each, where the next page starts (None
        at the end), and how many placements were looked at (at most C{limit}, committed or
        not): what the repair planner and the balancer read a slice of per tick, from one read
        transaction."""
        out: builtins.list[tuple[int, int, str, int, builtins.list[str]]] = []
        looked = 0
        last: tuple[int, int] | None = None
        with self._read() as txn:
            bgroups = self._dbs[b"bgroups"]
            for bg_id, index, bg_key in self._placements(txn, node_id, start_after):
                if looked >= limit:
                    return out, last, looked
                looked += 1
                last = (bg_id, index)
                raw = txn.get(bg_key, db=bgroups)
                if raw is None:
                    continue
                committed, ec, size, _at, nodes = _unpack(raw)
                if committed:
                    out.append((bg_id, index, ec, size, nodes))
        return out, None, looked

    def committed_between(
        self, node_id: str, after: tuple[int, int] | None, upto: tuple[int, int] | None,
        limit: int | None = None,
    ) -> builtins.list[tuple[int, int]]:
        """(bg_id, index) of the committed shards placed on C{node_id} with C{after <
        (bg_id, index) <= upto} (None: unbounded), in order, at most C{limit}: what a shard
        report batch covering that range should list."""
        out: builtins.list[tuple[int, int]] = []
        with self._read() as txn:
            bgroups = self._dbs[b"bgroups"]
            for bg_id, index, bg_key in self._placements(txn, node_id, after):
                if upto is not None and (bg_id, index) > upto:
                    break
                raw = txn.get(bg_key, db=bgroups)
                if raw is not None and _unpack(raw)[0]:
                    out.append((bg_id, index))
                    if limit is not None and len(out) >= limit:
                        break
        return out

    def count_on(self, node_id: str) -> tuple[int, int]:
        """(committed, pending) shards placed on C{node_id}: pending ones are of uploads in
        progress, which their clients write around failures (few, normally)."""
        node_key = _id_key(node_id)
        if node_key is None:
            return 0, 0
        prefix = node_key + b"\x00"
        total = pending = 0
        with self._read() as txn:
            # Keys only (not _placements): `drain --wait` asks every second.
            cursor = txn.cursor(db=self._dbs[b"nodeshards"])
            if cursor.set_range(prefix):
                for raw_key in cursor.iternext(keys=True, values=False):
                    if not bytes(raw_key).startswith(prefix):
                        break
                    total += 1
            bgroups = self._dbs[b"bgroups"]
            for raw_key in txn.cursor(db=self._dbs[b"pending"]).iternext(keys=True, values=False):
                raw = txn.get(bytes(raw_key), db=bgroups)
                if raw is not None and node_id in _unpack(raw)[4]:
                    pending += 1
        return total - pending, pending

    def placed_nodes(self) -> builtins.list[str]:
        """Every node id some block group places a shard on, registered or not, sorted: one
        seek per node, not a pass over the shards."""
        out: builtins.list[str] = []
        with self._read() as txn:
            cursor = txn.cursor(db=self._dbs[b"nodeshards"])
            found = cursor.first()
            while found:
                key = bytes(cursor.key())
                node = key[: key.index(b"\x00")]
                out.append(node.decode("utf-8"))
                found = cursor.set_range(node + b"\x01")
        return out

    def placed_bytes(
        self, *, start_after: int | None = None, limit: int = 10_000
    ) -> tuple[dict[str, int], int | None, int]:
        """A slice of the census of bytes each chunk server holds for committed block groups:
        C{(node -> bytes, where the next slice starts or None at the end, groups looked
        at)}. A shard counts as a data shard's share of its group (C{ceil(size / k)}: parity
        shards are as large), so the figure is what the namespace places on a server, free of
        the garbage its disk still holds. Raw and cheap: the balancer sums one slice per tick.
        """
        out: dict[str, int] = {}
        looked = 0
        last: int | None = None
        with self._read() as txn:
            cursor = txn.cursor(db=self._dbs[b"bgroups"])
            start = b"" if start_after is None else _u64(start_after + 1)
            if not cursor.set_range(start):
                return out, None, 0
            for key, raw in cursor.iternext():
                if looked >= limit:
                    return out, last, looked
                looked += 1
                last = _from_u64(bytes(key))
                committed, ec, size, _at, nodes = _unpack(raw)
                if not committed:
                    continue
                share = -(-size // parse_policy(ec)[0])
                for node in nodes:
                    out[node] = out.get(node, 0) + share
        return out, None, looked

    def redundancy(self, alive: Iterable[str]) -> dict[int, int]:
        """Committed block groups by margin: live shards minus k, given the alive servers.

        A margin of m means intact, 0 means one more loss makes data unreadable, negative
        means unreadable until servers return. One pass over raw records, cheaper than
        L{all_block_groups} for the dashboard.
        """
        live = set(alive)
        margins: dict[int, int] = {}
        with self._read() as txn:
            for _, raw in txn.cursor(db=self._dbs[b"bgroups"]):
                committed, ec, _size, _at, nodes = _unpack(raw)
                if not committed:
                    continue
                margin = sum(1 for node in nodes if node in live) - parse_policy(ec)[0]
                margins[margin] = margins.get(margin, 0) + 1
        return dict(sorted(margins.items()))

    def chunk_servers(self) -> builtins.list[ChunkServerRecord]:
        """Every registered chunk server, sorted by node id."""
        with self._read() as txn:
            ctx = _Ctx(txn, self._dbs)
            return [
                ChunkServerRecord(bytes(key).decode("utf-8"), *_unpack(raw)[:3])
                for key, raw in txn.cursor(db=ctx.servers)
            ]

    def default_policy(self) -> str:
        """The cluster default EC policy."""
        with self._read() as txn:
            return _Ctx(txn, self._dbs).default_ec()

    def default_policy_set(self) -> bool:
        """Whether a default policy was ever set (else the built-in one applies)."""
        with self._read() as txn:
            return txn.get(_DEFAULT_EC, db=self._dbs[b"meta"]) is not None

    def cluster_id(self) -> str | None:
        """The cluster's id (L{SetClusterId}), or None while none was set."""
        with self._read() as txn:
            raw = txn.get(_CLUSTER_ID, db=self._dbs[b"meta"])
        return None if raw is None else bytes(raw).decode("ascii")

    def block_key(self) -> str | None:
        """The cluster's block key (L{SetBlockKey}), or None while none was set."""
        with self._read() as txn:
            raw = txn.get(_BLOCK_KEY, db=self._dbs[b"meta"])
        return None if raw is None else bytes(raw).decode("ascii")

    def log_version(self) -> int:
        """The group's log version (L{SetLogVersion}; 0 until one is applied)."""
        with self._read() as txn:
            return _decode_counter(txn.get(_LOG_VERSION, db=self._dbs[b"meta"]))

    def start_over_from_backup(self) -> None:
        """Make a namespace just loaded from a backup safe to serve (dogfs.meta.backup).

        The cluster it was taken from went on after the backup: it allocated block groups
        (whose shards are still on the chunk servers, until collected) and gave out block
        tokens for them. So block group ids move on by L{RESTORE_BG_GAP}, and the block key
        is dropped: the restored group's first leader chooses a new, random one (as for a
        new cluster; no upload is allocated until it is applied), and applying it moves the
        ids on again by a random 2^32 to 2^48 taken from the key (L{_set_block_key}). So
        a new upload does not land on a shard id the old cluster used after the backup (nor
        one a group restored from the same backup before used), and no token either gave
        out is valid. Every member restored from the same file computes the same.
        """
        with self.env.begin(write=True) as txn:
            meta = self._dbs[b"meta"]
            next_bg = _decode_counter(txn.get(_NEXT_BG, db=meta))
            if next_bg + RESTORE_BG_GAP < _MAX_RESTORED_BG:
                txn.put(_NEXT_BG, _u64(next_bg + RESTORE_BG_GAP), db=meta)
            txn.delete(_BLOCK_KEY, db=meta)
            txn.put(_RESTORED, b"", db=meta)

    def revocations(self) -> tuple[frozenset[str], frozenset[int]]:
        """The revoked identity names and certificate serial numbers (see L{Revoke})."""
        with self._read() as txn:
            names, serials = _revoked(_Ctx(txn, self._dbs))
            return frozenset(names), frozenset(int(s) for s in serials)

    def shard_status(self, shard_ids: Iterable[str], node_id: str) -> dict[str, str]:
        """Classify shards that C{node_id} reports holding.

        "live" (its block group is committed and places that shard on this node), "pending"
        (an upload not yet committed or expired), or "garbage" (anything else: delete it).
        """
        out: dict[str, str] = {}
        with self._read() as txn:
            ctx = _Ctx(txn, self._dbs)
            for sid in shard_ids:
                parsed = parse_shard_id(sid)
                status = "garbage"
                if parsed is not None:
                    bg_id, index = parsed
                    rec = ctx.bgroup(bg_id)
                    if rec is not None and index < len(rec[4]) and rec[4][index] == node_id:
                        status = "live" if rec[0] else "pending"
                out[sid] = status
        return out

    def summary(self) -> Summary:
        """Totals: files, directories (root included), bytes stored and on disk, groups."""
        with self._read() as txn:
            ctx = _Ctx(txn, self._dbs)
            stats = ctx.stats()
            pending = txn.stat(ctx.pending)["entries"]
            return Summary(
                stats["files"],
                stats["dirs"],
                stats["bytes"],
                stats["disk"],
                stats["bgs"],
                pending,
                tuple((w, c) for w, c in stats["widths"]),
            )

    # --- snapshots ---

    def digest(self) -> str:
        """A SHA-256 over every key and value of every database (hex)."""
        h = hashlib.sha256()
        with self._read() as txn:
            for name in _DB_NAMES:
                h.update(len(name).to_bytes(4, "big") + name)
                for key, value in txn.cursor(db=self._dbs[name]):
                    h.update(len(key).to_bytes(4, "big") + key)
                    h.update(len(value).to_bytes(4, "big") + value)
        return h.hexdigest()

    def sync(self) -> None:
        """Force everything committed so far to disk (for C{durable=False} states)."""
        self.env.sync(True)

    def snapshot(self, to_path: str) -> None:
        """Write a consistent compacted copy of the environment into the directory C{to_path}."""
        os.makedirs(to_path, exist_ok=True)
        self.env.copy(to_path, compact=True)

    def restore(self, from_path: str) -> None:
        """Replace the whole state with a copy made by L{snapshot} (the state is reopened)."""
        source = os.path.join(from_path, "data.mdb")
        if not os.path.exists(source):
            raise FileNotFoundError(f"No snapshot at {from_path!r} (data.mdb is missing).")
        was_open = self._env is not None
        self.close()
        os.makedirs(self.path, exist_ok=True)
        for name in ("data.mdb", "lock.mdb"):
            target = os.path.join(self.path, name)
            if os.path.exists(target):
                os.remove(target)
        temp = os.path.join(self.path, "data.mdb.restoring")
        shutil.copyfile(source, temp)
        if self.durable:
            with open(temp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(temp, os.path.join(self.path, "data.mdb"))
        if was_open:
            self.open()

    def dump(self) -> bytes:
        """Every database as canonical bytes: the Raft snapshot payload (see L{load})."""
        with self._read() as txn:
            return self._dump(txn)

    def dump_later_at(self) -> tuple[int, Callable[[], bytes]]:
        """L{dump_later}, with the applied index of the state it fixes (read in the same
        transaction, so the two agree even while another thread applies)."""
        txn = self._read()
        index = _decode_counter(txn.get(_APPLIED, db=self._dbs[b"meta"]))

        def dump() -> bytes:
            try:
                return self._dump(txn)
            finally:
                txn.abort()

        return index, dump

    def dump_parts_at(self) -> tuple[int, Iterator[bytes | memoryview], Callable[[], None]]:
        """The state as it is now, as L{dump_later_at} fixes it, but given piece by piece as
        it is read (the pieces joined are its L{dump}): a backup need not hold the namespace
        in memory. Returns the applied index, an iterator of the pieces and a function that
        ends the read transaction (once the iterator is exhausted, or to stop early). Each
        step of the iterator may run on any thread, one at a time.
        """
        txn = self._read()
        index = _decode_counter(txn.get(_APPLIED, db=self._dbs[b"meta"]))
        ended = [False]

        def end() -> None:
            if not ended[0]:
                ended[0] = True
                txn.abort()

        def pieces() -> Iterator[bytes | memoryview]:
            try:
                yield from self._dump_pieces(txn)
            finally:
                end()

        return index, pieces(), end

    def dump_later(self) -> Callable[[], bytes]:
        """Fix the state as it is now; return a function giving its L{dump}, once.

        The function may run on another thread while this one goes on applying: it reads an
        LMDB read transaction, a consistent view that later writes do not change (py-lmdb
        opens environments with MDB_NOTLS, so a read transaction may move between threads).
        Do not close the state before it has run.
        """
        return self.dump_later_at()[1]

    def _dump(self, txn: lmdb.Transaction) -> bytes:
        return b"".join(self._dump_pieces(txn))

    def _dump_pieces(self, txn: lmdb.Transaction) -> Iterator[bytes | memoryview]:
        # The cursor yields (key, value) tuples of bytes (read transactions here are opened
        # without buffers), which msgpack writes as the [key, value] arrays of the format:
        # no per-record Python work, which made snapshots of large namespaces costly. But
        # not all at once: a C call holds the GIL throughout, and packing a million records
        # in one held the reactor thread for about a quarter of a second (on a large
        # namespace, long enough for an election). So _DUMP_STEP records per call, each
        # packed as an array whose header is then left out; the bytes are the same.
        packer = msgpack.Packer(use_bin_type=True)
        yield packer.pack_array_header(3) + packer.pack(_DUMP_MAGIC) + packer.pack(_FORMAT_VERSION)
        yield packer.pack_array_header(len(_DB_NAMES))
        for name in _DB_NAMES:
            db = self._dbs[name]
            count = txn.stat(db)["entries"]
            yield packer.pack_array_header(2) + packer.pack(name.decode()) + packer.pack_array_header(count)
            records = iter(txn.cursor(db=db))
            while count > 0:
                step = builtins.list(itertools.islice(records, min(count, _DUMP_STEP)))
                if not step:
                    raise RuntimeError(f"the {name.decode()} table ended early while it was dumped")
                count -= len(step)
                yield memoryview(packer.pack(step))[len(packer.pack_array_header(len(step))):]
            if next(records, None) is not None:
                raise RuntimeError(f"the {name.decode()} table grew while it was dumped")

    def load(self, data: bytes, applied_index: int | None = None) -> None:
        """Replace the whole state with a L{dump} in one transaction (C{ValueError} if bad).

        C{applied_index}, when given, overrides the dump's own (a Raft snapshot is taken at an
        index that may follow entries the state never saw, such as no-ops).
        """
        try:
            magic, version, dbs = _unpack(data)
            if magic != _DUMP_MAGIC or version != _FORMAT_VERSION:
                raise ValueError("not a DogFS metadata dump of a known format")
            tables = {str(name).encode(): items for name, items in dbs}
            if set(tables) != set(_DB_NAMES):
                raise ValueError("the dump's databases do not match")
        except Exception as e:
            raise ValueError(f"Cannot load the metadata snapshot: {e}.") from None
        with self.env.begin(write=True) as txn:
            for name in _DB_NAMES:
                db = self._dbs[name]
                txn.drop(db, delete=False)
                for key, value in tables[name]:
                    txn.put(bytes(key), bytes(value), db=db)
            if applied_index is not None:
                txn.put(_APPLIED, _u64(applied_index), db=self._dbs[b"meta"])
            version = _decode_counter(txn.get(_LOG_VERSION, db=self._dbs[b"meta"]))
            if version > LOG_VERSION:
                # Raised inside the transaction: it aborts, and the state is as it was.
                raise _beyond_this_release(version, "The metadata snapshot")


@implementer(IRaftStateMachine)
class RaftStateMachine:
    """L{NamespaceState} as the state machine a L{dogfs.raft.driver.RaftDriver} applies to.

    Entries carry L{encode_command} bytes; C{apply} returns the command's result (a
    L{MetaError} too), or None for an entry applied before (replay after restart). Give the
    state C{durable=False}: the Raft log is the durable record and replays what a crash undid,
    and the driver applies on the reactor thread, where an fsync per entry would hurt.
    """

    def __init__(self, state: NamespaceState) -> None:
        self.state = state

    def apply(self, entry: Any) -> Result | None:
        """Apply a committed NORMAL entry (its C{index} and C{data})."""
        return self.state.apply(entry.index, bytes(entry.data))

    def apply_batch(self, entries: Sequence[Any]) -> builtins.list[Result | None]:
        """Apply committed NORMAL entries in order, in one transaction."""
        return self.state.apply_batch([(e.index, bytes(e.data)) for e in entries])

    def snapshot(self) -> bytes:
        """The state as of the last applied entry (L{NamespaceState.dump})."""
        return self.state.dump()

    def snapshot_later(self) -> Callable[[], bytes]:
        """L{snapshot}, fixed now and serialised by the function returned (any thread)."""
        return self.state.dump_later()

    def restore(self, snapshot: Any) -> None:
        """Replace the state by C{snapshot.data}, as of C{snapshot.meta.index}."""
        self.state.load(snapshot.data, applied_index=snapshot.meta.index)
        self.state.sync()

    def applied_index(self) -> int:
        """The last index whose effect the state holds."""
        return self.state.applied_index


# --- command handlers -------------------------------------------------------------------------


def _mkdir(ctx: _Ctx, index: int, cmd: Mkdir) -> DirInfo:
    parts = ctx.parts(cmd.path)
    path = paths.join(parts)
    dir_ec = None if cmd.ec is None else _check_policy(cmd.ec)
    now = _check_number(cmd.now, "Time")
    if not parts:
        if cmd.parents:
            return DirInfo("/", ctx.effective_ec(ROOT), float(ctx.inode(ROOT)[4]))
        raise _Abort(ErrorCode.EXISTS, "'/' already exists.")
    cur = ROOT
    for i, name in enumerate(parts):
        last = i == len(parts) - 1
        child = ctx.child(cur, name)
        if child is not None:
            rec = ctx.inode(child)
            if rec[0] != _DIR:
                here = paths.join(parts[: i + 1])
                if last:
                    raise _Abort(ErrorCode.EXISTS, f"{_q(here)} already exists as a file.")
                raise _Abort(
                    ErrorCode.NOT_A_DIRECTORY,
                    f"{_q(here)} is a file, not a directory, in {_q(path)}.",
                )
            if last:
                if cmd.parents:
                    ec = ctx.effective_ec(child)
                    if dir_ec is not None and dir_ec != ec:
                        # Answering "done" would have the caller believe the policy changed.
                        raise _Abort(
                            ErrorCode.EXISTS,
                            f"{_q(path)} already exists with policy {ec}; mkdir does not change "
                            f"an existing directory's policy.",
                        )
                    return DirInfo(path, ec, float(rec[4]))
                raise _Abort(ErrorCode.EXISTS, f"{_q(path)} already exists.")
            cur = child
            continue
        if not last and not cmd.parents:
            raise _Abort(
                ErrorCode.NOT_FOUND,
                f"The parent directory {_q(paths.join(parts[:-1]))} of {_q(path)} does not exist.",
            )
        ino = ctx.next_id(_NEXT_INO)
        ctx.put_inode(ino, [_DIR, cur, name, dir_ec if last else None, now])
        ctx.put_child(cur, name, ino)
        ctx.adjust(dirs=1)
        cur = ino
    return DirInfo(path, ctx.effective_ec(cur), now)


def _set_default(ctx: _Ctx, index: int, cmd: SetDefaultPolicy) -> Ok:
    ec = _check_policy(cmd.ec)
    if not (cmd.seed and ctx.default_ec_set()):
        ctx.set_default_ec(ec)
    return Ok()


def _set_cluster_id(ctx: _Ctx, index: int, cmd: SetClusterId) -> Ok:
    if not valid_cluster_id(cmd.cluster_id):
        raise _Abort(
            ErrorCode.INVALID_ARGUMENT,
            f"Cluster id {cmd.cluster_id!r} is not 1 to 64 letters, digits, '-', '_' or '.'.",
        )
    # The first one stands: chunk servers keep it, and a second would disown them all.
    if ctx.txn.get(_CLUSTER_ID, db=ctx.meta) is None:
        ctx.txn.put(_CLUSTER_ID, cmd.cluster_id.encode("ascii"), db=ctx.meta)
    return Ok()


def _set_block_key(ctx: _Ctx, index: int, cmd: SetBlockKey) -> Ok:
    if not valid_block_key(cmd.key):
        raise _Abort(ErrorCode.INVALID_ARGUMENT, "A block key is 64 lower-case hex digits.")
    # The first one stands: chunk servers keep it, and tokens already given out use it.
    if ctx.txn.get(_BLOCK_KEY, db=ctx.meta) is None:
        ctx.txn.put(_BLOCK_KEY, cmd.key.encode("ascii"), db=ctx.meta)
        if ctx.txn.pop(_RESTORED, db=ctx.meta) is not None:
            # A group restored from a backup (NamespaceState.start_over_from_backup): its
            # ids jump by a random 2^32 to 2^48, the same on every member (the key is in
            # the log), so two groups restored from one backup do not share ids (while ids
            # stay far from the 2^64 that shard ids can name).
            jumped = ctx._value(_NEXT_BG) + ((1 + int(cmd.key[:4], 16)) << 32)
            if jumped < _MAX_RESTORED_BG:
                ctx._set_value(_NEXT_BG, jumped)
    return Ok()


def _set_log_version(ctx: _Ctx, index: int, cmd: SetLogVersion) -> Ok:
    # Never lower: what a later version allowed may be in the state already. (One beyond this
    # release halted the member before it came here: _execute.)
    if cmd.version > ctx.log_version():
        ctx.txn.put(_LOG_VERSION, _u64(cmd.version), db=ctx.meta)
    return Ok()


def _register(ctx: _Ctx, index: int, cmd: RegisterChunkServer) -> Ok:
    node = cmd.node_id
    if _id_key(node) is None:
        raise _Abort(
            ErrorCode.INVALID_ARGUMENT,
            f"Chunk server id {node!r} is not 1 to {MAX_ID_BYTES} bytes of UTF-8 without NUL.",
        )
    address = _check_text(cmd.address, "Address")
    domain = None if cmd.domain is None else _check_text(cmd.domain, "Failure domain")
    old = ctx.server(node)
    # Re-registering (a restart, a new address) keeps an operator's drain in force.
    draining = bool(old[2]) if old is not None and len(old) > 2 else False
    ctx.put_server(node, [address, domain, draining])
    return Ok()


def _known_server(ctx: _Ctx, node_id: Any) -> list[Any]:
    rec = ctx.server(node_id) if isinstance(node_id, str) else None
    if rec is None:
        raise _Abort(ErrorCode.UNKNOWN_CHUNK_SERVER, f"Chunk server {node_id!r} is not registered.")
    return rec


def _drain(ctx: _Ctx, index: int, cmd: DrainChunkServer) -> Ok:
    rec = _known_server(ctx, cmd.node_id)
    address, domain = rec[0], rec[1]
    ctx.put_server(cmd.node_id, [address, domain, bool(cmd.draining)])
    return Ok()


def _remove_server(ctx: _Ctx, index: int, cmd: RemoveChunkServer) -> Ok:
    _known_server(ctx, cmd.node_id)
    prefix = cmd.node_id.encode("utf-8") + b"\x00"
    cursor = ctx.txn.cursor(db=ctx.nodeshards)
    if not cmd.force and cursor.set_range(prefix) and bytes(cursor.key()).startswith(prefix):
        raise _Abort(
            ErrorCode.NOT_EMPTY,
            f"Chunk server {cmd.node_id!r} still holds shards; drain it first or force removal.",
        )
    ctx.delete_server(cmd.node_id)
    return Ok()


def _allocate(ctx: _Ctx, index: int, cmd: Allocate) -> Allocation:
    parts = ctx.parts(cmd.path)
    path = paths.join(parts)
    if not parts:
        raise _Abort(ErrorCode.IS_A_DIRECTORY, "'/' is a directory.")
    parent, _ = ctx.resolve_parent(path, parts)
    existing = ctx.child(parent, parts[-1])
    if existing is not None and ctx.inode(existing)[0] == _DIR:
        raise _Abort(ErrorCode.IS_A_DIRECTORY, f"{_q(path)} is a directory.")
    ec = ctx.effective_ec(parent) if cmd.ec is None else cmd.ec
    ec = _check_policy(ec)
    k, m = parse_policy(ec)
    now = _check_number(cmd.now, "Allocation time")
    placement = tuple(cmd.placement)
    if len(placement) != k + m and cmd.ec is None:
        raise _Abort(
            ErrorCode.INVALID_ARGUMENT,
            f"{_q(path)} inherits {ec} from its directory, whose policy changed while the "
            f"upload was placed on {len(placement)} chunk servers: try the upload again.",
        )
    if len(placement) != k + m:
        raise _Abort(
            ErrorCode.INVALID_ARGUMENT,
            f"{ec} needs {k + m} chunk servers but the placement for {_q(path)} names "
            f"{len(placement)}.",
        )
    if len(set(placement)) != len(placement):
        raise _Abort(
            ErrorCode.INVALID_ARGUMENT,
            f"The placement for {_q(path)} names a chunk server twice.",
        )
    for node in placement:
        if not isinstance(node, str) or ctx.server(node) is None:
            raise _Abort(
                ErrorCode.UNKNOWN_CHUNK_SERVER,
                f"Chunk server {node!r} in the placement for {_q(path)} is not registered.",
            )
    bg_id = ctx.next_id(_NEXT_BG)
    ctx.put_bgroup(bg_id, [False, ec, 0, now, list(placement)])
    ctx.txn.put(_u64(bg_id), b"", db=ctx.pending)
    ctx.index_shards(bg_id, placement, add=True)
    key = ctx.txn.get(_BLOCK_KEY, db=ctx.meta)
    token = None if key is None else block_token(bytes(key).decode("ascii"), bg_id)
    return Allocation(bg_id, ec, ctx.shards(bg_id, placement), token)


def _commit(ctx: _Ctx, index: int, cmd: CommitFile) -> FileInfo:
    parts = ctx.parts(cmd.path)
    path = paths.join(parts)
    if not parts:
        raise _Abort(ErrorCode.IS_A_DIRECTORY, "'/' is a directory.")
    parent, _ = ctx.resolve_parent(path, parts)
    name = parts[-1]
    existing = ctx.child(parent, name)
    old = None if existing is None else ctx.inode(existing)
    if old is not None and old[0] == _DIR:
        raise _Abort(ErrorCode.IS_A_DIRECTORY, f"{_q(path)} is a directory.")
    if cmd.expected_version is not None:
        current = 0 if old is None else old[6]
        if current != cmd.expected_version:
            raise _Abort(
                ErrorCode.VERSION_MISMATCH,
                f"{_q(path)} is at version {current}, not {cmd.expected_version}.",
            )
    size = _check_count(cmd.size, "File size")
    now = _check_number(cmd.now, "Commit time")
    ec = None if cmd.ec is None else _check_policy(cmd.ec)
    seen: set[int] = set()
    total = 0
    new_groups: list[tuple[int, int, list[Any]]] = []
    for bg_id, bg_size in cmd.block_groups:
        _check_count(bg_id, "Block group id")
        if _check_count(bg_size, "Block group size") == 0:
            raise _Abort(
                ErrorCode.INVALID_ARGUMENT,
                f"Block group {_bg_name(bg_id)} of {_q(path)} has size 0.",
            )
        if bg_id in seen:
            raise _Abort(
                ErrorCode.INVALID_ARGUMENT,
                f"Block group {_bg_name(bg_id)} is named twice in the commit of {_q(path)}.",
            )
        seen.add(bg_id)
        rec = ctx.bgroup(bg_id)
        if rec is None or rec[0]:
            raise _Abort(
                ErrorCode.STALE_ALLOCATION,
                f"Block group {_bg_name(bg_id)} for {_q(path)} is not a pending allocation: it "
                f"was already committed, or it expired (an upload renews its allocations while "
                f"it runs; one not renewed for the metadata's allocation_ttl, 1 hour by default, "
                f"expires: the client was stopped for that long, or predates renewals).",
            )
        if ec is None:
            ec = rec[1]
        elif rec[1] != ec:
            raise _Abort(
                ErrorCode.INVALID_ARGUMENT,
                f"Block group {_bg_name(bg_id)} of {_q(path)} uses {rec[1]}, not {ec}.",
            )
        total += bg_size
        new_groups.append((bg_id, bg_size, rec))
    if total != size:
        raise _Abort(
            ErrorCode.INVALID_ARGUMENT,
            f"The block groups of {_q(path)} hold {total} bytes, not the {size} committed.",
        )
    if ec is None:
        ec = ctx.effective_ec(parent)
    if old is not None:
        ctx.drop_bgroups(old[7])
    for bg_id, bg_size, rec in new_groups:
        rec[0] = True
        rec[2] = bg_size
        ctx.put_bgroup(bg_id, rec)
        ctx.txn.delete(_u64(bg_id), db=ctx.pending)
    ctx.adjust(bgs=[(rec[1], bg_size) for _, bg_size, rec in new_groups])
    if existing is None:
        ino = ctx.next_id(_NEXT_INO)
        ctx.put_child(parent, name, ino)
        ctx.adjust(files=1)
    else:
        ino = existing
    rec = [_FILE, parent, name, ec, now, size, index, [bg for bg, _, _ in new_groups]]
    ctx.put_inode(ino, rec)
    info = ctx.info(path, ino, rec)
    assert isinstance(info, FileInfo)
    return info


def _delete(ctx: _Ctx, index: int, cmd: Delete) -> Ok:
    parts = ctx.parts(cmd.path)
    path = paths.join(parts)
    if not parts:
        raise _Abort(ErrorCode.INVALID_ARGUMENT, "The root directory '/' cannot be deleted.")
    ino, rec = ctx.resolve(path, parts)
    if rec[0] == _DIR and not cmd.recursive and ctx.has_children(ino):
        raise _Abort(ErrorCode.NOT_EMPTY, f"Directory {_q(path)} is not empty.")
    ctx.remove_tree(ino, rec)
    ctx.delete_child(rec[1], rec[2])
    return Ok()


def _rename(ctx: _Ctx, index: int, cmd: Rename) -> Ok:
    src_parts = ctx.parts(cmd.src)
    dst_parts = ctx.parts(cmd.dst)
    src, dst = paths.join(src_parts), paths.join(dst_parts)
    if not src_parts:
        raise _Abort(ErrorCode.INVALID_ARGUMENT, "The root directory '/' cannot be moved.")
    ino, rec = ctx.resolve(src, src_parts)
    if not dst_parts:
        raise _Abort(ErrorCode.EXISTS, "'/' already exists.")
    if dst_parts == src_parts and ctx.log_version() >= 1:
        # As coreutils' mv says it (HDFS's rename with options refuses it too). A result is
        # kept in the session table, so it changed with log version 1 (dogfs.meta.versions):
        # a group with members of the release before answers as that release did.
        raise _Abort(ErrorCode.EXISTS, f"{_q(src)} and {_q(dst)} are the same path; nothing was moved.")
    parent, _ = ctx.resolve_parent(dst, dst_parts)
    if ctx.child(parent, dst_parts[-1]) is not None:
        raise _Abort(ErrorCode.EXISTS, f"{_q(dst)} already exists; DogFS does not replace it.")
    if rec[0] == _DIR:
        cur = parent
        while True:
            if cur == ino:
                raise _Abort(
                    ErrorCode.INVALID_ARGUMENT,
                    f"Cannot move directory {_q(src)} into its own subtree at {_q(dst)}.",
                )
            if cur == ROOT:
                break
            cur = ctx.inode(cur)[1]
    ctx.delete_child(rec[1], rec[2])
    ctx.put_child(parent, dst_parts[-1], ino)
    rec[1] = parent
    rec[2] = dst_parts[-1]
    ctx.put_inode(ino, rec)
    return Ok()


def _expire(ctx: _Ctx, index: int, cmd: ExpireAllocations) -> Count:
    before = _check_number(cmd.before, "Expiry time")
    expired = []
    for key, _ in ctx.txn.cursor(db=ctx.pending):
        bg_id = _from_u64(key)
        rec = ctx.bgroup(bg_id)
        if rec is None:
            expired.append((bg_id, [False, "", 0, 0.0, []]))
        elif rec[3] < before:
            expired.append((bg_id, rec))
    for bg_id, rec in expired:
        ctx.delete_bgroup(bg_id, rec)
    return Count(len(expired))


def _renew(ctx: _Ctx, index: int, cmd: RenewAllocations) -> Count:
    now = _check_number(cmd.now, "Renewal time")
    renewed: dict[int, list[Any]] = {}
    for bg_id in cmd.block_groups:
        _check_count(bg_id, "Block group id")
        rec = ctx.bgroup(bg_id)
        if rec is None or rec[0]:
            raise _Abort(
                ErrorCode.STALE_ALLOCATION,
                f"Block group {_bg_name(bg_id)} is not a pending allocation: it was already "
                f"committed, or it expired before it was renewed.",
            )
        renewed[bg_id] = rec
    for bg_id, rec in renewed.items():
        if rec[3] < now:
            rec[3] = now
            ctx.put_bgroup(bg_id, rec)
    return Count(len(renewed))


def _move_shard(ctx: _Ctx, index: int, cmd: MoveShard) -> Ok:
    bg_id = _check_count(cmd.bg_id, "Block group id")
    rec = ctx.bgroup(bg_id)
    if rec is None:
        raise _Abort(ErrorCode.NOT_FOUND, f"Block group {_bg_name(bg_id)} does not exist.")
    nodes: list[str] = rec[4]
    shard = _check_count(cmd.index, "Shard index")
    if shard >= len(nodes):
        raise _Abort(
            ErrorCode.INVALID_ARGUMENT,
            f"Block group {_bg_name(bg_id)} has no shard {shard} (it has {len(nodes)}).",
        )
    sid = shard_id(bg_id, shard)
    if nodes[shard] != cmd.from_node:
        raise _Abort(
            ErrorCode.STALE_ALLOCATION,
            f"Shard {sid} is on {nodes[shard]!r}, not on {cmd.from_node!r}.",
        )
    _known_server(ctx, cmd.to_node)
    if cmd.to_node in nodes:
        raise _Abort(
            ErrorCode.INVALID_ARGUMENT,
            f"Chunk server {cmd.to_node!r} already holds a shard of block group {_bg_name(bg_id)}.",
        )
    ctx.txn.delete(_node_key(cmd.from_node, bg_id, shard), db=ctx.nodeshards)
    ctx.txn.put(_node_key(cmd.to_node, bg_id, shard), b"", db=ctx.nodeshards)
    nodes[shard] = cmd.to_node
    ctx.put_bgroup(bg_id, rec)
    return Ok()


def _revoked(ctx: _Ctx) -> tuple[builtins.list[str], dict[str, str]]:
    """The revocation list: names, and serial (decimal) -> the name it was revoked under."""
    raw = ctx.txn.get(_REVOKED, db=ctx.meta)
    if raw is None:
        return [], {}
    names, serials = _unpack(raw)
    return list(names), {serial: name for serial, name in serials}


def _put_revoked(ctx: _Ctx, names: Iterable[str], serials: dict[str, str]) -> None:
    # Sorted, so every replica writes the same bytes whatever the order of commands.
    ctx.txn.put(
        _REVOKED,
        _pack([sorted(set(names)), sorted([s, n] for s, n in serials.items())]),
        db=ctx.meta,
    )


def _check_serial(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.isascii() or not value.isdigit() or len(value) > 60:
        raise _Abort(ErrorCode.INVALID_ARGUMENT, f"Serial {value!r} is not a decimal number.")
    return str(int(value))


def _revoke(ctx: _Ctx, index: int, cmd: Revoke) -> Ok:
    name = _check_text(cmd.name, "Identity")
    serial = _check_serial(cmd.serial)
    names, serials = _revoked(ctx)
    if serial is None:
        names.append(name)
    else:
        serials[serial] = name
    _put_revoked(ctx, names, serials)
    return Ok()


def _reinstate(ctx: _Ctx, index: int, cmd: Reinstate) -> Ok:
    name = _check_text(cmd.name, "Identity")
    serial = _check_serial(cmd.serial)
    names, serials = _revoked(ctx)
    if serial is None:
        # The whole identity comes back: its name and every serial revoked under it.
        names = [n for n in names if n != name]
        serials = {s: n for s, n in serials.items() if n != name}
    else:
        serials.pop(serial, None)
    _put_revoked(ctx, names, serials)
    return Ok()


# Handlers that make every check (every _Abort) before their first write: a refusal leaves
# nothing to undo, so they need no savepoint (_Ctx.run). Keep it so when editing one.
_CHECKS_FIRST = frozenset({_mkdir})

_HANDLERS: dict[type, Any] = {
    Mkdir: _mkdir,
    SetDefaultPolicy: _set_default,
    RegisterChunkServer: _register,
    Allocate: _allocate,
    CommitFile: _commit,
    Delete: _delete,
    Rename: _rename,
    ExpireAllocations: _expire,
    RenewAllocations: _renew,
    MoveShard: _move_shard,
    DrainChunkServer: _drain,
    RemoveChunkServer: _remove_server,
    Revoke: _revoke,
    Reinstate: _reinstate,
    SetClusterId: _set_cluster_id,
    SetBlockKey: _set_block_key,
    SetLogVersion: _set_log_version,
}

__all__ = ["NamespaceState", "RaftStateMachine", "ROOT", "MAX_SESSIONS", "SESSION_HARD_LIMIT", "SESSION_MIN_AGE"]
