# -*- test-case-name: tests.test_wire_protocol -*-
"""Making DogFS connections: a server factory and a client-side pool keyed by address."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory

from dogfs.wire.frame import FrameLimits
from dogfs.wire.protocol import Connection, ConnectionClosed, Handler, WireError

EndpointMaker = Callable[[str], IStreamClientEndpoint]


def split_address(address: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:port"); ValueError with a clear message otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def tcp_endpoints(reactor: IReactorTCP, timeout: float = 5.0) -> EndpointMaker:
    """Plain TCP client endpoints for "host:port" addresses."""

    def make(address: str) -> IStreamClientEndpoint:
        host, port = split_address(address)
        endpoint: IStreamClientEndpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)  # type: ignore[assignment]
        return endpoint

    return make


class _OneConnection(Factory):
    """Builds the one Connection a pool is dialing; quiet, unlike connectProtocol's factory
    (a daemon retrying an unreachable peer would log two lines per attempt)."""

    noisy = False

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def buildProtocol(self, addr: Any) -> Connection:
        return self.connection


class ConnectionFactory(Factory):
    """Server side: every accepted connection is a `Connection` serving `handlers`."""

    noisy = False  # one log line per accepted connection would drown a busy daemon's log

    def __init__(
        self,
        clock: IReactorTime,
        handlers: Mapping[type, Handler],
        *,
        node_id: str | None = None,
        limits: FrameLimits = FrameLimits(),
        on_connection: Callable[[Connection], None] | None = None,
        on_handshake: Callable[[Connection], None] | None = None,
    ) -> None:
        self.clock = clock
        self.on_handshake = on_handshake
        self.handlers = handlers
        self.node_id = node_id
        self.limits = limits
        self.on_connection = on_connection
        self.connections: set[Connection] = set()

    def buildProtocol(self, addr: Any) -> Connection:
        connection = Connection(self.clock, self.handlers, node_id=self.node_id, limits=self.limits)
        connection.on_handshake = self.on_handshake
        self.connections.add(connection)
        connection.on_close.append(self.connections.discard)
        if self.on_connection is not None:
            self.on_connection(connection)
        return connection


class ConnectionPool:
    """Client side: one open connection per address, made on first use and remade after loss."""

    def __init__(
        self,
        clock: IReactorTime,
        endpoints: EndpointMaker,
        *,
        handlers: Mapping[type, Handler] | None = None,
        node_id: str | None = None,
        limits: FrameLimits = FrameLimits(),
        handshake_timeout: float = 10.0,
    ) -> None:
        self.clock = clock
        self.endpoints = endpoints
        # A peer that accepts TCP but never says Hello (SIGSTOPped, wedged) must not hold a
        # caller for longer than this.
        self.handshake_timeout = handshake_timeout
        self.handlers = handlers or {}
        self.node_id = node_id
        self.limits = limits
        self._open: dict[str, Connection] = {}
        self._connecting: dict[str, list[defer.Deferred[Connection]]] = {}

    def get(self, address: str) -> defer.Deferred[Connection]:
        """An open, version-negotiated connection to `address`."""
        connection = self._open.get(address)
        if connection is not None and connection.is_open:
            return defer.succeed(connection)
        waiter: defer.Deferred[Connection] = defer.Deferred()
        waiters = self._connecting.get(address)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._connecting[address] = [waiter]
        self._connect(address)
        return waiter

    def _connect(self, address: str) -> None:
        connection = Connection(self.clock, self.handlers, node_id=self.node_id, limits=self.limits)
        try:
            endpoint = self.endpoints(address)
        except ValueError as e:
            self._finish(address, failure=WireError("bad_address", str(e)))
            return
        d = endpoint.connect(_OneConnection(connection))
        d.addCallback(lambda _: connection.ready)
        d.addTimeout(self.handshake_timeout, self.clock)

        def connected(_: object) -> None:
            self._open[address] = connection
            connection.on_close.append(lambda c: self._forget(address, c))
            self._finish(address, connection=connection)

        def failed(failure: Any) -> None:
            error = failure.value
            if failure.check(defer.TimeoutError):
                if connection.transport is not None:
                    connection.transport.abortConnection()
                error = ConnectionClosed(
                    f"{address} did not complete the DogFS handshake within {self.handshake_timeout:g}s"
                )
                error.code = "unreachable"
            elif not isinstance(error, WireError):
                error = ConnectionClosed(f"cannot connect to {address}: {failure.getErrorMessage()}")
                error.code = "unreachable"
            self._finish(address, failure=error)

        d.addCallbacks(connected, failed)

    def _finish(
        self, address: str, connection: Connection | None = None, failure: Exception | None = None
    ) -> None:
        for waiter in self._connecting.pop(address, []):
            if connection is not None:
                waiter.callback(connection)
            else:
                waiter.errback(failure)

    def _forget(self, address: str, connection: Connection) -> None:
        if self._open.get(address) is connection:
            del self._open[address]

    def drop(self, address: str) -> None:
        """Close the connection to `address`, if any (a peer that misbehaved or timed out)."""
        connection = self._open.pop(address, None)
        if connection is not None:
            connection.close()

    def close_all(self) -> defer.Deferred[None]:
        """Close every connection; fires when all are closed."""
        closing = []
        for connection in list(self._open.values()):
            if connection.is_open:
                closing.append(connection.closed)
                connection.close()
        self._open.clear()
        return defer.gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)
