# -*- test-case-name: tests.test_client_read -*-
"""Unit tests of the GET path (dogfs.client.transfer.GroupReader) with scripted chunk servers."""

from __future__ import annotations

import errno
import fcntl
import io
import os
import queue
import random
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from dogfs.client.transfer import (
    ConsumerSink,
    FileSink,
    FileSource,
    GroupReader,
    PipeSource,
    WriteBehindSink,
    as_sink,
    as_source,
    flush_fully,
    get,
    put,
    write_fully,
)
from dogfs.codec.checksum import crc32c
from dogfs.codec.policy import ECPolicy
from dogfs.codec.stripe import StripeCodec
from dogfs.meta import commands as c
from dogfs.wire import messages as m
from dogfs.wire.protocol import ConnectionClosed, Reply


class ScriptedConnection:
    """A chunk-server connection whose streamed answers the test delivers by hand."""

    def __init__(self) -> None:
        self.pauses = 0
        self.closed = False
        self.calls: list[tuple[Any, Any, defer.Deferred[Reply]]] = []

    @property
    def is_open(self) -> bool:
        return not self.closed

    def close(self) -> None:
        """As a real connection: calls still running fail with ConnectionClosed."""
        self.closed = True
        for _, _, d in self.calls:
            if not d.called:
                d.errback(ConnectionClosed("connection to chunk server closed locally"))

    def resume_reading(self) -> None:
        self.pauses -= 1
        assert self.pauses >= 0, "resumed more often than paused"

    def call(self, msg: Any, payload: bytes = b"", timeout: Any = None, on_part: Any = None) -> defer.Deferred[Reply]:
        d: defer.Deferred[Reply] = defer.Deferred()
        self.calls.append((msg, on_part, d))
        return d

    def pause_reading(self) -> None:
        self.pauses += 1


class ScriptedPool:
    """Leases one scripted connection per address; records what is given back."""

    def __init__(self, width: int) -> None:
        self.connections = {f"127.0.0.1:{7100 + i}": ScriptedConnection() for i in range(width)}
        self.given_back: list[str] = []

    def lease(self, address: str) -> defer.Deferred[ScriptedConnection]:
        return defer.succeed(self.connections[address])

    def give_back(self, address: str, connection: ScriptedConnection) -> None:
        assert connection is self.connections[address]
        self.given_back.append(address)


class FakeClient:
    def __init__(self, width: int) -> None:
        self.clock = Clock()
        self.timeout = 10.0
        self.pool = ScriptedPool(width)


@implementer(IConsumer)
class Collector:
    def __init__(self) -> None:
        self.data = bytearray()
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data += data


def setup(stripes: int, policy: str = "RS-2-1", cell: int = 1024) -> tuple[FakeClient, GroupReader, list[list[bytes]], bytes, Any]:
    codec = StripeCodec(ECPolicy.parse(policy), cell)
    data = random.Random(3).randbytes(codec.stripe_size * stripes - 7)
    fragments = [codec.encode(data[i : i + codec.stripe_size]) for i in range(0, len(data), codec.stripe_size)]
    client = FakeClient(codec.width)
    shards = tuple(
        c.ShardLocation(i, f"{1:016x}-{i:02d}", f"chunk-{i}", f"127.0.0.1:{7100 + i}") for i in range(codec.width)
    )
    bg = c.BlockGroupInfo(1, len(data), policy, shards)
    sink = FileSink(_Buffer())
    reader = GroupReader(client, "/f", bg, codec, sink, None)  # type: ignore[arg-type]
    return client, reader, fragments, data, sink


class _Buffer:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: Any) -> None:
        self.data += b


def deliver(client: FakeClient, shard: int, fragments: list[list[bytes]], cells: range) -> None:
    conn = client.pool.connections[f"127.0.0.1:{7100 + shard}"]
    _, on_part, _ = conn.calls[-1]
    for i in cells:
        frag = fragments[i][shard]
        on_part(m.Cell(i, crc32c(frag)), memoryview(frag))


class GroupReaderTests(SynchronousTestCase):
    """The read path's fallbacks and back-pressure."""

    def test_fast_shard_paused_once(self) -> None:
        """A stream far ahead of the others is paused once, however many cells it sends."""
        client, reader, fragments, data, sink = setup(12)
        d = reader.read()
        deliver(client, 0, fragments, range(12))
        conn0 = client.pool.connections["127.0.0.1:7100"]
        self.assertEqual(conn0.pauses, 1)
        deliver(client, 1, fragments, range(12))
        self.assertEqual(conn0.pauses, 0)
        self.successResultOf(d)
        self.assertEqual(bytes(sink.f.data), data)

    def test_wrong_fragment_falls_back_to_parity(self) -> None:
        """A CRC-valid fragment of another shard is refused and parity replaces that shard."""
        client, reader, fragments, data, sink = setup(3)
        d = reader.read()
        deliver(client, 0, fragments, range(3))
        conn1 = client.pool.connections["127.0.0.1:7101"]
        _, on_part, _ = conn1.calls[-1]
        wrong = fragments[0][0]  # shard 0's fragment offered as shard 1's
        on_part(m.Cell(0, crc32c(wrong)), memoryview(wrong))
        self.assertIn(1, reader.failed)
        deliver(client, 2, fragments, range(3))  # parity from stripe 0
        self.successResultOf(d)
        self.assertEqual(bytes(sink.f.data), data)

    def test_consumer_stop_ends_read(self) -> None:
        """A consumer that calls stopProducing ends the download with an error, not a hang."""
        from dogfs.client.api import DogFSError

        client, reader, fragments, data, _ = setup(8)
        collector = Collector()
        reader.sink = ConsumerSink(collector)
        d = reader.read()
        collector.producer.pauseProducing()
        deliver(client, 0, fragments, range(3))
        collector.producer.stopProducing()
        self.assertEqual(self.failureResultOf(d, DogFSError).value.code, "aborted")
        self.assertEqual(client.pool.connections["127.0.0.1:7100"].pauses, 0)
        # Both streams still had cells to come: their connections are closed, not reused.
        self.assertTrue(all(client.pool.connections[f"127.0.0.1:{7100 + i}"].closed for i in (0, 1)))
        self.assertEqual(client.pool.given_back, [])

    def test_slow_shard_replaced_after_timeout(self) -> None:
        """A shard that sends nothing for shard_timeout is replaced by parity, and dropped."""
        client, reader, fragments, data, sink = setup(2)
        d = reader.read()
        deliver(client, 0, fragments, range(2))
        client.clock.advance(reader.shard_timeout + 0.1)
        self.assertIn(1, reader.failed)
        self.assertTrue(client.pool.connections["127.0.0.1:7101"].closed)
        deliver(client, 2, fragments, range(2))
        self.successResultOf(d)
        self.assertEqual(bytes(sink.f.data), data)

    def test_connections_given_back_when_answered(self) -> None:
        """Each shard's connection is leased for the read and given back once its call is
        answered in full, even when that answer comes after the data was written out; a
        stream that failed has its connection closed instead."""
        client, reader, fragments, data, sink = setup(2)
        d = reader.read()
        deliver(client, 0, fragments, range(2))
        conn1 = client.pool.connections["127.0.0.1:7101"]
        _, on_part, _ = conn1.calls[-1]
        wrong = fragments[0][0]
        on_part(m.Cell(0, crc32c(wrong)), memoryview(wrong))  # shard 1 fails
        self.assertTrue(conn1.closed)
        deliver(client, 2, fragments, range(2))
        self.successResultOf(d)
        self.assertEqual(bytes(sink.f.data), data)
        self.assertEqual(client.pool.given_back, [])  # no answers yet: still leased
        for address in ("127.0.0.1:7100", "127.0.0.1:7102"):
            client.pool.connections[address].calls[-1][2].callback(Reply(m.GetShardEnd(2)))
        self.assertEqual(client.pool.given_back, ["127.0.0.1:7100", "127.0.0.1:7102"])
        self.assertFalse(client.pool.connections["127.0.0.1:7100"].closed)

    def test_connection_given_back_unpaused(self) -> None:
        """A stream held back (far ahead) whose call then ends gives its connection back
        reading again, and later catching up does not touch it any more."""
        client, reader, fragments, data, sink = setup(12)
        d = reader.read()
        conn0 = client.pool.connections["127.0.0.1:7100"]
        deliver(client, 0, fragments, range(12))
        self.assertEqual(conn0.pauses, 1)
        conn0.calls[-1][2].callback(Reply(m.GetShardEnd(12)))
        self.assertEqual((conn0.pauses, client.pool.given_back), (0, ["127.0.0.1:7100"]))
        deliver(client, 1, fragments, range(12))
        self.assertEqual(conn0.pauses, 0)
        self.successResultOf(d)
        self.assertEqual(bytes(sink.f.data), data)

    def test_abort_with_only_ends_to_come(self) -> None:
        """A read stopped while a held-back stream has only its end to come resumes that
        connection once (never below zero) and gives it back when the end arrives; a stream
        whose end never comes has its connection closed after the shard timeout."""
        client, reader, fragments, data, sink = setup(12)
        d = reader.read()
        conn0, conn1 = (client.pool.connections[f"127.0.0.1:{7100 + i}"] for i in (0, 1))
        deliver(client, 0, fragments, range(12))
        self.assertEqual(conn0.pauses, 1)
        reader._consumer_stopped()
        self.failureResultOf(d)
        self.assertEqual(conn0.pauses, 0)
        self.assertTrue(conn1.closed)  # cells were still to come from it
        conn0.calls[-1][2].callback(Reply(m.GetShardEnd(12)))
        self.assertEqual((conn0.pauses, client.pool.given_back), (0, ["127.0.0.1:7100"]))
        self.assertEqual([c.func.__name__ for c in client.clock.getDelayedCalls()], [])  # nothing left waiting
        self.assertFalse(conn0.closed)

        client, reader, fragments, data, sink = setup(2)
        d = reader.read()
        deliver(client, 0, fragments, range(2))
        reader._consumer_stopped()
        self.failureResultOf(d)
        conn0 = client.pool.connections["127.0.0.1:7100"]
        client.clock.advance(reader.shard_timeout + 1)
        self.assertTrue(conn0.closed)
        self.assertEqual(client.pool.given_back, [])

    def test_server_error_keeps_the_connection(self) -> None:
        """A shard the server answers with an error (not_found) is read around, and the
        connection, which carries nothing more of that call, is given back, not closed."""
        from dogfs.wire.protocol import WireError

        client, reader, fragments, data, sink = setup(2)
        d = reader.read()
        conn1 = client.pool.connections["127.0.0.1:7101"]
        conn1.calls[-1][2].errback(WireError("not_found", "chunk-1 has no shard"))
        self.assertIn(1, reader.failed)
        self.assertFalse(conn1.closed)
        self.assertEqual(client.pool.given_back, ["127.0.0.1:7101"])
        deliver(client, 0, fragments, range(2))
        deliver(client, 2, fragments, range(2))
        self.successResultOf(d)
        self.assertEqual(bytes(sink.f.data), data)

    def test_give_up_names_every_shard_that_did_not_deliver(self) -> None:
        """With every chunk server silent, the error says none answered and names each
        shard: those that timed out, and those still silent when the read gave up (chunk-3,
        whose watchdog was about to fire; the parity shards started in place of the
        others)."""
        from dogfs.client.api import DogFSError

        client, reader, fragments, data, sink = setup(2, "RS-4-2")
        d = reader.read()
        client.clock.advance(reader.shard_timeout + 0.1)
        error = self.failureResultOf(d, DogFSError).value
        self.assertEqual(
            (error.code, error.message),
            (
                "unavailable",
                "cannot read /f: block group 1 needs 4 of its 6 shards but only 0 answered ("
                "chunk-0: no data for 10s; chunk-1: no data for 10s; chunk-2: no data for 10s; "
                "chunk-3: no data for 10.1s; chunk-4: no data yet; chunk-5: no data yet)",
            ),
        )
        self.assertEqual(client.clock.getDelayedCalls(), [])

    def test_give_up_counts_shards_that_sent_cells(self) -> None:
        """A shard whose stream sent cells counts as having answered and is not named."""
        from dogfs.client.api import DogFSError
        from dogfs.wire.protocol import WireError

        client, reader, fragments, data, sink = setup(3)
        d = reader.read()
        deliver(client, 0, fragments, range(1))
        client.pool.connections["127.0.0.1:7101"].calls[-1][2].errback(WireError("not_found", "no such shard"))
        client.pool.connections["127.0.0.1:7102"].calls[-1][2].errback(WireError("not_found", "no such shard"))
        error = self.failureResultOf(d, DogFSError).value
        self.assertEqual(
            error.message,
            "cannot read /f: block group 1 needs 2 of its 3 shards but only 1 answered "
            "(chunk-1: no such shard; chunk-2: no such shard)",
        )

    def test_suspect_servers_are_read_last(self) -> None:
        """A block group reads a parity shard instead of a data shard whose server failed
        earlier in the get, and that data shard only when the others are too few; a suspect
        server that then serves its shard in full is suspect no more."""
        from dogfs.wire.protocol import WireError

        client, reader, fragments, data, sink = setup(2)
        reader = GroupReader(client, "/f", reader.bg, reader.codec, sink, None, {"chunk-0"})  # type: ignore[arg-type]
        d = reader.read()
        self.assertEqual(sorted(reader.streams), [1, 2])
        self.assertEqual(len(client.pool.connections["127.0.0.1:7100"].calls), 0)
        client.pool.connections["127.0.0.1:7102"].calls[-1][2].errback(WireError("not_found", "no such shard"))
        self.assertEqual(sorted(reader.streams), [0, 1])  # the suspect, since no other is left
        self.assertEqual(reader.suspects, {"chunk-0", "chunk-2"})
        deliver(client, 0, fragments, range(2))
        deliver(client, 1, fragments, range(2))
        self.successResultOf(d)
        self.assertEqual(bytes(sink.f.data), data)
        self.assertEqual(reader.suspects, {"chunk-2"})

    def test_failed_server_costs_a_get_one_timeout(self) -> None:
        """A chunk server that times out in the first block group of a get is not waited
        for in the next: that group starts the parity shard in place of its data shard and
        completes with no more time passing."""
        client, reader, fragments, data, _ = setup(2)
        bg1 = reader.bg
        bg2 = c.BlockGroupInfo(2, bg1.size, bg1.ec, bg1.shards)  # the same placement again
        info = c.FileInfo("/f", 2 * bg1.size, bg1.ec, 0.0, 1, (bg1, bg2))
        fake: Any = client
        fake.reactor = client.clock
        fake._stat = lambda path: defer.succeed(info)
        fake.cluster_info = lambda: defer.succeed({"cell_size": 1024})
        out = io.BytesIO()
        d = defer.Deferred.fromCoroutine(get(fake, "/f", out, None))
        conns = [client.pool.connections[f"127.0.0.1:{7100 + i}"] for i in range(3)]
        deliver(client, 0, fragments, range(2))
        client.clock.advance(reader.shard_timeout + 0.1)  # chunk-1 says nothing
        deliver(client, 2, fragments, range(2))  # parity completes the first group
        # The second group has started, without chunk-1.
        self.assertEqual([len(conn.calls) for conn in conns], [2, 1, 2])
        deliver(client, 0, fragments, range(2))
        deliver(client, 2, fragments, range(2))
        self.assertEqual(self.successResultOf(d), info)
        self.assertEqual(out.getvalue(), data + data)
        self.assertEqual(client.clock.seconds(), reader.shard_timeout + 0.1)


class _PipeReader:
    """Reads a pipe to its end on a thread of its own. The pipe holds one page
    (`_non_blocking_pipe`), so any write larger than that is short or would block, however
    fast this reader is: no pause is needed to keep the writer waiting."""

    def __init__(self, fd: int) -> None:
        import threading

        self.fd = fd
        self.data = bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with os.fdopen(self.fd, "rb", buffering=0) as pipe:
            while piece := pipe.read(8192):
                self.data += piece

    def join(self) -> bytes:
        self.thread.join(30)
        assert not self.thread.is_alive(), "the pipe was never closed"
        return bytes(self.data)


def _non_blocking_pipe() -> tuple[int, int]:
    """A pipe whose write end is non-blocking and which holds one page: a write of more than
    that is always short, or would block."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(w, False)
    return r, w


class WriteFullyTests(SynchronousTestCase):
    """Writes into destinations that take part of a write, or none of it for now."""

    def test_short_and_would_block_writes_are_finished(self) -> None:
        """Short writes, None and BlockingIOError (with or without characters_written) are
        followed by the rest of the bytes, after waiting for the descriptor when it is
        full; nothing is written twice or dropped."""

        def blocked(kept: int | None) -> BlockingIOError:
            e = BlockingIOError(errno.EAGAIN, "write could not complete without blocking")
            if kept is not None:
                e.characters_written = kept
            return e

        r, w = os.pipe()
        os.set_blocking(w, False)
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)

        class Choppy(io.RawIOBase):
            """Takes writes as a raw file on a non-blocking descriptor with a slow reader may."""

            def __init__(self) -> None:
                self.data = bytearray()
                self.answers: list[int | None | BlockingIOError] = [3, None, blocked(2), blocked(None), 1]

            def write(self, b: Any) -> int | None:
                answer = self.answers.pop(0) if self.answers else len(b)
                if isinstance(answer, BlockingIOError):
                    self.data += bytes(b[: getattr(answer, "characters_written", 0)])
                    raise answer
                if answer is not None:
                    self.data += bytes(b[:answer])
                return answer

            def fileno(self) -> int:
                return w

        f = Choppy()
        waits: list[int] = []
        write_fully(f, b"0123456789abcdef", waits.append)  # type: ignore[arg-type]
        self.assertEqual(bytes(f.data), b"0123456789abcdef")
        self.assertEqual(waits, [w, w, w])

    def test_writer_answering_none_takes_it_all(self) -> None:
        """A writer of the caller's that answers None (a wrapper that hashes or tees, say,
        with the fileno of the file it wraps) has taken everything: it is written once, not
        again for ever."""
        with open(os.path.join(self.mktemp()), "wb") as target:

            class Tee:
                def __init__(self) -> None:
                    self.writes = 0

                def write(self, b: Any) -> None:
                    self.writes += 1
                    target.write(b)

                def fileno(self) -> int:
                    return target.fileno()

            tee = Tee()
            write_fully(tee, b"abc", lambda fd: self.fail("waited"))  # type: ignore[arg-type]
            self.assertEqual(tee.writes, 1)

    def test_writer_taking_nothing_is_an_error(self) -> None:
        """A writer that answers 0 (took nothing, yet not blocked) is an error, not a loop."""

        class Stuck:
            def write(self, b: Any) -> int:
                return 0

        with self.assertRaises(OSError):
            write_fully(Stuck(), b"x")  # type: ignore[arg-type]

    def test_file_sink_into_a_non_blocking_pipe(self) -> None:
        """FileSink delivers every byte into a non-blocking pipe that holds a page, through a raw
        file object (stdout under PYTHONUNBUFFERED) and a buffered one (then flushed)."""
        pieces = [random.Random(i).randbytes(300_000 + i) for i in range(4)] + [b"y" * 10]
        for buffering in (0, -1):
            r, w = _non_blocking_pipe()
            reader = _PipeReader(r)
            with os.fdopen(w, "wb", buffering=buffering) as pipe:
                sink = FileSink(pipe)
                for piece in pieces:
                    sink.write(memoryview(piece))
                flush_fully(pipe)
            self.assertEqual(reader.join(), b"".join(pieces), f"buffering={buffering}")

    def test_write_behind_sink_into_a_non_blocking_pipe(self) -> None:
        """WriteBehindSink's thread waits for a non-blocking pipe that holds a page: drain fires
        once every byte is in it, in order."""
        pieces = [random.Random(i).randbytes(100_000 + i) for i in range(30)]
        for buffering in (0, -1):
            r, w = _non_blocking_pipe()
            reader = _PipeReader(r)
            with os.fdopen(w, "wb", buffering=buffering) as pipe:
                self._write_behind(pipe, pieces)
            self.assertEqual(reader.join(), b"".join(pieces), f"buffering={buffering}")

    def _write_behind(self, pipe: Any, pieces: list[bytes]) -> None:
        """Write ``pieces`` through a WriteBehindSink, drain it, close it, flush ``pipe``."""
        reactor = ThreadCalls()
        sink = WriteBehindSink(pipe, reactor, limit=1 << 20)
        for piece in pieces:
            sink.write(memoryview(piece))
        drained = sink.drain()
        reactor.run_until(lambda: drained.called)
        self.successResultOf(drained)
        ended = sink.close()
        reactor.run_until(lambda: ended.called)
        flush_fully(pipe)

    def test_close_stops_waiting_for_a_reader(self) -> None:
        """A get that ends while its writer thread waits for a pipe nobody reads (it failed,
        the reader stopped) is not kept waiting: close fires and the thread ends."""
        reactor = ThreadCalls()
        r, w = _non_blocking_pipe()
        self.addCleanup(os.close, r)
        with os.fdopen(w, "wb", buffering=0) as pipe:
            sink = WriteBehindSink(pipe, reactor)
            sink.write(b"x" * (1 << 20))
            sink.write(b"never written")
            ended = sink.close()
            reactor.run_until(lambda: ended.called)
            sink._thread.join(30)
            self.assertFalse(sink._thread.is_alive())
            self.assertIsNone(sink.error)


class _FullDisk:
    """A file object whose writes fail as on a full disk."""

    def write(self, b: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


class ThreadCalls:
    """A reactor's callFromThread that queues the calls for the test to run, in order, on
    the test's thread; `run_until` waits (with a deadline) for calls the thread makes."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.put((f, args))

    def run_until(self, done: Callable[[], bool], deadline: float = 30.0) -> None:
        while not done():
            f, args = self.calls.get(timeout=deadline)  # queue.Empty past the deadline
            f(*args)


class _GatedFile:
    """A file object whose writes wait until the test opens the gate."""

    def __init__(self) -> None:
        import threading

        self.gate = threading.Event()
        self.data = bytearray()

    def write(self, b: Any) -> int:
        if not self.gate.wait(timeout=30):
            raise AssertionError("the test never opened the gate")
        self.data += b
        return len(b)


class WriteBehindSinkTests(SynchronousTestCase):
    """A get's destination file written by a thread of its own."""

    def test_writes_in_order_then_drains(self) -> None:
        """Every write reaches the file, in order, before drain fires; close ends the thread."""
        reactor = ThreadCalls()
        with tempfile.TemporaryFile() as f:
            sink = WriteBehindSink(f, reactor)
            pieces = [random.Random(i).randbytes(1000 + i) for i in range(50)]
            for piece in pieces:
                sink.write(memoryview(piece))
            drained = sink.drain()
            reactor.run_until(lambda: drained.called)
            self.successResultOf(drained)
            f.seek(0)
            self.assertEqual(f.read(), b"".join(pieces))
            ended = sink.close()
            reactor.run_until(lambda: ended.called)
            sink._thread.join(30)
            self.assertFalse(sink._thread.is_alive())

    def test_pauses_past_the_limit_and_resumes_at_half(self) -> None:
        """More than `limit` bytes queued pauses the sink; it resumes (and says so) once the
        thread has written down to half the limit."""
        reactor = ThreadCalls()
        target = _GatedFile()
        sink = WriteBehindSink(target, reactor, limit=100)  # type: ignore[arg-type]
        resumed: list[bool] = []
        sink.on_resume = lambda: resumed.append(True)
        sink.write(b"a" * 60)
        self.assertFalse(sink.paused)
        sink.write(b"b" * 60)
        self.assertTrue(sink.paused)
        target.gate.set()
        reactor.run_until(lambda: bool(resumed))
        self.assertFalse(sink.paused)
        drained = sink.drain()
        reactor.run_until(lambda: drained.called)
        self.assertEqual(bytes(target.data), b"a" * 60 + b"b" * 60)
        ended = sink.close()
        reactor.run_until(lambda: ended.called)

    def test_failed_write_stops_the_sink(self) -> None:
        """A full disk stops the sink: on_stop is told, error says why, drain fails with it,
        and nothing more is written."""
        reactor = ThreadCalls()
        sink = WriteBehindSink(_FullDisk(), reactor)  # type: ignore[arg-type]
        stopped: list[bool] = []
        sink.on_stop = lambda: stopped.append(True)
        sink.write(b"x" * 10)
        reactor.run_until(lambda: bool(stopped))
        self.assertTrue(sink.stopped)
        assert sink.error is not None
        self.assertEqual(sink.error.errno, errno.ENOSPC)
        sink.write(b"ignored")
        drained = sink.drain()
        reactor.run_until(lambda: drained.called)
        self.assertEqual(self.failureResultOf(drained, OSError).value.errno, errno.ENOSPC)
        ended = sink.close()
        reactor.run_until(lambda: ended.called)

    def test_close_drops_what_is_queued(self) -> None:
        """close() (a get that failed) writes nothing more and fires once the thread is done
        with the file object."""
        reactor = ThreadCalls()
        target = _GatedFile()
        sink = WriteBehindSink(target, reactor)  # type: ignore[arg-type]
        sink.write(b"first")
        sink.write(b"second")
        ended = sink.close()
        target.gate.set()
        reactor.run_until(lambda: ended.called)
        # The first write may have started before close(); the second never runs.
        self.assertIn(bytes(target.data), (b"", b"first"))

    def test_read_fails_naming_the_local_error(self) -> None:
        """A get whose destination cannot be written fails with local_io, naming the file and
        the reason, and stops its streams."""
        from dogfs.client.api import DogFSError

        client, reader, fragments, data, _ = setup(3)
        reader.sink = FileSink(_FullDisk())  # type: ignore[arg-type]
        d = reader.read()
        deliver(client, 0, fragments, range(3))
        deliver(client, 1, fragments, range(1))
        error = self.failureResultOf(d, DogFSError).value
        self.assertEqual((error.code, error.message), ("local_io", "cannot save /f: No space left on device"))
        self.assertTrue(client.pool.connections["127.0.0.1:7101"].closed)

    def test_read_fails_when_the_thread_cannot_write(self) -> None:
        """The same through a WriteBehindSink: the thread's failure reaches the read."""
        from dogfs.client.api import DogFSError

        reactor = ThreadCalls()
        client, reader, fragments, data, _ = setup(3)
        reader.sink = sink = WriteBehindSink(_FullDisk(), reactor)  # type: ignore[arg-type]
        d = reader.read()
        deliver(client, 0, fragments, range(3))
        deliver(client, 1, fragments, range(1))
        reactor.run_until(lambda: d.called)
        error = self.failureResultOf(d, DogFSError).value
        self.assertEqual((error.code, error.message), ("local_io", "cannot save /f: No space left on device"))
        ended = sink.close()
        reactor.run_until(lambda: ended.called)

    def test_which_sink(self) -> None:
        """Large gets into real files are written behind; small ones, in-memory files and
        consumers are written on the reactor thread."""
        reactor = ThreadCalls()
        self.assertIsInstance(as_sink(io.BytesIO(), reactor, 1 << 30), FileSink)
        self.assertIsInstance(as_sink(Collector(), reactor, 1 << 30), ConsumerSink)
        with tempfile.TemporaryFile() as f:
            self.assertIsInstance(as_sink(f, reactor, 10), FileSink)
            sink = as_sink(f, reactor, 1 << 30)
            self.assertIsInstance(sink, WriteBehindSink)
            ended = sink.close()
            reactor.run_until(lambda: ended.called)
        r, w = os.pipe()
        os.close(r)
        with os.fdopen(w, "wb") as pipe:
            self.assertIsInstance(as_sink(pipe, None, 1 << 30), FileSink)  # no reactor given
            self.assertIsInstance(as_sink(pipe, Clock(), 1 << 30), FileSink)  # a reactor without threads
            # A pipe's reader may be slow: never written on the reactor thread, however small.
            sink = as_sink(pipe, reactor, 10)
            self.assertIsInstance(sink, WriteBehindSink)
            ended = sink.close()
            reactor.run_until(lambda: ended.called)


class PipeSourceTests(SynchronousTestCase):
    """A put's source that cannot seek (a pipe into ``dogfs put -``) is read by a thread."""

    def test_pipe_read_by_a_thread_files_on_the_reactor(self) -> None:
        """as_source picks PipeSource for a pipe, FileSource for a regular file or a buffer,
        and for anything when no reactor is given."""
        reactor = ThreadCalls()
        r, w = os.pipe()
        with os.fdopen(r, "rb") as pipe, os.fdopen(w, "wb"), tempfile.TemporaryFile() as f:
            source = as_source(pipe, 1 << 20, reactor)
            self.assertIsInstance(source, PipeSource)
            source.stop()
            self.assertIsInstance(as_source(f, 1 << 20, reactor), FileSource)
            self.assertIsInstance(as_source(io.BytesIO(b"x"), 1 << 20, reactor), FileSource)
            self.assertIsInstance(as_source(pipe, 1 << 20), FileSource)

    def test_reads_whole_pieces_then_the_end(self) -> None:
        """Each read gives the size asked for, gathered from short pipe reads, and then what
        is left at the end of the stream; the reactor's thread never reads the pipe."""
        reactor = ThreadCalls()
        data = random.Random(3).randbytes(300_000)
        r, w = os.pipe()
        with os.fdopen(r, "rb", buffering=0) as pipe:
            source = PipeSource(pipe, reactor)  # type: ignore[arg-type]
            first = defer.Deferred.fromCoroutine(source.read_full(200_000))
            rest = defer.Deferred.fromCoroutine(source.read_full(200_000))
            self.assertNoResult(first)  # nothing written yet: the reactor did not block
            with os.fdopen(w, "wb") as writer:
                import threading

                feeder = threading.Thread(target=writer.write, args=(data,))
                feeder.start()
                reactor.run_until(lambda: first.called)
                self.assertEqual(self.successResultOf(first), data[:200_000])
                feeder.join(30)
            reactor.run_until(lambda: rest.called)
            self.assertEqual(self.successResultOf(rest), data[200_000:])
            end = defer.Deferred.fromCoroutine(source.read_full(200_000))
            reactor.run_until(lambda: end.called)
            self.assertEqual(self.successResultOf(end), b"")
            self.assertIsNone(source.position())
            [thread] = source._worker._threads
            source.stop()
            thread.join(30)
            self.assertFalse(thread.is_alive())

    def test_non_blocking_source_is_not_cut_short(self) -> None:
        """A source in non-blocking mode answers None while nothing is there: that is not
        its end (taking it so would commit a truncated file). The read waits until the
        descriptor is readable and reads on; only b"" ends the stream."""
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        os.write(w, b"!")  # a descriptor select() finds readable at once

        class NonBlocking:
            """Answers as a non-blocking pipe would: some bytes, nothing yet, more, the end."""

            def __init__(self) -> None:
                self.answers: list[bytes | None] = [b"abc", None, b"defghij", None, b""]
                self.reads = 0

            def read(self, n: int) -> bytes | None:
                self.reads += 1
                return self.answers.pop(0)

            def fileno(self) -> int:
                return r

        reactor = ThreadCalls()
        pipe = NonBlocking()
        source = PipeSource(pipe, reactor)  # type: ignore[arg-type]
        read = defer.Deferred.fromCoroutine(source.read_full(10))
        reactor.run_until(lambda: read.called)
        self.assertEqual(self.successResultOf(read), b"abcdefghij")
        end = defer.Deferred.fromCoroutine(source.read_full(10))
        reactor.run_until(lambda: end.called)
        self.assertEqual(self.successResultOf(end), b"")
        self.assertEqual(pipe.reads, 5)
        source.stop()

    def test_read_error_fails_the_read(self) -> None:
        """An error reading the source fails that read with a local_io DogFSError naming the
        source and the error (not a raw OSError, which would end the CLI in a traceback)."""
        from dogfs.client.api import DogFSError

        reactor = ThreadCalls()
        source = PipeSource(_BrokenSource("/dev/broken"), reactor)  # type: ignore[arg-type]
        d = defer.Deferred.fromCoroutine(source.read_full(10))
        reactor.run_until(lambda: d.called)
        error = self.failureResultOf(d, DogFSError).value
        self.assertEqual((error.code, error.message), ("local_io", "cannot read /dev/broken: Input/output error"))
        source.stop()

        error = self.failureResultOf(
            defer.Deferred.fromCoroutine(FileSource(_BrokenSource(None)).read_full(10)),  # type: ignore[arg-type]
            DogFSError,
        ).value
        self.assertEqual((error.code, error.message), ("local_io", "cannot read the local source: Input/output error"))


class _BrokenSource:
    """A source named `name` whose reads fail with EIO after the first `good` bytes."""

    def __init__(self, name: str | None, good: int = 0) -> None:
        if name is not None:
            self.name = name
        self.good = good

    def read(self, n: int) -> bytes:
        if self.good:
            n = min(n, self.good)
            self.good -= n
            return b"a" * n
        raise OSError(errno.EIO, "Input/output error")

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return 0


class _Upload:
    """A shard upload to a fake chunk server that takes every cell at once."""

    def __init__(self, log: list[str], index: int) -> None:
        self.log = log
        self.index = index
        self.done = False

    def send(self, msg: Any, payload: Any = b"") -> defer.Deferred[None]:
        return defer.succeed(None)

    def finish(self, msg: Any, timeout: Any = None) -> defer.Deferred[Any]:
        self.log.append(f"finish {self.index}")
        self.done = True
        return defer.succeed(None)

    def abort(self, reason: str) -> None:
        self.log.append(f"abort {self.index}")
        self.done = True


class _UploadConnection:
    write_blocked = False

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def open_stream(self, msg: Any) -> _Upload:
        return _Upload(self.log, msg.index)

    def keepalive(self) -> None:
        self.log.append("keepalive")


class _PutClient:
    """A DogFSClient stand-in for put: allocates block groups of RS-2-1 and records the
    metadata commands and what happened to each shard upload."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.timeout = 10.0
        self.log: list[str] = []
        self.commands: list[Any] = []
        self.pool = self
        self.group_uploads = defer.DeferredSemaphore(1)
        self.sends_tokens = False

    def get(self, address: str) -> defer.Deferred[_UploadConnection]:
        return defer.succeed(_UploadConnection(self.log))

    async def cluster_info(self) -> dict[str, Any]:
        return {"cell_size": 1024, "block_size": 4096, "allocation_ttl": None}

    def _command(self, command: Any) -> defer.Deferred[Any]:
        self.commands.append(command)
        shards = tuple(c.ShardLocation(i, f"s{i}", f"chunk-{i}", f"127.0.0.1:{7100 + i}") for i in range(3))
        return defer.succeed(c.Allocation(len(self.commands), "RS-2-1", shards))


class PutSourceErrorTests(SynchronousTestCase):
    """A put whose local source cannot be read."""

    def test_read_error_fails_the_put(self) -> None:
        """A read error in the middle of a block group fails the put with local_io naming
        the source; the group's shard uploads are aborted and nothing is committed."""
        from dogfs.client.api import DogFSError

        client = _PutClient()
        d = defer.Deferred.fromCoroutine(
            put(client, "/x", _BrokenSource("/proc/self/mem", good=3000), None, None)  # type: ignore[arg-type]
        )
        error = self.failureResultOf(d, DogFSError).value
        self.assertEqual((error.code, error.message), ("local_io", "cannot read /proc/self/mem: Input/output error"))
        self.assertEqual(sorted(client.log), ["abort 0", "abort 1", "abort 2"])
        self.assertEqual([type(command).__name__ for command in client.commands], ["Allocate"])

    def test_groups_wait_for_an_upload_slot(self) -> None:
        """A put opens no shard stream while the client's block-group slots are all taken
        (a chunk server refuses more streams on one connection than it has slots for), and
        goes on once one is free, giving it back when done."""
        from dogfs.chunk.server import MAX_UPLOADS_PER_CONNECTION
        from dogfs.client.api import MAX_GROUP_UPLOADS

        self.assertLessEqual(MAX_GROUP_UPLOADS, MAX_UPLOADS_PER_CONNECTION)
        client = _PutClient()
        self.successResultOf(client.group_uploads.acquire())  # another put's group
        d = defer.Deferred.fromCoroutine(
            put(client, "/x", _BrokenSource("/proc/self/mem", good=3000), None, None)  # type: ignore[arg-type]
        )
        self.assertNoResult(d)
        self.assertEqual(client.log, [])
        client.group_uploads.release()
        self.failureResultOf(d)  # its source fails mid-group, as above: the group ran
        self.assertEqual(sorted(client.log), ["abort 0", "abort 1", "abort 2"])
        self.assertEqual(client.group_uploads.tokens, 1)

    def test_keepalives_while_the_source_is_slow(self) -> None:
        """While a block group waits for its source (a slow pipe), its chunk servers' connections
        get a keepalive every UPLOAD_KEEPALIVE seconds, so their idle check does not fail the
        uploads; the keepalives stop when the group is written."""
        from dogfs.client.transfer import UPLOAD_KEEPALIVE, _upload_group
        from dogfs.codec.policy import ECPolicy
        from dogfs.codec.stripe import StripeCodec

        client = _PutClient()
        allocation = self.successResultOf(client._command(c.Allocate("/x", "RS-2-1", ())))
        later: defer.Deferred[bytes] = defer.Deferred()

        class SlowSource:
            async def read_full(self, size: int) -> bytes:
                return await later

        codec = StripeCodec(ECPolicy.parse("RS-2-1"), 1024)
        d = defer.Deferred.fromCoroutine(
            _upload_group(client, "/x", allocation, codec, b"a", SlowSource(), 4, lambda n: None)  # type: ignore[arg-type]
        )
        client.clock.pump([UPLOAD_KEEPALIVE] * 10 + [UPLOAD_KEEPALIVE / 2])  # past a server's idle timeout
        self.assertNoResult(d)
        self.assertEqual(client.log.count("keepalive"), 3 * 10)  # each of the 3 servers, 10 times
        later.callback(b"")
        self.assertEqual(self.successResultOf(d), (1, None))
        client.clock.pump([UPLOAD_KEEPALIVE] * 2)
        self.assertEqual(client.log.count("keepalive"), 3 * 10)

    def test_first_read_error_fails_the_put(self) -> None:
        """A source that cannot be read at all fails the same way, before anything is
        allocated."""
        from dogfs.client.api import DogFSError

        client = _PutClient()
        d = defer.Deferred.fromCoroutine(put(client, "/x", _BrokenSource("in.bin"), None, None))  # type: ignore[arg-type]
        error = self.failureResultOf(d, DogFSError).value
        self.assertEqual((error.code, error.message), ("local_io", "cannot read in.bin: Input/output error"))
        self.assertEqual((client.log, client.commands), ([], []))
