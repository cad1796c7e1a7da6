# -*- test-case-name: tests.test_cluster_cli -*-
"""`dogfs cluster ...`: a local cluster of real daemon processes on 127.0.0.1.

    dogfs cluster up [--meta N] [--chunk N] [--ec RS-K-M] [--detach] [--insecure]
                     [--block-size BYTES] [--base-port P] [--wait SECONDS] [--json]
    dogfs cluster status [--json]
    dogfs cluster stop NODE | start NODE [--wait SECONDS] | kill NODE   [--json]
    dogfs cluster add-chunk [N] [--capacity BYTES] [--wait SECONDS] [--json]
    dogfs cluster down [--json]

`up` creates the cluster on first use (see `dogfs.cli.cluster_layout` for the files under
HOME) and restarts it with its data afterwards. It is ready when a metadata leader is known
and every chunk server is "alive" in the metadata's view; `up` polls the metas' `status`
query until then. `start` waits until a metadata node answers that query itself or, for a
chunk server, until the leader has heard it since it started; a node that exits meanwhile
fails it with the end of its log. Without `--detach` `up` stays in the foreground and stops
every node on Ctrl-C or SIGTERM. `kill` sends SIGKILL (for tests and chaos drills); `stop` is
SIGTERM, then SIGKILL after 10 s. `add-chunk` adds chunk servers to the cluster (and starts
them, if it runs): the metadata's balancer then moves shards onto them.

With `--json` (global, or after the command) `up` prints `{"nodes": [...], "started": [...]}`
(the objects of `status --json`) once the cluster serves, and `stop`, `start`, `kill`,
`add-chunk` and `down` print `{"nodes": [{"id", "pid", "outcome"}, ...]}` for the nodes they acted on; their
progress lines then go to stderr.

Each handler is `fn(args) -> int`; `dogfs.cli.main` sets `args.home`, `args.config` and
`args.json` before calling it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from typing import IO, Any

import msgpack
from twisted.internet import defer, task

from dogfs.cli import cluster_layout as layout
from dogfs.cli.cluster_layout import ClusterSpec, NodeSpec
from dogfs.cli.output import (
    FAILED,
    INTERRUPTED,
    OK,
    USAGE,
    CLIError,
    format_bytes,
    format_table,
    print_json,
    run_deferred,
    seconds,
)

__all__ = [
    "DEFAULT_METAS",
    "DEFAULT_CHUNKS",
    "DEFAULT_EC",
    "register",
    "cmd_up",
    "cmd_status",
    "cmd_stop",
    "cmd_start",
    "cmd_kill",
    "cmd_down",
    "query_status",
    "daemons_serve_tls",
    "node_views",
]

#: Metadata nodes of a new local cluster (3 once Raft membership is wired end to end).
DEFAULT_METAS = 3
#: Chunk servers of a new local cluster: RS-4-2 needs six.
DEFAULT_CHUNKS = 6
#: The default erasure-coding policy of a new local cluster.
DEFAULT_EC = "RS-4-2"
#: Seconds `up` and `start` wait for the cluster (or node) to serve.
DEFAULT_WAIT = 60.0
#: Seconds a status query may take before that meta is taken as silent.
STATUS_TIMEOUT = 3.0
POLL_INTERVAL = 0.1


def register(subparsers: Any) -> None:
    """Add the `cluster` command group to the `dogfs` parser's subparsers."""
    cluster = subparsers.add_parser(
        "cluster",
        help="run a local cluster of real daemons on 127.0.0.1",
        description="Run a local DogFS cluster: real twistd daemons on 127.0.0.1, data under HOME.",
    )
    sub = cluster.add_subparsers(dest="cluster_command", metavar="COMMAND")
    sub.required = True

    up = sub.add_parser(
        "up",
        help="create or restart the local cluster",
        description="Start the local cluster in HOME, creating it on first use; a HOME that "
        "already holds one is restarted with its data.",
    )
    up.add_argument(
        "--meta",
        type=int,
        default=None,
        metavar="N",
        help=f"metadata nodes of a new cluster (default {DEFAULT_METAS})",
    )
    up.add_argument(
        "--chunk",
        type=int,
        default=None,
        metavar="N",
        help=f"chunk servers of a new cluster (default {DEFAULT_CHUNKS})",
    )
    up.add_argument(
        "--ec",
        default=None,
        metavar="RS-K-M",
        help=f"default erasure-coding policy of a new cluster (default {DEFAULT_EC})",
    )
    up.add_argument(
        "--block-size",
        type=_size,
        default=None,
        metavar="BYTES",
        help="bytes of each shard of a block group in a new cluster, e.g. 64MiB (default 64MiB)",
    )
    up.add_argument(
        "--capacity",
        type=_size,
        default=None,
        metavar="BYTES",
        help="the most each chunk server of a new cluster may hold, e.g. 1GiB ([chunk] "
        "capacity_bytes; default: its disk's size). Local servers share one disk: only with "
        "capacities set does their utilization, which balancing evens out, mean anything",
    )
    up.add_argument(
        "--detach",
        action="store_true",
        help="return once the cluster serves, leaving the daemons running",
    )
    up.add_argument(
        "--insecure", action="store_true", help="a new cluster without TLS (plaintext connections)"
    )
    up.add_argument(
        "--base-port",
        type=int,
        default=None,
        metavar="P",
        help="ports of a new cluster: metas P.., their HTTP P+80.., chunk servers "
        "P+100.. (default: free ports chosen now, kept forever)",
    )
    _wait_option(up, f"how long to wait for the cluster to serve (default {DEFAULT_WAIT:g})")
    _json_option(up)
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="every node: process, role, health")
    _json_option(status)
    status.set_defaults(func=cmd_status)

    for name, func, text in (
        ("stop", None, "stop one node (SIGTERM, SIGKILL after 10 s); its data is kept"),
        ("start", None, "start one stopped node with its data"),
        ("kill", None, "SIGKILL one node (for tests and chaos drills)"),
    ):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("node", metavar="NODE", help="a node id, e.g. chunk-2 or meta-1")
        if name == "start":
            _wait_option(p, "how long to wait for it to serve (a metadata node: to answer a status "
                         "query; a chunk server: to report to the leader)")
        _json_option(p)
        p.set_defaults(func={"stop": cmd_stop, "start": cmd_start, "kill": cmd_kill}[name])
        del func

    add = sub.add_parser(
        "add-chunk",
        help="add chunk servers to the cluster and start them",
        description="Add chunk servers to the local cluster (new ids after the highest, free "
        "ports, node certificates from the cluster's CA) and start them if the cluster runs. "
        "The metadata leader places new block groups on them at once, and its balancer moves "
        "existing shards onto them until every server is within [meta] balance_threshold of "
        "the average utilization (`dogfs admin repair status` shows it).",
    )
    add.add_argument(
        "count", type=int, nargs="?", default=1, metavar="N", help="how many (default 1)"
    )
    add.add_argument(
        "--capacity",
        type=_size,
        default=None,
        metavar="BYTES",
        help="the most each new server may hold, e.g. 1GiB ([chunk] capacity_bytes; default: "
        "its disk's size). On one disk shared by every local server, utilization means "
        "something only with capacities set",
    )
    _wait_option(add, f"how long to wait for them to report to the leader (default {DEFAULT_WAIT:g})")
    _json_option(add)
    add.set_defaults(func=cmd_add_chunk)

    down = sub.add_parser("down", help="stop every node; data is kept")
    _json_option(down)
    down.set_defaults(func=cmd_down)


def _wait_option(parser: Any, text: str) -> None:
    parser.add_argument("--wait", type=seconds, default=DEFAULT_WAIT, metavar="SECONDS", help=text)


def _json_option(parser: Any) -> None:
    # Also after the command, as the client commands take it; the global one still counts.
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )


# -- helpers -----------------------------------------------------------------------------


def _home(args: argparse.Namespace) -> str:
    return os.path.abspath(args.home)


def _want_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def _chatter(args: argparse.Namespace) -> IO[str]:
    """Where a command's progress lines go: stdout, or stderr when stdout carries its JSON."""
    return sys.stderr if _want_json(args) else sys.stdout


def _require_spec(home: str) -> ClusterSpec:
    spec = layout.load_spec(home)
    if spec is None:
        raise CLIError(
            f"{home} holds no local cluster; `dogfs --home {home} cluster up` creates one", USAGE
        )
    return spec


def _say(text: str, stream: IO[str] | None = None) -> None:
    out = stream if stream is not None else sys.stdout
    out.write(text + "\n")
    out.flush()


def _client_tls(home: str, spec: ClusterSpec) -> Any:
    """The admin's TLS material for talking to the metas, or None for a plaintext cluster."""
    if not spec.tls:
        return None
    from dogfs.security.tls import TLSConfig

    base = os.path.join(home, "identities", "admin")
    return TLSConfig(
        ca_cert=os.path.join(home, "ca", "ca.pem"),
        cert=os.path.join(base, "cert.pem"),
        key=os.path.join(base, "key.pem"),
    )


def _pool(reactor: Any, home: str, spec: ClusterSpec) -> Any:
    from dogfs.wire.pool import ConnectionPool

    tls = _client_tls(home, spec)
    if tls is None:
        from dogfs.wire.pool import tcp_endpoints

        endpoints = tcp_endpoints(reactor, timeout=STATUS_TIMEOUT)
    else:
        from dogfs.security.tls import endpoint_maker

        endpoints = endpoint_maker(reactor, tls, timeout=STATUS_TIMEOUT)
    return ConnectionPool(reactor, endpoints)


async def _query_one(reactor: Any, pool: Any, address: str, timeout: float) -> dict[str, Any]:
    from dogfs.wire.messages import MetaQuery

    async def ask() -> dict[str, Any]:
        connection = await pool.get(address)
        reply = await connection.call(MetaQuery(op="status"), timeout=timeout)
        return msgpack.unpackb(bytes(reply.payload))  # type: ignore[no-any-return]

    d = defer.Deferred.fromCoroutine(ask())
    d.addTimeout(timeout, reactor)
    return await d


async def query_status(
    reactor: Any, pool: Any, addresses: list[str], timeout: float = STATUS_TIMEOUT
) -> dict[str, dict[str, Any]]:
    """Ask every meta in `addresses` for its status at once; address -> answer of those that
    answered within `timeout` (silent or failing metas are left out)."""
    results = await defer.DeferredList(
        [defer.Deferred.fromCoroutine(_query_one(reactor, pool, a, timeout)) for a in addresses],
        consumeErrors=True,
    )
    return {
        address: value
        for address, (ok, value) in zip(addresses, results, strict=True)
        if ok and isinstance(value, dict)
    }


def _leader_answer(spec: ClusterSpec, answers: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The answer the leader gave about itself, else one that names a leader, else any."""
    ids = {m.address: m.id for m in spec.metas}
    for address, answer in answers.items():
        for m in answer.get("meta") or []:
            if m.get("id") == ids.get(address) and m.get("role") == "leader":
                return answer
    for answer in answers.values():
        if (answer.get("cluster") or {}).get("leader"):
            return answer
    return next(iter(answers.values()), None)


def node_views(
    home: str, spec: ClusterSpec, answers: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The `cluster status --json` objects: the process view of every node, with what the
    metas said (a meta's own answer for its role; the leader's for chunk servers)."""
    by_address = {m.address: m for m in spec.metas}
    own: dict[str, dict[str, Any]] = {}
    group_version: dict[str, Any] = {}
    for address, answer in answers.items():
        me = by_address.get(address)
        for m in answer.get("meta") or []:
            if me is not None and m.get("id") == me.id:
                own[me.id] = m
                group_version[me.id] = (answer.get("cluster") or {}).get("log_version")
    best = _leader_answer(spec, answers) or {}
    best_meta = {m.get("id"): m for m in best.get("meta") or []}
    chunk_info = {c.get("id"): c for c in best.get("chunks") or []}
    views = []
    for node in spec.nodes:
        pid = layout.node_pid(home, node)
        view: dict[str, Any] = {
            "id": node.id,
            "kind": node.kind,
            "address": node.address,
            "pid": pid,
            "state": "running" if pid is not None else "stopped",
            "data_dir": layout.data_dir(home, node),
            "log": os.path.abspath(layout.log_path(home, node)),
        }
        if node.kind == "meta":
            mine = own.get(node.id)
            info = mine or best_meta.get(node.id) or {}
            # Another member calls a node "follower" from its configuration until it hears
            # from it (right after a restart): without a term that is a guess, not a fact.
            known = pid is not None and (mine is not None or info.get("term") is not None)
            view.update(
                role=info.get("role") if known else None,
                term=info.get("term"),
                commit_index=info.get("commit_index"),
                http_address=info.get("http_address") or node.http_address or None,
                # What its release applies, and what the group uses as its state says (a
                # rolling upgrade is done when every member shows the same; operations.md).
                log_version=mine.get("log_version") if mine else None,
                group_log_version=group_version.get(node.id),
            )
        else:
            info = chunk_info.get(node.id) or {}
            view.update(
                health=info.get("state"),
                capacity_bytes=info.get("capacity_bytes"),
                used_bytes=info.get("used_bytes"),
                shards=info.get("shards"),
                last_heartbeat_s=info.get("last_heartbeat_s"),
            )
        views.append(view)
    return views


def _detail(view: dict[str, Any]) -> str:
    if view["kind"] == "meta":
        if view.get("role") is None:
            return "role unknown" if view["state"] == "running" else ""
        facts = [str(view["role"])]
        if view.get("term") is not None:
            facts.append(f"term {view['term']}")
        if view.get("commit_index") is not None:
            facts.append(f"commit {view['commit_index']}")
        own, group = view.get("log_version"), view.get("group_log_version")
        if own is not None and group is not None and own != group:
            # Mid-upgrade: its release applies a later log version than the group uses yet.
            facts.append(f"log version {group} (release: {own})")
        return ", ".join(facts)
    if view.get("health") is None:
        return "unknown to the metadata" if view["state"] == "running" else ""
    # A stopped node's health is the metadata's memory of it, until it is declared dead.
    prefix = "" if view["state"] == "running" else "metadata last saw it: "
    parts = [prefix + str(view["health"])]
    if view.get("shards") is not None:
        parts.append(f"{view['shards']} shards")
    if view.get("used_bytes") is not None:
        parts.append(
            f"{format_bytes(view['used_bytes'])} / {format_bytes(view.get('capacity_bytes'))}"
        )
    if view.get("last_heartbeat_s") is not None:
        parts.append(f"heartbeat {float(view['last_heartbeat_s']):.1f}s ago")
    return ", ".join(parts)


def _table(views: list[dict[str, Any]]) -> str:
    rows = [
        [
            v["id"],
            v["address"],
            str(v["pid"]) if v["pid"] is not None else "-",
            v["state"],
            _detail(v),
        ]
        for v in views
    ]
    return format_table(["NODE", "ADDRESS", "PID", "STATE", "DETAIL"], rows)


def _dashboard(views: list[dict[str, Any]]) -> str | None:
    """The leader's dashboard, else a running meta's; None when no meta runs to serve one."""
    metas = [
        v for v in views if v["kind"] == "meta" and v.get("http_address") and v["state"] == "running"
    ]
    metas.sort(key=lambda v: v.get("role") != "leader")
    return f"http://{metas[0]['http_address']}/" if metas else None


def _print_summary(home: str, views: list[dict[str, Any]], stream: IO[str] | None = None) -> None:
    out = stream if stream is not None else sys.stdout
    out.write(_table(views))
    url = _dashboard(views)
    if url:
        out.write(f"dashboard: {url}\n")
    out.write(f"client config: {os.path.join(home, layout.CLIENT_FILE)}\n")
    out.flush()


# -- readiness ---------------------------------------------------------------------------


def _missing(
    spec: ClusterSpec,
    answers: dict[str, dict[str, Any]],
    restarted: dict[str, float] | None = None,
    chunks: list[str] | None = None,
) -> list[str]:
    """What keeps the cluster from serving, in words; empty when it serves.

    `restarted` maps chunk servers started `seconds` ago to those seconds: their "alive" must
    come from a heartbeat since then, not from the meta's memory of their previous run.
    `chunks` names the chunk servers that must be alive (default: all of them).
    """
    if not answers:
        return ["no metadata node answers"]
    restarted = restarted or {}
    leader = None
    alive: set[str] = set()
    for answer in answers.values():
        leader = leader or (answer.get("cluster") or {}).get("leader")
        for c in answer.get("chunks") or []:
            if c.get("state") != "alive":
                continue
            since = restarted.get(c.get("id"))
            heartbeat = c.get("last_heartbeat_s")
            if since is not None and (heartbeat is None or heartbeat > since):
                continue
            alive.add(c.get("id"))
    missing = [] if leader else ["no metadata leader yet"]
    wanted = [c.id for c in spec.chunks] if chunks is None else chunks
    absent = [c for c in wanted if c not in alive]
    if absent:
        missing.append("not yet alive: " + ", ".join(absent))
    return missing


def _check_alive(home: str, spec: ClusterSpec, started: dict[str, subprocess.Popen[bytes]]) -> None:
    """CLIError with the end of its log if a daemon we started has exited."""
    for node_id, process in started.items():
        code = process.poll()
        if code is not None:
            node = spec.node(node_id)
            raise CLIError(
                f"{node_id} exited with status {code} while starting; the end of "
                f"{layout.log_path(home, node)}:\n{layout.log_tail(home, node)}"
            )


async def _wait_answers(
    reactor: Any,
    home: str,
    spec: ClusterSpec,
    node: NodeSpec,
    process: subprocess.Popen[bytes],
    wait: float,
) -> dict[str, Any]:
    """Poll until the metadata node `node`, started as `process`, serves: its pidfile names
    the process and a status query to its address is answered by it (not by whatever else
    may hold the port); fail if the process exits. Returns its answer."""
    pool = _pool(reactor, home, spec)
    deadline = reactor.seconds() + wait
    try:
        while True:
            _check_alive(home, spec, {node.id: process})
            answer = None
            if layout.node_pid(home, node) == process.pid:
                answers = await query_status(
                    reactor, pool, [node.address], min(STATUS_TIMEOUT, wait)
                )
                answer = answers.get(node.address)
            if answer is not None and any(m.get("id") == node.id for m in answer.get("meta") or []):
                # A daemon that could not listen (another process holds the port) exits just
                # after its start: the answer counts only if ours still runs.
                _check_alive(home, spec, {node.id: process})
                return answer
            if reactor.seconds() >= deadline:
                raise CLIError(
                    f"{node.id} (pid {process.pid}) did not answer a status query on "
                    f"{node.address} within {wait:g} s; it is still running; the end of "
                    f"{layout.log_path(home, node)}:\n{layout.log_tail(home, node)}"
                )
            await task.deferLater(reactor, POLL_INTERVAL, lambda: None)
    finally:
        await pool.close_all()


async def _wait_ready(
    reactor: Any,
    home: str,
    spec: ClusterSpec,
    started: dict[str, subprocess.Popen[bytes]],
    wait: float,
    chunks: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Poll the metas' status until the cluster serves (a leader, and the chunk servers
    `chunks`, default all, alive); fail if a daemon we started exits."""
    pool = _pool(reactor, home, spec)
    began = reactor.seconds()
    deadline = began + wait
    addresses = [m.address for m in spec.metas]
    started_chunks = [c.id for c in spec.chunks if c.id in started]
    try:
        while True:
            _check_alive(home, spec, started)
            answers = await query_status(reactor, pool, addresses, min(STATUS_TIMEOUT, wait))
            since = reactor.seconds() - began
            missing = _missing(spec, answers, {c: since for c in started_chunks}, chunks)
            waiting = [n for n, p in started.items() if layout.node_pid(home, spec.node(n)) != p.pid]
            if waiting:
                # twistd writes its pidfile before it starts the service; until then the
                # process view would call it stopped.
                missing.append("no pidfile yet: " + ", ".join(waiting))
            if not missing:
                return answers
            if reactor.seconds() >= deadline:
                raise CLIError(
                    f"the cluster in {home} did not serve within {wait:g} s ("
                    + "; ".join(missing)
                    + "); the node logs are under "
                    + os.path.join(home, "nodes")
                )
            await task.deferLater(reactor, POLL_INTERVAL, lambda: None)
    finally:
        await pool.close_all()


# -- commands ----------------------------------------------------------------------------


def _check_matches(spec: ClusterSpec, args: argparse.Namespace, home: str) -> None:
    differ = []
    if args.meta is not None and args.meta != len(spec.metas):
        differ.append(f"--meta {args.meta} (it has {len(spec.metas)})")
    if args.chunk is not None and args.chunk != len(spec.chunks):
        differ.append(f"--chunk {args.chunk} (it has {len(spec.chunks)})")
    if args.ec is not None and args.ec.upper() != spec.ec.upper():
        differ.append(f"--ec {args.ec} (it has {spec.ec})")
    if args.insecure and spec.tls:
        differ.append("--insecure (it runs TLS)")
    if args.block_size is not None:
        block_size = _block_size(home, spec)
        if args.block_size != block_size:
            differ.append(
                f"--block-size {format_bytes(args.block_size)} (it has {format_bytes(block_size)})"
            )
    if args.capacity is not None:
        capacities = _capacities(home, spec)
        if any(c != args.capacity for c in capacities.values()):
            have = ", ".join(f"{node} {format_bytes(c) if c else 'its disk'}" for node, c in capacities.items())
            differ.append(f"--capacity {format_bytes(args.capacity)} (it has {have})")
    if args.base_port is not None:
        # The addresses that base would give, against those cluster.toml keeps.
        base = args.base_port
        if not layout.follows_base_port(spec, base):
            differ.append(
                f"--base-port {base} (its metadata nodes listen on "
                + ", ".join(str(m.port) for m in spec.metas)
                + ", its chunk servers on "
                + ", ".join(str(c.port) for c in spec.chunks)
                + ")"
            )
    if differ:
        raise CLIError(
            f"{home} already holds a cluster that differs from "
            + ", ".join(differ)
            + "; restart it without those options, or use another --home",
            USAGE,
        )


def _node_config(home: str, node: NodeSpec) -> Any:
    """The node's config file, loaded; CLIError naming the node if it does not load."""
    from dogfs.config import ConfigError, load_chunk, load_meta

    try:
        return (load_meta if node.kind == "meta" else load_chunk)(layout.config_path(home, node))
    except ConfigError as e:
        raise CLIError(f"cannot start {node.id}: {e}") from None


def _capacities(home: str, spec: ClusterSpec) -> dict[str, int]:
    """Each chunk server's configured capacity_bytes (0: its disk's size)."""
    return {node.id: _node_config(home, node).capacity_bytes for node in spec.chunks}


def _block_size(home: str, spec: ClusterSpec) -> int:
    """The block size the cluster's metas are configured with (meta-1's, as they agree)."""
    return int(_node_config(home, spec.metas[0]).block_size)


def _new_spec(args: argparse.Namespace) -> ClusterSpec:
    from dogfs.codec.policy import ECPolicy, UnknownPolicy

    metas = DEFAULT_METAS if args.meta is None else args.meta
    chunks = DEFAULT_CHUNKS if args.chunk is None else args.chunk
    try:
        policy = ECPolicy.parse(args.ec or DEFAULT_EC)
    except UnknownPolicy as e:
        raise CLIError(str(e), USAGE) from None
    if metas < 1:
        raise CLIError(f"--meta {metas}: a cluster needs at least one metadata node", USAGE)
    if chunks < policy.width:
        raise CLIError(
            f"{policy.name} puts each block group's {policy.width} shards on different chunk "
            f"servers, so it needs --chunk {policy.width} or more, not {chunks}",
            USAGE,
        )
    tls = not args.insecure
    if tls and not daemons_serve_tls():
        tls = False
        _say(
            "note: the daemons do not serve TLS yet (no SERVES_TLS in dogfs.plugins.meta and "
            "dogfs.plugins.chunk), so this cluster is plaintext",
            sys.stderr,
        )
    return layout.new_spec(metas, chunks, policy.name, tls, args.base_port)


def _size(text: str) -> int:
    """A size in bytes, with an optional KiB/MiB/GiB suffix (argparse type)."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    lowered = text.strip().lower()
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if lowered.endswith(suffix):
            number, scale = lowered[: -len(suffix)], factor
            break
    else:
        number, scale = lowered, 1
    if not number.isdigit() or int(number) * scale <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1048576 or 64MiB")
    return int(number) * scale


def daemons_serve_tls() -> bool:
    """Whether both twistd plugins honour a config's [tls] table.

    Each plugin module says so with `SERVES_TLS = True`; until both do, a TLS cluster could
    not serve (the client would speak TLS to a plaintext listener), so `up` makes plaintext.
    """
    import importlib

    return all(
        getattr(importlib.import_module(f"dogfs.plugins.{kind}"), "SERVES_TLS", False) is True
        for kind in ("meta", "chunk")
    )


def cmd_up(args: argparse.Namespace) -> int:
    """`dogfs cluster up`: create or restart the local cluster and wait until it serves."""
    home = _home(args)
    out = _chatter(args)
    spec = layout.load_spec(home)
    if spec is None:
        spec = _new_spec(args)
        layout.write_cluster(home, spec, block_size=args.block_size, capacity=args.capacity)
        _say(
            f"created a cluster in {home}: {len(spec.metas)} metadata node(s), "
            f"{len(spec.chunks)} chunk servers, {spec.ec}"
            + (", TLS" if spec.tls else ", plaintext"),
            out,
        )
    else:
        _check_matches(spec, args, home)
    if not spec.tls:
        _say(
            "warning: this cluster runs without TLS: no authentication, no encryption; "
            "use it only on a machine you fully control",
            sys.stderr,
        )
    # Every config is checked before anything starts, so a bad one leaves nothing running.
    to_start = [
        (node, layout.daemon_argv(home, node))
        for node in spec.metas + spec.chunks  # metas first: chunk servers dial them at once
        if layout.node_pid(home, node) is None
    ]
    started: dict[str, subprocess.Popen[bytes]] = {}
    for node, argv in to_start:
        started[node.id] = layout.start_node(home, node, argv)
    if started:
        _say("starting " + ", ".join(started), out)
    else:
        _say("every node is already running", out)
    try:
        answers = run_deferred(lambda reactor: _wait_ready(reactor, home, spec, started, args.wait), args.reactor())
    except KeyboardInterrupt:
        if not args.detach:
            _stop_all(home, spec, out)
            return INTERRUPTED
        _say(f"interrupted; the nodes keep running (`dogfs --home {home} cluster down` stops them)", out)
        return INTERRUPTED
    except CLIError:
        # A cluster that did not come up is not left half-running: stop what we started.
        layout.stop_pids([p.pid for p in started.values()])
        raise
    views = node_views(home, spec, answers)
    if _want_json(args):
        print_json({"nodes": views, "started": list(started)})
    else:
        _print_summary(home, views)
    if args.detach:
        _say(f"the cluster serves; `dogfs --home {home} cluster down` stops it", out)
        return OK
    _say("the cluster serves; Ctrl-C stops it", out)
    _wait_for_signal(started)
    _stop_all(home, spec, out)
    return OK


def _wait_for_signal(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """Block until SIGINT or SIGTERM, reaping children that exit meanwhile."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.is_set():
            # The wait returns early on a signal; the timeout only paces reaping.
            stop.wait(1.0)
            for node_id, process in list(children.items()):
                code = process.poll()
                if code is not None:
                    _say(f"{node_id} exited with status {code}", sys.stderr)
                    del children[node_id]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _acted(node_id: str, pid: int | None, outcome: str, **more: Any) -> dict[str, Any]:
    """One node in the `--json` result of stop, start, kill and down."""
    return {"id": node_id, "pid": pid, "outcome": outcome, **more}


def _stopped(node_id: str, pid: int, killed: list[int]) -> dict[str, Any]:
    if layout.pid_alive(pid):
        return _acted(node_id, pid, "still running")
    return _acted(node_id, pid, "killed" if pid in killed else "stopped")


def _stop_all(home: str, spec: ClusterSpec, out: IO[str]) -> list[dict[str, Any]]:
    """Stop every running node, saying so on `out`; what became of each."""
    running = {n.id: pid for n in spec.nodes if (pid := layout.node_pid(home, n)) is not None}
    if not running:
        _say("no node is running", out)
        return []
    killed = layout.stop_pids(running.values())
    results = [_stopped(node_id, pid, killed) for node_id, pid in running.items()]
    for r in results:
        if r["outcome"] == "still running":
            _say(f"{r['id']} (pid {r['pid']}) is still running after SIGKILL", sys.stderr)
        else:
            _say(f"{r['outcome']} {r['id']} (pid {r['pid']})", out)
    return results


def cmd_status(args: argparse.Namespace) -> int:
    """`dogfs cluster status`: every node's process, and what the metas say of it."""
    home = _home(args)
    spec = _require_spec(home)
    running = [m.address for m in spec.metas if layout.node_pid(home, m) is not None]
    answers: dict[str, dict[str, Any]] = {}
    if running:

        async def ask(reactor: Any) -> dict[str, dict[str, Any]]:
            pool = _pool(reactor, home, spec)
            try:
                return await query_status(reactor, pool, running)
            finally:
                await pool.close_all()

        answers = run_deferred(ask, args.reactor())
    views = node_views(home, spec, answers)
    # The id the metadata gave the cluster (None before it has one, or none answered).
    cluster_id = next(
        (cid for a in answers.values() if (cid := (a.get("cluster") or {}).get("cluster_id"))), None
    )
    if _want_json(args):
        print_json({"cluster_id": cluster_id, "nodes": views})
    else:
        _print_summary(home, views)
        if cluster_id:
            _say(f"cluster id: {cluster_id}")
        if running and not answers:
            _say("no metadata node answered a status query: roles and health are unknown")
        leaders = [v["id"] for v in views if v.get("role") == "leader"]
        if len(leaders) > 1:
            _say("warning: several metadata nodes say they lead: " + ", ".join(leaders))
    return OK


def _find(args: argparse.Namespace) -> tuple[str, ClusterSpec, NodeSpec]:
    home = _home(args)
    spec = _require_spec(home)
    return home, spec, spec.node(args.node)


def _report(args: argparse.Namespace, results: list[dict[str, Any]]) -> int:
    """Print the `--json` result of stop, start, kill or down (the text is said already)."""
    if _want_json(args):
        print_json({"nodes": results})
    return OK if all(r["outcome"] != "still running" for r in results) else FAILED


def cmd_stop(args: argparse.Namespace) -> int:
    """`dogfs cluster stop NODE`: SIGTERM, wait for it to exit, SIGKILL after 10 s."""
    home, _, node = _find(args)
    out = _chatter(args)
    pid = layout.node_pid(home, node)
    if pid is None:
        _say(f"{node.id} is not running", out)
        return _report(args, [_acted(node.id, None, "not running")])
    result = _stopped(node.id, pid, layout.stop_pids([pid]))
    if result["outcome"] == "still running":
        raise CLIError(f"{node.id} (pid {pid}) is still running after SIGTERM and SIGKILL")
    _say(f"{result['outcome']} {node.id} (pid {pid}); its data is kept", out)
    return _report(args, [result])


def cmd_kill(args: argparse.Namespace) -> int:
    """`dogfs cluster kill NODE`: SIGKILL, as a crash would."""
    home, _, node = _find(args)
    out = _chatter(args)
    pid = layout.node_pid(home, node)
    if pid is None:
        _say(f"{node.id} is not running", out)
        return _report(args, [_acted(node.id, None, "not running")])
    layout.stop_pids([pid], sig=signal.SIGKILL)
    if layout.pid_alive(pid):
        raise CLIError(f"{node.id} (pid {pid}) is still running after SIGKILL")
    _say(f"killed {node.id} (pid {pid})", out)
    return _report(args, [_acted(node.id, pid, "killed")])


def cmd_start(args: argparse.Namespace) -> int:
    """`dogfs cluster start NODE`: start one node with its data and wait until it serves: a
    metadata node answers a status query itself; the metadata leader has heard a chunk
    server since it started (it then takes shards). If it exits meanwhile, the end of its
    log says why."""
    home, spec, node = _find(args)
    out = _chatter(args)
    pid = layout.node_pid(home, node)
    if pid is not None:
        _say(f"{node.id} is already running (pid {pid})", out)
        return _report(args, [_acted(node.id, pid, "already running", address=node.address)])
    process = layout.start_node(home, node)
    if node.kind == "meta":
        run_deferred(
            lambda reactor: _wait_answers(reactor, home, spec, node, process, args.wait),
            args.reactor(),
        )
    else:
        run_deferred(
            lambda reactor: _wait_ready(reactor, home, spec, {node.id: process}, args.wait, [node.id]),
            args.reactor(),
        )
    _say(f"started {node.id} (pid {process.pid}) on {node.address}", out)
    return _report(args, [_acted(node.id, process.pid, "started", address=node.address)])


def cmd_add_chunk(args: argparse.Namespace) -> int:
    """`dogfs cluster add-chunk [N]`: add N chunk servers; start them if the cluster runs and
    wait until the leader has heard them."""
    home = _home(args)
    out = _chatter(args)
    if not 1 <= args.count <= 100:
        raise CLIError(f"add between 1 and 100 chunk servers at a time, not {args.count}", USAGE)
    spec = _require_spec(home)
    running = any(layout.node_pid(home, m) is not None for m in spec.metas)
    spec, new = layout.add_chunks(home, spec, args.count, capacity=args.capacity)
    ids = [n.id for n in new]
    _say("added " + ", ".join(f"{n.id} on {n.address}" for n in new), out)
    if not running:
        _say(f"the cluster is not running: `dogfs --home {home} cluster up` starts them with the rest", out)
        return _report(args, [_acted(n.id, None, "added", address=n.address) for n in new])
    started = {n.id: layout.start_node(home, n) for n in new}
    try:
        run_deferred(lambda reactor: _wait_ready(reactor, home, spec, started, args.wait, ids), args.reactor())
    except CLIError:
        layout.stop_pids([p.pid for p in started.values()])
        raise
    _say(
        "started " + ", ".join(ids) + f"; the balancer moves shards onto {'it' if len(ids) == 1 else 'them'} "
        f"(`dogfs --home {home} admin repair status` shows how far it is)",
        out,
    )
    return _report(args, [_acted(n.id, started[n.id].pid, "started", address=n.address) for n in new])


def cmd_down(args: argparse.Namespace) -> int:
    """`dogfs cluster down`: stop every node; the data is kept."""
    home = _home(args)
    spec = _require_spec(home)
    _report(args, _stop_all(home, spec, _chatter(args)))
    return OK if all(layout.node_pid(home, n) is None for n in spec.nodes) else FAILED
