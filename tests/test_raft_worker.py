# -*- test-case-name: tests.test_raft_worker -*-
"""Tests for dogfs.raft.worker: the thread a Raft member's durable writes run on."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from dogfs.raft.worker import SerialWorker


class RecordingReactor:
    """``callFromThread`` that queues the calls, to run on the test's thread by ``run_calls``."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.threads: set[int] = set()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:  # noqa: N802
        self.threads.add(threading.get_ident())
        self.calls.append((f, args))

    def run_calls(self) -> None:
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


class SerialWorkerTests(SynchronousTestCase):
    """Jobs run one at a time, in order, on the worker's thread; answers come back through
    the reactor's ``callFromThread``."""

    def setUp(self) -> None:
        self.reactor = RecordingReactor()
        self.worker = SerialWorker(self.reactor, "test-worker")  # type: ignore[arg-type]
        self.worker.start()
        self.addCleanup(self.worker.stop)

    def test_jobs_run_in_order_on_the_worker_thread(self) -> None:
        """Each job runs on the worker's thread, in submission order, and its Deferred fires
        with its result only when the reactor runs the call the worker handed it."""
        ran: list[tuple[int, int]] = []

        def job(n: int) -> int:
            ran.append((n, threading.get_ident()))
            return n * 10

        deferreds = [self.worker.run(lambda n=n: job(n)) for n in range(50)]
        self.worker.stop()
        self.assertEqual([n for n, _ in ran], list(range(50)))
        self.assertNotIn(threading.get_ident(), {t for _, t in ran})
        self.assertEqual(len({t for _, t in ran}), 1)
        self.assertNoResult(deferreds[0])
        self.reactor.run_calls()
        self.assertEqual([self.successResultOf(d) for d in deferreds], [n * 10 for n in range(50)])

    def test_failure_fails_the_deferred(self) -> None:
        """A job's exception fails its Deferred; later jobs still run."""

        def broken() -> None:
            raise ValueError("disk on fire")

        failed = self.worker.run(broken)
        after = self.worker.run(lambda: "fine")
        self.worker.stop()
        self.reactor.run_calls()
        self.assertEqual(str(self.failureResultOf(failed, ValueError).value), "disk on fire")
        self.assertEqual(self.successResultOf(after), "fine")

    def test_stop_waits_for_queued_jobs(self) -> None:
        """``stop`` returns once every job queued before it has run; a stopped worker refuses
        new jobs, and can be started again."""
        gate = threading.Event()
        done: list[int] = []
        self.worker.run(gate.wait)
        for n in range(3):
            self.worker.run(lambda n=n: done.append(n))
        gate.set()
        self.worker.stop()
        self.assertEqual(done, [0, 1, 2])
        self.assertRaises(RuntimeError, self.worker.run, lambda: None)
        self.worker.start()
        d = self.worker.run(lambda: "again")
        self.worker.stop()
        self.reactor.run_calls()
        self.assertEqual(self.successResultOf(d), "again")
