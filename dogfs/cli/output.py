# -*- test-case-name: tests.test_cli_output -*-
"""What every `dogfs` command shares: exit codes, errors, JSON, sizes, a progress bar, and
running the reactor once for one command.

DESIGN.md section 7 fixes the exit codes and the error shape: one sentence on stderr, prefixed
`dogfs: `, naming what failed. Commands raise `CLIError` (or call `fail`); the entry point
catches it, prints it with `print_error` and exits with its code.

This module depends on nothing else in DogFS, so both the cluster manager and the client
commands can use it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import IO, Any, NoReturn, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = [
    "OK",
    "FAILED",
    "USAGE",
    "NOT_FOUND",
    "PERMISSION",
    "INTERRUPTED",
    "CLIError",
    "fail",
    "print_error",
    "print_json",
    "format_bytes",
    "format_duration",
    "format_table",
    "seconds",
    "ProgressBar",
    "run_deferred",
]

#: The command did what was asked.
OK = 0
#: The operation failed, or its outcome is unknown (timeout, no quorum, unreachable).
FAILED = 1
#: Bad usage: unknown command, bad option, an argument that cannot be right.
USAGE = 2
#: The path (or node) does not exist.
NOT_FOUND = 3
#: Permission denied.
PERMISSION = 4
#: Interrupted by Ctrl-C before it finished (the shell's 128 + SIGINT).
INTERRUPTED = 130

T = TypeVar("T")


class CLIError(Exception):
    """A command failed: `message` is one sentence for the user, `exit_code` the status."""

    def __init__(self, message: str, exit_code: int = FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __repr__(self) -> str:
        return f"CLIError({self.message!r}, {self.exit_code})"


def fail(message: str, code: int = FAILED) -> NoReturn:
    """Stop the command with `message` and exit status `code`."""
    raise CLIError(message, code)


def print_error(message: str, stream: IO[str] | None = None) -> None:
    """Print `dogfs: <message>` on stderr (or `stream`), one line."""
    out = stream if stream is not None else sys.stderr
    text = " ".join(str(message).split()) if "\n" not in str(message) else str(message).rstrip()
    out.write(f"dogfs: {text}\n")
    out.flush()


def print_json(obj: Any, stream: IO[str] | None = None) -> None:
    """Print `obj` as indented JSON with sorted keys, one trailing newline."""
    out = stream if stream is not None else sys.stdout
    out.write(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    out.flush()


def _json_default(obj: Any) -> Any:
    # bytes and tuples appear in replies decoded from msgpack; sets in computed views.
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).decode("utf-8", "replace")
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: int | float | None) -> str:
    """A byte count for people: `0 B`, `999 B`, `1.0 KiB`, `4.0 MiB`, `1.5 GiB`; `-` for None."""
    if n is None:
        return "-"
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value < 1024:
        return f"{sign}{int(value)} B"
    for unit in _UNITS[1:]:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{sign}{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def format_duration(seconds: float | None) -> str:
    """A duration for people: `42s`, `3m05s`, `2h07m`; `-` for None or not finite."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces, header first; no trailing spaces."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [headers, *rows]:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return "\n".join(lines) + "\n"


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds (`--timeout`, `--wait`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def admin_options(parser: argparse.ArgumentParser) -> None:
    """The options every `dogfs admin` command takes: --timeout and --json."""
    parser.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS",
                        help="fail if the cluster cannot serve within this time")
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")


class ProgressBar:
    """A one-line transfer progress bar that draws only on a terminal.

    `update(n)` adds `n` bytes done; the bar is redrawn at most every `interval` seconds of
    `clock()` so that a fast transfer does not spend its time drawing. `finish()` draws the
    final state and ends the line. On a stream that is not a TTY (a pipe, a file, CI logs)
    nothing is ever written.
    """

    def __init__(
        self,
        total: int | None,
        label: str,
        stream: IO[str] | None = None,
        *,
        clock: Callable[[], float] | None = None,
        interval: float = 0.25,
        width: int = 24,
    ) -> None:
        if clock is None:
            import time

            # A CLI progress bar measures wall time; it is not part of any daemon.
            clock = time.monotonic
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.interval = interval
        self.width = width
        self.done = 0
        self.started = clock()
        self._last_draw: float | None = None
        self._finished = False
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty())

    def update(self, n: int) -> None:
        """Count `n` more bytes done; redraw if enough time has passed since the last draw."""
        self.done += n
        if not self.enabled or self._finished:
            return
        now = self.clock()
        if self._last_draw is not None and now - self._last_draw < self.interval:
            return
        self._draw(now)

    def finish(self) -> None:
        """Draw the final state and end the line (nothing when not on a terminal)."""
        if not self.enabled or self._finished:
            self._finished = True
            return
        self._finished = True
        self._draw(self.clock())
        self.stream.write("\n")
        self.stream.flush()

    def render(self, now: float) -> str:
        """The bar's text at time `now` (without the leading carriage return)."""
        elapsed = max(now - self.started, 0.0)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        speed = f"{rate / 1e6:.1f} MB/s"
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            filled = int(fraction * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            remaining = (self.total - self.done) / rate if rate > 0 else None
            eta = "0s" if self.done >= self.total else format_duration(remaining)
            return (
                f"{self.label} [{bar}] {fraction * 100:5.1f}% "
                f"{format_bytes(self.done)} / {format_bytes(self.total)}  {speed}  ETA {eta}"
            )
        return f"{self.label} {format_bytes(self.done)}  {speed}"

    def _draw(self, now: float) -> None:
        self._last_draw = now
        # \r returns to the line start; \x1b[K clears what a longer previous line left.
        self.stream.write("\r" + self.render(now) + "\x1b[K")
        self.stream.flush()


def run_deferred(fn: Callable[[Any], Awaitable[T]], reactor: Any) -> T:
    """Run `reactor` for one CLI command: call `fn(reactor)`, wait for its result, stop.

    `fn` returns a Deferred or a coroutine (run with `Deferred.fromCoroutine`). Its result is returned; its failure is raised (a `CLIError` as it is). The reactor
    cannot be restarted, so call this at most once per process. Ctrl-C stops the reactor
    before `fn` finishes: that raises `KeyboardInterrupt`. The entry point
    (`dogfs.plugins.cli`) provides the reactor: see `dogfs.cli.main.main`.
    """
    outcome: list[Any] = []

    def start() -> None:
        d = defer.maybeDeferred(fn, reactor)

        def unwrap(result: Any) -> Any:
            if isinstance(result, Coroutine):
                return defer.Deferred.fromCoroutine(result)
            return result

        d.addCallback(unwrap)
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop() if reactor.running else None)

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:
        raise KeyboardInterrupt
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[no-any-return]
