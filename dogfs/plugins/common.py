# -*- test-case-name: tests.test_security_plugins -*-
"""Endpoints for the daemons, in one place: mutual TLS when the config has [tls], else plaintext.

Every listen address is a Twisted endpoint string and every peer a "host:port"; this module
turns them into endpoints so the daemons never build sockets themselves. With a ``[tls]``
table the listener requires a client certificate from the cluster CA (``ServerTLS``) and the
outgoing connections present the daemon's own certificate (``ClientTLS``); without one, the
daemon says at every start that it runs in plaintext.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger

from dogfs.config import TLSFiles
from dogfs.security.tls import (
    ClientTLS,
    RevocationSet,
    ServerTLS,
    TLSConfig,
    endpoint_maker,
)
from dogfs.security.tls import server_endpoint as _tls_server_endpoint
from dogfs.wire.pool import EndpointMaker

log = Logger()

__all__ = [
    "GC_THRESHOLD",
    "GCTuning",
    "client_endpoints",
    "client_tls",
    "server_endpoint",
    "server_tls",
    "tls_config",
    "warn_plaintext",
]

#: The cyclic garbage collector's thresholds in a daemon: the first generation is collected
#: every 10,000 allocations net instead of 700.
GC_THRESHOLD = (10_000, 10, 10)


class GCTuning(Service):
    """Keeps the cyclic garbage collector's pauses out of a daemon's request latency.

    A full collection walks every tracked object; on a metadata leader under load it took
    about 25 ms, several times in 5 seconds (requests in flight meanwhile wait: that was
    the p99 of metadata writes in ``bench/meta.py``). When the daemon starts, the first
    generation is set to be collected less often, so that fewer short-lived objects (a
    request's, while it waits for its commit) are promoted and full collections come more
    rarely; once the reactor runs, what start-up made (modules, classes, configuration:
    long-lived) is moved out of the collector's sight (``gc.freeze``). Refcounting still
    frees at once what is not in a cycle. A service, so that building a daemon's tree (as
    tests do) changes nothing in the process: only starting it does.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def startService(self) -> None:
        import gc

        super().startService()
        gc.set_threshold(*GC_THRESHOLD)

        def freeze() -> None:
            gc.collect()
            gc.freeze()

        self.reactor.callWhenRunning(freeze)


def tls_config(tls: TLSFiles | TLSConfig) -> TLSConfig:
    """The security library's view of a config's ``[tls]`` files."""
    if isinstance(tls, TLSConfig):
        return tls
    return TLSConfig(ca_cert=tls.ca, cert=tls.cert, key=tls.key, sealed=tls.sealed)


def server_tls(tls: TLSFiles | None, revocations: RevocationSet | None = None) -> ServerTLS | None:
    """The server side of TLS for a daemon's ``[tls]`` files, or None for plaintext.

    Raises (OSError, ValueError, OpenSSL errors) when the files are missing or do not belong
    together: a daemon must not start without the TLS it was configured for.
    """
    if tls is None:
        return None
    return ServerTLS(tls_config(tls), revocations=revocations)


def client_tls(
    tls: TLSFiles | TLSConfig | ClientTLS | None, revocations: RevocationSet | None = None
) -> ClientTLS | None:
    """The client side of TLS (our certificate, the cluster CA), or None for plaintext; with
    a daemon's ``revocations``, servers whose certificate they revoke are refused too."""
    if tls is None or isinstance(tls, ClientTLS):
        return tls
    return ClientTLS(tls_config(tls), revocations)


def server_endpoint(
    reactor: Any, listen: str, tls: ServerTLS | TLSFiles | None = None
) -> IStreamServerEndpoint:
    """The endpoint a daemon listens on for the DogFS protocol.

    Pass the daemon's ``ServerTLS`` (so that revocation and SIGHUP reloads reach it), or its
    ``TLSFiles`` (a fresh ServerTLS is made), or None for plaintext.
    """
    server = tls if isinstance(tls, ServerTLS) or tls is None else server_tls(tls)
    return _tls_server_endpoint(reactor, listen, server)


def client_endpoints(
    reactor: Any, tls: TLSFiles | TLSConfig | ClientTLS | None = None, timeout: float = 5.0
) -> EndpointMaker:
    """How a daemon or client dials "host:port" peers: TLS with our certificate when given."""
    return endpoint_maker(reactor, client_tls(tls), timeout=timeout)


def warn_plaintext(what: str, address: str, tls: object) -> None:
    """Log, at every start of a daemon without ``[tls]``, what that exposes."""
    if tls is None:
        log.warn(
            "plaintext: anyone who can reach {address} can read and change data ({what} runs "
            "without a [tls] table: no authentication, no encryption)",
            address=address,
            what=what,
        )


def stop_failed(reactor: object) -> None:
    """A daemon cannot go on (the reason is logged already): stop, and exit with status 1.

    twistd exits 0 whenever its reactor stops; the only hook left after it has removed its
    pid file is atexit, where `os._exit` sets the status a supervisor sees.
    """
    atexit.register(_exit_failed)
    if getattr(reactor, "running", False):
        reactor.stop()  # type: ignore[attr-defined]
    else:  # twistd starts services just before it runs the reactor
        reactor.callWhenRunning(reactor.stop)  # type: ignore[attr-defined]


def _exit_failed() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
