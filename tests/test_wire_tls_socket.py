# -*- test-case-name: tests.test_wire_tls_socket -*-
"""Tests for DogFS wire connections over TLS on real loopback TCP: the bulk TLS layer's
socket fast path (dogfs.security.tls._BulkTLSProtocol).

Once the handshake is done, the TLS layer reads the socket itself, 1 MiB at a time into one
buffer shared by the process, and lets OpenSSL read the records there in place; frames go
out with one send each. These tests run both ends on the real reactor and check that bytes,
order, flow control and lost connections behave as over plain TCP.
"""

from __future__ import annotations

import os
import random
import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import connectProtocol
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from dogfs.codec.checksum import crc32c
from dogfs.security.ca import init_ca
from dogfs.security.roles import Role
from dogfs.security.tls import ServerTLS, TLSConfig, client_endpoint, server_endpoint
from dogfs.wire.messages import Cell, GetShard, GetShardEnd, PutShard, PutShardEnd, ShardStored
from dogfs.wire.protocol import Connection, ConnectionClosed, Request, WireError
from tests.test_wire_socket import SocketPairMixin, slow_sink_handler, upload_to_slow_reader

MiB = 1 << 20
SHARD = "000000000000002a-03"


def deferred(coroutine: Any) -> defer.Deferred[Any]:
    return defer.Deferred.fromCoroutine(coroutine).addTimeout(30, reactor)  # type: ignore[arg-type]


class TLSSocketTests(SocketPairMixin, TestCase):
    """Frames over a real TLS connection between two wire Connections (the plain tests'
    pair, with TLS endpoints: see connect), in sealed frames after the handshake (the
    default); TLSRecordSocketTests runs the same with TLS records for every byte."""

    sealed = True

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        ca = init_ca(os.path.join(base, "ca"))
        node = ca.issue("chunk-1", Role.NODE, os.path.join(base, "node"), hosts=["127.0.0.1"])
        alice = ca.issue("alice", Role.USER, os.path.join(base, "alice"))
        self.server_tls = ServerTLS(TLSConfig(ca.cert_path, node.cert_path, node.key_path, self.sealed))
        self.client_config = TLSConfig(ca.cert_path, alice.cert_path, alice.key_path, self.sealed)

    async def connect(self, handlers: dict[type, Any]) -> Connection:
        """A client Connection to a server Connection serving `handlers`, handshake done."""

        def make_server() -> Connection:
            self.server = Connection(reactor, handlers, node_id="server")
            return self.server

        endpoint = server_endpoint(reactor, "tcp:0:interface=127.0.0.1", self.server_tls)
        port = await endpoint.listen(Factory.forProtocol(make_server))
        self.addCleanup(port.stopListening)
        address = f"127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        client = await connectProtocol(
            client_endpoint(reactor, address, self.client_config),
            Connection(reactor, {}, node_id="client"),
        )
        self.addCleanup(self.close, client)
        await client.ready
        return client

    def test_socket_path_in_use(self) -> None:
        """After the handshake both ends read their socket through the TLS layer's own
        doRead, with TCP_NODELAY set; cells of 1 MiB and odd sizes go both ways intact."""
        rnd = random.Random(5)
        fragments = [rnd.randbytes(size) for size in (MiB, MiB + 80, 3, 70000, 2 * MiB + 1)]
        stored: list[bytes] = []

        async def sink(request: Request) -> ShardStored:
            while True:
                part = await request.next_part()
                assert part is not None
                msg, payload = part
                if isinstance(msg, PutShardEnd):
                    return ShardStored(SHARD, len(stored))
                stored.append(bytes(payload))

        async def source(request: Request) -> GetShardEnd:
            for i, fragment in enumerate(fragments):
                await request.send_part(Cell(i, crc32c(fragment)), fragment)
            return GetShardEnd(len(fragments))

        async def go() -> None:
            client = await self.connect({
                PutShard: lambda r: defer.Deferred.fromCoroutine(sink(r)),
                GetShard: lambda r: defer.Deferred.fromCoroutine(source(r)),
            })
            assert self.server is not None
            for conn in (client, self.server):
                tls = conn.transport
                tcp = tls.transport
                self.assertEqual(tcp.doRead, tls._read_socket)
                self.assertTrue(tcp.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                self.assertEqual(tls._sealed_in, self.sealed)
            upload = client.open_stream(PutShard(SHARD, "RS-4-2", 3, MiB))
            for i, fragment in enumerate(fragments):
                await upload.send(Cell(i, crc32c(fragment)), fragment)
            reply = await upload.finish(PutShardEnd(len(fragments)))
            self.assertEqual(reply.msg, ShardStored(SHARD, len(fragments)))
            self.assertEqual([crc32c(s) for s in stored], [crc32c(f) for f in fragments])
            got: list[bytes] = []
            reply = await client.call(
                GetShard(SHARD, 0, -1), on_part=lambda msg, payload: got.append(bytes(payload))
            )
            self.assertEqual(reply.msg, GetShardEnd(len(fragments)))
            self.assertEqual([crc32c(g) for g in got], [crc32c(f) for f in fragments])

        return deferred(go())

    def test_stream_with_slow_reader(self) -> None:
        """A 32 MiB upload to a handler that pauses arrives whole and in order; the sender is
        held back by flow control while the reader lags (the TLS layer stops reading its
        socket when paused, and the socket fills up behind it)."""

        async def go() -> None:
            client = await self.connect({PutShard: slow_sink_handler})
            await upload_to_slow_reader(self, client, 32)

        return deferred(go())

    def test_reused_buffer_after_send(self) -> None:
        """A payload buffer its owner overwrites right after the send still arrives as it was
        when sent, including while the socket is full (bytes the socket did not take are the
        TLS layer's own copy, never a view of the caller's buffer)."""
        original = random.Random(6).randbytes(8 * MiB)
        buffer = bytearray(original)
        arrived: defer.Deferred[int] = defer.Deferred()

        def record(request: Request) -> None:
            arrived.callback(crc32c(request.payload))

        async def go() -> None:
            client = await self.connect({GetShard: record})
            assert self.server is not None
            self.server.transport.pauseProducing()  # the peer stops reading its socket
            client.send_oneway(GetShard(SHARD, 0, -1), memoryview(buffer))
            buffer[:] = bytes(len(buffer))
            self.server.transport.resumeProducing()
            self.assertEqual(await arrived, crc32c(original))

        return deferred(go())

    def test_peer_lost_in_the_middle_of_a_large_frame(self) -> None:
        """When the server's TCP connection dies while a large cell is being received, the
        client's request fails as a closed connection (retryable), not as a TLS failure, and
        the server's connection ends too."""

        async def die(request: Request) -> ShardStored:
            part = await request.next_part()
            assert part is not None
            request.connection.transport.transport.abortConnection()  # TCP, under TLS
            return ShardStored(SHARD, 0)

        async def go() -> None:
            client = await self.connect({PutShard: lambda r: defer.Deferred.fromCoroutine(die(r))})
            assert self.server is not None
            upload = client.open_stream(PutShard(SHARD, "RS-4-2", 3, MiB))
            payload = os.urandom(4 * MiB)
            failure = None
            try:
                for i in range(8):
                    await upload.send(Cell(i, crc32c(payload)), payload)
                await upload.finish(PutShardEnd(8))
            except WireError as e:
                failure = e
            self.assertIsInstance(failure, ConnectionClosed)
            await self.server.closed

        return deferred(go())

    def test_close_while_reading_paused(self) -> None:
        """A connection closed while it holds its reading back (a consumer that stopped
        taking a shard's cells) still closes: the TLS layer must read the peer's
        close_notify, which waits in the socket behind cells nobody wants any more."""
        cells = 24  # well past what the two sockets' buffers hold

        async def source(request: Request) -> GetShardEnd:
            payload = bytes(MiB)
            for i in range(cells):
                await request.send_part(Cell(i, crc32c(payload)), payload)
            return GetShardEnd(cells)

        async def go() -> None:
            client = await self.connect({GetShard: lambda r: defer.Deferred.fromCoroutine(source(r))})
            assert self.server is not None
            first: defer.Deferred[None] = defer.Deferred()

            def part(msg: Any, payload: memoryview) -> None:
                if not first.called:
                    client.pause_reading()
                    first.callback(None)

            call = client.call(GetShard(SHARD, 0, -1), on_part=part)
            call.addErrback(lambda f: f.trap(ConnectionClosed))
            await first
            client.close()
            await client.closed.addTimeout(10, reactor)  # type: ignore[arg-type]
            await call
            await self.server.closed.addTimeout(10, reactor)  # type: ignore[arg-type]

        return deferred(go())


class TLSRecordSocketTests(TLSSocketTests):
    """TLSSocketTests with ``sealed = false``: TLS records for every byte."""

    sealed = False
