# -*- test-case-name: tests.test_repair_process -*-
"""`dogfs admin chunk ...` and `dogfs admin repair status`: chunk servers leaving, and repair.

    dogfs admin chunk drain NODE [--wait]   move NODE's shards to other servers; no new ones
    dogfs admin chunk drain NODE --undo     stop draining (moved shards stay where they went)
    dogfs admin chunk remove NODE [--force] forget a stopped, empty chunk server
    dogfs admin repair status               lost and draining servers, tasks, recent errors

The metadata leader does the work (dogfs/meta/repair.py): it rebuilds the shards of a chunk
server dead for `repair_after` seconds (meta.toml, 600 by default) and of a removed one, and
moves those of a draining one, most endangered block groups first. To retire a server: drain
it with --wait, stop it, then remove it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dogfs.cli import output

#: Seconds between two looks at the repair status while `drain --wait` waits.
WAIT_POLL = 1.0


def register(admin_subparsers: Any) -> None:
    """Add `admin chunk` and `admin repair`."""

    chunk = admin_subparsers.add_parser(
        "chunk", help="drain or remove chunk servers",
        description="Take chunk servers out of the cluster without losing redundancy.",
    )
    sub = chunk.add_subparsers(dest="chunk_command", metavar="CHUNK_COMMAND", parser_class=type(chunk))
    sub.required = True
    drain = sub.add_parser(
        "drain", help="move a chunk server's shards elsewhere and place no new ones on it",
        description="Mark a chunk server draining: the metadata leader places no new shards on "
        "it and moves its shards to other servers, a few at a time. The server keeps serving "
        "reads meanwhile.",
    )
    drain.add_argument("node", help="the chunk server's id (as `cluster status` shows it)")
    drain.add_argument("--undo", action="store_true", help="stop draining it")
    drain.add_argument("--wait", action="store_true",
                       help="wait until it holds no shard the namespace uses, showing progress")
    output.admin_options(drain)
    drain.set_defaults(func=cmd_drain)
    remove = sub.add_parser(
        "remove", help="forget a stopped chunk server",
        description="Forget a chunk server. It must be stopped, and hold no shard the namespace "
        "uses (drain it first), unless --force: its shards are then rebuilt elsewhere from the "
        "others, as for a dead server.",
    )
    remove.add_argument("node", help="the chunk server's id")
    remove.add_argument("--force", action="store_true",
                        help="remove it although block groups still place shards on it")
    output.admin_options(remove)
    remove.set_defaults(func=cmd_remove)

    repair = admin_subparsers.add_parser(
        "repair", help="shard repair and moves", description="Shard repair and moves.",
    )
    rsub = repair.add_subparsers(dest="repair_command", metavar="REPAIR_COMMAND", parser_class=type(repair))
    rsub.required = True
    status = rsub.add_parser(
        "status", help="what the metadata leader is repairing, moving or balancing",
        description="Show the lost, dead and draining chunk servers, the repairs under way and "
        "queued, and the latest failures, as the metadata leader sees them; then the "
        "balancer: whether every chunk server is within [meta] balance_threshold of the "
        "average utilization, the fullest and emptiest, and what it has moved.",
    )
    output.admin_options(status)
    status.set_defaults(func=cmd_repair_status)


def cmd_drain(args: argparse.Namespace) -> int:
    """dogfs admin chunk drain NODE"""
    from dogfs.cli.main import run_client

    draining = not args.undo

    async def body(client: Any) -> dict[str, Any]:
        await client.drain(args.node, draining)
        left, pending = _left(await client.repair_status(), args.node)
        if args.wait and draining:
            left, pending = await _wait_drained(client, args.node, left, pending, args.json)
        return {"node": args.node, "draining": draining, "shards_left": left, "pending": pending}

    result = run_client(args, body)
    if args.json:
        output.print_json(result)
    elif not draining:
        print(f"{args.node} is no longer draining")
    elif result["shards_left"] or result["pending"]:
        pending = f" (and {_n(result['pending'], 'shard')} of uploads in progress)" if result["pending"] else ""
        print(f"{args.node} is draining: {_n(result['shards_left'], 'shard')} to move{pending}; "
              "`dogfs admin repair status` follows the moves")
    else:
        print(f"{args.node} is drained: it holds no shard the namespace uses; stop it, then "
              f"`dogfs admin chunk remove {args.node}`")
    return output.OK


def _left(status: dict[str, Any], node: str) -> tuple[int, int]:
    """(committed, pending) shards still placed on ``node``."""
    entry = status.get("lost_servers", {}).get(node) or {}
    return int(entry.get("shards", 0)), int(entry.get("pending", 0))


async def _wait_drained(client: Any, node: str, left: int, pending: int, quiet: bool) -> tuple[int, int]:
    """Poll the repair status until ``node`` holds no shard, committed or of an upload in
    progress; show the count as it falls, and each new failure of a move off it. Stop with an
    error once every committed shard left has been blocked (no server may take it, or too few
    of its group are readable) for three planning intervals: waiting would not end. Waits on
    the client's clock."""
    from twisted.internet import task

    clock = client.clock
    shown = None
    told: set[tuple[str, int, float]] = set()
    stuck_since: float | None = None
    while left or pending:
        if not quiet and (left, pending) != shown:
            extra = f", and {_n(pending, 'shard')} of uploads in progress" if pending else ""
            print(f"{node}: {_n(left, 'shard')} to move{extra}", file=sys.stderr, flush=True)
            shown = (left, pending)
        await task.deferLater(clock, WAIT_POLL, lambda: None)
        status = await client.repair_status()
        left, pending = _left(status, node)
        for e in status.get("errors", []):
            key = (e["block_group"], e["index"], e["at"])
            if e.get("from") == node and key not in told:
                told.add(key)
                if not quiet:
                    print(f"{node}: moving shard {e['index']} of block group {e['block_group']} "
                          f"failed (retried later): {e['error']}", file=sys.stderr, flush=True)
        entry = status.get("lost_servers", {}).get(node) or {}
        if not (left and entry.get("blocked", 0) >= left):
            stuck_since = None
            continue
        now = clock.seconds()
        stuck_since = now if stuck_since is None else stuck_since
        if now - stuck_since >= 3 * float(status.get("interval", 10.0)):
            reasons = "; ".join(f"{kind}: {b['why']}" for kind, b in sorted(status.get("blocked", {}).items()))
            raise output.CLIError(
                f"{node} cannot be drained now: none of the {_n(left, 'shard')} left can move ({reasons}). "
                f"It stays draining; add chunk servers, or `dogfs admin chunk drain {node} --undo`",
                output.FAILED,
            )
    return left, pending


def cmd_remove(args: argparse.Namespace) -> int:
    """dogfs admin chunk remove NODE"""
    from dogfs.cli.main import run_client

    async def body(client: Any) -> None:
        await client.remove_chunk_server(args.node, args.force)

    run_client(args, body)
    if args.json:
        output.print_json({"node": args.node, "removed": True, "forced": bool(args.force)})
    else:
        tail = "; its shards will be rebuilt from the others" if args.force else ""
        print(f"removed chunk server {args.node}{tail}")
    return output.OK


def cmd_repair_status(args: argparse.Namespace) -> int:
    """dogfs admin repair status"""
    from dogfs.cli.main import run_client

    status = run_client(args, lambda client: client.repair_status())
    if args.json:
        output.print_json(status)
        return output.OK
    print(_describe(status), end="")
    return output.OK


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _describe(status: dict[str, Any]) -> str:
    lines = []
    lost = status.get("lost_servers", {})
    waiting = status.get("waiting_servers", {})
    if not lost and not waiting and not status.get("missing_shards") and not any(
        r["reason"] != "balance" for r in status.get("running", [])
    ):
        lines.append("nothing to repair")
    if status.get("grace_left"):
        lines.append(f"this leader took over recently: it calls no chunk server dead for "
                     f"{status['grace_left']:.0f}s more")
    for node, entry in sorted(lost.items()):
        pending = f" (and {entry['pending']} of uploads in progress)" if entry.get("pending") else ""
        lines.append(f"{node}: {entry['reason']}, {_n(entry['shards'], 'shard')} to rebuild or move{pending}")
    for node, count in sorted(status.get("missing_shards", {}).items()):
        lines.append(f"{node}: alive, but {_n(count, 'shard')} left out of its last two shard "
                     "reports (lost or damaged): rebuilt elsewhere")
    for node, left in sorted(waiting.items()):
        lines.append(f"{node}: dead; repair starts in {left:.0f}s unless it returns "
                     f"(repair_after {status.get('repair_after', 0):g}s)")
    for r in status.get("running", []):
        lines.append(f"  {r['reason']:8} block group {r['block_group']} shard {r['index']}: "
                     f"{r['from']} -> {r['to']} ({r['seconds']:.0f}s)")
    copied = f" ({status['copied']} copied from where they were)" if status.get("copied") else ""
    lines.append(
        f"rebuilt {status.get('rebuilt', 0)}{copied}, failed {status.get('failed', 0)}, "
        f"queued {status.get('queued', 0)}, running {len(status.get('running', []))} "
        f"(at most {status.get('concurrency', 0)} at once)"
    )
    for kind, entry in sorted(status.get("blocked", {}).items()):
        lines.append(f"  {_n(entry['shards'], 'shard')} wait ({kind}): {entry['why']}")
    for e in list(status.get("errors", []))[-5:]:
        what = "balancing move " if e.get("reason") == "balance" else ""
        lines.append(f"  {what}failed {e['s_ago']:.0f}s ago: block group {e['block_group']} shard "
                     f"{e['index']} ({e['from']}): {e['error']}")
    lines.extend(_describe_balance(status))
    if not status.get("active", True):
        lines.append("the repair scheduler is not running on this member")
    return "\n".join(lines) + "\n"


def _describe_balance(status: dict[str, Any]) -> list[str]:
    """The balancer's lines of `repair status`."""
    balance = status.get("balance")
    if balance is None:
        return ["balancing: off ([meta] balance = false)"]
    threshold = 100 * balance["threshold"]
    util = balance.get("utilization") or {}
    if status.get("lost_servers") or status.get("missing_shards"):
        state = "waits until nothing needs repair"
    elif balance.get("balanced") is None:
        state = "counts what each chunk server holds, or waits for two to take shards"
    elif balance["balanced"] and not balance.get("queued") and not balance.get("running"):
        state = f"balanced: every server within {threshold:g} points of the average"
    elif balance.get("settled") and not balance.get("queued") and not balance.get("running"):
        state = (f"as even as it gets: some servers are more than {threshold:g} points from the "
                 "average, but no shard move would bring them closer (shards too large for so few servers)")
    else:
        state = (f"moving shards ({balance.get('queued', 0)} queued, {balance.get('running', 0)} running) "
                 f"until every server is within {threshold:g} points of the average")
    lines = [f"balancing: {state}"]
    if util:
        fullest = max(util, key=lambda n: (util[n], n))
        emptiest = min(util, key=lambda n: (util[n], n))
        lines.append(f"  utilization: average {100 * balance['average']:.1f}%, fullest {fullest} "
                     f"{100 * util[fullest]:.1f}%, emptiest {emptiest} {100 * util[emptiest]:.1f}%")
    if balance.get("moved"):
        lines.append(f"  moved {_n(balance['moved'], 'shard')} ({output.format_bytes(balance['moved_bytes'])}) "
                     f"in {_n(balance['rounds'], 'round')}")
    return lines
