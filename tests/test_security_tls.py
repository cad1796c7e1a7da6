"""Tests for dogfs.security.tls: mutual TLS over real loopback sockets, reload and revocation.

These run on the real reactor (trial's TestCase) with servers on 127.0.0.1 port 0. Nothing
sleeps: every wait is on a Deferred with a timeout.
"""

from __future__ import annotations

import datetime
import os
import random
import signal
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from dogfs.security.ca import CertificateAuthority, IssuedIdentity, init_ca
from dogfs.security.roles import Identity, Role
from dogfs.security.tls import (
    ClientTLS,
    ConnectionRegistry,
    RevocationSet,
    ServerTLS,
    TLSConfig,
    _RegisteringTLSFactory,
    client_endpoint,
    client_tls,
    describe_tls_failure,
    endpoint_maker,
    parse_address,
    peer_identity,
    reload_on_sighup,
    server_endpoint,
)

reactor: Any = _reactor
WAIT = 10.0  # seconds any single step may take before the test fails


def _config(ca: CertificateAuthority, issued: IssuedIdentity, sealed: bool = True) -> TLSConfig:
    return TLSConfig(ca_cert=ca.cert_path, cert=issued.cert_path, key=issued.key_path, sealed=sealed)


@implementer(IHandshakeListener)
class EchoServer(Protocol):
    """Echoes bytes back; records the peer's Identity once the handshake completes.

    This is the recipe for DogFS protocols: provide IHandshakeListener and read
    peer_identity(self.transport) in handshakeCompleted.
    """

    factory: EchoFactory
    identity: Identity | None = None

    def handshakeCompleted(self) -> None:
        """Record who connected."""
        self.identity = peer_identity(self.transport)
        self.factory.identities.append(self.identity)

    def dataReceived(self, data: bytes) -> None:
        """Echo."""
        self.transport.write(data)  # type: ignore[union-attr]


class EchoFactory(Factory):
    """Builds EchoServers and keeps the identities they saw."""

    protocol = EchoServer

    def __init__(self) -> None:
        self.identities: list[Identity | None] = []


@implementer(IHandshakeListener)
class Client(Protocol):
    """A client that exposes Deferreds for handshake, echo and loss."""

    def __init__(self) -> None:
        self.handshake: Deferred[Identity | None] = Deferred()
        # Fired with the exception (a Failure would make the Deferred fail).
        self.lost: Deferred[BaseException] = Deferred()
        self.buffer = b""
        self.server_identity: Identity | None = None
        self._want: tuple[bytes, Deferred[bytes]] | None = None

    def handshakeCompleted(self) -> None:
        """Fire `handshake` with the server's Identity (also kept in `server_identity`)."""
        self.server_identity = peer_identity(self.transport)
        self.handshake.callback(self.server_identity)

    def dataReceived(self, data: bytes) -> None:
        """Collect bytes; fire a pending `echo` when its bytes are all back."""
        self.buffer += data
        if self._want is not None and self.buffer.endswith(self._want[0]):
            d = self._want[1]
            self._want = None
            d.callback(self.buffer)

    def echo(self, data: bytes) -> Deferred[bytes]:
        """Send data, fire when it has come back."""
        d: Deferred[bytes] = Deferred()
        self._want = (data, d)
        self.transport.write(data)  # type: ignore[union-attr]
        return d.addTimeout(WAIT, reactor)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        """Fire `lost` with the reason's exception."""
        self.lost.callback(reason.value)


class MutualTLSTests(TestCase):
    """A TLS server made by ServerTLS and server_endpoint, against good and bad clients."""

    timeout = 60

    def setUp(self) -> Deferred[None]:
        self.base = os.path.abspath(self.mktemp())
        self.ca = init_ca(os.path.join(self.base, "ca"))
        self.node = self.ca.issue(
            "meta-1", Role.NODE, os.path.join(self.base, "meta-1"), hosts=["127.0.0.1", "localhost"]
        )
        self.alice = self.ca.issue("alice", Role.USER, os.path.join(self.base, "alice"))
        self.revocations = RevocationSet()
        self.registry = ConnectionRegistry()
        self.server_tls = ServerTLS(
            _config(self.ca, self.node), revocations=self.revocations, registry=self.registry
        )
        self.factory = EchoFactory()
        endpoint = server_endpoint(reactor, "tcp:0:interface=127.0.0.1", self.server_tls)

        def listening(port: Any) -> None:
            self.port = port
            self.address = f"127.0.0.1:{port.getHost().port}"
            self.addCleanup(port.stopListening)

        return endpoint.listen(self.factory).addCallback(listening)

    async def connect(
        self, tls: TLSConfig | ClientTLS | None, address: str | None = None
    ) -> Client:
        """Connect a Client to the server (or `address`) and return it, TCP up."""
        client = Client()
        endpoint = client_endpoint(reactor, address or self.address, tls, timeout=WAIT)
        await connectProtocol(endpoint, client).addTimeout(WAIT, reactor)
        self.addCleanup(self._close, client)
        return client

    async def _close(self, client: Client) -> None:
        if not client.lost.called:
            client.transport.loseConnection()  # type: ignore[union-attr]
            await client.lost.addTimeout(WAIT, reactor)

    async def good_client(self, issued: IssuedIdentity | None = None) -> Client:
        """Connect a good client, check the mutual handshake and an echo, and return it."""
        issued = issued or self.alice
        seen = len(self.factory.identities)
        client = await self.connect(_config(self.ca, issued))
        server_identity = await client.handshake.addTimeout(WAIT, reactor)
        self.assertEqual(server_identity, Identity("meta-1", Role.NODE, self.current_node_serial()))
        self.assertEqual(await client.echo(b"ping"), b"ping")
        self.assertEqual(
            self.factory.identities[seen:], [Identity(issued.name, issued.role, issued.serial)]
        )
        return client

    def current_node_serial(self) -> int:
        return self.node.serial

    async def refused(self, client: Client) -> BaseException:
        """Wait for `client` to be cut off; check the server gave it no identity, no echo."""
        seen = len(self.factory.identities)
        reason = await client.lost.addTimeout(WAIT, reactor)
        self.assertEqual(client.buffer, b"")
        self.assertEqual(self.factory.identities[seen:], [])
        return reason

    async def test_good_identity(self) -> None:
        """A user certificate from the cluster CA connects; the server sees its Identity and role."""
        client = await self.good_client()
        self.assertEqual(
            self.registry.identities(), [Identity("alice", Role.USER, self.alice.serial)]
        )
        await self._close(client)
        # The registry forgets closed connections.
        self.assertEqual(self.registry.identities(), [])

    async def test_plaintext_bytes(self) -> None:
        """Plaintext sent to the TLS port gets the connection closed; the next client is served."""
        client = await self.connect(None)
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[union-attr]
        await self.refused(client)
        await self.good_client()

    async def test_random_garbage(self) -> None:
        """Random bytes get the connection closed; the next client is served."""
        client = await self.connect(None)
        client.transport.write(random.Random(5).randbytes(8192))  # type: ignore[union-attr]
        await self.refused(client)
        await self.good_client()

    async def test_client_without_certificate(self) -> None:
        """A TLS client presenting no certificate is refused; the next client is served."""
        trust = ssl.Certificate.loadPEM(open(self.ca.cert_path, "rb").read())
        endpoint = wrapClientTLS(
            ssl.optionsForClientTLS("127.0.0.1", trustRoot=trust),
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port),
        )
        client = Client()
        await connectProtocol(endpoint, client).addTimeout(WAIT, reactor)
        client.transport.write(b"hello")  # type: ignore[union-attr]
        reason = await self.refused(client)
        self.assertEqual(
            describe_tls_failure(reason, self.address),
            f"{self.address} requires a client certificate and we presented none",
        )
        self.assertEqual(self.registry.identities(), [])
        await self.good_client()

    async def test_certificate_from_another_ca(self) -> None:
        """A certificate issued by a different CA is refused; the next client is served."""
        other = init_ca(os.path.join(self.base, "other-ca"), "Mallory CA")
        forged = other.issue("alice", Role.ADMIN, os.path.join(self.base, "forged"))
        # The client trusts our CA (so it accepts the server) but presents the foreign cert.
        client = await self.connect(
            TLSConfig(ca_cert=self.ca.cert_path, cert=forged.cert_path, key=forged.key_path)
        )
        client.transport.write(b"hello")  # type: ignore[union-attr]
        reason = await self.refused(client)
        self.assertIn(
            "it was not issued by this cluster's CA", describe_tls_failure(reason, "a:1") or ""
        )
        await self.good_client()

    async def test_expired_certificate(self) -> None:
        """A certificate that expired is refused; the next client is served."""
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        expired = self.ca.issue("old", Role.USER, os.path.join(self.base, "old"), days=1, now=past)
        client = await self.connect(_config(self.ca, expired))
        client.transport.write(b"hello")  # type: ignore[union-attr]
        reason = await self.refused(client)
        self.assertEqual(
            describe_tls_failure(reason, "a:1"), "a:1 refused our certificate: it has expired"
        )
        await self.good_client()

    async def test_certificate_without_role(self) -> None:
        """A certificate of our CA whose OU is no role is refused at the handshake."""
        bad = self.ca.issue("nobody", Role.USER, os.path.join(self.base, "nobody"))
        # Re-sign the same key with an OU that is not a role.
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import NameOID

        cert = x509.load_pem_x509_certificate(open(bad.cert_path, "rb").read())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "superuser"),
                x509.NameAttribute(NameOID.COMMON_NAME, "nobody"),
            ]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(self.ca.certificate.subject)
            .public_key(cert.public_key())  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(cert.not_valid_before_utc)
            .not_valid_after(cert.not_valid_after_utc)
        )
        for ext in cert.extensions:
            builder = builder.add_extension(ext.value, ext.critical)
        rogue = builder.sign(self.ca.key, hashes.SHA256())
        with open(bad.cert_path, "wb") as f:
            f.write(rogue.public_bytes(serialization.Encoding.PEM))
        client = await self.connect(_config(self.ca, bad))
        client.transport.write(b"hello")  # type: ignore[union-attr]
        await self.refused(client)
        await self.good_client()

    async def test_server_name_mismatch(self) -> None:
        """A server whose certificate does not name the dialled host is rejected by the client."""
        await self._name_mismatch(_config(self.ca, self.alice))

    async def test_server_name_mismatch_with_revocations(self) -> None:
        """A daemon's client, which checks revocations too, still checks the server's name."""
        await self._name_mismatch(ClientTLS(_config(self.ca, self.alice), RevocationSet()))

    async def _name_mismatch(self, tls: TLSConfig | ClientTLS) -> None:
        elsewhere = self.ca.issue(
            "meta-2",
            Role.NODE,
            os.path.join(self.base, "meta-2"),
            hosts=["10.1.2.3", "elsewhere.example"],
        )
        other_factory = EchoFactory()
        endpoint = server_endpoint(
            reactor, "tcp:0:interface=127.0.0.1", ServerTLS(_config(self.ca, elsewhere))
        )
        port = await endpoint.listen(other_factory)
        self.addCleanup(port.stopListening)
        client = await self.connect(tls, f"127.0.0.1:{port.getHost().port}")
        reason = await client.lost.addTimeout(WAIT, reactor)
        self.assertIsInstance(reason, VerificationError)
        self.assertEqual(
            describe_tls_failure(reason, "127.0.0.1:7000"),
            "127.0.0.1:7000 presented a certificate that does not name 127.0.0.1",
        )
        self.assertFalse(client.handshake.called)
        self.assertEqual(other_factory.identities, [])
        await self.good_client()

    async def test_plaintext_endpoints(self) -> None:
        """With tls=None both endpoints speak plaintext and peer_identity is None."""
        factory = EchoFactory()
        port = await server_endpoint(reactor, "tcp:0:interface=127.0.0.1", None).listen(factory)
        self.addCleanup(port.stopListening)
        client = await self.connect(None, f"127.0.0.1:{port.getHost().port}")
        self.assertEqual(await client.echo(b"plain"), b"plain")
        self.assertIsNone(peer_identity(client.transport))

    async def test_reload_keeps_open_connections(self) -> None:
        """reload() serves a rotated certificate to new connections; an open one stays up."""
        first = await self.good_client()
        old_serial = self.node.serial
        # Rotate: a new certificate and key in the same files, then reload (what SIGHUP does).
        self.node = self.ca.issue(
            "meta-1", Role.NODE, os.path.dirname(self.node.cert_path), hosts=["127.0.0.1"]
        )
        self.assertNotEqual(self.node.serial, old_serial)
        self.server_tls.reload()
        second = await self.good_client()
        assert second.server_identity is not None and first.server_identity is not None
        self.assertEqual(second.server_identity.serial, self.node.serial)
        self.assertEqual(first.server_identity.serial, old_serial)
        self.assertEqual(await first.echo(b"still here"), b"pingstill here")
        self.assertFalse(first.lost.called)

    async def test_reload_failure_keeps_old_files(self) -> None:
        """A reload from a broken key file raises and the server keeps its working certificate."""
        with open(self.node.key_path, "wb") as f:
            f.write(b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        self.assertRaises(SSL.Error, self.server_tls.reload)
        other = self.ca.issue("meta-x", Role.NODE, os.path.join(self.base, "x"), hosts=["::1"])
        mismatched = TLSConfig(self.ca.cert_path, self.node.cert_path, other.key_path)
        self.assertRaises(SSL.Error, self.server_tls.reload, mismatched)
        await self.good_client()

    async def test_reload_refuses_an_expired_certificate(self) -> None:
        """Neither side swaps its working certificate for an expired one on reload (every
        peer would refuse it); both keep serving and dialling with the old."""
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        expired = self.ca.issue("meta-1", Role.NODE, os.path.join(self.base, "expired"), days=1, now=past)
        stale = TLSConfig(self.ca.cert_path, expired.cert_path, expired.key_path)
        e = self.assertRaises(ValueError, self.server_tls.reload, stale)
        self.assertIn("expired on", str(e))
        await self.good_client()
        client_tls_ = ClientTLS(_config(self.ca, self.alice))
        self.assertRaises(ValueError, client_tls_.reload, stale)
        self.assertEqual(client_tls_.config.cert, self.alice.cert_path)

    async def test_client_reload_refuses_another_cas_certificate(self) -> None:
        """ClientTLS.reload refuses a certificate its CA did not issue, as the server side
        does, and keeps dialling with the old one (a daemon reloads both on SIGHUP)."""
        client_tls_ = ClientTLS(_config(self.ca, self.alice))
        other = init_ca(os.path.join(self.base, "other-ca"), "Mallory CA")
        forged = other.issue("alice", Role.USER, os.path.join(self.base, "forged"))
        bad = TLSConfig(ca_cert=self.ca.cert_path, cert=forged.cert_path, key=forged.key_path)
        e = self.assertRaises(ValueError, client_tls_.reload, bad)
        self.assertIn("was not issued by the CA", str(e))
        self.assertEqual(client_tls_.config.cert, self.alice.cert_path)
        client = await self.connect(client_tls_)
        self.assertEqual(await client.echo(b"!"), b"!")
        self.assertEqual(self.factory.identities[-1], Identity("alice", Role.USER, self.alice.serial))

    async def test_revocation_drops_open_connection(self) -> None:
        """Revoking a name cuts its open connection, refuses its next one, spares others."""
        bob = self.ca.issue("bob", Role.READER, os.path.join(self.base, "bob"))
        alice_conn = await self.good_client()
        bob_conn = await self.good_client(bob)
        self.revocations.revoke_name("alice")
        self.assertEqual(self.server_tls.enforce_revocations(), 1)
        await alice_conn.lost.addTimeout(WAIT, reactor)
        self.assertEqual(await bob_conn.echo(b"!"), b"ping!")
        again = await self.connect(_config(self.ca, self.alice))
        again.transport.write(b"hello")  # type: ignore[union-attr]
        reason = await self.refused(again)
        self.assertIn("revoked", describe_tls_failure(reason, "a:1") or "")
        # Revoking by serial: bob's one certificate.
        self.revocations.revoke_serial(bob.serial)
        self.assertEqual(self.registry.drop_revoked(self.revocations), 1)
        await bob_conn.lost.addTimeout(WAIT, reactor)
        self.revocations.replace(names=[], serials=[])
        await self.good_client()

    async def test_client_refuses_a_revoked_server(self) -> None:
        """A daemon's ClientTLS with its revocation list refuses a server whose certificate
        the list revokes (a revoked member must not be sent a byte, even when dialled), and
        drop_revoked cuts the connections already open to it; others are spared."""
        revocations = RevocationSet()
        client_tls_ = ClientTLS(_config(self.ca, self.alice), revocations)
        first = await self.connect(client_tls_)
        self.assertEqual((await first.handshake.addTimeout(WAIT, reactor)).name, "meta-1")  # type: ignore[union-attr]
        self.assertEqual(client_tls_.drop_revoked(), 0)
        revocations.revoke_name("meta-1")
        self.assertEqual(client_tls_.drop_revoked(), 1)
        await first.lost.addTimeout(WAIT, reactor)
        again = await self.connect(client_tls_)
        reason = await again.lost.addTimeout(WAIT, reactor)
        self.assertFalse(again.handshake.called)
        self.assertEqual(again.buffer, b"")
        self.assertIsNotNone(reason)
        revocations.replace(names=[], serials=[self.node.serial + 1])  # another certificate's
        self.assertEqual(await (await self.connect(client_tls_)).echo(b"x"), b"x")
        self.assertEqual(client_tls_.drop_revoked(), 0)

    async def test_registry_drop_by_name(self) -> None:
        """ConnectionRegistry.drop aborts every connection of a name and counts them."""
        a = await self.good_client()
        b = await self.good_client()
        self.assertEqual(self.registry.drop("alice"), 2)
        await a.lost.addTimeout(WAIT, reactor)
        await b.lost.addTimeout(WAIT, reactor)
        self.assertEqual(self.registry.drop("alice"), 0)

    async def test_client_tls_creator(self) -> None:
        """client_tls() gives a creator usable with plain wrapClientTLS."""
        endpoint = wrapClientTLS(
            client_tls(_config(self.ca, self.alice), "127.0.0.1"),
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port),
        )
        client = Client()
        await connectProtocol(endpoint, client).addTimeout(WAIT, reactor)
        self.addCleanup(self._close, client)
        self.assertEqual((await client.handshake.addTimeout(WAIT, reactor)).name, "meta-1")  # type: ignore[union-attr]

    async def test_handshake_timeout(self) -> None:
        """A peer that opens TCP and stays silent is aborted; authenticated peers are not."""
        self.server_tls.handshake_timeout = 1.0
        good = await self.good_client()
        silent = await self.connect(None)
        await self.refused(silent)
        # The good connection outlived the timeout and still works.
        self.assertEqual(await good.echo(b"!"), b"ping!")

    async def test_endpoint_maker(self) -> None:
        """endpoint_maker gives the address -> endpoint callable the wire pool wants, TLS on."""
        make = endpoint_maker(reactor, _config(self.ca, self.alice), timeout=WAIT)
        client = Client()
        await connectProtocol(make(self.address), client).addTimeout(WAIT, reactor)
        self.addCleanup(self._close, client)
        self.assertEqual(await client.echo(b"x"), b"x")
        self.assertEqual(
            self.factory.identities[-1], Identity("alice", Role.USER, self.alice.serial)
        )

    async def test_sighup_reloads(self) -> None:
        """reload_on_sighup: SIGHUP reloads each target; a failing target does not stop the rest."""
        reloaded: Deferred[None] = Deferred()

        class Broken:
            def reload(self) -> None:
                raise ValueError("no such file")

        class Probe:
            def reload(self) -> None:
                reloaded.callback(None)

        old_serial = self.node.serial
        self.node = self.ca.issue(
            "meta-1", Role.NODE, os.path.dirname(self.node.cert_path), hosts=["127.0.0.1"]
        )
        undo = reload_on_sighup(reactor, [Broken(), self.server_tls, Probe()])
        self.addCleanup(undo)
        os.kill(os.getpid(), signal.SIGHUP)
        await reloaded.addTimeout(WAIT, reactor)
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        client = await self.good_client()
        assert client.server_identity is not None
        self.assertNotEqual(client.server_identity.serial, old_serial)

    async def test_server_from_another_ca(self) -> None:
        """A server whose certificate another CA issued is rejected by the client."""
        other = init_ca(os.path.join(self.base, "other-ca"), "Mallory CA")
        impostor = other.issue(
            "meta-1", Role.NODE, os.path.join(self.base, "impostor"), hosts=["127.0.0.1"]
        )
        impostor_config = TLSConfig(other.cert_path, impostor.cert_path, impostor.key_path)
        factory = EchoFactory()
        endpoint = server_endpoint(reactor, "tcp:0:interface=127.0.0.1", ServerTLS(impostor_config))
        port = await endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        address = f"127.0.0.1:{port.getHost().port}"
        client = await self.connect(_config(self.ca, self.alice), address)
        reason = await client.lost.addTimeout(WAIT, reactor)
        self.assertEqual(
            describe_tls_failure(reason, address),
            f"{address} presented a certificate not issued by this cluster's CA, or expired",
        )
        self.assertFalse(client.handshake.called)
        self.assertEqual(factory.identities, [])


class ServerTLSConstructionTests(SynchronousTestCase):
    """ServerTLS refuses material that does not belong together."""

    def test_certificate_from_other_ca(self) -> None:
        """A server certificate not issued by the configured CA is refused at construction."""
        base = self.mktemp()
        ours = init_ca(os.path.join(base, "ours"))
        theirs = init_ca(os.path.join(base, "theirs"))
        node = theirs.issue("n", Role.NODE, os.path.join(base, "n"), hosts=["127.0.0.1"])
        e = self.assertRaises(ValueError, ServerTLS, _config(ours, node))
        self.assertIn("was not issued by the CA", str(e))

    def test_ssl_description_refused(self) -> None:
        """An ssl: listen address with DogFS TLS is refused (it would be TLS twice)."""
        base = self.mktemp()
        ca = init_ca(os.path.join(base, "ca"))
        node = ca.issue("n", Role.NODE, os.path.join(base, "n"), hosts=["127.0.0.1"])
        self.assertRaises(
            ValueError, server_endpoint, reactor, "ssl:7000", ServerTLS(_config(ca, node))
        )


class HandshakeDeadlineTests(SynchronousTestCase):
    """The server's handshake clock, on simulated time."""

    def _server_side(self) -> tuple[Any, ServerTLS, StringTransport, Clock]:
        base = self.mktemp()
        ca = init_ca(os.path.join(base, "ca"))
        node = ca.issue("n", Role.NODE, os.path.join(base, "n"), hosts=["127.0.0.1"])
        server = ServerTLS(_config(ca, node), handshake_timeout=10.0)
        clock = Clock()
        factory = _RegisteringTLSFactory(server, EchoFactory(), clock)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, server, transport, clock

    def test_verified_certificate_without_proof_is_cut(self) -> None:
        """A peer whose certificate was verified (it is registered) but which never proves
        it holds the key (no CertificateVerify, the handshake never completes) is aborted
        when the handshake timeout passes: a certificate is not a secret."""
        protocol, server, transport, clock = self._server_side()
        server.registry.register(Identity("alice", Role.USER, 7), protocol)
        clock.advance(9.9)
        self.assertFalse(protocol._aborted)
        clock.advance(0.2)
        self.assertTrue(protocol._aborted)

    def test_completed_handshake_is_kept(self) -> None:
        """A connection whose handshake completed in time is left alone."""
        protocol, server, transport, clock = self._server_side()
        server.registry.register(Identity("alice", Role.USER, 7), protocol)
        protocol._handshakeDone = True
        clock.advance(11.0)
        self.assertFalse(protocol._aborted)
        self.assertFalse(transport.disconnecting)


class AddressTests(SynchronousTestCase):
    """parse_address and the bits of RevocationSet that need no network."""

    def test_parse(self) -> None:
        """host:port, [v6]:port and names parse; malformed addresses raise ValueError."""
        self.assertEqual(parse_address("127.0.0.1:7000"), ("127.0.0.1", 7000))
        self.assertEqual(parse_address("[::1]:7000"), ("::1", 7000))
        self.assertEqual(parse_address("meta.example:1"), ("meta.example", 1))
        for bad in ("7000", ":7000", "h:", "h:x", "h:0", "h:70000"):
            self.assertRaises(ValueError, parse_address, bad)

    def test_revocation_set(self) -> None:
        """is_revoked matches by name or by serial; replace and reinstate undo revocations."""
        alice = Identity("alice", Role.USER, 11)
        revocations = RevocationSet()
        self.assertFalse(revocations.is_revoked(alice))
        revocations.revoke_serial(11)
        self.assertTrue(revocations.is_revoked(alice))
        self.assertFalse(revocations.is_revoked(Identity("alice", Role.USER, 12)))
        revocations.replace(names=["alice"], serials=[])
        self.assertTrue(revocations.is_revoked(Identity("alice", Role.USER, 12)))
        revocations.reinstate_name("alice")
        self.assertFalse(revocations.is_revoked(alice))
        self.assertEqual((revocations.names, revocations.serials), (frozenset(), frozenset()))


class TLSConfigTests(SynchronousTestCase):
    """TLSConfig.from_section reads a config file's [tls] table."""

    def test_relative_and_absolute(self) -> None:
        """Relative paths resolve against the config's directory; absolute ones stay."""
        config = TLSConfig.from_section(
            {"ca": "ca.pem", "cert": "n/cert.pem", "key": "/abs/key.pem"}, "/etc/dogfs"
        )
        self.assertEqual(
            config, TLSConfig("/etc/dogfs/ca.pem", "/etc/dogfs/n/cert.pem", "/abs/key.pem")
        )

    def test_sealed(self) -> None:
        """``sealed`` defaults to true; false turns sealed frames off; it must be a boolean."""
        section = {"ca": "a", "cert": "b", "key": "c"}
        self.assertTrue(TLSConfig.from_section(section, "/").sealed)
        self.assertFalse(TLSConfig.from_section({**section, "sealed": False}, "/").sealed)
        e = self.assertRaises(ValueError, TLSConfig.from_section, {**section, "sealed": "no"}, "/")
        self.assertIn("'sealed'", str(e))

    def test_missing_key(self) -> None:
        """A missing entry is named in the error."""
        e = self.assertRaises(ValueError, TLSConfig.from_section, {"ca": "a", "cert": "b"}, "/")
        self.assertIn("'key'", str(e))


class DescribeFailureTests(SynchronousTestCase):
    """describe_tls_failure leaves non-TLS errors alone."""

    def test_not_tls(self) -> None:
        """A plain connection loss is not described as a TLS failure."""
        from twisted.internet.error import ConnectionLost

        self.assertIsNone(describe_tls_failure(ConnectionLost(), "a:1"))

    def test_unknown_ssl_error(self) -> None:
        """An SSL error we have no sentence for still names the address."""
        self.assertEqual(
            describe_tls_failure(SSL.Error("weird"), "a:1"), "TLS with a:1 failed: weird"
        )


class _Collector(Protocol):
    """Keeps every byte delivered, and how many deliveries there were."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.deliveries = 0

    def dataReceived(self, data: bytes) -> None:
        """Collect."""
        self.received += data
        self.deliveries += 1


class _DirectCollector(_Collector):
    """Offers the TLS layer a buffer for the rest of a large transfer, as the wire
    connection's frame decoder does for a large frame (``read_target``/``received_into``)."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.body = memoryview(bytearray(expected))
        self.direct = 0

    def dataReceived(self, data: bytes) -> None:
        """Bytes not read into the target: copied to their place."""
        start = len(self.received) + self.direct
        self.body[start : start + len(data)] = data
        super().dataReceived(data)

    def read_target(self) -> memoryview | None:
        """The unfilled rest of the transfer once at least 100 bytes arrived, while 64 KiB
        or more are missing."""
        filled = len(self.received) + self.direct
        if filled < 100 or len(self.body) - filled < 65536:
            return None
        return self.body[filled:]

    def received_into(self, count: int) -> None:
        """``count`` bytes landed in the last target."""
        self.direct += count


class BulkTransferTests(SynchronousTestCase):
    """The bulk TLS layer (used by every DogFS endpoint) delivers exactly the bytes written, in
    order, whatever the write sizes, pieces and timing; in memory, pumped by hand. Here with
    TLS records for every byte (``sealed = false``); SealedTransferTests runs the same with
    sealed frames."""

    sealed = False

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        ca = init_ca(os.path.join(base, "ca"))
        node = ca.issue("meta-1", Role.NODE, os.path.join(base, "n"), hosts=["127.0.0.1"])
        alice = ca.issue("alice", Role.USER, os.path.join(base, "a"))
        self.server_tls = ServerTLS(_config(ca, node, self.sealed), handshake_timeout=None)
        self.client_tls = ClientTLS(_config(ca, alice, self.sealed))

    def pair(
        self, server_protocol: Protocol, client_protocol: Protocol | None = None, *, plain_end: str = ""
    ) -> tuple[Any, Any, Any, Any]:
        """(client TLS protocol, server TLS protocol, client TCP, server TCP), not yet pumped.
        ``plain_end`` ("client" or "server") puts Twisted's own TLS layer at that end."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from dogfs.security.tls import _BulkTLSFactory

        clock = Clock()
        address = IPv4Address("TCP", "127.0.0.1", 7000)
        server_app = Factory.forProtocol(lambda: server_protocol)
        client_app = Factory.forProtocol(lambda: client_protocol or Protocol())
        creator = self.client_tls.creator("127.0.0.1")
        if plain_end == "server":
            server_factory: Any = TLSMemoryBIOFactory(self.server_tls, False, server_app, clock)
        else:
            server_factory = self.server_tls.wrap_factory(server_app, clock)
        if plain_end == "client":
            client_factory: Any = TLSMemoryBIOFactory(creator, True, client_app, clock)
        else:
            client_factory = _BulkTLSFactory(
                creator, True, client_app, clock, offer_sealed=self.client_tls.config.sealed
            )
        server = server_factory.buildProtocol(address)
        client = client_factory.buildProtocol(address)
        client_tcp, server_tcp = StringTransport(), StringTransport()
        server.makeConnection(server_tcp)
        client.makeConnection(client_tcp)
        return client, server, client_tcp, server_tcp

    def pump(self, client: Any, server: Any, client_tcp: Any, server_tcp: Any, rng: random.Random) -> None:
        """Move bytes both ways, in reads of random sizes, until nothing moves."""
        while client_tcp.value() or server_tcp.value():
            for source, sink in ((client_tcp, server), (server_tcp, client)):
                data = source.value()
                source.clear()
                while data:
                    size = rng.choice((1, 5, 4096, 65536, 1 << 20))
                    sink.dataReceived(data[:size])
                    data = data[size:]

    def handshaken(self, receiver: Protocol, rng: random.Random) -> tuple[Any, Any, Any, Any]:
        """``pair(receiver)`` pumped past its handshake, each end in the mode under test."""
        connected = self.pair(receiver)
        self.pump(*connected, rng)
        for end in connected[:2]:
            self.assertEqual(end._sealed_in, self.sealed)
            self.assertEqual(end.negotiatedProtocol, b"dogfs-sealed/1" if self.sealed else None)
        return connected

    @staticmethod
    def frame(payload: bytes, header: int) -> list[Any]:
        """``payload`` written as a frame is: a 16-byte prefix, a header, then the rest."""
        return [payload[:16], payload[16:header], memoryview(payload)[header:]]

    def transfer(self, receiver: _Collector, seed: int) -> bytes:
        """Write a seeded mix of writes and frame-like sequences; return what was written."""
        rng = random.Random(seed)
        client, server, client_tcp, server_tcp = self.pair(receiver)
        sent = bytearray()
        # Written before the handshake: buffered by the layer, sent in order after it.
        early = rng.randbytes(3000)
        client.writeSequence([early[:16], early[16:80], early[80:]])
        sent += early
        self.pump(client, server, client_tcp, server_tcp, rng)
        for _ in range(12):
            if rng.random() < 0.5:
                data = rng.randbytes(rng.choice((1, 100, 16384, 16385, 300000)))
                client.write(data)
                sent += data
            else:
                pieces = [rng.randbytes(16), rng.randbytes(rng.randrange(1, 200)),
                          rng.randbytes(rng.choice((10, 20000, 1 << 20)))]
                client.writeSequence([pieces[0], pieces[1], memoryview(pieces[2])])
                sent += b"".join(pieces)
            if rng.random() < 0.5:
                self.pump(client, server, client_tcp, server_tcp, rng)
        self.pump(client, server, client_tcp, server_tcp, rng)
        return bytes(sent)

    def test_bytes_in_order(self) -> None:
        """Everything written arrives, once, in order, in far fewer deliveries than records."""
        for seed in range(3):
            receiver = _Collector()
            sent = self.transfer(receiver, seed)
            self.assertEqual(bytes(receiver.received), sent, f"seed {seed}")
            self.assertLess(receiver.deliveries, len(sent) // 16384)

    def test_direct_reads(self) -> None:
        """A protocol offering read_target gets large transfers decrypted straight into its
        buffer, and still every byte in order."""
        rng = random.Random(7)
        payload = rng.randbytes(3 << 20)
        receiver = _DirectCollector(len(payload))
        client, server, client_tcp, server_tcp = self.handshaken(receiver, rng)
        client.writeSequence(self.frame(payload, 100))
        self.pump(client, server, client_tcp, server_tcp, rng)
        self.assertEqual(bytes(receiver.body), payload)
        self.assertGreater(receiver.direct, len(payload) - 200000)

    def test_one_transport_write_per_frame(self) -> None:
        """A 1 MiB frame written after the handshake reaches the transport as one write of
        encrypted bytes (partial writes are off, so SSL_write encrypts it all in one call),
        not as one write per 16 KiB record."""
        receiver = _Collector()
        rng = random.Random(8)
        client, server, client_tcp, server_tcp = self.handshaken(receiver, rng)
        writes: list[int] = []
        original = client_tcp.writeSequence
        client_tcp.writeSequence = lambda seq: (writes.append(sum(map(len, seq))), original(seq))
        client_tcp.write = lambda data: self.fail("a write per record")
        payload = rng.randbytes(1 << 20)
        client.writeSequence(self.frame(payload, 80))
        self.assertEqual(len(writes), 1, writes)
        self.assertGreater(writes[0], len(payload))
        self.pump(client, server, client_tcp, server_tcp, rng)
        self.assertEqual(bytes(receiver.received), payload)

    def test_unread_bytes_outlive_the_callers_buffer(self) -> None:
        """After the handshake OpenSSL reads received bytes in place, in the caller's buffer;
        bytes it has not read when the call returns (here the application raised half-way)
        are copied first: once the caller reuses its buffer, closing still decrypts intact
        records, delivers them, and tells the application the connection was lost, not
        that TLS failed."""

        class Raising(_DirectCollector):
            raised = False
            reason: Failure | None = None

            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                if not self.raised:
                    self.raised = True
                    raise RuntimeError("the application failed")

            def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
                self.reason = reason

        rng = random.Random(9)
        payload = rng.randbytes(1 << 20)
        receiver = Raising(len(payload))
        client, server, client_tcp, server_tcp = self.handshaken(receiver, rng)
        client.writeSequence(self.frame(payload, 100))
        chunk = bytearray(client_tcp.value())
        client_tcp.clear()
        # The first record is delivered, then the application raises: most records are unread.
        self.assertRaises(RuntimeError, server.dataReceived, chunk)
        self.assertLess(len(receiver.received) + receiver.direct, len(payload) // 2)
        chunk[:] = bytes(len(chunk))  # the caller's buffer is reused
        server.connectionLost(Failure(ConnectionDone()))
        assert receiver.reason is not None
        self.assertNotIsInstance(receiver.reason.value, SSL.Error)
        self.assertEqual(bytes(receiver.body), payload)


class _Ending(_Collector):
    """A collector that also keeps why its connection ended."""

    reason: Failure | None = None

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.reason = reason


class SealedTransferTests(BulkTransferTests):
    """BulkTransferTests with sealed frames after the handshake (the default), and what only
    sealed frames do: keys per connection, tampering, close frames, rekeying."""

    sealed = True

    def test_one_transport_write_per_frame(self) -> None:
        """A 1 MiB frame goes to the transport in one writeSequence: its prefix and header
        sealed together, its payload in a frame of its own (which the peer opens straight
        into its read target)."""
        rng = random.Random(8)
        payload = rng.randbytes(1 << 20)
        receiver = _DirectCollector(len(payload))
        client, server, client_tcp, server_tcp = self.handshaken(receiver, rng)
        writes: list[list[int]] = []
        original = client_tcp.writeSequence
        client_tcp.writeSequence = lambda seq: (writes.append([len(p) for p in seq]), original(seq))
        client.writeSequence(self.frame(payload, 100))
        self.assertEqual(writes, [[4, 100 + 16, 4, len(payload) - 100 + 16]])
        self.pump(client, server, client_tcp, server_tcp, rng)
        self.assertEqual(bytes(receiver.body), payload)
        self.assertEqual(receiver.direct, len(payload) - 100)

    def test_unread_bytes_outlive_the_callers_buffer(self) -> None:
        """A partly received frame is kept in a buffer of its own: the caller's buffer is
        reused before the rest arrives, and the frame still opens whole."""
        rng = random.Random(9)
        payload = rng.randbytes(1 << 20)
        receiver = _DirectCollector(len(payload))
        client, server, client_tcp, server_tcp = self.handshaken(receiver, rng)
        client.writeSequence(self.frame(payload, 100))
        chunk = bytearray(client_tcp.value())
        client_tcp.clear()
        half = len(chunk) // 2
        server.dataReceived(memoryview(chunk)[:half])
        self.assertEqual(server.partly_received, half - (4 + 100 + 16))  # the payload's frame
        chunk[:half] = bytes(half)  # the caller's buffer is reused
        server.dataReceived(memoryview(chunk)[half:])
        self.assertEqual(server.partly_received, 0)
        self.assertEqual(bytes(receiver.body), payload)

    def test_application_error_ends_the_connection_as_over_tcp(self) -> None:
        """An application raising while frames are delivered gets what plain TCP gives: the
        exception reaches the transport (which drops the connection)."""

        class Raising(_Collector):
            def dataReceived(self, data: bytes) -> None:
                raise RuntimeError("the application failed")

        rng = random.Random(10)
        client, server, client_tcp, server_tcp = self.handshaken(Raising(), rng)
        client.write(b"x" * 100)
        self.assertRaises(RuntimeError, server.dataReceived, client_tcp.value())

    def sealed_bytes(self, client: Any, client_tcp: Any, data: bytes) -> bytearray:
        """What the client sends for ``data`` (one frame), taken off its transport."""
        client.write(data)
        sent = bytearray(client_tcp.value())
        client_tcp.clear()
        self.assertEqual(len(sent), 4 + len(data) + 16)
        return sent

    def assert_refused(self, server: Any, server_tcp: Any, receiver: _Ending, says: str) -> None:
        """The server dropped the connection, delivered nothing, and says why."""
        self.assertTrue(server_tcp.disconnecting)
        self.assertEqual(bytes(receiver.received), b"")
        server.connectionLost(Failure(ConnectionDone()))
        assert receiver.reason is not None
        self.assertIn(says, str(receiver.reason.value))

    def test_tampered_frame_is_refused(self) -> None:
        """A frame with one flipped bit fails its tag: nothing of it reaches the application,
        and the connection is dropped."""
        receiver = _Ending()
        rng = random.Random(11)
        client, server, client_tcp, server_tcp = self.handshaken(receiver, rng)
        sent = self.sealed_bytes(client, client_tcp, b"pay me" * 100)
        sent[40] ^= 0x20
        server.dataReceived(bytes(sent))
        self.assert_refused(server, server_tcp, receiver, "integrity check")

    def test_replayed_frame_is_refused(self) -> None:
        """The same frame sent twice opens once."""
        receiver = _Ending()
        rng = random.Random(12)
        client, server, client_tcp, server_tcp = self.handshaken(receiver, rng)
        sent = bytes(self.sealed_bytes(client, client_tcp, b"once"))
        server.dataReceived(sent)
        self.assertEqual(bytes(receiver.received), b"once")
        receiver.received.clear()
        server.dataReceived(sent)
        self.assert_refused(server, server_tcp, receiver, "integrity check")

    def test_oversized_frame_is_refused(self) -> None:
        """A header announcing more than the limit is refused at once, before any buffer is
        made for it."""
        receiver = _Ending()
        rng = random.Random(13)
        client, server, client_tcp, server_tcp = self.handshaken(receiver, rng)
        server.dataReceived(b"\xff\xff\xff\xff" + b"\0" * 100)
        self.assertIsNone(server._seal_body)
        self.assert_refused(server, server_tcp, receiver, "the most is")

    def test_garbage_after_the_handshake(self) -> None:
        """Random bytes where sealed frames belong: the connection is dropped, nothing is
        delivered, and nothing raises out of the TLS layer (hypothesis-style, seeded)."""
        for seed in range(20):
            rng = random.Random(100 + seed)
            receiver = _Ending()
            client, server, client_tcp, server_tcp = self.handshaken(receiver, rng)
            garbage = rng.randbytes(rng.choice((5, 100, 70000)))
            garbage = bytes([0, 0, garbage[2] & 0x3F]) + garbage[3:]  # a length under the limit
            server.dataReceived(garbage)
            server.connectionLost(Failure(ConnectionDone()))
            self.assertEqual(bytes(receiver.received), b"", f"seed {seed}")
            assert receiver.reason is not None
            self.assertNotIsInstance(receiver.reason.value, ConnectionDone)

    def test_close_frames(self) -> None:
        """loseConnection sends a close frame; the peer answers with its own and both close
        TCP: the application sees a clean end. A stream cut without one is reported lost."""
        receiver = _Ending()
        rng = random.Random(14)
        client, server, client_tcp, server_tcp = self.handshaken(receiver, rng)
        client.write(b"last words")
        client.loseConnection()
        self.assertFalse(client_tcp.disconnecting)  # waits for the server's close frame
        self.pump(client, server, client_tcp, server_tcp, rng)
        self.assertTrue(server_tcp.disconnecting)
        self.assertTrue(client_tcp.disconnecting)
        self.assertEqual(bytes(receiver.received), b"last words")
        server.connectionLost(Failure(ConnectionDone()))
        assert receiver.reason is not None
        self.assertIsInstance(receiver.reason.value, ConnectionDone)

        cut = _Ending()
        client, server, client_tcp, server_tcp = self.handshaken(cut, rng)
        client.write(b"half a conversation")
        self.pump(client, server, client_tcp, server_tcp, rng)
        server.connectionLost(Failure(ConnectionDone()))  # FIN, no close frame
        assert cut.reason is not None
        self.assertIsInstance(cut.reason.value, ConnectionLost)

    def test_rekeying_mid_stream(self) -> None:
        """With a small rekey threshold, a transfer crosses many keys and arrives intact."""
        from dogfs.security.tls import _BulkTLSProtocol

        self.patch(_BulkTLSProtocol, "rekey_bytes", 100_000)
        receiver = _Collector()
        sent = self.transfer(receiver, 15)
        self.assertEqual(bytes(receiver.received), sent)

    def test_negotiation(self) -> None:
        """Sealed frames only when both ends offer them: a client or a server configured with
        ``sealed = false`` keeps TLS records, and the bytes still arrive."""
        base = os.path.abspath(self.mktemp())
        ca = init_ca(os.path.join(base, "ca"))
        node = ca.issue("meta-1", Role.NODE, os.path.join(base, "n"), hosts=["127.0.0.1"])
        alice = ca.issue("alice", Role.USER, os.path.join(base, "a"))
        for server_sealed, client_sealed in ((True, False), (False, True), (True, True)):
            self.server_tls = ServerTLS(_config(ca, node, server_sealed), handshake_timeout=None)
            self.client_tls = ClientTLS(_config(ca, alice, client_sealed))
            receiver = _Collector()
            rng = random.Random(16)
            client, server, client_tcp, server_tcp = self.pair(receiver)
            self.pump(client, server, client_tcp, server_tcp, rng)
            both = server_sealed and client_sealed
            self.assertEqual((client._sealed_in, server._sealed_in), (both, both))
            client.write(b"hello")
            self.pump(client, server, client_tcp, server_tcp, rng)
            self.assertEqual(bytes(receiver.received), b"hello")

    def test_plain_twisted_peers_keep_tls_records(self) -> None:
        """Only DogFS's TLS layer offers or accepts sealed frames: a ServerTLS or a client
        creator used under Twisted's own TLS layer (which cannot switch) keeps TLS records,
        and the bytes arrive both ways."""
        for plain_end in ("client", "server"):
            receiver = _Collector()
            talker = _Collector()
            rng = random.Random(17)
            client, server, client_tcp, server_tcp = self.pair(receiver, talker, plain_end=plain_end)
            self.pump(client, server, client_tcp, server_tcp, rng)
            bulk = server if plain_end == "client" else client
            self.assertFalse(bulk._sealed_in, plain_end)
            self.assertIsNone(bulk.negotiatedProtocol, plain_end)
            client.write(b"to the server")
            server.write(b"to the client")
            for end in (client, server):  # Twisted's layer sends small writes a turn later
                if hasattr(end, "_aggregator"):
                    end._aggregator.flush()
            self.pump(client, server, client_tcp, server_tcp, rng)
            self.assertEqual(bytes(receiver.received), b"to the server", plain_end)
            self.assertEqual(bytes(talker.received), b"to the client", plain_end)

    def test_nothing_delivered_after_an_abort(self) -> None:
        """An application that aborts its connection on one frame is not handed the frames
        that came in the same read, into its buffer or otherwise."""

        class Aborting(_DirectCollector):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                assert self.transport is not None
                self.transport.abortConnection()

        rng = random.Random(18)
        payload = rng.randbytes(1 << 20)
        receiver = Aborting(len(payload) + 200)
        client, server, client_tcp, server_tcp = self.handshaken(receiver, rng)
        client.write(payload[:200])
        client.writeSequence([memoryview(payload)])
        server.dataReceived(client_tcp.value())
        self.assertEqual(bytes(receiver.received), payload[:200])
        self.assertEqual(receiver.direct, 0)

    def test_writes_before_the_handshake_go_first(self) -> None:
        """Bytes written before the handshake reach the peer before those the application
        writes on hearing the handshake is done."""

        @implementer(IHandshakeListener)
        class Eager(Protocol):
            def handshakeCompleted(self) -> None:
                assert self.transport is not None
                self.transport.write(b"after")

        receiver = _Collector()
        rng = random.Random(19)
        client, server, client_tcp, server_tcp = self.pair(receiver, Eager())
        client.write(b"before ")
        self.pump(client, server, client_tcp, server_tcp, rng)
        self.assertEqual(bytes(receiver.received), b"before after")

    def test_no_tls_bytes_after_the_marker(self) -> None:
        """Once our marker is sent, what OpenSSL still writes (an alert when TLS fails under
        us) is dropped, not sent where the peer reads sealed frames."""
        receiver = _Collector()
        rng = random.Random(20)
        client, server, client_tcp, server_tcp = self.handshaken(receiver, rng)
        from OpenSSL._util import lib

        lib.BIO_write(client._tlsConnection._from_ssl, b"\x15\x03\x03\x00\x02\x02\x50", 7)
        client._flushSendBIO()
        self.assertEqual(client_tcp.value(), b"")

    def test_marker_not_sent(self) -> None:
        """An end that cannot send its marker ends the connection instead of staying on TLS
        records while its peer switches; its application never hears the handshake done."""
        from dogfs.security.tls import _BulkTLSProtocol

        @implementer(IHandshakeListener)
        class Listening(_Ending):
            completed = False

            def handshakeCompleted(self) -> None:
                self.completed = True

        self.patch(_BulkTLSProtocol, "_write_direct", lambda protocol, view, ssl_ptr: 0)
        talker = Listening()
        client, server, client_tcp, server_tcp = self.pair(_Collector(), talker)
        self.pump(client, server, client_tcp, server_tcp, random.Random(21))
        self.assertFalse(talker.completed)
        self.assertTrue(client_tcp.disconnecting)
        client.connectionLost(Failure(ConnectionDone()))
        assert talker.reason is not None
        self.assertIn("could not send the sealed-frames marker", str(talker.reason.value))

    def test_tls_closed_before_the_marker(self) -> None:
        """A peer that negotiated sealed frames but closes TLS (close_notify) before its
        marker is misbehaving: the connection is dropped and reported as failed, not as a
        clean end."""
        talker = _Ending()
        client, server, client_tcp, server_tcp = self.pair(_Collector(), talker)
        server._start_sealing = lambda: None  # the server never switches
        rng = random.Random(22)
        self.pump(client, server, client_tcp, server_tcp, rng)
        self.assertFalse(client._sealed_in)
        server._tlsConnection.shutdown()
        server._flushSendBIO()
        self.pump(client, server, client_tcp, server_tcp, rng)
        self.assertTrue(client_tcp.disconnecting)
        client.connectionLost(Failure(ConnectionDone()))
        assert talker.reason is not None
        self.assertIn("TLS closed before the peer's sealed-frames marker", str(talker.reason.value))
