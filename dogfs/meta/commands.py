# -*- test-case-name: tests.test_meta_state -*-
"""Commands of the namespace state machine, their results, and their msgpack codec.

Commands are what the leader proposes to Raft and every replica applies; results are what
C{NamespaceState.apply} returns and what crosses the wire back to clients. Both are frozen
attrs values. Errors are results too (L{MetaError}): apply is total and deterministic.

Every value is encoded as a msgpack array C{[tag, field, field, ...]}; nested values are
encoded the same way. Decoding checks every type and never raises anything but
C{ValueError}. Fields added later go at the end with a default, so an older encoding (a
shorter array) still decodes.

This module imports nothing of ours but L{dogfs.meta.paths}'s siblings' conventions.
"""

from __future__ import annotations

import enum
import functools
import math
import operator
import re
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any, Union

import attrs
import msgpack
from attrs import field, frozen

from dogfs.wire.packing import packb

DEFAULT_POLICY = "RS-4-2"
#: The widest policy accepted, as in L{dogfs.codec.policy} (ISA-L's Cauchy matrices are MDS up
#: to here). Pinned here too: what the state machine accepts is part of the log's meaning.
MAX_WIDTH = 32

_POLICY_RE = re.compile(r"RS-([0-9]{1,3})-([0-9]{1,3})", re.ASCII | re.IGNORECASE)


def parse_policy(name: str) -> tuple[int, int]:
    """Return (k, m) of an erasure-coding policy name such as C{"RS-4-2"}.

    Accepts what L{dogfs.codec.policy.ECPolicy.parse} accepts (any case, surrounding spaces):
    k >= 1, m >= 1, k + m <= 32. Raise C{ValueError} with a one-sentence message otherwise.
    Cached (a few policies are named per cluster, and the passes over every block group ask
    for each group's): callers need no cache of their own.
    """
    if not isinstance(name, str):
        raise ValueError(f"EC policy {name!r} is not a string.")
    return _parse_policy(name)


@functools.lru_cache(maxsize=256)
def _parse_policy(name: str) -> tuple[int, int]:
    match = _POLICY_RE.fullmatch(name.strip())
    if match is None:
        raise ValueError(f"EC policy {name!r} is not of the form RS-K-M (for example RS-4-2).")
    k, m = int(match.group(1)), int(match.group(2))
    if k < 1 or m < 1 or k + m > MAX_WIDTH:
        raise ValueError(
            f"EC policy {name!r} is not supported: it needs k >= 1, m >= 1 and k + m <= "
            f"{MAX_WIDTH}."
        )
    return k, m


def canonical_policy(name: str) -> str:
    """The canonical spelling of a policy name (C{"rs-04-2"} -> C{"RS-4-2"}); see L{parse_policy}."""
    k, m = parse_policy(name)
    return f"RS-{k}-{m}"


def shard_id(bg_id: int, index: int) -> str:
    """The id of shard C{index} of block group C{bg_id}, as chunk servers name their files."""
    return f"{bg_id:016x}-{index:02d}"


_SHARD_ID_RE = re.compile(r"([0-9a-f]{16})-([0-9]{2})")


def parse_shard_id(sid: str) -> tuple[int, int] | None:
    """Return (block group id, index) of a shard id, or None when it is malformed."""
    if not isinstance(sid, str):
        return None
    match = _SHARD_ID_RE.fullmatch(sid)
    if match is None:
        return None
    return int(match.group(1), 16), int(match.group(2))


class ErrorCode(enum.IntEnum):
    """Why a command or a read failed; stable numbers, they cross the wire."""

    NOT_FOUND = 1
    EXISTS = 2
    NOT_A_DIRECTORY = 3
    IS_A_DIRECTORY = 4
    NOT_EMPTY = 5
    INVALID_PATH = 6
    INVALID_ARGUMENT = 7
    STALE_ALLOCATION = 8
    UNKNOWN_CHUNK_SERVER = 9
    VERSION_MISMATCH = 10
    SESSION_EXPIRED = 11


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _group_tuple(value: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(bg), int(size)) for bg, size in value)


def _int_tuple(value: Iterable[int]) -> tuple[int, ...]:
    return tuple(value)


# --- commands -------------------------------------------------------------------------------


@frozen
class Mkdir:
    """Create a directory; with C{parents}, create missing ancestors and accept an existing one.

    C{ec} sets the directory's policy (inherited by what is created under it); C{now} is its
    mtime, chosen by the proposer. Result: L{DirInfo}.
    """

    path: str
    parents: bool = False
    ec: str | None = None
    now: float = 0.0


@frozen
class SetDefaultPolicy:
    """Set the cluster-wide default EC policy (the root's, unless the root has its own).

    With C{seed}, only if no default was ever set: a new leader seeds a new namespace from its
    config this way, and the state, not the leader's possibly lagging view of it, decides
    whether an admin's choice already stands. Result: L{Ok}.
    """

    ec: str
    seed: bool = False


@frozen
class SetClusterId:
    """Name the cluster, once: the first such command applied sets it, later ones change
    nothing. A new leader proposes one (a random id) while the state has none. Chunk servers
    keep the id and report their shards to no other cluster. Result: L{Ok}.
    """

    cluster_id: str


@frozen
class SetBlockKey:
    """Set the cluster's block key, once (64 hex digits: see L{dogfs.security.tokens}): the
    first such command applied sets it, later ones change nothing. A new leader proposes one
    (random) while the state has none. Result: L{Ok}.
    """

    key: str


@frozen
class SetLogVersion:
    """Raise the metadata group's log version to C{version} (never lower it): from then on the
    leader may propose the commands of that version (L{since}). The leader proposes it once
    every member says it applies that version (dogfs.meta.versions). A member whose release
    applies less halts rather than apply it. Result: L{Ok}.
    """

    version: int


@frozen
class RegisterChunkServer:
    """Record a chunk server in the persistent registry (re-registering updates it).

    Result: L{Ok}.
    """

    node_id: str
    address: str
    domain: str | None = None


@frozen
class Allocate:
    """Reserve a new pending block group for an upload to C{path}.

    C{placement} lists the k + m distinct registered chunk servers (shard i goes to
    placement[i]); the leader computes it with the placement planner before proposing, so that
    apply stays deterministic. C{now} is the allocation time used by L{ExpireAllocations}.
    C{avoid} names chunk servers the client saw fail during this upload: the leader places on
    none of them (and logs the command without them). Result: L{Allocation}.
    """

    path: str
    ec: str | None
    placement: tuple[str, ...] = field(converter=_str_tuple)
    now: float = 0.0
    avoid: tuple[str, ...] = field(default=(), converter=_str_tuple)


@frozen
class CommitFile:
    """Atomically create or replace the file at C{path} with the given pending block groups.

    C{block_groups} is a tuple of (block group id, size in bytes) in file order; the sizes
    must add up to C{size}. C{ec}, when given, must match every block group's policy (and is
    the policy of an empty file). C{expected_version}, when given, makes the commit
    conditional: the current file must have that version, 0 meaning "must not exist".
    Result: L{FileInfo}.
    """

    path: str
    size: int
    block_groups: tuple[tuple[int, int], ...] = field(converter=_group_tuple)
    now: float = 0.0
    ec: str | None = None
    expected_version: int | None = None


@frozen
class Delete:
    """Delete a file, an empty directory, or with C{recursive} a whole subtree.

    Result: L{Ok}.
    """

    path: str
    recursive: bool = False


@frozen
class Rename:
    """Move C{src} to C{dst}; C{dst} must not exist (no silent replacement).

    Result: L{Ok}.
    """

    src: str
    dst: str


@frozen
class ExpireAllocations:
    """Drop pending block groups allocated strictly before C{before}. Result: L{Count}."""

    before: float


@frozen
class RenewAllocations:
    """Keep pending block groups C{block_groups} from expiring: their allocation time becomes
    C{now} (set by the leader). An upload that takes longer than the metadata's
    C{allocation_ttl} renews what it allocated so far, as an HDFS client renews its lease.

    Result: L{Count} of the groups renewed; L{ErrorCode.STALE_ALLOCATION} (and nothing
    renewed) if one of them is no longer pending: it expired or was committed, and the upload
    cannot be committed as it stands.
    """

    block_groups: tuple[int, ...] = field(converter=_int_tuple)
    now: float = 0.0


@frozen
class MoveShard:
    """Record that shard C{index} of block group C{bg_id} moved from C{from_node} to C{to_node}.

    Result: L{Ok}; L{ErrorCode.STALE_ALLOCATION} when the shard is no longer on C{from_node}.
    """

    bg_id: int
    index: int
    from_node: str
    to_node: str


@frozen
class Sessioned:
    """Run C{command} at most once for (C{client_id}, C{seq}): exactly-once over retries.

    A client numbers its commands 1, 2, 3...; a retry reuses the number. The state machine
    remembers each client's last number and result: a duplicate gets the remembered result
    without running again, an older number gets L{ErrorCode.SESSION_EXPIRED}. The memory is
    part of the replicated state (and of snapshots), bounded by evicting the clients least
    recently seen in the log, but never one seen within the last C{SESSION_MIN_AGE} seconds
    by the leaders' clocks: C{now}, set by the leader that logs the command (0 in commands
    logged before it existed).
    """

    client_id: str
    seq: int
    command: Command
    now: float = 0.0


@frozen
class DrainChunkServer:
    """Mark a chunk server as draining (or not): the leader stops placing new shards on it
    and moves its shards away. Persistent, so a new leader keeps draining. Result: L{Ok}."""

    node_id: str
    draining: bool = True


@frozen
class RemoveChunkServer:
    """Forget a chunk server. Refused with L{ErrorCode.NOT_EMPTY} while block groups still
    place shards on it, unless C{force} (its shards are then lost). Result: L{Ok}."""

    node_id: str
    force: bool = False


@frozen
class Revoke:
    """Revoke an identity: every certificate named C{name}, or with C{serial} only the one
    certificate with that serial number (decimal digits: serials are 159-bit numbers, beyond
    msgpack's integers). Daemons refuse revoked identities' connections. Result: L{Ok}."""

    name: str
    serial: str | None = None


@frozen
class Reinstate:
    """Undo L{Revoke} for C{name} (and, with C{serial}, for that serial only). Result: L{Ok}."""

    name: str
    serial: str | None = None


Command = Union[
    Sessioned,
    Mkdir,
    SetDefaultPolicy,
    RegisterChunkServer,
    Allocate,
    CommitFile,
    Delete,
    Rename,
    ExpireAllocations,
    RenewAllocations,
    MoveShard,
    DrainChunkServer,
    RemoveChunkServer,
    Revoke,
    Reinstate,
    SetClusterId,
    SetBlockKey,
    SetLogVersion,
]


# --- results --------------------------------------------------------------------------------


@frozen
class Ok:
    """A command succeeded and has nothing to say."""


@frozen
class Count:
    """A command succeeded and affected C{count} things."""

    count: int


@frozen
class MetaError:
    """A command or a read failed; C{message} is one sentence naming the path or node."""

    code: ErrorCode
    message: str


@frozen
class ShardLocation:
    """Where shard C{index} (data shards first) of a block group lives."""

    index: int
    shard_id: str
    node_id: str
    address: str


@frozen
class BlockGroupInfo:
    """One block group of a file: its id, byte size, policy and k + m shards."""

    id: int
    size: int
    ec: str
    shards: tuple[ShardLocation, ...]

    def to_json(self) -> dict[str, Any]:
        """The block group as C{dogfs stat --json} prints it."""
        return {
            "id": self.id,
            "size": self.size,
            "ec": self.ec,
            "shards": [
                {
                    "index": s.index,
                    "shard_id": s.shard_id,
                    "chunk_server": s.node_id,
                    "address": s.address,
                }
                for s in self.shards
            ],
        }


@frozen
class FileInfo:
    """A committed file. C{version} is the Raft index of the commit that made it."""

    path: str
    size: int
    ec: str
    mtime: float
    version: int
    block_groups: tuple[BlockGroupInfo, ...]
    type: str = "file"

    def to_json(self) -> dict[str, Any]:
        """The file as C{dogfs stat --json} prints it."""
        return {
            "path": self.path,
            "type": self.type,
            "size": self.size,
            "ec": self.ec,
            "mtime": self.mtime,
            "version": self.version,
            "block_groups": [bg.to_json() for bg in self.block_groups],
        }


@frozen
class DirInfo:
    """A directory; C{ec} is its effective (possibly inherited) policy."""

    path: str
    ec: str
    mtime: float
    type: str = "dir"

    def to_json(self) -> dict[str, Any]:
        """The directory as C{dogfs stat --json} prints it (size is always 0)."""
        return {"path": self.path, "type": self.type, "size": 0, "ec": self.ec, "mtime": self.mtime}


@frozen
class EntryInfo:
    """One entry of a directory listing; size and version are 0 for a directory."""

    name: str
    path: str
    type: str
    size: int
    ec: str
    mtime: float
    version: int

    def to_json(self) -> dict[str, Any]:
        """The entry as C{dogfs ls --json} prints it."""
        return attrs.asdict(self)


@frozen
class Listing:
    """A page of a directory listing; C{more} says whether entries follow the last one."""

    path: str
    entries: tuple[EntryInfo, ...]
    more: bool = False


@frozen
class Allocation:
    """A pending block group reserved by L{Allocate}: write shard i to C{shards[i]}, with
    C{token} (the block group's block token, None while the cluster has no block key)."""

    bg_id: int
    ec: str
    shards: tuple[ShardLocation, ...]
    token: str | None = None


@frozen
class ChunkServerRecord:
    """A chunk server in the persistent registry; a draining one gets no new shards."""

    node_id: str
    address: str
    domain: str | None = None
    draining: bool = False


@frozen
class Summary:
    """Namespace totals for the dashboard.

    C{block_groups_by_width} maps k + m to the number of committed block groups of that
    width, as sorted (width, count) pairs.
    """

    files: int
    dirs: int
    bytes_stored: int
    bytes_on_disk: int
    block_groups: int
    pending_block_groups: int
    block_groups_by_width: tuple[tuple[int, int], ...]


Result = Union[
    Ok,
    Count,
    MetaError,
    DirInfo,
    FileInfo,
    Allocation,
    Listing,
    EntryInfo,
    ChunkServerRecord,
    Summary,
    BlockGroupInfo,
    ShardLocation,
]


# --- codec ----------------------------------------------------------------------------------

_Check = Callable[[Any], Any]


def _bad(what: str, value: Any) -> ValueError:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return ValueError(f"Malformed {what}: {text}.")


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _bad("string", value)
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad("integer", value)
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad("number", value)
    result = float(value)
    if not math.isfinite(result):
        raise _bad("finite number", value)
    return result


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad("boolean", value)
    return value


def _opt(check: _Check) -> _Check:
    def checked(value: Any) -> Any:
        return None if value is None else check(value)

    checked.optional = check  # type: ignore[attr-defined] # what _fast_test reads
    return checked


def _seq(check: _Check) -> _Check:
    def checked(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise _bad("array", value)
        return tuple(check(item) for item in value)

    return checked


def _pair(first: _Check, second: _Check) -> _Check:
    def checked(value: Any) -> tuple[Any, Any]:
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise _bad("pair", value)
        return (first(value[0]), second(value[1]))

    return checked


def _code(value: Any) -> ErrorCode:
    try:
        return ErrorCode(_int(value))
    except ValueError:
        raise _bad("error code", value) from None


def _obj(cls: type) -> _Check:
    def checked(value: Any) -> Any:
        decoded = _decode_value(value)
        if not isinstance(decoded, cls):
            raise _bad(cls.__name__, value)
        return decoded

    return checked


def _plain_command(value: Any) -> Any:
    # A session wraps one ordinary command, never another session.
    return _decode_value(value, _PLAIN_COMMAND_TAGS)


# tag -> (class, checks of its fields in attrs order). Tags are part of the log format:
# never reuse or renumber one.
_SCHEMAS: dict[int, tuple[type, tuple[_Check, ...]]] = {
    1: (Mkdir, (_str, _bool, _opt(_str), _float)),
    2: (SetDefaultPolicy, (_str, _bool)),
    3: (RegisterChunkServer, (_str, _str, _opt(_str))),
    4: (Allocate, (_str, _opt(_str), _seq(_str), _float, _seq(_str))),
    5: (CommitFile, (_str, _int, _seq(_pair(_int, _int)), _float, _opt(_str), _opt(_int))),
    6: (Delete, (_str, _bool)),
    7: (Rename, (_str, _str)),
    8: (ExpireAllocations, (_float,)),
    9: (MoveShard, (_int, _int, _str, _str)),
    10: (Sessioned, (_str, _int, _plain_command, _float)),
    11: (DrainChunkServer, (_str, _bool)),
    12: (RemoveChunkServer, (_str, _bool)),
    13: (Revoke, (_str, _opt(_str))),
    14: (Reinstate, (_str, _opt(_str))),
    15: (RenewAllocations, (_seq(_int), _float)),
    16: (SetClusterId, (_str,)),
    17: (SetBlockKey, (_str,)),
    18: (SetLogVersion, (_int,)),
    64: (Ok, ()),
    65: (Count, (_int,)),
    66: (MetaError, (_code, _str)),
    67: (ShardLocation, (_int, _str, _str, _str)),
    68: (BlockGroupInfo, (_int, _int, _str, _seq(_obj(ShardLocation)))),
    69: (FileInfo, (_str, _int, _str, _float, _int, _seq(_obj(BlockGroupInfo)), _str)),
    70: (DirInfo, (_str, _str, _float, _str)),
    71: (EntryInfo, (_str, _str, _str, _int, _str, _float, _int)),
    72: (Listing, (_str, _seq(_obj(EntryInfo)), _bool)),
    73: (Allocation, (_int, _str, _seq(_obj(ShardLocation)), _opt(_str))),
    74: (ChunkServerRecord, (_str, _str, _opt(_str), _bool)),
    75: (Summary, (_int, _int, _int, _int, _int, _int, _seq(_pair(_int, _int)))),
}
_TAGS: dict[type, int] = {cls: tag for tag, (cls, _) in _SCHEMAS.items()}
_COMMAND_TAGS = frozenset(range(1, 64))
_PLAIN_COMMAND_TAGS = _COMMAND_TAGS - {_TAGS[Sessioned]}

#: The highest log version this release applies. A release that adds a command, or changes
#: what one does to the state, raises it and records the command in L{_SINCE}: members of a
#: group may then run two releases at once (a rolling upgrade), and the leader proposes the
#: new command only once every member applies it (dogfs.meta.versions). Releases before
#: log versions count as 0.
LOG_VERSION = 1
#: The log version that introduced a command; 0 (every release) when not listed.
_SINCE: dict[type, int] = {SetLogVersion: 1}


def since(cls: type) -> int:
    """The group log version a command needs before a leader may propose it."""
    return _SINCE.get(cls, 0)


class UnknownCommand(ValueError):
    """An encoded command of a type, or with fields, this release does not know: one of a
    later release (a member halts rather than apply the entry: NamespaceState)."""


def _required(cls: type) -> int:
    return sum(1 for a in attrs.fields(cls) if a.default is attrs.NOTHING)


# Per class, computed once: the field names in attrs order (what encoding walks), and how many
# fields a decoded value needs at least and may have at most.
_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(a.name for a in attrs.fields(cls)) for cls, _ in _SCHEMAS.values()
}
_ARITY: dict[int, tuple[int, int]] = {
    tag: (_required(cls), len(checks)) for tag, (cls, checks) in _SCHEMAS.items()
}
_SCALARS = frozenset({str, int, float, bool, type(None)})
#: The last field of a command, added after the command was first logged, and its default:
#: left out when it has that value, so the command encodes as before and a member still on
#: the previous release applies it.
_ADDED_FIELDS: dict[type, tuple[str, Any]] = {
    Allocate: ("avoid", ()),
    Sessioned: ("now", 0.0),
    SetDefaultPolicy: ("seed", False),
    # A result, not a command: left out for a client that does not read it (MetaCommand).
    Allocation: ("token", None),
}


def _encode_value(value: Any) -> Any:
    kind = type(value)
    if kind in _SCALARS:
        return value
    fast = _FAST_ENCODERS.get(kind)
    if fast is not None:
        return fast(value)
    tag = _TAGS.get(kind)
    if tag is not None:
        out = [tag]
        for name in _FIELDS[kind]:
            field = getattr(value, name)
            out.append(field if type(field) in _SCALARS else _encode_value(field))
        added = _ADDED_FIELDS.get(kind)
        if added is not None and getattr(value, added[0]) == added[1]:
            out.pop()
        return out
    if isinstance(value, tuple | list):
        return [_encode_value(item) for item in value]
    if isinstance(value, ErrorCode):
        return int(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"Cannot encode {type(value).__name__} as a metadata value.")


# Per tag, what decoding needs in one lookup: (class, checks, fewest fields, most fields).
_PLANS: dict[int, tuple[type, tuple[_Check, ...], int, int]] = {
    tag: (cls, checks, *_ARITY[tag]) for tag, (cls, checks) in _SCHEMAS.items()
}


# Every member decodes every command it applies, and the leader and the clients encode and
# decode each request and result: the generic walk above (a check function per field, a
# getattr per field) cost several times msgpack's own time. So each schema also gets one
# straight-line function, compiled below from the schema itself (as attrs and namedtuple
# build their methods): decoding tests each scalar field's type inline and calls a check only
# for nested or unusual fields; a value it does not vouch for (a missing optional field, an
# integer where a float goes, anything malformed) takes the generic path, which converts or
# explains. Encoding reads each field by name.
_SCALAR_TESTS: dict[Any, str] = {
    _str: "type({v}) is str",
    _int: "type({v}) is int",
    _bool: "type({v}) is bool",
    # Finite floats only (inf - inf and nan - nan are nan); an int goes the generic way.
    _float: "(type({v}) is float and {v} - {v} == 0.0)",
}


def _fast_test(check: _Check, v: str) -> str | None:
    """A Python expression true only when ``check`` would accept ``v`` unchanged."""
    if check in _SCALAR_TESTS:
        return _SCALAR_TESTS[check].format(v=v)
    inner = getattr(check, "optional", None)
    if inner in _SCALAR_TESTS:
        return f"({v} is None or {_SCALAR_TESTS[inner].format(v=v)})"
    return None


def _compile(name: str, source: str, namespace: dict[str, Any]) -> Callable[..., Any]:
    code = compile(source, f"<dogfs.meta.commands {name}>", "exec")
    exec(code, namespace)  # noqa: S102 - our own schema's source, built just above
    return namespace[name]  # type: ignore[no-any-return]


def _fast_decoder(tag: int, cls: type, checks: tuple[_Check, ...]) -> Callable[[list[Any]], Any]:
    """``cls(...)`` from a raw value of every field, or None: let the generic path decide."""
    names = [f"v{i}" for i in range(len(checks))]
    tests: list[str] = []
    args: list[str] = []
    namespace: dict[str, Any] = {"cls": cls}
    for i, (check, v) in enumerate(zip(checks, names, strict=True)):
        test = _fast_test(check, v)
        if test is None:
            namespace[f"check{i}"] = check
            args.append(f"check{i}({v})")
        else:
            tests.append(test)
            args.append(v)
    unpack = ", ".join(["_", *names]) + ("," if not names else "")
    source = (
        f"def decode_{tag}(raw):\n"
        f"    if len(raw) != {len(checks) + 1}:\n"
        f"        return None\n"
        f"    {unpack} = raw\n"
        + (f"    if not ({' and '.join(tests)}):\n        return None\n" if tests else "")
        + f"    return cls({', '.join(args)})\n"
    )
    return _compile(f"decode_{tag}", source, namespace)


def _fast_encoder(tag: int, cls: type) -> Callable[[Any], list[Any]]:
    """The generic encoding of a ``cls``, field by field (its _ADDED_FIELDS field left out
    when it has its default)."""
    namespace: dict[str, Any] = {"scalars": _SCALARS, "encode": _encode_value}
    fields = [f"value.{name}" for name in _FIELDS[cls]]
    body = [f"    f{i} = {f}\n" for i, f in enumerate(fields)]
    items = [f"(f{i} if type(f{i}) in scalars else encode(f{i}))" for i in range(len(fields))]
    added = _ADDED_FIELDS.get(cls)
    if added is None:
        end = f"    return [{', '.join([str(tag), *items])}]\n"
    else:
        assert added[0] == _FIELDS[cls][-1], f"{cls.__name__}.{added[0]} must be its last field"
        namespace["default"] = added[1]
        last = len(fields) - 1
        end = (
            f"    out = [{', '.join([str(tag), *items])}]\n"
            f"    if f{last} == default:\n        out.pop()\n"
            "    return out\n"
        )
    source = f"def encode_{tag}(value):\n" + "".join(body) + end
    return _compile(f"encode_{tag}", source, namespace)


_FAST_DECODERS: dict[int, Callable[[list[Any]], Any]] = {
    tag: _fast_decoder(tag, cls, checks) for tag, (cls, checks) in _SCHEMAS.items()
}
_FAST_ENCODERS: dict[type, Callable[[Any], list[Any]]] = {
    cls: _fast_encoder(tag, cls) for tag, (cls, _) in _SCHEMAS.items()
}


def _decode_value(raw: Any, allowed: frozenset[int] | None = None) -> Any:
    if type(raw) is not list or not raw:
        raise _bad("value", raw)
    tag = raw[0]
    plan = _PLANS.get(tag) if type(tag) is int else None
    if plan is None or (allowed is not None and tag not in allowed):
        if plan is None and type(tag) is int and allowed is not None and tag in allowed:
            raise UnknownCommand(
                f"Command type {tag} is not one this release knows (a command of a later release?)."
            )
        raise _bad("tag", tag)
    try:
        value = _FAST_DECODERS[tag](raw)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"Malformed {plan[0].__name__}: {e}.") from None
    return value if value is not None else _decode_fields(plan, raw)


def _decode_fields(plan: tuple[type, tuple[_Check, ...], int, int], raw: list[Any]) -> Any:
    """The generic decoding of ``raw`` (a tag and its fields) by ``plan``."""
    cls, checks, least, most = plan
    if len(raw) - 1 > most:
        # This release's leaders encode what they propose, so in the log only a later
        # release's could have written fields this one does not know.
        raise UnknownCommand(
            f"{cls.__name__} with {len(raw) - 1} fields, more than this release knows (one of a later release?)."
        )
    if not least <= len(raw) - 1 <= most:
        raise ValueError(f"Malformed {cls.__name__}: {len(raw) - 1} fields.")
    try:
        return cls(*map(operator.call, checks, islice(raw, 1, None)))
    except ValueError:
        raise
    except Exception as e:
        # attrs converters may raise TypeError and friends: the contract is ValueError only.
        raise ValueError(f"Malformed {cls.__name__}: {e}.") from None


def _unpack(data: bytes) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError("Metadata message is not bytes.")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:
        raise ValueError(f"Metadata message is not valid msgpack: {e}.") from None


def encode_command(cmd: Command) -> bytes:
    """Encode a command for the Raft log (deterministic bytes for equal commands)."""
    if _TAGS.get(type(cmd), 0) not in _COMMAND_TAGS:
        raise TypeError(f"{type(cmd).__name__} is not a metadata command.")
    return packb(_encode_value(cmd))


def command_tag(data: bytes) -> int | None:
    """The type tag of an encoded command, read from its first two bytes without decoding it.

    None when they are not the start of a short array beginning with a small integer (every
    command encodes so): decode the command to learn more, or why it is malformed.
    """
    if len(data) >= 2 and data[0] & 0xF0 == 0x90 and data[1] < 0x80:
        return data[1]
    return None


def tag_of(cls: type) -> int:
    """The type tag of a command or result class (what L{command_tag} returns)."""
    return _TAGS[cls]


def decode_command(data: bytes) -> Command:
    """Decode a command; raise C{ValueError} (only) for anything malformed."""
    try:
        result: Command = _decode_value(_unpack(data), _COMMAND_TAGS)
    except RecursionError:
        raise ValueError("Metadata command is nested too deeply.") from None
    return result


def encode_result(result: Result) -> bytes:
    """Encode a result (or any metadata value above) for the wire."""
    return packb(_encode_value(result))


def decode_result(data: bytes) -> Result:
    """Decode a result; raise C{ValueError} (only) for anything malformed."""
    try:
        result: Result = _decode_value(_unpack(data))
    except RecursionError:
        raise ValueError("Metadata result is nested too deeply.") from None
    return result
