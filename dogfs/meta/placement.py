# -*- test-case-name: tests.test_placement -*-
"""The placement planner: which chunk servers receive the shards of a new block group.

A pure function of the cluster's load and an injected random generator: the leader runs it
before proposing an C{Allocate}, so the chosen placement travels in the Raft log and the state
machine stays deterministic. Imports nothing of ours.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from attrs import frozen


@frozen
class ChunkServerLoad:
    """What the planner knows of a live chunk server.

    C{domain} is its failure domain (a rack, a host); None means the server is a domain of
    its own.
    """

    node_id: str
    used_bytes: int
    capacity_bytes: int
    domain: str | None = None

    @property
    def free_bytes(self) -> int:
        """Bytes still free (never negative)."""
        return max(0, self.capacity_bytes - self.used_bytes)

    @property
    def is_full(self) -> bool:
        """Whether the server has no free space at all."""
        return self.free_bytes <= 0


class NotEnoughChunkServers(Exception):
    """There are fewer usable chunk servers than shards to place.

    C{needed} is the width asked for, C{alive} the number of usable (live, not full, not
    excluded) servers.
    """

    def __init__(self, needed: int, alive: int, policy: str | None = None, full: int = 0) -> None:
        self.needed = needed
        self.alive = alive
        self.policy = policy
        self.full = full
        what = policy if policy is not None else f"A block group of {needed} shards"
        verb = "are" if alive != 1 else "is"
        message = f"{what} needs {needed} live chunk servers, only {alive} {verb} alive"
        if full:
            message += f" with free space ({full} more {'are' if full != 1 else 'is'} full)"
        super().__init__(message + ".")


def domain_key(server: ChunkServerLoad) -> str:
    """The failure domain a server counts in: its domain, or itself when it has none."""
    # A server without a domain is its own domain; the prefix keeps it from colliding with a
    # named one.
    return f"domain:{server.domain}" if server.domain is not None else f"node:{server.node_id}"


def _weight(server: ChunkServerLoad) -> float:
    # Weight by the free fraction, so emptier servers fill first whatever their size; the
    # floor keeps nearly full servers choosable when nothing else is.
    if server.capacity_bytes <= 0:
        return 0.0
    return max(server.free_bytes / server.capacity_bytes, 1e-6)


def choose_placement(
    width: int,
    servers: Sequence[ChunkServerLoad],
    rng: random.Random,
    exclude: Collection[str] = (),
    policy: str | None = None,
) -> list[str]:
    """Choose C{width} distinct chunk servers for the shards of one block group.

    Shards spread across failure domains first: no domain gets a second shard while another
    usable domain has none, and so on (the counts per domain differ by at most one, unless a
    domain runs out of servers). Within that rule a server is drawn with probability
    proportional to its free fraction, so emptier servers receive more. Full servers and those
    in C{exclude} are never chosen. The result depends only on the arguments (C{rng} included),
    not on the order of C{servers}.

    Raise L{NotEnoughChunkServers} when fewer than C{width} servers are usable; C{policy}
    names the EC policy in its message.
    """
    if width < 0:
        raise ValueError(f"Cannot place {width} shards.")
    excluded = set(exclude)
    unique: dict[str, ChunkServerLoad] = {}
    for server in servers:
        if server.node_id not in excluded:
            unique.setdefault(server.node_id, server)
    candidates = sorted(unique.values(), key=lambda s: s.node_id)
    full = sum(1 for s in candidates if s.is_full)
    usable = [s for s in candidates if not s.is_full]
    if len(usable) < width:
        raise NotEnoughChunkServers(width, len(usable), policy, full)

    by_domain: dict[str, list[ChunkServerLoad]] = {}
    for server in usable:
        by_domain.setdefault(domain_key(server), []).append(server)
    used: dict[str, int] = {key: 0 for key in by_domain}
    chosen: list[str] = []
    for _ in range(width):
        open_domains = [key for key in sorted(by_domain) if by_domain[key]]
        least = min(used[key] for key in open_domains)
        pool = [server for key in open_domains if used[key] == least for server in by_domain[key]]
        pick = _draw(pool, rng)
        key = domain_key(pick)
        by_domain[key].remove(pick)
        used[key] += 1
        chosen.append(pick.node_id)
    return chosen


def _draw(pool: Sequence[ChunkServerLoad], rng: random.Random) -> ChunkServerLoad:
    """One server from a non-empty pool, with probability proportional to its weight."""
    weights = [_weight(s) for s in pool]
    point = rng.random() * sum(weights)
    for server, weight in zip(pool, weights, strict=True):
        point -= weight
        if point < 0:
            return server
    return pool[-1]
