# -*- test-case-name: tests.test_security_hostile -*-
"""Hostile input: trickling and idle peers, in-flight limits, and fuzzing of every decoder."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dogfs.meta import commands as c
from dogfs.wire import messages
from dogfs.wire.frame import Flags, FrameDecoder, FrameError, FrameLimits, encode_frame
from dogfs.wire.messages import Error, GetShard, Hello, MalformedMessage
from dogfs.wire.protocol import Connection, _tls_failure


def frame(msg: Any, request_id: int = 1, payload: bytes = b"", flags: int = Flags.NONE) -> bytes:
    """The bytes of one frame carrying ``msg``."""
    header = messages.encode(msg)
    return encode_frame(1, flags, messages.type_of(msg), request_id, header, len(payload)) + header + payload


def opened(clock: Clock, handlers: dict[type, Any] | None = None, **kwargs: Any) -> tuple[Connection, StringTransport]:
    """A connection that has completed the DogFS Hello with its peer."""
    connection = Connection(clock, handlers or {}, **kwargs)
    transport = StringTransport()
    connection.makeConnection(transport)
    connection.dataReceived(frame(Hello((1,)), 0))
    transport.clear()
    return connection, transport


def sent_errors(transport: StringTransport) -> list[Error]:
    """The Error frames written to ``transport``."""
    frames = FrameDecoder().feed(transport.value())
    return [messages.decode(f.type, f.header) for f in frames if f.type == Error.TYPE]  # type: ignore[attr-defined]


class SlowPeerTests(SynchronousTestCase):
    """Trickling and idle connections are closed; busy or paused ones are not."""

    def test_trickle_closed(self) -> None:
        """A frame begun and not completed within the frame timeout closes the connection."""
        clock = Clock()
        connection, transport = opened(clock, frame_timeout=30.0, idle_timeout=None)
        data = frame(GetShard("x"))
        connection.dataReceived(data[:5])
        for _ in range(5):  # one byte every 5 s: a frame that never completes in time
            clock.advance(5)
            connection.dataReceived(data[5:6])
            data = data[:5] + data[6:]
        self.assertFalse(transport.disconnecting)
        clock.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(sent_errors(transport)[0].code, "timeout")

    def test_trickle_below_the_frames_closed(self) -> None:
        """Bytes the transport holds of a frame it has not passed on yet (a sealed frame
        partly received) count as a frame begun: trickled for too long, they close the
        connection too."""
        clock = Clock()
        connection, transport = opened(clock, frame_timeout=30.0, idle_timeout=None)
        transport.partly_received = 100  # type: ignore[attr-defined]
        clock.advance(25)
        self.assertFalse(transport.disconnecting)
        clock.advance(15)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(sent_errors(transport)[0].code, "timeout")

    def test_idle_closed(self) -> None:
        """A connection with nothing in flight for the idle timeout is closed."""
        clock = Clock()
        connection, transport = opened(clock, frame_timeout=None, idle_timeout=60.0)
        clock.advance(59)
        self.assertFalse(transport.disconnecting)
        clock.advance(20)
        self.assertTrue(transport.disconnecting)

    def test_busy_not_idle(self) -> None:
        """A request being served keeps the connection open past the idle timeout."""
        clock = Clock()
        waiting: defer.Deferred[Any] = defer.Deferred()
        connection, transport = opened(clock, {GetShard: lambda r: waiting}, idle_timeout=60.0)
        connection.dataReceived(frame(GetShard("x")))
        clock.advance(200)
        self.assertFalse(transport.disconnecting)
        waiting.callback(None)
        clock.advance(200)
        self.assertTrue(transport.disconnecting)

    def test_peer_not_reading_closed(self) -> None:
        """A peer that reads nothing we send for the idle timeout (our writing paused all
        along, a request still being served) is closed; one that drains now and then is not."""
        clock = Clock()
        waiting: defer.Deferred[Any] = defer.Deferred()
        connection, transport = opened(clock, {GetShard: lambda r: waiting}, idle_timeout=60.0)
        connection.dataReceived(frame(GetShard("x")))
        connection.pauseProducing()  # the transport's buffer is full
        clock.advance(50)
        connection.resumeProducing()  # it read some
        clock.advance(20)
        connection.pauseProducing()
        clock.advance(50)
        self.assertFalse(transport.disconnecting)
        clock.advance(30)
        self.assertTrue(transport.disconnecting)

    def test_timers_stop_with_the_connection(self) -> None:
        """A lost connection leaves no timer behind."""
        clock = Clock()
        connection, transport = opened(clock)
        connection.connectionLost(Failure(ConnectionError()))
        self.assertEqual(clock.getDelayedCalls(), [])


class InFlightLimitTests(SynchronousTestCase):
    """One peer cannot make a daemon hold unbounded requests or bytes."""

    def test_too_many_requests(self) -> None:
        """Past max_inflight unanswered requests the connection is closed with a reason."""
        clock = Clock()
        connection, transport = opened(clock, {GetShard: lambda r: defer.Deferred()}, max_inflight=3)
        for i in range(3):
            connection.dataReceived(frame(GetShard("x"), i + 1))
        self.assertFalse(transport.disconnecting)
        connection.dataReceived(frame(GetShard("x"), 9))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(sent_errors(transport)[0].code, "too_many_requests")

    def test_streams_of_unknown_types_count(self) -> None:
        """Streams of a message type this side does not know are answered "unsupported" and
        their frames swallowed until they end; they count against max_inflight like any
        request, so a peer cannot open them without bound."""
        clock = Clock()
        connection, transport = opened(clock, max_inflight=3)
        header = msgpack.packb({})

        def unknown(request_id: int, flags: int = Flags.MORE) -> bytes:
            return encode_frame(1, flags, 250, request_id, header, 0) + header

        for i in range(3):
            connection.dataReceived(unknown(i + 1))
        self.assertEqual([e.code for e in sent_errors(transport)], ["unsupported"] * 3)
        self.assertFalse(transport.disconnecting)
        connection.dataReceived(unknown(9))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(sent_errors(transport)[-1].code, "too_many_requests")

    def test_buffered_bytes_pause_reading(self) -> None:
        """Payload held by unanswered requests past max_buffered stops reading until answered."""
        clock = Clock()
        pending: list[defer.Deferred[Any]] = []

        def hold(request: Any) -> defer.Deferred[Any]:
            pending.append(defer.Deferred())
            return pending[-1]

        connection, transport = opened(clock, {GetShard: hold}, max_buffered=10_000)
        for i in range(3):
            connection.dataReceived(frame(GetShard("x"), i + 1, b"p" * 4000))
        self.assertEqual(transport.producerState, "paused")
        for d in pending[:2]:
            d.callback(None)
        self.assertEqual(transport.producerState, "producing")


class TLSFailureTests(SynchronousTestCase):
    """A connection lost to a TLS failure says why, with a code clients do not retry."""

    def test_refused_certificate_is_permission_denied(self) -> None:
        """The server refusing our certificate becomes permission_denied."""
        error = SSL.Error([("SSL routines", "", "tlsv1 alert internal error")])
        result = _tls_failure(Failure(error), "127.0.0.1:7000")
        assert result is not None
        self.assertEqual(result.code, "permission_denied")
        self.assertIn("revoked", result.message)

    def test_plaintext_server_is_tls_failed(self) -> None:
        """A server that does not speak TLS becomes tls_failed, naming --insecure."""
        error = SSL.Error([("SSL routines", "", "wrong version number")])
        result = _tls_failure(Failure(error), "127.0.0.1:7000")
        assert result is not None
        self.assertEqual(result.code, "tls_failed")
        self.assertIn("--insecure", result.message)

    def test_other_losses_untouched(self) -> None:
        """An ordinary connection loss is not a TLS failure."""
        self.assertIsNone(_tls_failure(Failure(ConnectionError()), "x:1"))


# Values msgpack can carry, nested: what a hostile peer can put in a header or a command.
_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=20),
)
_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


class FuzzTests(SynchronousTestCase):
    """Every decoder refuses malformed input with its own error, never a crash."""

    @settings(deadline=None, max_examples=120)
    @given(st.sampled_from(sorted(messages._REGISTRY)), st.lists(_values, max_size=9))
    def test_message_headers(self, type_id: int, fields: list[Any]) -> None:
        """Well-formed msgpack with wrong fields decodes or raises MalformedMessage only."""
        try:
            messages.decode(type_id, msgpack.packb(fields, use_bin_type=True))
        except MalformedMessage:
            pass

    @settings(deadline=None, max_examples=120)
    @given(st.integers(min_value=0, max_value=80), st.lists(_values, max_size=8))
    def test_commands_and_results(self, tag: int, fields: list[Any]) -> None:
        """Any tagged array decodes as a command/result or raises ValueError only."""
        data = msgpack.packb([tag, *fields], use_bin_type=True)
        for decode in (c.decode_command, c.decode_result):
            try:
                decode(data)
            except ValueError:
                pass

    @settings(deadline=None, max_examples=100)
    @given(st.binary(max_size=300))
    def test_command_bytes(self, data: bytes) -> None:
        """Arbitrary bytes as a command raise ValueError only."""
        try:
            c.decode_command(data)
        except ValueError:
            pass

    def test_deep_nesting(self) -> None:
        """A command nested thousands deep is refused, not a RecursionError."""
        data = b"\x91" * 5000 + b"\xc0"
        self.assertRaises(ValueError, c.decode_command, data)

    @settings(deadline=None, max_examples=150)
    @given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 15), st.binary(max_size=40),
                              st.binary(max_size=40)), max_size=6),
           st.lists(st.integers(1, 50), max_size=5))
    def test_connection_survives_any_frames(self, frames: list[tuple[int, int, bytes, bytes]],
                                            cuts: list[int]) -> None:
        """Arbitrary frames, cut anywhere, never raise out of dataReceived."""
        clock = Clock()
        connection, transport = opened(clock, {GetShard: lambda r: None}, max_inflight=4)
        data = b"".join(
            encode_frame(1, flags, type_, 7, header, len(payload)) + header + payload
            for type_, flags, header, payload in frames
        )
        position = 0
        for cut in cuts + [len(data)]:
            connection.dataReceived(data[position:position + cut])
            position += cut
        connection.dataReceived(data[position:])
        connection.connectionLost(Failure(ConnectionError()))

    @settings(deadline=None, max_examples=100)
    @given(st.binary(min_size=12, max_size=64))
    def test_decoder_allocation_bounded(self, prefix: bytes) -> None:
        """Whatever a prefix announces, the decoder holds no more than it was given."""
        decoder = FrameDecoder(FrameLimits(max_header=1024, max_payload=4096))
        try:
            decoder.feed(prefix)
        except FrameError:
            return
        self.assertLessEqual(decoder.buffered, len(prefix))
