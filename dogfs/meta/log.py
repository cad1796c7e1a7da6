# -*- test-case-name: tests.test_meta_service -*-
"""The single-node command log: commands applied to the local LMDB state in group commits.

This is what a one-member metadata cluster runs. Commands queue while a batch is being
written; the next batch takes them all in one LMDB transaction, so one fsync serves many
clients (group commit). Exactly-once retries come from `Sessioned` commands, which the
state machine itself deduplicates.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from attrs import define, field
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from dogfs.interfaces import ICommandLog
from dogfs.meta.commands import LOG_VERSION
from dogfs.meta.state import NamespaceState
from dogfs.raft.worker import SerialWorker
from dogfs.wire.protocol import WireError


@define
class Outcome:
    """The result of one proposed command, which any number of callers may wait for."""

    done: bool = False
    result: Any = None
    waiters: list[defer.Deferred[Any]] = field(factory=list)

    def wait(self) -> defer.Deferred[Any]:
        """A new Deferred with the outcome (now, or when it is known)."""
        if self.done:
            if isinstance(self.result, Failure):
                return defer.fail(self.result)
            return defer.succeed(self.result)
        d: defer.Deferred[Any] = defer.Deferred()
        self.waiters.append(d)
        return d

    def settle(self, result: Any) -> None:
        """Record the result (a value or a Failure) and wake every waiter."""
        self.done, self.result = True, result
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


@implementer(ICommandLog)
class LocalCommandLog:
    """Apply commands on this node only, in order, durably, a batch per fsync."""

    is_leader = True

    def __init__(
        self,
        reactor: Any,
        state: NamespaceState,
        pool: SerialWorker | None,
        *,
        node_id: str,
        address: str,
        http_address: str = "",
    ) -> None:
        self.reactor = reactor
        self.state = state
        self.pool = pool  # None: apply on the calling thread (unit tests)
        self.node_id = node_id
        self.address = address
        self.http_address = http_address
        self._queue: list[tuple[Any, Outcome]] = []
        self._busy = False
        self._next_index: int | None = None

    def propose(self, command: Any) -> defer.Deferred[Any]:
        outcome = Outcome()
        self._queue.append((command, outcome))
        if not self._busy:
            self._flush()
        return outcome.wait()

    def _flush(self) -> None:
        if self._next_index is None:
            self._next_index = self.state.applied_index + 1
        batch, self._queue = self._queue, []
        entries = [(self._next_index + i, command) for i, (command, _) in enumerate(batch)]
        self._next_index += len(batch)
        self._busy = True
        if self.pool is None:
            applied = defer.maybeDeferred(self.state.apply_batch, entries)
        elif not self.pool.running:
            # The service stopped its worker (shutting down): these commands were not applied.
            applied = defer.fail(WireError("unreachable", f"metadata node {self.node_id} is stopping"))
        else:
            applied = self.pool.run(partial(self.state.apply_batch, entries))

        def done(results: list[Any]) -> None:
            for (_, outcome), result in zip(batch, results, strict=True):
                outcome.settle(result)

        def failed(failure: Failure) -> None:
            for _, outcome in batch:
                outcome.settle(failure)

        def next_batch(_: Any) -> None:
            self._busy = False
            if self._queue:
                self._flush()

        applied.addCallbacks(done, failed).addBoth(next_batch)

    def read_barrier(self) -> defer.Deferred[None]:
        # Every acknowledged command is applied before its Deferred fires: reads are current.
        return defer.succeed(None)

    def leader_address(self) -> str | None:
        return self.address

    def members(self) -> list[dict[str, Any]]:
        applied = self.state.applied_index
        return [
            {
                "id": self.node_id,
                "address": self.address,
                "http_address": self.http_address,
                "role": "leader",
                "term": 1,
                "commit_index": applied,
                "applied_index": applied,
                "last_contact_s": 0.0,
                "log_version": LOG_VERSION,
            }
        ]
