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
from dogfs.meta.commands import Allocate, Allocation, CommitFile, FileInfo
from tests.test_client_read import Collector
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


class PutReplacementTests(TestCase):
    """A chunk server killed during a put: the block group is written again elsewhere."""

    timeout = 240

    def setUp(self) -> None:
        self.cluster = Cluster()
        self.addCleanup(self.cluster.destroy)
        # One chunk server more than RS-4-2 needs, so that a placement without the victim exists.
        self.cluster.up("--meta", "1", "--chunk", "7", "--block-size", str(1 << 20))
        self.client = DogFSClient(reactor, load_client(os.path.join(self.cluster.home, "client.toml")), timeout=30)
        self.addCleanup(self.client.close)
        # Watch the placements the put is given (what the test kills depends on them).
        self.allocations: list[Allocation] = []
        command = self.client._command

        async def watched(cmd: Any) -> Any:
            result = await command(cmd)
            if isinstance(result, Allocation):
                self.allocations.append(result)
            return result

        self.client._command = watched  # type: ignore[method-assign]

    def kill_in_first_group(self) -> Any:
        """A progress callback that kills (SIGKILL) shard 0's server of the first block group
        once its first stripe is sent; the victim's id lands in the returned list."""
        killed: list[str] = []

        def progress(n: int) -> None:
            if not killed and n > 0 and self.allocations:
                node = self.allocations[0].shards[0].node_id
                os.kill(self.cluster.nodes()[node]["pid"], signal.SIGKILL)
                killed.append(node)

        progress.killed = killed  # type: ignore[attr-defined]
        return progress

    async def _file(self) -> None:
        size = 9 * (1 << 20) + 11  # three block groups of 4 x 1 MiB
        path = self.cluster.local("f", size, seed=4)
        progress = self.kill_in_first_group()
        with open(path, "rb") as f:
            info = await self.client.put("/f", f, progress=progress)
        [victim] = progress.killed
        self.assertEqual(info.size, size)
        stat = await self.client.stat("/f")
        assert isinstance(stat, FileInfo)
        for bg in stat.block_groups:
            self.assertNotIn(victim, [s.node_id for s in bg.shards])
        # The first group was placed again, at once, without the victim: one allocation more
        # than the file has block groups, and the first is not among them.
        self.assertNotIn(self.allocations[0].bg_id, [bg.id for bg in stat.block_groups])
        self.assertEqual(len(self.allocations), len(stat.block_groups) + 1)
        sink = io.BytesIO()
        await self.client.get("/f", sink)
        with open(path, "rb") as f:
            self.assertEqual(sink.getvalue(), f.read())

    def test_file_source_is_written_elsewhere(self) -> defer.Deferred[None]:
        """A put from a file survives the kill -9 of one of its chunk servers: the group is
        written again without it, and the file reads back byte for byte."""
        return defer.Deferred.fromCoroutine(self._file())

    async def _stream(self) -> None:
        data = random.Random(5).randbytes(6 * (1 << 20))
        progress = self.kill_in_first_group()
        producer = FileBodyProducer(io.BytesIO(data), cooperator=task.Cooperator())
        with self.assertRaises(DogFSError) as caught:
            await self.client.put("/s", producer, progress=progress)
        [victim] = progress.killed
        self.assertIn(f"chunk server {victim} failed", caught.exception.message)
        with self.assertRaises(DogFSError) as missing:
            await self.client.stat("/s")
        self.assertEqual(missing.exception.code, "not_found")

    async def _too_few(self) -> None:
        # Another server gone first: six are left, exactly what RS-4-2 needs.
        spare = sorted(n for n, info in self.cluster.nodes().items() if info["kind"] == "chunk")[-1]
        os.kill(self.cluster.nodes()[spare]["pid"], signal.SIGKILL)
        deadline = reactor.seconds() + 60
        while not any(c["id"] == spare and c["state"] == "dead" for c in (await self.client.status())["chunks"]):
            self.assertLess(reactor.seconds(), deadline, f"{spare} was never declared dead")
            await task.deferLater(reactor, 0.2, lambda: None)
        path = self.cluster.local("g", 6 * (1 << 20), seed=6)
        progress = self.kill_in_first_group()
        with self.assertRaises(DogFSError) as caught, open(path, "rb") as f:
            await self.client.put("/g", f, progress=progress)
        [victim] = progress.killed
        self.assertEqual(caught.exception.code, "not_enough_chunk_servers")
        self.assertIn(f"without {victim}, which failed this upload", caught.exception.message)

    def test_no_placement_left(self) -> defer.Deferred[None]:
        """When no placement without the failed server exists, the put fails at once saying
        so (not after a timeout), and names it."""
        return defer.Deferred.fromCoroutine(self._too_few())

    def test_stream_fails_naming_the_server(self) -> defer.Deferred[None]:
        """A put from a stream (which cannot be read twice) fails instead, naming the chunk
        server, and leaves no file."""
        return defer.Deferred.fromCoroutine(self._stream())


class StuckConsumer(Collector):
    """Pauses its producer at the first write and stays paused until `release`."""

    def write(self, data: bytes) -> None:
        if not self.data:
            self.producer.pauseProducing()
        self.data += data

    def release(self) -> None:
        self.producer.resumeProducing()


class SlowUploadTests(TestCase):
    """An upload that takes longer than the metadata's allocation_ttl, from a pipe."""

    timeout = 240
    TTL = 2.0

    def setUp(self) -> None:
        self.cluster = Cluster()
        self.addCleanup(self.cluster.destroy)
        self.cluster.create()
        self.cluster.run("cluster", "down")
        config = os.path.join(self.cluster.home, "nodes", "meta-1", "meta.toml")
        with open(config) as f:
            text = f.read()
        with open(config, "w") as f:
            f.write(text.replace("[meta]\n", f"[meta]\nallocation_ttl = {self.TTL}\n", 1))
        self.cluster.up()
        self.client = DogFSClient(reactor, load_client(os.path.join(self.cluster.home, "client.toml")), timeout=8)
        self.addCleanup(self.client.close)

    async def _slow(self) -> None:
        # The ttl is in force: an allocation left alone expires.
        abandoned = await self.client._command(Allocate("/abandoned", None, ()))
        deadline = reactor.seconds() + 30
        while (await self.client.status())["namespace"]["pending_block_groups"]:
            self.assertLess(reactor.seconds(), deadline, "an allocation nobody renews never expired")
            await task.deferLater(reactor, 0.2, lambda: None)
        with self.assertRaises(DogFSError) as caught:
            await self.client._command(CommitFile("/abandoned", 1, ((abandoned.bg_id, 1),)))
        self.assertEqual(caught.exception.code, "stale_allocation")
        # A put fed through a pipe for about three ttls: 6 MiB (two block groups of RS-4-2
        # with 1 MiB blocks) in 48 KiB pieces every 40 ms.
        data = random.Random(9).randbytes(6 * (1 << 20))
        r, w = os.pipe()
        os.set_blocking(w, False)
        left = [memoryview(data)]
        began = reactor.seconds()

        def feed() -> None:
            if left[0]:
                try:
                    n = os.write(w, left[0][: 48 << 10])
                except BlockingIOError:
                    return
                left[0] = left[0][n:]
            if not left[0]:
                os.close(w)
                feeder.stop()

        feeder = task.LoopingCall(feed)
        feeder.start(0.04)
        with os.fdopen(r, "rb") as source:
            info = await self.client.put("/slow", source)
        self.assertGreater(reactor.seconds() - began, 2 * self.TTL)
        self.assertEqual(info.size, len(data))
        sink = io.BytesIO()
        await self.client.get("/slow", sink)
        self.assertEqual(sink.getvalue(), data)

    def test_upload_longer_than_the_ttl(self) -> defer.Deferred[None]:
        """The put renews its allocations while its source trickles in, and commits; a
        pending allocation nobody renews expires within the ttl."""
        return defer.Deferred.fromCoroutine(self._slow())


class ConcurrentReadTests(TestCase):
    """Several reads through one client at once (the default 64 MiB blocks: one group)."""

    timeout = 240

    def setUp(self) -> None:
        self.cluster = Cluster()
        self.addCleanup(self.cluster.destroy)
        self.cluster.up("--meta", "1", "--chunk", "6")
        self.client = DogFSClient(reactor, load_client(os.path.join(self.cluster.home, "client.toml")), timeout=8)
        self.addCleanup(self.client.close)

    async def _stuck(self) -> None:
        rnd = random.Random(7)
        slow, fast = rnd.randbytes(40 << 20), rnd.randbytes(8 << 20)
        await self.client.put("/slow", io.BytesIO(slow))
        await self.client.put("/fast", io.BytesIO(fast))
        consumer = StuckConsumer()
        slow_read = defer.Deferred.fromCoroutine(self._get("/slow", consumer))
        # Wait until the stuck read holds its streams back: the consumer has paused it (at
        # its first write) and their connections stop reading. A stream ahead of a slower
        # one pauses too, before anything is written: release() must not come before that.
        deadline = reactor.seconds() + 30
        while not (consumer.data and any(c._reading_pauses for c in self.client.pool._leased)):
            self.assertLess(reactor.seconds(), deadline, "the stuck read never paused a stream")
            await task.deferLater(reactor, 0.01, lambda: None)
        started = reactor.seconds()
        sink = io.BytesIO()
        await self.client.get("/fast", sink)
        self.assertEqual(sink.getvalue(), fast)
        # Not held up until a shard timeout (then read around): it never waited on them.
        self.assertLess(reactor.seconds() - started, self.client.timeout / 2)
        self.assertFalse(slow_read.called)
        consumer.release()
        await slow_read
        self.assertEqual(bytes(consumer.data), slow)

    async def _get(self, path: str, consumer: Any) -> None:
        await self.client.get(path, consumer)

    def test_stuck_consumer_does_not_stall_other_reads(self) -> defer.Deferred[None]:
        """A read whose consumer stops taking data pauses only its own connections: another
        read of a file on the same chunk servers, through the same client, goes on."""
        return defer.Deferred.fromCoroutine(self._stuck())
