# -*- test-case-name: tests.test_wire_protocol -*-
"""Tests for dogfs.wire.protocol: requests, streams, errors, limits and flow control."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, connect
from twisted.trial.unittest import SynchronousTestCase

from dogfs.wire import messages
from dogfs.wire.frame import PREFIX, Flags, FrameDecoder, FrameLimits, encode_frame
from dogfs.wire.messages import (
    Cell,
    Error,
    GetShard,
    GetShardEnd,
    Hello,
    Ok,
    PutShard,
    PutShardEnd,
    ShardStored,
)
from dogfs.wire.pool import split_address
from dogfs.wire.protocol import (
    CLOSE_TIMEOUT,
    Connection,
    ConnectionClosed,
    Reply,
    Request,
    RequestTimeout,
    WireError,
)


def pair(handlers: dict[type, Any], clock: Clock | None = None, limits: FrameLimits = FrameLimits()):
    clock = clock or Clock()
    server = Connection(clock, handlers, node_id="server", limits=limits)
    client = Connection(clock, {}, node_id="client")
    pump = connect(server, FakeTransport(server, True), client, FakeTransport(client, False), clock=None)
    return server, client, pump


class RequestResponseTests(SynchronousTestCase):
    """Single-frame requests and their answers."""

    def test_handshake(self) -> None:
        """Both sides agree on a version and learn each other's node id."""
        server, client, pump = pair({})
        self.assertEqual(server.version, 1)
        self.assertEqual(client.version, 1)
        self.assertEqual(client.peer_node_id, "server")
        self.assertEqual(self.successResultOf(client.ready), client)

    def test_call_and_reply(self) -> None:
        """A handler's returned Reply reaches the caller with its payload."""

        def handle(request: Request) -> Reply:
            return Reply(ShardStored(request.msg.shard_id, len(request.payload)), b"echo:" + bytes(request.payload))

        server, client, pump = pair({GetShard: handle})
        d = client.call(GetShard("s1"), b"abc")
        pump.flush()
        reply = self.successResultOf(d)
        self.assertEqual(reply.msg, ShardStored("s1", 3))
        self.assertEqual(bytes(reply.payload), b"echo:abc")

    def test_none_means_ok(self) -> None:
        """A handler returning None answers Ok."""
        server, client, pump = pair({GetShard: lambda r: None})
        d = client.call(GetShard("s1"))
        pump.flush()
        self.assertEqual(self.successResultOf(d).msg, Ok())

    def test_multiplexed_out_of_order(self) -> None:
        """Answers may come in any order; each reaches its own caller."""
        waiting: dict[str, defer.Deferred[Any]] = {}

        def handle(request: Request) -> defer.Deferred[Any]:
            waiting[request.msg.shard_id] = d = defer.Deferred()
            return d

        server, client, pump = pair({GetShard: handle})
        d1 = client.call(GetShard("one"))
        d2 = client.call(GetShard("two"))
        pump.flush()
        waiting["two"].callback(GetShardEnd(2))
        waiting["one"].callback(GetShardEnd(1))
        pump.flush()
        self.assertEqual(self.successResultOf(d1).msg, GetShardEnd(1))
        self.assertEqual(self.successResultOf(d2).msg, GetShardEnd(2))

    def test_handler_error(self) -> None:
        """A WireError raised by a handler arrives as that WireError, code and message."""

        def handle(request: Request) -> None:
            raise WireError("not_found", "shard s1 not found", {"shard": "s1"})

        server, client, pump = pair({GetShard: handle})
        d = client.call(GetShard("s1"))
        pump.flush()
        error = self.failureResultOf(d, WireError).value
        self.assertEqual((error.code, error.message, error.details), ("not_found", "shard s1 not found", {"shard": "s1"}))
        self.assertTrue(server.is_open)

    def test_handler_crash_is_internal_error(self) -> None:
        """An unexpected exception becomes an 'internal' error; the connection stays up."""

        def handle(request: Request) -> None:
            raise ZeroDivisionError("oops")

        server, client, pump = pair({GetShard: handle})
        d = client.call(GetShard("s1"))
        pump.flush()
        self.assertEqual(self.failureResultOf(d, WireError).value.code, "internal")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        d = client.call(GetShard("s2"))
        pump.flush()
        self.failureResultOf(d, WireError)
        self.flushLoggedErrors(ZeroDivisionError)

    def test_unserved_message(self) -> None:
        """A known message with no handler is answered 'unsupported'."""
        server, client, pump = pair({})
        d = client.call(GetShard("s1"))
        pump.flush()
        self.assertEqual(self.failureResultOf(d, WireError).value.code, "unsupported")

    def test_timeout(self) -> None:
        """A call with a timeout fails with RequestTimeout when no answer comes in time."""
        clock = Clock()
        server, client, pump = pair({GetShard: lambda r: defer.Deferred()}, clock)
        d = client.call(GetShard("s1"), timeout=2.0)
        pump.flush()
        clock.advance(1.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        self.assertIn("timed out", self.failureResultOf(d, RequestTimeout).value.message)

    def test_timeouts_of_different_lengths(self) -> None:
        """Each request fails at its own deadline, whatever the order of their lengths (one
        timer serves the connection); an answered request is not failed later, and a closed
        connection leaves no timer behind."""
        clock = Clock()
        waiting: dict[str, defer.Deferred[Any]] = {}

        def handle(request: Request) -> defer.Deferred[Any]:
            waiting[request.msg.shard_id] = d = defer.Deferred()
            return d

        server, client, pump = pair({GetShard: handle}, clock)
        long = client.call(GetShard("long"), timeout=10.0)
        short = client.call(GetShard("short"), timeout=2.0)
        answered = client.call(GetShard("answered"), timeout=1.0)
        pump.flush()
        waiting["answered"].callback(GetShardEnd(1))
        pump.flush()
        self.assertEqual(self.successResultOf(answered).msg, GetShardEnd(1))
        clock.advance(1.9)
        self.assertNoResult(short)
        clock.advance(0.2)
        message = self.failureResultOf(short, RequestTimeout).value.message
        self.assertEqual(message, "GetShard to server timed out after 2s")
        clock.advance(3.0)  # t = 5.1
        later = client.call(GetShard("later"), timeout=1.0)
        pump.flush()
        clock.advance(0.95)
        self.assertNoResult(later)
        clock.advance(0.1)
        self.failureResultOf(later, RequestTimeout)
        self.assertNoResult(long)
        clock.advance(3.9)  # t = 10.05
        self.assertIn("timed out after 10s", self.failureResultOf(long, RequestTimeout).value.message)
        pending = client.call(GetShard("pending"), timeout=5.0)
        pump.flush()
        client.transport.loseConnection()
        pump.flush()
        self.failureResultOf(pending, ConnectionClosed)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_connection_lost_fails_pending(self) -> None:
        """Pending calls fail with ConnectionClosed when the connection drops."""
        server, client, pump = pair({GetShard: lambda r: defer.Deferred()})
        d = client.call(GetShard("s1"))
        pump.flush()
        client.connectionLost()
        self.failureResultOf(d, ConnectionClosed)


class StreamTests(SynchronousTestCase):
    """Streamed uploads and streamed responses."""

    def test_upload_stream(self) -> None:
        """A handler reads every Cell of an upload in order, then answers."""
        received: list[tuple[int, bytes]] = []

        async def handle(request: Request) -> Reply:
            while (part := await request.next_part()) is not None:
                msg, payload = part
                if isinstance(msg, Cell):
                    received.append((msg.index, bytes(payload)))
            return Reply(ShardStored(request.msg.shard_id, sum(len(p) for _, p in received)))

        server, client, pump = pair({PutShard: lambda r: defer.Deferred.fromCoroutine(handle(r))})
        upload = client.open_stream(PutShard("s1", "RS-4-2", 0, 4))
        for i in range(20):
            upload.send(Cell(i, 0), bytes([i]) * 4)
            pump.flush()
        d = upload.finish(PutShardEnd(20))
        pump.flush()
        self.assertEqual(self.successResultOf(d).msg, ShardStored("s1", 80))
        self.assertEqual(received, [(i, bytes([i]) * 4) for i in range(20)])

    def test_early_error_discards_rest(self) -> None:
        """A handler that refuses an upload at once answers; later frames are discarded."""

        def handle(request: Request) -> None:
            raise WireError("full", "disk full")

        server, client, pump = pair({PutShard: handle, GetShard: lambda r: GetShardEnd(7)})
        upload = client.open_stream(PutShard("s1", "RS-4-2", 0, 4))
        pump.flush()
        self.assertTrue(upload.done)
        upload.send(Cell(0, 0), b"xxxx")
        d = upload.finish(PutShardEnd(1))
        pump.flush()
        self.assertEqual(self.failureResultOf(d, WireError).value.code, "full")
        # The connection still serves other requests.
        d2 = client.call(GetShard("x"))
        pump.flush()
        self.assertEqual(self.successResultOf(d2).msg, GetShardEnd(7))

    def test_abort_fails_handler(self) -> None:
        """An aborted upload makes the handler's next_part fail."""
        failures: list[WireError] = []

        async def handle(request: Request) -> None:
            try:
                while await request.next_part() is not None:
                    pass
            except WireError as e:
                failures.append(e)

        server, client, pump = pair({PutShard: lambda r: defer.Deferred.fromCoroutine(handle(r))})
        upload = client.open_stream(PutShard("s1", "RS-4-2", 0, 4))
        upload.send(Cell(0, 0), b"1234")
        pump.flush()
        upload.abort("client gave up")
        pump.flush()
        self.assertEqual([f.code for f in failures], ["aborted"])

    def test_streamed_response(self) -> None:
        """Parts of a streamed response reach on_part in order before the final reply."""

        async def handle(request: Request) -> GetShardEnd:
            for i in range(5):
                await request.send_part(Cell(i, 0), bytes([65 + i]) * 3)
            return GetShardEnd(5)

        server, client, pump = pair({GetShard: lambda r: defer.Deferred.fromCoroutine(handle(r))})
        parts: list[tuple[int, bytes]] = []
        d = client.call(GetShard("s"), on_part=lambda m, p: parts.append((m.index, bytes(p))))
        pump.flush()
        self.assertEqual(self.successResultOf(d).msg, GetShardEnd(5))
        self.assertEqual(parts, [(i, bytes([65 + i]) * 3) for i in range(5)])


class FlowControlTests(SynchronousTestCase):
    """Back-pressure in both directions."""

    def connected(self, handlers: dict[type, Any]) -> tuple[Connection, StringTransport]:
        connection = Connection(Clock(), handlers)
        transport = StringTransport()
        connection.makeConnection(transport)
        hello = messages.encode(Hello())
        connection.dataReceived(encode_frame(1, 0, Hello.TYPE, 0, hello, 0) + hello)  # type: ignore[attr-defined]
        return connection, transport

    def test_wait_writable_follows_transport(self) -> None:
        """wait_writable waits while the transport has paused us and fires on resume."""
        connection, transport = self.connected({})
        self.assertIs(transport.producer, connection)
        connection.pauseProducing()
        d = connection.wait_writable()
        self.assertNoResult(d)
        connection.resumeProducing()
        self.successResultOf(d)

    def test_slow_handler_pauses_reading(self) -> None:
        """Frames of an upload that its handler does not consume stop the socket being read."""
        connection, transport = self.connected({PutShard: lambda r: defer.Deferred()})
        frames = []
        header = messages.encode(PutShard("s", "RS-4-2", 0, 1))
        frames.append(encode_frame(1, Flags.MORE, PutShard.TYPE, 5, header, 0) + header)  # type: ignore[attr-defined]
        for i in range(20):
            h = messages.encode(Cell(i, 0))
            frames.append(encode_frame(1, Flags.MORE, Cell.TYPE, 5, h, 1) + h + b"x")  # type: ignore[attr-defined]
        connection.dataReceived(b"".join(frames))
        self.assertEqual(transport.producerState, "paused")


class ClosingTests(SynchronousTestCase):
    """Closing a connection ends it even when reading is held back or the peer is wedged."""

    def connected(self) -> tuple[Connection, StringTransport, Clock]:
        clock = Clock()
        connection = Connection(clock, {})
        transport = StringTransport()
        connection.makeConnection(transport)
        hello = messages.encode(Hello())
        connection.dataReceived(encode_frame(1, 0, Hello.TYPE, 0, hello, 0) + hello)  # type: ignore[attr-defined]
        return connection, transport, clock

    def test_close_resumes_reading(self) -> None:
        """A connection paused by its reader reads again once closed (TLS must read the
        peer's close_notify), and a pause or resume after that leaves the transport alone."""
        connection, transport, _ = self.connected()
        connection.pause_reading()
        self.assertEqual(transport.producerState, "paused")
        connection.close()
        self.assertEqual(transport.producerState, "producing")
        self.assertTrue(transport.disconnecting)
        connection.pause_reading()
        self.assertEqual(transport.producerState, "producing")
        connection.resume_reading()
        connection.resume_reading()
        self.assertEqual(transport.producerState, "producing")

    def test_wedged_peer_is_aborted(self) -> None:
        """A close the peer never completes is turned into an abort after CLOSE_TIMEOUT."""
        connection, transport, clock = self.connected()
        connection.close()
        clock.advance(CLOSE_TIMEOUT - 0.5)
        self.assertFalse(transport.disconnected)
        clock.advance(1)
        self.assertTrue(transport.disconnected)

    def test_timer_ends_with_the_connection(self) -> None:
        """A connection that closes in time leaves no abort timer behind."""
        connection, transport, clock = self.connected()
        connection.close()
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])


class HostileInputTests(SynchronousTestCase):
    """Bad bytes close one connection with an error frame, and nothing else."""

    def answered_error(self, transport: StringTransport) -> Error:
        frames = FrameDecoder().feed(transport.value())
        errors = [messages.decode(f.type, f.header) for f in frames if f.flags & Flags.ERROR]
        self.assertEqual(len(errors), 1)
        return errors[0]

    def test_first_frame_must_be_hello(self) -> None:
        """A peer that skips the handshake gets an error frame and a closed connection."""
        connection = Connection(Clock(), {})
        transport = StringTransport()
        connection.makeConnection(transport)
        header = messages.encode(GetShard("x"))
        connection.dataReceived(encode_frame(1, 0, GetShard.TYPE, 1, header, 0) + header)  # type: ignore[attr-defined]
        self.assertEqual(self.answered_error(transport).code, "handshake")
        self.assertTrue(transport.disconnecting)

    def test_no_common_version(self) -> None:
        """A peer speaking only other versions is told which versions we speak."""
        connection = Connection(Clock(), {})
        transport = StringTransport()
        connection.makeConnection(transport)
        header = messages.encode(Hello((7, 8)))
        connection.dataReceived(encode_frame(7, 0, Hello.TYPE, 0, header, 0) + header)  # type: ignore[attr-defined]
        error = self.answered_error(transport)
        self.assertEqual(error.code, "unsupported_version")
        self.assertIn("[7, 8]", error.message)

    def test_oversized_frame(self) -> None:
        """A frame over the limit is refused from its prefix, before any allocation."""
        connection = Connection(Clock(), {}, limits=FrameLimits(max_header=64, max_payload=1024))
        transport = StringTransport()
        connection.makeConnection(transport)
        connection.dataReceived(PREFIX.pack(10**9, 1, 0, 3, 1, 0))
        self.assertEqual(self.answered_error(transport).code, "frame_error")
        self.assertTrue(transport.disconnecting)

    def test_malformed_header(self) -> None:
        """A frame whose header does not match its type closes the connection."""
        server, client, pump = pair({})
        client.transport.write(encode_frame(1, 0, GetShard.TYPE, 9, b"\x01", 0) + b"\x01")  # type: ignore[attr-defined]
        pump.flush()
        self.assertFalse(server.is_open)

    def test_error_flag_on_another_message(self) -> None:
        """A response flagged as an error that is not an Error closes the connection with a
        reason and fails what was pending; it does not raise out of dataReceived."""
        connection = Connection(Clock(), {})
        transport = StringTransport()
        connection.makeConnection(transport)
        hello = messages.encode(Hello())
        connection.dataReceived(encode_frame(1, 0, Hello.TYPE, 0, hello, 0) + hello)  # type: ignore[attr-defined]
        pending = connection.call(GetShard("s"))
        header = messages.encode(Ok())
        flags = Flags.RESPONSE | Flags.ERROR
        connection.dataReceived(encode_frame(1, flags, Ok.TYPE, 1, header, 0) + header)  # type: ignore[attr-defined]
        self.assertEqual(self.answered_error(transport).code, "malformed_message")
        self.assertTrue(transport.disconnecting)
        connection.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(pending, ConnectionClosed)

    def test_peer_error_frame_closes_with_reason(self) -> None:
        """When the peer reports a connection-level error, pending calls fail naming it."""
        server, client, pump = pair({GetShard: lambda r: defer.Deferred()})
        d = client.call(GetShard("x"))
        pump.flush()
        server.protocol_error("too_many_requests", "slow down")
        pump.flush()
        self.assertIn("slow down", self.failureResultOf(d, ConnectionClosed).value.message)


class FailedStreamTests(SynchronousTestCase):
    """A streamed request whose handler fails while frames are still queued for it."""

    def test_failure_after_the_last_frame_releases_the_connection(self) -> None:
        """The whole upload arrived while its handler waited (a disk write on a thread), and
        then it failed: its queued frames are dropped, the connection reads again and serves
        the next request (it used to stay paused for good, its buffer never given back)."""
        disk: list[defer.Deferred[None]] = []

        async def put(request: Request) -> Any:
            await request.next_part()
            write: defer.Deferred[None] = defer.Deferred()
            disk.append(write)
            await write
            raise WireError("no_space", "the disk is full")

        server, client, pump = pair(
            {PutShard: lambda r: defer.Deferred.fromCoroutine(put(r)), GetShard: lambda r: Ok()}
        )
        upload = client.open_stream(PutShard("s", "RS-4-2", 0, 1024))
        for i in range(12):
            upload.send(Cell(i, 0), b"x" * 1024)
        stored = upload.finish(PutShardEnd(12))
        pump.flush()
        self.assertGreater(server._reading_pauses, 0)  # its queue is full: reading paused
        disk[0].callback(None)
        pump.flush()
        self.assertEqual(self.failureResultOf(stored, WireError).value.code, "no_space")
        self.assertEqual((server._reading_pauses, server._buffered), (0, 0))
        answer = client.call(GetShard("s"))
        pump.flush()
        self.assertIsInstance(self.successResultOf(answer).msg, Ok)


class StalledStreamTests(SynchronousTestCase):
    """Streams of a peer that went silent fail after the idle timeout; keepalives keep a
    slow but live peer's streams open."""

    def uploads(self) -> tuple[Connection, Connection, Any, Clock, dict[str, Any]]:
        clock = Clock()
        outcomes: dict[str, Any] = {}

        async def put(request: Request) -> Any:
            try:
                while await request.next_part() is not None:
                    pass
            except WireError as e:
                outcomes[request.msg.shard_id] = e.code
                raise
            outcomes[request.msg.shard_id] = "stored"
            return Ok()

        server, client, pump = pair({PutShard: lambda r: defer.Deferred.fromCoroutine(put(r))}, clock)
        return server, client, pump, clock, outcomes

    def test_silent_peer_streams_fail_then_the_connection_closes(self) -> None:
        """An upload begun by a peer that then sends nothing at all fails with timeout once
        idle_timeout has passed (its handler lets go of its file, the peer is told), and the
        connection, idle then, is closed."""
        server, client, pump, clock, outcomes = self.uploads()
        stalled = client.open_stream(PutShard("stalled", "RS-4-2", 0, 1))
        pump.flush()
        for _ in range(5):  # 500 s: within the 600 s idle timeout
            clock.advance(100)
            pump.flush()
        self.assertEqual(outcomes, {})
        for _ in range(2):
            clock.advance(100)
            pump.flush()
        self.assertEqual(outcomes, {"stalled": "timeout"})
        told = self.failureResultOf(stalled.finish(PutShardEnd(0)), WireError).value
        self.assertEqual(told.code, "timeout")
        for _ in range(3):
            clock.advance(100)
            pump.flush()
        self.assertFalse(server.is_open)

    def test_keepalives_keep_a_slow_upload(self) -> None:
        """A peer whose upload waits for its source (a slow pipe) sends keepalives: its
        stream stays open however long a stripe takes, and ends as usual."""
        server, client, pump, clock, outcomes = self.uploads()
        slow = client.open_stream(PutShard("slow", "RS-4-2", 0, 1))
        pump.flush()
        for _ in range(20):  # 2,000 s
            clock.advance(100)
            client.keepalive()
            pump.flush()
        self.assertEqual(outcomes, {})
        slow.send(Cell(0, 0), b"x")
        done = slow.finish(PutShardEnd(1))
        pump.flush()
        self.successResultOf(done)
        self.assertEqual(outcomes, {"slow": "stored"})
        self.assertTrue(server.is_open)


class AddressTests(SynchronousTestCase):
    """Parsing host:port addresses."""

    def test_split(self) -> None:
        """host:port and [v6]:port parse; anything else is a clear ValueError."""
        self.assertEqual(split_address("127.0.0.1:7000"), ("127.0.0.1", 7000))
        self.assertEqual(split_address("[::1]:80"), ("::1", 80))
        for bad in ["nohost", "h:", ":1", "h:99999", "h:x"]:
            self.assertRaises(ValueError, split_address, bad)


class ReleaseTests(SynchronousTestCase):
    """Streams the server answered early are forgotten on both sides."""

    def test_early_answer_releases_server_stream(self) -> None:
        """After an early error, the client tells the server the stream is over; nothing leaks."""

        def refuse(request: Request) -> None:
            raise WireError("no_space", "disk full")

        server, client, pump = pair({PutShard: refuse})
        for _ in range(5):
            upload = client.open_stream(PutShard("s1", "RS-4-2", 0, 4))
            pump.flush()
            upload.send(Cell(0, 0), b"xxxx")
            self.failureResultOf(upload.finish(PutShardEnd(1)), WireError)
            pump.flush()
        self.assertEqual(server._inbound, {})

    def test_abort_after_answer_is_quiet(self) -> None:
        """Aborting an upload the server already answered sends one release, and finish says aborted."""
        server, client, pump = pair({PutShard: lambda r: GetShardEnd(0)})
        upload = client.open_stream(PutShard("s1", "RS-4-2", 0, 4))
        pump.flush()
        upload.abort("gave up")
        pump.flush()
        self.assertEqual(self.failureResultOf(upload.finish(PutShardEnd(0)), WireError).value.code, "aborted")
        self.assertEqual(server._inbound, {})


class PoolHandshakeTests(SynchronousTestCase):
    """A peer that accepts TCP but never speaks cannot hold a caller."""

    def test_silent_peer_times_out(self) -> None:
        """pool.get fails as unreachable once handshake_timeout passes without a Hello."""
        from twisted.internet.testing import MemoryReactorClock

        from dogfs.wire.pool import ConnectionPool

        clock = MemoryReactorClock()
        transports: list[StringTransport] = []

        class SilentEndpoint:
            def connect(self, factory: Any) -> defer.Deferred[Any]:
                protocol = factory.buildProtocol(None)
                transport = StringTransport()
                transports.append(transport)
                protocol.makeConnection(transport)
                return defer.succeed(protocol)

        pool = ConnectionPool(clock, lambda address: SilentEndpoint(), handshake_timeout=3.0)  # type: ignore[arg-type,return-value]
        d = pool.get("10.0.0.1:7000")
        clock.advance(2.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        error = self.failureResultOf(d, WireError).value
        self.assertEqual(error.code, "unreachable")
        self.assertIn("handshake within 3s", error.message)
        self.assertTrue(transports[0].disconnecting or transports[0].disconnected)


class PoolLeaseTests(SynchronousTestCase):
    """ConnectionPool.lease: a connection for one caller alone, reused once given back."""

    def setUp(self) -> None:
        from dogfs.wire.pool import ConnectionPool

        self.clock = Clock()
        self.servers: list[Connection] = []
        self.pumps: list[Any] = []
        test = self

        class PairedEndpoint:
            """Connects the pool's Connection in memory to a new server Connection."""

            def connect(self, factory: Any) -> defer.Deferred[Any]:
                client = factory.buildProtocol(None)
                server = Connection(test.clock, {GetShard: lambda r: Ok()}, node_id="server")
                test.servers.append(server)
                test.pumps.append(connect(server, FakeTransport(server, True), client, FakeTransport(client, False)))
                return defer.succeed(client)

        self.pool = ConnectionPool(self.clock, lambda address: PairedEndpoint())  # type: ignore[arg-type,return-value]

    def test_leases_are_exclusive_and_reused(self) -> None:
        """Two leases at once are two connections, neither the shared one; a lease given back
        is the next one handed out; a closed one is not."""
        shared = self.successResultOf(self.pool.get("a:1"))
        first = self.successResultOf(self.pool.lease("a:1"))
        second = self.successResultOf(self.pool.lease("a:1"))
        self.assertEqual(len({id(shared), id(first), id(second)}), 3)
        self.pool.give_back("a:1", first)
        self.assertIs(self.successResultOf(self.pool.lease("a:1")), first)
        self.pool.give_back("a:1", second)
        second.close()
        self.pumps[-1].flush()
        third = self.successResultOf(self.pool.lease("a:1"))
        self.assertNotIn(third, (shared, first, second))
        self.assertEqual(len(self.servers), 4)

    def test_drop_spares_leases_and_close_all_closes_them(self) -> None:
        """drop closes the shared connection only; close_all closes leased and idle ones."""
        shared = self.successResultOf(self.pool.get("a:1"))
        leased = self.successResultOf(self.pool.lease("a:1"))
        idle = self.successResultOf(self.pool.lease("a:1"))
        self.pool.give_back("a:1", idle)
        self.pool.drop("a:1")
        self.assertFalse(shared.is_open)
        self.assertTrue(leased.is_open and idle.is_open)
        d = self.pool.close_all()
        for pump in self.pumps:
            pump.flush()
        self.successResultOf(d)
        self.assertFalse(leased.is_open or idle.is_open)

    def test_idle_leases_are_bounded(self) -> None:
        """Past MAX_IDLE_LEASES idle connections per address, a returned lease is closed."""
        from dogfs.wire.pool import MAX_IDLE_LEASES

        leases = [self.successResultOf(self.pool.lease("a:1")) for _ in range(MAX_IDLE_LEASES + 1)]
        for connection in leases:
            self.pool.give_back("a:1", connection)
        self.assertEqual([c.is_open for c in leases], [True] * MAX_IDLE_LEASES + [False])
