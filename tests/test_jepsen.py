# -*- test-case-name: tests.test_jepsen -*-
"""A Jepsen-style test of the metadata Raft group, on real processes on loopback.

Several clients (each its own DogFSClient, so its own session) run put, get, ls, rm and mv on a
handful of paths while a nemesis kills (SIGKILL), pauses (SIGSTOP / SIGCONT) and restarts
metadata nodes. Every operation is recorded with its call and return time; the history must be
linearizable (dogfs.raft.checker, the namespace of the few paths modelled as one object), and
every acknowledged write must be accounted for: a final read, after the faults heal, must agree
with some linearization. Seeded: the printed seed replays the same schedule of operations and
faults (timing still varies).
"""

from __future__ import annotations

import io
import os
import random
import signal
import time
from collections.abc import Hashable
from typing import Any

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from dogfs.raft.checker import Model, Operation, check_linearizable
from tests.test_meta_raft_process import RealCluster, sleep, wait_for_leader

DIR = "/j"
NAMES = ("a", "b", "c")
CLIENTS = 5
DURATION = 30.0
# Errors that say the operation certainly did nothing: its outcome is known.
DEFINITE = {
    "not_found", "exists", "not_enough_chunk_servers", "invalid_argument", "not_a_directory",
    "is_a_directory", "stale_allocation",
}

State = tuple[str | None, ...]


def _step(state: Hashable, inp: Any, out: Any, completed: bool) -> tuple[bool, Hashable]:
    """The namespace of NAMES as one object: a value (or None) per name."""
    s: State = state  # type: ignore[assignment]
    kind = inp[0]

    def with_(i: int, v: str | None, base: State = s) -> State:
        return base[:i] + (v,) + base[i + 1:]

    if kind == "put":
        return (not completed or out == "ok"), with_(inp[1], inp[2])
    if kind == "get":
        return (not completed or out == s[inp[1]]), s
    if kind == "ls":
        present = tuple(NAMES[i] for i, v in enumerate(s) if v is not None)
        return (not completed or out == present), s
    if kind == "rm":
        i = inp[1]
        if not completed:
            return True, with_(i, None)
        if out == "ok":
            return s[i] is not None, with_(i, None)
        return out == "not_found" and s[i] is None, s
    if kind == "mv":
        i, j = inp[1], inp[2]
        can = s[i] is not None and s[j] is None
        moved = with_(i, None, with_(j, s[i])) if can else s
        if not completed:
            return True, moved
        if out == "ok":
            return can, moved
        if out == "not_found":
            return s[i] is None, s
        if out == "exists":
            return s[i] is not None and s[j] is not None, s
        return False, s
    raise ValueError(f"unknown operation {inp!r}")


def _describe(inp: Any, out: Any) -> str:
    kind = inp[0]
    args = [NAMES[a] if isinstance(a, int) else a for a in inp[1:]]
    return f"{kind} {' '.join(map(str, args))} -> {out}"


NamespaceModel = Model(init=lambda: (None,) * len(NAMES), step=_step, describe=_describe)


def body(value: str) -> bytes:
    """A file's content for a put of ``value`` (small; the name repeated)."""
    return (value.encode() + b";") * 20


class History:
    """Operations as the clients saw them, with times in microseconds since the start."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.ops: list[Operation] = []
        self.errors: dict[str, int] = {}

    def now(self) -> int:
        return int((time.monotonic() - self.t0) * 1e6)

    def add(self, client: str, call: int, inp: Any, out: Any, done: bool) -> None:
        self.ops.append(Operation(client, call, self.now() if done else None, inp, out))


class JepsenTests(TestCase):
    """Concurrent clients and a nemesis against three metadata nodes."""

    timeout = 300

    def test_linearizable_under_faults(self) -> defer.Deferred[None]:
        """Kills, pauses and restarts of metadata nodes during put/get/ls/rm/mv: the history
        is linearizable and nothing acknowledged is lost."""
        return defer.Deferred.fromCoroutine(self._scenario(int(os.environ.get("DOGFS_JEPSEN_SEED", "4"))))

    async def _scenario(self, seed: int) -> None:
        from twisted.internet import reactor

        cluster = RealCluster(metas=3, chunks=3, ec="RS-2-1")
        self.addCleanup(cluster.destroy)
        await threads.deferToThread(cluster.up)
        setup = cluster.client(timeout=20)
        self.addCleanup(setup.close)
        await setup.mkdir(DIR)
        history = History()
        stop = [False]
        rng = random.Random(seed)
        faults: list[str] = []

        async def client_loop(n: int) -> None:
            crng = random.Random(f"{seed}-{n}")
            client = cluster.client(timeout=4.0)
            self.addCleanup(client.close)
            name = f"c{n}"
            k = 0
            while not stop[0]:
                k += 1
                await self._one_op(client, name, crng, k, history)

        async def nemesis() -> None:
            metas = cluster.meta_ids()
            await sleep(2.0)
            while not stop[0]:
                chosen = rng.choice(metas)
                fault = rng.choice(["kill", "pause", "kill-leader", "pause-leader"])
                victim = chosen
                if fault.endswith("leader"):
                    leader: Any = await threads.deferToThread(cluster.leader)
                    victim = leader or chosen
                faults.append(f"{history.now() / 1e6:.1f}s {fault} {victim}")
                if fault.startswith("kill"):
                    cluster.kill(victim)
                    await sleep(rng.uniform(0.5, 2.0))
                    await threads.deferToThread(cluster.start, victim)
                else:
                    pid = cluster.pids()[victim]
                    os.kill(pid, signal.SIGSTOP)
                    await sleep(rng.uniform(0.5, 2.0))
                    os.kill(pid, signal.SIGCONT)
                await sleep(rng.uniform(1.0, 3.0))

        loops = [defer.Deferred.fromCoroutine(client_loop(n)) for n in range(CLIENTS)]
        chaos = defer.Deferred.fromCoroutine(nemesis())
        reactor.callLater(DURATION, lambda: stop.__setitem__(0, True))  # type: ignore[attr-defined]
        await defer.gatherResults([*loops, chaos], consumeErrors=True)

        # Healed: every node runs; a final read of everything joins the history.
        for node in cluster.meta_ids():
            if node not in cluster.pids():
                await threads.deferToThread(cluster.start, node)
        await wait_for_leader(cluster)
        final = cluster.client(timeout=20)
        self.addCleanup(final.close)
        for i in range(len(NAMES)):
            await self._get(final, "final", i, history, strict=True)
        await self._ls(final, "final", history, strict=True)

        completed = sum(1 for op in history.ops if op.ret is not None)
        unknown = len(history.ops) - completed
        acked_puts = sum(1 for op in history.ops if op.input[0] == "put" and op.output == "ok")
        print(f"\nseed {seed}: {len(history.ops)} operations ({completed} completed, {unknown} "
              f"of unknown outcome, {acked_puts} acknowledged puts); faults: {'; '.join(faults)}; "
              f"errors: {history.errors}")
        self.assertGreater(completed, 100, "too few operations completed to say anything")
        self.assertTrue(faults)
        result = await threads.deferToThread(check_linearizable, history.ops, NamespaceModel, 5_000_000)
        self.assertTrue(result.ok, result.explain(NamespaceModel))
        self.assertFalse(result.inconclusive, "the checker's search budget ran out")

    async def _one_op(self, client: Any, name: str, rng: random.Random, k: int, history: History) -> None:
        i = rng.randrange(len(NAMES))
        roll = rng.random()
        if roll < 0.35:
            value = f"{name}-{k}"
            await self._mutate(client, name, ("put", i, value), history,
                               lambda: client.put(f"{DIR}/{NAMES[i]}", io.BytesIO(body(value))))
        elif roll < 0.60:
            await self._get(client, name, i, history)
        elif roll < 0.75:
            await self._ls(client, name, history)
        elif roll < 0.87:
            await self._mutate(client, name, ("rm", i), history, lambda: client.rm(f"{DIR}/{NAMES[i]}"))
        else:
            j = (i + rng.randrange(1, len(NAMES))) % len(NAMES)
            await self._mutate(client, name, ("mv", i, j), history,
                               lambda: client.mv(f"{DIR}/{NAMES[i]}", f"{DIR}/{NAMES[j]}"))

    async def _mutate(self, client: Any, name: str, inp: tuple[Any, ...], history: History, run: Any) -> None:
        from dogfs.client.api import DogFSError

        call = history.now()
        try:
            await run()
        except DogFSError as e:
            history.errors[e.code] = history.errors.get(e.code, 0) + 1
            if e.code in DEFINITE:
                if inp[0] == "put":
                    return  # it did nothing: not part of the history
                history.add(name, call, inp, e.code, True)
            else:
                history.add(name, call, inp, None, False)  # outcome unknown
            return
        history.add(name, call, inp, "ok", True)

    async def _get(self, client: Any, name: str, i: int, history: History, strict: bool = False) -> None:
        from dogfs.client.api import DogFSError

        call = history.now()
        sink = io.BytesIO()
        try:
            await client.get(f"{DIR}/{NAMES[i]}", sink)
        except DogFSError as e:
            if e.code == "not_found":
                history.add(name, call, ("get", i), None, True)
                return
            history.errors[e.code] = history.errors.get(e.code, 0) + 1
            if strict:
                raise
            return  # a failed read did nothing
        data = sink.getvalue()
        value = data.split(b";", 1)[0].decode()
        self.assertEqual(data, body(value), f"{NAMES[i]} is half-visible or corrupt")
        history.add(name, call, ("get", i), value, True)

    async def _ls(self, client: Any, name: str, history: History, strict: bool = False) -> None:
        from dogfs.client.api import DogFSError

        call = history.now()
        try:
            entries = await client.ls(DIR)
        except DogFSError as e:
            history.errors[e.code] = history.errors.get(e.code, 0) + 1
            if strict:
                raise
            return
        present = tuple(sorted(e.name for e in entries if e.name in NAMES))
        history.add(name, call, ("ls",), present, True)


class ModelTests(TestCase):
    """The namespace model itself (so a checker verdict means what it says)."""

    def test_model_accepts_and_refuses(self) -> None:
        """Sequential histories: a consistent one passes, a lost write and a stale read fail."""
        def op(t: int, inp: Any, out: Any) -> Operation:
            return Operation("c", t, t + 1, inp, out)

        good = [op(0, ("put", 0, "v1"), "ok"), op(2, ("mv", 0, 1), "ok"), op(4, ("get", 1), "v1"),
                op(6, ("ls",), ("b",)), op(8, ("rm", 0), "not_found"), op(10, ("mv", 1, 1), "exists")]
        self.assertTrue(check_linearizable(good, NamespaceModel).ok)
        lost = [op(0, ("put", 0, "v1"), "ok"), op(2, ("get", 0), None)]
        self.assertFalse(check_linearizable(lost, NamespaceModel).ok)
        stale = [op(0, ("put", 0, "v1"), "ok"), op(2, ("put", 0, "v2"), "ok"), op(4, ("get", 0), "v1")]
        self.assertFalse(check_linearizable(stale, NamespaceModel).ok)
        unknown = [Operation("c", 0, None, ("put", 0, "v1")), op(2, ("get", 0), "v1")]
        self.assertTrue(check_linearizable(unknown, NamespaceModel).ok)
