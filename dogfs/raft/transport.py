# -*- test-case-name: tests.test_raft_driver -*-
"""How Raft messages travel between the members of a group.

Owns the ``IRaftTransport`` contract the driver talks to, an in-memory network for tests and
simulations on one clock, and ``FramedRaftTransport``, which turns messages into opaque payloads
(``encode_message``) for whatever carries bytes between daemons (the DogFS wire protocol, or the
benchmark's own framing). May import ``dogfs.raft.core`` only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from dogfs.raft.core import Message, decode_message, encode_message

__all__ = [
    "FramedRaftTransport",
    "IRaftTransport",
    "MemoryRaftNetwork",
    "MemoryRaftTransport",
]

_log = Logger()

Receiver = Callable[[Message], None]


class IRaftTransport(Interface):
    """Best-effort delivery of Raft messages to peers (Raft tolerates loss and reordering)."""

    def start(receive: Receiver) -> None:
        """Begin delivering messages addressed to this member to ``receive``."""

    def send(message: Message) -> None:
        """Send ``message`` to ``message.dst``; never blocks, may silently drop."""

    def stop() -> None:  # type: ignore[misc]
        """Stop delivering; later sends are dropped."""


@implementer(IRaftTransport)
class MemoryRaftTransport:
    """One member's endpoint on a ``MemoryRaftNetwork``."""

    def __init__(self, network: MemoryRaftNetwork, node_id: str) -> None:
        self._network = network
        self.node_id = node_id
        self.receiver: Receiver | None = None
        #: Messages this endpoint sent, in order (for tests).
        self.sent: list[Message] = []

    def start(self, receive: Receiver) -> None:
        """Attach the driver's receive callback."""
        self.receiver = receive

    def send(self, message: Message) -> None:
        """Hand ``message`` to the network."""
        if self.receiver is None:
            return
        self.sent.append(message)
        self._network.route(self.node_id, message)

    def stop(self) -> None:
        """Detach: the network drops messages to and from this member."""
        self.receiver = None


class MemoryRaftNetwork:
    """An in-process network on an injected clock, with partitions.

    Each message is encoded and decoded (so the codec is exercised) and delivered ``latency``
    seconds later through ``clock.callLater``, never synchronously: a driver is never re-entered
    from its own send.
    """

    def __init__(self, clock: IReactorTime, latency: float = 0.0, *, encode: bool = True) -> None:
        self._clock: Any = clock
        self._latency = latency
        self._encode = encode
        self._endpoints: dict[str, MemoryRaftTransport] = {}
        self._cut: set[frozenset[str]] = set()
        #: Number of messages delivered and dropped.
        self.delivered = 0
        self.dropped = 0

    def transport(self, node_id: str) -> MemoryRaftTransport:
        """The endpoint of ``node_id`` (created on first use, reused after a restart)."""
        endpoint = self._endpoints.get(node_id)
        if endpoint is None:
            endpoint = self._endpoints[node_id] = MemoryRaftTransport(self, node_id)
        return endpoint

    def cut(self, a: str, b: str) -> None:
        """Drop every message between ``a`` and ``b``, both ways."""
        self._cut.add(frozenset((a, b)))

    def isolate(self, node_id: str) -> None:
        """Cut ``node_id`` from every other member."""
        for other in self._endpoints:
            if other != node_id:
                self.cut(node_id, other)

    def heal(self) -> None:
        """Remove every cut."""
        self._cut.clear()

    def route(self, src: str, message: Message) -> None:
        """Schedule delivery of ``message`` from ``src``."""
        dst = message.dst
        if frozenset((src, dst)) in self._cut:
            self.dropped += 1
            return
        payload: Message | bytes = encode_message(message) if self._encode else message
        self._clock.callLater(self._latency, self._deliver, src, dst, payload)

    def _deliver(self, src: str, dst: str, payload: Message | bytes) -> None:
        endpoint = self._endpoints.get(dst)
        # A cut made while the message was in flight drops it too.
        if endpoint is None or endpoint.receiver is None or frozenset((src, dst)) in self._cut:
            self.dropped += 1
            return
        message = decode_message(payload) if isinstance(payload, bytes) else payload
        self.delivered += 1
        endpoint.receiver(message)


@implementer(IRaftTransport)
class FramedRaftTransport:
    """``IRaftTransport`` over any byte carrier.

    ``send_bytes(peer_id, payload)`` must deliver ``payload`` (best effort) to the peer's
    ``deliver``; the carrier does its own framing and connection management. Malformed payloads
    are logged and dropped, never raised into the carrier.
    """

    def __init__(self, send_bytes: Callable[[str, bytes], None]) -> None:
        self._send_bytes = send_bytes
        self._receiver: Receiver | None = None
        #: Messages dropped for claiming a source other than their sender's identity.
        self.forged = 0

    def start(self, receive: Receiver) -> None:
        """Attach the driver's receive callback."""
        self._receiver = receive

    def send(self, message: Message) -> None:
        """Encode ``message`` and hand it to the carrier."""
        if self._receiver is None:
            return
        try:
            self._send_bytes(message.dst, encode_message(message))
        except Exception:
            _log.failure("Raft: sending to {dst} failed", dst=message.dst)

    def deliver(self, payload: bytes, sender: str | None = None) -> None:
        """Entry point for bytes that arrived from a peer (``sender``: who the connection is
        authenticated as, if anyone; a message from another source is dropped)."""
        if self._receiver is None:
            return
        try:
            message = decode_message(payload)
        except ValueError as e:
            _log.warn("Raft: dropping a malformed message ({why})", why=str(e))
            return
        if sender is not None and message.src != sender:
            self.forged += 1
            if self.forged <= 3 or self.forged % 1000 == 0:
                _log.warn("Raft: dropping a message from {sender!r} claiming to come from {src!r} ({n} so far)",
                          sender=sender, src=message.src, n=self.forged)
            return
        self._receiver(message)

    def stop(self) -> None:
        """Detach: later sends and deliveries are dropped."""
        self._receiver = None
