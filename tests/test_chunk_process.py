# -*- test-case-name: tests.test_chunk_process -*-
"""A real `twistd -n dogfs-chunk` process on loopback: serve, crash (kill -9), restart.

These tests start real processes and sockets, so they use trial's reactor-driven TestCase;
they poll with deadlines, never sleep a fixed time, and take a few seconds in all.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from dogfs.codec.checksum import crc32c
from dogfs.wire.messages import Cell, GetShard, GetShardEnd, PutShard, PutShardEnd, ShardStored
from dogfs.wire.protocol import Connection, WireError

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
SHARD = "00000000000000aa-01"
FRAGMENT = 64 * 1024
START_DEADLINE = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ChunkProcess:
    """One chunk-server process in a directory of its own."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.port = free_port()
        os.makedirs(base, exist_ok=True)
        self.config = os.path.join(base, "chunk.toml")
        with open(self.config, "w") as f:
            f.write(
                "[chunk]\n"
                'id = "chunk-p"\n'
                f'listen = "tcp:{self.port}:interface=127.0.0.1"\n'
                f'address = "127.0.0.1:{self.port}"\n'
                'data_dir = "data"\n'
                # Nothing listens there: the server must serve all the same.
                f'meta = ["127.0.0.1:{free_port()}"]\n'
            )
        self.log = os.path.join(base, "chunk.log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            TWISTD + ["-n", "--pidfile", os.path.join(self.base, "twistd.pid"), "--logfile", self.log,
                      "dogfs-chunk", "--config", self.config],
            cwd=self.base, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def kill(self) -> None:
        """kill -9, and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def accepts(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def read_log(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    async def wait_serving(self) -> None:
        """Poll until the server accepts connections; fail clearly past the deadline."""
        deadline = reactor.seconds() + START_DEADLINE  # type: ignore[attr-defined]
        while not self.accepts():
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"chunk server exited with {self.process.returncode}: {self.read_log()}")
            if reactor.seconds() > deadline:  # type: ignore[attr-defined]
                raise AssertionError(f"chunk server did not listen within {START_DEADLINE}s: {self.read_log()}")
            await task.deferLater(reactor, 0.05)

    async def wait_log(self, text: str, after: int = 0) -> None:
        """Poll until the log holds ``text`` past offset ``after``: the server logs "serving"
        just after it starts listening, so a client may connect before the line is written."""
        deadline = reactor.seconds() + START_DEADLINE  # type: ignore[attr-defined]
        while text not in self.read_log()[after:]:
            if reactor.seconds() > deadline:  # type: ignore[attr-defined]
                raise AssertionError(f"{text!r} not logged within {START_DEADLINE}s: {self.read_log()}")
            await task.deferLater(reactor, 0.05)

    async def connect(self) -> Connection:
        connection = Connection(reactor, {}, node_id="test-client", default_timeout=10.0)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), connection)
        await connection.ready
        return connection


def cells() -> list[bytes]:
    out = [os.urandom(FRAGMENT) for _ in range(3)]
    out.append(os.urandom(1000))
    return out


async def put(connection: Connection, shard_id: str, frags: list[bytes]) -> Any:
    upload = connection.open_stream(PutShard(shard_id, "RS-4-2", int(shard_id[17:]), FRAGMENT))
    for i, fragment in enumerate(frags):
        await upload.send(Cell(i, crc32c(fragment)), fragment)
    return (await upload.finish(PutShardEnd(len(frags)))).msg


async def get(connection: Connection, shard_id: str) -> tuple[Any, list[bytes]]:
    parts: list[bytes] = []
    reply = await connection.call(GetShard(shard_id), on_part=lambda m, p: parts.append(bytes(p)))
    return reply.msg, parts


class ChunkProcessTests(TestCase):
    """The daemon as an operator runs it."""

    timeout = 60

    def test_survives_kill_9(self) -> defer.Deferred[None]:
        """A shard put through real TCP is still there after kill -9 and a restart on the same
        data directory; an upload cut off by the crash leaves no temporary file behind."""
        chunk = ChunkProcess(os.path.abspath(self.mktemp()))
        self.addCleanup(chunk.kill)
        connections: list[Connection] = []

        def close_all() -> defer.Deferred[Any]:
            closing = [c.closed for c in connections if c.is_open]
            for c in connections:
                c.close()
            return defer.gatherResults(closing, consumeErrors=True)

        self.addCleanup(close_all)

        async def run() -> None:
            frags = cells()
            chunk.start()
            await chunk.wait_serving()
            await chunk.wait_log("chunk-p serving 0 shards on 127.0.0.1:")
            connection = await chunk.connect()
            connections.append(connection)
            stored = await put(connection, SHARD, frags)
            self.assertEqual(stored, ShardStored(SHARD, sum(map(len, frags))))
            end, parts = await get(connection, SHARD)
            self.assertEqual((end, parts), (GetShardEnd(len(frags)), frags))
            # An upload in flight when the process dies.
            upload = connection.open_stream(PutShard("00000000000000bb-02", "RS-4-2", 2, FRAGMENT))
            await upload.send(Cell(0, crc32c(frags[0])), frags[0])
            tmp = os.path.join(chunk.base, "data", "tmp")
            while not os.listdir(tmp):  # the server has begun writing it
                await task.deferLater(reactor, 0.02)
            lost = upload.finish(PutShardEnd(1))
            chunk.kill()
            with self.assertRaises(WireError):
                await lost
            logged = len(chunk.read_log())
            chunk.start()
            await chunk.wait_serving()
            await chunk.wait_log("chunk-p serving 1 shards on", after=logged)
            self.assertEqual(os.listdir(tmp), [])
            connection = await chunk.connect()
            connections.append(connection)
            end, parts = await get(connection, SHARD)
            self.assertEqual((end, parts), (GetShardEnd(len(frags)), frags))

        return defer.Deferred.fromCoroutine(run())

    def test_help_lists_config(self) -> None:
        """`twistd dogfs-chunk --help` describes the daemon and its --config option."""
        result = subprocess.run(TWISTD + ["dogfs-chunk", "--help"], capture_output=True, timeout=30)
        out = result.stdout.decode()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--config", out)
        self.assertIn("chunk server", out)

    def test_bad_config_one_sentence(self) -> None:
        """A missing config file ends twistd at once with one sentence and status 2."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        result = subprocess.run(
            TWISTD + ["-n", "--pidfile", os.path.join(base, "p.pid"), "dogfs-chunk", "--config", "missing.toml"],
            cwd=base, capture_output=True, timeout=30,
        )
        err = result.stderr.decode()
        self.assertEqual(result.returncode, 2, err)
        self.assertNotIn("Traceback", err)
        # The last line: Twisted may warn first (e.g. about its plugin cache) on a busy machine.
        self.assertEqual(err.strip().splitlines()[-1], "dogfs-chunk: configuration file missing.toml does not exist")
