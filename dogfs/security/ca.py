# -*- test-case-name: tests.test_security_ca -*-
"""The cluster certificate authority: creating it, loading it, and issuing identities.

A DogFS cluster trusts exactly one CA, made by ``dogfs ca init``. Every daemon and every client
holds a certificate it signed: the subject commonName (CN) is the identity's name, the subject
organizationalUnitName (OU) its :class:`~dogfs.security.roles.Role`. Node certificates also carry
subjectAltNames for the hosts they listen on, which clients check when they dial.

Keys are ECDSA P-256: small, and quick to sign with during a handshake. Private keys are written
with mode 0600 through a temporary file, an fsync and a rename (``replace_file``), so a reader
never sees half a key, a crash never leaves one, and a rotation never leaves a key
world-readable.

This module does file I/O but no networking; it depends on ``roles`` and ``storage.files`` only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence

import tomli_w
from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dogfs.security.roles import Role
from dogfs.storage.files import replace_file

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CAExists",
    "CertificateAuthority",
    "IssuedIdentity",
    "CERT_FILE",
    "KEY_FILE",
    "CLIENT_CONFIG_FILE",
    "init_ca",
    "load_ca",
    "write_identity_dir",
]

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CLIENT_CONFIG_FILE = "client.toml"

#: Certificates start this long before "now", so a peer whose clock is a little behind ours
#: does not reject a certificate we have just issued.
CLOCK_SKEW = datetime.timedelta(minutes=5)

#: The organizationName every DogFS certificate carries (informative only).
ORGANIZATION = "DogFS"

# Names become directory names and commonNames (at most 64 characters in X.509).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class CAExists(Exception):
    """``init_ca`` was asked to create a CA where one already is (pass ``force=True``)."""


def _now(now: datetime.datetime | None) -> datetime.datetime:
    # Certificate issuance is an operator action, not part of any simulated component, so the
    # wall clock is the right default; tests and callers pass ``now`` explicitly.
    if now is None:
        return datetime.datetime.now(datetime.UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(
            f"identity name {name!r} is not valid: use 1-64 letters, digits, '.', '_', '@' "
            "or '-', starting with a letter or digit"
        )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


@frozen
class IssuedIdentity:
    """What :meth:`CertificateAuthority.issue` wrote.

    :ivar name: the identity's name (the certificate's CN).
    :ivar role: its role (the certificate's OU).
    :ivar serial: the certificate's serial number.
    :ivar cert_path: absolute path of ``cert.pem``.
    :ivar key_path: absolute path of ``key.pem`` (mode 0600).
    """

    name: str
    role: Role
    serial: int
    cert_path: str
    key_path: str


@frozen
class CertificateAuthority:
    """The cluster CA: its certificate, its private key and the directory holding them."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    ca_dir: str

    @property
    def cert_path(self) -> str:
        """Absolute path of ``ca.pem``, the file every peer trusts."""
        return os.path.join(self.ca_dir, CA_CERT_FILE)

    def issue(
        self,
        name: str,
        role: Role,
        out_dir: str,
        *,
        hosts: Sequence[str] = (),
        days: int = 365,
        now: datetime.datetime | None = None,
    ) -> IssuedIdentity:
        """Create a key and a certificate for ``name`` with ``role``, in ``out_dir``.

        Writes ``out_dir/cert.pem`` and ``out_dir/key.pem`` (0600), replacing any previous pair:
        that is how a certificate is rotated. ``hosts`` become subjectAltNames (IP addresses as
        IP entries, anything else as DNS entries) and are only allowed for :attr:`Role.NODE`,
        so that passing a client's hostname check proves the server is a node. Nodes get the
        serverAuth and clientAuth key usages, every other role clientAuth only.

        The certificate is valid from ``now`` minus a few minutes of clock skew for ``days``
        days, but never past the CA's own expiry.
        """
        _check_name(name)
        if days < 1:
            raise ValueError(f"days must be at least 1, not {days}")
        if hosts and role is not Role.NODE:
            raise ValueError(f"only node identities carry hosts; '{name}' has role {role.value}")
        moment = _now(now)
        key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        not_after = min(
            moment + datetime.timedelta(days=days), self.certificate.not_valid_after_utc
        )
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role is Role.NODE:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(moment - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(_san_entries(hosts)), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        out_dir = os.path.abspath(out_dir)
        os.makedirs(out_dir, mode=0o700, exist_ok=True)
        key_path = os.path.join(out_dir, KEY_FILE)
        cert_path = os.path.join(out_dir, CERT_FILE)
        # Key first: a reload that runs between the two renames sees a mismatched pair and
        # refuses it, instead of a new certificate with no key.
        replace_file(key_path, _key_pem(key), 0o600)
        replace_file(cert_path, _cert_pem(cert), 0o644)
        return IssuedIdentity(
            name=name, role=role, serial=serial, cert_path=cert_path, key_path=key_path
        )


def init_ca(
    ca_dir: str,
    name: str = "DogFS cluster CA",
    *,
    now: datetime.datetime | None = None,
    days: int = 3650,
    force: bool = False,
) -> CertificateAuthority:
    """Create a new cluster CA in ``ca_dir``: ``ca.pem`` and ``ca.key`` (mode 0600).

    :raises CAExists: if ``ca_dir`` already holds a CA and ``force`` is false. Replacing a CA
        invalidates every certificate it issued, so it must be asked for.
    """
    ca_dir = os.path.abspath(ca_dir)
    cert_path = os.path.join(ca_dir, CA_CERT_FILE)
    key_path = os.path.join(ca_dir, CA_KEY_FILE)
    if not force and (os.path.exists(cert_path) or os.path.exists(key_path)):
        raise CAExists(
            f"a CA already exists in {ca_dir}; refusing to replace it (force=True replaces it "
            "and invalidates every certificate it issued)"
        )
    moment = _now(now)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - CLOCK_SKEW)
        .not_valid_after(moment + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(ca_dir, mode=0o700, exist_ok=True)
    replace_file(key_path, _key_pem(key), 0o600)
    replace_file(cert_path, _cert_pem(cert), 0o644)
    return CertificateAuthority(certificate=cert, key=key, ca_dir=ca_dir)


def load_ca(ca_dir: str) -> CertificateAuthority:
    """Load the CA that :func:`init_ca` wrote in ``ca_dir``.

    :raises FileNotFoundError: when there is no CA there.
    :raises ValueError: when the files do not hold a matching ECDSA certificate and key.
    """
    ca_dir = os.path.abspath(ca_dir)
    with open(os.path.join(ca_dir, CA_CERT_FILE), "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(os.path.join(ca_dir, CA_KEY_FILE), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_dir}/{CA_KEY_FILE} is not an ECDSA key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise ValueError(f"{ca_dir}/{CA_KEY_FILE} does not match {ca_dir}/{CA_CERT_FILE}")
    return CertificateAuthority(certificate=cert, key=key, ca_dir=ca_dir)


def write_identity_dir(
    ca: CertificateAuthority,
    home: str,
    name: str,
    role: Role,
    meta_addresses: list[str],
    *,
    hosts: Sequence[str] = (),
    days: int = 365,
    now: datetime.datetime | None = None,
) -> str:
    """Issue ``name`` and write ``HOME/identities/NAME/`` ready to hand to its holder.

    The directory gets ``cert.pem``, ``key.pem`` (0600), a copy of the CA's ``ca.pem`` and a
    ``client.toml`` naming the metadata addresses and the three files by absolute path::

        [client]
        meta = ["127.0.0.1:7000"]

        [tls]
        ca = "/.../ca.pem"
        cert = "/.../cert.pem"
        key = "/.../key.pem"

    Returns the directory's absolute path.
    """
    _check_name(name)
    out_dir = os.path.join(os.path.abspath(home), "identities", name)
    issued = ca.issue(name, role, out_dir, hosts=hosts, days=days, now=now)
    ca_copy = os.path.join(out_dir, CA_CERT_FILE)
    replace_file(ca_copy, _cert_pem(ca.certificate), 0o644)
    config = {
        "client": {"meta": list(meta_addresses)},
        "tls": {"ca": ca_copy, "cert": issued.cert_path, "key": issued.key_path},
    }
    replace_file(
        os.path.join(out_dir, CLIENT_CONFIG_FILE), tomli_w.dumps(config).encode("utf-8"), 0o600
    )
    return out_dir
