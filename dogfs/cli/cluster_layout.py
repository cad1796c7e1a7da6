# -*- test-case-name: tests.test_cluster_cli -*-
"""What a local cluster is on disk, and its daemon processes.

A local cluster (`dogfs cluster up`) lives under one HOME directory:

    HOME/cluster.toml                 what the cluster is: nodes, kinds, ports, ec, tls (written
                                      once, at creation; restarts reuse it)
    HOME/client.toml                  the client config: every meta address, the admin identity
    HOME/ca/ca.pem, ca.key            the cluster CA (absent with --insecure)
    HOME/identities/admin/            the admin credential (cert.pem, key.pem, ca.pem, client.toml)
    HOME/nodes/<id>/meta.toml|chunk.toml  the node's config (written at creation; edit freely)
    HOME/nodes/<id>/data/             everything the node stores
    HOME/nodes/<id>/tls/              the node's certificate and key
    HOME/nodes/<id>/twistd.pid        written by twistd while it runs
    HOME/nodes/<id>/twistd.log        the daemon's stdout and stderr

Node ids are `meta-1..` and `chunk-1..`. This module does file and process work only, no
networking: the cluster commands in `dogfs.cli.cluster` add the status queries.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable

import tomli_w
from attrs import frozen

from dogfs.cli.output import USAGE, CLIError
from dogfs.config import load_chunk, load_meta
from dogfs.storage.files import replace_file

__all__ = [
    "CLUSTER_FILE",
    "CLIENT_FILE",
    "DAEMON_ENV",
    "STOP_TIMEOUT",
    "NodeSpec",
    "ClusterSpec",
    "pick_ports",
    "new_spec",
    "load_spec",
    "write_cluster",
    "write_toml",
    "node_dir",
    "config_path",
    "pidfile_path",
    "log_path",
    "data_dir",
    "node_pid",
    "pid_alive",
    "daemon_argv",
    "start_node",
    "stop_pids",
    "add_chunks",
    "follows_base_port",
    "log_tail",
]

CLUSTER_FILE = "cluster.toml"
CLIENT_FILE = "client.toml"
FORMAT_VERSION = 1
LOOPBACK = "127.0.0.1"
#: The daemons' malloc tuning (PERFORMANCE.md: ISA-L runs ~7x slower without it).
DAEMON_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
#: Seconds a node gets to exit after SIGTERM before it is sent SIGKILL.
STOP_TIMEOUT = 10.0
# With --base-port P: metas listen on P.., their HTTP on P+80.., chunk servers on P+100..
HTTP_OFFSET = 80
CHUNK_OFFSET = 100


@frozen
class NodeSpec:
    """One node of a local cluster as cluster.toml records it."""

    id: str
    kind: str  # "meta" or "chunk"
    address: str  # host:port of its binary protocol
    http_address: str = ""  # metas only: the dashboard and /metrics

    @property
    def port(self) -> int:
        """The port of `address`."""
        return int(self.address.rpartition(":")[2])


@frozen
class ClusterSpec:
    """What a local cluster is: its nodes, default policy and whether it runs TLS."""

    nodes: tuple[NodeSpec, ...]
    ec: str
    tls: bool

    @property
    def metas(self) -> tuple[NodeSpec, ...]:
        """The metadata nodes, in id order."""
        return tuple(n for n in self.nodes if n.kind == "meta")

    @property
    def chunks(self) -> tuple[NodeSpec, ...]:
        """The chunk servers, in id order."""
        return tuple(n for n in self.nodes if n.kind == "chunk")

    def node(self, node_id: str) -> NodeSpec:
        """The node called `node_id`; CLIError (exit 2) naming the known ids otherwise."""
        for n in self.nodes:
            if n.id == node_id:
                return n
        known = ", ".join(n.id for n in self.nodes)
        raise CLIError(
            f"there is no node {node_id!r} in this cluster; its nodes are {known}", USAGE
        )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def pick_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that are free now (the kernel's choice)."""
    # Hold every socket open until all are chosen, so the kernel cannot hand one out twice.
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def new_spec(metas: int, chunks: int, ec: str, tls: bool, base_port: int | None) -> ClusterSpec:
    """The spec of a new cluster: node ids, and ports free now (or from `base_port`)."""
    if base_port is None:
        ports = pick_ports(2 * metas + chunks)
        meta_ports, http_ports, chunk_ports = (
            ports[:metas],
            ports[metas : 2 * metas],
            ports[2 * metas :],
        )
    else:
        if metas > HTTP_OFFSET or chunks > 65535 - base_port - CHUNK_OFFSET or base_port < 1024:
            raise CLIError(
                f"--base-port {base_port} leaves no room for {metas} metadata nodes and "
                f"{chunks} chunk servers (metas use P.., their HTTP P+{HTTP_OFFSET}.., chunk "
                f"servers P+{CHUNK_OFFSET}..; P must be at least 1024)",
                USAGE,
            )
        meta_ports = [base_port + i for i in range(metas)]
        http_ports = [base_port + HTTP_OFFSET + i for i in range(metas)]
        chunk_ports = [base_port + CHUNK_OFFSET + i for i in range(chunks)]
        busy = [p for p in meta_ports + http_ports + chunk_ports if not _port_free(p)]
        if busy:
            raise CLIError(
                f"port {busy[0]} on {LOOPBACK} is in use; choose another --base-port", USAGE
            )
    nodes = [
        NodeSpec(f"meta-{i + 1}", "meta", f"{LOOPBACK}:{p}", f"{LOOPBACK}:{h}")
        for i, (p, h) in enumerate(zip(meta_ports, http_ports, strict=True))
    ]
    nodes += [
        NodeSpec(f"chunk-{i + 1}", "chunk", f"{LOOPBACK}:{p}") for i, p in enumerate(chunk_ports)
    ]
    return ClusterSpec(nodes=tuple(nodes), ec=ec, tls=tls)


def load_spec(home: str) -> ClusterSpec | None:
    """The cluster HOME holds, or None when HOME/cluster.toml does not exist."""
    path = os.path.join(home, CLUSTER_FILE)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CLIError(f"cannot read {path}: {e}") from None
    try:
        cluster = data["cluster"]
        nodes = tuple(
            NodeSpec(
                id=str(n["id"]),
                kind=str(n["kind"]),
                address=str(n["address"]),
                http_address=str(n.get("http_address", "")),
            )
            for n in data["nodes"]
        )
        return ClusterSpec(nodes=nodes, ec=str(cluster["ec"]), tls=bool(cluster["tls"]))
    except (KeyError, TypeError) as e:
        raise CLIError(f"{path} is damaged: missing {e}") from None


def write_toml(path: str, data: dict, mode: int = 0o644) -> None:
    """Replace the TOML file ``path`` with ``data``, durably (a crash leaves the old or the new)."""
    replace_file(path, tomli_w.dumps(data).encode(), mode)


def node_dir(home: str, node: NodeSpec) -> str:
    """HOME/nodes/<id>."""
    return os.path.join(home, "nodes", node.id)


def config_path(home: str, node: NodeSpec) -> str:
    """HOME/nodes/<id>/meta.toml or chunk.toml."""
    return os.path.join(node_dir(home, node), f"{node.kind}.toml")


def pidfile_path(home: str, node: NodeSpec) -> str:
    """HOME/nodes/<id>/twistd.pid (twistd writes it and removes it at a clean exit)."""
    return os.path.join(node_dir(home, node), "twistd.pid")


def log_path(home: str, node: NodeSpec) -> str:
    """HOME/nodes/<id>/twistd.log: the daemon's stdout and stderr."""
    return os.path.join(node_dir(home, node), "twistd.log")


def data_dir(home: str, node: NodeSpec) -> str:
    """HOME/nodes/<id>/data (absolute)."""
    return os.path.abspath(os.path.join(node_dir(home, node), "data"))


def _listen(address: str) -> str:
    host, _, port = address.rpartition(":")
    return f"tcp:{port}:interface={host}"


def _tls_table(home: str, node: NodeSpec) -> dict[str, str]:
    # Relative to the config file's directory, so a HOME can be moved whole.
    return {"ca": "../../ca/ca.pem", "cert": "tls/cert.pem", "key": "tls/key.pem"}


def write_cluster(
    home: str,
    spec: ClusterSpec,
    timeout: float = 30.0,
    block_size: int | None = None,
    capacity: int | None = None,
) -> None:
    """Create a new cluster's files: cluster.toml, node configs, TLS material, client.toml.
    ``capacity`` is every chunk server's ``capacity_bytes`` (None: its disk's size)."""
    os.makedirs(home, exist_ok=True)
    for node in spec.nodes:
        _write_node(home, spec, node, block_size, capacity)
    meta_addresses = [m.address for m in spec.metas]
    client: dict[str, object] = {"client": {"meta": meta_addresses, "timeout": timeout}}
    if spec.tls:
        _make_tls(home, spec)
        client["tls"] = {
            "ca": "ca/ca.pem",
            "cert": "identities/admin/cert.pem",
            "key": "identities/admin/key.pem",
        }
    write_toml(os.path.join(home, CLIENT_FILE), client, 0o600)
    # Last: a HOME with cluster.toml is a complete cluster; a crash before leaves none.
    _write_spec(home, spec)


def add_chunks(
    home: str, spec: ClusterSpec, count: int, capacity: int | None = None
) -> tuple[ClusterSpec, list[NodeSpec]]:
    """Add ``count`` chunk servers to the cluster in HOME: their configs (and node
    certificates, from the cluster's CA), then cluster.toml naming them. Ids follow the
    highest ``chunk-N``; ports are free ones now; ``capacity`` is their ``capacity_bytes``.
    Returns the new spec and the new nodes."""
    taken = [int(n.id.rpartition("-")[2]) for n in spec.chunks if n.id.rpartition("-")[2].isdigit()]
    first = max(taken, default=0) + 1
    ports = _new_chunk_ports(spec, count)
    new = [NodeSpec(f"chunk-{first + i}", "chunk", f"{LOOPBACK}:{p}") for i, p in enumerate(ports)]
    grown = ClusterSpec(nodes=spec.nodes + tuple(new), ec=spec.ec, tls=spec.tls)
    if spec.tls:
        from dogfs.security.ca import load_ca
        from dogfs.security.roles import Role

        ca = load_ca(os.path.join(home, "ca"))
        for node in new:
            ca.issue(node.id, Role.NODE, os.path.join(node_dir(home, node), "tls"), hosts=[LOOPBACK, "localhost"])
    for node in new:
        _write_node(home, grown, node, None, capacity)
    _write_spec(home, grown)
    return grown, new


def follows_base_port(spec: ClusterSpec, base: int) -> bool:
    """Whether the cluster's ports are `--base-port base`'s layout: metas on base.., their
    HTTP on base+80.. (or none, as clusters made before the metas served it), chunk servers
    on base+100..."""
    metas = [m.port for m in spec.metas]
    http = [int(m.http_address.rpartition(":")[2]) for m in spec.metas if m.http_address]
    chunks = [c.port for c in spec.chunks]
    return (
        metas == list(range(base, base + len(metas)))
        and http in ([], list(range(base + HTTP_OFFSET, base + HTTP_OFFSET + len(metas))))
        and chunks == list(range(base + CHUNK_OFFSET, base + CHUNK_OFFSET + len(chunks)))
    )


def _base_port(spec: ClusterSpec) -> int | None:
    """P, if the cluster's ports follow `--base-port P`'s layout; else None."""
    if spec.metas and follows_base_port(spec, spec.metas[0].port):
        return spec.metas[0].port
    return None


def _new_chunk_ports(spec: ClusterSpec, count: int) -> list[int]:
    """Ports for ``count`` new chunk servers: the next ones of a `--base-port` layout (which
    must be free), else free ones the kernel picks, never one a node of the cluster has (a
    stopped cluster's ports are free, but not for the taking)."""
    base = _base_port(spec)
    if base is not None:
        start = base + CHUNK_OFFSET + len(spec.chunks)
        ports = list(range(start, start + count))
        if ports[-1] > 65535:
            raise CLIError(f"no room for {count} more chunk servers after port {start - 1}", USAGE)
        busy = [p for p in ports if not _port_free(p)]
        if busy:
            raise CLIError(
                f"port {busy[0]} on {LOOPBACK}, the next chunk server's in this cluster's "
                f"--base-port {base} layout, is in use",
            )
        return ports
    own = {n.port for n in spec.nodes} | {
        int(m.http_address.rpartition(":")[2]) for m in spec.metas if m.http_address
    }
    for _ in range(20):
        ports = pick_ports(count)
        if not own.intersection(ports):
            return ports
    raise CLIError("could not find free ports apart from the cluster's own; try again")


def _write_node(
    home: str, spec: ClusterSpec, node: NodeSpec, block_size: int | None, capacity: int | None = None
) -> None:
    """A node's directory and config file."""
    os.makedirs(os.path.join(node_dir(home, node), "data"), exist_ok=True)
    meta_addresses = [m.address for m in spec.metas]
    table: dict[str, object]
    if node.kind == "meta":
        table = {
            "meta": {
                "id": node.id,
                "listen": _listen(node.address),
                "address": node.address,
                "data_dir": "data",
                "http": _listen(node.http_address),
                "http_address": node.http_address,
                "default_ec": spec.ec,
                "log_format": "text",
            }
            | ({"block_size": block_size} if block_size else {}),
            "raft": {
                "peers": {m.id: m.address for m in spec.metas},
                "http_peers": {m.id: m.http_address for m in spec.metas if m.http_address},
            },
        }
    else:
        table = {
            "chunk": {
                "id": node.id,
                "listen": _listen(node.address),
                "address": node.address,
                "data_dir": "data",
                "meta": meta_addresses,
                "log_format": "text",
            }
            | ({"capacity_bytes": capacity} if capacity else {})
        }
    if spec.tls:
        table["tls"] = _tls_table(home, node)
    write_toml(config_path(home, node), table)


def _write_spec(home: str, spec: ClusterSpec) -> None:
    """HOME/cluster.toml for ``spec``."""
    write_toml(
        os.path.join(home, CLUSTER_FILE),
        {
            "cluster": {"format": FORMAT_VERSION, "ec": spec.ec, "tls": spec.tls},
            "nodes": [
                {"id": n.id, "kind": n.kind, "address": n.address}
                | ({"http_address": n.http_address} if n.http_address else {})
                for n in spec.nodes
            ],
        },
    )


def _make_tls(home: str, spec: ClusterSpec) -> None:
    """The cluster CA, a certificate per node and the admin identity."""
    from dogfs.security.ca import init_ca, write_identity_dir
    from dogfs.security.roles import Role

    ca = init_ca(os.path.join(home, "ca"), force=True)
    for node in spec.nodes:
        ca.issue(
            node.id,
            Role.NODE,
            os.path.join(node_dir(home, node), "tls"),
            hosts=[LOOPBACK, "localhost"],
        )
    write_identity_dir(ca, home, "admin", Role.ADMIN, [m.address for m in spec.metas])


# -- processes ---------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (reaping it if it is our child)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # The state follows the parenthesised command name, which may contain spaces.
        state = stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3]
        return state not in (b"Z", b"X")
    except (OSError, ValueError):
        return True


def _cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


def node_pid(home: str, node: NodeSpec) -> int | None:
    """The pid of the node's running daemon, or None (no pidfile, stale or reused pid)."""
    try:
        with open(pidfile_path(home, node)) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0 or not pid_alive(pid):
        return None
    cmdline = _cmdline(pid)
    # A pid reused by another process is not our daemon: its command line names our config.
    if cmdline is not None and os.fsencode(config_path(home, node)) not in cmdline:
        return None
    return pid


def _logger_option(home: str, node: NodeSpec) -> list[str]:
    path = config_path(home, node)
    try:
        config = load_meta(path) if node.kind == "meta" else load_chunk(path)
    except ValueError as e:
        raise CLIError(f"cannot start {node.id}: {e}") from None
    if config.log_format == "json":
        from dogfs.logs import JSON_OBSERVER

        return ["--logger", JSON_OBSERVER]
    return []


def daemon_argv(home: str, node: NodeSpec) -> list[str]:
    """The node's twistd command line; CLIError if its config does not load."""
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile",
        pidfile_path(home, node),
        *_logger_option(home, node),
        f"dogfs-{node.kind}",
        "--config",
        config_path(home, node),
    ]


def start_node(home: str, node: NodeSpec, argv: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Start the node's daemon in its own session, output to its log; returns the process."""
    if argv is None:
        argv = daemon_argv(home, node)
    pidfile = pidfile_path(home, node)
    if os.path.exists(pidfile) and node_pid(home, node) is None:
        # Stale (the daemon was killed): twistd would refuse to start if the pid was reused.
        os.unlink(pidfile)
    env = dict(os.environ)
    env.update(DAEMON_ENV)
    log = open(log_path(home, node), "ab")
    try:
        log.write(f"---- dogfs cluster: starting {node.id}: {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(
            argv,
            cwd=node_dir(home, node),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def _signal(pid: int, sig: int) -> None:
    try:
        # Each daemon leads its own session: signal its group, so helpers it forked go too.
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise


def stop_pids(
    pids: Iterable[int],
    timeout: float = STOP_TIMEOUT,
    sig: int = signal.SIGTERM,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """Send `sig` to every pid, wait until all exit; SIGKILL those alive after `timeout`.

    Returns the pids that needed SIGKILL.
    """
    pending = [p for p in pids if pid_alive(p)]
    for pid in pending:
        _signal(pid, sig)
    deadline = monotonic() + timeout
    killed: list[int] = []
    while pending:
        pending = [p for p in pending if pid_alive(p)]
        if not pending:
            break
        if monotonic() >= deadline:
            for pid in pending:
                _signal(pid, signal.SIGKILL)
                killed.append(pid)
            # SIGKILL cannot be ignored; give the kernel a moment to tear them down.
            deadline = monotonic() + 5.0
            while pending and monotonic() < deadline:
                pending = [p for p in pending if pid_alive(p)]
                sleep(0.02)
            break
        sleep(0.02)
    return killed


def log_tail(home: str, node: NodeSpec, lines: int = 20) -> str:
    """The last `lines` lines of the node's log ("" when there is none)."""
    try:
        with open(log_path(home, node), "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
