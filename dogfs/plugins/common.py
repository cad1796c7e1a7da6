# -*- test-case-name: tests.test_meta_process -*-
"""Endpoints for the daemons, in one place: plaintext now, TLS when the config has [tls].

Every listen address is a Twisted endpoint string and every peer a "host:port"; this module
turns them into endpoints so the daemons never build sockets themselves.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import endpoints
from twisted.internet.interfaces import IStreamServerEndpoint

from dogfs.wire.pool import EndpointMaker, tcp_endpoints


def server_endpoint(reactor: Any, listen: str, tls: Any = None) -> IStreamServerEndpoint:
    """The endpoint a daemon listens on for the DogFS protocol."""
    endpoint: IStreamServerEndpoint = endpoints.serverFromString(reactor, listen)
    return endpoint


def client_endpoints(reactor: Any, tls: Any = None, timeout: float = 5.0) -> EndpointMaker:
    """How a daemon or client dials "host:port" peers."""
    return tcp_endpoints(reactor, timeout=timeout)
