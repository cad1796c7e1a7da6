# -*- test-case-name: tests.test_raft_worker -*-
"""Background threads that run blocking jobs and answer on the reactor thread.

Owns ``WorkerPool`` (a chunk server's disk work: reads, appends, fsyncs) and ``SerialWorker``
(one thread, so jobs run in order: where a Raft member's durable writes go). Twisted's
``ThreadPool`` with ``deferToThreadPool`` does the same job with a team coordinator, a context
tracker and several locks per call: about 53 us of CPU per job here against 17 us for a put
on a ``SimpleQueue`` and one ``callFromThread`` (4 threads, 4 jobs in flight, same run). A
Raft member hands its storage one job per Ready and a chunk server one per cell read, hundreds
to thousands a second. May import Twisted only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

__all__ = ["SerialWorker", "WorkerPool"]

T = TypeVar("T")

_STOP = object()


class WorkerPool:
    """Runs ``f(*args)`` calls on ``threads`` threads of its own, up to that many at once.

    ``run`` returns a Deferred that fires on the reactor thread with the call's result (or
    its failure). ``start`` creates the threads (not ``__init__``: twistd forks after building
    services); ``stop`` lets the queued calls finish and joins the threads.
    """

    def __init__(self, reactor: IReactorFromThreads, name: str, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"a worker pool needs at least one thread, not {threads}")
        self._reactor: Any = reactor
        self.name = name
        self.size = threads
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the threads (once)."""
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
                for i in range(self.size)
            ]
            for thread in self._threads:
                thread.start()

    @property
    def running(self) -> bool:
        """Whether `run` takes calls (between `start` and `stop`)."""
        return bool(self._threads)

    def stop(self, wait: bool = True) -> None:
        """Finish the calls already queued, then end the threads; with ``wait``, block until
        they have (without, a call blocked for good, such as a read of a pipe nobody writes,
        cannot hold the caller: the threads are daemons)."""
        threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(_STOP)
        if wait:
            for thread in threads:
                thread.join()

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """Queue ``f(*args)``; the Deferred fires (on the reactor thread) with what it returned."""
        if not self._threads:
            raise RuntimeError(f"worker pool {self.name} is not running")
        d: Deferred[T] = Deferred()
        self._jobs.put((f, args, d))
        return d

    def _work(self) -> None:
        call_back = self._reactor.callFromThread
        jobs = self._jobs
        while True:
            item = jobs.get()
            if item is _STOP:
                return
            f, args, d = item
            result = None
            try:
                result = f(*args)
            except BaseException:
                call_back(d.errback, Failure())
            else:
                call_back(d.callback, result)
            # Hold nothing (a cell's buffer, a view of it) while waiting for the next job.
            item = f = args = d = result = None


class SerialWorker(WorkerPool):
    """Runs calls one at a time, in submission order, on a thread of its own: a
    `WorkerPool` of one thread."""

    def __init__(self, reactor: IReactorFromThreads, name: str) -> None:
        super().__init__(reactor, name, 1)
