# -*- test-case-name: tests.test_security_process -*-
"""Security as an operator meets it: a TLS cluster from `dogfs cluster up`, identities from
`dogfs ca issue`, the `dogfs` CLI as separate processes, and raw sockets playing the stranger.

One cluster (1 metadata node, 3 chunk servers) serves every test of this module; it is made by
the first test that needs it and stopped by the last (`test_zz_down`) or at exit.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dogfs.meta import commands as c
from dogfs.security.ca import load_ca, write_identity_dir
from dogfs.security.roles import Role
from dogfs.wire import messages as m
from dogfs.wire.frame import Flags, FrameDecoder, encode_frame

reactor: Any = _reactor
ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="33554432", MALLOC_TRIM_THRESHOLD_="1073741824")


class Cluster:
    """A TLS cluster in a temporary home, driven through the dogfs command."""

    def __init__(self) -> None:
        self.home = tempfile.mkdtemp(prefix="dogfs-sec-")
        self.up = False

    def run(self, *args: str, config: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `dogfs ARGS` (with --config when given); the finished process."""
        extra = ["--config", config] if config else []
        return subprocess.run(
            [sys.executable, "-m", "dogfs.cli.main", "--home", self.home, *extra, *args],
            capture_output=True, text=True, timeout=timeout, env=ENV, stdin=subprocess.DEVNULL,
        )

    def ok(self, *args: str, config: str | None = None) -> str:
        """Run and require exit status 0; stdout."""
        result = self.run(*args, config=config)
        if result.returncode != 0:
            raise AssertionError(f"dogfs {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result.stdout

    def start(self) -> None:
        """`dogfs cluster up` (TLS by default) and wait for the chunk servers to register."""
        self.ok("cluster", "up", "--detach", "--meta", "1", "--chunk", "3", "--ec", "RS-2-1")
        self.up = True
        with open(os.path.join(self.home, "cluster.toml"), "rb") as f:
            spec = tomllib.load(f)
        assert spec["cluster"]["tls"], "cluster up made a plaintext cluster"
        self.nodes = {n["id"]: n["address"] for n in spec["nodes"]}
        self.meta = self.nodes["meta-1"]
        # `up` returned once every chunk server was alive: the cluster takes writes.
        self.ok("put", __file__, "/probe", "--timeout", "30")

    def stop(self) -> None:
        """`dogfs cluster down` and remove the home."""
        if self.up:
            self.run("cluster", "down", timeout=60)
            self.up = False
        shutil.rmtree(self.home, ignore_errors=True)

    def issue(self, name: str, role: str) -> str:
        """Issue an identity; the path of its client.toml."""
        self.ok("ca", "issue", name, "--role", role)
        return os.path.join(self.home, "identities", name, "client.toml")

    def files(self, name: str) -> tuple[str, str, str]:
        """(ca, cert, key) of an identity."""
        d = os.path.join(self.home, "identities", name)
        return os.path.join(d, "ca.pem"), os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")


_cluster: Cluster | None = None


def cluster() -> Cluster:
    """The module's cluster, started on first use."""
    global _cluster
    if _cluster is None:
        _cluster = Cluster()
        atexit.register(_cluster.stop)
        _cluster.start()
    return _cluster


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def tls_socket(address: str, ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLSocket:
    """A TLS connection to a daemon, trusting `ca`, presenting `cert` if given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    host, port = split(address)
    raw = socket.create_connection((host, port), timeout=5)
    return context.wrap_socket(raw, server_hostname=host)


def frame(msg: Any, request_id: int, payload: bytes = b"") -> bytes:
    header = m.encode(msg)
    return encode_frame(1, Flags.NONE, m.type_of(msg), request_id, header, len(payload)) + header + payload


def read_until(sock: socket.socket, want: int, timeout: float = 5.0) -> tuple[list[Any], bool]:
    """Read until `want` frames arrived, the peer closed or `timeout` passed.

    Returns the (msg, flags, request id) read and whether the peer closed the connection
    (a TLS failure counts as closing; a timeout does not).
    """
    decoder = FrameDecoder()
    out: list[Any] = []
    sock.settimeout(timeout)
    while len(out) < want:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return out, False
        except (ssl.SSLError, ConnectionError):
            return out, True
        if not data:
            return out, True
        for f in decoder.feed(data):
            out.append((m.decode(f.type, f.header), f.flags, f.request_id))
    return out, False


def read_frames(sock: socket.socket, want: int, timeout: float = 5.0) -> list[Any]:
    """The frames :func:`read_until` read."""
    return read_until(sock, want, timeout)[0]


def dogfs_session(sock: socket.socket) -> None:
    """Exchange Hellos on `sock`."""
    sock.sendall(frame(m.Hello((1,), "test"), 0))
    got = read_frames(sock, 1)
    assert got and isinstance(got[0][0], m.Hello), got


def call(sock: socket.socket, msg: Any, request_id: int, payload: bytes = b"") -> Any:
    """Send one request; its answer (a message, an Error for failures)."""
    sock.sendall(frame(msg, request_id, payload))
    for answer, _flags, rid in read_frames(sock, 1):
        if rid == request_id:
            return answer
    raise AssertionError(f"no answer to {msg!r}")


async def wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    """Wait (on the reactor's clock, re-checking every 50 ms) until ``condition()``; fail
    naming ``what`` past ``within`` seconds."""
    deadline = reactor.seconds() + within
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {within:g}s: {what}")
        await task.deferLater(reactor, 0.05)


def closed_without_a_word(sock: socket.socket) -> bool:
    """True when the peer closes (or fails TLS) without sending any DogFS frame."""
    frames, closed = read_until(sock, 1, timeout=12.0)
    return closed and not frames


class StrangerTests(SynchronousTestCase):
    """Each daemon port refuses what is not a cluster identity, and keeps serving."""

    def test_plaintext_and_garbage_refused(self) -> None:
        """A plaintext Hello and random bytes get no DogFS answer from any daemon."""
        cl = cluster()
        for node, address in cl.nodes.items():
            for payload in (frame(m.Hello((1,), "plain"), 0), os.urandom(300)):
                sock = socket.create_connection(split(address), timeout=5)
                sock.sendall(payload)
                data = b""
                closed = False
                try:
                    sock.settimeout(12)
                    while chunk := sock.recv(4096):
                        data += chunk
                    closed = True
                except ConnectionError:
                    closed = True
                except TimeoutError:
                    pass
                sock.close()
                self.assertTrue(closed, f"{node} kept a plaintext connection open")
                # A TLS alert at most: never a DogFS frame (they start with a length, then 1).
                self.assertFalse(data.startswith(b"\x00") and len(data) > 12, f"{node} answered {data!r}")

    def test_tls_without_valid_certificate_refused(self) -> None:
        """TLS without a client certificate, or with one from another CA, is refused."""
        cl = cluster()
        other = tempfile.mkdtemp(prefix="dogfs-other-ca-")
        self.addCleanup(shutil.rmtree, other, True)
        subprocess.run([sys.executable, "-m", "dogfs.cli.main", "--home", other, "ca", "init"],
                       check=True, capture_output=True, env=ENV)
        subprocess.run([sys.executable, "-m", "dogfs.cli.main", "--home", other, "ca", "issue", "eve",
                        "--role", "admin", "--meta", cl.meta], check=True, capture_output=True, env=ENV)
        ca = cl.files("admin")[0]
        eve = os.path.join(other, "identities", "eve")
        for node, address in cl.nodes.items():
            for cert in (None, os.path.join(eve, "cert.pem")):
                try:
                    sock = tls_socket(address, ca, cert, cert and os.path.join(eve, "key.pem"))
                except (ssl.SSLError, ConnectionError):
                    continue  # refused during the handshake
                try:
                    sock.sendall(frame(m.Hello((1,), "stranger"), 0))
                except (ssl.SSLError, ConnectionError):
                    continue
                self.assertTrue(closed_without_a_word(sock), f"{node} talked to a stranger")
                sock.close()
        # Still serving the admin, and other identities.
        self.assertIn("probe", cl.ok("ls", "/"))
        # Eve's own config trusts her CA, so she refuses the cluster's servers; trusting the
        # cluster CA instead, she is refused by them.
        result = cl.run("ls", "/", config=os.path.join(eve, "client.toml"))
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("presented a certificate not issued by this cluster's CA", result.stderr)
        trusting = os.path.join(other, "trusting.toml")
        with open(trusting, "w") as f:
            f.write(f'[client]\nmeta = ["{cl.meta}"]\n[tls]\nca = "{ca}"\n'
                    f'cert = "{eve}/cert.pem"\nkey = "{eve}/key.pem"\n')
        result = cl.run("ls", "/", config=trusting)
        self.assertEqual(result.returncode, 4, result.stderr)
        self.assertIn("refused our certificate", result.stderr)


class RoleTests(SynchronousTestCase):
    """What each role may do, through the CLI."""

    def test_reader(self) -> None:
        """A reader can get and ls but not put or rm: exit 4 naming the missing permission."""
        cl = cluster()
        reader = cl.issue("rita", "reader")
        cl.ok("put", __file__, "/for-readers")
        self.assertIn("for-readers", cl.ok("ls", "/", config=reader))
        target = os.path.join(cl.home, "got")
        cl.ok("get", "/for-readers", target, config=reader)
        with open(__file__, "rb") as a, open(target, "rb") as b:
            self.assertEqual(a.read(), b.read())
        for args in (("put", __file__, "/by-reader"), ("rm", "/for-readers")):
            result = cl.run(*args, config=reader)
            self.assertEqual(result.returncode, 4, result.stderr)
            self.assertIn("identity 'rita' (role reader) may not write", result.stderr)

    def test_user_not_admin(self) -> None:
        """A user writes, but admin commands exit 4 naming the admin permission."""
        cl = cluster()
        user = cl.issue("ursula", "user")
        cl.ok("put", __file__, "/by-user", config=user)
        result = cl.run("admin", "revoke", "rita", config=user)
        self.assertEqual(result.returncode, 4, result.stderr)
        self.assertIn("(role user) may not run admin commands", result.stderr)

    def test_client_certificate_cannot_register(self) -> None:
        """A Heartbeat or a Raft message with a user certificate is permission_denied."""
        cl = cluster()
        cl.issue("ursula2", "user")
        ca, cert, key = cl.files("ursula2")
        sock = tls_socket(cl.meta, ca, cert, key)
        dogfs_session(sock)
        answer = call(sock, m.Heartbeat("chunk-evil", "127.0.0.1:1", 1 << 40, 0, 0), 1)
        self.assertIsInstance(answer, m.Error)
        self.assertEqual(answer.code, "permission_denied")
        self.assertIn("may not act as a cluster node", answer.message)
        status = cl.ok("--json", "cluster", "status")
        self.assertNotIn("chunk-evil", status)
        sock.close()

    def test_user_cannot_write_shards_it_was_not_allocated(self) -> None:
        """A user identity that sends PutShard for a shard of another file, with no block
        token or a forged one, is refused (permission_denied) by the chunk server, and the
        file reads back unchanged; the user's own puts carry the allocation's token and work
        (test_user_not_admin)."""
        cl = cluster()
        cl.ok("put", __file__, "/victim")
        info = json.loads(cl.ok("--json", "stat", "/victim"))
        shard = info["block_groups"][0]["shards"][0]
        cl.issue("mallory", "user")
        ca, cert, key = cl.files("mallory")
        sock = tls_socket(shard["address"], ca, cert, key)
        dogfs_session(sock)
        forged = m.encode(m.PutShard(shard["shard_id"], info["ec"], shard["index"], 4096, "0" * 32))
        unsigned = m.encode(m.PutShard(shard["shard_id"], info["ec"], shard["index"], 4096))
        for request_id, header in ((1, unsigned), (2, forged)):
            sock.sendall(encode_frame(1, Flags.MORE, m.PutShard.TYPE, request_id, header, 0) + header)  # type: ignore[attr-defined]
            [(answer, _flags, rid)] = read_frames(sock, 1)
            self.assertEqual(rid, request_id)
            self.assertIsInstance(answer, m.Error)
            self.assertEqual(answer.code, "permission_denied", answer.message)
            self.assertIn("identity 'mallory' may not write shard", answer.message)
        sock.close()
        target = os.path.join(cl.home, "victim")
        cl.ok("get", "/victim", target)
        with open(__file__, "rb") as a, open(target, "rb") as b:
            self.assertEqual(a.read(), b.read())

    def test_bad_paths_refused(self) -> None:
        """'..', empty components, over-long paths (CLI) and NUL (wire) are invalid paths."""
        cl = cluster()
        for path in ("/a/../b", "/a//b", "/" + "x" * 5000, "/" + "y" * 300):
            result = cl.run("mkdir", path)
            self.assertEqual(result.returncode, 2, (path[:20], result.stderr))
            self.assertIn("Path", result.stderr)
        ca, cert, key = cl.files("admin")
        sock = tls_socket(cl.meta, ca, cert, key)
        dogfs_session(sock)
        answer = call(sock, m.MetaCommand("", 0), 1, c.encode_command(c.Mkdir("/a\x00b")))
        self.assertIsInstance(answer, m.Error)
        self.assertIn("NUL", answer.message)
        sock.close()


class SealedFramesTests(TestCase):
    """Connections to the daemons of a cluster from `cluster up` carry sealed frames after the
    handshake; a client configured `sealed = false` still gets TLS records from each."""

    def test_every_daemon_seals(self) -> defer.Deferred[None]:
        """Each daemon negotiates sealed frames with a client offering them and answers its
        Hello in them; with `sealed = false` the same exchange runs in TLS records."""
        return defer.Deferred.fromCoroutine(self._every_daemon_seals())

    async def _every_daemon_seals(self) -> None:
        from twisted.internet.endpoints import connectProtocol

        from dogfs.security.sealed import ALPN
        from dogfs.security.tls import TLSConfig, client_endpoint
        from dogfs.wire.protocol import Connection

        cl = cluster()
        ca, cert, key = cl.files("admin")
        for sealed in (True, False):
            config = TLSConfig(ca, cert, key, sealed)
            for node, address in cl.nodes.items():
                connection = Connection(reactor, {}, node_id="probe")
                await connectProtocol(client_endpoint(reactor, address, config), connection)
                await connection.ready.addTimeout(10, reactor)  # the daemon's Hello came back
                tls: Any = connection.transport
                self.assertEqual(tls.negotiatedProtocol, ALPN if sealed else None, node)
                self.assertEqual(tls._sealed_in, sealed, node)
                connection.close()
                await connection.closed.addTimeout(10, reactor)


class RevocationTests(TestCase):
    """Revocation refuses new connections and cuts open ones, on every daemon."""

    timeout = 300  # it stops and restarts daemons

    def test_revoked_identity(self) -> defer.Deferred[None]:
        """After `dogfs admin revoke`, open connections close and new ones are refused."""
        return defer.Deferred.fromCoroutine(self._revoked_identity())

    async def _revoked_identity(self) -> None:
        cl = cluster()
        config = cl.issue("mallory", "user")
        cl.ok("ls", "/", config=config)
        ca, cert, key = cl.files("mallory")
        open_sockets = {}
        for node, address in cl.nodes.items():
            sock = tls_socket(address, ca, cert, key)
            dogfs_session(sock)
            open_sockets[node] = sock
        cl.ok("admin", "revoke", "mallory")
        for node, sock in open_sockets.items():
            # Metadata: at once; chunk servers: at their next heartbeat reply (1 s).
            self.assertEqual(read_until(sock, 1, timeout=8.0), ([], True), f"{node} kept the connection")
            sock.close()
        result = cl.run("ls", "/", config=config)
        self.assertEqual(result.returncode, 4, result.stderr)
        self.assertIn("revoked", result.stderr)
        for node, address in cl.nodes.items():
            try:
                sock = tls_socket(address, ca, cert, key)
                sock.sendall(frame(m.Hello((1,), "again"), 0))
            except (ssl.SSLError, ConnectionError):
                continue
            self.assertTrue(closed_without_a_word(sock), f"{node} let a revoked identity in")
            sock.close()
        # Each chunk server keeps the list on disk, so that a restart (with no leader to ask
        # yet) does not lift the revocation.
        chunks = [node for node in cl.nodes if node.startswith("chunk-")]
        self.assertTrue(chunks)
        for node in chunks:
            with open(os.path.join(cl.home, "nodes", node, "data", "revoked.json")) as f:
                self.assertIn("mallory", json.load(f)["names"], node)
        # A chunk server killed and restarted while no metadata node answers refuses the
        # revoked identity from its start, with the list it kept.
        cl.ok("cluster", "kill", "chunk-1")
        cl.ok("cluster", "stop", "meta-1")
        try:
            cl.run("cluster", "start", "chunk-1", "--wait", "1")  # fails: no leader to hear it
            log = os.path.join(cl.home, "nodes", "chunk-1", "twistd.log")

            def restarted_with_kept_list() -> bool:
                with open(log) as f:
                    return "chunk-1 serving" in f.read().rpartition("enforcing the revocation list kept")[2]

            await wait_until(restarted_with_kept_list, 30, "chunk-1 restarted with its kept revocation list")
            try:
                sock = tls_socket(cl.nodes["chunk-1"], ca, cert, key)
                sock.sendall(frame(m.Hello((1,), "after-restart"), 0))
            except (ssl.SSLError, ConnectionError):
                pass  # refused during the handshake
            else:
                self.assertTrue(closed_without_a_word(sock), "a restarted chunk-1 let a revoked identity in")
                sock.close()
        finally:
            cl.ok("cluster", "start", "meta-1", "--wait", "60")
        cl.ok("admin", "reinstate", "mallory")
        # The metadata node enforces the list before it acknowledges the command.
        cl.ok("ls", "/", config=config)


class ExpiredCertificateTests(SynchronousTestCase):
    """A certificate from the cluster's own CA, past its validity, is refused everywhere."""

    def test_expired_certificate_refused(self) -> None:
        """Every daemon port refuses an expired identity (the CLI says so, the daemon logs
        why), and goes on serving the admin identity."""
        cl = cluster()
        # Issued by the cluster CA three days ago for one day: signed right, role right, expired.
        # (`dogfs ca issue` only issues from now on; the library takes the moment explicitly.)
        ca = load_ca(os.path.join(cl.home, "ca"))
        issued_at = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3)
        folder = write_identity_dir(ca, cl.home, "old-ellen", Role.ADMIN, [cl.meta], days=1, now=issued_at)
        config = os.path.join(folder, "client.toml")
        ca_pem, cert, key = cl.files("old-ellen")
        for node, address in cl.nodes.items():
            try:
                sock = tls_socket(address, ca_pem, cert, key)
                # TLS 1.3: the server checks the client's certificate after the client's side
                # of the handshake is done, so the refusal arrives as an alert on first use.
                sock.sendall(frame(m.Hello((1,), "expired"), 0))
            except (ssl.SSLError, ConnectionError):
                continue  # refused during the handshake
            self.assertTrue(closed_without_a_word(sock), f"{node} talked to an expired identity")
            sock.close()
        result = cl.run("ls", "/", config=config)
        self.assertEqual(result.returncode, 4, result.stderr)
        self.assertIn("refused our certificate: it has expired", result.stderr)
        for node in cl.nodes:
            with open(os.path.join(cl.home, "nodes", node, "twistd.log")) as f:
                self.assertIn("its certificate is not acceptable: it has expired", f.read(), node)
        # Still serving the admin identity, for the namespace and for data on the chunk servers.
        self.assertIn("probe", cl.ok("ls", "/"))
        target = os.path.join(cl.home, "after-expired")
        cl.ok("get", "/probe", target)
        with open(__file__, "rb") as a, open(target, "rb") as b:
            self.assertEqual(a.read(), b.read())


class ZZDown(SynchronousTestCase):
    """Stops the module's cluster."""

    def test_zz_down(self) -> None:
        """SIGHUP (certificate reload) to every daemon keeps the cluster serving; then it stops."""
        global _cluster
        if _cluster is None:
            return
        cl = _cluster
        for node in cl.nodes:
            with open(os.path.join(cl.home, "nodes", node, "twistd.pid")) as f:
                os.kill(int(f.read().strip()), signal.SIGHUP)
        target = os.path.join(cl.home, "after-hup")
        cl.ok("get", "/probe", target)
        self.assertIn("probe", cl.ok("ls", "/"))
        for node in cl.nodes:
            with open(os.path.join(cl.home, "nodes", node, "twistd.log")) as f:
                self.assertIn("TLS material reloaded", f.read(), node)
        cl.stop()
        _cluster = None
