# -*- test-case-name: tests.test_wire_messages -*-
"""Tests for dogfs.wire.messages: declarations, encoding and strict decoding."""

from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dogfs.wire import messages
from dogfs.wire.messages import (
    DeleteShards,
    Error,
    GetShard,
    Heartbeat,
    Hello,
    MalformedMessage,
    MetaQuery,
    PutShard,
    UnknownMessageType,
)


class MessageTests(SynchronousTestCase):
    """Messages survive the wire and malformed headers are refused cleanly."""

    def roundtrip(self, msg: object) -> object:
        return messages.decode(messages.type_of(msg), messages.encode(msg))

    def test_roundtrips(self) -> None:
        """Each kind of field (str, int, optional, tuple, dict) decodes to an equal message."""
        for msg in [
            Hello(),
            Hello((1, 2), "x", "meta-1"),
            Error("not_found", "no such file: /a", {"path": "/a"}),
            PutShard("000000000000002a-03", "RS-4-2", 3, 1048656),
            GetShard("000000000000002a-03", 2, 5),
            DeleteShards(("a", "b")),
            Heartbeat("chunk-1", "127.0.0.1:1", 10, 5, 3, {"put": 1.5}, None),
            MetaQuery("stat", "/x", {"limit": 3}),
        ]:
            self.assertEqual(self.roundtrip(msg), msg)

    def test_unknown_type(self) -> None:
        """An unregistered type id is UnknownMessageType (a MalformedMessage)."""
        self.assertRaises(UnknownMessageType, messages.decode, 65000, msgpack.packb([]))

    def test_wrong_field_count(self) -> None:
        """Too few fields (of those without defaults) are refused, and so is a header that is
        not an array of fields."""
        for bad in (["only-one"], [], {"shard_id": "x"}, "x"):
            header = msgpack.packb(bad)
            self.assertRaises(MalformedMessage, messages.decode, PutShard.TYPE, header)  # type: ignore[attr-defined]

    def test_fields_of_a_later_release_are_ignored(self) -> None:
        """A header of a later release, with fields added after this release's last, decodes
        to this release's message with them ignored, whatever they hold; the fields this
        release knows are still checked."""
        shard = PutShard("000000000000002a-03", "RS-4-2", 3, 1048656, "0f" * 16)
        later = msgpack.packb([*msgpack.unpackb(messages.encode(shard)), "ticket", {"a": [1, 2]}, None])
        self.assertEqual(messages.decode(PutShard.TYPE, later), shard)  # type: ignore[attr-defined]
        # A message with trailing defaults: the later fields follow all of this release's.
        beat = Heartbeat("chunk-1", "127.0.0.1:1", 10, 5, 3, {"put": 1.5}, None, "c1")
        later = msgpack.packb([*msgpack.unpackb(messages.encode(beat)), 7])
        self.assertEqual(messages.decode(Heartbeat.TYPE, later), beat)  # type: ignore[attr-defined]
        bad = msgpack.packb(["000000000000002a-03", "RS-4-2", "3", 1048656, None, "ticket"])
        self.assertRaises(MalformedMessage, messages.decode, PutShard.TYPE, bad)  # type: ignore[attr-defined]

    def test_fields_added_at_the_end_may_be_missing(self) -> None:
        """A header of an earlier release, without the trailing fields added since (each with
        a default), decodes with the defaults; fewer than the fields without defaults, or a
        wrong type among those present, is still refused."""
        from dogfs.wire.messages import ShardReport

        old = msgpack.packb(["chunk-1", 0, True])
        self.assertEqual(messages.decode(ShardReport.TYPE, old), ShardReport("chunk-1", 0, True, ()))  # type: ignore[attr-defined]
        new = messages.encode(ShardReport("chunk-1", 0, True, ("0000000000000001-00",)))
        self.assertEqual(messages.decode(ShardReport.TYPE, new).damaged, ("0000000000000001-00",))  # type: ignore[attr-defined]
        for bad in (["chunk-1", 0], ["chunk-1", "0", True], ["chunk-1", 0, True, "damaged"]):
            self.assertRaises(MalformedMessage, messages.decode, ShardReport.TYPE, msgpack.packb(bad))  # type: ignore[attr-defined]

    def test_every_default_passes_its_wire_check(self) -> None:
        """A header may leave out trailing fields that have defaults (a peer of an earlier
        release): each default must then be a value the peer could have sent, so leaving a
        field out can reach no state an explicit value could not."""
        import attrs

        for cls in set(messages._REGISTRY.values()):
            for (name, check), a in zip(messages._checkers(cls), attrs.fields(cls), strict=True):
                if a.default is attrs.NOTHING:
                    continue
                value = a.default.factory() if isinstance(a.default, attrs.Factory) else a.default  # type: ignore[attr-defined]
                self.assertTrue(check(value), f"{cls.__name__}.{name} defaults to {value!r}")

    def test_wrong_field_type(self) -> None:
        """A string where an int belongs is refused, and so is a bool for an int."""
        bad = msgpack.packb(["id", "RS-4-2", "3", 10])
        self.assertRaises(MalformedMessage, messages.decode, PutShard.TYPE, bad)  # type: ignore[attr-defined]
        bad = msgpack.packb(["id", "RS-4-2", True, 10])
        self.assertRaises(MalformedMessage, messages.decode, PutShard.TYPE, bad)  # type: ignore[attr-defined]

    def test_not_msgpack(self) -> None:
        """Bytes that are not msgpack are refused."""
        self.assertRaises(MalformedMessage, messages.decode, Hello.TYPE, b"\xc1\xc1")  # type: ignore[attr-defined]

    def test_duplicate_declaration_refused(self) -> None:
        """Declaring a second message with a used type id is an error at import time."""
        self.assertRaises(RuntimeError, messages.message(1), type("X", (), {}))

    @settings(deadline=None, max_examples=300)
    @given(st.sampled_from(sorted(messages._REGISTRY)), st.binary(max_size=200))
    def test_garbage_headers(self, type_id: int, header: bytes) -> None:
        """Any bytes as any message's header decode or raise MalformedMessage, nothing else."""
        try:
            messages.decode(type_id, header)
        except MalformedMessage:
            pass
