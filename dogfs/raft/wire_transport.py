# -*- test-case-name: tests.test_meta_raft -*-
"""Raft peers over DogFS connections.

Owns ``WireRaftTransport``: each member dials every peer it sends to (one pooled DogFS
connection per peer) and sends its Raft messages as one-way ``RaftEnvelope`` frames; what
peers send arrives on the member's own listening port, through ``handle_envelope``, and goes to
the driver. It remembers when each peer was last heard from (for status and for "no quorum"
answers). Messages are dropped, never queued without bound: while a connection is being made
a few wait, and a peer whose socket buffer is full (stopped, partitioned) loses them; Raft
retransmits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dogfs.raft.core import Message
from dogfs.raft.transport import FramedRaftTransport, Receiver
from dogfs.wire import messages as m
from dogfs.wire.pool import ConnectionPool, EndpointMaker
from dogfs.wire.protocol import Connection, Request

__all__ = ["WireRaftTransport"]

log = Logger()

#: Messages kept per peer while its connection is being made.
MAX_WAITING = 512


def _no_delay(conn: Connection) -> None:
    """Turn Nagle's algorithm off: Raft sends small messages back to back, and Nagle would
    hold each until the previous one is acknowledged (tens of ms with delayed ACKs)."""
    transport = getattr(conn, "transport", None)
    for layer in (getattr(transport, "transport", None), transport):
        set_no_delay = getattr(layer, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass
            return


class WireRaftTransport(FramedRaftTransport):
    """``IRaftTransport`` for group ``group`` over DogFS connections.

    ``address_of(peer_id)`` names where a peer listens (None: unknown, the message is dropped).
    ``retry_after`` seconds must pass after a failed dial before the peer is dialled again.
    ``is_member(node_id)`` says whether an authenticated sender belongs to the group: any
    daemon holds a ``node`` certificate, and a chunk server's must not let it vote, append or
    depose a leader (default: whoever ``address_of`` knows).
    """

    def __init__(
        self,
        clock: IReactorTime,
        endpoints: EndpointMaker,
        *,
        node_id: str,
        address_of: Callable[[str], str | None],
        group: str = "meta",
        retry_after: float = 0.2,
        is_member: Callable[[str], bool] | None = None,
    ) -> None:
        super().__init__(self._send_bytes)
        self.clock: Any = clock
        self.node_id = node_id
        self.group = group
        self.address_of = address_of
        self.is_member = is_member or (lambda node_id: address_of(node_id) is not None)
        #: Authenticated senders outside the group whose messages were dropped (each logged once).
        self.outsiders: set[str] = set()
        self.retry_after = retry_after
        self.pool = ConnectionPool(clock, endpoints, node_id=node_id)
        self._waiting: dict[str, list[bytes]] = {}
        self._failed_at: dict[str, float] = {}
        self._blocked: set[Connection] = set()
        self._contact: dict[str, float] = {}
        #: Counters for status pages and tests.
        self.sent = 0
        self.dropped = 0
        self.received = 0

    # --- receiving -----------------------------------------------------------------------

    def start(self, receive: Receiver) -> None:
        """Attach the driver, noting each sender's contact time on the way."""

        def noted(message: Message) -> None:
            self._contact[message.src] = self.clock.seconds()
            self.received += 1
            receive(message)

        super().start(noted)

    def handle_envelope(self, request: Request) -> None:
        """The wire handler for ``RaftEnvelope``: hand the bytes to the driver.

        Over TLS the connection's identity is a node certificate in the sender's name: a
        message claiming another member as its source is dropped (one node's key must not
        let it vote or append as another), and so is one from a node outside the group (a
        chunk server's key must not let it take part at all).
        """
        msg: m.RaftEnvelope = request.msg
        if msg.group != self.group:
            return
        identity = getattr(request.connection, "identity", None)
        sender = None if identity is None else identity.name
        if sender is not None and not self.is_member(sender):
            self.dropped += 1
            if sender not in self.outsiders:
                self.outsiders.add(sender)
                log.warn(
                    "Raft: dropping messages from {sender!r}: not a member of the {group} group "
                    "(if it is a metadata node that was added, list it in [raft] peers)",
                    sender=sender, group=self.group,
                )
            return
        self.deliver(bytes(request.payload), sender=sender)

    def last_contact(self, peer_id: str) -> float | None:
        """Clock time of the last message from ``peer_id`` (None: never)."""
        return self._contact.get(peer_id)

    # --- sending -------------------------------------------------------------------------

    def _send_bytes(self, peer_id: str, payload: bytes) -> None:
        address = self.address_of(peer_id)
        if address is None or peer_id == self.node_id:
            self.dropped += 1
            return
        waiting = self._waiting.get(address)
        if waiting is not None:
            if len(waiting) < MAX_WAITING:
                waiting.append(payload)
            else:
                self.dropped += 1
            return
        failed_at = self._failed_at.get(address)
        if failed_at is not None and self.clock.seconds() - failed_at < self.retry_after:
            # A dial failed a moment ago (the peer is down): do not redial on every heartbeat.
            self.dropped += 1
            return
        d = self.pool.get(address)
        if d.called:
            connection: list[Connection] = []
            d.addCallbacks(connection.append, lambda f: None)
            if connection:
                self._write(address, connection[0], payload)
                return
            self.dropped += 1
            return
        self._waiting[address] = [payload]

        def connected(conn: Connection) -> None:
            _no_delay(conn)
            self._failed_at.pop(address, None)
            queued = self._waiting.pop(address, [])
            for item in queued:
                self._write(address, conn, item)

        def failed(_: Any) -> None:
            self._failed_at[address] = self.clock.seconds()
            self.dropped += len(self._waiting.pop(address, []))

        d.addCallbacks(connected, failed)

    def _write(self, address: str, conn: Connection, payload: bytes) -> None:
        if conn in self._blocked:
            self.dropped += 1
            return
        writable = conn.wait_writable()
        if not writable.called:
            # The peer does not read (stopped, or far behind): drop until its buffer drains.
            self._blocked.add(conn)
            writable.addBoth(lambda _: self._blocked.discard(conn))
            conn.on_close.append(self._blocked.discard)
            self.dropped += 1
            return
        writable.addErrback(lambda f: None)
        conn.send_oneway(m.RaftEnvelope(self.group), payload)
        self.sent += 1

    def stop(self) -> None:
        """Stop delivering and close every peer connection."""
        super().stop()
        self._waiting.clear()
        self.pool.close_all()
