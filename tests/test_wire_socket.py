# -*- test-case-name: tests.test_wire_socket -*-
"""Tests for dogfs.wire.protocol over real loopback TCP: the plain-socket fast paths.

On a plain TCP transport a Connection reads large frames straight into their own buffers
(`recv_into`) and sends frames with one `sendmsg`, queueing with Twisted only what the socket
did not take. These tests run both ends on the real reactor and check that bytes, order,
limits, flow control and lost connections behave as over any other transport.
"""

from __future__ import annotations

import errno
import os
import random
from typing import Any

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.trial.unittest import TestCase

from dogfs.codec.checksum import crc32c
from dogfs.wire.frame import DIRECT_READ_MIN, FrameLimits
from dogfs.wire.messages import Cell, GetShard, GetShardEnd, Ok, PutShard, PutShardEnd, ShardStored
from dogfs.wire.protocol import Connection, ConnectionClosed, Reply, Request, WireError

MiB = 1 << 20
SHARD = "000000000000002a-03"


class SocketPairMixin:
    """Listen on 127.0.0.1 with a server Connection; connect a client Connection to it."""

    server: Connection | None = None

    async def connect(self, handlers: dict[type, Any], limits: FrameLimits = FrameLimits()) -> Connection:
        def make_server() -> Connection:
            self.server = Connection(reactor, handlers, node_id="server", limits=limits)
            return self.server

        port = reactor.listenTCP(0, protocol.Factory.forProtocol(make_server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)  # type: ignore[attr-defined]
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = await endpoints.connectProtocol(endpoint, Connection(reactor, {}, node_id="client"))
        self.addCleanup(self.close, client)  # type: ignore[attr-defined]
        await client.ready
        return client

    async def close(self, client: Connection) -> None:
        for conn in (client, self.server):
            if conn is not None and not conn._lost:
                conn.close()
                await conn.closed


def deferred(coroutine: Any) -> defer.Deferred[Any]:
    return defer.Deferred.fromCoroutine(coroutine).addTimeout(30, reactor)  # type: ignore[arg-type]


async def slow_sink(request: Request) -> ShardStored:
    """Take a PutShard's cells, checking index and CRC, and stop taking frames for a moment
    after every 8th: the socket fills up behind us."""
    count = 0
    while True:
        part = await request.next_part()
        assert part is not None
        msg, payload = part
        if isinstance(msg, PutShardEnd):
            return ShardStored(SHARD, count)
        if msg.index != count or crc32c(payload) != msg.crc:
            raise WireError("invalid_argument", f"cell {msg.index} damaged or out of order")
        count += 1
        if count % 8 == 0:
            wait: defer.Deferred[None] = defer.Deferred()
            reactor.callLater(0.05, wait.callback, None)
            await wait


def slow_sink_handler(request: Request) -> defer.Deferred[ShardStored]:
    """`slow_sink` as a connection's handler."""
    return defer.Deferred.fromCoroutine(slow_sink(request))


async def upload_to_slow_reader(test: TestCase, client: Connection, cells: int) -> None:
    """Upload `cells` random 1 MiB cells to a `slow_sink_handler`; every one must arrive, and
    flow control must have held the sender back at least once."""
    blocked: list[bool] = []
    upload = client.open_stream(PutShard(SHARD, "RS-4-2", 3, MiB))
    for i in range(cells):
        payload = os.urandom(MiB)
        sent = upload.send(Cell(i, crc32c(payload)), payload)
        blocked.append(client.write_blocked)
        await sent
    reply = await upload.finish(PutShardEnd(cells))
    test.assertEqual(reply.msg, ShardStored(SHARD, cells))
    test.assertTrue(any(blocked), "the sender was never held back")


class PlainSocketTests(SocketPairMixin, TestCase):
    """Frames over a real plain TCP connection."""

    def test_fast_path_in_use(self) -> None:
        """Both ends of a plain TCP connection read and write their socket themselves."""

        async def go() -> None:
            client = await self.connect({})
            assert self.server is not None
            self.assertIsNotNone(client._socket)
            self.assertIsNotNone(self.server._socket)

        return deferred(go())

    def test_small_and_large_payloads_round_trip(self) -> None:
        """Payloads below, at and far above the direct-read size come back byte for byte,
        interleaved with payload-less requests."""
        sizes = [0, 1, 100, DIRECT_READ_MIN - 1, DIRECT_READ_MIN, DIRECT_READ_MIN + 1, 3 * MiB + 7]

        def echo(request: Request) -> Reply:
            return Reply(Ok(), bytes(request.payload))

        async def go() -> None:
            client = await self.connect({GetShard: echo})
            rnd = random.Random(5)
            payloads = [rnd.randbytes(size) for size in sizes]
            replies = await defer.gatherResults(
                [client.call(GetShard(SHARD, 0, -1), payload) for payload in payloads]
            )
            self.assertEqual([bytes(r.payload) for r in replies], payloads)

        return deferred(go())

    def test_stream_with_slow_reader(self) -> None:
        """A 40 MiB upload to a handler that pauses arrives whole and in order; the sender is
        held back by flow control while the reader lags."""

        async def go() -> None:
            client = await self.connect({PutShard: slow_sink_handler})
            await upload_to_slow_reader(self, client, 40)

        return deferred(go())

    def test_streamed_response_of_large_cells(self) -> None:
        """Cells streamed back to the caller arrive through on_part intact and in order."""
        rnd = random.Random(9)
        fragments = [rnd.randbytes(MiB + 80) for _ in range(6)]

        async def serve(request: Request) -> GetShardEnd:
            for i, fragment in enumerate(fragments):
                await request.send_part(Cell(i, crc32c(fragment)), fragment)
            return GetShardEnd(len(fragments))

        def handler(request: Request) -> defer.Deferred[GetShardEnd]:
            return defer.Deferred.fromCoroutine(serve(request))

        async def go() -> None:
            client = await self.connect({GetShard: handler})
            got: list[bytes] = []
            reply = await client.call(
                GetShard(SHARD, 0, -1), on_part=lambda msg, payload: got.append(bytes(payload))
            )
            self.assertEqual(reply.msg, GetShardEnd(len(fragments)))
            self.assertEqual(got, fragments)

        return deferred(go())

    def test_unsent_bytes_queue_as_views(self) -> None:
        """What a full socket does not take waits in the connection's own queue: a view of a
        bytes payload (no copy), a copy of a buffer its owner may reuse. The sender is held
        back past the transport's buffer size and let go as the queue drains; the peer gets
        every byte as it was when sent."""
        rnd = random.Random(11)
        fixed = rnd.randbytes(8 * MiB)
        original = rnd.randbytes(8 * MiB)
        reused = bytearray(original)

        def echo(request: Request) -> Reply:
            return Reply(Ok(), bytes(request.payload))

        async def go() -> None:
            client = await self.connect({GetShard: echo})
            assert self.server is not None
            self.server.transport.pauseProducing()  # the peer stops reading its socket
            first = client.call(GetShard(SHARD, 0, -1), fixed)
            second = client.call(GetShard(SHARD, 0, -1), memoryview(reused))
            reused[:] = bytes(len(reused))  # the owner reuses its buffer at once
            self.assertTrue(client._out, "the socket took 16 MiB at once")
            self.assertTrue(any(view.obj is fixed for view in client._out))
            self.assertTrue(client.write_blocked)
            writable = client.wait_writable()
            self.assertNoResult(writable)
            self.server.transport.resumeProducing()
            await writable
            replies = await defer.gatherResults([first, second])
            # CRCs, not the bytes: a failure's diff of 8 MiB strings would take minutes.
            self.assertEqual([crc32c(r.payload) for r in replies], [crc32c(fixed), crc32c(original)])
            self.assertEqual((len(client._out), client._out_bytes), (0, 0))

        return deferred(go())

    def test_close_sends_the_queue_first(self) -> None:
        """Closing a connection whose queue is not yet sent sends it all, then closes."""
        payload = random.Random(12).randbytes(8 * MiB)
        got: list[bytes] = []

        def record(request: Request) -> None:
            got.append(bytes(request.payload))

        async def go() -> None:
            client = await self.connect({GetShard: record})
            assert self.server is not None
            server = self.server
            server.transport.pauseProducing()
            client.send_oneway(GetShard(SHARD, 0, -1), payload)
            self.assertTrue(client._out)
            client.close()
            server.transport.resumeProducing()
            await server.closed
            self.assertEqual([crc32c(p) for p in got], [crc32c(payload)])

        return deferred(go())

    def test_oversized_frame_closes_connection(self) -> None:
        """A frame over the receiver's limit gets the sender an error and a closed connection,
        before the receiver buffers its payload."""

        async def go() -> None:
            client = await self.connect({GetShard: lambda r: Ok()}, limits=FrameLimits(max_payload=MiB))
            with self.assertRaises(ConnectionClosed) as caught:
                await client.call(GetShard(SHARD, 0, -1), b"x" * (2 * MiB))
            self.assertIn("exceeds the limit", str(caught.exception))
            assert self.server is not None
            self.assertIsNone(self.server._decoder.read_target())

        return deferred(go())

    def test_peer_lost_in_the_middle_of_a_large_frame(self) -> None:
        """When the peer vanishes while a large frame is being read into its buffer, the
        stream's handler and the caller both see the connection closed."""
        failures: list[BaseException] = []
        started: defer.Deferred[None] = defer.Deferred()

        async def sink(request: Request) -> ShardStored:
            started.callback(None)
            try:
                while await request.next_part() is not None:
                    pass
            except WireError as e:
                failures.append(e)
                raise
            return ShardStored(SHARD, 0)

        def handler(request: Request) -> defer.Deferred[ShardStored]:
            return defer.Deferred.fromCoroutine(sink(request))

        async def go() -> None:
            client = await self.connect({PutShard: handler})
            upload = client.open_stream(PutShard(SHARD, "RS-4-2", 3, 8 * MiB))
            await started
            # Half a frame: the prefix announces 8 MiB, a quarter of it is sent.
            from dogfs.wire.frame import Flags, encode_frame
            from dogfs.wire.messages import encode, type_of

            header = encode(Cell(0, 0))
            prefix = encode_frame(1, Flags.MORE, type_of(Cell(0, 0)), upload.request_id, header, 8 * MiB)
            client.transport.write(prefix + header + b"y" * (2 * MiB))
            assert self.server is not None
            server = self.server
            while server._decoder.buffered < len(prefix + header) + 2 * MiB:
                wait: defer.Deferred[None] = defer.Deferred()
                reactor.callLater(0.01, wait.callback, None)
                await wait
            self.assertIsNotNone(server._decoder._body)  # read straight into its buffer
            client.transport.abortConnection()
            await server.closed
            with self.assertRaises(ConnectionClosed):
                await upload.finish(PutShardEnd(1))
            self.assertEqual(len(failures), 1)
            self.assertIsInstance(failures[0], ConnectionClosed)

        return deferred(go())


class _ScriptedSocket:
    """Takes as many bytes per sendmsg as the test says (None: the socket is full)."""

    def __init__(self, takes: list[int | None]) -> None:
        self.takes = takes

    def sendmsg(self, parts: list[Any]) -> int:
        n = self.takes.pop(0)
        if n is None:
            raise BlockingIOError(errno.EWOULDBLOCK, "full")
        return min(n, sum(len(p) for p in parts))


class _QuietTransport:
    """What Connection's send queue asks of a plain TCP transport (nothing queued there)."""

    connected = True
    _writeDisconnected = False
    TLS = False
    _tempDataLen = 0
    offset = 0
    dataBuffer = b""
    bufferSize = MiB

    def __init__(self) -> None:
        self.writing = 0

    def startWriting(self) -> None:
        self.writing += 1


class SendQueueTests(TestCase):
    """The plain-TCP send queue's own flow control, with a scripted socket."""

    def test_senders_resume_at_half(self) -> None:
        """Past the transport's buffer size the connection holds its senders back, and lets
        them go once the queue is down to half of it, not only once it is empty."""
        conn = Connection(reactor, {})
        conn.transport = _QuietTransport()
        conn._socket = _ScriptedSocket([None, MiB // 2, 2 * MiB + MiB // 4, None])  # type: ignore[assignment]
        conn._send_now(b"head", b"x" * (3 * MiB))
        self.assertTrue(conn.write_blocked)
        self.assertEqual(conn._out_bytes, 3 * MiB + 4)
        waiter = conn.wait_writable()
        conn._write_socket()  # half a MiB out, then full: still over the limit
        self.assertNoResult(waiter)
        conn._write_socket()  # a quarter MiB + 4 bytes left: under half the limit
        self.assertEqual(conn._out_bytes, MiB // 4 + 4)
        self.assertFalse(conn.write_blocked)
        self.successResultOf(waiter)
