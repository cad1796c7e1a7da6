# -*- test-case-name: tests.test_config -*-
"""The TOML configuration files of the daemons and the client.

`etc/meta.toml`, `etc/chunk.toml` and `client.toml` are contracts with operators: every key
is read here, with its default, and a bad file is refused with one sentence naming the file
and the key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from typing import Any

from attrs import field, frozen

DEFAULT_HOME_ENV = "DOGFS_HOME"


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or has a bad value."""


@frozen
class TLSFiles:
    """Paths of the cluster CA certificate and this party's certificate and key."""

    ca: str
    cert: str
    key: str
    # After a TLS 1.3 handshake, carry the bytes in sealed frames (dogfs.security.sealed)
    # when the peer agrees; false keeps every byte in TLS records.
    sealed: bool = True


@frozen
class MetaConfig:
    """A metadata node's configuration (`[meta]`, `[raft]`, `[tls]`)."""

    id: str
    listen: str  # Twisted endpoint string of the binary protocol
    address: str  # host:port others dial
    data_dir: str
    http: str = ""  # endpoint string of the dashboard/metrics; empty disables
    http_address: str = ""
    default_ec: str = "RS-4-2"
    block_size: int = 64 << 20  # bytes of each shard of a block group
    cell_size: int = 1 << 20
    chunk_dead_after: float = 10.0
    allocation_ttl: float = 3600.0
    repair_after: float = 600.0  # a chunk server dead this long has its shards rebuilt elsewhere
    repair_interval: float = 10.0  # how often the leader plans repairs and moves
    repair_concurrency: int = 4  # shards rebuilt or moved at once over the cluster
    balance: bool = True  # move shards from the fullest chunk servers to the emptiest
    balance_threshold: float = 0.10  # balanced: every server within this of the average utilization
    peers: Mapping[str, str] = field(factory=dict)  # Raft members: id -> address (self included)
    http_peers: Mapping[str, str] = field(factory=dict)  # members' dashboards: id -> host:port
    tick_interval: float = 0.05
    election_ticks: int = 10
    log_format: str = "text"
    tls: TLSFiles | None = None


@frozen
class ChunkConfig:
    """A chunk server's configuration (`[chunk]`, `[tls]`)."""

    id: str
    listen: str
    address: str
    data_dir: str
    meta: tuple[str, ...]  # metadata node addresses
    heartbeat_interval: float = 1.0
    report_interval: float = 30.0
    gc_grace: float = 600.0  # an unreferenced shard is kept this long after it is first named so, and until its file is this old
    capacity_bytes: int = 0  # 0: the filesystem's size
    domain: str = ""
    log_format: str = "text"
    tls: TLSFiles | None = None
    direct_io: bool | None = None  # write (and stream) shards with O_DIRECT; None: where the disk allows it
    scrub_interval: float = 604800.0  # seconds from the start of one scrub pass over every shard to the next
    scrub_rate: int = 4 << 20  # bytes per second the scrubber reads at most; 0: no scrubbing


@frozen
class ClientConfig:
    """The client's configuration (`client.toml`)."""

    meta: tuple[str, ...]
    timeout: float = 30.0
    tls: TLSFiles | None = None
    source: str = ""  # the file it was read from, for messages


def default_home() -> str:
    """`$DOGFS_HOME`, else `~/.dogfs`."""
    return os.environ.get(DEFAULT_HOME_ENV) or os.path.expanduser("~/.dogfs")


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"configuration file {path} is not valid TOML: {e}") from None


class _Section:
    """Typed access to one table of a config file, with errors naming file and key."""

    def __init__(self, path: str, name: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        self.path, self.name, self.table = path, name, table
        self.known: set[str] = set()

    def _fail(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: [{self.name}] {key} {what}")

    def done(self) -> None:
        """Refuse keys no one asked for: a misspelt setting would otherwise be ignored
        without a word, and its default used."""
        unknown = sorted(set(self.table) - self.known)
        if unknown:
            raise ConfigError(
                f"{self.path}: [{self.name}] has no setting {unknown[0]!r}"
                f" (known: {', '.join(sorted(self.known))})"
            )

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.known.add(key)
        if key not in self.table:
            if default is ...:
                raise self._fail(key, "is required")
            return default
        value = self.table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self._fail(key, f"must be a {names}, not {value!r}")
        return value

    def positive(self, key: str, kind: type, default: Any) -> Any:
        value = self.get(key, kind, default)
        if value <= 0:
            raise self._fail(key, f"must be positive, not {value!r}")
        return value

    def strings(self, key: str, default: Any = ...) -> tuple[str, ...]:
        value = self.get(key, list, default)
        if not all(isinstance(v, str) for v in value):
            raise self._fail(key, "must be a list of strings")
        return tuple(value)


def _tables(path: str, data: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Refuse a table the file's reader does not know (a misspelt [section])."""
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{path}: no table [{unknown[0]}] in this file (known: {', '.join(f'[{t}]' for t in allowed)})"
        )


def _fraction(section: _Section, key: str, default: float) -> float:
    value = float(section.get(key, float, default))
    if not 0 < value < 1:
        raise section._fail(key, f"must be between 0 and 1 (a fraction), not {value!r}")
    return value


def _tls(path: str, data: dict[str, Any]) -> TLSFiles | None:
    if "tls" not in data:
        return None
    section = _Section(path, "tls", data["tls"])
    base = os.path.dirname(os.path.abspath(path))

    def resolve(key: str) -> str:
        return os.path.join(base, section.get(key, str))

    files = TLSFiles(
        ca=resolve("ca"), cert=resolve("cert"), key=resolve("key"), sealed=section.get("sealed", bool, True)
    )
    section.done()
    return files


def _endpoint(section: _Section, key: str, default: Any = ..., tls: TLSFiles | None = None) -> str:
    """A Twisted server endpoint string (`tcp:7000:interface=127.0.0.1`), parsed now: a daemon
    that could not listen on it would otherwise die with a traceback after it started."""
    from twisted.internet.endpoints import serverFromString

    value: str = section.get(key, str, default)
    if not value:
        return value  # the default "" of an optional listener: disabled
    example = "such as 'tcp:7000:interface=127.0.0.1'"
    kind = value.split(":", 1)[0].strip().lower()
    if tls is not None and kind in ("ssl", "tls", "txtorcon"):
        raise section._fail(
            key, f"{value!r} names a TLS endpoint; with [tls] give a plain one {example}"
        )
    if kind in ("ssl", "systemd"):
        # Building these reads key files or inherited sockets: the daemon's, where it runs.
        return value
    try:
        # Builds the endpoint object only: no reactor is touched and nothing listens.
        endpoint = serverFromString(None, value)
    except (ValueError, TypeError, LookupError, OSError) as e:
        raise section._fail(key, f"{value!r} is not an endpoint string {example} ({e})") from None
    port = getattr(endpoint, "_port", None)  # TCP endpoints: bind() would overflow later
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise section._fail(key, f"{value!r} has port {port} outside 0-65535")
    return value


def _policy(section: _Section, key: str, default: str) -> str:
    """An erasure-coding policy name (`RS-4-2`), checked as the metadata will parse it."""
    from dogfs.codec.policy import ECPolicy, UnknownPolicy

    value: str = section.get(key, str, default)
    try:
        ECPolicy.parse(value)
    except UnknownPolicy as e:
        raise section._fail(key, f"is not a policy: {e}") from None
    return value


def _data_dir(path: str, section: _Section) -> str:
    value = section.get("data_dir", str)
    return os.path.join(os.path.dirname(os.path.abspath(path)), value)


def load_meta(path: str) -> MetaConfig:
    """Read a metadata node's config file."""
    data = _read(path)
    s = _Section(path, "meta", data.get("meta", {}))
    raft = _Section(path, "raft", data.get("raft", {}))
    peers = raft.get("peers", dict, {})
    http_peers = raft.get("http_peers", dict, {})
    for name, table in (("peers", peers), ("http_peers", http_peers)):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
            raise ConfigError(f"{path}: [raft] {name} must map node ids to host:port strings")
    log_format = s.get("log_format", str, "text")
    if log_format not in ("text", "json"):
        raise ConfigError(f"{path}: [meta] log_format must be text or json, not {log_format!r}")
    node_id = s.get("id", str)
    address = s.get("address", str)
    tls = _tls(path, data)
    config = MetaConfig(
        id=node_id,
        listen=_endpoint(s, "listen", tls=tls),
        address=address,
        data_dir=_data_dir(path, s),
        http=_endpoint(s, "http", ""),
        http_address=s.get("http_address", str, ""),
        default_ec=_policy(s, "default_ec", "RS-4-2"),
        block_size=s.positive("block_size", int, 64 << 20),
        cell_size=s.positive("cell_size", int, 1 << 20),
        chunk_dead_after=s.positive("chunk_dead_after", float, 10.0),
        allocation_ttl=s.positive("allocation_ttl", float, 3600.0),
        repair_after=s.positive("repair_after", float, 600.0),
        repair_interval=s.positive("repair_interval", float, 10.0),
        repair_concurrency=s.positive("repair_concurrency", int, 4),
        balance=s.get("balance", bool, True),
        balance_threshold=_fraction(s, "balance_threshold", 0.10),
        peers=peers or {node_id: address},
        http_peers=http_peers,
        tick_interval=raft.positive("tick_interval", float, 0.05),
        election_ticks=raft.positive("election_ticks", int, 10),
        log_format=log_format,
        tls=tls,
    )
    s.done()
    raft.done()
    _tables(path, data, ("meta", "raft", "tls"))
    return config


def load_chunk(path: str) -> ChunkConfig:
    """Read a chunk server's config file."""
    data = _read(path)
    s = _Section(path, "chunk", data.get("chunk", {}))
    meta = s.strings("meta")
    if not meta:
        raise ConfigError(f"{path}: [chunk] meta must name at least one metadata node")
    log_format = s.get("log_format", str, "text")
    if log_format not in ("text", "json"):
        raise ConfigError(f"{path}: [chunk] log_format must be text or json, not {log_format!r}")
    tls = _tls(path, data)
    config = ChunkConfig(
        id=s.get("id", str),
        listen=_endpoint(s, "listen", tls=tls),
        address=s.get("address", str),
        data_dir=_data_dir(path, s),
        meta=meta,
        heartbeat_interval=s.positive("heartbeat_interval", float, 1.0),
        report_interval=s.positive("report_interval", float, 30.0),
        gc_grace=s.positive("gc_grace", float, 600.0),
        capacity_bytes=s.get("capacity_bytes", int, 0),
        domain=s.get("domain", str, ""),
        log_format=log_format,
        tls=tls,
        direct_io=_direct_io(s),
        scrub_interval=s.positive("scrub_interval", float, 604800.0),
        scrub_rate=_scrub_rate(s),
    )
    s.done()
    _tables(path, data, ("chunk", "tls"))
    return config


def _scrub_rate(s: _Section) -> int:
    value: int = s.get("scrub_rate", int, 4 << 20)
    if value < 0:
        raise s._fail(
            "scrub_rate", f"must be a number of bytes per second, or 0 for no scrubbing, not {value!r}"
        )
    return value


def _direct_io(s: _Section) -> bool | None:
    value = s.get("direct_io", (bool, str), "auto")
    if value == "auto":
        return None
    if isinstance(value, bool):
        return value
    raise s._fail("direct_io", f'must be true, false or "auto", not {value!r}')


def load_client(path: str) -> ClientConfig:
    """Read a client config file (`HOME/client.toml` or `--config`)."""
    data = _read(path)
    s = _Section(path, "client", data.get("client", {}))
    meta = s.strings("meta")
    if not meta:
        raise ConfigError(f"{path}: [client] meta must name at least one metadata node")
    config = ClientConfig(
        meta=meta, timeout=s.positive("timeout", float, 30.0), tls=_tls(path, data), source=path
    )
    s.done()
    _tables(path, data, ("client", "tls"))
    return config
