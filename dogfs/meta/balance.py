# -*- test-case-name: tests.test_balance -*-
"""The balancer: the metadata leader moves shards from the fullest chunk servers to the
emptiest, so that a server added to the cluster takes its share and none fills up first.

What a server holds is counted from the namespace, not from its disk: `NamespaceState.
placed_bytes` sums, one slice per tick, the bytes of the committed block groups placed on each
server (a *census*). A shard moved away stays on its old disk for the garbage collector's grace
(`gc_grace`, ten minutes by default), so the disk figures of the heartbeats would show the
old server full for that long and set off more moves than needed; the namespace shows the
move the moment it commits. Capacities come from the heartbeats.

A server's utilization is its bytes over its capacity. As in HDFS's balancer, the cluster is
balanced when every live, registered, non-draining server is within ``threshold`` (10
percentage points by default) of the average utilization. Otherwise the balancer plans a
*round* of moves:

- sources are the servers above ``average + threshold``, and the servers above average when
  some server is below ``average - threshold``; targets are the servers below ``average -
  threshold``, and those below average when some server is above ``average + threshold``;
- a shard moves only if that brings its source and target closer to the average (`evens_out`:
  the capacity-weighted sum of squared distances from the average falls), counting the moves
  already planned: so no source gives much more than its excess, no target takes much more
  than its shortfall, no shard goes back and forth, and rounds end even where shards are too
  large for every server to come within the threshold (the status then says *settled*); at
  most ``max_moves`` shards in a round;
- a shard goes to a target that holds no shard of its block group, whose failure domain holds
  no more of the group's other shards than the source's does (a move never narrows the
  group's spread over failure domains), and which has the free space, the emptiest first.

`RepairScheduler` runs the moves as it runs repairs (a copy of the shard from its source,
then ``MoveShard`` once it is durable), after every repair: the balancer plans only while
nothing needs repair, and its queued moves are dropped when something does. The next round
waits for a census pass that began after the last move of the previous one ended, so every
round plans from figures that include the moves before it.

Soft state on the leader, like the repair scheduler's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from attrs import frozen

from dogfs.meta import commands as c
from dogfs.meta.placement import ChunkServerLoad, domain_key

__all__ = ["BALANCE", "Balancer", "Move", "domains_of", "evens_out", "may_take"]

#: The reason of a balancing move (as the repair scheduler's tasks have theirs).
BALANCE = "balance"

#: Block groups the census reads per tick.
CENSUS_BATCH = 20_000

#: Placements of one source read per round when looking for shards to move.
LOOK_PER_SOURCE = 5_000

#: Placements read per round over all sources (bounds the time a round's planning holds
#: the reactor, whatever the number of sources).
LOOK_PER_ROUND = 20_000

#: Placements each source reads per round at least, however many sources there are.
MIN_LOOK = 500

#: Shards moved in one round at most.
MAX_MOVES = 1_000

#: The default threshold: a server within this fraction of the average utilization is
#: balanced (HDFS's default too).
THRESHOLD = 0.10


@frozen
class Move:
    """Shard ``index`` of block group ``bg_id`` (``size`` bytes) goes from ``from_node`` to
    ``to_node``; ``margin`` is the group's live shards minus ``k``."""

    bg_id: int
    index: int
    from_node: str
    to_node: str
    size: int
    margin: int


class Balancer:
    """Plans rounds of balancing moves; see the module docstring.

    ``state`` is the namespace (`NamespaceState`). The repair scheduler calls `step` on its
    ticks while nothing needs repair, and `ended` when a move it ran has ended (moved or not).
    """

    def __init__(
        self,
        state: Any,
        *,
        threshold: float = THRESHOLD,
        census_batch: int = CENSUS_BATCH,
        max_moves: int = MAX_MOVES,
        look_per_source: int = LOOK_PER_SOURCE,
        look_per_round: int = LOOK_PER_ROUND,
    ) -> None:
        if not 0 < threshold < 1:
            raise ValueError(f"the balance threshold must be between 0 and 1, not {threshold!r}")
        self.state = state
        self.threshold = threshold
        self.census_batch = census_batch
        self.max_moves = max_moves
        self.look_per_source = look_per_source
        self.look_per_round = look_per_round
        #: The last complete census (node -> bytes), and when its pass began.
        self.census: dict[str, int] | None = None
        self.census_began: float | None = None
        self._partial: dict[str, int] = {}
        self._cursor: int | None = None
        self._pass_began: float | None = None
        #: When the last move of the current round ended (moved or failed).
        self._last_ended: float | None = None
        #: Where each source's placements are read from next (moved shards leave, so a
        #: source is read from where the last round stopped, wrapping around).
        self._source_cursors: dict[str, tuple[int, int] | None] = {}
        #: Utilization by server as of the last plan, and the average.
        self.utilization: dict[str, float] = {}
        self.average: float | None = None
        self.balanced: bool | None = None
        #: Not balanced, but no move would bring the servers closer (shards too large).
        self.settled = False
        #: Sources read all the way round with no move planned from them, and those with a
        #: move in their current round of reading.
        self._fruitless: set[str] = set()
        self._cycle_moved: set[str] = set()
        self.rounds_planned = 0
        self.moved = 0
        self.moved_bytes = 0
        self.rounds = 0

    # --- the census ---

    def census_step(self, now: float) -> bool:
        """Read the next slice of the census; True when that completed a pass."""
        if self._pass_began is None:
            self._pass_began, self._partial, self._cursor = now, {}, None
        part, resume, _looked = self.state.placed_bytes(start_after=self._cursor, limit=self.census_batch)
        for node, size in part.items():
            self._partial[node] = self._partial.get(node, 0) + size
        self._cursor = resume
        if resume is not None:
            return False
        self.census, self.census_began = self._partial, self._pass_began
        self._pass_began, self._partial = None, {}
        return True

    def reset(self) -> None:
        """Forget the census (a new leader, or a leader stepping down)."""
        self.census = self.census_began = self._pass_began = self._last_ended = None
        self._partial, self._cursor, self._source_cursors = {}, None, {}
        self.utilization, self.average, self.balanced, self.settled = {}, None, None, False
        self._fruitless, self._cycle_moved = set(), set()

    # --- rounds ---

    def ended(self, now: float, moved_bytes: int | None) -> None:
        """A move of this round ended at ``now``: moved (``moved_bytes``), or not (None)."""
        self._last_ended = now
        if moved_bytes is not None:
            self.moved += 1
            self.moved_bytes += moved_bytes

    def step(
        self, now: float, live: Iterable[ChunkServerLoad], domains: dict[str, str], idle: bool
    ) -> list[Move]:
        """One tick while nothing needs repair: the census's next slice, then a new round of
        moves if the last one is over (``idle``: none of its moves queued or running) and the
        census has counted its moves."""
        complete = self.census_step(now)
        if not idle or self.census is None or not complete:
            return []
        if self._last_ended is not None and self.census_began is not None and self.census_began < self._last_ended:
            return []  # this pass began before the last move ended: the next one counts it
        return self.plan(live, domains)

    def plan(self, live: Iterable[ChunkServerLoad], domains: dict[str, str]) -> list[Move]:
        """A round of moves from the census and the servers' capacities. ``live`` are the
        servers that may give and take shards (live, registered, not draining), ``domains``
        the failure domain (`domain_key`) of every registered server."""
        census = self.census or {}
        self.settled = False
        servers = {s.node_id: s for s in live if s.capacity_bytes > 0}
        if len(servers) < 2:
            self.utilization, self.average, self.balanced = {}, None, None
            return []
        held = {node: census.get(node, 0) for node in servers}
        capacity = {node: s.capacity_bytes for node, s in servers.items()}
        average = sum(held.values()) / sum(capacity.values())
        util = {node: held[node] / capacity[node] for node in servers}
        self.utilization, self.average = util, average
        over = {n for n, u in util.items() if u > average + self.threshold}
        under = {n for n, u in util.items() if u < average - self.threshold}
        self.balanced = not over and not under
        if self.balanced:
            return []
        sources = over | ({n for n, u in util.items() if u > average} if under else set())
        targets = under | ({n for n, u in util.items() if u < average} if over else set())
        # One full on its disk (garbage not collected yet, other files) takes nothing now.
        targets = {n for n in targets if not servers[n].is_full}
        if not targets:
            return []
        give = {n: (util[n] - average) * capacity[n] for n in sources}
        room = {n: (average - util[n]) * capacity[n] for n in targets}
        moves: list[Move] = []
        # One move per block group a round: the next is planned from where the first went.
        groups: set[int] = set()
        # Each source reads its share of the round's placements, from where it stopped last
        # time: sources whose shards cannot move take no reading from the others.
        ordered = sorted(sources, key=lambda n: (-util[n], n))
        share_of_budget = max(MIN_LOOK, self.look_per_round // len(ordered))
        turn = self.rounds_planned % len(ordered)
        self.rounds_planned += 1
        for source in ordered[turn:] + ordered[:turn]:
            if len(moves) >= self.max_moves or max(room.values()) <= 0:
                break
            start = self._source_cursors.get(source)
            page, resume, _looked = self.state.placed_on(
                source, start_after=start, limit=min(self.look_per_source, share_of_budget)
            )
            self._source_cursors[source] = resume
            planned = len(moves)
            for bg_id, index, ec, size, nodes in page:
                if give[source] <= 0 or len(moves) >= self.max_moves or max(room.values()) <= 0:
                    break
                if bg_id in groups:
                    continue
                k = c.parse_policy(ec)[0]
                share = -(-size // k)
                if share >= 2 * give[source]:
                    continue  # it would leave the source further below the average than above
                target = self._target(source, nodes, share, servers, give[source], room, domains)
                if target is None:
                    continue
                give[source] -= share
                room[target] -= share
                groups.add(bg_id)
                margin = sum(1 for n in nodes if n in servers) - k
                moves.append(Move(bg_id, index, source, target, share, margin))
            # A source read all the way round without a move is fruitless (until one).
            if len(moves) > planned:
                self._fruitless.discard(source)
                self._cycle_moved.add(source)
            if resume is None:
                if source not in self._cycle_moved:
                    self._fruitless.add(source)
                self._cycle_moved.discard(source)
        if moves:
            self.rounds += 1
        # Every source read all the way round without a move: as even as shards allow.
        self.settled = not moves and sources <= self._fruitless
        return moves

    def _target(
        self, source: str, nodes: list[str], share: int, servers: dict[str, ChunkServerLoad],
        give: float, room: dict[str, float], domains: dict[str, str],
    ) -> str | None:
        """The emptiest target that may take a ``share``-byte shard of a group on ``nodes``
        from ``source`` (see `may_take`), has the free space, and for which the move brings
        the two servers' utilizations closer to the average (see `evens_out`); or None."""
        fitting = [
            n for n, left in room.items()
            if servers[n].free_bytes >= share
            and evens_out(share, give, servers[source].capacity_bytes, left, servers[n].capacity_bytes)
        ]
        for target in sorted(fitting, key=lambda n: (-room[n], n)):
            if may_take(source, target, nodes, domains):
                return target
        return None

    def status(self, now: float) -> dict[str, Any]:
        """The balancer's part of ``dogfs admin repair status``."""
        util = self.utilization
        return {
            "threshold": self.threshold,
            "balanced": self.balanced,
            "settled": self.settled,
            "average": None if self.average is None else round(self.average, 4),
            "utilization": {node: round(u, 4) for node, u in sorted(util.items())},
            "spread": round(max(util.values()) - min(util.values()), 4) if util else None,
            "census_s_ago": None if self.census_began is None else round(now - self.census_began, 1),
            "rounds": self.rounds,
            "moved": self.moved,
            "moved_bytes": self.moved_bytes,
        }


def evens_out(share: float, give: float, source_capacity: float, room: float, target_capacity: float) -> bool:
    """Whether moving ``share`` bytes from a server ``give`` bytes above the average to one
    with ``room`` bytes below it lowers the sum over servers of capacity times squared
    distance from the average utilization. Every move must: that sum then falls with every
    round, so rounds end, and no shard goes back and forth (one twice the excess, say, that
    would only make the target as far above the average as the source was)."""
    before = give * give / source_capacity + room * room / target_capacity
    after = (give - share) ** 2 / source_capacity + (room - share) ** 2 / target_capacity
    return after < before * (1 - 1e-9)


def may_take(source: str, target: str, nodes: Iterable[str], domains: dict[str, str]) -> bool:
    """Whether ``target`` may take the shard on ``source`` of a group placed on ``nodes``:
    it holds none of the group's shards, and its failure domain holds no more of the group's
    other shards than the source's does (so the group's spread never narrows). ``domains``
    maps node ids to `domain_key`; a node without one is a domain of its own."""
    nodes = list(nodes)
    if target in nodes:
        return False

    def domain(node: str) -> str:
        return domains.get(node, f"node:{node}")

    held = Counter(domain(n) for n in nodes if n != source)
    return held[domain(target)] <= held[domain(source)]


def domains_of(servers: Iterable[Any]) -> dict[str, str]:
    """node id -> `domain_key`, for chunk-server records or loads (anything with
    ``node_id`` and ``domain``)."""
    return {s.node_id: domain_key(ChunkServerLoad(s.node_id, 0, 0, s.domain)) for s in servers}
