"""Tests for `dogfs bench`: what `get` reads, against an in-memory stand-in for the client."""

from __future__ import annotations

import argparse
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dogfs.cli import bench
from dogfs.cli.main import EXIT_CODES, build_parser
from dogfs.cli.output import NOT_FOUND
from dogfs.client.api import DogFSError
from dogfs.meta.commands import EntryInfo


class _Namespace:
    """Just the calls `run_bench` makes, on files held in a dict; every call completes at once."""

    def __init__(self, files: dict[str, bytes], dirs: set[str]) -> None:
        self.clock = Clock()
        self.files = files
        self.dirs = dirs
        self.read: list[str] = []

    async def ls(self, path: str) -> list[EntryInfo]:
        if path not in self.dirs:
            raise DogFSError("not_found", f"{path!r} does not exist")
        entries = [
            EntryInfo(name.rpartition("/")[2], name, "file", len(data), "RS-4-2", 0.0, 1)
            for name, data in sorted(self.files.items())
            if name.rpartition("/")[0] == path
        ]
        entries += [
            EntryInfo(d.rpartition("/")[2], d, "dir", 0, "RS-4-2", 0.0, 0)
            for d in sorted(self.dirs)
            if d.rpartition("/")[0] == path
        ]
        return entries

    async def get(self, path: str, sink: IO[bytes]) -> None:
        if path not in self.files:
            raise DogFSError("not_found", f"{path!r} does not exist")
        self.read.append(path)
        sink.write(self.files[path])


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", *argv])


def _run(client: _Namespace, args: argparse.Namespace) -> Any:
    return Deferred.fromCoroutine(bench.run_bench(client, args))


class BenchGetTests(SynchronousTestCase):
    def test_reads_what_exists(self) -> None:
        """Without --count, `get` reads every file under the prefix (not 1000 guessed names),
        and no missing name counts as a failure."""
        files = {f"/b/{i:08d}": b"x" * 10 for i in range(3)}
        client = _Namespace(files, {"/b", "/b/sub"})
        result = self.successResultOf(_run(client, _args("get", "--prefix", "/b/")))
        self.assertEqual(sorted(client.read), sorted(files))
        self.assertEqual((result["count"], result["ok"], result["errors"]), (3, 3, {}))
        self.assertEqual(result["prefix"], "/b")

    def test_count_names_files(self) -> None:
        """With --count N, `get` reads the first N names a `put` of that count writes."""
        files = {f"/b/{i:08d}": b"x" for i in range(5)}
        client = _Namespace(files, {"/b"})
        result = self.successResultOf(_run(client, _args("get", "--prefix", "/b", "--count", "2")))
        self.assertEqual(client.read, ["/b/00000000", "/b/00000001"])
        self.assertEqual((result["count"], result["ok"]), (2, 2))

    def test_missing_prefix(self) -> None:
        """A prefix that does not exist fails the run as not_found (exit 3), and so does one
        that holds no files."""
        client = _Namespace({}, {"/empty"})
        for prefix in ("/nowhere", "/empty"):
            failure = self.failureResultOf(_run(client, _args("get", "--prefix", prefix)), DogFSError)
            self.assertEqual(failure.value.code, "not_found")
            self.assertIn(prefix, failure.value.message)
        self.assertEqual(EXIT_CODES["not_found"], NOT_FOUND)
        self.assertEqual(client.read, [])
