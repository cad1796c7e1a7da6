# -*- test-case-name: tests.test_client_sinks -*-
"""`dogfs get -` and `dogfs put` against local files that misbehave, with real daemons.

The unit tests of the sinks and sources are in tests.test_client_read; these run the command
as a user does, with stdout a pipe its parent left non-blocking and a source that cannot be
read.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests.test_datapath_process import ENV, Cluster


class LocalFileTests(SynchronousTestCase):
    """The CLI's local side of a transfer."""

    def setUp(self) -> None:
        self.cluster = Cluster()
        self.addCleanup(self.cluster.destroy)
        self.cluster.create()

    def get_into_non_blocking_pipe(self, path: str, unbuffered: bool) -> tuple[int, bytes, str]:
        """Run `dogfs get PATH -` with stdout a non-blocking pipe, read to its end. The pipe
        holds one page, so the command's writes are short or would block, however fast this
        reads."""
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
        os.set_blocking(w, False)
        env = dict(ENV)
        if unbuffered:
            env["PYTHONUNBUFFERED"] = "1"  # sys.stdout.buffer is then a raw FileIO
        else:
            env.pop("PYTHONUNBUFFERED", None)
        with subprocess.Popen(
            [sys.executable, "-m", "dogfs.cli.main", "--home", self.cluster.home, "get", path, "-"],
            stdout=w, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
        ) as process:
            os.close(w)
            data = bytearray()
            with os.fdopen(r, "rb", buffering=0) as pipe:
                while piece := pipe.read(16384):
                    data += piece
            _, stderr = process.communicate(timeout=120)
        return process.returncode, bytes(data), stderr.decode()

    def test_get_into_a_non_blocking_stdout(self) -> None:
        """Every byte reaches a non-blocking stdout that takes a page at a time, through a raw stdout
        (PYTHONUNBUFFERED) and a buffered one, for a large file (written by a thread) and a
        small one; the command exits 0 and says nothing."""
        files = {"/big": os.urandom(9 * (1 << 20) + 5), "/small": os.urandom(100_000)}
        for path, content in files.items():
            local = os.path.join(self.cluster.work, path.strip("/"))
            with open(local, "wb") as f:
                f.write(content)
            self.cluster.run("put", local, path)
        for path, content in files.items():
            for unbuffered in (True, False):
                code, data, stderr = self.get_into_non_blocking_pipe(path, unbuffered)
                what = f"{path}, unbuffered={unbuffered}"
                self.assertEqual((code, stderr), (0, ""), what)
                self.assertEqual((len(data), data == content), (len(content), True), what)

    def test_unreadable_source(self) -> None:
        """A put whose source fails to read (EIO from /proc/self/mem) exits 1 with one
        sentence naming the source and the error, not a traceback, and commits nothing."""
        result = self.cluster.run("put", "/proc/self/mem", "/x", check=False)
        self.assertEqual(
            (result.returncode, result.stderr), (1, "dogfs: cannot read /proc/self/mem: Input/output error\n")
        )
        self.assertEqual(self.cluster.run("stat", "/x", check=False).returncode, 3)
