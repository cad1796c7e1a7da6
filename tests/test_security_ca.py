"""Tests for dogfs.security.ca and dogfs.security.roles: the cluster CA, issued identities, roles."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
import tomllib

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.trial.unittest import SynchronousTestCase

from dogfs.security.ca import (
    CAExists,
    CertificateAuthority,
    init_ca,
    load_ca,
    write_identity_dir,
)
from dogfs.security.roles import (
    ROLE_PERMISSIONS,
    Identity,
    InvalidIdentity,
    Permission,
    PermissionDenied,
    Role,
    allowed,
    identity_from_certificate,
    permissions_of,
    require,
)

NOW = datetime.datetime(2026, 1, 15, 12, 0, tzinfo=datetime.UTC)


def _load_cert(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class CATests(SynchronousTestCase):
    """Creating, loading and protecting the cluster CA."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.ca = init_ca(self.dir, now=NOW)

    def test_files_and_modes(self) -> None:
        """init_ca writes ca.pem and a 0600 ca.key holding a self-signed P-256 CA."""
        self.assertEqual(_mode(os.path.join(self.dir, "ca.key")), 0o600)
        cert = _load_cert(os.path.join(self.dir, "ca.pem"))
        self.assertEqual(cert, self.ca.certificate)
        self.assertTrue(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertIsInstance(cert.public_key(), ec.EllipticCurvePublicKey)
        self.assertEqual(cert.public_key().curve.name, "secp256r1")  # type: ignore[union-attr]
        self.assertEqual(
            cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "DogFS cluster CA"
        )
        cert.verify_directly_issued_by(cert)

    def test_refuses_overwrite(self) -> None:
        """A second init_ca on the same directory fails and leaves the first CA intact."""
        before = _load_cert(os.path.join(self.dir, "ca.pem"))
        self.assertRaises(CAExists, init_ca, self.dir, now=NOW)
        self.assertEqual(_load_cert(os.path.join(self.dir, "ca.pem")), before)

    def test_force_overwrites(self) -> None:
        """force=True replaces the CA with a new key."""
        new = init_ca(self.dir, now=NOW, force=True)
        self.assertNotEqual(new.certificate, self.ca.certificate)
        self.assertEqual(load_ca(self.dir).certificate, new.certificate)

    def test_load_round_trip(self) -> None:
        """load_ca returns the same certificate and key that init_ca made."""
        loaded = load_ca(self.dir)
        self.assertEqual(loaded.certificate, self.ca.certificate)
        self.assertEqual(
            loaded.key.private_numbers(), self.ca.key.private_numbers()
        )  # same key material
        self.assertEqual(loaded.cert_path, os.path.join(os.path.abspath(self.dir), "ca.pem"))

    def test_load_missing(self) -> None:
        """load_ca on an empty directory fails with FileNotFoundError."""
        self.assertRaises(FileNotFoundError, load_ca, self.mktemp())

    def test_naive_now_refused(self) -> None:
        """A timezone-naive `now` is refused rather than silently taken as local time."""
        self.assertRaises(ValueError, init_ca, self.mktemp(), now=datetime.datetime(2026, 1, 1))


class IssueTests(SynchronousTestCase):
    """What CertificateAuthority.issue puts in a certificate."""

    def setUp(self) -> None:
        self.ca: CertificateAuthority = init_ca(self.mktemp(), now=NOW)

    def test_node_certificate(self) -> None:
        """A node gets CN, OU=node, IP and DNS SANs, server+client EKU, and a 0600 key."""
        out = self.mktemp()
        issued = self.ca.issue(
            "chunk-1", Role.NODE, out, hosts=["127.0.0.1", "::1", "chunk1.example"], now=NOW
        )
        self.assertEqual((issued.name, issued.role), ("chunk-1", Role.NODE))
        self.assertEqual(issued.cert_path, os.path.join(os.path.abspath(out), "cert.pem"))
        self.assertEqual(_mode(issued.key_path), 0o600)
        cert = _load_cert(issued.cert_path)
        cert.verify_directly_issued_by(self.ca.certificate)
        self.assertEqual(cert.serial_number, issued.serial)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["chunk1.example"])
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(
            set(eku), {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        )
        self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertEqual(
            identity_from_certificate(cert), Identity("chunk-1", Role.NODE, issued.serial)
        )

    def test_client_certificate(self) -> None:
        """A user gets clientAuth only and no SANs."""
        issued = self.ca.issue("alice", Role.USER, self.mktemp(), now=NOW)
        cert = _load_cert(issued.cert_path)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.CLIENT_AUTH])
        self.assertRaises(
            x509.ExtensionNotFound,
            cert.extensions.get_extension_for_class,
            x509.SubjectAlternativeName,
        )
        self.assertEqual(identity_from_certificate(cert).role, Role.USER)

    def test_hosts_only_for_nodes(self) -> None:
        """Giving hosts to a non-node identity is refused (a SAN match must imply a node)."""
        for role in (Role.ADMIN, Role.USER, Role.READER):
            self.assertRaises(
                ValueError, self.ca.issue, "x", role, self.mktemp(), hosts=["127.0.0.1"]
            )

    def test_random_serials(self) -> None:
        """Two certificates for the same name get different serial numbers."""
        out = self.mktemp()
        a = self.ca.issue("alice", Role.USER, out, now=NOW)
        b = self.ca.issue("alice", Role.USER, out, now=NOW)
        self.assertNotEqual(a.serial, b.serial)
        self.assertEqual(_load_cert(b.cert_path).serial_number, b.serial)

    def test_validity(self) -> None:
        """Validity starts a few minutes before `now`, lasts `days`, never outlives the CA."""
        cert = _load_cert(self.ca.issue("a", Role.READER, self.mktemp(), days=2, now=NOW).cert_path)
        self.assertEqual(cert.not_valid_after_utc, NOW + datetime.timedelta(days=2))
        self.assertLess(cert.not_valid_before_utc, NOW)
        self.assertGreater(cert.not_valid_before_utc, NOW - datetime.timedelta(hours=1))
        long = _load_cert(
            self.ca.issue("b", Role.READER, self.mktemp(), days=100_000, now=NOW).cert_path
        )
        self.assertEqual(long.not_valid_after_utc, self.ca.certificate.not_valid_after_utc)

    def test_bad_names(self) -> None:
        """Names that could not be a directory or a CN are refused."""
        for name in ("", "a/b", "../x", " x", "x" * 65, ".hidden"):
            self.assertRaises(ValueError, self.ca.issue, name, Role.USER, self.mktemp())

    def test_bad_days(self) -> None:
        """days below 1 is refused."""
        self.assertRaises(ValueError, self.ca.issue, "a", Role.USER, self.mktemp(), days=0)


class IdentityDirTests(SynchronousTestCase):
    """write_identity_dir: what an operator hands to a user."""

    def test_layout_and_config(self) -> None:
        """HOME/identities/NAME holds cert, 0600 key, ca copy and a client.toml of absolute paths."""
        ca = init_ca(self.mktemp(), now=NOW)
        home = self.mktemp()
        path = write_identity_dir(ca, home, "bob", Role.READER, ["127.0.0.1:7000", "h:7001"])
        self.assertEqual(path, os.path.join(os.path.abspath(home), "identities", "bob"))
        self.assertEqual(sorted(os.listdir(path)), ["ca.pem", "cert.pem", "client.toml", "key.pem"])
        self.assertEqual(_mode(os.path.join(path, "key.pem")), 0o600)
        with open(os.path.join(path, "client.toml"), "rb") as f:
            config = tomllib.load(f)
        self.assertEqual(config["client"], {"meta": ["127.0.0.1:7000", "h:7001"]})
        self.assertEqual(
            config["tls"],
            {
                "ca": os.path.join(path, "ca.pem"),
                "cert": os.path.join(path, "cert.pem"),
                "key": os.path.join(path, "key.pem"),
            },
        )
        self.assertEqual(_load_cert(config["tls"]["ca"]), ca.certificate)
        cert = _load_cert(config["tls"]["cert"])
        self.assertEqual(identity_from_certificate(cert).role, Role.READER)


def _signed(ca: CertificateAuthority, name: x509.Name) -> x509.Certificate:
    """A certificate for ``name`` signed by ``ca``, bypassing issue()'s checks."""
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )


class IdentityFromCertificateTests(SynchronousTestCase):
    """identity_from_certificate refuses certificates that name no DogFS identity."""

    def setUp(self) -> None:
        self.ca = init_ca(self.mktemp(), now=NOW)

    def _name(self, *attrs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
        return x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])

    def test_missing_role(self) -> None:
        """No OU: InvalidIdentity naming the certificate and the expected roles."""
        cert = _signed(self.ca, self._name((NameOID.COMMON_NAME, "eve")))
        e = self.assertRaises(InvalidIdentity, identity_from_certificate, cert)
        self.assertIn("'eve' carries no DogFS role", str(e))
        self.assertIn("node, admin, user, reader", str(e))

    def test_unknown_role(self) -> None:
        """An OU that is no Role: InvalidIdentity naming the bad value."""
        cert = _signed(
            self.ca,
            self._name((NameOID.ORGANIZATIONAL_UNIT_NAME, "root"), (NameOID.COMMON_NAME, "eve")),
        )
        e = self.assertRaises(InvalidIdentity, identity_from_certificate, cert)
        self.assertIn("unknown role 'root'", str(e))

    def test_two_roles(self) -> None:
        """Two OUs are ambiguous and refused."""
        cert = _signed(
            self.ca,
            self._name(
                (NameOID.ORGANIZATIONAL_UNIT_NAME, "reader"),
                (NameOID.ORGANIZATIONAL_UNIT_NAME, "admin"),
                (NameOID.COMMON_NAME, "eve"),
            ),
        )
        self.assertRaises(InvalidIdentity, identity_from_certificate, cert)

    def test_missing_name(self) -> None:
        """No CN: InvalidIdentity."""
        cert = _signed(self.ca, self._name((NameOID.ORGANIZATIONAL_UNIT_NAME, "user")))
        self.assertRaises(InvalidIdentity, identity_from_certificate, cert)


# The matrix as the issue states it, written out independently of ROLE_PERMISSIONS.
EXPECTED = {
    (Role.NODE, Permission.NODE): True,
    (Role.NODE, Permission.READ): True,
    (Role.NODE, Permission.WRITE): False,
    (Role.NODE, Permission.ADMIN): False,
    (Role.ADMIN, Permission.NODE): False,
    (Role.ADMIN, Permission.READ): True,
    (Role.ADMIN, Permission.WRITE): True,
    (Role.ADMIN, Permission.ADMIN): True,
    (Role.USER, Permission.NODE): False,
    (Role.USER, Permission.READ): True,
    (Role.USER, Permission.WRITE): True,
    (Role.USER, Permission.ADMIN): False,
    (Role.READER, Permission.NODE): False,
    (Role.READER, Permission.READ): True,
    (Role.READER, Permission.WRITE): False,
    (Role.READER, Permission.ADMIN): False,
}


class RoleMatrixTests(SynchronousTestCase):
    """The authorization matrix, every role against every permission."""

    def test_matrix_exhaustive(self) -> None:
        """allowed() matches the stated matrix for all 16 pairs, and the table covers them all."""
        self.assertEqual(len(EXPECTED), len(Role) * len(Permission))
        for role in Role:
            for permission in Permission:
                self.assertEqual(
                    allowed(role, permission), EXPECTED[(role, permission)], (role, permission)
                )
            self.assertEqual(permissions_of(role), {p for p in Permission if EXPECTED[(role, p)]})
        self.assertEqual(set(ROLE_PERMISSIONS), set(Role))

    def test_require(self) -> None:
        """require() passes silently when allowed and raises PermissionDenied otherwise."""
        for (role, permission), ok in EXPECTED.items():
            identity = Identity("someone", role, 1)
            if ok:
                require(identity, permission)
            else:
                e = self.assertRaises(PermissionDenied, require, identity, permission)
                self.assertEqual((e.name, e.role, e.permission), ("someone", role, permission))

    def test_denial_message(self) -> None:
        """The denial is one sentence naming the identity, its role and what it may not do."""
        self.assertEqual(
            str(PermissionDenied("alice", Role.READER, Permission.WRITE)),
            "identity 'alice' (role reader) may not write",
        )
        self.assertEqual(
            str(PermissionDenied("bob", Role.USER, Permission.ADMIN)),
            "identity 'bob' (role user) may not run admin commands",
        )
        self.assertEqual(
            str(PermissionDenied("carol", Role.ADMIN, Permission.NODE)),
            "identity 'carol' (role admin) may not act as a cluster node",
        )
