# -*- test-case-name: tests.test_raft_driver -*-
"""Raft benchmark: a durable 3-member group of real processes on loopback.

Measures committed proposals per second and p50/p99 commit latency (as the client sees it:
send, replicate to a majority with fsync, apply on the leader, reply) with 1, 16 and 64
concurrent proposers, like etcd's ``benchmark put --conns=1 --clients=N``. Prints the median of
several runs. etcd 3.4 manages ~1,300-1,700 puts/s with 64 clients and ~300/s with one on
comparable hardware; if an ``etcd`` binary is on PATH the same run measures it too.

The members talk through ``FramedRaftTransport`` over a minimal length-prefixed framing of this
script's own (``Int32StringReceiver`` frames carrying ``encode_message`` bytes), standing in for
the DogFS wire protocol. Clients use a second port per member with the same framing.

    .venv/bin/python bench/raft.py [--runs 3] [--seconds 3] [--clients 1,16,64] [--size 128]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, endpoints, protocol, task
from twisted.internet.defer import Deferred
from twisted.protocols.basic import Int32StringReceiver
from zope.interface import implementer

from dogfs.raft.core import Configuration, Entry, RaftOptions, Snapshot
from dogfs.raft.driver import IRaftStateMachine, NotLeaderError, RaftDriver
from dogfs.raft.storage import LMDBRaftStorage, _open_env

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import summarise  # noqa: E402

from dogfs.raft.transport import FramedRaftTransport

_REQ = struct.Struct(">Q")
MAX_FRAME = 16 << 20


# --- member process ---------------------------------------------------------------------------


@implementer(IRaftStateMachine)
class CounterMachine:
    """A trivial state machine: counts applied entries and their bytes."""

    def __init__(self) -> None:
        self.count = 0
        self.nbytes = 0

    def apply(self, entry: Entry) -> object:
        self.count += 1
        self.nbytes += len(entry.data)
        return entry.index

    def snapshot(self) -> bytes:
        return struct.pack(">QQ", self.count, self.nbytes)

    def restore(self, snapshot: Snapshot) -> None:
        self.count, self.nbytes = struct.unpack(">QQ", snapshot.data)

    def applied_index(self) -> int:
        return 0


class PeerIn(Int32StringReceiver):
    """Inbound peer connection: every frame is one encoded Raft message."""

    MAX_LENGTH = MAX_FRAME

    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        self._deliver = deliver

    def stringReceived(self, data: bytes) -> None:
        self._deliver(data)


class PeerOut(Int32StringReceiver):
    """Outbound peer connection (we only send on it)."""

    MAX_LENGTH = MAX_FRAME

    def stringReceived(self, data: bytes) -> None:
        pass


class ClientServer(Int32StringReceiver):
    """Client port: ``P`` + request id + data -> ``R`` + request id + status byte (+ hint).

    ``S`` asks for the member's role: the reply is ``S`` + the role name.
    """

    MAX_LENGTH = MAX_FRAME

    def __init__(self, driver: RaftDriver) -> None:
        self._driver = driver

    def stringReceived(self, data: bytes) -> None:
        kind = data[:1]
        if kind == b"S":
            self.sendString(b"S" + self._driver.role.encode())
            return
        req = data[1:9]
        d = self._driver.propose(data[9:])

        def ok(_: object) -> None:
            self.sendString(b"R" + req + b"\x00")

        def bad(f: Any) -> None:
            if f.check(NotLeaderError):
                self.sendString(b"R" + req + b"\x01" + (f.value.leader_hint or "").encode())
            else:
                self.sendString(b"R" + req + b"\x02" + str(f.value).encode()[:200])

        d.addCallbacks(ok, bad)


def _sync_env(path: str, map_size: int) -> Any:
    return _open_env(path, map_size)


def _no_sync_env(path: str, map_size: int) -> Any:
    # Analysis only (--no-fsync): shows how much of the latency is the disk.
    import lmdb

    return lmdb.open(path, map_size=map_size, max_dbs=4, sync=False, metasync=False)


def run_member(args: argparse.Namespace) -> None:
    """Entry point of one member process."""
    from twisted.internet import reactor

    peers = dict(p.split("=") for p in args.peers.split(","))  # id -> raft port
    outbound: dict[str, PeerOut] = {}

    def send_bytes(peer: str, payload: bytes) -> None:
        conn = outbound.get(peer)
        if conn is not None:
            conn.sendString(payload)

    transport = FramedRaftTransport(send_bytes)
    driver = RaftDriver(
        args.id,
        storage=LMDBRaftStorage(args.dir, env_factory=_no_sync_env if args.no_fsync else _sync_env),
        transport=transport,
        state_machine=CounterMachine(),
        clock=reactor,
        reactor=reactor,
        bootstrap=Configuration(voters=frozenset(peers), learners=frozenset()),
        options=RaftOptions(election_tick=10, heartbeat_tick=1),
        tick_interval=0.05,
        rng=random.Random(args.id),
        snapshot_every=20_000,
    )

    def connect(peer: str, port: int) -> None:
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        d = endpoints.connectProtocol(ep, PeerOut())

        def connected(p: PeerOut) -> None:
            outbound[peer] = p
            p.transport.setTcpNoDelay(True)
            lost = p.connectionLost

            def on_lost(reason: Any) -> None:
                outbound.pop(peer, None)
                lost(reason)
                reactor.callLater(0.2, connect, peer, port)

            p.connectionLost = on_lost  # type: ignore[method-assign]

        d.addCallbacks(connected, lambda _f: reactor.callLater(0.2, connect, peer, port))

    raft_f = protocol.Factory.forProtocol(lambda: PeerIn(transport.deliver))
    endpoints.TCP4ServerEndpoint(reactor, int(peers[args.id]), interface="127.0.0.1").listen(raft_f)
    client_f = protocol.Factory.forProtocol(lambda: ClientServer(driver))
    endpoints.TCP4ServerEndpoint(reactor, args.client_port, interface="127.0.0.1").listen(client_f)
    for peer, port in peers.items():
        if peer != args.id:
            connect(peer, int(port))
    driver.startService()
    reactor.addSystemEventTrigger("before", "shutdown", driver.stopService)
    reactor.run()


# --- client / orchestration -------------------------------------------------------------------


class Client(Int32StringReceiver):
    """Multiplexed proposer connection to one member."""

    MAX_LENGTH = MAX_FRAME

    def __init__(self) -> None:
        self._next = 0
        self._waiting: dict[bytes, Deferred[bytes]] = {}
        self._status: list[Deferred[bytes]] = []

    def propose(self, data: bytes) -> Deferred[bytes]:
        self._next += 1
        req = _REQ.pack(self._next)
        d: Deferred[bytes] = Deferred()
        self._waiting[req] = d
        self.sendString(b"P" + req + data)
        return d

    def role(self) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self._status.append(d)
        self.sendString(b"S")
        return d

    def stringReceived(self, data: bytes) -> None:
        if data[:1] == b"S":
            self._status.pop(0).callback(data[1:])
        else:
            self._waiting.pop(data[1:9]).callback(data[9:])


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


async def find_leader(reactor: Any, client_ports: list[int], deadline: float) -> Client:
    while time.monotonic() < deadline:
        for port in client_ports:
            try:
                ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
                c: Client = await endpoints.connectProtocol(ep, Client())
            except Exception:
                continue
            role = await c.role()
            if role == b"leader":
                c.transport.setTcpNoDelay(True)
                return c
            c.transport.loseConnection()
        await task.deferLater(reactor, 0.2, lambda: None)
    raise RuntimeError("no Raft leader elected within the deadline")


async def load(reactor: Any, client: Client, clients: int, seconds: float, size: int) -> tuple[float, float, float]:
    payload = os.urandom(size)
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    errors = [0]

    async def proposer() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            status = await client.propose(payload)
            if status[:1] == b"\x00":
                latencies.append(time.perf_counter() - t0)
            else:
                errors[0] += 1

    t_start = time.perf_counter()
    await defer.gatherResults(
        [Deferred.fromCoroutine(proposer()) for _ in range(clients)], consumeErrors=True
    )
    elapsed = time.perf_counter() - t_start
    if errors[0]:
        print(f"  ({errors[0]} proposals failed)", file=sys.stderr)
    return summarise(latencies, elapsed)


def start_group(base: str, no_fsync: bool = False) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    raft_ports = free_ports(3)
    client_ports = free_ports(3)
    ids = ["n1", "n2", "n3"]
    peers = ",".join(f"{i}={p}" for i, p in zip(ids, raft_ports, strict=True))
    procs = []
    for i, cport in zip(ids, client_ports, strict=True):
        procs.append(
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "member", "--id", i, "--peers", peers,
                 "--client-port", str(cport), "--dir", os.path.join(base, i)]
                + (["--no-fsync"] if no_fsync else []),
            )
        )
    return procs, client_ports


def stop_group(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


# --- etcd, for a same-run comparison -----------------------------------------------------------


class EtcdPut(protocol.Protocol):
    """A minimal HTTP/1.1 keep-alive client for etcd's JSON gateway (``/v3/kv/put``).

    One request at a time per connection, like one of etcd benchmark's clients.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._want: int | None = None
        self._waiting: Deferred[bytes] | None = None

    def request(self, path: bytes, body: bytes) -> Deferred[bytes]:
        self._waiting = Deferred()
        self.transport.write(  # type: ignore[union-attr]
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path, len(body), body)
        )
        return self._waiting

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        while True:
            if self._want is None:
                head, sep, rest = self._buf.partition(b"\r\n\r\n")
                if not sep:
                    return
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                    # Count only puts etcd acknowledged: an error answer is not a write.
                    d, self._waiting = self._waiting, None
                    if d is not None:
                        status = head.partition(b"\r\n")[0]
                        d.errback(RuntimeError(f"etcd answered {status!r}"))
                    self.transport.loseConnection()  # type: ignore[union-attr]
                    return
                self._want, self._buf = length, rest
            if len(self._buf) < self._want:
                return
            body, self._buf = self._buf[: self._want], self._buf[self._want :]
            self._want = None
            d, self._waiting = self._waiting, None
            assert d is not None
            d.callback(body)


def start_etcd(base: str) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    peer_ports = free_ports(3)
    client_ports = free_ports(3)
    ids = ["e1", "e2", "e3"]
    cluster = ",".join(f"{i}=http://127.0.0.1:{p}" for i, p in zip(ids, peer_ports, strict=True))
    procs = []
    for i, pp, cp in zip(ids, peer_ports, client_ports, strict=True):
        procs.append(
            subprocess.Popen(
                ["etcd", "--name", i, "--data-dir", os.path.join(base, i),
                 "--listen-peer-urls", f"http://127.0.0.1:{pp}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{pp}",
                 "--listen-client-urls", f"http://127.0.0.1:{cp}",
                 "--advertise-client-urls", f"http://127.0.0.1:{cp}",
                 "--initial-cluster", cluster, "--initial-cluster-state", "new",
                 "--logger", "zap", "--log-level", "error"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return procs, client_ports


async def etcd_connect(reactor: Any, port: int) -> EtcdPut:
    ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    c: EtcdPut = await endpoints.connectProtocol(ep, EtcdPut())
    c.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
    return c


async def etcd_leader_port(reactor: Any, ports: list[int], deadline: float) -> int:
    import json

    while time.monotonic() < deadline:
        for port in ports:
            try:
                c = await etcd_connect(reactor, port)
                status = json.loads(await c.request(b"/v3/maintenance/status", b"{}"))
                c.transport.loseConnection()  # type: ignore[union-attr]
            except Exception:
                continue
            if status.get("leader") and status["leader"] == status["header"]["member_id"]:
                return port
        await task.deferLater(reactor, 0.2, lambda: None)
    raise RuntimeError("etcd elected no leader within the deadline")


async def etcd_load(reactor: Any, port: int, clients: int, seconds: float, size: int) -> tuple[float, float, float]:
    import base64

    conns = [await etcd_connect(reactor, port) for _ in range(clients)]
    value = base64.b64encode(os.urandom(size))
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def proposer(n: int, c: EtcdPut) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            i += 1
            key = base64.b64encode(b"k%d-%d" % (n, i % 1000))
            t0 = time.perf_counter()
            await c.request(b"/v3/kv/put", b'{"key":"%s","value":"%s"}' % (key, value))
            latencies.append(time.perf_counter() - t0)

    t_start = time.perf_counter()
    await defer.gatherResults(
        [Deferred.fromCoroutine(proposer(n, c)) for n, c in enumerate(conns)], consumeErrors=True
    )
    elapsed = time.perf_counter() - t_start
    for c in conns:
        c.transport.loseConnection()  # type: ignore[union-attr]
    return summarise(latencies, elapsed)


async def bench(reactor: Any, args: argparse.Namespace) -> None:
    concurrencies = [int(c) for c in args.clients.split(",")]
    ours: dict[int, list[tuple[float, float, float]]] = {c: [] for c in concurrencies}
    theirs: dict[int, list[tuple[float, float, float]]] = {c: [] for c in concurrencies}
    with_etcd = shutil.which("etcd") is not None and not args.no_etcd
    for run in range(args.runs):
        base = tempfile.mkdtemp(prefix="raftbench-", dir=args.tmp)
        procs, client_ports = start_group(base, args.no_fsync)
        try:
            client = await find_leader(reactor, client_ports, time.monotonic() + 30)
            await load(reactor, client, 16, 1.0, args.size)  # warm-up
            for c in concurrencies:
                r = await load(reactor, client, c, args.seconds, args.size)
                ours[c].append(r)
                print(f"run {run + 1} dogfs clients={c}: {r[0]:.0f}/s p50 {r[1]:.2f} ms "
                      f"p99 {r[2]:.2f} ms", file=sys.stderr)
            client.transport.loseConnection()
        finally:
            stop_group(procs)
            shutil.rmtree(base, ignore_errors=True)
        if not with_etcd:
            continue
        base = tempfile.mkdtemp(prefix="etcdbench-", dir=args.tmp)
        procs, client_ports = start_etcd(base)
        try:
            port = await etcd_leader_port(reactor, client_ports, time.monotonic() + 30)
            await etcd_load(reactor, port, 16, 1.0, args.size)  # warm-up
            for c in concurrencies:
                r = await etcd_load(reactor, port, c, args.seconds, args.size)
                theirs[c].append(r)
                print(f"run {run + 1} etcd  clients={c}: {r[0]:.0f}/s p50 {r[1]:.2f} ms "
                      f"p99 {r[2]:.2f} ms", file=sys.stderr)
        finally:
            stop_group(procs)
            shutil.rmtree(base, ignore_errors=True)

    def med(rs: list[tuple[float, float, float]], i: int) -> float:
        return statistics.median(r[i] for r in rs)

    print(f"Raft, 3 members on loopback, fsync {'OFF' if args.no_fsync else 'on'}, {args.size}-byte entries, "
          f"median of {args.runs} runs of {args.seconds:g} s per concurrency")
    header = f"{'clients':>8} {'dogfs/s':>9} {'p50 ms':>7} {'p99 ms':>7}"
    if with_etcd:
        header += f" {'etcd/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'ratio':>6}"
    print(header + "  anchor (etcd 3.4, published)")
    anchors = {1: "~300/s", 64: "~1,300-1,700/s"}
    for c in concurrencies:
        line = f"{c:>8} {med(ours[c], 0):>9.0f} {med(ours[c], 1):>7.2f} {med(ours[c], 2):>7.2f}"
        if with_etcd:
            ratio = med(ours[c], 0) / max(med(theirs[c], 0), 1e-9)
            line += (f" {med(theirs[c], 0):>8.0f} {med(theirs[c], 1):>7.2f}"
                     f" {med(theirs[c], 2):>7.2f} {ratio:>6.2f}")
        print(line + f"  {anchors.get(c, '')}")
    if not with_etcd:
        print("etcd not run: compare with the published anchor only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd")
    m = sub.add_parser("member")
    m.add_argument("--id", required=True)
    m.add_argument("--peers", required=True)
    m.add_argument("--client-port", type=int, required=True)
    m.add_argument("--dir", required=True)
    m.add_argument("--no-fsync", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--tmp", default=None)
    parser.add_argument("--no-etcd", action="store_true", help="skip the etcd comparison")
    parser.add_argument("--no-fsync", action="store_true",
                        help="analysis only: members do not sync (NOT durable)")
    args = parser.parse_args()
    if args.cmd == "member":
        run_member(args)
    else:
        task.react(lambda reactor: Deferred.fromCoroutine(bench(reactor, args)))


if __name__ == "__main__":
    main()
