# -*- test-case-name: tests.test_wire_frame -*-
"""The DogFS frame: one length-prefixed layout for every connection.

A frame on the wire is::

    u32 length      bytes that follow this field (the fixed part, header and payload)
    u8  version     protocol version the frame is written in
    u8  flags       RESPONSE, ERROR, MORE, ONEWAY (see `Flags`)
    u16 type        message type (see dogfs.wire.messages)
    u32 request_id  multiplexes requests on one connection
    u32 header_len  length of the msgpack header that follows
    header          the message's fields (msgpack)
    payload         raw bulk bytes, never re-encoded

Every length is checked against `FrameLimits` as soon as it is known and before any buffer
for it is allocated, so a hostile peer cannot make us allocate more than the limits.
"""

from __future__ import annotations

import struct
import sys
import threading
from enum import IntFlag

from attrs import frozen

PREFIX = struct.Struct("!IBBHII")
PREFIX_SIZE = PREFIX.size  # 16
FIXED_AFTER_LENGTH = PREFIX_SIZE - 4


class Flags(IntFlag):
    """Bits of a frame's flags byte."""

    NONE = 0
    RESPONSE = 1  # answers a request the receiver sent
    ERROR = 2  # header is an Error; ends the request (either direction)
    MORE = 4  # more frames of this request or response follow
    ONEWAY = 8  # a request that expects no response


class FrameError(Exception):
    """The byte stream is not a valid sequence of DogFS frames; the connection must close."""


class FrameTooLarge(FrameError):
    """A frame announces more bytes than the receiver's limits allow."""


@frozen
class FrameLimits:
    """Hard caps on what a peer may send in one frame."""

    max_header: int = 64 * 1024
    max_payload: int = 16 * 1024 * 1024

    @property
    def max_frame(self) -> int:
        """The largest value the length field may carry."""
        return FIXED_AFTER_LENGTH + self.max_header + self.max_payload


@frozen
class Frame:
    """One decoded frame. `payload` is a memoryview into the receive buffer."""

    version: int
    flags: int  # bits of Flags, as a plain int (IntFlag arithmetic costs microseconds a frame)
    type: int
    request_id: int
    header: bytes
    payload: memoryview


def encode_frame(
    version: int, flags: int, type_: int, request_id: int, header: bytes, payload_len: int
) -> bytes:
    """Return the prefix of a frame; the caller writes header and payload after it."""
    length = FIXED_AFTER_LENGTH + len(header) + payload_len
    return PREFIX.pack(length, version, flags, type_, request_id, len(header))


#: A frame with at least this many bytes still to come is read straight into a buffer of its
#: own (`FrameDecoder.read_target`) instead of arriving in chunks that are joined at the end.
DIRECT_READ_MIN = 64 * 1024


class BufferPool:
    """Frame buffers for direct reads, reused once nothing refers to them any more.

    A new ``bytearray`` is zero-filled, which cost about as much CPU as the copy that reading
    straight into it saves. A frame's payload is handed on as memoryviews of its buffer, and
    every one of them holds a reference to it; a pooled buffer whose only references are the
    pool's own is free. Kept buffers are bounded in count and bytes; frames the pool cannot
    serve get a fresh buffer that is simply dropped later.
    """

    def __init__(self, max_buffers: int = 32, max_bytes: int = 32 << 20) -> None:
        self.max_buffers = max_buffers
        self.max_bytes = max_bytes
        self._buffers: list[bytearray] = []
        self._bytes = 0
        self._lock = threading.Lock()

    def _free(self, i: int) -> bool:
        # The list's reference and getrefcount's own argument: no view of it is alive.
        return sys.getrefcount(self._buffers[i]) == 2

    def get(self, size: int) -> bytearray:
        """A buffer of at least `size` bytes (at most twice that) that nobody else holds."""
        with self._lock:
            buffers = self._buffers
            for i in range(len(buffers)):
                if size <= len(buffers[i]) <= 2 * size and self._free(i):
                    return buffers[i]
            buffer = bytearray(size)
            if len(buffers) < self.max_buffers and self._bytes + size <= self.max_bytes:
                buffers.append(buffer)
                self._bytes += size
            elif buffers:
                # Full: make room by dropping a free buffer, if any, so sizes can change.
                for i in range(len(buffers)):
                    if self._free(i):
                        self._bytes -= len(buffers[i])
                        del buffers[i]
                        break
            return buffer


#: The pool every FrameDecoder takes its direct-read buffers from.
FRAME_BUFFERS = BufferPool()


class FrameDecoder:
    """Incremental decoder: feed it bytes in any split, get whole frames out.

    Large payloads arrive in many reads; they are kept as a list of chunks and joined once
    when the frame is complete, so a frame costs one copy whatever the read size.

    A reader that owns a socket can do better: once a large frame's length is known,
    `read_target` gives a buffer holding the whole frame, with the bytes received so far
    already in it, for ``socket.recv_into``; `received_into` then reports how much arrived.
    The rest of the frame then costs no copy in user space and no join.
    """

    def __init__(self, limits: FrameLimits = FrameLimits()) -> None:
        self.limits = limits
        self._chunks: list[bytes] = []
        self._offset = 0  # bytes of _chunks[0] already consumed
        self._buffered = 0
        self._need: int | None = None  # total size of the frame being read, once known
        # The frame being received directly (see read_target), and how much of it is filled.
        self._body: memoryview | None = None
        self._filled = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._buffered

    def read_target(self) -> memoryview | None:
        """Where the next read should go: the unfilled rest of the current frame, or None.

        Not None only while a frame with at least `DIRECT_READ_MIN` bytes still to come is
        being received (its length already checked against the limits). The caller reads at
        most ``len(target)`` bytes into it, so the next frame's bytes never land there, and
        reports the count with `received_into`.
        """
        if self._body is not None:
            return self._body[self._filled :]
        need = self._need
        if need is None or need - self._buffered < DIRECT_READ_MIN:
            return None
        # Every buffered byte belongs to this frame (feed returned every earlier one).
        body = memoryview(FRAME_BUFFERS.get(need))[:need]
        filled = 0
        if self._chunks:
            first = self._chunks[0]
            parts: list[bytes | memoryview] = [memoryview(first)[self._offset :], *self._chunks[1:]]
            for part in parts:
                body[filled : filled + len(part)] = part
                filled += len(part)
            self._chunks = []
            self._offset = 0
        self._body = body
        self._filled = filled
        return body[filled:]

    def received_into(self, count: int) -> list[Frame]:
        """`count` bytes were read into the last `read_target`; return the frame if complete."""
        body = self._body
        if body is None or not 0 <= count <= len(body) - self._filled:
            raise ValueError(f"received_into({count}) does not match the read target")
        self._filled += count
        self._buffered += count
        if self._filled < len(body):
            return []
        self._body = None
        self._filled = 0
        self._buffered = 0
        self._need = None
        return [self._decode(body)]

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return the frames they complete. Raises FrameError."""
        if self._body is not None:
            raise RuntimeError("feed() while a frame is being read with read_target()")
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
        frames: list[Frame] = []
        while True:
            if self._need is None:
                if self._buffered < PREFIX_SIZE:
                    return frames
                length, _v, _f, _t, _r, header_len = PREFIX.unpack(self._peek(PREFIX_SIZE))
                self._check(length, header_len)
                self._need = 4 + length
            if self._buffered < self._need:
                return frames
            frames.append(self._decode(self._take(self._need)))
            self._need = None

    def _check(self, length: int, header_len: int) -> None:
        limits = self.limits
        if length > limits.max_frame:
            raise FrameTooLarge(
                f"frame of {length} bytes exceeds the limit of {limits.max_frame} bytes"
            )
        if length < FIXED_AFTER_LENGTH:
            raise FrameError(f"frame length {length} is shorter than a frame's fixed part")
        if header_len > limits.max_header:
            raise FrameTooLarge(
                f"frame header of {header_len} bytes exceeds the limit of {limits.max_header} bytes"
            )
        if header_len > length - FIXED_AFTER_LENGTH:
            raise FrameError(f"frame header length {header_len} overruns its frame of {length} bytes")
        if length - FIXED_AFTER_LENGTH - header_len > limits.max_payload:
            raise FrameTooLarge(f"frame payload exceeds the limit of {limits.max_payload} bytes")

    def _peek(self, size: int) -> bytes:
        first = self._chunks[0]
        out = first[self._offset : self._offset + size]
        i = 1
        while len(out) < size:
            out += self._chunks[i][: size - len(out)]
            i += 1
        return out

    def _take(self, size: int) -> memoryview:
        """Remove `size` bytes from the buffer: a view of one chunk when the frame lies in one."""
        self._buffered -= size
        first = self._chunks[0]
        if len(first) - self._offset >= size:
            view = memoryview(first)[self._offset : self._offset + size]
            self._offset += size
            if self._offset == len(first):
                self._chunks.pop(0)
                self._offset = 0
            return view
        parts: list[bytes | memoryview] = [memoryview(first)[self._offset :]]
        need = size - (len(first) - self._offset)
        self._chunks.pop(0)
        self._offset = 0
        while need:
            chunk = self._chunks[0]
            if len(chunk) <= need:
                parts.append(chunk)
                need -= len(chunk)
                self._chunks.pop(0)
            else:
                parts.append(memoryview(chunk)[:need])
                self._offset = need
                need = 0
        return memoryview(b"".join(parts))

    @staticmethod
    def _decode(view: memoryview) -> Frame:
        _length, version, flags, type_, request_id, header_len = PREFIX.unpack_from(view)
        header_end = PREFIX_SIZE + header_len
        return Frame(
            version=version,
            flags=flags,
            type=type_,
            request_id=request_id,
            header=bytes(view[PREFIX_SIZE:header_end]),
            payload=view[header_end:],
        )
