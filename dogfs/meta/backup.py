# -*- test-case-name: tests.test_meta_backup -*-
"""Backups of the metadata: a consistent copy of the namespace, and a group restored from one.

What etcd's ``snapshot save`` / ``snapshot restore`` and HDFS's ``dfsadmin -fetchImage`` give
their operators. ``dogfs admin meta backup FILE`` asks a metadata member for the namespace
as of a linearizable read (every write acknowledged before the command is in it); the member
dumps it from an LMDB read transaction, off the reactor, while it goes on serving, and
streams it. ``dogfs admin meta restore FILE --meta-config meta.toml`` turns a backup into a
metadata node's data directory, offline: run it for every member of the new group, with the
same file, then start them.

The file (written with mode 0600: it holds the cluster's block key, see
dogfs.security.tokens):

- the namespace, as `NamespaceState.dump` makes it (the Raft snapshot payload);
- a trailer, a msgpack map: ``format`` ("dogfs-meta-backup"), ``version`` (1), ``index`` (the
  Raft index the namespace is as of), ``term`` (the member's Raft term then), ``size`` and
  ``sha256`` of the namespace bytes, ``cluster_id``, ``node`` (the member that made it) and
  ``taken`` (Unix time);
- the trailer's length (4 bytes, big-endian) and the magic ``DOGFSBK1``.

A restored group starts with a snapshot at the backup's index, at a term 2^32 above the
backup's, so its members agree from the first election and a member started with its old
state by mistake cannot lead it; its membership is the ``[raft] peers`` of the configs (with
``--local``, the metadata nodes of the `dogfs cluster` home). Chunk servers
keep their shards and are taken back (the cluster id is in the backup): shards of files
written after the backup are garbage to the restored namespace and are collected after
``gc_grace``, as HDFS does with blocks an older fsimage does not know. Block group ids move
on by 2^32 and the block key is dropped, for the first leader to choose a new one
(`NamespaceState.start_over_from_backup`), so a new upload does not reuse a shard id the old
cluster used after the backup, and no block token it gave out is valid. Files removed after the
backup are back in the namespace, but their shards may have been collected: a ``get`` of one
fails naming the missing shards.

Depends on dogfs.storage.files, and for the restore on dogfs.meta.state and dogfs.raft; nothing
of the daemons.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from typing import IO, Any

import msgpack
from attrs import frozen

from dogfs.storage.files import fsync_dir

__all__ = [
    "BackupError", "BackupInfo", "BackupWriter", "MAGIC", "RESTORE_TERM_GAP", "check_restorable", "read_backup",
    "restore_data_dir",
]

#: The last 8 bytes of every backup file.
MAGIC = b"DOGFSBK1"
FORMAT = "dogfs-meta-backup"
VERSION = 1
_LENGTH = struct.Struct(">I")
#: A trailer is a few hundred bytes: anything much longer is not one.
_MAX_TRAILER = 64 << 10
#: How far above the backup's Raft term a restored group starts (see `restore_data_dir`).
RESTORE_TERM_GAP = 1 << 32


class BackupError(Exception):
    """The file is not a usable backup, or the data directory cannot take it."""


@frozen
class BackupInfo:
    """What a backup's trailer says."""

    index: int
    size: int
    sha256: str
    cluster_id: str | None
    node: str
    taken: float
    #: The Raft term of the member that made it (0 for a metadata node without Raft).
    term: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The trailer's fields, as ``--json`` prints them."""
        return {
            "index": self.index, "size": self.size, "sha256": self.sha256,
            "cluster_id": self.cluster_id, "node": self.node, "taken": self.taken, "term": self.term,
        }

    @classmethod
    def from_dict(cls, d: Any) -> BackupInfo:
        """The trailer (or a metadata member's answer) as read; ``ValueError`` if malformed."""
        if not isinstance(d, dict):
            raise ValueError("not a map")
        try:
            info = cls(
                index=int(d["index"]), size=int(d["size"]), sha256=str(d["sha256"]),
                cluster_id=None if d.get("cluster_id") is None else str(d["cluster_id"]),
                node=str(d.get("node", "")), taken=float(d.get("taken", 0.0)), term=int(d.get("term", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"a field is missing or malformed ({e})") from None
        if info.index < 0 or info.size < 0 or not 0 <= info.term < 1 << 62 or len(info.sha256) != 64:
            raise ValueError("its index, size or checksum is out of range")
        return info


class BackupWriter:
    """Writes a backup file as its parts arrive: ``FILE.partial`` until `finish` checks the
    namespace's size and checksum against the member's word, and renames it into place."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.partial = f"{path}.partial"
        self._file: IO[bytes] = open(  # noqa: SIM115 # closed by finish or abort
            os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "wb"
        )
        os.chmod(self.partial, 0o600)  # an existing .partial keeps its mode through O_CREAT
        self._hash = hashlib.sha256()
        #: Namespace bytes written so far.
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        """Append namespace bytes."""
        self._file.write(data)
        self._hash.update(data)
        self.written += len(data)

    def finish(self, info: BackupInfo) -> None:
        """Check what arrived against ``info``, add the trailer, make it durable, rename it."""
        if self.written != info.size or self._hash.hexdigest() != info.sha256:
            self.abort()
            raise BackupError(
                f"the backup arrived damaged: {self.written} bytes with SHA-256 {self._hash.hexdigest()}, "
                f"where {info.node} sent {info.size} with {info.sha256}; nothing was written"
            )
        trailer = msgpack.packb({"format": FORMAT, "version": VERSION, **info.as_dict()}, use_bin_type=True)
        self._file.write(trailer + _LENGTH.pack(len(trailer)) + MAGIC)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial, self.path)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def abort(self) -> None:
        """Drop the partial file."""
        self._file.close()
        try:
            os.remove(self.partial)
        except FileNotFoundError:
            pass


def read_backup(path: str) -> tuple[BackupInfo, bytes]:
    """The trailer and the namespace bytes of backup ``path``, checked against each other.

    Raises `BackupError` naming what is wrong (not a backup, truncated, damaged).
    """
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            if end < len(MAGIC) + _LENGTH.size:
                raise BackupError(f"{path} is not a DogFS metadata backup (too short)")
            f.seek(end - len(MAGIC) - _LENGTH.size)
            tail = f.read(len(MAGIC) + _LENGTH.size)
            if tail[_LENGTH.size:] != MAGIC:
                raise BackupError(f"{path} is not a DogFS metadata backup (or it was cut short)")
            (length,) = _LENGTH.unpack(tail[: _LENGTH.size])
            start = end - len(MAGIC) - _LENGTH.size - length
            if length > _MAX_TRAILER or start < 0:
                raise BackupError(f"{path}: the backup's trailer is damaged")
            f.seek(start)
            try:
                trailer = msgpack.unpackb(f.read(length), raw=False)
                if not isinstance(trailer, dict) or trailer.get("format") != FORMAT:
                    raise ValueError("not a backup trailer")
                if trailer.get("version") != VERSION:
                    raise ValueError(f"format version {trailer.get('version')!r}, this release reads {VERSION}")
                info = BackupInfo.from_dict(trailer)
            except Exception as e:
                raise BackupError(f"{path}: the backup's trailer is unreadable: {e}") from None
            if info.size != start:
                raise BackupError(f"{path}: the backup holds {start} namespace bytes, its trailer says {info.size}")
            f.seek(0)
            data = f.read(start)
    except OSError as e:
        raise BackupError(f"cannot read {path}: {e.strerror or e}") from None
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise BackupError(f"{path} is damaged: its namespace does not match the checksum it was written with")
    return info, data


def check_restorable(config: Any, voters: dict[str, str]) -> None:
    """Refuse (`BackupError`) to restore into ``config``'s data directory if it holds a
    metadata node's state, or if the node is not among ``voters`` of a Raft group: nothing
    is written. Check every member before restoring any."""
    from dogfs.meta.raftlog import raft_mode

    data_dir = config.data_dir
    for held in (os.path.join(data_dir, "namespace"), os.path.join(data_dir, "raft")):
        if os.path.exists(held) and os.listdir(held):
            raise BackupError(
                f"{held} already holds metadata: restore only into an empty data directory "
                f"(stop the node and move {data_dir} aside first)"
            )
    if raft_mode(config) and config.id not in voters:
        raise BackupError(
            f"{config.id} is not among the voters of the restored group ({', '.join(sorted(voters))}): a "
            "restored group is made of the members its configs' [raft] peers list (add others later "
            "with `dogfs admin meta add`)"
        )


def restore_data_dir(
    config: Any,
    info: BackupInfo,
    data: bytes,
    *,
    map_size: int,
    voters: dict[str, str] | None = None,
) -> None:
    """Make ``config``'s (a ``MetaConfig``) empty data directory hold the namespace ``data``.

    Behind Raft, the node's Raft storage gets a snapshot at ``info.index`` whose voters are
    ``voters`` (node id -> address; by default the config's ``[raft] peers``), at term
    ``info.term + RESTORE_TERM_GAP``: above any term the group the backup came from reached
    since, so a member started with its old state by mistake can never be elected in the
    restored group (its term and last log term are lower). The namespace is loaded as of
    that index (so the node does not load it again at start). A single node gets the
    namespace alone.

    Everything is written beside its place and renamed into it at the end: a restore that
    fails leaves the directory as it was. Raises `BackupError` (see `check_restorable`).
    """
    from dogfs.meta.raftlog import machine_snapshot, raft_mode
    from dogfs.meta.state import LogVersionError, NamespaceState

    voters = dict(config.peers) if voters is None else voters
    check_restorable(config, voters)
    data_dir = config.data_dir
    os.makedirs(data_dir, exist_ok=True)
    made = {name: os.path.join(data_dir, name + ".restoring") for name in ("namespace", "raft")}
    for path in made.values():
        shutil.rmtree(path, ignore_errors=True)  # an earlier restore's, cut short
    try:
        state = NamespaceState(made["namespace"], durable=True, map_size=map_size)
        state.open()
        try:
            try:
                state.load(data, applied_index=info.index)
            except (ValueError, LogVersionError) as e:
                raise BackupError(f"the backup's namespace cannot be loaded: {e}") from None
            state.start_over_from_backup()
            state.sync()
            # The Raft snapshot holds exactly what the namespace does (a member whose
            # namespace is lost restores it from there).
            data = state.dump()
        finally:
            state.close()
        if raft_mode(config):
            from dogfs.raft.core import Configuration, HardState, Snapshot, SnapshotMeta
            from dogfs.raft.storage import LMDBRaftStorage

            term = info.term + RESTORE_TERM_GAP
            os.makedirs(made["raft"])
            storage = LMDBRaftStorage(os.path.join(made["raft"], "log"))
            try:
                meta = SnapshotMeta(index=info.index, term=term, config=Configuration(voters=frozenset(voters)))
                storage.save(HardState(term=term, vote=None, commit=info.index), [],
                             Snapshot(meta=meta, data=machine_snapshot(voters, data)))
            finally:
                storage.close()
        for name, path in made.items():
            if os.path.exists(path):
                final = os.path.join(data_dir, name)
                if os.path.isdir(final):
                    os.rmdir(final)  # empty (checked above)
                os.rename(path, final)
        fsync_dir(data_dir)
    except BaseException:
        for path in made.values():
            shutil.rmtree(path, ignore_errors=True)
        raise
