# -*- test-case-name: tests.test_raft_worker -*-
"""Tests for dogfs.raft.worker: the threads a chunk server's disk work and a Raft member's
durable writes run on."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from dogfs.raft.worker import SerialWorker, WorkerPool


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


class WorkerPoolTests(SynchronousTestCase):
    """A pool runs calls on up to its size of threads at once, answers through the reactor's
    ``callFromThread``, and holds nothing of a call once it has answered."""

    def setUp(self) -> None:
        self.reactor = RecordingReactor()

    def pool(self, threads: int) -> WorkerPool:
        pool = WorkerPool(self.reactor, "test-pool", threads)  # type: ignore[arg-type]
        pool.start()
        self.addCleanup(pool.stop)
        return pool

    def test_calls_run_at_once_on_its_threads(self) -> None:
        """Four calls that each wait for the other three all finish on a pool of four: they
        ran at the same time, on four threads, none of them the caller's; arguments arrive."""
        pool = self.pool(4)
        self.assertTrue(pool.running)
        together = threading.Barrier(4, timeout=30)

        def call(n: int, scale: int) -> tuple[int, int]:
            together.wait()
            return n * scale, threading.get_ident()

        deferreds = [pool.run(call, n, 10) for n in range(4)]
        pool.stop()
        self.reactor.run_calls()
        results = [self.successResultOf(d) for d in deferreds]
        self.assertEqual([r for r, _ in results], [0, 10, 20, 30])
        threads = {t for _, t in results}
        self.assertEqual(len(threads), 4)
        self.assertNotIn(threading.get_ident(), threads)

    def test_never_more_threads_than_its_size(self) -> None:
        """Many calls on a pool of two use two threads; a failing call fails its Deferred
        alone."""
        pool = self.pool(2)

        def broken() -> None:
            raise OSError("disk gone")

        deferreds = [pool.run(threading.get_ident) for _ in range(40)]
        failed = pool.run(broken)
        pool.stop()
        self.reactor.run_calls()
        self.assertLessEqual(len({self.successResultOf(d) for d in deferreds}), 2)
        self.assertEqual(str(self.failureResultOf(failed, OSError).value), "disk gone")
        self.assertFalse(pool.running)
        self.assertRaises(RuntimeError, pool.run, threading.get_ident)
        self.assertRaises(ValueError, WorkerPool, self.reactor, "empty", 0)

    def test_answered_result_is_not_held(self) -> None:
        """Once a call has answered, its thread keeps no reference to the result while it
        waits for the next call (a cell read into a pooled buffer is free again as soon as
        the reactor is done with it)."""
        answered = threading.Event()
        record = self.reactor.callFromThread

        def call_from_thread(f: Callable[..., Any], *args: Any) -> None:
            record(f, *args)
            answered.set()

        self.reactor.callFromThread = call_from_thread  # type: ignore[method-assign]
        pool = self.pool(1)

        class Result:
            pass

        first = pool.run(Result)
        self.assertTrue(answered.wait(30))
        self.reactor.run_calls()
        result = weakref.ref(self.successResultOf(first))
        del first
        # The thread lets go just after answering: wait (with a deadline) until it has.
        deadline = time.monotonic() + 30
        while result() is not None and time.monotonic() < deadline:
            gc.collect()
            answered.wait(0.01)
        self.assertIsNone(result())
