# -*- test-case-name: tests.test_security_ca -*-
"""Roles, permissions and the identity a certificate proves.

This module owns the authorization matrix of DogFS: which role may do what. It is pure (no I/O)
and depends only on ``attrs`` and ``cryptography``. Daemons call :func:`require` (or
:func:`allowed`) with the :class:`Identity` that TLS proved for a connection before they serve a
request.

Where a role lives in a certificate: the subject's organizationalUnitName (OU) holds the role's
value (``node``, ``admin``, ``user`` or ``reader``) and the commonName (CN) holds the identity's
name. Only certificates signed by the cluster CA are ever read here, so the OU cannot be forged
by a peer.
"""

from __future__ import annotations

import enum

from attrs import frozen
from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = [
    "Identity",
    "InvalidIdentity",
    "Permission",
    "PermissionDenied",
    "Role",
    "ROLE_PERMISSIONS",
    "allowed",
    "identity_from_certificate",
    "permissions_of",
    "require",
]


class Role(enum.Enum):
    """What an identity is, as the cluster CA certified it."""

    #: A metadata node or chunk server.
    NODE = "node"
    #: An operator: everything a user may do, plus ``dogfs admin``.
    ADMIN = "admin"
    #: Reads and writes the namespace.
    USER = "user"
    #: Reads only.
    READER = "reader"


class Permission(enum.Enum):
    """A class of operations a request needs the right to perform."""

    #: get, stat, ls (and reading shards).
    READ = "read"
    #: put, rm, mkdir, mv.
    WRITE = "write"
    #: ``dogfs admin ...``: drain, remove, add nodes, repair and rebalance control.
    ADMIN = "admin"
    #: Registering as a chunk server, Raft messages, chunk-internal operations (repair, moves).
    NODE = "node"


#: The authorization matrix. Nodes also READ, because a repairing chunk server reads shards of
#: its peers; they do not WRITE the namespace or run admin commands.
ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.NODE: frozenset({Permission.NODE, Permission.READ}),
    Role.ADMIN: frozenset({Permission.ADMIN, Permission.WRITE, Permission.READ}),
    Role.USER: frozenset({Permission.WRITE, Permission.READ}),
    Role.READER: frozenset({Permission.READ}),
}

# The verb a denial message uses, so that it reads as one sentence.
_VERBS: dict[Permission, str] = {
    Permission.READ: "read",
    Permission.WRITE: "write",
    Permission.ADMIN: "run admin commands",
    Permission.NODE: "act as a cluster node",
}


def permissions_of(role: Role) -> frozenset[Permission]:
    """Return every permission ``role`` holds."""
    return ROLE_PERMISSIONS[role]


def allowed(role: Role, permission: Permission) -> bool:
    """Return whether ``role`` holds ``permission``."""
    return permission in ROLE_PERMISSIONS[role]


@frozen
class Identity:
    """Who is at the other end of a connection, as a certificate of the cluster CA proves.

    :ivar name: the certificate's commonName (e.g. ``alice``, ``chunk-3``).
    :ivar role: the role the CA gave it.
    :ivar serial: the certificate's serial number (what a revocation by serial names).
    """

    name: str
    role: Role
    serial: int


class PermissionDenied(Exception):
    """An identity asked for something its role does not permit.

    ``str()`` is one sentence naming the identity, its role and the missing permission, e.g.
    ``identity 'alice' (role reader) may not write``.
    """

    def __init__(self, name: str, role: Role, permission: Permission) -> None:
        self.name = name
        self.role = role
        self.permission = permission
        super().__init__(f"identity '{name}' (role {role.value}) may not {_VERBS[permission]}")


def require(identity: Identity, permission: Permission) -> None:
    """Raise :class:`PermissionDenied` unless ``identity``'s role holds ``permission``."""
    if not allowed(identity.role, permission):
        raise PermissionDenied(identity.name, identity.role, permission)


class InvalidIdentity(ValueError):
    """A certificate does not name a DogFS identity (no commonName, or no known role)."""


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """Read the :class:`Identity` a (verified) certificate carries.

    The name is the subject commonName, the role the subject organizationalUnitName. This does
    not verify the certificate: call it only on one the TLS layer already verified against the
    cluster CA.

    :raises InvalidIdentity: when the CN is missing, or the OU is missing, repeated or not one
        of the :class:`Role` values.
    """
    subject = cert.subject
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not cns[0].value:
        raise InvalidIdentity(
            f"certificate with serial {cert.serial_number} has no single commonName, "
            "so it names no DogFS identity"
        )
    name = str(cns[0].value)
    ous = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    known = ", ".join(r.value for r in Role)
    if len(ous) != 1:
        raise InvalidIdentity(
            f"certificate of '{name}' carries no DogFS role "
            f"(expected one subject OU among: {known})"
        )
    value = str(ous[0].value)
    try:
        role = Role(value)
    except ValueError:
        raise InvalidIdentity(
            f"certificate of '{name}' carries the unknown role '{value}' (known roles: {known})"
        ) from None
    return Identity(name=name, role=role, serial=cert.serial_number)
