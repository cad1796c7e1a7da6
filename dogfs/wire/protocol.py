# -*- test-case-name: tests.test_wire_protocol -*-
"""A DogFS connection: negotiated version, multiplexed requests, streams, flow control.

Both ends of a connection are the same `Connection` class: either may send requests and
answer them. A request is one frame, or several frames (flag MORE on all but the last) for
streamed uploads; a response is likewise one frame or a stream. An `Error` frame ends a
request in either direction.

Flow control: the connection registers itself as the transport's streaming producer, so it
knows when the kernel's send buffer is full; senders of bulk data await `wait_writable()`
between frames. Inbound streams queue a bounded number of frames, and past that the
connection stops reading its socket until the handler catches up, so TCP pushes back on the
sender. Nothing here buffers without bound.
"""

from __future__ import annotations

import errno
import itertools
import socket
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from attrs import define, field, frozen
from twisted.internet import defer, main, tcp
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dogfs.wire import messages
from dogfs.wire.frame import Flags, Frame, FrameDecoder, FrameError, FrameLimits, encode_frame
from dogfs.wire.messages import SUPPORTED_VERSIONS, Error, Hello, MalformedMessage

log = Logger()

# Frame flags as plain ints: IntFlag's & and | cost microseconds on every frame.
_RESPONSE = int(Flags.RESPONSE)
_ERROR = int(Flags.ERROR)
_MORE = int(Flags.MORE)
_ONEWAY = int(Flags.ONEWAY)
_RESPONSE_MORE = _RESPONSE | _MORE
_RESPONSE_ERROR = _RESPONSE | _ERROR

# Bulk connections want bigger socket reads and writes than Twisted's defaults
# (64 KiB / 128 KiB): PERFORMANCE.md measured about 2x on loopback.
RECV_BUFFER = 1 << 20
SEND_LIMIT = 4 << 20
# Reads of a plain TCP socket between large frames (see Connection._read_socket); a large
# frame's remainder is read straight into its own buffer, whatever this size.
SOCKET_READ = 64 * 1024
# Most queued views handed to one sendmsg (Linux allows 1024).
SEND_PARTS = 64
# Frames an inbound stream may queue before we stop reading the socket.
INBOUND_QUEUE_FRAMES = 8
# Hostile peers (docs/security.md): a frame begun must be complete within FRAME_TIMEOUT
# seconds (a trickling peer holds a buffer and a socket), a connection with nothing in flight
# is closed after IDLE_TIMEOUT seconds, so is one whose peer has read nothing we sent for as
# long (our writing paused all that time: a reader that stopped holds a stream's file and
# buffers), and the payload bytes held for requests not yet answered are bounded by
# MAX_BUFFERED: past it the connection stops reading its socket.
FRAME_TIMEOUT = 30.0
IDLE_TIMEOUT = 600.0
MAX_BUFFERED = 64 << 20
# Seconds a closing connection may take to close cleanly (the peer reading what was queued
# for it, TLS's close_notify) before it is aborted.
CLOSE_TIMEOUT = 10.0


class WireError(Exception):
    """A request failed; raised by handlers to answer with an Error frame, and by callers
    when the peer answered with one."""

    def __init__(self, code: str, message: str, details: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = dict(details or {})

    def __repr__(self) -> str:
        return f"WireError({self.code!r}, {self.message!r})"


class ConnectionClosed(WireError):
    """The connection closed before the request completed; its outcome is unknown."""

    def __init__(self, message: str = "connection closed") -> None:
        super().__init__("connection_closed", message)


class RequestTimeout(WireError):
    """No response within the request's timeout; its outcome is unknown."""

    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


@frozen
class Reply:
    """A response: the message and its payload (a memoryview into the receive buffer)."""

    msg: Any
    payload: bytes | memoryview = b""


Handler = Callable[["Request"], Any]  # returns a message, a Reply, or a Deferred of either


@define(eq=False)
class Request:
    """An inbound request as its handler sees it."""

    connection: Connection
    request_id: int
    msg: Any
    payload: bytes | memoryview
    oneway: bool
    streamed: bool
    _parts: deque[tuple[Any, memoryview] | None] = field(factory=deque, init=False)
    _waiting: defer.Deferred[Any] | None = field(default=None, init=False)
    _failed: WireError | None = field(default=None, init=False)
    _reading_paused: bool = field(default=False, init=False)

    def next_part(self) -> defer.Deferred[tuple[Any, memoryview] | None]:
        """The next frame of a streamed request, or None after its last frame."""
        if self._failed is not None:
            return defer.fail(self._failed)
        if self._parts:
            part = self._parts.popleft()
            if part is not None:
                self.connection._release(len(part[1]))
            if self._reading_paused and len(self._parts) < INBOUND_QUEUE_FRAMES // 2:
                self._reading_paused = False
                self.connection._resume_reading()
            return defer.succeed(part)
        if not self.streamed:
            return defer.succeed(None)
        self._waiting = defer.Deferred()
        return self._waiting

    @property
    def failed(self) -> bool:
        """Whether the stream was aborted by the peer, failed, or answered before its end."""
        return self._failed is not None

    @property
    def part_ready(self) -> bool:
        """True when `next_part` would answer at once with a frame already received."""
        return self._failed is None and bool(self._parts) and self._parts[0] is not None

    def send_part(self, msg: Any, payload: bytes | memoryview = b"") -> defer.Deferred[None]:
        """Send one frame of a streamed response; fires when the connection can take more."""
        self.connection._send(msg, payload, self.request_id, _RESPONSE_MORE)
        return self.connection.wait_writable()

    def _deliver(self, part: tuple[Any, memoryview] | None) -> None:
        if self._failed is not None:
            return  # answered or aborted: the rest of the stream is discarded
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.callback(part)
            return
        if part is not None:
            self.connection._hold(len(part[1]))
        self._parts.append(part)
        if not self._reading_paused and len(self._parts) >= INBOUND_QUEUE_FRAMES:
            self._reading_paused = True
            self.connection._pause_reading()

    def _fail(self, error: WireError) -> None:
        self._failed = error
        self.connection._release(sum(len(p[1]) for p in self._parts if p is not None))
        self._parts.clear()
        if self._reading_paused:
            self._reading_paused = False
            self.connection._resume_reading()
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.errback(error)


@define(eq=False)
class _Pending:
    deferred: defer.Deferred[Reply]
    what: str  # the request's message type, for a timeout's message
    on_part: Callable[[Any, memoryview], None] | None = None
    deadline: float | None = None
    timeout: float = 0.0


@define(eq=False)
class Upload:
    """The sending side of a streamed request (see `Connection.open_stream`)."""

    connection: Connection
    request_id: int
    _result: defer.Deferred[Reply]
    _aborted: str | None = field(default=None, init=False)
    _closed: bool = field(default=False, init=False)  # the peer knows the stream has ended

    @property
    def done(self) -> bool:
        """True once the peer has answered (usually an early error) or the upload ended."""
        return self._result.called

    def _release(self) -> None:
        # The peer answered before our last frame: tell it the stream is over, so that it
        # forgets the request instead of waiting for frames that will never come.
        if not self._closed:
            self._closed = True
            self.connection._send(Error("aborted", "answered early"), b"", self.request_id, _ERROR)

    def send(self, msg: Any, payload: bytes | memoryview = b"") -> defer.Deferred[None]:
        """Send a middle frame; fires when the connection can take more.

        Once the peer has answered early (an error), frames are no longer sent; `finish`
        then gives that answer.
        """
        if self._result.called:
            self._release()
            return defer.succeed(None)
        self.connection._send(msg, payload, self.request_id, _MORE)
        return self.connection.wait_writable()

    def finish(
        self, msg: Any, payload: bytes | memoryview = b"", timeout: float | None = None
    ) -> defer.Deferred[Reply]:
        """Send the last frame and wait for the response."""
        if self._aborted is not None:
            return defer.fail(WireError("aborted", self._aborted))
        if self._result.called:
            self._release()
        else:
            self._closed = True
            self.connection._send(msg, payload, self.request_id, 0)
            self.connection._arm_timeout(self.request_id, timeout)
        return self._result

    def abort(self, reason: str) -> None:
        """Give up on the request: the peer discards what it received."""
        if self._aborted is not None:
            return
        self._aborted = reason
        if not self._closed:
            self._closed = True
            self.connection._send(Error("aborted", reason), b"", self.request_id, _ERROR)
        if not self._result.called:
            self.connection._complete(self.request_id, failure=Failure(WireError("aborted", reason)))
        self._result.addErrback(lambda _: None)  # finish() reports the abort instead


@implementer(IPushProducer, IHandshakeListener)
class Connection(Protocol):
    """One DogFS connection. `handlers` maps a message class to the function serving it."""

    # A TCP or TLS transport; typed loosely because we use ITCPTransport and IProducer parts.
    transport: Any

    def __init__(
        self,
        clock: IReactorTime,
        handlers: Mapping[type, Handler] | None = None,
        *,
        node_id: str | None = None,
        limits: FrameLimits = FrameLimits(),
        max_inflight: int = 1024,
        default_timeout: float | None = None,
        frame_timeout: float | None = FRAME_TIMEOUT,
        idle_timeout: float | None = IDLE_TIMEOUT,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        # zope interfaces confuse mypy's view of callLater's signature.
        self.clock: Any = clock
        self.handlers: Mapping[type, Handler] = handlers or {}
        self.node_id = node_id
        self.peer_node_id: str | None = None
        # Who the peer is, once a TLS handshake has authenticated it (None in plaintext).
        self.identity: Any = None
        self.on_handshake: Callable[[Connection], None] | None = None
        self.max_inflight = max_inflight
        self.default_timeout = default_timeout
        self.version: int | None = None
        self.ready: defer.Deferred[Connection] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.on_close: list[Callable[[Connection], None]] = []
        self._decoder = FrameDecoder(limits)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        # The one timer that fails requests past their deadline (see _arm_timeout).
        self._deadlines: Any = None
        self._inbound: dict[int, Request] = {}
        self._writable: list[defer.Deferred[None]] = []
        self._paused = False
        self._reading_pauses = 0
        self._lost = False
        self._closing_reason: str | None = None
        # Hostile-input limits (see FRAME_TIMEOUT): requests not yet answered, the payload
        # bytes they hold, and when a frame last completed.
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.max_buffered = max_buffered
        self._serving = 0
        self._buffered = 0
        self._buffer_paused = False
        self._last_frame = 0.0
        self._watchdog: Any = None
        # Set while closing: aborts a connection that does not finish closing (see _lose).
        self._close_timer: Any = None
        # The socket under a plain TCP transport, read and written directly; None under TLS
        # or any other transport (see _read_socket and _send).
        self._socket: socket.socket | None = None
        # What the plain TCP socket has not taken yet, in order (see _send_now), and its size.
        self._out: deque[memoryview] = deque()
        self._out_bytes = 0
        self._out_paused = False
        # When our writing was last paused (the peer not reading); see _check_watchdog.
        self._paused_at = 0.0

    # --- Protocol --------------------------------------------------------------------

    def connectionMade(self) -> None:
        raw = getattr(self.transport, "transport", None) or self.transport
        if hasattr(raw, "bufferSize"):
            raw.bufferSize = RECV_BUFFER
        if hasattr(raw, "SEND_LIMIT"):
            raw.SEND_LIMIT = SEND_LIMIT
        self._socket = _plain_socket(self.transport)
        if self._socket is not None:
            # The reactor calls the transport's doRead when the socket is readable: read it
            # ourselves, straight into large frames' buffers (FrameDecoder.read_target).
            self.transport.doRead = self._read_socket
            # ... and write it ourselves, from our own queue of views (_write_socket).
            self.transport.doWrite = self._write_socket
            # Frames go out whole, each with one sendmsg (_send_now): Nagle's algorithm would
            # only hold a small frame that follows another until the peer's delayed ACK.
            self.transport.setTcpNoDelay(True)
        self.transport.registerProducer(self, True)
        self._last_frame = self.clock.seconds()
        self._arm_watchdog()
        self._send(Hello(SUPPORTED_VERSIONS, "dogfs", self.node_id), b"", 0, 0, version=1)

    def handshakeCompleted(self) -> None:
        """TLS authenticated the peer: let the owner record its identity."""
        if self.on_handshake is not None:
            self.on_handshake(self)

    def dataReceived(self, data: bytes) -> None:
        if self._lost or self._closing_reason is not None:
            return
        try:
            frames = self._decoder.feed(data)
        except FrameError as e:
            self.protocol_error("frame_error", str(e))
            return
        self._frames_received(frames)

    def read_target(self) -> memoryview | None:
        """Where a TLS layer may decrypt the next bytes directly: the unfilled rest of a large
        frame (``FrameDecoder.read_target``), or None to have them delivered by dataReceived."""
        if self._lost or self._closing_reason is not None:
            return None
        return self._decoder.read_target()

    def received_into(self, count: int) -> None:
        """``count`` bytes were written at the start of the last ``read_target()``."""
        self._frames_received(self._decoder.received_into(count))

    def _read_socket(self) -> Any:
        """The transport's doRead on a plain TCP socket (see connectionMade).

        Returns what Twisted's doRead would: None, or why the connection ended.
        """
        transport = self.transport
        if transport.TLS:  # startTLS replaced the byte stream under us: Twisted's own path
            return tcp.Connection.doRead(transport)
        if self._lost or self._closing_reason is not None:
            # Closing: discard what arrives, as dataReceived does, without buffering it.
            target = None
        else:
            target = self._decoder.read_target()
        sock = transport.socket
        try:
            if target is None:
                data = sock.recv(SOCKET_READ)
            else:
                count = sock.recv_into(target)
        except OSError as e:
            if e.errno == errno.EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if target is None:
            if not data:
                return main.CONNECTION_DONE
            self.dataReceived(data)
        else:
            if not count:
                return main.CONNECTION_DONE
            self._frames_received(self._decoder.received_into(count))
        return None

    def _frames_received(self, frames: list[Frame]) -> None:
        if frames:
            self._last_frame = self.clock.seconds()
        for frame in frames:
            try:
                self._frame(frame.version, frame.flags, frame.type, frame.request_id,
                            frame.header, frame.payload)
            except MalformedMessage as e:
                self.protocol_error("malformed_message", str(e))
            if self._lost or self._closing_reason is not None:
                return

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self._lost:
            return
        self._lost = True
        if self._socket is not None:
            self._socket = None
            # Break the transport <-> us cycle.
            self.transport.__dict__.pop("doRead", None)
            self.transport.__dict__.pop("doWrite", None)
            self._out.clear()
            self._out_bytes = 0
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        if self._deadlines is not None and self._deadlines.active():
            self._deadlines.cancel()
        self._deadlines = None
        error = _tls_failure(reason, self.peer_description()) or ConnectionClosed(
            self._closing_reason or f"connection to {self.peer_description()} closed"
        )
        for request_id in list(self._pending):
            self._complete(request_id, failure=Failure(error))
        for request in self._inbound.values():
            request._fail(error)
        self._inbound.clear()
        waiters, self._writable = self._writable, []
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(error)
        if not self.ready.called:
            self.ready.errback(error)
            # Whoever waited has it now; a server's connection (a stranger refused at the TLS
            # handshake) has nobody waiting, and must not log an unhandled error.
            self.ready.addErrback(lambda _: None)
        for callback in self.on_close:
            callback(self)
        self.closed.callback(None)

    # --- IPushProducer: the transport tells us when its buffer is full ----------------

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused_at = self.clock.seconds()
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        waiters, self._writable = self._writable, []
        for waiter in waiters:
            if waiter.called:
                continue  # its sender gave up waiting (a cancelled deadline)
            if self._paused:
                self._writable.append(waiter)
            else:
                waiter.callback(None)

    def stopProducing(self) -> None:
        self._paused = True

    # --- public API ------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True until the connection is lost or closing."""
        return not self._lost and self._closing_reason is None

    @property
    def write_blocked(self) -> bool:
        """True while the transport's send buffer is full (the peer is not reading)."""
        return self._paused

    def peer_description(self) -> str:
        """The peer's node id, else its address, for error messages."""
        if self.peer_node_id:
            return self.peer_node_id
        try:
            peer = self.transport.getPeer()
            return f"{peer.host}:{peer.port}"
        except Exception:
            return "peer"

    def wait_writable(self) -> defer.Deferred[None]:
        """Fires when the transport can take more data (at once if it can now)."""
        if self._lost:
            return defer.fail(ConnectionClosed(f"connection to {self.peer_description()} closed"))
        if not self._paused:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._writable.append(waiter)
        return waiter

    def call(
        self,
        msg: Any,
        payload: bytes | memoryview = b"",
        timeout: float | None = None,
        on_part: Callable[[Any, memoryview], None] | None = None,
    ) -> defer.Deferred[Reply]:
        """Send a request; fires with the final Reply, or fails with a WireError.

        With `on_part`, intermediate frames of a streamed response are passed to it as
        (message, payload) in order, before the final Reply fires.
        """
        request_id = self._new_request(msg, on_part)
        result = self._pending[request_id].deferred
        self._send(msg, payload, request_id, 0)
        self._arm_timeout(request_id, timeout)
        return result

    def open_stream(
        self, msg: Any, payload: bytes | memoryview = b""
    ) -> Upload:
        """Start a streamed request: send more frames with `Upload.send`, then `finish`."""
        request_id = self._new_request(msg, None)
        upload = Upload(self, request_id, self._pending[request_id].deferred)
        self._send(msg, payload, request_id, _MORE)
        return upload

    def keepalive(self) -> None:
        """Tell the peer we are here: one small one-way frame it ignores, which keeps its
        idle check from failing our open streams while we have nothing to send on them."""
        self.send_oneway(messages.Ok())

    def send_oneway(self, msg: Any, payload: bytes | memoryview = b"") -> None:
        """Send a request that gets no response (Raft messages)."""
        if self.is_open:
            self._send(msg, payload, next(self._ids) & 0xFFFFFFFF, _ONEWAY)

    def pause_reading(self) -> None:
        """Stop reading the socket until `resume_reading` (a slow consumer of a response)."""
        self._pause_reading()

    def resume_reading(self) -> None:
        """Undo one `pause_reading`."""
        self._resume_reading()

    def protocol_error(self, code: str, message: str) -> None:
        """Tell the peer what was wrong with its bytes, then close this connection."""
        if self._closing_reason is not None or self._lost:
            return
        log.warn("closing connection to {peer}: {message}", peer=self.peer_description(), message=message)
        self._send(Error(code, message), b"", 0, _ERROR)
        self._closing_reason = f"connection to {self.peer_description()} closed: {message}"
        self._lose()

    def close(self) -> None:
        """Close the connection once queued data is written."""
        if self.is_open:
            self._closing_reason = f"connection to {self.peer_description()} closed locally"
            self._lose()

    # --- internals -------------------------------------------------------------------

    def _new_request(self, msg: Any, on_part: Callable[[Any, memoryview], None] | None) -> int:
        if not self.is_open:
            raise ConnectionClosed(f"connection to {self.peer_description()} is closed")
        request_id = next(self._ids) & 0xFFFFFFFF
        self._pending[request_id] = _Pending(defer.Deferred(), type(msg).__name__, on_part)
        return request_id

    def _arm_timeout(self, request_id: int, timeout: float | None) -> None:
        """Fail the request if no reply has come in C{timeout} seconds.

        One timer per connection serves every request: it is armed for the earliest deadline
        and moved only when a request with an earlier one comes, so the usual request (the
        same timeout as those before it) costs no timer at all, where a DelayedCall each
        cost a heap insertion and a cancellation.
        """
        timeout = self.default_timeout if timeout is None else timeout
        pending = self._pending.get(request_id)
        if pending is None or timeout is None:
            return
        deadline = self.clock.seconds() + timeout
        pending.deadline, pending.timeout = deadline, timeout
        timer = self._deadlines
        if timer is None or not timer.active():
            self._deadlines = self.clock.callLater(timeout, self._expire_requests)
        elif deadline < timer.getTime():
            timer.reset(timeout)

    def _expire_requests(self) -> None:
        """Fail the requests whose deadline has passed; arm for the next deadline."""
        self._deadlines = None
        now = self.clock.seconds()
        soonest: float | None = None
        for request_id, pending in list(self._pending.items()):
            deadline = pending.deadline
            if deadline is None:
                continue
            if deadline <= now:
                message = f"{pending.what} to {self.peer_description()} timed out after {pending.timeout:g}s"
                self._complete(request_id, failure=Failure(RequestTimeout(message)))
            elif soonest is None or deadline < soonest:
                soonest = deadline
        if soonest is None or self._lost:
            return
        timer = self._deadlines  # a callback above may have armed it again
        if timer is None or not timer.active():
            self._deadlines = self.clock.callLater(soonest - now, self._expire_requests)
        elif soonest < timer.getTime():
            timer.reset(soonest - now)

    def _complete(
        self, request_id: int, reply: Reply | None = None, failure: Failure | None = None
    ) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        if failure is not None:
            pending.deferred.errback(failure)
        else:
            assert reply is not None
            pending.deferred.callback(reply)

    def _send(
        self,
        msg: Any,
        payload: bytes | memoryview,
        request_id: int,
        flags: int,
        version: int | None = None,
    ) -> None:
        if self._lost:
            return
        header = messages.encode(msg)
        prefix = encode_frame(
            version or self.version or 1, flags, messages.type_of(msg), request_id, header, len(payload)
        )
        if self._socket is not None and self._can_send_now():
            self._send_now(prefix + header, payload)
        elif payload:
            self.transport.writeSequence([prefix, header, payload])
        else:
            self.transport.write(prefix + header)

    def _can_send_now(self) -> bool:
        """Whether a frame may go to the socket (or our queue of it): a plain transport, open
        for writing, with nothing of its own queued before it."""
        return not self.transport.TLS and nothing_queued(self.transport)

    def _send_now(self, head: bytes, payload: bytes | memoryview) -> None:
        """Send a frame with one sendmsg; queue what the socket did not take in `_out`.

        Twisted would copy every frame into one string before sending it (and send it only
        on the next reactor turn), and again whatever the socket did not take; for 1 MiB
        cells those copies are a good part of the CPU of both ends. Our queue holds views
        (a copy only of a payload in a buffer its owner may reuse), `_write_socket` sends
        them when the socket can take more, and past the transport's buffer size we pause
        ourselves as Twisted would.
        """
        assert self._socket is not None
        parts: list[bytes | memoryview] = [head, payload] if payload else [head]
        sent = 0
        if not self._out:
            try:
                sent = self._socket.sendmsg(parts)
            except OSError:
                # Full (EWOULDBLOCK, ENOBUFS) or broken: _write_socket tries again and
                # reports the loss.
                sent = 0
        queued = 0
        for part in parts:
            if sent >= len(part):
                sent -= len(part)
                continue
            # bytes cannot change under us; any other buffer may be reused by its owner.
            view = memoryview(part)[sent:]
            if not isinstance(part, bytes):
                view = memoryview(bytes(view))
            sent = 0
            self._out.append(view)
            queued += len(view)
        if queued:
            self._out_bytes += queued
            self.transport.startWriting()
            if not self._out_paused and self._out_bytes > self.transport.bufferSize:
                self._out_paused = True
                self.pauseProducing()

    def _write_socket(self) -> Any:
        """The transport's doWrite on a plain TCP socket: our queue first, then (usually
        empty) Twisted's own buffer, whose doWrite also stops writing and ends a closing
        connection. Returns what Twisted's doWrite would."""
        out = self._out
        sock = self._socket
        while out and sock is not None:
            try:
                sent = sock.sendmsg(list(itertools.islice(out, SEND_PARTS)))
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.ENOBUFS):
                    break
                return main.CONNECTION_LOST
            self._out_bytes -= sent
            while sent and sent >= len(out[0]):
                sent -= len(out.popleft())
            if sent:
                out[0] = out[0][sent:]
                break  # the socket is full
        # Let senders go on once half the queue is out, not only when all is: the socket
        # then still has the rest to send while they prepare the next frame.
        if self._out_paused and self._out_bytes <= self.transport.bufferSize // 2:
            self._out_paused = False
            self.resumeProducing()
        if out:
            return None
        return tcp.Connection.doWrite(self.transport)

    def _lose(self) -> None:
        # Under TLS, loseConnection waits until no producer is registered before it sends
        # close_notify: unregister first, or a closed connection would linger forever.
        try:
            self.transport.unregisterProducer()
        except Exception:
            pass
        if self._reading_pauses and not self._lost:
            # Held back for a consumer that no longer matters: TLS ends only once the peer's
            # close_notify is read, which waits behind what we stopped reading (discarded).
            self.transport.resumeProducing()
        self.transport.loseConnection()
        if self._close_timer is None and not self._lost:
            # A peer that neither reads nor answers (wedged, SIGSTOPped) would hold the
            # connection open forever: give up on closing cleanly after a while.
            self._close_timer = self.clock.callLater(CLOSE_TIMEOUT, self._close_expired)

    def _close_expired(self) -> None:
        self._close_timer = None
        if not self._lost:
            log.info("aborting connection to {peer}: not closed within {timeout:g}s",
                     peer=self.peer_description(), timeout=CLOSE_TIMEOUT)
            self.transport.abortConnection()

    def _hold(self, size: int) -> None:
        """Payload bytes now held for an unanswered request; stop reading past the limit."""
        self._buffered += size
        if not self._buffer_paused and self._buffered > self.max_buffered:
            self._buffer_paused = True
            self._pause_reading()

    def _release(self, size: int) -> None:
        """Held payload bytes let go; read again once under half the limit."""
        self._buffered -= size
        if self._buffer_paused and self._buffered <= self.max_buffered // 2:
            self._buffer_paused = False
            self._resume_reading()

    def _arm_watchdog(self) -> None:
        limits = [t for t in (self.frame_timeout, self.idle_timeout) if t is not None]
        if limits and not self._lost:
            # One timer per connection, checked at a fraction of the shortest limit: cheaper
            # than re-arming a timer on every read.
            self._watchdog = self.clock.callLater(min(limits) / 4, self._check_watchdog)

    def _check_watchdog(self) -> None:
        self._watchdog = None
        if self._lost or self._closing_reason is not None:
            return
        now = self.clock.seconds()
        quiet = now - self._last_frame
        if self.idle_timeout is not None and self._paused and now - self._paused_at > self.idle_timeout:
            # Nothing we sent was read for that long: a peer that stopped reading (a stuck or
            # hostile reader) would hold its requests' resources for good.
            log.info("closing connection to {peer}: it has read nothing we sent for {t:g}s",
                     peer=self.peer_description(), t=now - self._paused_at)
            self.close()
            return
        if self._reading_pauses:
            # We stopped reading (flow control): the peer is not to blame for the silence.
            self._last_frame = self.clock.seconds()
        elif (
            self.frame_timeout is not None
            and (self._decoder.buffered or getattr(self.transport, "partly_received", 0))
            and quiet > self.frame_timeout
        ):
            self.protocol_error(
                "timeout", f"a frame begun was not completed within {self.frame_timeout:g}s"
            )
            return
        elif self.idle_timeout is not None and quiet > self.idle_timeout:
            # The peer sent nothing at all for that long (a client stopped, or its host gone
            # without a FIN), though streams of its are open: they fail, so that their
            # handlers let go of what they hold (an upload's temporary file), and the
            # connection may then go idle. A live client with an upload waiting for its
            # source sends keepalives (`keepalive`), as HDFS clients send heartbeat packets.
            for request in self._inbound.values():
                if request._failed is None:
                    log.info("{peer} sent nothing for {t:g}s with request {id} open: failing it",
                             peer=self.peer_description(), t=quiet, id=request.request_id)
                    request._fail(WireError("timeout", f"the peer sent nothing for {self.idle_timeout:g}s"))
            if (
                not self._pending
                and not self._serving
                and all(request._failed is not None for request in self._inbound.values())
            ):
                log.info("closing idle connection to {peer}", peer=self.peer_description())
                self.close()
                return
        self._arm_watchdog()

    def _pause_reading(self) -> None:
        self._reading_pauses += 1
        if self._reading_pauses == 1 and self.is_open:
            self.transport.pauseProducing()

    def _resume_reading(self) -> None:
        self._reading_pauses -= 1
        if self._reading_pauses == 0 and self.is_open:
            self.transport.resumeProducing()

    def _frame(
        self, version: int, flags: int, type_: int, request_id: int, header: bytes, payload: memoryview
    ) -> None:
        if self.version is None:
            self._negotiate(type_, header)
            return
        if version != self.version:
            self.protocol_error("bad_version", f"frame in protocol version {version}, agreed {self.version}")
            return
        if flags & _RESPONSE:
            self._response(flags, type_, request_id, header, payload)
            return
        inbound = self._inbound.get(request_id)
        if inbound is not None:
            if flags & _ERROR:
                error = messages.decode(type_, header)
                del self._inbound[request_id]
                inbound._fail(WireError(getattr(error, "code", "aborted"), getattr(error, "message", "aborted")))
                return
            msg = messages.decode(type_, header)
            inbound._deliver((msg, payload))
            if not flags & _MORE:
                del self._inbound[request_id]
                inbound._deliver(None)
            return
        if flags & _ERROR:
            # An error about the connection as a whole (request id 0), or a late abort.
            error = messages.decode(type_, header)
            if request_id == 0:
                self._closing_reason = (
                    f"{self.peer_description()} closed the connection: {getattr(error, 'message', '')}"
                )
                self._lose()
            return
        self._request(flags, type_, request_id, header, payload)

    def _negotiate(self, type_: int, header: bytes) -> None:
        if type_ != Hello.TYPE:  # type: ignore[attr-defined]
            self.protocol_error("handshake", "the first frame must be Hello")
            return
        hello = messages.decode(type_, header)
        common = set(hello.versions) & set(SUPPORTED_VERSIONS)
        if not common:
            self.protocol_error(
                "unsupported_version",
                f"no common protocol version: peer speaks {sorted(hello.versions)}, "
                f"we speak {list(SUPPORTED_VERSIONS)}",
            )
            return
        self.version = max(common)
        self.peer_node_id = hello.node_id
        if not self.ready.called:  # a pool that gave up waiting cancelled it
            self.ready.callback(self)

    def _response(
        self, flags: int, type_: int, request_id: int, header: bytes, payload: memoryview
    ) -> None:
        pending = self._pending.get(request_id)
        if pending is None:
            return  # the request timed out or was aborted: drop the late answer
        msg = messages.decode(type_, header)
        if flags & _ERROR:
            if not isinstance(msg, Error):
                self.protocol_error(
                    "malformed_message", f"error response to request {request_id} is a {type(msg).__name__}"
                )
                return
            self._complete(request_id, failure=Failure(WireError(msg.code, msg.message, msg.details)))
        elif flags & _MORE:
            if pending.on_part is None:
                self.protocol_error("unexpected_stream", f"unrequested streamed response to request {request_id}")
                return
            try:
                pending.on_part(msg, payload)
            except Exception:
                self._complete(request_id, failure=Failure())
        else:
            self._complete(request_id, reply=Reply(msg, payload))

    def _request(
        self, flags: int, type_: int, request_id: int, header: bytes, payload: memoryview
    ) -> None:
        oneway = bool(flags & _ONEWAY)
        streamed = bool(flags & _MORE)
        try:
            msg = messages.decode(type_, header)
        except messages.UnknownMessageType as e:
            if oneway:
                return
            if streamed:
                # The sink lives until the stream ends: it counts against the limit as any
                # request does, or a peer could open streams of unknown types without bound.
                if max(len(self._inbound), self._serving) + 1 > self.max_inflight:
                    self.protocol_error("too_many_requests", f"more than {self.max_inflight} requests in flight")
                    return
                # Swallow the rest of the stream, then answer once.
                sink = Request(self, request_id, None, b"", oneway, streamed)
                sink._fail(WireError("unsupported", str(e)))
                self._inbound[request_id] = sink
            self._send(Error("unsupported", str(e)), b"", request_id, _RESPONSE_ERROR)
            return
        if max(len(self._inbound), self._serving) + 1 > self.max_inflight:
            self.protocol_error("too_many_requests", f"more than {self.max_inflight} requests in flight")
            return
        handler = self.handlers.get(type(msg))
        request = Request(self, request_id, msg, payload, oneway, streamed)
        self._serving += 1
        self._hold(len(payload))
        if streamed:
            self._inbound[request_id] = request
        if handler is None:
            self._answer(request, Failure(WireError("unsupported", f"{type(msg).__name__} is not served here")))
            return
        d = defer.maybeDeferred(handler, request)
        d.addBoth(lambda result: self._answer(request, result))

    def _answer(self, request: Request, result: Any) -> None:
        self._serving -= 1
        self._release(len(request.payload))
        if request.streamed and request._failed is None:
            # Answered before its handler took every frame (a failed write, say): the frames
            # queued are dropped, giving back their share of the connection's buffer and
            # resuming its reading if they had paused it, and if the stream has not ended,
            # the rest are discarded as they come. Whether or not its last frame is in.
            request._fail(WireError("answered", "the request was already answered"))
        if request.oneway or self._lost:
            if isinstance(result, Failure) and not result.check(WireError):
                log.failure("oneway handler for {msg} failed", result, msg=type(request.msg).__name__)
            return
        flags = _RESPONSE
        if isinstance(result, Failure):
            if result.check(WireError):
                error: Any = result.value
                reply = Reply(Error(error.code, error.message, error.details))
            else:
                log.failure("handler for {msg} failed", result, msg=type(request.msg).__name__)
                reply = Reply(Error("internal", f"{type(request.msg).__name__} failed: {result.getErrorMessage()}"))
            flags |= _ERROR
        elif isinstance(result, Reply):
            reply = result
        else:
            reply = Reply(messages.Ok() if result is None else result)
        self._send(reply.msg, reply.payload, request.request_id, flags)


def nothing_queued(transport: Any) -> bool:
    """Whether a Twisted TCP transport is open for writing and has nothing in its own buffer:
    bytes written to its socket directly then overtake nothing (see Connection._send_now)."""
    return bool(
        transport.connected
        and not transport._writeDisconnected
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    )


def _plain_socket(transport: Any) -> socket.socket | None:
    """The socket of a plain (not TLS) Twisted TCP transport, else None."""
    if isinstance(transport, tcp.Connection) and not transport.TLS:
        sock = getattr(transport, "socket", None)
        if isinstance(sock, socket.socket):
            return sock
    return None


def _tls_failure(reason: Any, peer: str) -> WireError | None:
    """The error for a connection lost to a failed TLS handshake, or None if it was not.

    A refusal of our certificate is ``permission_denied`` (retrying elsewhere will not help);
    other TLS failures are ``tls_failed``. Neither is retried by clients.
    """
    value = getattr(reason, "value", None)
    module = type(value).__module__.split(".")[0]
    if not isinstance(value, BaseException) or module not in ("OpenSSL", "service_identity"):
        return None
    from dogfs.security.tls import describe_tls_failure

    text = describe_tls_failure(value, peer)
    if text is None:
        return None
    refused = "refused our" in text or "requires a client certificate" in text
    return WireError("permission_denied" if refused else "tls_failed", text)
