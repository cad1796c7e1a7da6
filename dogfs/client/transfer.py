# -*- test-case-name: tests.test_client -*-
"""Moving file data between a client and the chunk servers.

PUT: the file is cut into block groups (k x block_size bytes at most) and each group into
stripes of k cells. Each stripe is encoded into k + m fragments, one per shard, sent to the
k + m chunk servers of the group's placement in parallel; the next stripe is read only when
every connection can take more (flow control), so memory stays at a few stripes whatever
the file size. When every shard of every group is durable, one metadata commit makes the new
version visible. If a chunk server fails during a group (unreachable, closed, stalled, out of
space) and the source is a seekable file, the group is written again on a new placement
without it (`Allocate.avoid`), as HDFS rebuilds a write pipeline; a stream cannot be read
twice, so its put fails with the chunk server's error.

GET: each block group is read from its k data shards in parallel (no decoding needed). A
shard whose server is down, answers an error, sends a cell that fails its CRC32C, or goes
quiet for `shard_timeout` is replaced by the next parity shard from the stripe where it
failed, and those stripes are decoded. A server that failed is remembered for the rest of
the get: later block groups read a parity shard instead of its data shard from the start,
rather than wait for it again. A bounded number of stripes is buffered; streams that run
ahead are paused.
"""

from __future__ import annotations

import errno
import io
import os
import queue
import select
import stat
import threading
from collections.abc import Callable
from functools import partial
from typing import IO, TYPE_CHECKING, Any

from attrs import define, field
from twisted.internet import defer, task
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dogfs.codec.checksum import crc32c
from dogfs.codec.policy import ECPolicy
from dogfs.codec.stripe import StripeCodec
from dogfs.meta import commands as c
from dogfs.wire import messages as m
from dogfs.wire.frame import FRAME_BUFFERS
from dogfs.wire.protocol import (
    Connection,
    ConnectionClosed,
    Reply,
    RequestTimeout,
    Upload,
    WireError,
)

if TYPE_CHECKING:
    from dogfs.client.api import DogFSClient, Progress

log = Logger()

MAX_BUFFERED_STRIPES = 4


def read_full(source: IO[bytes], size: int) -> bytes:
    """Read `size` bytes, or fewer only at the end of the stream.

    A source in non-blocking mode (a pipe or terminal its parent left O_NONBLOCK) answers
    None when nothing is there yet: that is not the end, so wait until it is readable and
    read again; only b"" ends the stream. Taking None for the end would commit a truncated
    file.
    """
    parts: list[bytes] = []
    got = 0
    while got < size:
        more = source.read(size - got)
        if more is None:
            _wait_readable(source)
            continue
        if not more:
            break
        parts.append(more)
        got += len(more)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _wait_readable(source: IO[bytes]) -> None:
    """Block until ``source``'s descriptor has something to read (or its end)."""
    select.select([source.fileno()], [], [])


def wait_writable(fd: int, timeout: float | None = None) -> bool:
    """Block until descriptor ``fd`` takes more bytes (or has failed, which the next write
    reports), at most ``timeout`` seconds (None: however long it takes); whether it does."""
    poller = select.poll()  # not select(): a descriptor may be numbered past FD_SETSIZE
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(None if timeout is None else int(timeout * 1000)))


def write_fully(f: IO[bytes], data: bytes | memoryview, wait: Callable[[int], object] = wait_writable) -> None:
    """Write all of ``data`` to ``f``, or raise why not.

    A raw file object (``sys.stdout.buffer`` under PYTHONUNBUFFERED) may take only part of
    it; one in non-blocking mode (a pipe its parent left O_NONBLOCK) answers None when the
    reader is behind, and a buffered one raises BlockingIOError saying how much it kept.
    None of that is the end or an error: ``wait(fd)`` until the descriptor takes more, then
    write the rest. Dropping it would cut the file short with no error at all.
    """
    view = memoryview(data)
    while view:
        try:
            written = f.write(view)
        except BlockingIOError as e:
            written = getattr(e, "characters_written", 0)  # unset when nothing was kept
            blocked = True
        else:
            if written is None and not (isinstance(f, io.RawIOBase) and _non_blocking(f)):
                # Only a raw file on a non-blocking descriptor says None for "full": any other
                # writer (one of the caller's, wrapping a file) returns nothing having taken
                # it all, and writing it again would repeat it for ever.
                return
            blocked = written is None
            if written == 0:
                # Never loop for ever on a writer that takes nothing and says it is ready.
                raise OSError(errno.EIO, "the destination took none of the bytes written to it")
        view = view[written or 0 :]
        if blocked and view:
            wait(f.fileno())


def flush_fully(f: IO[bytes], wait: Callable[[int], object] = wait_writable) -> None:
    """``f.flush()``, waiting (as `write_fully`) while a non-blocking descriptor is full."""
    while True:
        try:
            f.flush()
            return
        except BlockingIOError:
            wait(f.fileno())


def local_read_failed(source: IO[bytes], error: OSError) -> Exception:
    """The error of a put whose source could not be read (a disk error, a special file)."""
    from dogfs.client.api import DogFSError

    name = getattr(source, "name", None)
    what = name if isinstance(name, str) else "the local source"
    return DogFSError("local_io", f"cannot read {what}: {error.strerror or error}")


class FileSource:
    """A put's data from a binary file object (read on the reactor thread: local files)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self._seekable = _seekable(f)

    async def read_full(self, size: int) -> bytes:
        try:
            return read_full(self.f, size)
        except OSError as e:
            raise local_read_failed(self.f, e) from None

    def position(self) -> int | None:
        """Where the next read starts, if the file can go back there (`rewind`); else None."""
        if not self._seekable:
            return None
        try:
            return self.f.tell()
        except (OSError, ValueError):
            return None

    def rewind(self, position: int) -> None:
        """Read again from `position` (one that `position` returned)."""
        self.f.seek(position)


class PipeSource:
    """A put's data from a pipe, a terminal or a socket (``put -`` from another program): read
    on a thread of its own, so that the reactor keeps serving the upload (acknowledgements,
    allocation renewals) however long the source takes to give the next stripe. The thread
    is a daemon: one blocked on a source that never ends does not keep the process alive.
    """

    def __init__(self, f: IO[bytes], reactor: Any) -> None:
        from dogfs.raft.worker import SerialWorker

        self.f = f
        self._worker = SerialWorker(reactor, "dogfs-put-reader")
        self._worker.start()

    async def read_full(self, size: int) -> bytes:
        try:
            return await self._worker.run(partial(read_full, self.f, size))
        except OSError as e:
            raise local_read_failed(self.f, e) from None

    def position(self) -> int | None:
        """A pipe's bytes cannot be read twice."""
        return None

    def stop(self) -> None:
        """End the thread once its current read (if any) returns."""
        self._worker.stop(wait=False)


@implementer(IConsumer)
class ProducerSource:
    """A put's data from a Twisted IBodyProducer, buffered to at most `high_water` bytes.

    The producer writes into us; when the buffer is full it is paused until the upload has
    taken a stripe, so a fast producer never fills memory.
    """

    def __init__(self, producer: Any, high_water: int) -> None:
        self.producer = producer
        self.high_water = high_water
        self.buffer = bytearray()
        self.finished = False
        self.error: Failure | None = None
        self.paused = False
        self._waiter: defer.Deferred[None] | None = None
        d = producer.startProducing(self)
        d.addCallbacks(self._done, self._failed)

    def write(self, data: bytes) -> None:
        self.buffer += data
        if not self.paused and len(self.buffer) >= self.high_water:
            self.paused = True
            self.producer.pauseProducing()
        self._wake()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass  # the producer is driven through startProducing

    def unregisterProducer(self) -> None:
        pass

    def _done(self, _: Any) -> None:
        self.finished = True
        self._wake()

    def _failed(self, failure: Failure) -> None:
        self.error = failure
        self.finished = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.callback(None)

    async def read_full(self, size: int) -> bytes:
        while len(self.buffer) < size and not self.finished:
            self._waiter = defer.Deferred()
            await self._waiter
        if self.error is not None:
            self.error.raiseException()
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        if self.paused and len(self.buffer) < self.high_water // 2:
            self.paused = False
            self.producer.resumeProducing()
        return out

    def position(self) -> int | None:
        """A producer's bytes cannot be read twice."""
        return None

    def stop(self) -> None:
        """The upload failed: tell the producer to stop."""
        if not self.finished:
            self.finished = True
            self.producer.stopProducing()


@implementer(IPushProducer)
class ConsumerSink:
    """A get's destination: a Twisted IConsumer, which may pause us when it is full."""

    error: OSError | None = None

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.paused = False
        self.stopped = False
        self.on_resume: Callable[[], None] | None = None
        self.on_stop: Callable[[], None] | None = None
        consumer.registerProducer(self, True)

    def write(self, data: bytes | memoryview) -> None:
        self.consumer.write(bytes(data))

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.on_resume is not None:
            self.on_resume()

    def stopProducing(self) -> None:
        self.stopped = True
        self.paused = True
        if self.on_stop is not None:
            self.on_stop()

    def drain(self) -> defer.Deferred[None]:
        """Fires at once: the consumer has had every write."""
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        self.consumer.unregisterProducer()
        return defer.succeed(None)


class FileSink:
    """A get's destination: a binary file object, written on the reactor thread; never pauses.

    `as_sink` gives it only destinations that cannot keep a write waiting when the reactor
    has threads (in-memory files, regular files): a pipe or a terminal, whose reader may be
    slow or stopped, goes to a `WriteBehindSink`. Without threads, a full descriptor is
    waited for here, as a blocking one would keep its write.
    """

    paused = False
    stopped = False
    error: OSError | None = None
    on_resume: Callable[[], None] | None = None
    on_stop: Callable[[], None] | None = None

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f

    def write(self, data: bytes | memoryview) -> None:
        write_fully(self.f, data)

    def drain(self) -> defer.Deferred[None]:
        """Fires once everything written so far is in the file object (at once, here)."""
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


#: Bytes a get may have queued for its writer thread before it pauses (and resumes at half).
WRITE_BEHIND = 8 << 20
#: Regular files smaller than this are written on the reactor thread: a thread is not worth
#: starting.
WRITE_BEHIND_MIN_SIZE = 4 << 20
#: Seconds between two looks at whether a get is over, while its writer thread waits for a
#: full pipe.
WRITABLE_POLL = 0.2


class _Discarded(Exception):
    """The get is over (`WriteBehindSink.close`) while its thread waited to write."""


class WriteBehindSink:
    """A get's destination: a real file, written by a thread of its own.

    Writing to a file is a copy into the page cache made by the kernel, with the GIL
    released; on the reactor thread it cost about a third of a get's client CPU (a get into a
    file against one into a sink that drops the bytes), in series with receiving and checking
    cells. Here it overlaps with them. The
    data stays in the receive buffers it arrived in (memoryviews keep them from reuse) until
    written.

    Bounded: past ``limit`` queued bytes the sink pauses (the GroupReader stops emitting
    stripes, then holds its streams back) and resumes once half is written. A failed write
    (a full disk) stops the sink: ``error`` says why, ``on_stop`` is told, and nothing more is
    written.

    It is also where a pipe or a terminal is written, whatever the size (see `as_sink`):
    this thread, not the reactor, waits while a slow reader keeps the descriptor full.
    """

    def __init__(self, f: IO[bytes], reactor: Any, limit: int = WRITE_BEHIND) -> None:
        self.f = f
        self.reactor = reactor
        self.limit = limit
        self.paused = False
        self.stopped = False
        self.error: OSError | None = None
        self.on_resume: Callable[[], None] | None = None
        self.on_stop: Callable[[], None] | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # bytes handed to write() and not yet written (under _lock)
        self._discard = False  # set by close(): drop what is queued, write nothing more
        self._ended: defer.Deferred[None] = defer.Deferred()
        self._thread = threading.Thread(target=self._work, name="dogfs-get-writer", daemon=True)
        self._thread.start()

    def write(self, data: bytes | memoryview) -> None:
        if self.stopped:
            return
        with self._lock:
            self._queued += len(data)
            if self._queued > self.limit:
                self.paused = True
        self._queue.put(data)

    def drain(self) -> defer.Deferred[None]:
        """Fires once everything written so far is in the file object; fails with the write's
        error if one failed."""
        d: defer.Deferred[None] = defer.Deferred()
        self._queue.put(d)
        return d

    def close(self) -> defer.Deferred[None]:
        """Drop whatever is still queued and end the thread; fires once it no longer uses the
        file object."""
        self._discard = True
        self._queue.put(None)
        return self._ended

    def _work(self) -> None:
        call = self.reactor.callFromThread
        while True:
            item = self._queue.get()
            if item is None:
                call(self._ended.callback, None)
                return
            if isinstance(item, defer.Deferred):
                call(self._answer_drain, item)
                continue
            if not self._discard and self.error is None:
                try:
                    write_fully(self.f, item, self._wait_writable)
                except _Discarded:
                    pass
                except OSError as e:
                    self.error = e
                    call(self._failed)
            with self._lock:
                self._queued -= len(item)
                resume = self.paused and self._queued <= self.limit // 2
            del item  # let its receive buffer go back to the pool
            if resume:
                call(self._resume)

    def _wait_writable(self, fd: int) -> None:
        """`wait_writable`, given up once the get is over: a reader that stopped reading
        must not keep `close` from firing."""
        while not wait_writable(fd, WRITABLE_POLL):
            if self._discard:
                raise _Discarded()

    def _answer_drain(self, d: defer.Deferred[None]) -> None:
        if self.error is not None:
            d.errback(self.error)
        else:
            d.callback(None)

    def _resume(self) -> None:
        if self.paused and not self.stopped:
            self.paused = False
            if self.on_resume is not None:
                self.on_resume()

    def _failed(self) -> None:
        if not self.stopped:
            self.stopped = self.paused = True
            if self.on_stop is not None:
                self.on_stop()


def as_source(source: Any, high_water: int, reactor: Any = None) -> Any:
    """A file object or an IBodyProducer as something to read stripes from: a file that
    cannot seek but has a real descriptor (a pipe, a terminal, a socket) is read by a thread
    (`PipeSource`) when a ``reactor`` is given; other files on the reactor thread."""
    if hasattr(source, "startProducing"):
        return ProducerSource(source, high_water)
    if reactor is not None and hasattr(reactor, "callFromThread") and _has_fileno(source) and not _seekable(source):
        return PipeSource(source, reactor)
    return FileSource(source)


def _seekable(f: Any) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, ValueError, OSError):
        return False


def as_sink(sink: Any, reactor: Any = None, size: int = 0) -> Any:
    """A file object or an IConsumer as somewhere to write stripes: when a ``reactor`` with
    threads is given, a file with a real descriptor is written by a thread (`WriteBehindSink`)
    if it is ``size`` bytes or more, or is not a regular file (a pipe, a terminal: their
    writes wait for the reader, which the reactor thread must never do)."""
    if hasattr(sink, "registerProducer") and not hasattr(sink, "seek"):
        return ConsumerSink(sink)
    if (
        reactor is not None
        and hasattr(reactor, "callFromThread")
        and _has_fileno(sink)
        and (size >= WRITE_BEHIND_MIN_SIZE or not _regular_file(sink))
    ):
        return WriteBehindSink(sink, reactor)
    return FileSink(sink)


def _non_blocking(f: Any) -> bool:
    try:
        return not os.get_blocking(f.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False


def _regular_file(f: Any) -> bool:
    return stat.S_ISREG(os.fstat(f.fileno()).st_mode)


def _has_fileno(f: Any) -> bool:
    try:
        f.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False
    return True


def local_write_failed(path: str, error: OSError) -> Exception:
    """The error of a get whose destination could not be written (a full local disk)."""
    from dogfs.client.api import DogFSError

    return DogFSError("local_io", f"cannot save {path}: {error.strerror or error}")


def sink_stopped(path: str, sink: Any) -> Exception:
    """The error of a get whose destination stopped taking data."""
    from dogfs.client.api import DogFSError

    if sink.error is not None:
        return local_write_failed(path, sink.error)
    return DogFSError("aborted", f"the consumer of {path} stopped the download")


def _unwrap(failure: Failure) -> BaseException | None:
    """The first real error inside gatherResults' FirstError."""
    error = failure.value
    while isinstance(error, defer.FirstError):
        error = error.subFailure.value
    return error


# --- PUT ----------------------------------------------------------------------------------


async def put(
    client: DogFSClient, path: str, source: IO[bytes], ec: str | None, progress: Progress | None
) -> c.FileInfo:
    """Upload `source` to `path`; see the module docstring."""

    info = await client.cluster_info()
    cell_size: int = info["cell_size"]
    block_size: int = info["block_size"]
    if ec is not None:
        ECPolicy.parse(ec)  # refuse an unknown policy before touching the cluster
    reader = as_source(source, 4 * 16 * cell_size, client.clock)
    renewal = Renewal(client, path, info.get("allocation_ttl"))
    try:
        return await _put(client, path, reader, ec, progress, cell_size, block_size, renewal)
    except BaseException:
        if isinstance(reader, ProducerSource):
            reader.stop()
        raise
    finally:
        renewal.stop()
        if isinstance(reader, PipeSource):
            reader.stop()


async def _put(
    client: DogFSClient,
    path: str,
    source: Any,
    ec: str | None,
    progress: Progress | None,
    cell_size: int,
    block_size: int,
    renewal: Renewal,
) -> c.FileInfo:
    first = await source.read_full(1)
    groups: list[tuple[int, int]] = []
    total = 0
    group_ec = ec
    pending: bytes | None = first
    # Chunk servers that failed this put: no later block group of it goes there either.
    avoid: set[str] = set()
    while pending:
        # Where the source stands after `pending` (the group's first bytes), to read the rest
        # of the group again if a chunk server fails it (None: a stream, read only once).
        resume = source.position()
        attempts = 0
        while True:
            attempts += 1
            renewal.check()
            allocation = await _allocate(client, path, group_ec, avoid)
            renewal.add(allocation.bg_id)
            group_ec = allocation.ec
            codec = StripeCodec(ECPolicy.parse(allocation.ec), cell_size)
            stripes_per_group = max(1, block_size // cell_size)
            sent = [0]

            def counted(n: int, sent: list[int] = sent) -> None:
                sent[0] += n
                if progress is not None:
                    progress(n)

            try:
                # One stream per chunk server per group in flight: as many groups as the
                # servers take streams on one connection, the rest wait their turn.
                await client.group_uploads.acquire()
                try:
                    size, rest = await _upload_group(
                        client, path, allocation, codec, pending, source, stripes_per_group, counted
                    )
                finally:
                    client.group_uploads.release()
            except GroupFailed as e:
                if resume is None or not e.nodes or attempts >= MAX_GROUP_ATTEMPTS:
                    raise e.error from None
                # Write the whole group again on servers without the failed ones (HDFS
                # rebuilds its pipeline the same way); the abandoned allocation expires.
                log.warn(
                    "{path}: block group {bg} failed on {nodes} ({error}); writing it elsewhere",
                    path=path, bg=allocation.bg_id, nodes=", ".join(sorted(e.nodes)), error=str(e.error),
                )
                avoid |= e.nodes
                renewal.discard(allocation.bg_id)
                if progress is not None:
                    progress(-sent[0])
                source.rewind(resume)
                continue
            break
        pending = rest
        groups.append((allocation.bg_id, size))
        total += size
    renewal.check()
    result = await client._command(c.CommitFile(path, total, tuple(groups), ec=group_ec))
    return result  # type: ignore[no-any-return]


class Renewal:
    """Keeps an upload's pending block groups from expiring while the upload runs.

    The metadata drops a block group still pending ``allocation_ttl`` seconds after its
    allocation (an abandoned upload's); an upload that takes longer (a slow source, a very
    large file) renews the groups it allocated so far every third of that time, as an HDFS
    client renews its lease. If they expired all the same (the client was stopped for longer
    than the ttl), ``check`` says so before more data is sent for nothing. A ``ttl`` of None
    (a metadata node that does not say) renews nothing.
    """

    #: Block groups per RenewAllocations command: a 1 MiB Raft entry holds far more.
    BATCH = 10_000
    #: Seconds between renewals at most, whatever the ttl.
    AT_LEAST_EVERY = 60.0

    def __init__(self, client: DogFSClient, path: str, ttl: float | None) -> None:
        self._client = client
        self._path = path
        self._groups: dict[int, None] = {}
        self._failure: Exception | None = None
        self._busy = False
        self._stopped = False
        self._loop: task.LoopingCall | None = None
        if ttl is not None and ttl > 0:
            self._loop = task.LoopingCall(self._renew)
            self._loop.clock = client.clock
            # At least every minute: the client learnt the ttl once (cluster_info is cached),
            # and an operator may have lowered it since.
            self._loop.start(min(ttl / 3, self.AT_LEAST_EVERY), now=False)

    def add(self, bg_id: int) -> None:
        self._groups[bg_id] = None

    def discard(self, bg_id: int) -> None:
        self._groups.pop(bg_id, None)

    def check(self) -> None:
        """Raise what made renewing fail for good (the allocations expired)."""
        if self._failure is not None:
            raise self._failure

    def stop(self) -> None:
        """No more renewals; one under way finishes quietly (the upload is over)."""
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _renew(self) -> None:
        if self._busy or not self._groups or self._failure is not None:
            return  # the last renewal is still under way: never two at once
        self._busy = True
        defer.Deferred.fromCoroutine(self._send(tuple(self._groups)))

    def _warn(self, error: Exception) -> None:
        log.warn("{path}: renewing the upload's allocations failed, to be tried again: {error}",
                 path=self._path, error=str(error))

    async def _send(self, groups: tuple[int, ...]) -> None:
        from dogfs.client.api import DogFSError

        try:
            for start in range(0, len(groups), self.BATCH):
                await self._client._command(c.RenewAllocations(groups[start : start + self.BATCH]))
        except Exception as e:
            if self._stopped:
                pass  # committed or abandoned meanwhile: nothing to say
            elif isinstance(e, DogFSError) and e.code == "stale_allocation":
                self._failure = DogFSError(
                    "stale_allocation",
                    f"cannot finish the upload of {self._path}: its block groups expired before "
                    f"they could be renewed ({e.message}); write it again",
                )
            else:  # the metadata unreachable for now: the next round tries again
                self._warn(e)
        finally:
            self._busy = False


#: Most uploads of one block group (the first, then one per new placement).
MAX_GROUP_ATTEMPTS = 3


async def _allocate(client: DogFSClient, path: str, ec: str | None, avoid: set[str]) -> c.Allocation:
    """A new block group placed on none of the chunk servers in `avoid` (`Allocate.avoid`)."""
    from dogfs.client.api import DogFSError

    allocation = await client._command(c.Allocate(path, ec, (), avoid=tuple(sorted(avoid))))
    if isinstance(allocation, c.MetaError):
        raise DogFSError(allocation.code.name.lower(), allocation.message)
    bad = avoid.intersection(s.node_id for s in allocation.shards)
    if bad:
        raise DogFSError("failed", f"cannot write {path}: placed on {', '.join(sorted(bad))} again")
    return allocation  # type: ignore[no-any-return]


class GroupFailed(Exception):
    """A block group's upload failed: `error` for the caller, and the chunk servers to blame
    (empty when the cause was not a chunk server: the source, the request itself)."""

    def __init__(self, error: Exception, nodes: frozenset[str] = frozenset()) -> None:
        super().__init__(str(error))
        self.error = error
        self.nodes = nodes


async def _upload_group(
    client: DogFSClient,
    path: str,
    allocation: c.Allocation,
    codec: StripeCodec,
    head: bytes,
    source: Any,
    stripes_per_group: int,
    progress: Progress | None,
) -> tuple[int, bytes | None]:
    """Write one block group; returns its size and the bytes read past it (None at EOF).

    @raise GroupFailed: naming the chunk servers that failed it, if any.
    """
    from dogfs.client.api import DogFSError

    stripe_size = codec.stripe_size
    shards = sorted(allocation.shards, key=lambda s: s.index)

    def failed(index: int, error: BaseException) -> GroupFailed:
        shard = shards[index]
        code = getattr(error, "code", "failed")
        message = f"cannot write {path}: chunk server {shard.node_id} failed: {getattr(error, 'message', error)}"
        blamed = frozenset({shard.node_id}) if code in REPLACEABLE else frozenset()
        return GroupFailed(DogFSError(code, message), blamed)

    try:
        connections: list[Connection] = await defer.gatherResults(
            [client.pool.get(s.address) for s in shards], consumeErrors=True
        )
    except defer.FirstError as e:
        shard = shards[e.index]
        raise GroupFailed(
            DogFSError(
                "unreachable",
                f"cannot write {path}: chunk server {shard.node_id} ({shard.address}) is unreachable: "
                f"{getattr(_unwrap(Failure(e)), 'message', e)}",
            ),
            frozenset({shard.node_id}),
        ) from None
    fragment_size = codec.fragment_size(stripe_size)
    token = allocation.token if client.sends_tokens else None
    uploads: list[Upload] = []
    cells = 0
    size = 0
    rest: bytes | None = None
    # A slow source (`tail -f log | dogfs put -`) may take longer than a chunk server's idle
    # timeout to fill a stripe: the servers hear from us meanwhile, or they would take the
    # silence for a client gone and fail its uploads.
    def beat() -> None:
        for conn in connections:
            conn.keepalive()

    keepalive = task.LoopingCall(beat)
    keepalive.clock = client.clock
    keepalive.start(UPLOAD_KEEPALIVE, now=False)
    try:
        for i, (conn, s) in enumerate(zip(connections, shards, strict=True)):
            try:
                uploads.append(
                    conn.open_stream(m.PutShard(s.shard_id, allocation.ec, s.index, fragment_size, token))
                )
            except WireError as e:  # closed while the others were being dialled
                raise failed(i, e) from None
        stripe = head + await source.read_full(stripe_size - len(head)) if len(head) < stripe_size else head
        while True:
            fragments = codec.encode(stripe)
            waits = [
                upload.send(m.Cell(cells, crc32c(fragment)), fragment)
                for upload, fragment in zip(uploads, fragments, strict=True)
            ]
            await _progress_within(client, path, shards, connections, defer.gatherResults(waits, consumeErrors=True))
            cells += 1
            size += len(stripe)
            if progress is not None:
                progress(len(stripe))
            if any(upload.done for upload in uploads):
                # A chunk server answered early (an error): learn why, and leave no
                # truncated shard behind on the others.
                early = [i for i, u in enumerate(uploads) if u.done]
                for upload in uploads:
                    if not upload.done:
                        upload.abort("another shard of the block group failed")
                for i in early:
                    try:
                        await uploads[i].finish(m.PutShardEnd(cells))
                    except WireError as e:
                        raise failed(i, e) from None
                raise GroupFailed(DogFSError("failed", f"cannot write {path}: a chunk server ended the upload early"))
            if len(stripe) < stripe_size:
                break
            nxt = await source.read_full(stripe_size)
            if not nxt:
                break
            if cells == stripes_per_group:
                rest = nxt
                break
            stripe = nxt
        await defer.gatherResults(
            [upload.finish(m.PutShardEnd(cells), timeout=client.timeout) for upload in uploads],
            consumeErrors=True,
        )
    except BaseException as e:
        # Whatever went wrong (a chunk server, the source, the codec), no chunk server may be
        # left holding an open upload.
        for upload in uploads:
            upload.abort("another shard of the block group failed")
        if isinstance(e, GroupFailed | DogFSError):
            raise  # already says what failed (a DogFSError here: the source could not be read)
        if isinstance(e, defer.FirstError):
            raise failed(e.index, _unwrap(Failure(e)) or e) from None
        if isinstance(e, WireError):
            code = e.code
            raise GroupFailed(DogFSError(code, f"cannot write {path}: a chunk server failed: {e.message}")) from None
        raise
    finally:
        keepalive.stop()
    return size, rest


#: Seconds between two keepalives on the connections of an upload (well within the chunk
#: servers' idle timeout, IDLE_TIMEOUT in dogfs/wire/protocol.py: 600 s).
UPLOAD_KEEPALIVE = 60.0


#: Error codes of a chunk server after which its block group is written again elsewhere: the
#: server, its disk or the network failed, not the request.
REPLACEABLE = frozenset({
    "unreachable", "connection_closed", "timeout", "no_space", "storage_error", "corrupt_in_transit",
})


async def _progress_within(
    client: DogFSClient,
    path: str,
    shards: list[c.ShardLocation],
    connections: list[Connection],
    waiting: defer.Deferred[Any],
) -> None:
    """Wait for every connection to take the stripe, or fail naming the ones that stalled."""
    from dogfs.client.api import DogFSError

    waiting.addTimeout(client.timeout, client.clock)
    try:
        await waiting
    except defer.TimeoutError:
        stalled = [s for s, conn in zip(shards, connections, strict=True) if conn.write_blocked]
        for shard in stalled:
            client.pool.drop(shard.address)
        names = ", ".join(s.node_id for s in stalled) or "a chunk server"
        raise GroupFailed(
            DogFSError("timeout", f"cannot write {path}: {names} took no data for {client.timeout:g}s"),
            frozenset(s.node_id for s in stalled),
        ) from None


# --- GET ----------------------------------------------------------------------------------


async def get(
    client: DogFSClient,
    path: str,
    sink: IO[bytes],
    progress: Progress | None,
    on_info: Callable[[c.FileInfo], None] | None = None,
) -> c.FileInfo:
    """Download `path` into `sink`; see the module docstring."""
    from dogfs.client.api import DogFSError

    info = await client._stat(path)
    if isinstance(info, c.DirInfo):
        raise DogFSError("is_a_directory", f"{path} is a directory")
    if on_info is not None:
        on_info(info)
    cluster = await client.cluster_info()
    out = as_sink(sink, client.reactor, info.size)
    # Chunk servers that failed this get: later block groups read around them.
    suspects: set[str] = set()
    try:
        for bg in info.block_groups:
            if out.stopped:
                raise sink_stopped(path, out)
            codec = StripeCodec(ECPolicy.parse(bg.ec), cluster["cell_size"])
            reader = GroupReader(client, path, bg, codec, out, progress, suspects)
            await reader.read()
        try:
            await out.drain()
        except OSError as e:
            raise local_write_failed(path, e) from None
    finally:
        await out.close()
    return info  # type: ignore[no-any-return]


@define(eq=False)
class _Stream:
    """One shard being read."""

    index: int
    first: int
    received: int  # next stripe index expected from it
    started: float = 0.0  # when it was started (clock seconds)
    connection: Connection | None = None
    watchdog: Any = None
    paused: bool = False
    finished: bool = False


@define(eq=False)
class GroupReader:
    """Reads one block group; see the module docstring.

    ``suspects`` holds the chunk servers that failed earlier in the same get (shared by its
    GroupReaders): the shards they hold are read last, so that a server that is down or
    stopped costs a get one ``shard_timeout``, not one in every block group. A server that
    serves a shard in full is no longer suspect.
    """

    client: DogFSClient
    path: str
    bg: c.BlockGroupInfo
    codec: StripeCodec
    sink: Any  # FileSink, WriteBehindSink or ConsumerSink
    progress: Progress | None
    suspects: set[str] = field(factory=set)
    lengths: list[int] = field(init=False)
    cells: dict[int, dict[int, Any]] = field(factory=dict, init=False)
    next_stripe: int = field(default=0, init=False)
    streams: dict[int, _Stream] = field(factory=dict, init=False)
    failed: dict[int, str] = field(factory=dict, init=False)
    unused: list[int] = field(factory=list, init=False)
    done: defer.Deferred[None] = field(factory=defer.Deferred, init=False)

    def __attrs_post_init__(self) -> None:
        self.lengths = self.codec.stripe_lengths(self.bg.size)
        # Data shards first (no decoding), then parity; those on suspect servers after all
        # the others. `read` starts the first k.
        self.unused = sorted(
            range(self.codec.width), key=lambda i: (self._location(i).node_id in self.suspects, i)
        )

    @property
    def shard_timeout(self) -> float:
        return min(self.client.timeout, 10.0)

    def read(self) -> defer.Deferred[None]:
        self.sink.on_resume = self._emit
        self.sink.on_stop = self._consumer_stopped
        if not self.lengths:
            self.done.callback(None)
            return self.done
        for _ in range(self.codec.k):
            self._start(self.unused.pop(0), 0)
        return self.done

    def _location(self, index: int) -> c.ShardLocation:
        return next(s for s in self.bg.shards if s.index == index)

    def _start(self, index: int, first: int) -> None:
        stream = _Stream(index, first, first, self.client.clock.seconds())
        self.streams[index] = stream
        location = self._location(index)
        self._arm(stream)

        async def run() -> Reply:
            # A connection of our own: pausing it (a stream ahead of the others, a slow
            # consumer) must not stall other requests to this server.
            connection = await self.client.pool.lease(location.address)
            if self.streams.get(index) is not stream:
                self.client.pool.give_back(location.address, connection)
                raise WireError("abandoned", "stream abandoned")
            stream.connection = connection
            return await connection.call(
                m.GetShard(location.shard_id, first, -1),
                on_part=lambda msg, payload: self._part(stream, msg, payload),
            )

        def over(result: Any) -> Any:
            # The call is over: a connection that answered in full serves the next lease;
            # one cut short (by us or the server) may still carry cells, so it is closed.
            # Either way it is no longer this stream's to pause or resume.
            connection, stream.connection = stream.connection, None
            if stream.watchdog is not None and stream.watchdog.active():
                stream.watchdog.cancel()  # whether reading or waiting for the end (_stop_all)
            if connection is not None:
                if isinstance(result, Failure) and not _answered(result):
                    connection.close()
                else:
                    if stream.paused:
                        # Held back after the end was already received (same read).
                        stream.paused = False
                        connection.resume_reading()
                    self.client.pool.give_back(location.address, connection)
            return result

        d = defer.Deferred.fromCoroutine(run())
        d.addBoth(over)
        d.addCallbacks(lambda _: self._ended(stream), lambda f: self._fail(stream, _describe(f)))

    def _arm(self, stream: _Stream) -> None:
        if stream.watchdog is not None and stream.watchdog.active():
            stream.watchdog.cancel()
        stream.watchdog = self.client.clock.callLater(
            self.shard_timeout, self._fail, stream, f"no data for {self.shard_timeout:g}s"
        )

    def _disarm(self, stream: _Stream) -> None:
        if stream.watchdog is not None and stream.watchdog.active():
            stream.watchdog.cancel()
        stream.watchdog = None

    def _part(self, stream: _Stream, msg: Any, payload: memoryview) -> None:
        if self.streams.get(stream.index) is not stream or self.done.called:
            return
        if not isinstance(msg, m.Cell) or msg.index != stream.received:
            self._fail(stream, f"sent cell {getattr(msg, 'index', '?')} out of order")
            return
        if crc32c(payload) != msg.crc:
            self._fail(stream, f"cell {msg.index} failed its checksum")
            return
        try:
            index, stripe_len = self.codec.fragment_info(payload)
        except ValueError as e:
            self._fail(stream, f"cell {msg.index} is not a fragment: {e}")
            return
        if msg.index >= len(self.lengths) or (index, stripe_len) != (stream.index, self.lengths[msg.index]):
            # A valid fragment of another shard or stripe: never trust it for this one.
            self._fail(stream, f"cell {msg.index} belongs to another shard or stripe")
            return
        self._arm(stream)
        stream.received += 1
        if stream.received == len(self.lengths):
            self.suspects.discard(self._location(stream.index).node_id)  # served in full
        if msg.index >= self.next_stripe:
            self.cells.setdefault(msg.index, {})[stream.index] = payload
        if (
            not stream.paused
            and stream.received - self.next_stripe > MAX_BUFFERED_STRIPES
            and stream.connection is not None
        ):
            # We hold it back: its silence from now on is ours, not the server's.
            stream.paused = True
            self._disarm(stream)
            stream.connection.pause_reading()
        self._emit()

    def _ended(self, stream: _Stream) -> None:
        if self.streams.get(stream.index) is not stream:
            return
        self._disarm(stream)
        if stream.received < len(self.lengths):
            self._fail(stream, f"ended after {stream.received} of {len(self.lengths)} cells")
            return
        stream.finished = True
        self._emit()

    def _fail(self, stream: _Stream, reason: str) -> None:
        if self.streams.get(stream.index) is not stream or self.done.called:
            return
        del self.streams[stream.index]
        self._disarm(stream)
        location = self._location(stream.index)
        self.failed[stream.index] = f"{location.node_id}: {reason}"
        self.suspects.add(location.node_id)
        if stream.connection is not None and not stream.finished:
            # Its remaining cells would be ignored anyway; a quiet or broken server's
            # connection (ours alone) is closed.
            stream.connection.close()
        # Cells already received from it stay usable: they passed their checksums.
        if len(self.streams) < self.codec.k:
            if self.unused:
                self._start(self.unused.pop(0), self.next_stripe)
            elif not any(not s.finished for s in self.streams.values()):
                self._give_up()
                return
        self._emit()

    def _give_up(self) -> None:
        from dogfs.client.api import DogFSError

        # A shard answered if its stream is still on and has sent cells (or its end); every
        # other one is named: failed, or still silent when the others ran out (one whose
        # watchdog was about to fire, one started as a replacement moments ago).
        answered = {i for i, s in self.streams.items() if s.finished or s.received > s.first}
        now = self.client.clock.seconds()

        def reason(index: int) -> str:
            if index in self.failed:
                return self.failed[index]
            node = self._location(index).node_id
            stream = self.streams.get(index)
            if stream is None:
                return f"{node}: not read"
            waited = round(now - stream.started, 1)
            return f"{node}: " + (f"no data for {waited:g}s" if waited else "no data yet")

        reasons = "; ".join(reason(i) for i in range(self.codec.width) if i not in answered)
        self._stop_all()
        self.done.errback(
            DogFSError(
                "unavailable",
                f"cannot read {self.path}: block group {self.bg.id} needs {self.codec.k} of its "
                f"{self.codec.width} shards but only {len(answered)} answered ({reasons})",
            )
        )

    def _consumer_stopped(self) -> None:
        if not self.done.called:
            self._stop_all()
            self.done.errback(sink_stopped(self.path, self.sink))

    def _write_failed(self, error: OSError) -> None:
        if not self.done.called:
            self._stop_all()
            self.done.errback(local_write_failed(self.path, error))

    def _stop_all(self) -> None:
        # Forget them first: closing a connection fails its call, and _fail must not start
        # a replacement stream for a read that is over.
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            self._disarm(stream)
            connection = stream.connection
            if connection is None:
                continue
            if stream.paused:
                stream.paused = False
                connection.resume_reading()
            if stream.received < len(self.lengths):
                # Cells we no longer want are still coming: stop them.
                connection.close()
            else:
                # Only its end is to come: then its connection is reused (see _start),
                # unless the server never sends it.
                stream.watchdog = self.client.clock.callLater(
                    self.shard_timeout, _close_if_held, stream, connection
                )

    def _emit(self) -> None:
        k = self.codec.k
        if self.done.called:
            return
        while self.next_stripe < len(self.lengths):
            if self.sink.paused:
                return  # the consumer is full: resumeProducing calls _emit again
            got = self.cells.get(self.next_stripe, {})
            if all(i in got for i in range(k)):
                parts = [self.codec.data_payload(got[i]) for i in range(k)]
            elif len(got) >= k and all(
                i in got or i not in self.streams for i in range(k)
            ):
                # Rebuild only the missing data fragments, from the receive buffers in place
                # (pooled buffers for the results: nothing is zero-filled or copied).
                try:
                    data = self.codec.rebuild_data(got, range(k), FRAME_BUFFERS.get)
                    parts = [data[i] for i in range(k)]
                except Exception as e:
                    self._decode_failed(e)
                    return
            else:
                if not self._can_progress(got):
                    self._give_up()
                return
            try:
                for part in parts:
                    self.sink.write(part)
            except OSError as e:
                self._write_failed(e)
                return
            if self.progress is not None:
                self.progress(self.lengths[self.next_stripe])
            del self.cells[self.next_stripe]
            self.next_stripe += 1
            for stream in self.streams.values():
                if stream.paused and stream.received - self.next_stripe <= MAX_BUFFERED_STRIPES // 2:
                    stream.paused = False
                    if not stream.finished:
                        self._arm(stream)
                    if stream.connection is not None:
                        stream.connection.resume_reading()
        self._stop_all()
        self.done.callback(None)

    def _can_progress(self, got: dict[int, Any]) -> bool:
        """Whether the current stripe can still be completed by streams still running."""
        running = [s for s in self.streams.values() if not s.finished]
        return len(got) + len([s for s in running if s.index not in got]) >= self.codec.k or bool(self.unused)

    def _decode_failed(self, error: Exception) -> None:
        from dogfs.client.api import DogFSError

        self._stop_all()
        self.done.errback(
            DogFSError("corrupt", f"cannot read {self.path}: block group {self.bg.id} does not decode: {error}")
        )


def _answered(failure: Failure) -> bool:
    """Whether a failed call was answered by the server (an error such as not_found, after
    which its connection carries nothing more of it), not cut off."""
    error = failure.value
    return isinstance(error, WireError) and not isinstance(error, ConnectionClosed | RequestTimeout)


def _close_if_held(stream: _Stream, connection: Connection) -> None:
    """A stream abandoned while only its end was to come still holds its lease: the server
    never sent the end, so the connection is closed (which ends the lease)."""
    if stream.connection is connection:
        connection.close()


def _describe(failure: Failure) -> str:
    error = failure.value
    if isinstance(error, WireError):
        return error.message
    return failure.getErrorMessage()
