# -*- test-case-name: tests.test_meta_process -*-
"""twistd dogfs-meta: a DogFS metadata node.

Only this module (and its sibling for the chunk server) touches the global reactor; it
builds the service tree and does no I/O besides reading the config file, because twistd
forks after makeService.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from dogfs.config import ConfigError, load_meta


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
    from dogfs.plugins.common import server_endpoint
    from dogfs.wire.pool import ConnectionFactory

    config = options["parsed"]

    def listen(handlers: Any) -> Any:
        factory = ConnectionFactory(reactor, handlers.handlers(), node_id=config.id)
        return server_endpoint(reactor, config.listen, config.tls).listen(factory)

    def make_log(state: Any) -> Any:
        # Several peers: the namespace lives behind Raft; peers are dialled like any node.
        from dogfs.meta.raftlog import build_raft_log
        from dogfs.plugins.common import client_endpoints

        return build_raft_log(reactor, config, state, client_endpoints(reactor, config.tls))

    from dogfs.meta.raftlog import raft_mode

    return MetaService(
        reactor, config, listen=listen, make_log=make_log if raft_mode(config) else None
    )
