"""What each fuzz harness checks, as plain functions of the input bytes.

Shared by the atheris harnesses in this folder (coverage-guided, see README.md) and by
``tests/test_fuzz_corpus.py``, which replays the saved corpus through the same functions under
plain Python so that ``make test`` catches a regression without atheris.

Each ``check_*`` function feeds one input to one of DogFS's decoders of untrusted bytes and
raises ``AssertionError`` (or lets an unexpected exception escape) when the decoder breaks its
contract: it may refuse the input only with its documented exception, and whatever it accepts
must survive a round trip through the matching encoder. No allocation may exceed what the
input and the limits allow (checked for the frame decoder, where sizes come from the input).
"""

from __future__ import annotations

import struct
from typing import Any

from dogfs.meta import commands
from dogfs.raft import core as raft
from dogfs.wire import frame, messages

#: Small limits, so that the fuzzer reaches "too large" as easily as "fits".
FUZZ_LIMITS = frame.FrameLimits(max_header=512, max_payload=4096)

#: Registered wire message types, in a stable order (a fuzz input picks one by index).
WIRE_TYPES: list[int] = sorted(messages._REGISTRY)


def _splits(control: bytes, size: int) -> list[int]:
    """Cut points in ``range(size)`` chosen by ``control`` (one byte per cut)."""
    cuts = sorted({(b * 7919 + i * 31) % (size + 1) for i, b in enumerate(control)})
    return [c for c in cuts if 0 < c < size]


def check_frames(data: bytes) -> None:
    """The frame decoder, fed ``data`` in pieces that the first byte's count chooses.

    Contract: only ``FrameError`` escapes; the frames returned are exactly what splitting the
    stream at the announced lengths gives (whatever the pieces); nothing is buffered beyond what
    was fed; each frame's sizes respect the limits; each frame's header, decoded as its message
    type, either is refused with ``MalformedMessage`` or decodes to a message.
    """
    if not data:
        return
    ncuts = data[0] % 8
    control, stream = data[1 : 1 + ncuts], data[1 + ncuts :]
    cuts = [0, *_splits(control, len(stream)), len(stream)]
    pieces = [stream[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    whole, whole_error = _decode_all(stream, [stream])
    split, split_error = _decode_all(stream, pieces)
    assert whole_error == split_error, f"pieces {cuts} fail differently from the whole stream"
    if whole_error is None:
        assert whole == split, f"pieces {cuts} decode differently from the whole stream"
    else:
        # A bad frame fails the feed() that reaches it, and the frames completed earlier in
        # that same call are not returned (the connection closes anyway): fed whole, the
        # stream yields a prefix of what it yields in pieces.
        assert split[: len(whole)] == whole, f"pieces {cuts} decode differently from the whole"


def _decode_all(stream: bytes, pieces: list[bytes]) -> tuple[tuple[Any, ...], str | None]:
    decoder = frame.FrameDecoder(FUZZ_LIMITS)
    out: list[Any] = []
    fed = 0
    error: str | None = None
    for piece in pieces:
        fed += len(piece)
        try:
            frames = decoder.feed(piece)
        except frame.FrameError as e:
            error = type(e).__name__
            break
        assert decoder.buffered <= fed, "the decoder buffers more than it was fed"
        for f in frames:
            assert len(f.header) <= FUZZ_LIMITS.max_header
            assert len(f.payload) <= FUZZ_LIMITS.max_payload
            out.append((f.version, int(f.flags), f.type, f.request_id, bytes(f.header),
                        bytes(f.payload)))
            _check_message(f.type, bytes(f.header))
    # Everything returned is a prefix of the stream, frame after frame, as announced.
    offset = 0
    for version, flags, type_, request_id, header, payload in out:
        prefix = frame.encode_frame(version, flags, type_, request_id, header, len(payload))
        expected = prefix + header + payload
        assert stream[offset : offset + len(expected)] == expected, "frame does not match input"
        offset += len(expected)
    return tuple(out), error


def _check_message(type_id: int, header: bytes) -> None:
    try:
        msg = messages.decode(type_id, header)
    except messages.MalformedMessage:
        return
    encoded = messages.encode(msg)
    again = messages.decode(type_id, encoded)
    # Compared as bytes: a float field may hold NaN, which is not equal to itself.
    assert messages.encode(again) == encoded, f"{type(msg).__name__} does not survive a round trip"


def check_message(data: bytes) -> None:
    """The message decoder: the first byte picks a registered type, the rest is its header.

    Contract: only ``MalformedMessage`` escapes (``UnknownMessageType`` for a type no one
    registered, tried with the first byte's top values), and an accepted message round-trips.
    """
    if not data:
        return
    if data[0] >= 250:
        type_id = struct.unpack("!H", data[1:3].rjust(2, b"\0"))[0]
        header = data[3:]
    else:
        type_id = WIRE_TYPES[data[0] % len(WIRE_TYPES)]
        header = data[1:]
    _check_message(type_id, header)


def check_meta_command(data: bytes) -> None:
    """Metadata commands (the Raft log's entries, and what clients send) and results.

    Contract: ``decode_command`` and ``decode_result`` raise only ``ValueError``; what they
    accept re-encodes to something that decodes to the same value.
    """
    try:
        cmd = commands.decode_command(data)
    except ValueError:
        pass
    else:
        encoded = commands.encode_command(cmd)
        assert commands.encode_command(commands.decode_command(encoded)) == encoded
    try:
        result = commands.decode_result(data)
    except ValueError:
        pass
    else:
        encoded = commands.encode_result(result)
        # Compared as bytes: results may carry floats, and NaN is not equal to itself.
        again = commands.decode_result(encoded)
        assert commands.encode_result(again) == encoded, "a result does not survive a round trip"


def check_raft(data: bytes) -> None:
    """Raft messages between peers, and the membership configuration in CONFIG entries.

    Contract: ``decode_message`` and ``Configuration.decode`` raise only ``ValueError``; an
    accepted message or configuration round-trips.
    """
    try:
        msg = raft.decode_message(data)
    except ValueError:
        pass
    else:
        encoded = raft.encode_message(msg)
        assert raft.encode_message(raft.decode_message(encoded)) == encoded
    try:
        config = raft.Configuration.decode(data)
    except ValueError:
        pass
    else:
        assert raft.Configuration.decode(config.encode()) == config


#: Harness name -> what it checks; the corpus of each lives in corpus/NAME/.
TARGETS = {
    "frame": check_frames,
    "message": check_message,
    "meta": check_meta_command,
    "raft": check_raft,
}
