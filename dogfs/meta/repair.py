# -*- test-case-name: tests.test_repair -*-
"""The repair scheduler: the metadata leader rebuilds the shards that dead chunk servers held,
and moves the shards of draining (or removed) servers elsewhere.

Every ``interval`` seconds the leader plans, from the namespace and its liveness registry:

- a chunk server silent for ``repair_after`` seconds (dead, and past that grace, so that a
  restart or a short outage costs no rebuild) has lost its shards;
- a draining server still holds its shards, but they must go; so must those of a server
  that is no longer registered (``dogfs admin chunk remove --force``).

Each such shard of a committed block group is a task. The most endangered block groups go
first (fewest readable shards beyond ``k``), one task per block group at a time, at most
``concurrency`` at once over the cluster. A task picks a live, non-draining chunk server that
holds no shard of the group (the placement planner, weighted by free space), sends it
``RebuildShard`` with the group's readable shards as sources (it reads ``k`` of them and
writes the rebuilt shard, `dogfs/chunk/rebuild.py`), then commits ``MoveShard`` through the
log. A group changed meanwhile (deleted, or the shard moved) makes the MoveShard stale: the
rebuilt copy is then garbage, and collected as such. A failed task is retried after a
back-off; the last errors are kept for ``dogfs admin repair status``.

All of this is soft state on the leader: a new leader plans from scratch (its registry's grace
period keeps it from calling anyone dead before it has heard the heartbeats). Time comes from
an injected clock, randomness from an injected generator.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from typing import Any

from attrs import define, field, frozen
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dogfs.meta import commands as c
from dogfs.meta.placement import NotEnoughChunkServers, choose_placement
from dogfs.meta.registry import ChunkServerRegistry
from dogfs.wire import messages as m
from dogfs.wire.protocol import WireError

log = Logger()

__all__ = ["RepairScheduler", "RepairTask"]

#: Why a shard must be made again elsewhere, in the order they are served at equal risk.
DEAD, REMOVED, DRAINING = "dead", "removed", "draining"
_REASON_ORDER = {DEAD: 0, REMOVED: 1, DRAINING: 2}

#: Answers of a chunk server that refused a rebuild over a sound connection.
_SERVER_REFUSALS = frozenset({"busy", "no_space", "storage_error", "unavailable", "invalid_argument", "permission_denied"})

#: Errors kept for the status.
_ERRORS_KEPT = 20


@frozen
class RepairTask:
    """Shard ``index`` of block group ``bg_id`` must leave ``from_node`` (``reason``).
    ``margin`` is the group's readable shards minus ``k`` when planned: 0 means one more
    loss makes it unreadable."""

    bg_id: int
    index: int
    from_node: str
    reason: str
    margin: int

    def key(self) -> tuple[int, int, int, int]:
        """Sort key: most endangered first, then lost before draining, then id order."""
        return (self.margin, _REASON_ORDER[self.reason], self.bg_id, self.index)


@define
class _Running:
    task: RepairTask
    to_node: str
    started: float


@define
class _Stats:
    rebuilt: int = 0
    failed: int = 0
    stale: int = 0
    errors: deque[dict[str, Any]] = field(factory=lambda: deque(maxlen=_ERRORS_KEPT))


class RepairScheduler:
    """Plans and runs repairs while this member leads; see the module docstring.

    ``dial(address)`` gives a Deferred wire connection to a chunk server (a pool's ``get``);
    ``propose(command)`` puts a command through the log and fires with its result. Call
    ``start`` when this member becomes leader and ``stop`` when it no longer is.
    """

    def __init__(
        self,
        clock: IReactorTime,
        state: Any,
        registry: ChunkServerRegistry,
        propose: Callable[[Any], defer.Deferred[Any]],
        dial: Callable[[str], defer.Deferred[Any]],
        cell_size: int,
        *,
        repair_after: float = 600.0,
        interval: float = 10.0,
        concurrency: int = 4,
        task_timeout: float = 600.0,
        retry_after: float = 60.0,
        scan_limit: int = 100_000,
        rng: random.Random | None = None,
        drop: Callable[[str], object] = lambda address: None,
    ) -> None:
        self.clock = clock
        self.state = state
        self.registry = registry
        self.propose = propose
        self.dial = dial
        self.drop = drop
        self.cell_size = cell_size
        self.repair_after = repair_after
        self.interval = interval
        self.concurrency = concurrency
        self.task_timeout = task_timeout
        self.retry_after = retry_after
        self.scan_limit = scan_limit
        self.rng = rng or random.Random()
        self.running: dict[int, _Running] = {}
        self.queue: list[RepairTask] = []
        self.stats = _Stats()
        self.planned_at: float | None = None
        self._retry_at: dict[int, float] = {}
        self._loop: LoopingCall | None = None

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
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("the repair scheduler stopped", f)
        )

    def stop(self) -> None:
        """Plan no more; tasks under way finish (their MoveShard fails if we no longer lead)."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        self.queue = []

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

    def plan(self) -> list[RepairTask]:
        """Every shard to repair or move now, most endangered first (one pass over the lost
        servers' shards, at most ``scan_limit`` each)."""
        lost = self.lost_servers()
        if not lost:
            return []
        alive = {load.node_id for load in self.registry.live()}
        tasks: dict[tuple[int, int], RepairTask] = {}
        widths: dict[str, int] = {}
        for node, reason in lost.items():
            # Uploads in progress are left out: their clients write around failures.
            for index, info in self.state.committed_groups_on(node, limit=self.scan_limit):
                k = widths.get(info.ec)
                if k is None:
                    k = widths[info.ec] = c.parse_policy(info.ec)[0]
                readable = sum(1 for s in info.shards if s.node_id in alive)
                tasks[(info.id, index)] = RepairTask(info.id, index, node, reason, readable - k)
        return sorted(tasks.values(), key=RepairTask.key)

    # --- running ---

    def tick(self) -> None:
        """Plan again and start what the concurrency allows."""
        self.queue = self.plan()
        self.planned_at = self._now()
        self._dispatch()

    def _dispatch(self) -> None:
        now = self._now()
        waiting: list[RepairTask] = []
        for task in self.queue:
            if len(self.running) >= self.concurrency:
                waiting.append(task)
                continue
            if task.bg_id in self.running or self._retry_at.get(task.bg_id, 0.0) > now:
                waiting.append(task)
                continue
            target = self._target(task)
            if target is None:
                waiting.append(task)
                continue
            self.running[task.bg_id] = _Running(task, target, now)
            d = defer.Deferred.fromCoroutine(self._run(task, target))
            d.addErrback(lambda f: log.failure("repair task failed unexpectedly", f))
        self.queue = waiting

    def _target(self, task: RepairTask) -> str | None:
        """A live, non-draining server without a shard of the group, or None (noted)."""
        found = self.state.block_group(task.bg_id)
        if found is None:
            return None
        info = found[0]
        holders = {s.node_id for s in info.shards}
        draining = {r.node_id for r in self.state.chunk_servers() if r.draining}
        try:
            chosen = choose_placement(1, self.registry.live(), self.rng, exclude=holders | draining)
        except NotEnoughChunkServers:
            self._failed(
                task, f"no live chunk server without a shard of the group is free to take "
                f"shard {task.index} ({len(holders)} of them hold its shards)"
            )
            return None
        return str(chosen[0])

    async def _run(self, task: RepairTask, target: str) -> None:
        started = self._now()
        try:
            message = self._request(task)
            addresses = {r.node_id: r.address for r in self.state.chunk_servers()}
            address = addresses.get(target)
            if message is None or address is None:
                return
            try:
                connection = await self.dial(address)
                reply = await connection.call(message, timeout=self.task_timeout)
            except Exception as e:
                self._failed(task, f"{target} could not rebuild it: {e}")
                if not isinstance(e, WireError) or e.code not in _SERVER_REFUSALS:
                    self.drop(address)  # the connection may be the trouble: dial afresh
                return
            result = await self.propose(c.MoveShard(task.bg_id, task.index, task.from_node, target))
            if isinstance(result, c.MetaError):
                if result.code in (c.ErrorCode.STALE_ALLOCATION, c.ErrorCode.NOT_FOUND):
                    # Deleted or changed meanwhile: the copy on the target is garbage now.
                    self.stats.stale += 1
                    return
                self._failed(task, f"the metadata refused the move: {result.message}")
                return
            self.stats.rebuilt += 1
            self._retry_at.pop(task.bg_id, None)
            log.info(
                "repaired shard {shard} ({reason} on {old}): rebuilt on {new} with {size} bytes "
                "in {seconds:.1f}s", shard=message.shard_id, reason=task.reason, old=task.from_node,
                new=target, size=reply.msg.size, seconds=self._now() - started,
            )
        except Exception as e:
            self._failed(task, str(e))
        finally:
            self.running.pop(task.bg_id, None)
            # On a later turn: this may run inside _dispatch (a task that ended at once).
            self.clock.callLater(0, self._next)

    def _next(self) -> None:
        self._dispatch()  # the queue is empty once stopped

    def _request(self, task: RepairTask) -> m.RebuildShard | None:
        """The RebuildShard for ``task`` from the group as it is now, or None (noted) when
        it changed or too few of its shards are readable."""
        found = self.state.block_group(task.bg_id)
        if found is None or not found[1]:
            return None
        info = found[0]
        if task.index >= len(info.shards) or info.shards[task.index].node_id != task.from_node:
            return None
        k = c.parse_policy(info.ec)[0]
        alive = {load.node_id for load in self.registry.live()}
        draining = {r.node_id for r in self.state.chunk_servers() if r.draining}
        readable = [s for s in info.shards if s.index != task.index and s.node_id in alive]
        if len(readable) < k:
            self._failed(
                task, f"only {len(readable)} of its shards are readable, {k} are needed: it "
                "waits for chunk servers to return"
            )
            return None
        # Data shards of servers staying in the cluster first: the target reads k of them.
        readable.sort(key=lambda s: (s.node_id in draining, s.index >= k, s.index))
        return m.RebuildShard(
            c.shard_id(task.bg_id, task.index), info.ec, task.index, info.size, self.cell_size,
            tuple((s.index, s.shard_id, s.address) for s in readable),
        )

    def _failed(self, task: RepairTask, why: str) -> None:
        self.stats.failed += 1
        self._retry_at[task.bg_id] = self._now() + self.retry_after
        self.stats.errors.append({
            "block_group": f"{task.bg_id:016x}", "index": task.index, "from": task.from_node,
            "error": why, "at": self._now(),
        })
        log.warn("repair of shard {shard} ({reason} on {node}) failed: {why}",
                 shard=c.shard_id(task.bg_id, task.index), reason=task.reason, node=task.from_node, why=why)

    # --- status ---

    def status(self) -> dict[str, Any]:
        """What ``dogfs admin repair status`` shows."""
        now = self._now()
        lost = self.lost_servers()
        remaining: dict[str, int] = {}
        for node in lost:
            remaining[node] = len(self.state.shards_on(node, limit=self.scan_limit))
        return {
            "active": self.active,
            "repair_after": self.repair_after,
            "concurrency": self.concurrency,
            "lost_servers": {node: {"reason": reason, "shards": remaining[node]} for node, reason in lost.items()},
            "waiting_servers": {node: round(left, 1) for node, left in self.waiting().items()},
            "queued": len(self.queue),
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
            "failed": self.stats.failed,
            "stale": self.stats.stale,
            "errors": [{**e, "s_ago": round(now - e["at"], 1)} for e in self.stats.errors],
        }
