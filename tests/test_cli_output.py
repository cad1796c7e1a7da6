"""Tests for dogfs.cli.output: exit codes, errors, JSON, sizes, tables, the progress bar and
running the reactor for one command."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from dogfs.cli import output
from dogfs.cli.output import CLIError, ProgressBar


class _TTY(io.StringIO):
    """A StringIO that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class _Clock:
    """A settable clock for the progress bar."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _FakeReactor:
    """Just enough of a reactor for run_deferred: runs the startup calls synchronously."""

    def __init__(self, stop_early: bool = False) -> None:
        self.running = False
        self.calls: list[Callable[[], Any]] = []
        self.stopped = False
        self.stop_early = stop_early

    def callWhenRunning(self, f: Callable[[], Any]) -> None:
        self.calls.append(f)

    def run(self) -> None:
        self.running = True
        if self.stop_early:  # as Ctrl-C does: the reactor stops before the command ends
            self.running = False
            return
        for f in self.calls:
            f()

    def stop(self) -> None:
        self.running = False
        self.stopped = True


class ExitCodeTests(SynchronousTestCase):
    def test_codes(self) -> None:
        """The exit codes are DESIGN.md section 7's."""
        self.assertEqual(
            (output.OK, output.FAILED, output.USAGE, output.NOT_FOUND, output.PERMISSION),
            (0, 1, 2, 3, 4),
        )

    def test_fail_raises_cli_error(self) -> None:
        """fail() raises CLIError carrying the sentence and the code."""
        e = self.assertRaises(CLIError, output.fail, "no such path /x", output.NOT_FOUND)
        self.assertEqual((e.message, e.exit_code), ("no such path /x", 3))
        self.assertEqual(CLIError("boom").exit_code, output.FAILED)

    def test_print_error(self) -> None:
        """Errors print as one `dogfs: ` line."""
        out = io.StringIO()
        output.print_error("cannot reach   127.0.0.1:7000", out)
        self.assertEqual(out.getvalue(), "dogfs: cannot reach 127.0.0.1:7000\n")


class SecondsTests(SynchronousTestCase):
    """`output.seconds`, the type of every SECONDS option."""

    def test_positive_finite(self) -> None:
        """A positive, finite number is taken; zero, negative, nan, inf and words are not."""
        self.assertEqual(output.seconds("1.5"), 1.5)
        self.assertEqual(output.seconds("60"), 60.0)
        for text in ("0", "-1", "nan", "inf", "-inf"):
            e = self.assertRaises(argparse.ArgumentTypeError, output.seconds, text)
            self.assertIn("positive number of seconds", str(e))
        self.assertIn("not a number", str(self.assertRaises(argparse.ArgumentTypeError, output.seconds, "soon")))

    def test_every_seconds_option(self) -> None:
        """Every command's --timeout, --wait and --catch-up refuse 0, negative and nan as bad
        usage (exit 2), instead of waiting for nothing or failing with a traceback."""
        from dogfs.cli.main import build_parser

        commands = [
            ["ls", "/", "--timeout"],
            ["bench", "get", "--timeout"],
            ["admin", "meta", "add", "--local", "--catch-up"],
            ["admin", "meta", "remove", "meta-2", "--timeout"],
            ["admin", "revoke", "bob", "--timeout"],
            ["cluster", "up", "--wait"],
            ["cluster", "start", "meta-1", "--wait"],
        ]
        for argv in commands:
            parsed = build_parser().parse_args(argv + ["2.5"])
            self.assertEqual(getattr(parsed, argv[-1][2:].replace("-", "_")), 2.5)
            for bad in ("0", "-1", "nan"):
                e = self.assertRaises(CLIError, build_parser().parse_args, argv + [bad])
                self.assertEqual(e.exit_code, output.USAGE, argv)
                self.assertIn("positive number of seconds", e.message)


class FormatTests(SynchronousTestCase):
    def test_print_json(self) -> None:
        """print_json writes parseable JSON, bytes and tuples included."""
        out = io.StringIO()
        output.print_json({"b": b"x", "t": (1, 2), "n": None}, out)
        self.assertEqual(json.loads(out.getvalue()), {"b": "x", "t": [1, 2], "n": None})

    def test_format_bytes(self) -> None:
        """Sizes read as people expect, in binary units."""
        cases = {
            0: "0 B",
            1023: "1023 B",
            1024: "1.0 KiB",
            5 * 1024 * 1024: "5.0 MiB",
            int(1.5 * 2**30): "1.5 GiB",
            -2048: "-2.0 KiB",
        }
        for n, text in cases.items():
            self.assertEqual(output.format_bytes(n), text)
        self.assertEqual(output.format_bytes(None), "-")

    def test_format_duration(self) -> None:
        """Durations: seconds, minutes, hours; '-' when unknown."""
        self.assertEqual(output.format_duration(42.4), "42s")
        self.assertEqual(output.format_duration(185), "3m05s")
        self.assertEqual(output.format_duration(7620), "2h07m")
        self.assertEqual(output.format_duration(None), "-")
        self.assertEqual(output.format_duration(float("inf")), "-")

    def test_format_table(self) -> None:
        """Columns are aligned to the widest cell; no trailing spaces."""
        text = output.format_table(["A", "BB"], [["xxx", "1"], ["y", "22222"]])
        self.assertEqual(text, "A    BB\nxxx  1\ny    22222\n")


class ProgressBarTests(SynchronousTestCase):
    def test_silent_when_not_a_tty(self) -> None:
        """On a pipe or file the bar writes nothing at all."""
        out = io.StringIO()
        bar = ProgressBar(1000, "put /x", out, clock=_Clock())
        bar.update(500)
        bar.finish()
        self.assertEqual(out.getvalue(), "")
        self.assertEqual(bar.done, 500)

    def test_throttled(self) -> None:
        """Updates closer together than the interval do not redraw."""
        clock = _Clock()
        out = _TTY()
        bar = ProgressBar(10_000_000, "put /x", out, clock=clock, interval=0.25)
        bar.update(1)
        first = out.getvalue()
        self.assertTrue(first.startswith("\rput /x ["))
        clock.now += 0.1
        bar.update(1)
        self.assertEqual(out.getvalue(), first)
        clock.now += 0.2
        bar.update(1)
        self.assertNotEqual(out.getvalue(), first)

    def test_render(self) -> None:
        """The bar shows done and total, MB/s and the ETA."""
        clock = _Clock()
        bar = ProgressBar(4_000_000, "get /f", _TTY(), clock=clock)
        clock.now += 1.0
        bar.done = 1_000_000
        text = bar.render(clock.now)
        self.assertIn("25.0%", text)
        self.assertIn("976.6 KiB / 3.8 MiB", text)
        self.assertIn("1.0 MB/s", text)
        self.assertIn("ETA 3s", text)

    def test_unknown_total(self) -> None:
        """Without a total the bar shows bytes and speed only."""
        clock = _Clock()
        bar = ProgressBar(None, "get /f", _TTY(), clock=clock)
        clock.now += 2.0
        bar.done = 4_000_000
        self.assertEqual(bar.render(clock.now), "get /f 3.8 MiB  2.0 MB/s")

    def test_finish_ends_line(self) -> None:
        """finish draws once more and ends the line; further updates draw nothing."""
        clock = _Clock()
        out = _TTY()
        bar = ProgressBar(10, "put /x", out, clock=clock)
        bar.update(10)
        bar.finish()
        self.assertTrue(out.getvalue().endswith("\n"))
        self.assertIn("100.0%", out.getvalue())
        before = out.getvalue()
        clock.now += 10
        bar.update(1)
        self.assertEqual(out.getvalue(), before)


class RunDeferredTests(SynchronousTestCase):
    def test_result(self) -> None:
        """The function's Deferred result is returned and the reactor stopped."""
        reactor = _FakeReactor()
        self.assertEqual(output.run_deferred(lambda r: defer.succeed(r is reactor), reactor), True)
        self.assertTrue(reactor.stopped)

    def test_coroutine(self) -> None:
        """A coroutine function works too."""

        async def fn(r: Any) -> int:
            return await defer.succeed(7)

        self.assertEqual(output.run_deferred(fn, _FakeReactor()), 7)

    def test_failure_raises(self) -> None:
        """A failure is raised as itself, a CLIError keeping its exit code."""
        e = self.assertRaises(
            CLIError,
            output.run_deferred,
            lambda r: defer.fail(CLIError("no quorum", output.FAILED)),
            _FakeReactor(),
        )
        self.assertEqual(e.exit_code, output.FAILED)

    def test_interrupted(self) -> None:
        """A reactor stopped before the result (Ctrl-C) raises KeyboardInterrupt."""
        self.assertRaises(
            KeyboardInterrupt,
            output.run_deferred,
            lambda r: defer.Deferred(),
            _FakeReactor(stop_early=True),
        )
