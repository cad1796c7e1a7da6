# -*- test-case-name: tests.test_client_process -*-
"""The Twisted client API against a real cluster: producers, consumers, stalled servers.

The cluster's daemons are real processes (`dogfs cluster up`); the client runs in the test's
own reactor, as an application embedding DogFS would run it.
"""

from __future__ import annotations

import io
import os
import random
import signal
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IConsumer
from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer
from zope.interface import implementer

from dogfs.client.api import DogFSClient, DogFSError
from dogfs.config import load_client
from dogfs.meta.commands import FileInfo
from tests.test_datapath_process import Cluster


@implementer(IConsumer)
class SlowConsumer:
    """Collects bytes and pauses its producer after every `burst` bytes for a moment."""

    def __init__(self, clock: Any, burst: int) -> None:
        self.clock = clock
        self.burst = burst
        self.data = bytearray()
        self.producer: Any = None
        self.pauses = 0
        self._since_pause = 0
        self.registered = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        self.registered = True

    def unregisterProducer(self) -> None:
        self.registered = False

    def write(self, data: bytes) -> None:
        self.data += data
        self._since_pause += len(data)
        if self._since_pause >= self.burst and self.producer is not None:
            self._since_pause = 0
            self.pauses += 1
            self.producer.pauseProducing()
            self.clock.callLater(0.05, self.producer.resumeProducing)


class ClientAPITests(TestCase):
    """DogFSClient with real daemons."""

    timeout = 240

    def setUp(self) -> None:
        self.cluster = Cluster()
        self.addCleanup(self.cluster.destroy)
        self.cluster.create()
        self.client = DogFSClient(reactor, load_client(os.path.join(self.cluster.home, "client.toml")), timeout=8)
        self.addCleanup(self.client.close)

    async def _producer_and_consumer(self) -> None:
        data = random.Random(1).randbytes(9 * (1 << 20) + 77)
        info = await self.client.put("/p", FileBodyProducer(io.BytesIO(data), cooperator=task.Cooperator()))
        self.assertEqual(info.size, len(data))
        consumer = SlowConsumer(reactor, 3 << 20)
        await self.client.get("/p", consumer)
        self.assertEqual(bytes(consumer.data), data)
        self.assertGreater(consumer.pauses, 1)
        self.assertFalse(consumer.registered)

    def test_producer_and_consumer(self) -> defer.Deferred[None]:
        """put from an IBodyProducer and get into an IConsumer that pauses us: same bytes."""
        return defer.Deferred.fromCoroutine(self._producer_and_consumer())

    async def _stalled(self) -> None:
        data = random.Random(2).randbytes(3 * (1 << 20) + 5)
        await self.client.put("/s", io.BytesIO(data))
        info = await self.client.stat("/s")
        assert isinstance(info, FileInfo)
        node = info.block_groups[0].shards[0].node_id
        pid = self.cluster.nodes()[node]["pid"]
        os.kill(pid, signal.SIGSTOP)  # alive to TCP, silent to us: "too slow"
        try:
            started = reactor.seconds()
            sink = io.BytesIO()
            await self.client.get("/s", sink)
            self.assertEqual(sink.getvalue(), data)
            self.assertLess(reactor.seconds() - started, self.client.timeout + 5)
        finally:
            os.kill(pid, signal.SIGCONT)

    def test_stalled_chunk_server(self) -> defer.Deferred[None]:
        """A chunk server that stops answering (SIGSTOP) is read around, within the timeout."""
        return defer.Deferred.fromCoroutine(self._stalled())

    async def _namespace(self) -> None:
        await self.client.mkdir("/a/b", parents=True)
        await self.client.put("/a/b/f", io.BytesIO(b"hello"))
        await self.client.mv("/a/b/f", "/a/g")
        self.assertEqual([e.name for e in await self.client.ls("/a")], ["b", "g"])
        sink = io.BytesIO()
        await self.client.get("/a/g", sink)
        self.assertEqual(sink.getvalue(), b"hello")
        await self.client.rm("/a", recursive=True)
        with self.assertRaises(DogFSError) as e:
            await self.client.stat("/a/g")
        self.assertEqual(e.exception.code, "not_found")

    def test_namespace(self) -> defer.Deferred[None]:
        """mkdir -p, put, mv, ls, get, rm -r through the API; a missing path is not_found."""
        return defer.Deferred.fromCoroutine(self._namespace())
