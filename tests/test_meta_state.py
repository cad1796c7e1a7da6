"""Tests for the metadata namespace: paths, the command codec and the LMDB state machine."""

from __future__ import annotations

import os
import random
from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dogfs.meta import commands, paths
from dogfs.meta import state as state_module
from dogfs.meta.commands import (
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
    RemoveChunkServer,
    Rename,
    RenewAllocations,
    Revoke,
    Sessioned,
    SetBlockKey,
    SetClusterId,
    SetDefaultPolicy,
    SetLogVersion,
    ShardLocation,
    Summary,
    canonical_policy,
    decode_command,
    decode_result,
    encode_command,
    encode_result,
    parse_policy,
    parse_shard_id,
    shard_id,
)
from dogfs.meta.state import SESSION_HARD_LIMIT, SESSION_MIN_AGE, NamespaceState, RaftStateMachine
from dogfs.raft.core import Configuration, Entry, EntryKind, Snapshot, SnapshotMeta
from dogfs.raft.driver import IRaftStateMachine
from dogfs.security.tokens import block_token, valid_block_token

SERVERS = tuple(f"chunk-{i}" for i in range(8))


# --- paths ----------------------------------------------------------------------------------


class PathTests(SynchronousTestCase):
    """Validation and normalisation of namespace paths."""

    def test_valid(self) -> None:
        """Valid paths normalise to themselves, a trailing slash is dropped, root stays '/'."""
        self.assertEqual(paths.normalize("/"), "/")
        self.assertEqual(paths.normalize("/a"), "/a")
        self.assertEqual(paths.normalize("/a/"), "/a")
        self.assertEqual(paths.normalize("/a/b c/é"), "/a/b c/é")
        self.assertEqual(paths.split("/a/b/"), ("a", "b"))
        self.assertEqual(paths.split("/"), ())
        self.assertEqual(paths.parent_and_name("/a/b"), ("/a", "b"))
        self.assertEqual(paths.parent_and_name("/a"), ("/", "a"))

    def test_invalid(self) -> None:
        """Each kind of bad path raises InvalidPath, a ValueError, with a one-sentence message."""
        bad = [
            "",
            "a/b",
            "//",
            "/a//b",
            "/a/./b",
            "/a/..",
            "/.",
            "/a\x00b",
            "/\udc80",
            "/" + "x" * 256,
            "/" + "/".join(["y" * 200] * 21),
            "/a//",
        ]
        for path in bad:
            with self.assertRaises(paths.InvalidPath, msg=repr(path)) as caught:
                paths.normalize(path)
            self.assertIsInstance(caught.exception, ValueError)
            message = str(caught.exception)
            self.assertTrue(message.endswith("."), message)
            self.assertNotIn("\n", message)
        self.assertRaises(paths.InvalidPath, paths.parent_and_name, "/")
        self.assertRaises(paths.InvalidPath, paths.normalize, b"/a")

    def test_limits(self) -> None:
        """A 255-byte component and a 4096-byte path are accepted; one more byte is not."""
        paths.normalize("/" + "n" * 255)
        long_path = "/" + "/".join(["z" * 254] * 16)
        long_path += "/" + "q" * (4096 - len(long_path) - 1)
        self.assertEqual(len(long_path.encode()), 4096)
        paths.normalize(long_path)
        self.assertRaises(paths.InvalidPath, paths.normalize, long_path + "q")
        # Multi-byte characters count as bytes, not characters.
        self.assertRaises(paths.InvalidPath, paths.normalize, "/" + "é" * 128)

    @settings(deadline=None, max_examples=200)
    @given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
    def test_normalize_idempotent(self, text: str) -> None:
        """normalize either refuses a string or returns a fixed point of itself."""
        try:
            once = paths.normalize(text)
        except paths.InvalidPath:
            return
        self.assertEqual(paths.normalize(once), once)
        self.assertEqual(paths.join(paths.split(once)), once)


# --- codec ----------------------------------------------------------------------------------

_names = st.text(min_size=0, max_size=12)
_floats = st.floats(allow_nan=False, allow_infinity=False)
_u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


def _command_strategy(_names: Any, _ints: Any) -> Any:
    """Commands whose strings come from C{_names} and integers from C{_ints}."""
    return st.one_of(
        st.builds(Mkdir, _names, st.booleans(), st.none() | _names, _floats),
        st.builds(SetDefaultPolicy, _names, st.booleans()),
        st.builds(RegisterChunkServer, _names, _names, st.none() | _names),
        st.builds(Allocate, _names, st.none() | _names, st.tuples(_names, _names), _floats),
        st.builds(
            CommitFile,
            _names,
            _ints,
            st.lists(st.tuples(_ints, _ints), max_size=4).map(tuple),
            _floats,
            st.none() | _names,
            st.none() | _ints,
        ),
        st.builds(Delete, _names, st.booleans()),
        st.builds(Rename, _names, _names),
        st.builds(ExpireAllocations, _floats),
        st.builds(RenewAllocations, st.lists(_ints, max_size=4).map(tuple), _floats),
        st.builds(MoveShard, _ints, _ints, _names, _names),
        st.builds(DrainChunkServer, _names, st.booleans()),
        st.builds(RemoveChunkServer, _names, st.booleans()),
        st.builds(SetClusterId, _names),
        st.builds(SetBlockKey, st.sampled_from(["0f" * 32, "x" * 64, ""]) | _names),
        # Only versions this release applies: a higher one halts the member (test_meta_versions).
        st.builds(SetLogVersion, st.integers(0, commands.LOG_VERSION)),
    )


_commands = _command_strategy(_names, _u64)
# Strings that often mean something to the state (real paths, servers, policies), so that
# arbitrary commands get past validation and exercise the handlers.
_meaningful = (
    st.sampled_from(
        ["/", "/a", "/a/b", "/a/b/", "/c", "chunk-0", "chunk-1", "chunk-2", "RS-2-1", "rs-1-1", ""]
    )
    | _names
)
_meaningful_commands = _command_strategy(_meaningful, st.integers(0, 8) | _u64)
_meaningful_commands = _meaningful_commands | st.builds(
    Sessioned, _meaningful, st.integers(0, 3), _meaningful_commands
)
_commands = _commands | st.builds(Sessioned, _names, _u64, _commands)
_shards = st.lists(st.builds(ShardLocation, _u64, _names, _names, _names), max_size=3).map(tuple)
_bgs = st.lists(st.builds(BlockGroupInfo, _u64, _u64, _names, _shards), max_size=2).map(tuple)
_results = st.one_of(
    st.just(Ok()),
    st.builds(Count, _u64),
    st.builds(MetaError, st.sampled_from(ErrorCode), _names),
    st.builds(DirInfo, _names, _names, _floats),
    st.builds(FileInfo, _names, _u64, _names, _floats, _u64, _bgs),
    st.builds(Allocation, _u64, _names, _shards),
    st.builds(
        Listing,
        _names,
        st.lists(
            st.builds(EntryInfo, _names, _names, _names, _u64, _names, _floats, _u64), max_size=3
        ).map(tuple),
        st.booleans(),
    ),
    st.builds(ChunkServerRecord, _names, _names, st.none() | _names, st.booleans()),
    st.builds(
        Summary,
        _u64,
        _u64,
        _u64,
        _u64,
        _u64,
        _u64,
        st.lists(st.tuples(_u64, _u64), max_size=3).map(tuple),
    ),
)
_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | _floats
    | _names
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_names, inner, max_size=3),
    max_leaves=12,
)


class CodecTests(SynchronousTestCase):
    """The msgpack codec of commands and results."""

    @settings(deadline=None, max_examples=150)
    @given(_commands)
    def test_command_roundtrip(self, command: Command) -> None:
        """Every command decodes to an equal command, and encoding is deterministic."""
        data = encode_command(command)
        self.assertEqual(decode_command(data), command)
        self.assertEqual(encode_command(decode_command(data)), data)
        # The tag read without decoding is the command's own.
        self.assertEqual(commands.command_tag(data), commands.tag_of(type(command)))

    @settings(deadline=None, max_examples=150)
    @given(_results)
    def test_result_roundtrip(self, result: Any) -> None:
        """Every result decodes to an equal result."""
        self.assertEqual(decode_result(encode_result(result)), result)

    @settings(deadline=None, max_examples=200)
    @given(st.binary(max_size=64))
    def test_garbage_bytes(self, data: bytes) -> None:
        """Arbitrary bytes either decode or raise ValueError, never another exception."""
        for decode in (decode_command, decode_result):
            try:
                decode(data)
            except ValueError:
                pass

    @settings(deadline=None, max_examples=300)
    @given(st.integers(min_value=0, max_value=80), st.lists(_msgpack_values, max_size=8))
    def test_malformed_structures(self, tag: int, fields: list[Any]) -> None:
        """Well-formed msgpack of the wrong shape raises ValueError only."""
        import msgpack

        data = msgpack.packb([tag, *fields], use_bin_type=True)
        for decode in (decode_command, decode_result):
            try:
                decode(data)
            except ValueError:
                pass

    @settings(deadline=None, max_examples=400)
    @given(
        st.sampled_from(sorted(commands._SCHEMAS)),
        st.lists(_msgpack_values | st.sampled_from([0.5, 1, -1, True, None, "x", float("nan")]), max_size=8),
    )
    def test_compiled_decoders_agree(self, tag: int, fields: list[Any]) -> None:
        """Each schema's compiled decoder, where it answers, answers as the generic walk
        does; and where the generic walk refuses a value, so does it."""
        raw = [tag, *fields]
        plan = commands._PLANS[tag]
        try:
            expected: Any = commands._decode_fields(plan, raw)
        except ValueError:
            expected = ValueError
        try:
            fast = commands._FAST_DECODERS[tag](raw)
        except (ValueError, TypeError):
            fast = ValueError
        if fast is not None:
            self.assertEqual(fast, expected)
        # The public decoder gives the generic answer in every case.
        try:
            decoded: Any = commands._decode_value(raw)
        except ValueError:
            decoded = ValueError
        self.assertEqual(decoded, expected)

    @settings(deadline=None, max_examples=150)
    @given(_commands | _results)
    def test_compiled_encoders_agree(self, value: Any) -> None:
        """The compiled encoders produce the generic encoding, field by field."""
        fast = commands._FAST_ENCODERS.get(type(value))
        if fast is not None:
            tag = commands._TAGS[type(value)]
            generic = [tag, *(commands._encode_value(getattr(value, n)) for n in commands._FIELDS[type(value)])]
            added = commands._ADDED_FIELDS.get(type(value))
            if added is not None and getattr(value, added[0]) == added[1]:
                generic.pop()  # a field added later is left out at its default
            self.assertEqual(fast(value), generic)
        self.assertEqual(commands._decode_value(commands._encode_value(value)), value)

    def test_specific_malformed(self) -> None:
        """Wrong types, bools for ints, result tags as commands and short arrays are refused."""
        import msgpack

        cases = [
            [1, 5],
            [1, "/a", 1],
            [5, "/a", True, [], 0.0],
            [5, "/a", 1, [[1]], 0.0],
            [64],
            [7, "/a"],
            [9, 1, 2, "a", "b", "extra", "more"],
            [8, float("inf")],
            {"a": 1},
            [],
            [200],
        ]
        for case in cases:
            self.assertRaises(ValueError, decode_command, msgpack.packb(case, use_bin_type=True))
        self.assertRaises(ValueError, decode_command, b"\xc1")
        self.assertRaises(ValueError, decode_command, "not bytes")  # type: ignore[arg-type]
        self.assertRaises(TypeError, encode_command, Ok())  # type: ignore[arg-type]

    def test_older_encoding(self) -> None:
        """An encoding without trailing defaulted fields (an older writer) still decodes."""
        import msgpack

        data = msgpack.packb([5, "/a", 3, [[1, 3]]], use_bin_type=True)
        self.assertEqual(decode_command(data), CommitFile("/a", 3, ((1, 3),)))

    def test_policy_and_shard_ids(self) -> None:
        """Policy names parse to (k, m); shard ids are 16 hex digits, a dash and 2 digits."""
        self.assertEqual(parse_policy("RS-4-2"), (4, 2))
        self.assertEqual(parse_policy("RS-10-4"), (10, 4))
        self.assertEqual(canonical_policy(" rs-04-2"), "RS-4-2")
        self.assertEqual(parse_policy("RS-30-2"), (30, 2))
        for bad in ["RS-0-2", "RS-4-0", "RS-31-2", "RS-4", "RS-1000-1", "XOR-4-2", 42]:
            self.assertRaises(ValueError, parse_policy, bad)
        self.assertEqual(shard_id(0xAB, 3), "00000000000000ab-03")
        self.assertEqual(parse_shard_id("00000000000000ab-03"), (0xAB, 3))
        self.assertIsNone(parse_shard_id("ab-03"))
        self.assertIsNone(parse_shard_id("00000000000000AB-03"))

    def test_json_views(self) -> None:
        """FileInfo.to_json has the keys `dogfs stat --json` promises."""
        info = FileInfo(
            "/f",
            5,
            "RS-2-1",
            1.0,
            7,
            (BlockGroupInfo(1, 5, "RS-2-1", (ShardLocation(0, "x", "chunk-1", "h:1"),)),),
        )
        data = info.to_json()
        self.assertEqual(data["type"], "file")
        shard = data["block_groups"][0]["shards"][0]
        self.assertEqual(
            (shard["index"], shard["shard_id"], shard["chunk_server"]), (0, "x", "chunk-1")
        )
        self.assertEqual(DirInfo("/", "RS-4-2", 0.0).to_json()["size"], 0)


# --- the state machine ----------------------------------------------------------------------


class StateTestCase(SynchronousTestCase):
    """Helpers: fresh states under the test's temporary directory and a log index counter."""

    def setUp(self) -> None:
        self.index = 0
        self.state = self.make_state()

    def make_state(self) -> NamespaceState:
        state = NamespaceState(self.mktemp(), durable=False, map_size=1 << 26)
        state.open()
        self.addCleanup(state.close)
        return state

    def run_(self, command: Any, state: NamespaceState | None = None) -> Any:
        self.index += 1
        return (state or self.state).apply(self.index, command)

    def ok(self, command: Any) -> Any:
        result = self.run_(command)
        if isinstance(result, MetaError):
            self.fail(f"{command!r} failed: {result!r}")
        return result

    def error(self, command: Any, code: ErrorCode) -> MetaError:
        result = self.run_(command)
        self.assertIsInstance(result, MetaError, repr(result))
        self.assertEqual(result.code, code, result.message)
        self.assertTrue(result.message.endswith("."), result.message)
        return result  # type: ignore[no-any-return]

    def register(self, count: int = 6) -> None:
        for node in SERVERS[:count]:
            self.ok(RegisterChunkServer(node, f"127.0.0.1:{9000 + SERVERS.index(node)}"))

    def upload(self, path: str, sizes: list[int], ec: str | None = "RS-2-1", now: float = 1.0):
        """Allocate one block group per size and commit them; return the commit result."""
        groups = []
        for size in sizes:
            inherited = self.state.stat(paths.parent_and_name(path)[0]).ec  # type: ignore[union-attr]
            k, m = parse_policy(ec or inherited)
            alloc = self.ok(Allocate(path, ec, SERVERS[: k + m], now))
            groups.append((alloc.bg_id, size))
        return self.run_(CommitFile(path, sum(sizes), tuple(groups), now))


class NamespaceTests(StateTestCase):
    """Commands and reads of NamespaceState on one replica."""

    def test_fresh(self) -> None:
        """A fresh state has only the root, applied index 0, and default policy RS-4-2."""
        self.assertEqual(self.state.applied_index, 0)
        self.assertEqual(self.state.stat("/"), DirInfo("/", "RS-4-2", 0.0))
        self.assertEqual(self.state.list("/"), [])
        self.assertEqual(self.state.summary(), Summary(0, 1, 0, 0, 0, 0, ()))
        self.assertEqual(self.state.chunk_servers(), [])

    def test_fresh_states_identical(self) -> None:
        """Two fresh states have the same digest; open() twice does not change it."""
        other = self.make_state()
        self.assertEqual(self.state.digest(), other.digest())
        other.open()
        self.assertEqual(self.state.digest(), other.digest())

    def test_mkdir(self) -> None:
        """mkdir creates one level; EXISTS when present; -p creates ancestors and accepts one."""
        self.assertEqual(self.ok(Mkdir("/a", now=3.0)), DirInfo("/a", "RS-4-2", 3.0))
        self.error(Mkdir("/a"), ErrorCode.EXISTS)
        self.error(Mkdir("/x/y"), ErrorCode.NOT_FOUND)
        self.assertEqual(self.ok(Mkdir("/a/b/c/", parents=True)).path, "/a/b/c")
        self.assertEqual(self.ok(Mkdir("/a/b", parents=True)).path, "/a/b")
        self.error(Mkdir("/"), ErrorCode.EXISTS)
        self.assertEqual(self.ok(Mkdir("/", parents=True)).path, "/")
        self.assertEqual([e.name for e in self.state.list("/a")], ["b"])  # type: ignore[union-attr]
        self.assertEqual(self.state.summary().dirs, 4)

    def test_mkdir_parents_keeps_policy_honest(self) -> None:
        """mkdir -p on an existing directory with another policy is refused (the caller would
        believe the policy changed); with the policy it has (its own or inherited), it is fine."""
        self.ok(Mkdir("/d", ec="RS-2-1", now=1.0))
        self.ok(Mkdir("/d/e", now=1.0))
        error = self.error(Mkdir("/d", parents=True, ec="RS-6-3"), ErrorCode.EXISTS)
        self.assertIn("already exists with policy RS-2-1", error.message)
        self.assertEqual(self.ok(Mkdir("/d", parents=True, ec="RS-2-1")).ec, "RS-2-1")
        self.assertEqual(self.ok(Mkdir("/d/e", parents=True, ec="RS-2-1")).ec, "RS-2-1")
        self.assertEqual(self.ok(Mkdir("/d", parents=True)).ec, "RS-2-1")

    def test_mkdir_under_file(self) -> None:
        """A file in the way gives EXISTS for the last component, NOT_A_DIRECTORY above it."""
        self.register()
        self.upload("/f", [10])
        self.error(Mkdir("/f"), ErrorCode.EXISTS)
        self.error(Mkdir("/f", parents=True), ErrorCode.EXISTS)
        self.error(Mkdir("/f/g", parents=True), ErrorCode.NOT_A_DIRECTORY)
        self.error(Mkdir("/f/g"), ErrorCode.NOT_A_DIRECTORY)

    def test_invalid_path_and_argument(self) -> None:
        """Bad paths give INVALID_PATH; bad policies INVALID_ARGUMENT, for every command."""
        for command in [
            Mkdir("a"),
            Mkdir("/a/../b"),
            Allocate("//x", None, ()),
            CommitFile("/a\x00", 0, ()),
            Delete("/a/."),
            Rename("/a", "b"),
        ]:
            self.error(command, ErrorCode.INVALID_PATH)
        self.error(Mkdir("/a", ec="RS-x"), ErrorCode.INVALID_ARGUMENT)
        self.error(Mkdir("/a", ec="RS-30-3"), ErrorCode.INVALID_ARGUMENT)
        self.error(SetDefaultPolicy("RAID5"), ErrorCode.INVALID_ARGUMENT)
        self.error(RegisterChunkServer("", "a:1"), ErrorCode.INVALID_ARGUMENT)

    def test_ec_inheritance(self) -> None:
        """Files take their directory's nearest explicit policy, else the cluster default."""
        self.register(8)
        self.ok(Mkdir("/p", ec="RS-3-2"))
        self.ok(Mkdir("/p/q/r", parents=True))
        self.assertEqual(self.state.stat("/p/q/r").ec, "RS-3-2")  # type: ignore[union-attr]
        alloc = self.ok(Allocate("/p/q/r/f", None, SERVERS[:5], 1.0))
        self.assertEqual((alloc.ec, len(alloc.shards)), ("RS-3-2", 5))
        self.assertEqual(self.ok(Allocate("/top", None, SERVERS[:6], 1.0)).ec, "RS-4-2")
        self.ok(SetDefaultPolicy("RS-6-2"))
        self.assertEqual(self.state.stat("/").ec, "RS-6-2")  # type: ignore[union-attr]
        self.assertEqual(self.state.stat("/p/q").ec, "RS-3-2")  # type: ignore[union-attr]
        self.assertEqual(self.ok(Allocate("/top", None, SERVERS[:8], 1.0)).ec, "RS-6-2")
        # Policies are stored under their canonical names.
        self.assertEqual(self.ok(Mkdir("/lower", ec="rs-02-1")).ec, "RS-2-1")
        self.assertEqual(self.ok(Allocate("/lower/f", "rs-2-1", SERVERS[:3], 1.0)).ec, "RS-2-1")
        # An explicit policy at upload beats inheritance.
        self.assertEqual(self.ok(Allocate("/p/f", "RS-2-1", SERVERS[:3], 1.0)).ec, "RS-2-1")
        # An empty file takes its directory's policy.
        info = self.ok(CommitFile("/p/q/empty", 0, (), 2.0))
        self.assertEqual((info.ec, info.size, info.block_groups), ("RS-3-2", 0, ()))

    def test_block_key_set_once_and_allocations_carry_tokens(self) -> None:
        """The first SetBlockKey applied stands (later ones change nothing: tokens given out
        use it); a key that is not 64 lower-case hex digits is refused. An allocation carries
        its block group's token under the key (None before there is one), the same on every
        member, and the key travels in snapshots."""
        self.register(6)
        before = self.ok(Allocate("/f", None, SERVERS[:6], 1.0))
        self.assertIsNone(before.token)
        self.assertIsNone(self.state.block_key())
        for bad in ("", "0f" * 31, "0F" * 32, "g" * 64, "0f" * 33):
            self.error(SetBlockKey(bad), ErrorCode.INVALID_ARGUMENT)
        key = "5a" * 32
        self.ok(SetBlockKey(key))
        self.ok(SetBlockKey("0f" * 32))
        self.assertEqual(self.state.block_key(), key)
        after = self.ok(Allocate("/f", None, SERVERS[:6], 2.0))
        self.assertEqual(after.token, block_token(key, after.bg_id))
        self.assertTrue(valid_block_token(key, after.bg_id, after.token))
        self.assertFalse(valid_block_token(key, before.bg_id, after.token))
        restored = self.make_state()
        restored.load(self.state.dump())
        self.assertEqual(restored.block_key(), key)

    def test_cluster_id_set_once(self) -> None:
        """The first SetClusterId applied names the cluster for good, later ones change
        nothing (chunk servers keep the first); an id that is not 1 to 64 letters, digits,
        '-', '_' or '.' is refused; the id travels in snapshots."""
        self.assertIsNone(self.state.cluster_id())
        for bad in ("", "x" * 65, "a b", "é", "a/b"):
            self.error(SetClusterId(bad), ErrorCode.INVALID_ARGUMENT)
        self.assertIsNone(self.state.cluster_id())
        self.ok(SetClusterId("5f0c2a9e-1b7d-4c3e-9a1f-0d2b3c4e5f60"))
        self.ok(SetClusterId("another-one"))
        self.assertEqual(self.state.cluster_id(), "5f0c2a9e-1b7d-4c3e-9a1f-0d2b3c4e5f60")
        fresh = self.make_state()
        self.assertEqual(fresh.apply_batch([(1, SetClusterId("first")), (2, SetClusterId("second"))]), [Ok(), Ok()])
        self.assertEqual(fresh.cluster_id(), "first")
        restored = self.make_state()
        restored.load(self.state.dump())
        self.assertEqual(restored.cluster_id(), "5f0c2a9e-1b7d-4c3e-9a1f-0d2b3c4e5f60")

    def test_seeded_default_policy_never_replaces_a_chosen_one(self) -> None:
        """A seed (a new leader's config default) sets the default only if none was ever
        set, as the state holds it when the seed applies, even in the batch of the choice
        it would undo; an unconditional SetDefaultPolicy still replaces it."""
        self.assertFalse(self.state.default_policy_set())
        self.ok(SetDefaultPolicy("RS-3-2", seed=True))
        self.assertEqual(self.state.default_policy(), "RS-3-2")
        self.ok(SetDefaultPolicy("RS-2-1", seed=True))
        self.assertEqual(self.state.default_policy(), "RS-3-2")
        fresh = self.make_state()
        results = fresh.apply_batch(
            [(1, SetDefaultPolicy("RS-6-3")), (2, SetDefaultPolicy("RS-4-2", seed=True))]
        )
        self.assertEqual(results, [Ok(), Ok()])
        self.assertEqual(fresh.default_policy(), "RS-6-3")
        self.ok(SetDefaultPolicy("RS-2-1"))
        self.assertEqual(self.state.default_policy(), "RS-2-1")
        self.error(SetDefaultPolicy("RAID5", seed=True), ErrorCode.INVALID_ARGUMENT)
        # Without a seed the command encodes as it did before the field existed.
        self.assertEqual(msgpack.unpackb(encode_command(SetDefaultPolicy("RS-4-2"))), [2, "RS-4-2"])
        seeded = SetDefaultPolicy("RS-4-2", seed=True)
        self.assertEqual(decode_command(encode_command(seeded)), seeded)

    def test_allocate_errors(self) -> None:
        """Allocate validates the path and the placement, with the right code for each case."""
        self.register(6)
        self.ok(Mkdir("/d"))
        self.upload("/f", [1])
        self.error(Allocate("/", None, SERVERS[:6]), ErrorCode.IS_A_DIRECTORY)
        self.error(Allocate("/d", None, SERVERS[:6]), ErrorCode.IS_A_DIRECTORY)
        self.error(Allocate("/nope/f", None, SERVERS[:6]), ErrorCode.NOT_FOUND)
        self.error(Allocate("/f/g", None, SERVERS[:6]), ErrorCode.NOT_A_DIRECTORY)
        self.error(Allocate("/d/f", "RS-9", SERVERS[:6]), ErrorCode.INVALID_ARGUMENT)
        self.error(Allocate("/d/f", None, SERVERS[:5]), ErrorCode.INVALID_ARGUMENT)
        self.error(Allocate("/d/f", None, SERVERS[:5] + SERVERS[:1]), ErrorCode.INVALID_ARGUMENT)
        message = self.error(
            Allocate("/d/f", None, SERVERS[:5] + ("ghost",)), ErrorCode.UNKNOWN_CHUNK_SERVER
        )
        self.assertIn("ghost", message.message)
        self.assertEqual(self.state.summary().pending_block_groups, 0)

    def test_allocate_ids_and_addresses(self) -> None:
        """Block group ids count up from 1; shards carry ids, nodes and current addresses."""
        self.register(3)
        first = self.ok(Allocate("/f", "RS-2-1", SERVERS[:3], 1.0))
        second = self.ok(Allocate("/f", "RS-2-1", SERVERS[2::-1], 1.0))
        self.assertEqual((first.bg_id, second.bg_id), (1, 2))
        self.assertEqual(
            first.shards[2], ShardLocation(2, "0000000000000001-02", "chunk-2", "127.0.0.1:9002")
        )
        self.assertEqual([s.node_id for s in second.shards], list(SERVERS[2::-1]))
        self.ok(RegisterChunkServer("chunk-0", "10.0.0.1:1", "rack-1"))
        self.assertEqual(
            self.state.chunk_servers()[0], ChunkServerRecord("chunk-0", "10.0.0.1:1", "rack-1")
        )
        info = self.ok(CommitFile("/f", 3, ((1, 3),), 2.0))
        self.assertEqual(info.block_groups[0].shards[0].address, "10.0.0.1:1")

    def test_commit(self) -> None:
        """A commit makes the file visible with its block groups, size, mtime and version."""
        self.register()
        info = self.upload("/f", [100, 50], now=7.0)
        self.assertIsInstance(info, FileInfo)
        self.assertEqual((info.path, info.size, info.ec, info.mtime), ("/f", 150, "RS-2-1", 7.0))
        self.assertEqual(info.version, self.index)
        self.assertEqual([(bg.id, bg.size) for bg in info.block_groups], [(1, 100), (2, 50)])
        self.assertEqual(self.state.stat("/f"), info)
        self.assertEqual(self.state.block_groups("/f"), info.block_groups)
        summary = self.state.summary()
        self.assertEqual(
            (summary.files, summary.bytes_stored, summary.bytes_on_disk, summary.block_groups),
            (1, 150, 150 + 75, 2),
        )
        self.assertEqual(summary.block_groups_by_width, ((3, 2),))

    def test_commit_beyond_the_totals_refused(self) -> None:
        """A commit that would take a cluster total past what its record holds is refused
        like any bad command: the batch around it applies, and so do later commands (before,
        the totals failed to encode at the batch's end and every member halted, again on
        every replay)."""
        self.register()
        huge = 1 << 62  # on disk: 1.5 times that
        first = self.ok(Allocate("/p1", "RS-4-2", SERVERS[:6], 1.0)).bg_id
        self.ok(CommitFile("/p1", huge, ((first, huge),), 2.0))
        second = self.ok(Allocate("/p2", "RS-4-2", SERVERS[:6], 1.0)).bg_id
        most = (1 << 63) - 1  # any one size may be this large
        commit = CommitFile("/p2", most, ((second, most),), 2.0)
        start = self.index
        results = self.state.apply_batch([(start + 1, commit), (start + 2, Mkdir("/after"))])
        self.index = start + 2
        self.assertIsInstance(results[0], MetaError)
        self.assertEqual(results[0].code, ErrorCode.INVALID_ARGUMENT)  # type: ignore[union-attr]
        self.assertIn("beyond what DogFS counts", results[0].message)  # type: ignore[union-attr]
        self.assertIsInstance(results[1], DirInfo)
        self.assertEqual(self.state.applied_index, start + 2)
        self.assertIsInstance(self.state.stat("/p2"), MetaError)
        summary = self.state.summary()
        self.assertEqual((summary.files, summary.bytes_stored), (1, huge))

    def test_commit_errors(self) -> None:
        """CommitFile refuses stale, duplicate, mismatched or mis-sized block groups."""
        self.register()
        self.ok(Mkdir("/d"))
        a = self.ok(Allocate("/f", "RS-2-1", SERVERS[:3], 1.0)).bg_id
        b = self.ok(Allocate("/f", "RS-3-2", SERVERS[:5], 1.0)).bg_id
        stale = self.error(CommitFile("/f", 10, ((99, 10),)), ErrorCode.STALE_ALLOCATION)
        self.assertIn(f"{99:016x}", stale.message)
        self.assertIn("'/f'", stale.message)
        self.error(CommitFile("/f", 10, ((a, 5), (a, 5))), ErrorCode.INVALID_ARGUMENT)
        self.error(CommitFile("/f", 10, ((a, 5), (b, 5))), ErrorCode.INVALID_ARGUMENT)
        self.error(CommitFile("/f", 10, ((a, 9),)), ErrorCode.INVALID_ARGUMENT)
        self.error(CommitFile("/f", 0, ((a, 0),)), ErrorCode.INVALID_ARGUMENT)
        self.error(CommitFile("/f", 10, ((a, 10),), ec="RS-3-2"), ErrorCode.INVALID_ARGUMENT)
        self.error(CommitFile("/f", -1, ()), ErrorCode.INVALID_ARGUMENT)
        self.error(CommitFile("/d", 10, ((a, 10),)), ErrorCode.IS_A_DIRECTORY)
        self.error(CommitFile("/", 10, ((a, 10),)), ErrorCode.IS_A_DIRECTORY)
        self.error(CommitFile("/no/f", 10, ((a, 10),)), ErrorCode.NOT_FOUND)
        # None of the failures consumed the allocation.
        self.ok(CommitFile("/f", 10, ((a, 10),)))
        self.error(CommitFile("/g", 10, ((a, 10),)), ErrorCode.STALE_ALLOCATION)

    def test_conditional_commit(self) -> None:
        """expected_version 0 means create-only; a wrong version is VERSION_MISMATCH."""
        self.register()
        first = self.ok(CommitFile("/f", 0, (), 1.0, expected_version=0))
        self.error(CommitFile("/f", 0, (), expected_version=0), ErrorCode.VERSION_MISMATCH)
        second = self.ok(CommitFile("/f", 0, (), 2.0, expected_version=first.version))
        self.assertGreater(second.version, first.version)

    def test_atomic_replace(self) -> None:
        """Until its commit, an upload is invisible: readers see the old version, whole."""
        self.register()
        old = self.upload("/f", [10, 20])
        self.assertEqual(self.state.stat("/new").code, ErrorCode.NOT_FOUND)  # type: ignore[union-attr]
        alloc = self.ok(Allocate("/f", "RS-2-1", SERVERS[3:6], 5.0))
        alloc_new = self.ok(Allocate("/new", "RS-2-1", SERVERS[3:6], 5.0))
        # Pending allocations are visible to nobody reading the namespace.
        self.assertEqual(self.state.stat("/f"), old)
        self.assertEqual(self.state.stat("/new").code, ErrorCode.NOT_FOUND)  # type: ignore[union-attr]
        self.assertEqual([e.name for e in self.state.list("/")], ["f"])  # type: ignore[union-attr]
        self.assertEqual(self.state.summary().bytes_stored, 30)
        self.assertEqual(self.state.summary().pending_block_groups, 2)
        new = self.ok(CommitFile("/f", 7, ((alloc.bg_id, 7),), 6.0))
        self.assertEqual(self.state.stat("/f"), new)
        self.assertEqual([bg.id for bg in new.block_groups], [alloc.bg_id])
        # The old version's shards are garbage now; the new ones are live.
        old_ids = [
            s.shard_id for bg in old.block_groups for s in bg.shards if s.node_id == "chunk-0"
        ]
        self.assertEqual(set(self.state.shard_status(old_ids, "chunk-0").values()), {"garbage"})
        new_sid = alloc.shards[0].shard_id
        pending_sid = alloc_new.shards[0].shard_id
        self.assertEqual(
            self.state.shard_status([new_sid, pending_sid, "junk"], "chunk-3"),
            {new_sid: "live", pending_sid: "pending", "junk": "garbage"},
        )
        # A shard reported by the wrong node is garbage there.
        self.assertEqual(self.state.shard_status([new_sid], "chunk-4"), {new_sid: "garbage"})
        self.assertIsNone(self.state.block_group(old.block_groups[0].id))
        summary = self.state.summary()
        self.assertEqual((summary.files, summary.bytes_stored, summary.block_groups), (1, 7, 1))

    def test_expire(self) -> None:
        """ExpireAllocations drops pending block groups allocated before the cut-off only."""
        self.register()
        early = self.ok(Allocate("/f", "RS-2-1", SERVERS[:3], 10.0))
        late = self.ok(Allocate("/f", "RS-2-1", SERVERS[:3], 20.0))
        self.upload("/g", [5], now=1.0)
        self.assertEqual(self.run_(ExpireAllocations(10.0)), Count(0))
        self.assertEqual(self.run_(ExpireAllocations(15.0)), Count(1))
        self.error(CommitFile("/f", 1, ((early.bg_id, 1),)), ErrorCode.STALE_ALLOCATION)
        self.ok(CommitFile("/f", 1, ((late.bg_id, 1),)))
        self.assertEqual(self.run_(ExpireAllocations(1e9)), Count(0))
        self.assertEqual(self.state.stat("/g").size, 5)  # type: ignore[union-attr]

    def test_renew(self) -> None:
        """RenewAllocations moves pending groups' allocation time forward (never back), so
        expiry spares them; a group no longer pending fails the whole renewal, which renews
        nothing."""
        self.register()
        first = self.ok(Allocate("/f", "RS-2-1", SERVERS[:3], 10.0))
        second = self.ok(Allocate("/f", "RS-2-1", SERVERS[:3], 20.0))
        self.assertEqual(self.run_(RenewAllocations((first.bg_id, second.bg_id), 30.0)), Count(2))
        self.assertEqual(self.run_(RenewAllocations((first.bg_id,), 5.0)), Count(1))
        self.assertEqual(self.run_(ExpireAllocations(25.0)), Count(0))
        committed = self.upload("/g", [5], now=1.0).block_groups[0].id
        error = self.run_(RenewAllocations((first.bg_id, committed), 40.0))
        self.assertEqual(error.code, ErrorCode.STALE_ALLOCATION)  # type: ignore[union-attr]
        self.assertIn("not a pending allocation", error.message)  # type: ignore[union-attr]
        self.assertEqual(self.run_(ExpireAllocations(35.0)), Count(2))  # the failed one renewed nothing
        error = self.run_(RenewAllocations((second.bg_id,), 40.0))
        self.assertEqual(error.code, ErrorCode.STALE_ALLOCATION)  # type: ignore[union-attr]
        self.error(CommitFile("/f", 2, ((first.bg_id, 1), (second.bg_id, 1))), ErrorCode.STALE_ALLOCATION)

    def test_renewed_upload_commits(self) -> None:
        """An upload renewed past the ttl commits."""
        self.register()
        alloc = self.ok(Allocate("/f", "RS-2-1", SERVERS[:3], 10.0))
        self.run_(RenewAllocations((alloc.bg_id,), 100.0))
        self.assertEqual(self.run_(ExpireAllocations(50.0)), Count(0))
        self.ok(CommitFile("/f", 1, ((alloc.bg_id, 1),)))
        self.assertEqual(self.state.stat("/f").size, 1)  # type: ignore[union-attr]

    def test_delete(self) -> None:
        """Delete removes files and empty dirs; NOT_EMPTY without recursive; never the root."""
        self.register()
        self.ok(Mkdir("/a/b", parents=True))
        info = self.upload("/a/b/f", [4])
        self.error(Delete("/a"), ErrorCode.NOT_EMPTY)
        self.error(Delete("/"), ErrorCode.INVALID_ARGUMENT)
        self.error(Delete("/", recursive=True), ErrorCode.INVALID_ARGUMENT)
        self.error(Delete("/zz"), ErrorCode.NOT_FOUND)
        self.error(Delete("/a/b/f/x"), ErrorCode.NOT_A_DIRECTORY)
        self.ok(Delete("/a", recursive=True))
        self.assertEqual(self.state.stat("/a").code, ErrorCode.NOT_FOUND)  # type: ignore[union-attr]
        sid = info.block_groups[0].shards[0].shard_id
        self.assertEqual(self.state.shard_status([sid], "chunk-0"), {sid: "garbage"})
        self.assertEqual(self.state.summary(), Summary(0, 1, 0, 0, 0, 0, ()))
        self.ok(Mkdir("/e"))
        self.ok(Delete("/e"))
        self.upload("/f", [1])
        self.ok(Delete("/f", recursive=True))
        self.assertEqual(self.state.list("/"), [])

    def test_rename(self) -> None:
        """Rename moves files and subtrees in one step and refuses the unsafe cases."""
        self.register()
        self.ok(Mkdir("/a/b", parents=True, ec="RS-2-1"))
        self.upload("/a/b/f", [3], ec=None)
        self.ok(Mkdir("/c"))
        self.ok(Rename("/a/b", "/c/b2"))
        moved = self.state.stat("/c/b2/f")
        self.assertIsInstance(moved, FileInfo)
        self.assertEqual(moved.path, "/c/b2/f")  # type: ignore[union-attr]
        self.assertEqual(self.state.stat("/a/b").code, ErrorCode.NOT_FOUND)  # type: ignore[union-attr]
        self.assertEqual(self.state.stat("/c/b2").ec, "RS-2-1")  # type: ignore[union-attr]
        self.ok(Rename("/c/b2/f", "/g"))
        self.assertEqual(self.state.stat("/g").size, 3)  # type: ignore[union-attr]
        self.upload("/h", [1])
        self.error(Rename("/g", "/h"), ErrorCode.EXISTS)  # no silent replacement
        # Onto itself: said plainly from log version 1 (a result the session table keeps, so
        # a group still at 0 answers as the release before did).
        self.assertIn("already exists", self.error(Rename("/g", "/g"), ErrorCode.EXISTS).message)
        self.ok(SetLogVersion(1))
        self.assertIn("same path", self.error(Rename("/g", "/g"), ErrorCode.EXISTS).message)
        self.error(Rename("/g", "/c"), ErrorCode.EXISTS)
        self.error(Rename("/c", "/c/b2/x"), ErrorCode.INVALID_ARGUMENT)
        self.error(Rename("/c", "/c/x"), ErrorCode.INVALID_ARGUMENT)
        self.error(Rename("/", "/x"), ErrorCode.INVALID_ARGUMENT)
        self.error(Rename("/g", "/"), ErrorCode.EXISTS)
        self.error(Rename("/nope", "/x"), ErrorCode.NOT_FOUND)
        self.error(Rename("/g", "/nope/x"), ErrorCode.NOT_FOUND)
        self.error(Rename("/g", "/h/x"), ErrorCode.NOT_A_DIRECTORY)
        self.ok(Rename("/c/b2", "/b3"))
        self.assertEqual([e.name for e in self.state.list("/")], ["a", "b3", "c", "g", "h"])  # type: ignore[union-attr]

    def test_move_shard(self) -> None:
        """MoveShard checks the source node, the target's registration and distinctness."""
        self.register(7)
        info = self.upload("/f", [9])
        bg = info.block_groups[0].id
        self.error(MoveShard(bg, 0, "chunk-5", "chunk-6"), ErrorCode.STALE_ALLOCATION)
        self.error(MoveShard(bg, 0, "chunk-0", "ghost"), ErrorCode.UNKNOWN_CHUNK_SERVER)
        self.error(MoveShard(bg, 0, "chunk-0", "chunk-1"), ErrorCode.INVALID_ARGUMENT)
        self.error(MoveShard(bg, 3, "chunk-0", "chunk-6"), ErrorCode.INVALID_ARGUMENT)
        self.error(MoveShard(999, 0, "chunk-0", "chunk-6"), ErrorCode.NOT_FOUND)
        self.ok(MoveShard(bg, 0, "chunk-0", "chunk-6"))
        shards = self.state.stat("/f").block_groups[0].shards  # type: ignore[union-attr]
        self.assertEqual([s.node_id for s in shards], ["chunk-6", "chunk-1", "chunk-2"])
        sid = shards[0].shard_id
        self.assertEqual(self.state.shard_status([sid], "chunk-6"), {sid: "live"})
        self.assertEqual(self.state.shard_status([sid], "chunk-0"), {sid: "garbage"})
        self.assertEqual([g.id for g in self.state.all_block_groups()], [bg])

    def test_listing(self) -> None:
        """Listings are sorted by name and page with start_after and limit; a file lists itself."""
        names = ["b", "a", "é", "Z", "aa", "c"]
        for name in names:
            self.ok(Mkdir("/d/" + name, parents=True))
        everything = self.state.list("/d")
        self.assertEqual([e.name for e in everything], sorted(names))  # type: ignore[union-attr]
        page = self.state.listing("/d", limit=2)
        self.assertEqual([e.name for e in page.entries], ["Z", "a"])  # type: ignore[union-attr]
        self.assertTrue(page.more)  # type: ignore[union-attr]
        page = self.state.listing("/d", start_after="aa", limit=10)
        self.assertEqual([e.name for e in page.entries], ["b", "c", "é"])  # type: ignore[union-attr]
        self.assertFalse(page.more)  # type: ignore[union-attr]
        self.assertEqual(self.state.list("/d/a/"), [])
        for bad in [{"start_after": "\udc80"}, {"limit": -1}, {"start_after": 3}]:
            refused = self.state.listing("/d", **bad)  # type: ignore[arg-type]
            assert isinstance(refused, MetaError)
            self.assertEqual(refused.code, ErrorCode.INVALID_ARGUMENT)
        self.assertEqual(self.state.list("/zz").code, ErrorCode.NOT_FOUND)  # type: ignore[union-attr]
        self.assertEqual(self.state.list("zz").code, ErrorCode.INVALID_PATH)  # type: ignore[union-attr]
        self.ok(CommitFile("/d/a/file", 0, (), 3.0))
        self.assertEqual(
            self.state.list("/d/a/file"),
            [EntryInfo("file", "/d/a/file", "file", 0, "RS-4-2", 3.0, self.index)],
        )
        not_a_file = self.state.block_groups("/d")
        assert isinstance(not_a_file, MetaError)
        self.assertEqual(not_a_file.code, ErrorCode.IS_A_DIRECTORY)

    def test_failed_command_leaves_no_trace(self) -> None:
        """A state where commands failed equals one where those entries were no-ops."""
        log = random_commands(random.Random(11), 200, self.make_state())
        # Sessions remember failures on purpose: leave them out here.
        log = [c.command if isinstance(c, Sessioned) else c for c in log]
        failing = self.make_state()
        results = [failing.apply(i, command) for i, command in enumerate(log, 1)]
        self.assertIn(MetaError, {type(r) for r in results})
        noops = self.make_state()
        for i, (command, result) in enumerate(zip(log, results, strict=True), 1):
            noops.apply(i, None if isinstance(result, MetaError) else command)
        self.assertEqual(failing.digest(), noops.digest())

    def test_bytes_and_bad_commands(self) -> None:
        """apply accepts encoded commands; undecodable or ill-typed ones are INVALID_ARGUMENT."""
        self.assertEqual(self.run_(encode_command(Mkdir("/a", now=2.0))).path, "/a")
        self.error(b"\x93garbage", ErrorCode.INVALID_ARGUMENT)
        self.error(Mkdir(42), ErrorCode.INVALID_PATH)  # type: ignore[arg-type]
        self.error(Mkdir("/b", now="soon"), ErrorCode.INVALID_ARGUMENT)  # type: ignore[arg-type]
        self.error(Allocate("/f", None, (1, 2)), ErrorCode.INVALID_ARGUMENT)  # type: ignore[arg-type]
        self.error(object(), ErrorCode.INVALID_ARGUMENT)
        self.assertEqual(self.run_(None), Ok())
        self.assertEqual(self.state.applied_index, self.index)

    def test_sessions(self) -> None:
        """A retried session command answers as the first time without running again."""
        self.register()
        alloc = self.ok(Sessioned("cli-1", 1, Allocate("/f", "RS-2-1", SERVERS[:3], 1.0)))
        commit = Sessioned("cli-1", 2, CommitFile("/f", 5, ((alloc.bg_id, 5),), 2.0))
        first = self.ok(commit)
        # Without the session the retry would be STALE_ALLOCATION; with it, the same answer.
        self.assertEqual(self.run_(commit), first)
        self.assertEqual(self.run_(encode_command(commit)), first)
        self.error(CommitFile("/f", 5, ((alloc.bg_id, 5),)), ErrorCode.STALE_ALLOCATION)
        self.error(Sessioned("cli-1", 1, Mkdir("/x")), ErrorCode.SESSION_EXPIRED)
        self.assertEqual(self.state.stat("/x").code, ErrorCode.NOT_FOUND)  # type: ignore[union-attr]
        # Failures are remembered too, and other clients are independent.
        self.error(Sessioned("cli-1", 3, Mkdir("/f")), ErrorCode.EXISTS)
        self.error(Sessioned("cli-1", 3, Mkdir("/f")), ErrorCode.EXISTS)
        self.ok(Sessioned("cli-2", 3, Mkdir("/y")))
        self.error(Sessioned("", 1, Mkdir("/z")), ErrorCode.INVALID_ARGUMENT)
        self.error(Sessioned("c", 0, Mkdir("/z")), ErrorCode.INVALID_ARGUMENT)
        self.error(Sessioned("c", 1, Sessioned("c", 1, Mkdir("/z"))), ErrorCode.INVALID_ARGUMENT)
        self.assertRaises(
            ValueError,
            decode_command,
            encode_command(Sessioned("c", 1, Sessioned("c", 1, Mkdir("/z")))),
        )

    def test_session_eviction(self) -> None:
        """Beyond max_sessions the least recently seen client is forgotten, identically on
        every replica, once it has not been seen for SESSION_MIN_AGE (leader time)."""
        states = [self.state, self.make_state()]
        for state in states:
            state.max_sessions = 2
        late = 1000.0 + SESSION_MIN_AGE
        log = [
            Sessioned("a", 1, Mkdir("/a"), 1000.0),
            Sessioned("b", 1, Mkdir("/b"), 1001.0),
            Sessioned("a", 1, Mkdir("/a"), late),  # a retry refreshes "a"
            Sessioned("c", 1, Mkdir("/c"), late + 2),  # evicts "b", unseen since 1001
            Sessioned("b", 1, Mkdir("/b"), late + 3),  # "b" forgotten: runs again, EXISTS
            Sessioned("a", 1, Mkdir("/a"), late + 4),
        ]
        for state in states:
            results = [state.apply(i, c) for i, c in enumerate(log, 1)]
            self.assertEqual(results[4].code, ErrorCode.EXISTS)  # type: ignore[union-attr]
            self.assertIsInstance(results[2], DirInfo)
            self.assertIsInstance(results[5], DirInfo)
        self.assertEqual(states[0].digest(), states[1].digest())

    def test_recent_sessions_outlive_the_count(self) -> None:
        """A session seen within SESSION_MIN_AGE is never forgotten, however many clients
        begin meanwhile (the table grows past max_sessions instead): its retry is answered
        as the first time, not run again."""
        self.state.max_sessions = 2
        self.ok(Sessioned("a", 1, Mkdir("/a"), 1000.0))
        for i in range(5):  # 6 sessions in all: past max_sessions, within the hard limit
            self.ok(Sessioned(f"new-{i}", 1, Mkdir(f"/n{i}"), 1001.0 + i))
        self.assertIsInstance(self.run_(Sessioned("a", 1, Mkdir("/a"), 1000.0 + SESSION_MIN_AGE - 1)), DirInfo)
        # Once old enough, the least recently seen go, down to max_sessions.
        self.ok(Sessioned("z", 1, Mkdir("/z"), 5000.0))
        self.assertEqual(self.run_(Sessioned("new-0", 1, Mkdir("/n0"), 5001.0)).code, ErrorCode.EXISTS)  # type: ignore[union-attr]

    def test_session_from_a_clock_far_ahead_is_not_kept(self) -> None:
        """A session stamped far in the future (a leader's clock off by a day) does not hold
        every later one in the table; and however recent, no more than SESSION_HARD_LIMIT
        times max_sessions stay."""
        self.state.max_sessions = 2
        self.ok(Sessioned("ahead", 1, Mkdir("/ahead"), 1000.0 + 86400))
        for i in range(30):
            self.ok(Sessioned(f"c{i}", 1, Mkdir(f"/c{i}"), 1000.0 + 100 * i))
        # At 3900 s the sessions seen after 3300 s stay (c24..c29), and nothing older.
        with self.state.env.begin() as txn:
            count = txn.stat(self.state._dbs[b"sessions"])["entries"]
        self.assertEqual(count, 6)
        self.assertEqual(self.run_(Sessioned("ahead", 1, Mkdir("/ahead"), 4000.0)).code, ErrorCode.EXISTS)  # type: ignore[union-attr]
        for i in range(30):
            self.ok(Sessioned(f"burst{i}", 1, Mkdir(f"/b{i}"), 5000.0))
        with self.state.env.begin() as txn:
            count = txn.stat(self.state._dbs[b"sessions"])["entries"]
        self.assertEqual(count, 2 * SESSION_HARD_LIMIT)

    def test_redundancy(self) -> None:
        """redundancy() counts committed block groups by live shards minus k."""
        self.register(6)
        self.upload("/a", [1])  # chunk-0..2, RS-2-1
        self.upload("/b", [1, 2], ec="RS-3-2")  # chunk-0..4, two groups
        self.ok(Allocate("/c", "RS-2-1", SERVERS[:3]))  # pending: not counted
        self.assertEqual(self.state.redundancy(SERVERS), {1: 1, 2: 2})
        self.assertEqual(self.state.redundancy(["chunk-0", "chunk-3"]), {-1: 3})
        self.assertEqual(self.state.redundancy(["chunk-1", "chunk-2", "chunk-3"]), {0: 3})
        self.assertEqual(self.state.redundancy([]), {-3: 2, -2: 1})

    def test_shards_on(self) -> None:
        """shards_on lists a node's pending and committed shards and follows moves and drops."""
        self.register(7)
        committed = self.upload("/f", [4]).block_groups[0].id
        pending = self.ok(Allocate("/g", "RS-2-1", ("chunk-1", "chunk-0", "chunk-6"), 1.0)).bg_id
        self.assertEqual(
            self.state.shards_on("chunk-0"), [(committed, 0, True), (pending, 1, False)]
        )
        self.assertEqual(self.state.shards_on("chunk-0", limit=1), [(committed, 0, True)])
        self.assertEqual(
            self.state.shards_on("chunk-0", start_after=(committed, 0)), [(pending, 1, False)]
        )
        self.assertEqual(self.state.shards_on("chunk-"), [])
        self.ok(MoveShard(committed, 0, "chunk-0", "chunk-5"))
        self.assertEqual(self.state.shards_on("chunk-0"), [(pending, 1, False)])
        self.assertEqual(self.state.shards_on("chunk-5"), [(committed, 0, True)])
        self.ok(ExpireAllocations(100.0))
        self.ok(Delete("/f"))
        for node in SERVERS:
            self.assertEqual(self.state.shards_on(node), [])
        self.error(RegisterChunkServer("bad\x00id", "h:1"), ErrorCode.INVALID_ARGUMENT)

    def test_drain_and_remove(self) -> None:
        """Draining is persistent across re-registration; removal waits for an empty server."""
        self.register(4)
        self.ok(DrainChunkServer("chunk-3"))
        self.ok(RegisterChunkServer("chunk-3", "10.0.0.3:1", "r1"))
        self.assertEqual(
            self.state.chunk_servers()[3], ChunkServerRecord("chunk-3", "10.0.0.3:1", "r1", True)
        )
        self.ok(DrainChunkServer("chunk-3", draining=False))
        self.assertFalse(self.state.chunk_servers()[3].draining)
        self.error(DrainChunkServer("ghost"), ErrorCode.UNKNOWN_CHUNK_SERVER)
        info = self.upload("/f", [5])
        self.error(RemoveChunkServer("chunk-0"), ErrorCode.NOT_EMPTY)
        self.error(RemoveChunkServer("ghost"), ErrorCode.UNKNOWN_CHUNK_SERVER)
        self.ok(MoveShard(info.block_groups[0].id, 0, "chunk-0", "chunk-3"))
        self.ok(RemoveChunkServer("chunk-0"))
        self.assertEqual([r.node_id for r in self.state.chunk_servers()], list(SERVERS[1:4]))
        self.ok(RemoveChunkServer("chunk-1", force=True))
        # The forced server's shard still names it, with no address any more.
        shard = self.state.stat("/f").block_groups[0].shards[1]  # type: ignore[union-attr]
        self.assertEqual((shard.node_id, shard.address), ("chunk-1", ""))
        self.error(Allocate("/g", "RS-2-1", SERVERS[:3]), ErrorCode.UNKNOWN_CHUNK_SERVER)

    @settings(deadline=None, max_examples=int(os.environ.get("DOGFS_HYPOTHESIS_EXAMPLES", 80)))
    @given(st.lists(_meaningful_commands, min_size=1, max_size=8))
    def test_apply_is_total(self, commands: list[Any]) -> None:
        """Arbitrary commands (any strings, huge numbers) give results, never exceptions."""
        for command in commands:
            result = self.run_(command)
            self.assertIsInstance(result, (Ok, Count, MetaError, DirInfo, FileInfo, Allocation))
            if isinstance(result, MetaError):
                self.assertIsInstance(result.code, ErrorCode)
                self.assertTrue(result.message)
        self.assertIsInstance(self.state.stat("/"), DirInfo)
        self.assertEqual(self.state.applied_index, self.index)

    def test_idempotent_replay(self) -> None:
        """Re-applying indexes already applied returns None and changes nothing."""
        self.ok(Mkdir("/a"))
        digest = self.state.digest()
        self.assertIsNone(self.state.apply(1, Mkdir("/b")))
        self.assertIsNone(self.state.apply(0, Mkdir("/b")))
        self.assertEqual(self.state.digest(), digest)
        self.assertEqual(
            self.state.apply_batch([(1, Mkdir("/c")), (2, Mkdir("/c")), (2, Mkdir("/d"))]),
            [None, DirInfo("/c", "RS-4-2", 0.0), None],
        )
        self.assertEqual(self.state.applied_index, 2)

    def test_reopen(self) -> None:
        """After close and open the state, its digest and its applied index are unchanged."""
        self.register()
        self.upload("/f", [3])
        digest, applied = self.state.digest(), self.state.applied_index
        self.state.close()
        self.state.open()
        self.assertEqual((self.state.digest(), self.state.applied_index), (digest, applied))
        self.assertIsNone(self.state.apply(applied, Mkdir("/x")))
        self.assertRaises(RuntimeError, NamespaceState(self.mktemp()).stat, "/")


# --- replicas -------------------------------------------------------------------------------


def random_commands(
    rng: random.Random, count: int, scratch: NamespaceState, changes: bool = False
) -> list[Any]:
    """A random but plausible command log over a tiny namespace.

    The log is built against C{scratch} (a fresh state it is applied to as it grows) so that
    commits name block groups that really are pending and many commands succeed; others fail
    on purpose (stale ids, missing parents, name clashes). With C{changes}, chunk servers
    also move to new addresses and the default policy changes now and then.
    """
    names = ["a", "b", "c"]
    policies = ["RS-2-1", "RS-3-2", None]
    log: list[Any] = []
    pending: list[tuple[int, str]] = []
    dirs = ["/"]
    seen_bgs: list[int] = []
    now = 0.0

    def path() -> str:
        return "/" + "/".join(rng.choice(names) for _ in range(rng.randint(1, 3)))

    seqs = {"cli-a": 0, "cli-b": 0}

    def emit(command: Any) -> Any:
        # Some commands go through client sessions, some of them retried.
        if rng.random() < 0.25:
            client = rng.choice(sorted(seqs))
            if rng.random() < 0.8 or seqs[client] == 0:
                seqs[client] += 1
            command = Sessioned(client, seqs[client], command)
        log.append(command)
        result = scratch.apply(len(log), command)
        if isinstance(command, Sessioned) and rng.random() < 0.2:
            log.append(command)
            scratch.apply(len(log), command)
        return result

    for node in SERVERS[:6]:
        emit(RegisterChunkServer(node, f"h:{node}"))
    for _ in range(count):
        now += rng.random()
        kind = rng.randrange(12)
        if kind in (0, 1):
            result = emit(
                Mkdir(path(), parents=rng.random() < 0.7, ec=rng.choice(policies), now=now)
            )
            if isinstance(result, DirInfo):
                dirs.append(result.path)
        elif kind in (2, 3, 4):
            target = path() if rng.random() < 0.2 else rng.choice(dirs).rstrip("/") + "/f"
            parent = scratch.stat(paths.parent_and_name(target)[0])
            ec = rng.choice(policies)
            if ec is None and isinstance(parent, DirInfo) and rng.random() < 0.9:
                width = sum(parse_policy(parent.ec))
            else:
                width = sum(parse_policy(ec or rng.choice(["RS-2-1", "RS-3-2"])))
            placement = tuple(rng.sample(SERVERS[:6], min(width, 6)))
            result = emit(Allocate(target, ec, placement, now))
            if isinstance(result, Allocation):
                pending.append((result.bg_id, target))
                seen_bgs.append(result.bg_id)
        elif kind in (5, 6) and pending:
            picked = rng.sample(pending, rng.randint(1, min(2, len(pending))))
            chosen = [bg for bg, _ in picked]
            if rng.random() < 0.1 and seen_bgs:
                chosen.append(rng.choice(seen_bgs))  # maybe stale, maybe a duplicate
            sizes = [rng.randint(1, 1000) for _ in chosen]
            groups = tuple(zip(chosen, sizes, strict=True))
            target = picked[0][1] if rng.random() < 0.8 else path()
            result = emit(CommitFile(target, sum(sizes), groups, now))
            if isinstance(result, FileInfo):
                pending = [p for p in pending if p[0] not in chosen]
        elif kind == 7:
            emit(Delete(path(), recursive=rng.random() < 0.5))
        elif kind == 8:
            emit(Rename(path(), path()))
        elif kind == 9:
            emit(ExpireAllocations(now - 10 - rng.random() * 10))
        elif kind == 10 and seen_bgs:
            bg_id = rng.choice(seen_bgs)
            found = scratch.block_group(bg_id)
            index = rng.randrange(3)
            source = rng.choice(SERVERS[:6])
            if found is not None and rng.random() < 0.7:
                source = found[0].shards[index].node_id
            emit(MoveShard(bg_id, index, source, rng.choice(SERVERS[:7])))
        elif kind == 11 and changes and rng.random() < 0.5:
            # Changes that later commands of the same batch must see (cached addresses and
            # default policy).
            if rng.random() < 0.5:
                emit(RegisterChunkServer(rng.choice(SERVERS[:6]), f"h{rng.randrange(100)}"))
            else:
                emit(SetDefaultPolicy(rng.choice(["RS-2-1", "RS-3-2", "RS-4-2"])))
        else:
            emit(CommitFile(path(), 0, (), now))
    return log


class ReplicaTests(StateTestCase):
    """Replicas applying the same log end up byte-identical."""

    def apply_all(self, state: NamespaceState, log: list[Any]) -> list[Any]:
        return [state.apply(i, command) for i, command in enumerate(log, 1)]

    def test_determinism(self) -> None:
        """Two replicas applying the same random logs return equal results and digests."""
        for seed in range(6):
            log = random_commands(random.Random(seed), 150, self.make_state())
            one, two = self.make_state(), self.make_state()
            results = self.apply_all(one, log)
            # The second replica receives the log through the codec, as Raft delivers it.
            self.assertEqual(
                self.apply_all(two, [encode_command(c) for c in log]), results, f"seed {seed}"
            )
            self.assertEqual(one.digest(), two.digest(), f"seed {seed}")
            self.assertEqual(one.summary(), two.summary())
            kinds = {type(r) for r in results}
            self.assertTrue({FileInfo, MetaError, Allocation} <= kinds, kinds)

    def test_batch_equals_sequential(self) -> None:
        """apply_batch in chunks of any size gives the same results and state as applying one
        at a time: what a batch caches (records, counters, totals, addresses, the default
        policy) never hides a change an earlier command of the batch made."""
        for seed, chunk in [(99, 37), (5, 400), (6, 7)]:
            log = random_commands(random.Random(seed), 200, self.make_state(), changes=True)
            one, two = self.make_state(), self.make_state()
            results = self.apply_all(one, log)
            entries = list(enumerate(log, 1))
            batched: list[Any] = []
            for start in range(0, len(entries), chunk):
                batched.extend(two.apply_batch(entries[start : start + chunk]))
            self.assertEqual(batched, results, f"seed {seed}")
            self.assertEqual(one.digest(), two.digest(), f"seed {seed}")
            self.assertEqual(one.summary(), two.summary())
            self.assertEqual(two.applied_index, len(log))

    def test_batch_sees_its_own_changes(self) -> None:
        """Within one batch, an allocation sees the address a chunk server re-registered with
        earlier in the batch, a mkdir the default policy set earlier, and ids keep counting."""
        self.register(3)
        results = self.state.apply_batch([
            (10, Allocate("/a", "RS-2-1", SERVERS[:3], 1.0)),
            (11, RegisterChunkServer("chunk-0", "10.0.0.9:1")),
            (12, Allocate("/b", "RS-2-1", SERVERS[:3], 1.0)),
            (13, Mkdir("/d1", now=1.0)),
            (14, SetDefaultPolicy("RS-3-2")),
            (15, Mkdir("/d2", now=1.0)),
        ])
        self.assertEqual(results[0].shards[0].address, "127.0.0.1:9000")
        self.assertEqual(results[2].shards[0].address, "10.0.0.9:1")
        self.assertEqual((results[0].bg_id, results[2].bg_id), (1, 2))
        self.assertEqual((results[3].ec, results[5].ec), ("RS-4-2", "RS-3-2"))
        self.assertEqual(self.state.summary().dirs, 3)

    def test_failed_command_in_batch_leaves_no_trace(self) -> None:
        """A command that fails after changing cached values (an id counter, the totals, an
        inode) leaves the batch as if it had never run; the batch's other commands stand."""

        def half_done(ctx: Any, index: int, command: Any) -> Any:
            ino = ctx.next_id(b"next_ino")
            ctx.put_inode(ino, [0, 1, "ghost", None, 0.0])
            ctx.put_inode(1, [0, 0, "", "RS-9-9", 0.0])
            ctx.adjust(dirs=5)
            raise RuntimeError("failed half-way")

        other = self.make_state()
        self.patch(state_module, "_HANDLERS", {**state_module._HANDLERS, Revoke: half_done})
        results = self.state.apply_batch(
            [(1, Mkdir("/a", now=1.0)), (2, Revoke("x")), (3, Mkdir("/b", now=1.0))]
        )
        self.assertEqual(results[1].code, ErrorCode.INVALID_ARGUMENT)
        self.flushLoggedErrors(RuntimeError)
        other.apply_batch([(1, Mkdir("/a", now=1.0)), (2, None), (3, Mkdir("/b", now=1.0))])
        self.assertEqual(self.state.digest(), other.digest())
        self.assertEqual(results[2].ec, "RS-4-2")

    def test_checks_first_handlers_match_savepoints(self) -> None:
        """Handlers run without a savepoint (_CHECKS_FIRST) give the same results and state,
        refusals included, as when every command has one."""
        log = random_commands(random.Random(17), 300, self.make_state(), changes=True)
        entries = list(enumerate(log, 1))
        fast, reference = self.make_state(), self.make_state()
        results = [r for start in range(0, len(entries), 25) for r in fast.apply_batch(entries[start : start + 25])]
        self.patch(state_module, "_CHECKS_FIRST", frozenset())
        expected = [r for start in range(0, len(entries), 25) for r in reference.apply_batch(entries[start : start + 25])]
        self.assertEqual(results, expected)
        self.assertEqual(fast.digest(), reference.digest())
        refused = [r for r, c in zip(results, log, strict=True) if isinstance(c, Mkdir) and isinstance(r, MetaError)]
        self.assertTrue(refused, "the log should hold refused mkdirs")

    def test_checks_first_handler_failing_late_replays_the_batch(self) -> None:
        """A handler trusted to check first that fails after writing anyway: the batch is
        applied again with savepoints, so the failure leaves no trace and the rest stands."""

        def late_failure(ctx: Any, index: int, command: Any) -> Any:
            if command.path != "/boom":
                return state_module._mkdir(ctx, index, command)
            ino = ctx.next_id(b"next_ino")
            ctx.put_inode(ino, [0, 1, "boom", None, 0.0])
            ctx.put_child(1, "boom", ino)
            raise RuntimeError("failed after writing")

        self.patch(state_module, "_HANDLERS", {**state_module._HANDLERS, Mkdir: late_failure})
        self.patch(state_module, "_CHECKS_FIRST", frozenset({late_failure}))
        results = self.state.apply_batch(
            [(1, Mkdir("/a", now=1.0)), (2, Mkdir("/boom", now=1.0)), (3, Mkdir("/b", now=1.0))]
        )
        self.assertEqual(results[1].code, ErrorCode.INVALID_ARGUMENT)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual([type(results[0]), type(results[2])], [DirInfo, DirInfo])
        other = self.make_state()
        other.apply_batch([(1, Mkdir("/a", now=1.0)), (2, None), (3, Mkdir("/b", now=1.0))])
        self.assertEqual(self.state.digest(), other.digest())
        self.assertEqual(self.state.applied_index, 3)

    def test_summary_matches_recount(self) -> None:
        """The incrementally kept totals equal a recount by walking the tree."""
        state = self.make_state()
        self.apply_all(state, random_commands(random.Random(7), 300, self.make_state()))
        files = dirs = size = 0
        stack = ["/"]
        while stack:
            here = stack.pop()
            dirs += 1
            for entry in state.list(here):  # type: ignore[union-attr]
                if entry.type == "dir":
                    stack.append(entry.path)
                else:
                    files += 1
                    size += entry.size
        summary = state.summary()
        self.assertEqual((summary.files, summary.dirs, summary.bytes_stored), (files, dirs, size))
        groups = state.all_block_groups()
        self.assertEqual(summary.block_groups, len(groups))
        # The node index agrees with the block groups' own shard lists.
        placed = {(s.node_id, g.id, s.index) for g in groups for s in g.shards}
        indexed = {
            (node, bg, i)
            for node in SERVERS
            for bg, i, committed in state.shards_on(node)
            if committed
        }
        self.assertEqual(indexed, placed)

    def test_snapshot_restore(self) -> None:
        """A snapshot restored into another replica is identical and carries on identically."""
        log = random_commands(random.Random(3), 200, self.make_state())
        source = self.make_state()
        self.apply_all(source, log[:120])
        snap = self.mktemp()
        source.snapshot(snap)
        self.assertTrue(os.path.exists(os.path.join(snap, "data.mdb")))
        target = self.make_state()
        target.apply(1, Mkdir("/junk"))
        target.restore(snap)
        self.assertEqual(target.digest(), source.digest())
        self.assertEqual(target.applied_index, 120)
        tail = list(enumerate(log[120:], 121))
        self.assertEqual(target.apply_batch(tail), source.apply_batch(tail))
        self.assertEqual(target.digest(), source.digest())
        self.assertRaises(FileNotFoundError, target.restore, self.mktemp())

    def test_dump_load(self) -> None:
        """dump/load (the Raft snapshot payload) reproduce the state exactly; bad data is refused."""
        source = self.make_state()
        self.apply_all(source, random_commands(random.Random(5), 150, self.make_state()))
        data = source.dump()
        self.assertEqual(source.dump(), data)
        target = self.make_state()
        target.apply(1, Mkdir("/junk"))
        target.load(data)
        self.assertEqual(target.digest(), source.digest())
        self.assertEqual(target.dump(), data)
        for bad in [b"", b"\x90", encode_command(Mkdir("/x"))]:
            self.assertRaises(ValueError, target.load, bad)
        self.assertEqual(target.digest(), source.digest())

    def test_dump_format(self) -> None:
        """The dump is msgpack [magic, version, [[db name, [[key, value], ...]], ...]], every
        database in a fixed order, records in key order: snapshots taken by members running
        different versions stay interchangeable."""
        import msgpack

        state = self.make_state()
        self.apply_all(state, random_commands(random.Random(8), 100, self.make_state()))
        env = state.env
        names = [b"inodes", b"dirents", b"bgroups", b"pending", b"servers", b"nodeshards",
                 b"sessions", b"sessionlru", b"meta"]
        with env.begin(buffers=True) as txn:
            dbs = [
                [name.decode(), [[bytes(k), bytes(v)] for k, v in txn.cursor(db=env.open_db(name, txn=txn))]]
                for name in names
            ]
        self.assertTrue(all(items for name, items in dbs if name != "sessionlru"))
        expected = msgpack.packb(["dogfs-meta-dump", 1, dbs], use_bin_type=True)
        self.assertEqual(state.dump(), expected)
        self.assertEqual(state.dump_later()(), expected)
        # Packed a few records at a time (so as not to hold the GIL long), the same bytes,
        # whatever the step: arrays of fewer than 16 records have a one-byte header, others
        # three bytes.
        import dogfs.meta.state as module

        self.assertGreater(max(len(items) for _, items in dbs), 40)
        for step in (1, 3, 16, 17, 40):
            self.patch(module, "_DUMP_STEP", step)
            self.assertEqual(state.dump(), expected, f"step {step}")


class RaftStateMachineTests(StateTestCase):
    """The adapter the Raft driver applies committed entries through."""

    def test_apply_snapshot_restore(self) -> None:
        """Entries apply by index; a snapshot restores identically, at the snapshot's index."""
        machine = RaftStateMachine(self.state)
        self.assertTrue(verifyObject(IRaftStateMachine, machine))
        log = random_commands(random.Random(21), 80, self.make_state())
        entries = [Entry(1, i, EntryKind.NORMAL, encode_command(c)) for i, c in enumerate(log, 1)]
        results = [machine.apply(e) for e in entries]
        self.assertEqual(machine.applied_index(), len(log))
        self.assertIsNone(machine.apply(entries[0]))
        reference = self.make_state()
        self.assertEqual([reference.apply(i, c) for i, c in enumerate(log, 1)], results)
        # The snapshot is taken at a later index (no-op entries the state never saw).
        config = Configuration(frozenset({"meta-1"}))
        snapshot = Snapshot(SnapshotMeta(len(log) + 2, 1, config), machine.snapshot())
        other = RaftStateMachine(self.make_state())
        other.restore(snapshot)
        self.assertEqual(other.applied_index(), len(log) + 2)
        # Identical to the source once that one too has moved past the no-ops.
        self.state.apply(len(log) + 2, None)
        self.assertEqual(other.state.digest(), self.state.digest())


class _Model:
    """A deliberately naive model of the namespace (a dict of paths) to check the real one."""

    def __init__(self) -> None:
        self.nodes: dict[str, Any] = {"/": ["dir", None]}
        self.default = "RS-4-2"
        self.servers: set[str] = set()
        self.pending: dict[int, tuple[str, float, list[str]]] = {}
        self.committed: dict[int, tuple[str, list[str]]] = {}
        self.next_bg = 1

    @staticmethod
    def parent(path: str) -> str:
        return paths.parent_and_name(path)[0]

    def is_dir(self, path: str) -> bool:
        return path in self.nodes and self.nodes[path][0] == "dir"

    def effective(self, path: str) -> str:
        while True:
            if self.nodes[path][1] is not None:
                return str(self.nodes[path][1])
            if path == "/":
                return self.default
            path = self.parent(path)

    def exists(self, path: str) -> bool:
        parts = paths.split(path)
        for i in range(len(parts)):
            if not self.is_dir(paths.join(parts[:i])):
                return False
        return path in self.nodes

    def subtree(self, path: str) -> list[str]:
        return [p for p in self.nodes if p == path or p.startswith(path.rstrip("/") + "/")]

    def apply(self, cmd: Any) -> bool:
        """Apply a command; return whether it succeeds."""
        try:
            return self._apply(cmd) is not False
        except ValueError:
            return False

    def _apply(self, cmd: Any) -> bool | None:
        if isinstance(cmd, RegisterChunkServer):
            self.servers.add(cmd.node_id)
        elif isinstance(cmd, Mkdir):
            ec = None if cmd.ec is None else canonical_policy(cmd.ec)
            parts = paths.split(cmd.path)
            if not parts:
                return cmd.parents
            for i in range(1, len(parts) + 1):
                here, last = paths.join(parts[:i]), i == len(parts)
                if here in self.nodes:
                    if not self.is_dir(here) or (last and not cmd.parents):
                        return False
                    if last and ec is not None and self.effective(here) != ec:
                        return False  # -p does not change an existing directory's policy
                    continue
                if not last and not cmd.parents:
                    return False
                self.nodes[here] = ["dir", ec if last else None]
        elif isinstance(cmd, Allocate):
            if cmd.path == "/" or not self.is_dir(self.parent(cmd.path)):
                return False
            if not self.exists(self.parent(cmd.path)) or self.is_dir(cmd.path):
                return False
            ec = canonical_policy(cmd.ec or self.effective(self.parent(cmd.path)))
            k, m = parse_policy(ec)
            placement = list(cmd.placement)
            if len(placement) != k + m or len(set(placement)) != k + m:
                return False
            if not set(placement) <= self.servers:
                return False
            self.pending[self.next_bg] = (ec, cmd.now, placement)
            self.next_bg += 1
        elif isinstance(cmd, CommitFile):
            parent = self.parent(cmd.path) if cmd.path != "/" else None
            if parent is None or not self.exists(parent) or not self.is_dir(parent):
                return False
            if self.is_dir(cmd.path):
                return False
            bgs = [bg for bg, _ in cmd.block_groups]
            if len(set(bgs)) != len(bgs) or any(size <= 0 for _, size in cmd.block_groups):
                return False
            if not all(bg in self.pending for bg in bgs):
                return False
            policies = {self.pending[bg][0] for bg in bgs}
            if len(policies) > 1 or sum(s for _, s in cmd.block_groups) != cmd.size:
                return False
            ec = policies.pop() if policies else self.effective(parent)
            if cmd.path in self.nodes:
                for bg in self.nodes[cmd.path][3]:
                    self.committed.pop(bg, None)
            for bg in bgs:
                pol, _, nodes = self.pending.pop(bg)
                self.committed[bg] = (pol, nodes)
            self.nodes[cmd.path] = ["file", cmd.size, ec, bgs]
        elif isinstance(cmd, Delete):
            if cmd.path == "/" or not self.exists(cmd.path):
                return False
            tree = self.subtree(cmd.path)
            if len(tree) > 1 and not cmd.recursive:
                return False
            for p in tree:
                if self.nodes[p][0] == "file":
                    for bg in self.nodes[p][3]:
                        self.committed.pop(bg, None)
                del self.nodes[p]
        elif isinstance(cmd, Rename):
            if cmd.src == "/" or not self.exists(cmd.src) or cmd.dst == "/":
                return False
            parent = self.parent(cmd.dst)
            if not self.exists(parent) or not self.is_dir(parent) or cmd.dst in self.nodes:
                return False
            if cmd.dst.startswith(cmd.src + "/"):
                return False
            for p in self.subtree(cmd.src):
                self.nodes[cmd.dst + p[len(cmd.src) :]] = self.nodes.pop(p)
        elif isinstance(cmd, ExpireAllocations):
            for bg in [bg for bg, (_, t, _) in self.pending.items() if t < cmd.before]:
                del self.pending[bg]
        elif isinstance(cmd, MoveShard):
            found = self.committed.get(cmd.bg_id) or self.pending.get(cmd.bg_id)
            if found is None:
                return False
            nodes = found[-1]
            if cmd.index >= len(nodes) or nodes[cmd.index] != cmd.from_node:
                return False
            if cmd.to_node not in self.servers or cmd.to_node in nodes:
                return False
            nodes[cmd.index] = cmd.to_node
        return None

    def tree(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p, node in self.nodes.items():
            if node[0] == "dir":
                out[p] = ("dir", self.effective(p))
            else:
                groups = tuple((bg, tuple(self.committed[bg][1])) for bg in node[3])
                out[p] = ("file", node[1], node[2], groups)
        return out


def _tree(state: NamespaceState) -> dict[str, Any]:
    out: dict[str, Any] = {"/": ("dir", state.stat("/").ec)}  # type: ignore[union-attr]
    stack = ["/"]
    while stack:
        for entry in state.list(stack.pop()):  # type: ignore[union-attr]
            if entry.type == "dir":
                out[entry.path] = ("dir", entry.ec)
                stack.append(entry.path)
            else:
                info = state.stat(entry.path)
                assert isinstance(info, FileInfo)
                groups = tuple(
                    (bg.id, tuple(s.node_id for s in bg.shards)) for bg in info.block_groups
                )
                out[entry.path] = ("file", info.size, info.ec, groups)
    return out


class ModelTests(StateTestCase):
    """The LMDB state agrees with a naive model on every outcome and on the final tree."""

    def test_against_model(self) -> None:
        """Random logs succeed or fail exactly as the model says, leaving the same tree."""
        for seed in range(4):
            log = random_commands(random.Random(1000 + seed), 250, self.make_state())
            log = [c.command if isinstance(c, Sessioned) else c for c in log]
            model, state = _Model(), self.make_state()
            for i, command in enumerate(log, 1):
                result = state.apply(i, command)
                expected = model.apply(command)
                self.assertEqual(
                    not isinstance(result, MetaError),
                    expected,
                    f"seed {seed}: {command!r} -> {result!r}",
                )
            self.assertEqual(_tree(state), model.tree())
            self.assertEqual(state.summary().pending_block_groups, len(model.pending))
            self.assertEqual(state.summary().block_groups, len(model.committed))


class TornStateTests(SynchronousTestCase):
    """A non-durable state after a crash: kept when only the process died, set aside when the
    machine restarted with its commits unsynced."""

    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "ns")
        self.state = NamespaceState(self.path, durable=False, map_size=1 << 24)
        self.state.open()
        self.addCleanup(self.state.close)
        self.assertNotIsInstance(self.state.apply(1, Mkdir("/a", False, None)), MetaError)

    def crash(self) -> None:
        """The process dies: the environment goes without sync or close()'s bookkeeping."""
        assert self.state._env is not None
        self.state._env.close()
        self.state._env = None

    def boot(self, boot_id: str | None) -> None:
        self.patch(state_module, "_boot_id", lambda: boot_id)

    def test_process_crash_keeps_the_state(self) -> None:
        """Same boot: the page cache kept every commit, so the state is used as it is."""
        self.crash()
        self.state.open()
        self.assertEqual(self.state.applied_index, 1)
        self.assertIsInstance(self.state.stat("/a"), DirInfo)

    def assert_set_aside(self) -> None:
        self.assertEqual(self.state.applied_index, 0)
        self.assertIsInstance(self.state.stat("/a"), MetaError)
        parent = os.path.dirname(self.path)
        aside = [n for n in os.listdir(parent) if n.startswith("ns.torn-")]
        self.assertEqual(len(aside), 1, aside)
        old = NamespaceState(os.path.join(parent, aside[0]), durable=True)
        old.open()
        self.addCleanup(old.close)
        self.assertIsInstance(old.stat("/a"), DirInfo)

    def test_machine_restart_sets_the_state_aside(self) -> None:
        """Another boot: the state starts empty (Raft restores it); the old one is kept
        beside it for inspection."""
        self.crash()
        self.boot("another-boot")
        self.state.open()
        self.assert_set_aside()

    def test_unknown_boot_sets_the_state_aside(self) -> None:
        """Where the boot cannot be told, an unclosed state is never trusted."""
        self.crash()
        self.boot(None)
        self.state.open()
        self.assert_set_aside()

    def test_clean_close_survives_a_restart(self) -> None:
        """close() syncs and clears the marker: the state is trusted in any later boot."""
        self.state.close()
        self.boot("another-boot")
        self.state.open()
        self.assertEqual(self.state.applied_index, 1)
        self.assertIsInstance(self.state.stat("/a"), DirInfo)
