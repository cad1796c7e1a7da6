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


#: Idle leased connections kept per address for the next lease; more are closed on return.
MAX_IDLE_LEASES = 32


class ConnectionPool:
    """Client side: connections by address, made on first use and remade after loss.

    `get` shares one connection per address among all callers: requests are multiplexed on
    it. `lease` lends a connection to one caller alone until `give_back`: a streamed read
    that stops reading its socket (flow control towards a slow consumer) must not stall
    anyone else's requests to the same server, as it would on a shared connection. Returned
    leases are kept for reuse (TCP and TLS set-up is paid once), up to `MAX_IDLE_LEASES` per
    address.
    """

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
        self._idle: dict[str, list[Connection]] = {}
        self._leased: set[Connection] = set()

    def open_connection(self, address: str) -> Connection | None:
        """The shared connection to `address` if it is open now, else None (see `get`)."""
        connection = self._open.get(address)
        return connection if connection is not None and connection.is_open else None

    def get(self, address: str) -> defer.Deferred[Connection]:
        """An open, version-negotiated connection to `address`, shared with other callers."""
        connection = self._open.get(address)
        if connection is not None and connection.is_open:
            return defer.succeed(connection)
        waiter: defer.Deferred[Connection] = defer.Deferred()
        waiters = self._connecting.get(address)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._connecting[address] = [waiter]

        def connected(connection: Connection) -> None:
            self._open[address] = connection
            connection.on_close.append(lambda c: self._forget(address, c))
            self._finish(address, connection=connection)

        self._dial(address).addCallbacks(connected, lambda f: self._finish(address, failure=f.value))
        return waiter

    def lease(self, address: str) -> defer.Deferred[Connection]:
        """An open connection to `address` for the caller alone, until `give_back`."""
        idle = self._idle.get(address, [])
        while idle:
            connection = idle.pop()
            if connection.is_open:
                self._leased.add(connection)
                return defer.succeed(connection)

        def leased(connection: Connection) -> Connection:
            self._leased.add(connection)
            connection.on_close.append(self._leased.discard)
            connection.on_close.append(lambda c: self._forget_idle(address, c))
            return connection

        return self._dial(address).addCallback(leased)

    def give_back(self, address: str, connection: Connection) -> None:
        """End a lease of a connection whose requests are all complete: it is kept for the
        next lease if still open (and there is room), else closed."""
        self._leased.discard(connection)
        if not connection.is_open:
            return
        idle = self._idle.setdefault(address, [])
        if len(idle) < MAX_IDLE_LEASES:
            idle.append(connection)
        else:
            connection.close()

    def _forget_idle(self, address: str, connection: Connection) -> None:
        idle = self._idle.get(address)
        if idle is not None and connection in idle:
            idle.remove(connection)

    def _dial(self, address: str) -> defer.Deferred[Connection]:
        """Connect to `address` and negotiate the protocol version, within the handshake
        timeout; fails with a WireError (``unreachable`` when no connection was made)."""
        connection = Connection(self.clock, self.handlers, node_id=self.node_id, limits=self.limits)
        try:
            endpoint = self.endpoints(address)
        except ValueError as e:
            return defer.fail(WireError("bad_address", str(e)))
        d: defer.Deferred[Any] = endpoint.connect(_OneConnection(connection))
        d.addCallback(lambda _: connection.ready)
        d.addTimeout(self.handshake_timeout, self.clock)

        def failed(failure: Any) -> Any:
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
            raise error

        d.addCallback(lambda _: connection)
        d.addErrback(failed)
        return d

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
        """Close the shared connection to `address`, if any (a peer that misbehaved or timed
        out); leases are their holders' to close."""
        connection = self._open.pop(address, None)
        if connection is not None:
            connection.close()

    def close_all(self) -> defer.Deferred[None]:
        """Close every connection, shared, idle or leased; fires when all are closed."""
        closing = []
        idle = [c for connections in self._idle.values() for c in connections]
        for connection in [*self._open.values(), *idle, *self._leased]:
            if connection.is_open:
                closing.append(connection.closed)
                connection.close()
        self._open.clear()
        self._idle.clear()
        self._leased.clear()
        return defer.gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)
