# -*- test-case-name: tests.test_chunk_process -*-
"""twistd dogfs-chunk: the chunk server's options and service maker.

This module (with dogfs.plugins.meta and dogfs.plugins.cli) is the only place that touches the
global reactor: it hands it to `ChunkService`. `makeService` only reads the config file; everything that does
I/O (the shard store, threads, listening) starts in `startService`, after twistd forks.
"""

from __future__ import annotations

import sys

from twisted.application.service import MultiService
from twisted.python import usage

from dogfs.config import ChunkConfig, ConfigError, load_chunk

#: This plugin honours a config's [tls] table: mutual TLS on its listener and its connections
#: to the metadata, authorization by role (see docs/security.md). `dogfs cluster up` reads it.
SERVES_TLS = True


class Options(usage.Options):
    """Command-line options of `twistd dogfs-chunk`."""

    synopsis = "[options]"
    longdesc = (
        "Run a DogFS chunk server: it stores erasure-coded shards under the data_dir of its "
        "config file, serves them to clients over the DogFS wire protocol on `listen`, and "
        "sends heartbeats and shard reports to the metadata nodes listed in `meta`. "
        "Example: twistd -n dogfs-chunk --config etc/chunk.toml"
    )
    optParameters = [
        ["config", "c", "etc/chunk.toml", "The chunk server's TOML config file ([chunk] table)."],
    ]


def load_config(options: Options) -> ChunkConfig:
    """The config named by `options`; usage.UsageError (one sentence) if it is bad."""
    try:
        return load_chunk(options["config"])
    except ConfigError as e:
        raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> MultiService:
    """Build the chunk server's service tree from its config (no I/O but reading the file).

    A bad config file ends twistd with one sentence on stderr and exit status 2.
    """
    try:
        config = load_config(options)
    except usage.UsageError as e:
        # Raised here, twistd would print a traceback: say it in one sentence instead.
        print(f"dogfs-chunk: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    from twisted.internet import reactor

    from dogfs.chunk.service import ChunkService
    from dogfs.plugins.common import GCTuning, stop_failed

    try:
        service = ChunkService(reactor, config, on_fatal=lambda: stop_failed(reactor), direct_io=config.direct_io)
    except Exception as e:
        # The [tls] files are read here: a bad one ends twistd with one sentence too.
        print(f"dogfs-chunk: {options['config']}: [tls] files are not usable: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    GCTuning(reactor).setServiceParent(service)
    return service
