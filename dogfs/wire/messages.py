# -*- test-case-name: tests.test_wire_messages -*-
"""Every DogFS message type, declared once.

A message is a frozen attrs class registered with `@message(TYPE_ID)`. Its header on the wire
is the msgpack array of its fields in declaration order; bulk bytes travel in the frame's
payload, never in the header. Decoding checks the field count and every field's type against
the class's annotations, so a malformed header becomes `MalformedMessage`, never a crash
deeper in the daemon.

Compatibility between releases (docs/protocol.md, "Compatibility"): fields are only ever added
at the end, with a default. A header of an earlier release, without them, decodes with the
defaults; a header of a later release, with fields this release does not know, decodes with
those fields ignored. So either side of a connection may be upgraded first, as long as a
sender relies on a new field's meaning only once its peer has shown that it knows the field.
Releases before forward compatibility refuse extra fields, which `_NEW_LAST` works around.
"""

from __future__ import annotations

import operator
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import msgpack
from attrs import field, frozen

from dogfs.wire.packing import packb

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)


class MalformedMessage(ValueError):
    """A frame's header does not decode to the message its type announces."""


class UnknownMessageType(MalformedMessage):
    """A frame announces a message type this side does not know."""


_M = TypeVar("_M")
_REGISTRY: dict[int, type] = {}
_CHECKERS: dict[type, list[tuple[str, Callable[[Any], bool]]]] = {}
_CHECKS: dict[type, tuple[Callable[[Any], bool], ...]] = {}
_GETTERS: dict[type, Callable[[Any], tuple[Any, ...]]] = {}
#: Fields a header must carry at least: up to the last one without a default.
_REQUIRED: dict[type, int] = {}


def message(type_id: int) -> Callable[[type[_M]], type[_M]]:
    """Register an attrs class as the message with wire type `type_id`."""

    def register(cls: type[_M]) -> type[_M]:
        if type_id in _REGISTRY:
            raise RuntimeError(f"message type {type_id} is declared twice")
        _REGISTRY[type_id] = cls
        cls.TYPE = type_id  # type: ignore[attr-defined]
        return cls

    return register


def type_of(msg: object) -> int:
    """The wire type id of a message instance."""
    return type(msg).TYPE  # type: ignore[attr-defined,no-any-return]


def encode(msg: object) -> bytes:
    """The msgpack header of a message.

    The last fields of a message in `_NEW_LAST` are left out while they are None, so that a
    peer of a release before them, whose decoder refuses fields it does not know, still reads
    the message.
    """
    cls = type(msg)
    values = _values(cls)(msg)
    new = _NEW_LAST.get(cls)
    if new:
        end = len(values)
        while end > len(values) - new and values[end - 1] is None:
            end -= 1
        values = values[:end]
    return packb(values)


def _values(cls: type) -> Callable[[Any], tuple[Any, ...]]:
    """A function from a message of class `cls` to its field values, in order (cached)."""
    found = _GETTERS.get(cls)
    if found is None:
        names = [a.name for a in attrs.fields(cls)]
        if len(names) > 1:
            found = operator.attrgetter(*names)
        elif names:
            one = operator.attrgetter(names[0])
            found = lambda msg: (one(msg),)  # noqa: E731 - attrgetter of one name gives no tuple
        else:
            found = lambda msg: ()  # noqa: E731
        _GETTERS[cls] = found
    return found


def decode(type_id: int, header: bytes) -> Any:
    """Rebuild the message of type `type_id` from its header, checking every field."""
    cls = _REGISTRY.get(type_id)
    if cls is None:
        raise UnknownMessageType(f"unknown message type {type_id}")
    try:
        values = msgpack.unpackb(header, raw=False, use_list=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise MalformedMessage(f"{cls.__name__}: header is not valid msgpack ({e})") from None
    checkers = _checkers(cls)
    if type(values) is not tuple or len(values) < _REQUIRED[cls]:
        raise MalformedMessage(f"{cls.__name__}: expected {len(checkers)} fields")
    if len(values) > len(checkers):
        # A peer of a later release: the fields it added are ignored, whatever they hold (a
        # header is at most FrameLimits.max_header bytes, so they cost no more than that).
        values = values[: len(checkers)]
    # Every field through its check in one pass of C (map), not a Python loop: every frame
    # of every connection is decoded here. A header short of the last fields (a peer of an
    # earlier release: fields are only ever added at the end, with a default) has the
    # present ones checked.
    if not all(map(operator.call, _CHECKS[cls], values)):
        for (name, check), value in zip(checkers, values, strict=False):
            if not check(value):
                raise MalformedMessage(f"{cls.__name__}: field {name!r} has the wrong type")
    try:
        return cls(*values)
    except (TypeError, ValueError) as e:
        raise MalformedMessage(f"{cls.__name__}: {e}") from None


def _checkers(cls: type) -> list[tuple[str, Callable[[Any], bool]]]:
    found = _CHECKERS.get(cls)
    if found is None:
        hints = typing.get_type_hints(cls)
        fields = attrs.fields(cls)
        found = [(a.name, _checker(hints[a.name])) for a in fields]
        _CHECKERS[cls] = found
        _CHECKS[cls] = tuple(check for _, check in found)
        # How many fields a header must carry: those up to the last one without a default.
        required = [i for i, a in enumerate(fields) if a.default is attrs.NOTHING]
        _REQUIRED[cls] = required[-1] + 1 if required else 0
    return found


def _checker(tp: Any) -> Callable[[Any], bool]:
    """A predicate for values of annotation `tp` as msgpack decodes them."""
    if tp is Any:
        return lambda v: True
    if tp is type(None):
        return lambda v: v is None
    if tp in (bool, str, bytes):
        # The type's own isinstance check, bound: called from C, no Python frame per field.
        return tp.__instancecheck__  # type: ignore[no-any-return]
    if tp is int:
        return lambda v: isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [_checker(a) for a in args]
        return lambda v: any(c(v) for c in options)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = _checker(args[0])
            return lambda v: isinstance(v, tuple) and all(item(x) for x in v)
        items = [_checker(a) for a in args]
        return lambda v: (
            isinstance(v, tuple)
            and len(v) == len(items)
            and all(c(x) for c, x in zip(items, v, strict=True))
        )
    if origin is dict:
        key, val = (_checker(a) for a in args)
        return lambda v: isinstance(v, dict) and all(key(k) and val(x) for k, x in v.items())
    raise TypeError(f"unsupported message field type {tp!r}")


def _tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value)


def _optional_tuple(value: Any) -> tuple[Any, ...] | None:
    return None if value is None else tuple(value)


# --- connection --------------------------------------------------------------------------


@message(1)
@frozen
class Hello:
    """First frame each side sends: the protocol versions it speaks and who it is."""

    versions: tuple[int, ...] = field(converter=_tuple, default=SUPPORTED_VERSIONS)
    agent: str = "dogfs"
    node_id: str | None = None


@message(2)
@frozen
class Error:
    """Ends a request with a failure. `code` is stable; `message` is one sentence for people."""

    code: str
    message: str
    details: dict[str, Any] = field(factory=dict)


@message(3)
@frozen
class Ok:
    """An empty successful reply."""


@message(4)
@frozen
class Cell:
    """One cell of a shard in a streamed transfer; the bytes are the frame's payload.

    `crc` is the CRC32C of the payload, computed by the writer when it encoded the cell and
    checked by every reader, so corruption on disk or on the wire never goes unnoticed.
    """

    index: int
    crc: int


# --- client and chunk server to metadata -------------------------------------------------


@message(10)
@frozen
class MetaCommand:
    """A namespace mutation; the payload is a command encoded by dogfs.meta.commands.

    `client_id` and `seq` make a retried command take effect once (Raft client sessions).
    `wants_tokens`: the client reads an `Allocation`'s block token (a client of a release
    before block tokens reads a 3-field `Allocation` only, and is sent one).
    """

    client_id: str
    seq: int
    wants_tokens: bool = False


@message(11)
@frozen
class MetaQuery:
    """A read of metadata: `op` is stat, list, status, ...; args depend on the op."""

    op: str
    path: str = ""
    args: dict[str, Any] = field(factory=dict)


@message(12)
@frozen
class MetaReply:
    """The result of a MetaCommand or MetaQuery, encoded in the payload by dogfs.meta."""

    leader_hint: str | None = None


@message(20)
@frozen
class Heartbeat:
    """A chunk server's periodic report of itself to the metadata leader."""

    node_id: str
    address: str
    capacity_bytes: int
    used_bytes: int
    shards: int
    load: dict[str, float] = field(factory=dict)
    domain: str | None = None
    #: The cluster whose shards this server holds (`HeartbeatReply.cluster_id`, as first
    #: named to it and kept in its data directory); "" before any was named, and None
    #: (left out) from a server of a release before cluster ids.
    cluster_id: str | None = None
    #: True from a server that checks block tokens (dogfs.security.tokens): the reply then
    #: carries the cluster's block key.
    wants_block_key: bool = False


@message(21)
@frozen
class HeartbeatReply:
    """Sent back to a heartbeat: who leads, and whether a full shard report is wanted.

    `revoked` is the cluster's revocation list (identity names, and ``serial:N`` for single
    certificates), so chunk servers refuse and cut the same identities as the metadata. None
    means "no news": a leader not yet sure its state holds every committed revocation sends
    None, and the chunk server keeps the list it has.

    `cluster_id` names the cluster (chosen once, when its namespace is new): a chunk server
    keeps the first one it is told, and reports its shards to no other cluster, which would
    call them all garbage. None: not chosen yet (or an older release).

    `block_key` is the cluster's block key (dogfs.security.tokens), sent to a server whose
    heartbeat asks for it (`wants_block_key`): with it the server checks that each upload
    it takes was allocated. None: not chosen yet, or not asked for.
    """

    leader_hint: str | None = None
    want_report: bool = False
    revoked: tuple[str, ...] | None = field(default=None, converter=_optional_tuple)
    cluster_id: str | None = None
    block_key: str | None = None


#: What a cluster id (`HeartbeatReply.cluster_id`) is made of: 1 to 64 of these.
CLUSTER_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_.")


def valid_cluster_id(value: object) -> bool:
    """Whether ``value`` may name a cluster: 1 to 64 letters, digits, ``-``, ``_`` or ``.``."""
    return isinstance(value, str) and 0 < len(value) <= 64 and CLUSTER_ID_CHARS.issuperset(value)


#: Damaged shard ids one ShardReport names at most: they travel in the header (64 KiB at
#: most), about 20 bytes each. More wait for later reports, as these are collected.
MAX_DAMAGED = 1000


@message(22)
@frozen
class ShardReport:
    """Part of a chunk server's list of held shards; the payload is newline-separated ids.

    `damaged` (the last batch only; at most `MAX_DAMAGED`) names shards the server still has
    files of but found damaged, which the payload leaves out (so the leader rebuilds them
    elsewhere): the reply names those no longer placed on the server unreferenced too, and
    they are collected. `report` numbers the server's reports: every batch of one carries the
    same, so that a late batch of an abandoned report is never taken for part of the next.
    `cluster_id` is the server's (see `Heartbeat`): a leader of another cluster refuses the
    report rather than call every shard in it garbage.
    """

    node_id: str
    batch: int
    last: bool
    damaged: tuple[str, ...] = field(default=(), converter=_tuple)
    report: int = 0
    cluster_id: str | None = None


@message(23)
@frozen
class ShardReportReply:
    """Shard ids (newline-separated, in the payload) that the metadata no longer references."""


# --- client to chunk server -------------------------------------------------------------


@message(30)
@frozen
class PutShard:
    """Opens a streamed shard upload; Cell frames follow, then PutShardEnd.

    `token` is the block token of the shard's block group, from its `Allocation`
    (dogfs.security.tokens): with TLS, a chunk server takes an upload from an identity other
    than a node only with the right one.
    """

    shard_id: str
    policy: str
    index: int
    fragment_size: int
    token: str | None = None


@message(31)
@frozen
class PutShardEnd:
    """Last frame of an upload: the chunk server fsyncs and then acknowledges."""

    cells: int


@message(32)
@frozen
class ShardStored:
    """The shard is durable on the chunk server."""

    shard_id: str
    size: int


@message(33)
@frozen
class GetShard:
    """Read `count` cells of a shard from `first`; answered by Cell frames then GetShardEnd."""

    shard_id: str
    first: int = 0
    count: int = -1


@message(34)
@frozen
class GetShardEnd:
    """Last frame of a shard read."""

    cells: int


@message(35)
@frozen
class DeleteShards:
    """Remove these shards if present (garbage collection, tests)."""

    shard_ids: tuple[str, ...] = field(converter=_tuple)


# --- metadata leader to chunk server ------------------------------------------------------


@message(36)
@frozen
class RebuildShard:
    """Repair (node role only): rebuild shard `index` of a block group from the others, or
    copy it from a server that still holds it, and store it on this chunk server; answered
    with ShardStored once it is durable.

    `shard_id` is the id of the shard to make. `group_size` is the block group's byte size and
    `cell_size` the cell its stripes were cut with (the cluster's), which together give every
    stripe's length. `sources` are shards of the group as (index, shard id, address), the
    preferred first: the server reads `k` of the others and falls back on the rest when one
    fails. `sources` may also name, once, the shard itself (`index`, `shard_id`) at another
    server (a copy source, to move a shard still readable): it is read first and its cells
    copied as they are (one shard's bytes on the network, no decoding); the others are used,
    from the batch where it failed, only if it fails. Either the shard itself or at least `k`
    others must be named.
    """

    shard_id: str
    policy: str
    index: int
    group_size: int
    cell_size: int
    sources: tuple[tuple[int, str, str], ...] = field(converter=_tuple)


# --- Raft peers ---------------------------------------------------------------------------


@message(40)
@frozen
class RaftEnvelope:
    """A Raft message for group `group`; the payload is dogfs.raft's own encoding."""

    group: str


#: Messages whose last fields (how many) were added since releases whose decoders refuse
#: fields they do not know: they are left out of the header while they are None (see
#: `encode`). A chunk server sends `Heartbeat.cluster_id` ("" while it keeps none) and
#: `wants_block_key`, and only such a server is told the cluster's id and block key: a
#: server of a release before gets the 3- or 4-field `HeartbeatReply` it can read. A
#: client sends `PutShard.token` only with TLS, so without TLS its uploads read on a chunk
#: server of such a release. (`Heartbeat` and `MetaCommand` are not here: their last fields
#: are never None, and metadata nodes are upgraded first, docs/operations.md.)
_NEW_LAST: dict[type, int] = {HeartbeatReply: 2, ShardReport: 1, PutShard: 1}
