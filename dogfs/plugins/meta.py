# -*- test-case-name: tests.test_meta_process -*-
"""twistd dogfs-meta: a DogFS metadata node.

Only this module (with its siblings for the chunk server and the CLI) touches the global reactor; it
builds the service tree and does no I/O besides reading the config file, because twistd
forks after makeService.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from dogfs.config import ConfigError, load_meta

#: This plugin honours a config's [tls] table: mutual TLS on its listener and its outgoing
#: connections, authorization by role (see docs/security.md). `dogfs cluster up` reads this.
SERVES_TLS = True


# The metadata node serves the dashboard, feed, /metrics and /healthz on [meta] http.
SERVES_DASHBOARD = True


class Options(usage.Options):
    """Command-line options of `twistd dogfs-meta`."""

    synopsis = "[--config FILE]"
    longdesc = (
        "Run a DogFS metadata node: the namespace, block placement, the chunk-server "
        "registry and (with peers configured) a member of the metadata Raft group. "
        "Everything else, listen addresses, data directory, peers, TLS, is in the config "
        "file; see etc/meta.toml for every key with its default."
    )
    optParameters = [["config", "c", "etc/meta.toml", "The node's TOML configuration file."]]

    def postOptions(self) -> None:
        try:
            self["parsed"] = load_meta(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    """The service tree of one metadata node."""
    from twisted.internet import reactor

    from dogfs.meta.service import MetaService
    from dogfs.plugins.common import GCTuning, server_endpoint
    from dogfs.security.daemon import DaemonSecurity, secure_meta_handlers
    from dogfs.wire.pool import ConnectionFactory

    config = options["parsed"]
    service: Any = None
    try:
        # TLS: reads the certificate files now, so a bad [tls] stops the start with a sentence.
        security = DaemonSecurity(
            reactor, config.tls, config.id, config.address,
            source=lambda: service.state.revocations(),
        )
    except Exception as e:
        # Raised here, twistd would print a traceback: say it in one sentence instead.
        print(f"dogfs-meta: {options['config']}: [tls] files are not usable: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    def listen(handlers: Any) -> Any:
        factory = ConnectionFactory(
            reactor, secure_meta_handlers(handlers, security), node_id=config.id,
            on_handshake=security.on_handshake,
        )
        return server_endpoint(reactor, config.listen, security.server).listen(factory)

    def make_log(state: Any) -> Any:
        # Several peers: the namespace lives behind Raft; peers are dialled like any node.
        from dogfs.meta.raftlog import build_raft_log
        from dogfs.plugins.common import client_endpoints

        return build_raft_log(reactor, config, state, client_endpoints(reactor, security.client))

    from dogfs.meta.raftlog import raft_mode
    from dogfs.plugins.common import client_endpoints, stop_failed

    service = MetaService(
        reactor,
        config,
        listen=listen,
        make_log=make_log if raft_mode(config) else None,
        on_fatal=lambda: stop_failed(reactor),
        dial=client_endpoints(reactor, security.client),
    )
    security.setServiceParent(service)
    GCTuning(reactor).setServiceParent(service)
    return service
