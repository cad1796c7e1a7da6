# -*- test-case-name: tests.test_raft_worker -*-
"""One background thread that runs jobs in order: where a Raft member's durable writes go.

Owns ``SerialWorker``. Twisted's ``ThreadPool`` with ``deferToThreadPool`` does the same job
with a team coordinator, a context tracker and several locks per call; a Raft member hands
its storage one job per Ready (hundreds a second), and on this 2-core machine that machinery
cost a follower about a fifth of its reactor thread. Here a job is one put on a
``SimpleQueue`` and its answer one ``callFromThread``. May import Twisted only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

__all__ = ["SerialWorker"]

T = TypeVar("T")

_STOP = object()


class SerialWorker:
    """Runs ``job()`` calls one at a time, in submission order, on a thread of its own.

    ``run`` returns a Deferred that fires on the reactor thread with the job's result (or
    its failure). ``start`` creates the thread (not ``__init__``: twistd forks after building
    services); ``stop`` lets the queued jobs finish and joins the thread.
    """

    def __init__(self, reactor: IReactorFromThreads, name: str) -> None:
        self._reactor: Any = reactor
        self.name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """Finish the jobs already queued, then end the thread; with ``wait``, block until it
        has (without, a job blocked for good, such as a read of a pipe nobody writes, cannot
        hold the caller: the thread is a daemon)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(_STOP)
            if wait:
                thread.join()

    def run(self, job: Callable[[], T]) -> Deferred[T]:
        """Queue ``job``; the Deferred fires (on the reactor thread) with what it returned."""
        if self._thread is None:
            raise RuntimeError(f"worker {self.name} is not running")
        d: Deferred[T] = Deferred()
        self._jobs.put((job, d))
        return d

    def _work(self) -> None:
        call_back = self._reactor.callFromThread
        while True:
            item = self._jobs.get()
            if item is _STOP:
                return
            job, d = item
            try:
                result = job()
            except BaseException:
                call_back(d.errback, Failure())
            else:
                call_back(d.callback, result)
