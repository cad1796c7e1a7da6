# -*- test-case-name: tests.test_chunk_service -*-
"""A hostile reader against a real chunk server: how much memory can one connection pin?

Starts one `twistd dogfs-chunk` process (plaintext, no metadata), stores a 16 MiB shard of
1 MiB cells, then opens STREAMS GetShard streams for it on one connection and reads none of
them (the client stops reading its socket). Prints the chunk server's resident memory
before and its peak over the next SECONDS. Each stream may pin what it has read and sent
until the connection closes (after `IDLE_TIMEOUT`), so without a per-connection bound this
grows with the number of streams: about a cell per stream.

    .venv/bin/python bench/hostile.py [--streams 400] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from common import run_reactor  # noqa: E402
from twisted.internet import task  # noqa: E402

from dogfs.codec.checksum import crc32c  # noqa: E402
from dogfs.wire.messages import Cell, GetShard, PutShard, PutShardEnd  # noqa: E402
from tests.test_chunk_process import ChunkProcess  # noqa: E402

SHARD = "00000000000000aa-01"
CELL = 1 << 20


def rss_mib(pid: int) -> int:
    """Resident memory of process ``pid``, MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


async def bench(reactor: Any, args: argparse.Namespace) -> None:
    base = tempfile.mkdtemp(prefix="dogfs-hostile-")
    chunk = ChunkProcess(os.path.join(base, "chunk"))
    chunk.start()
    try:
        await chunk.wait_serving()
        honest = await chunk.connect()
        upload = honest.open_stream(PutShard(SHARD, "RS-4-2", 1, CELL))
        for i in range(16):
            data = os.urandom(CELL)
            await upload.send(Cell(i, crc32c(data)), data)
        await upload.finish(PutShardEnd(16))
        assert chunk.process is not None
        pid = chunk.process.pid
        before = rss_mib(pid)
        hostile = await chunk.connect()
        failed: list[Any] = []
        for _ in range(args.streams):
            hostile.call(GetShard(SHARD), on_part=lambda m, p: None).addErrback(failed.append)
        hostile.transport.pauseProducing()  # read nothing more
        peak, began = before, time.monotonic()
        while time.monotonic() - began < args.seconds:
            peak = max(peak, rss_mib(pid))
            await task.deferLater(reactor, 0.05, lambda: None)
        # The figure means something only if the server held the streams open all along
        # (neither refused them nor cut the connection).
        assert hostile.is_open and not failed, f"streams failed: {failed[:1]}"
        # The server still serves others meanwhile.
        parts: list[int] = []
        await honest.call(GetShard(SHARD), on_part=lambda m, p: parts.append(len(p)))
        assert sum(parts) == 16 * CELL, "the honest reader did not get the shard"
        print(f"chunk server RSS: {before} MiB before, peak {peak} MiB with {args.streams} unread "
              f"GetShard streams of 1 MiB cells on one connection ({args.seconds:g} s); "
              f"an honest reader on another connection still read the shard")
        hostile.transport.abortConnection()
    finally:
        chunk.kill()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    run_reactor(lambda reactor: bench(reactor, args))


if __name__ == "__main__":
    main()
