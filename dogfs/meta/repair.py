# -*- test-case-name: tests.test_repair -*-
"""The repair scheduler: the metadata leader rebuilds the shards that dead chunk servers held,
and moves the shards of draining (or removed) servers elsewhere.

Lost servers: a chunk server silent for ``repair_after`` seconds (dead, and past that grace,
so that a restart or a short outage costs no rebuild) has lost its shards; a draining server
still holds its shards, but they must go; so must those of a server that is no longer
registered (``dogfs admin chunk remove --force``). Missing shards: a live server whose shard
reports leave out, twice in a row, a shard the namespace places on it (its file was lost, or
its scrubber or a read found it damaged: `MetaHandlers._find_gaps`) has lost that shard.

Every ``interval`` seconds the leader reads the next slice of the lost servers' shards (at
most ``plan_batch`` placements, from a cursor that wraps around, so that a tick costs the
reactor milliseconds however large the namespace) and keeps a task for each shard of a
committed block group, up to ``MAX_TASKS`` at once. Tasks run most endangered block group first (fewest readable shards
beyond ``k``), one per group at a time, ``concurrency`` at once over the cluster and at most
``per_target`` on one chunk server (what a chunk server takes at once). A task picks a live,
non-draining server that holds no shard of the group, in the failure domain holding fewest of
the group's readable shards, weighted by free space; sends it ``RebuildShard`` with the
group's readable shards as sources (it reads ``k`` of them and writes the rebuilt shard,
`dogfs/chunk/rebuild.py`) on a connection of its own; and only once the shard is durable
there commits ``MoveShard`` through the log. A group changed meanwhile (deleted, or the shard
moved) makes the MoveShard stale: the rebuilt copy is then garbage, and collected as such.

A failed task is retried after ``retry_after`` and listed in the status. A task that cannot
run yet (fewer than ``k`` readable shards; no server able to take it) is *blocked*, not
failed: counted in the status, tried again later, and not logged once per group.

All of this is soft state on the leader: a new leader plans from scratch (its registry's grace
period keeps it from calling anyone dead before it has heard the heartbeats). Time comes from
an injected clock, randomness from an injected generator.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import attrs
from attrs import define, field, frozen
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dogfs.meta import commands as c
from dogfs.meta.balance import BALANCE, Balancer, domains_of, may_take
from dogfs.meta.placement import choose_placement, domain_key
from dogfs.meta.registry import ChunkServerRegistry
from dogfs.wire import messages as m
from dogfs.wire.protocol import WireError

log = Logger()

__all__ = ["RepairScheduler", "RepairTask"]

#: Why a shard must be made again elsewhere, in the order they are served at equal risk:
#: its server is dead, its server no longer holds it (left out of two shard reports: lost
#: or damaged), its server was removed, or its server is draining. Balancing moves
#: (`dogfs.meta.balance`) come after all of them.
DEAD, MISSING, REMOVED, DRAINING = "dead", "missing", "removed", "draining"
_REASON_ORDER = {DEAD: 0, MISSING: 1, REMOVED: 2, DRAINING: 3, BALANCE: 4}

#: Missing shards planned per tick (they are few: a disk's bad sectors, a deleted file).
MISSING_BATCH = 1000

#: Why a task waits without having failed.
UNREADABLE, NO_TARGET = "unreadable", "no_target"

#: Answers of a chunk server that refused a rebuild over a sound connection (which is kept).
_SERVER_REFUSALS = frozenset({
    "busy", "no_space", "storage_error", "unavailable", "invalid_argument", "permission_denied",
})

#: Placements of lost servers read per planning tick, over all of them.
PLAN_BATCH = 5000

#: Tasks kept at once: planning reads no further while this many wait (bounds the memory and
#: the sort of every tick; a blocked task is let go, to be found again on a later round).
MAX_TASKS = 20_000

#: Queued tasks a dispatch pass looks at before it gives up for this turn.
DISPATCH_LOOK = 1000

#: Rebuilds sent to one chunk server at once (it refuses more: dogfs.chunk.rebuild).
PER_TARGET = 2

#: Errors kept for the status.
_ERRORS_KEPT = 20

#: Seconds a chunk server that refused a copy source gets rebuilds instead, before a copy is
#: tried on it again (it may have been upgraded meanwhile).
NO_COPY_FOR = 600.0


def _copying(message: m.RebuildShard) -> bool:
    """Whether ``message`` names the shard itself as its first source (a copy)."""
    return bool(message.sources) and message.sources[0][0] == message.index


@frozen
class RepairTask:
    """Shard ``index`` of block group ``bg_id`` must leave ``from_node`` (``reason``).
    ``margin`` is the group's readable shards minus ``k`` when planned: 0 means one more loss
    makes it unreadable. The group itself is read again when the task runs. ``to_node`` is
    where a balancing move goes (repairs pick their target when they run)."""

    bg_id: int
    index: int
    from_node: str
    reason: str
    margin: int
    to_node: str | None = None

    def key(self) -> tuple[bool, int, int, int, int]:
        """Sort key: repairs before balancing, most endangered first, then lost before
        draining, then id order."""
        return (self.reason == BALANCE, self.margin, _REASON_ORDER[self.reason], self.bg_id, self.index)


@define
class _Running:
    task: RepairTask
    to_node: str
    started: float


@frozen
class _Blocked:
    kind: str
    why: str
    node: str
    at: float


@define
class _Stats:
    rebuilt: int = 0
    copied: int = 0
    failed: int = 0
    stale: int = 0
    errors: deque[dict[str, Any]] = field(factory=lambda: deque(maxlen=_ERRORS_KEPT))


class RepairScheduler:
    """Plans and runs repairs while this member leads; see the module docstring.

    ``pool`` gives connections to chunk servers (``lease(address)`` and
    ``give_back(address, connection)``, as `dogfs.wire.pool.ConnectionPool`): each task has
    one to itself, so a task that fails closes no other's. ``propose(command)`` puts a command
    through the log and fires with its result. Call ``start`` when this member becomes leader
    and ``stop`` when it no longer is; ``tick`` is one planning step (tests call it).
    """

    def __init__(
        self,
        clock: IReactorTime,
        state: Any,
        registry: ChunkServerRegistry,
        propose: Callable[[Any], defer.Deferred[Any]],
        pool: Any,
        cell_size: int,
        *,
        repair_after: float = 600.0,
        interval: float = 10.0,
        concurrency: int = 4,
        per_target: int = PER_TARGET,
        task_timeout: float = 600.0,
        retry_after: float = 60.0,
        plan_batch: int = PLAN_BATCH,
        rng: random.Random | None = None,
        emit: Callable[..., object] = lambda kind, **fields: None,
        missing: Callable[[], dict[str, set[tuple[int, int]]]] = dict,
        balancer: Balancer | None = None,
    ) -> None:
        self.clock = clock
        self.state = state
        self.registry = registry
        self.propose = propose
        self.pool = pool
        self.emit = emit
        self.missing = missing
        self.balancer = balancer
        self.cell_size = cell_size
        self.repair_after = repair_after
        self.interval = interval
        self.concurrency = concurrency
        self.per_target = per_target
        self.task_timeout = task_timeout
        self.retry_after = retry_after
        self.plan_batch = plan_batch
        self.rng = rng or random.Random()
        self.tasks: dict[tuple[int, int], RepairTask] = {}
        self.running: dict[int, _Running] = {}
        self.blocked: dict[tuple[int, int], _Blocked] = {}
        self.stats = _Stats()
        self.planned_at: float | None = None
        self._order: list[tuple[int, int]] = []
        self._cursors: dict[str, tuple[int, int] | None] = {}
        self._retry_at: dict[tuple[int, int], float] = {}
        self._loop: LoopingCall | None = None
        self._rounds: dict[str, float] = {}  # lost server -> when its current round began
        self._usable: frozenset[str] = frozenset()
        self._draining: set[str] = set()
        self._registered: set[str] = set()
        self._turn = 0
        self._dispatch_pending = False
        #: Chunk servers that refused a copy source (a release before copies), until when:
        #: they are sent rebuilds from the other shards meanwhile. Unconfirmed until one such
        #: rebuild has worked there: a refusal for another reason is not held against it.
        self._no_copy: dict[str, float] = {}
        self._no_copy_unconfirmed: set[str] = set()

    def _now(self) -> float:
        return float(self.clock.seconds())  # type: ignore[misc] # zope method without self

    # --- lifecycle ---

    @property
    def active(self) -> bool:
        """Whether the periodic planning runs (this member leads)."""
        return self._loop is not None

    def start(self) -> None:
        """Plan and dispatch every ``interval`` seconds from now on (first after one interval,
        by which a new leader's registry has heard its chunk servers' heartbeats)."""
        if self._loop is not None:
            return
        loop = self._loop = LoopingCall(self.tick)
        loop.clock = self.clock

        def ended(failure: Any) -> None:  # pragma: no cover - tick catches everything
            log.failure("the repair scheduler stopped", failure)
            if self._loop is loop:
                self._loop = None

        loop.start(self.interval, now=False).addErrback(ended)

    def stop(self) -> None:
        """Plan no more; tasks under way finish (their MoveShard fails if we no longer lead)."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        self.tasks, self._order, self._cursors, self.blocked, self._rounds = {}, [], {}, {}, {}
        if self.balancer is not None:
            self.balancer.reset()

    # --- planning ---

    def lost_servers(self) -> dict[str, str]:
        """Chunk servers whose shards must be made elsewhere: node id -> reason."""
        registered = {r.node_id: r for r in self.state.chunk_servers()}
        out: dict[str, str] = {}
        for node in self.state.placed_nodes():
            record = registered.get(node)
            if record is None:
                out[node] = REMOVED
                continue
            dead_for = self.registry.dead_for(node)
            if dead_for is not None and dead_for >= self.repair_after:
                out[node] = DEAD
            elif record.draining:
                out[node] = DRAINING
        return out

    def waiting(self) -> dict[str, float]:
        """Dead servers not yet past ``repair_after``: node id -> seconds until repair starts."""
        out: dict[str, float] = {}
        for record in self.state.chunk_servers():
            dead_for = self.registry.dead_for(record.node_id)
            if dead_for is not None and dead_for < self.repair_after:
                out[record.node_id] = self.repair_after - dead_for
        return out

    def tick(self) -> None:
        """Plan the next slice and start what the limits allow. Never raises: an error is
        logged and the next tick tries again."""
        try:
            self.plan_slice()
            self._dispatch()
        except Exception:
            log.failure("repair planning failed; trying again in {interval}s", interval=self.interval)

    def plan_slice(self) -> None:
        """Read up to ``plan_batch`` more placements of the lost servers into ``tasks``."""
        now = self._now()
        self.planned_at = now
        self._retry_at = {key: t for key, t in self._retry_at.items() if t > now}
        lost = self.lost_servers()
        # A server back alive, or no longer draining: its tasks go (those running finish).
        missing = self.missing()
        repairing = bool(lost) or any(missing.values())
        for key, task in list(self.tasks.items()):
            if task.reason == BALANCE:
                if repairing:
                    del self.tasks[key]  # repair first; the balancer plans again afterwards
            elif task.reason == MISSING:
                if task.from_node in lost or key not in missing.get(task.from_node, ()):
                    del self.tasks[key]
            elif lost.get(task.from_node) != task.reason:
                del self.tasks[key]
        self.blocked = {
            key: b for key, b in self.blocked.items() if b.node in lost or key in missing.get(b.node, ())
        }
        self._cursors = {node: at for node, at in self._cursors.items() if node in lost}
        # A server newly able to take shards or serve them (back, registered, undrained):
        # whatever waited for one may go now.
        servers = self.state.chunk_servers()
        self._draining = {r.node_id for r in servers if r.draining}
        self._registered = {r.node_id for r in servers}
        usable = frozenset(
            load.node_id for load in self.registry.live() if load.node_id not in self._draining
        )
        if usable - self._usable:
            for key in list(self.blocked):
                self._retry_at.pop(key, None)
            self.blocked.clear()
        self._usable = usable
        alive = {load.node_id for load in self.registry.live()}
        budget = min(self.plan_batch, MAX_TASKS - len(self.tasks))
        # Each tick starts with the next lost server: none can be starved by those before it.
        order = sorted(lost, key=lambda n: (_REASON_ORDER[lost[n]], n))
        self._turn = (self._turn + 1) % max(1, len(order))
        for node in order[self._turn:] + order[: self._turn]:
            if budget <= 0:
                break
            start = self._cursors.get(node)
            if start is None:
                self._rounds[node] = now
            page, resume, looked = self.state.placed_on(node, start_after=start, limit=budget)
            budget -= max(1, looked)
            self._cursors[node] = resume  # None: start again from the first next time
            for bg_id, index, ec, _size, nodes in page:
                seen = self.blocked.get((bg_id, index))
                if seen is not None:  # still there: kept past the end of this round
                    self.blocked[(bg_id, index)] = attrs.evolve(seen, at=now)
                if self._retry_at.get((bg_id, index), 0.0) > now:
                    continue  # failed or blocked lately: a later round brings it back
                readable = sum(1 for n in nodes if n in alive)
                self.tasks[(bg_id, index)] = RepairTask(bg_id, index, node, lost[node], readable - c.parse_policy(ec)[0])
            if resume is None:
                # A whole round read: a blocked shard it did not find is gone (deleted).
                began = self._rounds.get(node, now)
                self.blocked = {
                    key: b for key, b in self.blocked.items() if b.node != node or b.at >= began
                }
        self._plan_missing(missing, lost, alive, now)
        if self.balancer is not None and not repairing:
            self._plan_balance(servers, now)
        self._order = sorted(self.tasks, key=lambda key: self.tasks[key].key())
        blocked = Counter(b.kind for b in self.blocked.values())
        if blocked:
            log.info("repair: {n} shards cannot be repaired yet ({kinds})", n=sum(blocked.values()),
                     kinds=", ".join(f"{count} {kind}" for kind, count in sorted(blocked.items())))

    def _plan_missing(
        self, missing: dict[str, set[tuple[int, int]]], lost: dict[str, str], alive: set[str], now: float
    ) -> None:
        """Tasks for the shards live servers no longer hold (their shard reports say so).

        ``missing`` is the handlers' own record: keys no longer placed on their server
        (moved, deleted) are dropped from it here, as are those of servers lost or removed
        (which report no more), so that they cost a planning budget once, not every tick."""
        gone = {(node, key) for node, keys in missing.items() for key in keys}
        budget = MISSING_BATCH
        nodes = sorted(missing)
        start = self._turn % max(1, len(nodes))
        for node in nodes[start:] + nodes[:start]:
            keys = missing[node]
            if node in lost or node not in self._registered:
                keys.clear()  # planned with the rest of its shards, or no longer reporting
                continue
            for key in sorted(keys):
                if budget <= 0:
                    return
                if key in self.tasks or self._retry_at.get(key, 0.0) > now:
                    continue
                budget -= 1
                found = self.state.block_group(key[0])
                if found is None or not found[1]:
                    keys.discard(key)  # deleted since
                    continue
                info = found[0]
                if key[1] >= len(info.shards) or info.shards[key[1]].node_id != node:
                    keys.discard(key)  # moved since
                    continue
                k = c.parse_policy(info.ec)[0]
                readable = sum(1 for s in info.shards if s.node_id in alive and (s.node_id, (info.id, s.index)) not in gone)
                self.tasks[key] = RepairTask(info.id, key[1], node, MISSING, readable - k)

    def _plan_balance(self, servers: list[Any], now: float) -> None:
        """The balancer's next step (nothing needs repair): a census slice, and a round of
        moves when the last one is over."""
        assert self.balancer is not None
        if self.registry.grace_left() > 0:
            return  # a new leader has not heard every server yet: it would balance a part
        draining = {r.node_id for r in servers if r.draining}
        registered = {r.node_id for r in servers}
        eligible = [
            load for load in self.registry.live() if load.node_id in registered and load.node_id not in draining
        ]
        idle = not any(t.reason == BALANCE for t in self.tasks.values()) and not any(
            r.task.reason == BALANCE for r in self.running.values()
        )
        for move in self.balancer.step(now, eligible, domains_of(servers), idle):
            key = (move.bg_id, move.index)
            if key in self.tasks or self._retry_at.get(key, 0.0) > now:
                continue
            self.tasks[key] = RepairTask(move.bg_id, move.index, move.from_node, BALANCE, move.margin, move.to_node)

    # --- running ---

    def _dispatch_soon(self) -> None:
        """Dispatch on a later reactor turn, once however many tasks end in this one."""
        if not self._dispatch_pending:
            self._dispatch_pending = True
            self.clock.callLater(0, self._dispatch_later)

    def _dispatch_later(self) -> None:
        self._dispatch_pending = False
        try:
            self._dispatch()
        except Exception:
            log.failure("repair dispatch failed; the next tick tries again")

    def _dispatch(self) -> None:
        if len(self.running) >= self.concurrency or not self._order:
            return
        now = self._now()
        servers = {r.node_id: r for r in self.state.chunk_servers()}
        self._draining = {node for node, r in servers.items() if r.draining}
        # Only registered servers: one whose registration is still in flight has no address.
        live = [load for load in self.registry.live() if load.node_id in servers]
        busy = Counter(r.to_node for r in self.running.values())
        loads = {load.node_id: load for load in live}
        domains = domains_of(servers.values())
        looked = 0
        for key in self._order:
            if len(self.running) >= self.concurrency:
                break
            task = self.tasks.get(key)
            if task is None or task.bg_id in self.running or self._retry_at.get(key, 0.0) > now:
                continue
            looked += 1
            if looked > DISPATCH_LOOK:
                break
            # The group as it is now (a shard of it may have moved since it was planned).
            prepared = self._request(task, live, servers)
            if prepared is None:
                continue
            message, holders = prepared
            if task.reason == BALANCE:
                target = self._balance_target(task, holders, loads, busy, domains)
            else:
                target = self._target(task, holders, live, busy)
            if target is None:
                continue
            if _copying(message) and self._no_copy.get(target, 0.0) > now:
                if len(message.sources) - 1 < c.parse_policy(message.policy)[0]:
                    # It can only rebuild, and too few other shards are readable: a repair
                    # may go elsewhere next time; a balancing move is planned again.
                    if task.reason == BALANCE:
                        self._gone(task)
                    continue
                message = attrs.evolve(message, sources=message.sources[1:])
            self.blocked.pop(key, None)
            busy[target] += 1
            self.running[task.bg_id] = _Running(task, target, now)
            d = defer.Deferred.fromCoroutine(self._run(task, target, message, servers[target].address))
            d.addErrback(lambda f: log.failure("repair task failed unexpectedly", f))

    def _request(
        self, task: RepairTask, live: list[Any], servers: dict[str, Any]
    ) -> tuple[m.RebuildShard, set[str]] | None:
        """The RebuildShard for ``task`` from the group as it is now, and the servers holding
        its shards; or None when it changed (the task is dropped) or too few of its shards
        are readable (blocked)."""
        found = self.state.block_group(task.bg_id)
        if found is None or not found[1]:
            self._gone(task)
            return None
        info = found[0]
        if task.index >= len(info.shards) or info.shards[task.index].node_id != task.from_node:
            self._gone(task)
            return None
        k = c.parse_policy(info.ec)[0]
        alive = {load.node_id for load in live}
        missing = self.missing()

        def readable(s: Any) -> bool:
            return s.node_id in alive and (info.id, s.index) not in missing.get(s.node_id, ())

        own = info.shards[task.index]
        # A shard still readable where it is (draining, balancing) is copied from there: one
        # shard's traffic instead of k. The others are the fallback if the copy fails.
        copy = readable(own)
        others = [s for s in info.shards if s.index != task.index and readable(s)]
        if len(others) < k and not copy:
            self._block(task, UNREADABLE, f"only {len(others)} of its other shards are readable, "
                        f"{k} are needed: it waits for chunk servers to return")
            return None
        # Data shards of servers staying in the cluster first: the target reads k of them.
        others.sort(key=lambda s: (s.node_id in self._draining, s.index >= k, s.index))
        message = m.RebuildShard(
            c.shard_id(task.bg_id, task.index), info.ec, task.index, info.size, self.cell_size,
            tuple((s.index, s.shard_id, servers[s.node_id].address if s.node_id in servers else s.address)
                  for s in ([own] if copy else []) + others),
        )
        return message, {s.node_id for s in info.shards}

    def _target(self, task: RepairTask, holders: set[str], live: list[Any], busy: Counter[str]) -> str | None:
        """A live, registered, non-draining server without a shard of the group, with free
        space and room for one more rebuild, in the domain holding fewest of the group's
        remaining shards; or None (the task is blocked unless the servers are only busy)."""
        free = [s for s in live if s.node_id not in holders and s.node_id not in self._draining]
        if not free:
            alive_holders = sum(1 for s in live if s.node_id in holders)
            self._block(task, NO_TARGET, f"every live chunk server that is not draining holds a "
                        f"shard of the group already ({alive_holders} live ones hold its shards)")
            return None
        roomy = [s for s in free if not s.is_full]
        if not roomy:
            self._block(task, NO_TARGET, "every chunk server that could take the shard is full")
            return None
        candidates = [s for s in roomy if busy[s.node_id] < self.per_target]
        if not candidates:
            return None  # only busy: the next task that ends frees a slot
        # Where the group's readable shards stay (not the one leaving a draining server).
        held = Counter(domain_key(s) for s in live if s.node_id in holders and s.node_id != task.from_node)
        least = min(held[domain_key(s)] for s in candidates)
        spread = [s for s in candidates if held[domain_key(s)] == least]
        return str(choose_placement(1, spread, self.rng)[0])

    def _balance_target(
        self, task: RepairTask, holders: set[str], loads: dict[str, Any], busy: Counter[str],
        domains: dict[str, str],
    ) -> str | None:
        """The target the balancer chose for ``task``, if it may still take the shard (the
        group as it is now); None when it is busy (the task waits) or may not (it goes).
        ``loads`` are the live registered servers by id, ``domains`` every server's."""
        target = task.to_node
        load = loads.get(target) if target is not None else None
        if target is None or load is None or target in self._draining or load.is_full or not may_take(
            task.from_node, target, holders, domains
        ):
            self._gone(task)  # the balancer plans again from the new figures
            return None
        if busy[target] >= self.per_target:
            return None
        return target

    def _block(self, task: RepairTask, kind: str, why: str) -> None:
        key = (task.bg_id, task.index)
        self.blocked[key] = _Blocked(kind, why, task.from_node, self._now())
        self._retry_at[key] = self._now() + self.retry_after
        self.tasks.pop(key, None)  # found again by a later round

    async def _run(self, task: RepairTask, target: str, message: m.RebuildShard, address: str) -> None:
        started = self._now()
        key = (task.bg_id, task.index)
        moved = False
        try:
            try:
                connection = await self.pool.lease(address)
            except Exception as e:
                self._failed(task, f"{target} is unreachable: {e}")
                return
            try:
                reply = await connection.call(message, timeout=self.task_timeout)
            except Exception as e:
                sound = isinstance(e, WireError) and e.code in _SERVER_REFUSALS
                if sound:
                    self.pool.give_back(address, connection)
                else:
                    connection.close()  # only this task's: the others keep theirs
                if isinstance(e, WireError) and e.code == "busy":
                    # Its rebuild slots are taken (by another leader's tasks, say): next tick.
                    self._retry_at[key] = self._now() + self.interval
                    return
                if isinstance(e, WireError) and e.code == "invalid_argument" and _copying(message):
                    # A chunk server of a release before copies refuses the shard itself as a
                    # source: try it at once with a rebuild from the other shards instead.
                    self._no_copy[target] = self._now() + NO_COPY_FOR
                    self._no_copy_unconfirmed.add(target)
                    self._retry_at.pop(key, None)
                    return
                self._failed(task, f"{target} could not rebuild it: {e}")
                return
            self.pool.give_back(address, connection)
            copied = _copying(message)
            if not copied and target in self._no_copy_unconfirmed:
                # It rebuilt what it would not copy: an older release. Rebuilds it gets.
                self._no_copy_unconfirmed.discard(target)
                log.info("{node} does not copy shards (an older release?): it gets rebuilds "
                         "from the other shards instead for {s:.0f}s", node=target, s=NO_COPY_FOR)
            result = await self.propose(c.MoveShard(task.bg_id, task.index, task.from_node, target))
            if isinstance(result, c.MetaError):
                if result.code in (c.ErrorCode.STALE_ALLOCATION, c.ErrorCode.NOT_FOUND):
                    # Deleted or changed meanwhile: the copy on the target is garbage now.
                    self.stats.stale += 1
                    self._gone(task)
                    return
                self._failed(task, f"the metadata refused the move: {result.message}")
                return
            self.tasks.pop(key, None)
            how = "copied to" if copied else "rebuilt on"
            if task.reason == BALANCE:
                assert self.balancer is not None
                self.balancer.ended(self._now(), reply.msg.size)
                moved = True
                self.emit(
                    "repair", level="info", node=task.from_node,
                    message=f"balancing: shard {message.shard_id} {how} {target} from {task.from_node}",
                )
                log.info(
                    "balancing: shard {shard} {how} {new} from {old} ({size} bytes in {seconds:.1f}s)",
                    shard=message.shard_id, how=how, new=target, old=task.from_node,
                    size=reply.msg.size, seconds=self._now() - started,
                )
                return
            self.stats.rebuilt += 1
            self.stats.copied += copied
            self.emit(
                "repair", level="info", node=task.from_node,
                message=f"shard {message.shard_id} of {task.from_node} ({task.reason}) {how} {target}",
            )
            log.info(
                "repaired shard {shard} ({reason} on {old}): {how} {new} with {size} bytes "
                "in {seconds:.1f}s", shard=message.shard_id, reason=task.reason, old=task.from_node,
                how=how, new=target, size=reply.msg.size, seconds=self._now() - started,
            )
        except Exception as e:
            self._failed(task, str(e))
        finally:
            self.running.pop(task.bg_id, None)
            if target in self._no_copy_unconfirmed and not _copying(message):
                # The rebuild failed too: the refusal was for another reason; copies again.
                self._no_copy_unconfirmed.discard(target)
                self._no_copy.pop(target, None)
            if task.reason == BALANCE and not moved:
                assert self.balancer is not None
                self.balancer.ended(self._now(), None)
            self._dispatch_soon()

    def _gone(self, task: RepairTask) -> None:
        """The group was deleted, or the shard moved, since the task was planned."""
        key = (task.bg_id, task.index)
        self.tasks.pop(key, None)
        self.blocked.pop(key, None)

    def _failed(self, task: RepairTask, why: str) -> None:
        self.stats.failed += 1
        key = (task.bg_id, task.index)
        self._retry_at[key] = self._now() + self.retry_after
        self.tasks.pop(key, None)  # found again by a later round
        self.stats.errors.append({
            "block_group": f"{task.bg_id:016x}", "index": task.index, "from": task.from_node,
            "reason": task.reason, "error": why, "at": self._now(),
        })
        what = "balancing move" if task.reason == BALANCE else "repair"
        self.emit(
            "repair", level="warn", node=task.from_node,
            message=f"{what} of shard {c.shard_id(task.bg_id, task.index)} of {task.from_node} failed: {why}",
        )
        log.warn("{what} of shard {shard} ({reason} on {node}) failed: {why}", what=what,
                 shard=c.shard_id(task.bg_id, task.index), reason=task.reason, node=task.from_node, why=why)

    # --- status ---

    def _queued(self, balancing: bool) -> int:
        """Tasks waiting to run: balancing moves, or repairs."""
        running = {r.task for r in self.running.values()}
        return sum(1 for t in self.tasks.values() if (t.reason == BALANCE) == balancing and t not in running)

    def status(self) -> dict[str, Any]:
        """What ``dogfs admin repair status`` shows."""
        now = self._now()
        lost = {}
        stuck = Counter(b.node for b in self.blocked.values())
        for node, reason in self.lost_servers().items():
            committed, pending = self.state.count_on(node)
            lost[node] = {"reason": reason, "shards": committed, "pending": pending, "blocked": stuck[node]}
        blocked = Counter(b.kind for b in self.blocked.values())
        examples: dict[str, str] = {}
        for b in self.blocked.values():
            examples.setdefault(b.kind, b.why)
        return {
            "active": self.active,
            "repair_after": self.repair_after,
            "concurrency": self.concurrency,
            "grace_left": round(self.registry.grace_left(), 1),
            "lost_servers": lost,
            "missing_shards": {node: len(keys) for node, keys in sorted(self.missing().items()) if keys},
            "waiting_servers": {node: round(left, 1) for node, left in self.waiting().items()},
            "queued": self._queued(balancing=False),
            "blocked": {kind: {"shards": n, "why": examples[kind]} for kind, n in sorted(blocked.items())},
            "interval": self.interval,
            "planned_s_ago": None if self.planned_at is None else round(now - self.planned_at, 1),
            "running": [
                {
                    "block_group": f"{r.task.bg_id:016x}", "index": r.task.index, "from": r.task.from_node,
                    "to": r.to_node, "reason": r.task.reason, "margin": r.task.margin,
                    "seconds": round(now - r.started, 1),
                }
                for r in self.running.values()
            ],
            "rebuilt": self.stats.rebuilt,
            "copied": self.stats.copied,
            "failed": self.stats.failed,
            "stale": self.stats.stale,
            "errors": [{**e, "s_ago": round(now - e["at"], 1)} for e in self.stats.errors],
            "balance": None if self.balancer is None else {
                **self.balancer.status(now),
                "queued": self._queued(balancing=True),
                "running": sum(1 for r in self.running.values() if r.task.reason == BALANCE),
            },
        }
