# -*- test-case-name: tests.test_meta_raft_process -*-
"""`dogfs admin meta ...`: metadata group membership, online.

    dogfs admin meta add ADDRESS [--id ID]   add a running, empty metadata node
    dogfs admin meta add --local             (a `dogfs cluster` home) create meta-N, start it, add it
    dogfs admin meta remove NODE             remove a member (the leader hands over first); in a
                                             `dogfs cluster` home its process is stopped too
    dogfs admin meta backup FILE             a consistent copy of the namespace, online
    dogfs admin meta restore FILE (--meta-config TOML | --local)
                                             a stopped node's empty data directory from a backup
                                             (dogfs.meta.backup)

A new member joins as a learner (it votes on nothing while it catches up, from a snapshot if the
log was compacted), and is promoted to voter once it holds everything the leader had committed
when it was added. A node joins when its config's ``[raft] peers`` does not list its own id:
it then starts with no vote and waits for the leader. To replace a member: add the new one,
then remove the old one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import msgpack

from dogfs.cli import output
from dogfs.cli.output import CLIError


def register(admin_subparsers: Any) -> None:
    """Add the metadata membership commands."""
    meta = admin_subparsers.add_parser(
        "meta", help="add or remove metadata nodes; back up and restore the namespace",
        description="Change the metadata Raft group online; back its namespace up, and restore one."
    )
    sub = meta.add_subparsers(dest="meta_command", metavar="META_COMMAND", parser_class=type(meta))
    sub.required = True

    add = sub.add_parser(
        "add", help="add a metadata node (learner, caught up, then voter)",
        description="Add a metadata node: it joins as a learner, catches up, then votes.",
    )
    add.add_argument("address", nargs="?", help="host:port of the new node's binary protocol")
    add.add_argument("--id", help="the new node's id (default: what the node says it is)")
    add.add_argument("--http-address", default="", help="the new node's dashboard host:port")
    add.add_argument("--local", action="store_true",
                     help="in a `dogfs cluster` home: create the next meta-N, start it and add it")
    add.add_argument("--catch-up", type=output.seconds, default=120.0, metavar="SECONDS",
                     help="how long the new node may take to catch up before promotion (default 120)")
    output.admin_options(add)
    add.set_defaults(func=cmd_add)
    remove = sub.add_parser(
        "remove", help="remove a metadata node from the group",
        description="Remove a member; removing the leader hands leadership to another member first.",
    )
    remove.add_argument("node", help="the member's id (as `cluster status` shows it)")
    output.admin_options(remove)
    remove.set_defaults(func=cmd_remove)
    lead = sub.add_parser(
        "lead", help="hand leadership to another metadata node",
        description="Make member NODE the leader (as etcd's move-leader): do it before restarting "
        "the leader (an upgrade, say), so the group does not wait out an election.",
    )
    lead.add_argument("node", help="the voter to lead (as `cluster status` shows it)")
    output.admin_options(lead)
    lead.set_defaults(func=cmd_lead)

    backup = sub.add_parser(
        "backup", help="copy the namespace, consistently and online, into a file",
        description="Write a consistent copy of the namespace (every write acknowledged before "
        "the command is in it) to FILE, made by the leader while it goes on serving. The file "
        "holds the cluster's block key: it is written readable by its owner alone.",
    )
    backup.add_argument("file", help="where to write the backup (replaced only once it is complete)")
    output.admin_options(backup)
    backup.set_defaults(func=cmd_backup)
    restore = sub.add_parser(
        "restore", help="make a stopped node's empty data directory hold a backup (offline)",
        description="Offline, on the node's host: load backup FILE into the empty data directory "
        "of the metadata node that --meta-config describes. To restore a group, do this for every "
        "member (same FILE, each with its own meta.toml, whose [raft] peers are the new group), "
        "then start them. In a `dogfs cluster` home, `--local` does it for every metadata node "
        "(the cluster must be down).",
    )
    restore.add_argument("file", help="a backup written by `dogfs admin meta backup`")
    where = restore.add_mutually_exclusive_group(required=True)
    where.add_argument("--meta-config", metavar="META_TOML", help="the metadata node's config file")
    where.add_argument("--local", action="store_true", help="every metadata node of the `dogfs cluster` home")
    restore.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    restore.set_defaults(func=cmd_restore)


async def _member_op(client: Any, op: str, args: dict[str, Any]) -> dict[str, Any]:
    reply = await client._query(op, "", args)
    return msgpack.unpackb(bytes(reply.payload), raw=False)  # type: ignore[no-any-return]


async def _status_of(reactor: Any, config: Any, address: str, timeout: float) -> dict[str, Any] | None:
    """The status a single node gives about itself (None if it does not answer)."""
    import attrs

    from dogfs.client.api import DogFSClient

    client = DogFSClient(reactor, attrs.evolve(config, meta=(address,)), timeout=timeout)
    try:
        status = await client.status()
    except Exception:
        return None
    finally:
        await client.close()
    for member in status.get("meta") or []:
        if member.get("address") == address:
            return dict(member)
    return None


def cmd_add(args: argparse.Namespace) -> int:
    """dogfs admin meta add ADDRESS [--id ID] | --local"""
    from dogfs.cli.main import client_config
    from dogfs.client.api import DogFSClient, DogFSError

    if args.local:
        if args.address:
            raise CLIError("give either ADDRESS or --local, not both", output.USAGE)
        node_id, address, http = _create_local(args)
    else:
        if not args.address:
            raise CLIError("name the new node's ADDRESS (host:port), or use --local", output.USAGE)
        node_id, address, http = args.id, args.address, args.http_address
    config = client_config(args)
    timeout = args.timeout if args.timeout is not None else config.timeout

    def start(reactor: Any) -> Any:
        from twisted.internet import defer

        async def go() -> dict[str, Any]:
            from dogfs.client.api import sleep

            nonlocal node_id
            deadline = reactor.seconds() + timeout
            own = None
            while own is None and reactor.seconds() < deadline:
                own = await _status_of(reactor, config, address, min(2.0, timeout))
                if own is None:
                    await sleep(reactor, 0.2)
            if own is None:
                raise DogFSError("unreachable", f"the new metadata node at {address} does not answer")
            if node_id is None:
                node_id = str(own["id"])
            elif own.get("id") != node_id:
                raise DogFSError("invalid_argument", f"the node at {address} is {own.get('id')}, not {node_id}")
            client = DogFSClient(reactor, config, timeout=timeout)
            try:
                added = await _member_op(client, "member_add_learner",
                                         {"id": node_id, "address": address, "http_address": http})
                leader = next((m for m in added["meta"] if m.get("role") == "leader"), None)
                target = int(leader["commit_index"]) if leader and leader.get("commit_index") else 0
                catch_up = reactor.seconds() + args.catch_up
                while True:
                    now = await _status_of(reactor, config, address, min(2.0, timeout))
                    if now is not None and (now.get("applied_index") or 0) >= target:
                        break
                    if reactor.seconds() > catch_up:
                        raise DogFSError(
                            "timeout", f"{node_id} did not catch up within {args.catch_up:g} s; it stays a "
                            f"learner (run the command again to promote it)",
                        )
                    await sleep(reactor, 0.2)
                return await _member_op(client, "member_promote", {"id": node_id})
            finally:
                await client.close()

        return defer.Deferred.fromCoroutine(go())

    try:
        result = output.run_deferred(start, args.reactor())
    except DogFSError as e:
        raise CLIError(f"adding {node_id or address} failed: {e.message}", output.FAILED) from None
    _show(args, result, f"{node_id} ({address}) is a voting member of the metadata group")
    return output.OK


def cmd_remove(args: argparse.Namespace) -> int:
    """dogfs admin meta remove NODE"""
    from dogfs.cli.main import run_client

    result = run_client(args, lambda client: _member_op(client, "member_remove", {"id": args.node}))
    if _retire_local(args):
        sentence = f"{args.node} left the metadata group; its process is stopped (its data is kept)"
    else:
        sentence = f"{args.node} left the metadata group (stop its process: it no longer serves)"
    _show(args, result, sentence)
    return output.OK


def cmd_lead(args: argparse.Namespace) -> int:
    """dogfs admin meta lead NODE"""
    from dogfs.cli.main import run_client

    async def lead(client: Any) -> dict[str, Any]:
        from dogfs.client.api import DogFSError

        try:
            return await _member_op(client, "member_lead", {"id": args.node})
        except DogFSError as e:
            if "unknown query" in str(e):
                raise DogFSError(
                    "unsupported",
                    "the metadata leader runs a release without `admin meta lead`: restart it "
                    "instead (the others elect a leader among themselves)",
                ) from None
            raise

    result = run_client(args, lead)
    if result.get("outcome") == "leader":
        _show(args, result, f"{args.node} leads already")
    else:
        _show(args, result, f"{args.node} leads the metadata group now")
    return output.OK


def cmd_backup(args: argparse.Namespace) -> int:
    """dogfs admin meta backup FILE"""
    from dogfs.cli.main import run_client
    from dogfs.meta.backup import BackupError, BackupInfo, BackupWriter

    target = os.path.abspath(args.file)
    if os.path.isdir(target):
        raise CLIError(f"{args.file} is a directory: name the backup file", output.USAGE)
    try:
        writer = BackupWriter(target)
    except OSError as e:
        raise CLIError(f"cannot write {target}.partial: {e.strerror or e}", output.FAILED) from None
    bar = output.ProgressBar(None, "backup")

    def sink(data: memoryview) -> None:
        writer.write(data)
        bar.update(len(data))

    try:
        answer = run_client(args, lambda client: client.backup(sink))
        bar.finish()
        try:
            info = BackupInfo.from_dict(answer)
        except ValueError as e:
            raise BackupError(f"the metadata member's account of the backup is malformed: {e}") from None
        writer.finish(info)
    except BaseException as e:
        writer.abort()  # the partial copy holds the block key: never left behind
        if isinstance(e, BackupError):
            raise CLIError(str(e), output.FAILED) from None
        if isinstance(e, OSError):  # the disk the backup goes to: full, gone, read-only
            raise CLIError(f"cannot write {target}.partial: {e.strerror or e}; nothing was written",
                           output.FAILED) from None
        raise
    if getattr(args, "json", False):
        output.print_json({"file": target, **info.as_dict()})
    else:
        print(
            f"{args.file}: the namespace of cluster {info.cluster_id or '(unnamed)'} at index {info.index} "
            f"({output.format_bytes(info.size)}, from {info.node})"
        )
    return output.OK


def cmd_restore(args: argparse.Namespace) -> int:
    """dogfs admin meta restore FILE (--meta-config META_TOML | --local)"""
    from dogfs.config import ConfigError, load_meta
    from dogfs.meta.backup import BackupError, check_restorable, read_backup, restore_data_dir
    from dogfs.meta.service import NAMESPACE_MAP_SIZE

    if args.local:
        from dogfs.cli import cluster_layout as layout

        home = os.path.abspath(args.home)
        spec = layout.load_spec(home)
        if spec is None:
            raise CLIError(f"{home} is not a `dogfs cluster` home", output.USAGE)
        metas = [n for n in spec.nodes if n.kind == "meta"]
        running = [n.id for n in metas if layout.node_pid(home, n) is not None]
        if running:
            raise CLIError(f"stop the cluster first (`dogfs cluster down`): {', '.join(running)} running",
                           output.FAILED)
        paths = [layout.config_path(home, n) for n in metas]
        # The group is the home's metadata nodes, whatever each config's peers say (a node
        # added with `admin meta add --local` is not among its own).
        voters: dict[str, str] | None = {n.id: n.address for n in metas}
    else:
        paths = [args.meta_config]
        voters = None
    try:
        configs = [load_meta(p) for p in paths]
    except (ConfigError, OSError) as e:
        raise CLIError(str(e), output.USAGE) from None
    try:
        info, data = read_backup(args.file)
        for config in configs:  # every one checked before any is written
            check_restorable(config, dict(config.peers) if voters is None else voters)
        for config in configs:
            restore_data_dir(config, info, data, map_size=NAMESPACE_MAP_SIZE, voters=voters)
    except BackupError as e:
        raise CLIError(str(e), output.FAILED) from None
    except OSError as e:
        raise CLIError(f"restoring failed: {e}", output.FAILED) from None
    ids = [c.id for c in configs]
    if getattr(args, "json", False):
        output.print_json({"restored": ids, **info.as_dict()})
    else:
        print(f"{', '.join(ids)}: restored the namespace of cluster {info.cluster_id or '(unnamed)'} at index {info.index} "
              f"(backup taken by {info.node}); start {'them' if len(ids) > 1 else 'it'} now")
    return output.OK


def _retire_local(args: argparse.Namespace) -> bool:
    """In a `dogfs cluster` home: stop the removed node and drop it from cluster.toml and
    client.toml (so `cluster up` does not start it again). False when NODE is not local."""
    import tomllib

    from dogfs.cli import cluster_layout as layout

    home = os.path.abspath(args.home)
    spec = layout.load_spec(home)
    if spec is None or not any(n.id == args.node and n.kind == "meta" for n in spec.nodes):
        return False
    node = spec.node(args.node)
    pid = layout.node_pid(home, node)
    if pid is not None:
        layout.stop_pids([pid])
    cluster_file = os.path.join(home, layout.CLUSTER_FILE)
    with open(cluster_file, "rb") as f:
        data = tomllib.load(f)
    data["nodes"] = [n for n in data["nodes"] if n.get("id") != args.node]
    layout.write_toml(cluster_file, data)
    if os.path.exists(args.config):
        with open(args.config, "rb") as f:
            client = tomllib.load(f)
        metas = [a for a in client.get("client", {}).get("meta", []) if a != node.address]
        if metas:
            client["client"]["meta"] = metas
            layout.write_toml(args.config, client, 0o600)
    return True


def _show(args: argparse.Namespace, result: dict[str, Any], sentence: str) -> None:
    members = result.get("meta") or []
    if getattr(args, "json", False):
        output.print_json({"meta": members})
        return
    print(sentence)
    for m in members:
        print(f"  {m['id']:10} {m.get('address', ''):22} {m.get('role')}")


def _create_local(args: argparse.Namespace) -> tuple[str, str, str]:
    """Create the next meta-N of a `dogfs cluster` home and start it (joining, no vote)."""
    import tomllib

    from dogfs.cli import cluster_layout as layout
    from dogfs.cli.cluster_layout import LOOPBACK, NodeSpec

    home = os.path.abspath(args.home)
    spec = layout.load_spec(home)
    if spec is None:
        raise CLIError(f"{home} holds no `dogfs cluster` (no cluster.toml); give ADDRESS instead", output.USAGE)
    numbers = [int(m.id.rpartition("-")[2]) for m in spec.metas if m.id.rpartition("-")[2].isdigit()]
    node_id = args.id or f"meta-{max(numbers, default=0) + 1}"
    if any(n.id == node_id for n in spec.nodes):
        raise CLIError(f"{node_id} already exists in {home}", output.USAGE)
    port, http_port = layout.pick_ports(2)
    node = NodeSpec(node_id, "meta", f"{LOOPBACK}:{port}", f"{LOOPBACK}:{http_port}")
    with open(layout.config_path(home, spec.metas[0]), "rb") as f:
        table = tomllib.load(f)
    table["meta"].update(
        id=node_id, listen=f"tcp:{port}:interface={LOOPBACK}", address=node.address,
        http=f"tcp:{http_port}:interface={LOOPBACK}", http_address=node.http_address, data_dir="data",
    )
    # Its own id is not among the peers: it joins, with no vote, and waits for the leader.
    table["raft"] = {**table.get("raft", {}), "peers": {m.id: m.address for m in spec.metas}}
    os.makedirs(os.path.join(layout.node_dir(home, node), "data"), exist_ok=True)
    if spec.tls:
        from dogfs.security.ca import load_ca
        from dogfs.security.roles import Role

        ca = load_ca(os.path.join(home, "ca"))
        ca.issue(node_id, Role.NODE, os.path.join(layout.node_dir(home, node), "tls"), hosts=[LOOPBACK, "localhost"])
    layout.write_toml(layout.config_path(home, node), table)
    # cluster.toml and client.toml learn the new node (cluster status, up/down, clients).
    cluster_file = os.path.join(home, layout.CLUSTER_FILE)
    with open(cluster_file, "rb") as f:
        data = tomllib.load(f)
    data["nodes"].append({"id": node_id, "kind": "meta", "address": node.address, "http_address": node.http_address})
    layout.write_toml(cluster_file, data)
    if os.path.exists(args.config):
        with open(args.config, "rb") as f:
            client = tomllib.load(f)
        metas = list(client.get("client", {}).get("meta", []))
        if node.address not in metas:
            client["client"]["meta"] = [*metas, node.address]
            layout.write_toml(args.config, client, 0o600)
    layout.start_node(home, node)
    deadline = time.monotonic() + 30
    import socket

    while time.monotonic() < deadline:
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise CLIError(f"{node_id} did not start listening on {node.address}; see {layout.log_path(home, node)}")
    print(f"started {node_id} on {node.address}", file=sys.stderr)
    return node_id, node.address, node.http_address
