"""What TLS costs on the data path: put and get throughput with TLS on, as a fraction of the
same runs against an `--insecure` cluster.

    .venv/bin/python bench/tls.py [--size-mib 256] [--repeats 3] [--json]

Starts two real clusters (`dogfs cluster up --detach --meta 1 --chunk 6`, one with TLS, the
default, one with `--insecure`) in temporary homes, and alternates runs between them so that
the machine's noise falls on both alike. Each run puts a SIZE file through the client API
(in this process) and gets it back, each timed step starting with `settle_memory` (see
bench/common.py). Figures are medians; the ratios are TLS / plaintext. Target (issue 5): at
least 0.7.

    .venv/bin/python bench/tls.py --wire [--size-mib 256] [--repeats 3]

measures the connection layer alone: one DogFS wire connection to a server process that
discards shard uploads and answers shard reads from memory, 1 MiB cells both ways, with and
without TLS. No erasure coding, checksums or disks: the CPU per GiB it prints is what the
transport costs, so the TLS figure minus the plaintext one is the whole price of TLS.

It also counts CPU seconds (this process plus every daemon of the cluster, from /proc) per
operation: on a shared machine wall-clock throughput follows whatever else runs, while the
CPU cost does not, and where the data path is CPU-bound (2 cores for client and 7 daemons)
the CPU ratio (plaintext CPU / TLS CPU) is what the throughput ratio tends to.

TLS connections carry their bytes in sealed frames after the handshake (the default,
docs/security.md). Both modes also run a third client, configured `[tls] sealed = false`,
against the same TLS servers: TLS records for every byte, the baseline sealed frames
replace, measured in the same run ("records" in the output).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import attrs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ENV, MiB, dogfs, make_file, process_cpu_seconds, react_for, settle_memory  # noqa: E402


def daemon_pids(home: str) -> list[int]:
    """The pids of the cluster's daemons (from their pid files)."""
    pids = []
    for node in os.listdir(os.path.join(home, "nodes")):
        try:
            with open(os.path.join(home, "nodes", node, "twistd.pid")) as f:
                pids.append(int(f.read().strip()))
        except (OSError, ValueError):
            pass
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by this process and `pids`."""
    return time.process_time() + sum(map(process_cpu_seconds, pids))


async def one_run(client: Any, name: str, source: str, out: str, pids: list[int]) -> tuple[float, ...]:
    """Seconds, CPU seconds (all processes) and the client's CPU seconds to put `source` as
    `name` and to get it back into `out`."""
    settle = os.path.getsize(source) * 5 // 2  # see settle_memory: a get's file and shards
    settle_memory(settle)
    cpu, mine = cpu_seconds(pids), time.process_time()
    started = time.perf_counter()
    with open(source, "rb") as f:
        await client.put(name, f)
    put_s = time.perf_counter() - started
    put_cpu, put_client = cpu_seconds(pids) - cpu, time.process_time() - mine
    settle_memory(settle)
    cpu, mine = cpu_seconds(pids), time.process_time()
    started = time.perf_counter()
    # The get writes over a file of the same size in place (not truncated): its page cache
    # is there already, so neither side is timed on this VM's faults for new page cache
    # (settle_memory's docstring), which made the get ratio swing between 0.34 and 1.04
    # from run to run of the same code.
    with open(out, "r+b" if os.path.exists(out) else "wb") as f:
        await client.get(name, f)
    get_s = time.perf_counter() - started
    get_cpu, get_client = cpu_seconds(pids) - cpu, time.process_time() - mine
    await client.rm(name)
    return put_s, get_s, put_cpu, get_cpu, put_client, get_client


async def measure(reactor: Any, args: argparse.Namespace, homes: dict[str, str], work: str) -> dict[str, Any]:
    """Alternate runs on the two clusters; medians and ratios."""
    from dogfs.client.api import DogFSClient
    from dogfs.config import load_client

    configs = {kind: load_client(os.path.join(home, "client.toml")) for kind, home in homes.items()}
    configs["records"] = attrs.evolve(configs["tls"], tls=attrs.evolve(configs["tls"].tls, sealed=False))
    clients = {kind: DogFSClient(reactor, config, timeout=120) for kind, config in configs.items()}
    size = args.size_mib * MiB
    source = os.path.join(work, "source")
    make_file(source, size, 1)
    out = os.path.join(work, "out")
    pids = {kind: daemon_pids(home) for kind, home in homes.items()}
    pids["records"] = pids["tls"]
    for kind, client in clients.items():  # warm-up (first large writes are slow)
        await one_run(client, "/warmup", source, out, pids[kind])
    ops = ("put", "get", "put_cpu", "get_cpu", "put_client", "get_client")
    times: dict[str, dict[str, list[float]]] = {k: {op: [] for op in ops} for k in clients}
    kinds = list(clients)
    for i in range(args.repeats):
        for kind in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:  # each goes first in turn
            measured = await one_run(clients[kind], f"/big-{i}", source, out, pids[kind])
            for op, value in zip(ops, measured, strict=True):
                times[kind][op].append(value)
    for client in clients.values():
        await client.close()
    os.unlink(out)
    results: dict[str, Any] = {"size_mib": args.size_mib, "repeats": args.repeats}
    for kind in clients:
        for op in ("put", "get"):
            results[f"{kind}_{op}_mib_s"] = size / MiB / statistics.median(times[kind][op])
        for op in ("put", "get"):
            results[f"{kind}_{op}_cpu_s_per_gib"] = statistics.median(times[kind][f"{op}_cpu"]) * 1024 / args.size_mib
            results[f"{kind}_{op}_client_cpu_s_per_gib"] = (
                statistics.median(times[kind][f"{op}_client"]) * 1024 / args.size_mib
            )
    for op in ("put", "get"):
        for kind, prefix in (("tls", ""), ("records", "records_")):
            results[f"{prefix}{op}_ratio"] = results[f"{kind}_{op}_mib_s"] / results[f"insecure_{op}_mib_s"]
            results[f"{prefix}{op}_cpu_ratio"] = (
                results[f"insecure_{op}_cpu_s_per_gib"] / results[f"{kind}_{op}_cpu_s_per_gib"]
            )
    results["load_average"] = os.getloadavg()
    return results


WIRE_CELL = MiB


def wire_server(directory: str, kind: str) -> None:
    """Serve PutShard (discarded) and GetShard (cells from memory) until killed; write the
    port to DIRECTORY/port-KIND."""
    from twisted.internet import defer, protocol, reactor

    from dogfs.security.tls import ServerTLS, server_endpoint
    from dogfs.wire.messages import Cell, GetShard, GetShardEnd, PutShard, PutShardEnd, ShardStored
    from dogfs.wire.protocol import Connection, Request

    cell = os.urandom(WIRE_CELL)

    async def put(request: Request) -> ShardStored:
        count = 0
        while True:
            part = await request.next_part()
            if part is None or isinstance(part[0], PutShardEnd):
                return ShardStored(request.msg.shard_id, count)
            count += 1

    async def get(request: Request) -> GetShardEnd:
        for i in range(request.msg.count):
            await request.send_part(Cell(i, 0), cell)
        return GetShardEnd(request.msg.count)

    handlers = {
        PutShard: lambda r: defer.Deferred.fromCoroutine(put(r)),
        GetShard: lambda r: defer.Deferred.fromCoroutine(get(r)),
    }
    tls = None
    if kind == "tls":
        tls = ServerTLS(_wire_config(directory, "server"), handshake_timeout=None)
    endpoint = server_endpoint(reactor, "tcp:0:interface=127.0.0.1", tls)
    factory = protocol.Factory.forProtocol(lambda: Connection(reactor, handlers, node_id="server"))

    def listening(port: Any) -> None:
        with open(os.path.join(directory, f"port-{kind}"), "w") as f:
            f.write(str(port.getHost().port))

    endpoint.listen(factory).addCallback(listening)
    reactor.run()


def _wire_config(directory: str, name: str) -> Any:
    from dogfs.security.tls import TLSConfig

    return TLSConfig(
        ca_cert=os.path.join(directory, "ca", "ca.pem"),
        cert=os.path.join(directory, name, "cert.pem"),
        key=os.path.join(directory, name, "key.pem"),
    )


def wire_bench(args: argparse.Namespace) -> dict[str, Any]:
    """The wire-layer benchmark (--wire): medians and ratios of CPU per GiB."""
    from dogfs.security.ca import init_ca
    from dogfs.security.roles import Role

    root = tempfile.mkdtemp(prefix="dogfs-bench-tls-wire-")
    servers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        ca = init_ca(os.path.join(root, "ca"))
        ca.issue("server", Role.NODE, os.path.join(root, "server"), hosts=["127.0.0.1"])
        ca.issue("client", Role.USER, os.path.join(root, "client"))
        for kind in ("tls", "insecure"):
            servers[kind] = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--wire-server", root, kind], env=ENV
            )
        ports: dict[str, int] = {}
        deadline = time.monotonic() + 30
        while len(ports) < 2:
            for kind in servers:
                try:
                    with open(os.path.join(root, f"port-{kind}")) as f:
                        ports[kind] = int(f.read())
                except (OSError, ValueError):
                    pass
            if time.monotonic() > deadline:
                raise SystemExit("the wire benchmark's servers did not start")
            time.sleep(0.05)
        pids = {kind: server.pid for kind, server in servers.items()}
        return react_for(lambda reactor: wire_measure(reactor, args, root, ports, pids))
    finally:
        for server in servers.values():
            server.kill()
            server.wait()
        shutil.rmtree(root, ignore_errors=True)


async def wire_measure(
    reactor: Any, args: argparse.Namespace, root: str, ports: dict[str, int], pids: dict[str, int]
) -> dict[str, Any]:
    """Alternate uploads and reads on the two servers; CPU seconds per GiB, medians."""
    from twisted.internet.endpoints import connectProtocol

    from dogfs.security.tls import client_endpoint
    from dogfs.wire.messages import Cell, GetShard, PutShard, PutShardEnd
    from dogfs.wire.protocol import Connection

    cells = args.size_mib * MiB // WIRE_CELL
    payload = os.urandom(WIRE_CELL)
    connections = {}
    sealed_config = _wire_config(root, "client")
    configs = {"tls": sealed_config, "records": attrs.evolve(sealed_config, sealed=False), "insecure": None}
    for kind, tls in configs.items():
        port = ports["insecure" if kind == "insecure" else "tls"]
        endpoint = client_endpoint(reactor, f"127.0.0.1:{port}", tls)
        connection = await connectProtocol(endpoint, Connection(reactor, {}, node_id="client"))
        await connection.ready
        connections[kind] = connection
    pids = {**pids, "records": pids["tls"]}

    async def put(connection: Any) -> None:
        upload = connection.open_stream(PutShard("000000000000002a-00", "RS-4-2", 0, WIRE_CELL))
        for i in range(cells):
            await upload.send(Cell(i, 0), payload)
        await upload.finish(PutShardEnd(cells))

    async def get(connection: Any) -> None:
        await connection.call(GetShard("000000000000002a-00", 0, cells), on_part=lambda m, p: None)

    figures: dict[str, dict[str, list[float]]] = {k: {"put": [], "get": []} for k in connections}
    kinds = list(connections)
    for i in range(args.repeats + 1):  # the first round warms up
        for kind in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:
            for op, run in (("put", put), ("get", get)):
                before = time.process_time() + process_cpu_seconds(pids[kind])
                await run(connections[kind])
                used = time.process_time() + process_cpu_seconds(pids[kind]) - before
                if i:
                    figures[kind][op].append(used * 1024 / args.size_mib)
    for connection in connections.values():
        connection.close()
        await connection.closed
    results: dict[str, Any] = {"size_mib": args.size_mib, "repeats": args.repeats}
    for kind, ops in figures.items():
        for op, values in ops.items():
            results[f"{kind}_{op}_cpu_s_per_gib"] = statistics.median(values)
    for op in ("put", "get"):
        for kind, prefix in (("tls", ""), ("records", "records_")):
            results[f"{prefix}{op}_cpu_ratio"] = (
                results[f"insecure_{op}_cpu_s_per_gib"] / results[f"{kind}_{op}_cpu_s_per_gib"]
            )
    return results


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--wire", action="store_true", help="measure the connection layer alone")
    parser.add_argument("--wire-server", nargs=2, metavar=("DIR", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.wire_server:
        wire_server(*args.wire_server)
        return
    if args.wire:
        wire = wire_bench(args)
        if args.json:
            print(json.dumps(wire, indent=2))
            return
        print(f"TLS on one wire connection, 1 MiB cells, {wire['size_mib']} MiB, medians of {args.repeats}")
        for op in ("put", "get"):
            print(
                f"  {op.upper():3}  CPU s/GiB (client + server): TLS {wire[f'tls_{op}_cpu_s_per_gib']:5.2f}"
                f"   plaintext {wire[f'insecure_{op}_cpu_s_per_gib']:5.2f}   ratio {wire[f'{op}_cpu_ratio']:.2f}"
                f"   (TLS records {wire[f'records_{op}_cpu_s_per_gib']:5.2f}, ratio {wire[f'records_{op}_cpu_ratio']:.2f})"
            )
        return
    from dogfs.codec.stripe import tune_malloc

    tune_malloc()
    root = tempfile.mkdtemp(prefix="dogfs-bench-tls-")
    homes = {"tls": os.path.join(root, "tls"), "insecure": os.path.join(root, "insecure")}
    work = os.path.join(root, "work")
    os.makedirs(work)
    try:
        dogfs(homes["tls"], "cluster", "up", "--detach", "--meta", "1", "--chunk", "6")
        dogfs(homes["insecure"], "cluster", "up", "--detach", "--meta", "1", "--chunk", "6", "--insecure")
        results: dict[str, Any] = react_for(lambda reactor: measure(reactor, args, homes, work))
    finally:
        for home in homes.values():
            subprocess.run([sys.executable, "-m", "dogfs.cli.main", "--home", home, "cluster", "down"],
                           capture_output=True, env=ENV)
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    r = results
    print(f"TLS on the data path, RS-4-2 over 6 chunk servers, {r['size_mib']} MiB, medians of {args.repeats}")
    for op in ("put", "get"):
        print(
            f"  {op.upper():3}  TLS {r[f'tls_{op}_mib_s']:7.0f} MiB/s   plaintext "
            f"{r[f'insecure_{op}_mib_s']:7.0f} MiB/s   ratio {r[f'{op}_ratio']:.2f} (target >= 0.7)"
        )
        print(
            f"       CPU s/GiB (client + daemons): TLS {r[f'tls_{op}_cpu_s_per_gib']:5.2f}   plaintext "
            f"{r[f'insecure_{op}_cpu_s_per_gib']:5.2f}   ratio {r[f'{op}_cpu_ratio']:.2f}"
            f"   (client alone: TLS {r[f'tls_{op}_client_cpu_s_per_gib']:.2f}, plaintext "
            f"{r[f'insecure_{op}_client_cpu_s_per_gib']:.2f})"
        )
        print(
            f"       TLS records (sealed = false): {r[f'records_{op}_mib_s']:7.0f} MiB/s   ratio "
            f"{r[f'records_{op}_ratio']:.2f}   CPU s/GiB {r[f'records_{op}_cpu_s_per_gib']:5.2f}   ratio "
            f"{r[f'records_{op}_cpu_ratio']:.2f}"
        )
    print(f"  load average at the end: {' '.join(f'{x:.1f}' for x in r['load_average'])}")


if __name__ == "__main__":
    main()
