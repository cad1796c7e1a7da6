# -*- test-case-name: tests.test_wire_packing -*-
"""`packb`: msgpack's packb without a new Packer on every call.

``msgpack.packb`` builds a ``Packer`` (and its buffer) for each call and throws it away: for
the small headers, commands and records DogFS packs on every request, that was about 60% of
the call (320 of 540 ns for a frame header, msgpack 1.1 here). Every metadata write packs a
dozen of them across the client, the leader and the followers.
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack

__all__ = ["packb"]

_local = threading.local()


def packb(obj: Any) -> bytes:
    """``msgpack.packb(obj, use_bin_type=True)``, through this thread's own Packer.

    A Packer is not thread-safe (storage records are packed on worker threads, messages on
    the reactor's), hence one per thread. A pack that fails (an object msgpack cannot encode)
    leaves the Packer empty, as msgpack resets it, so the next call starts clean.
    """
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)  # type: ignore[no-any-return]
