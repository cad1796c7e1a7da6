# -*- test-case-name: tests.test_security_authz -*-
"""Per-request authorization for the daemons' wire handlers.

What this module owns: the ``authorize(request, permission)`` callable the metadata handlers
and the chunk server call before serving a request, the record of a connection's identity
when its TLS handshake completes, and :func:`guard`, which puts a permission in front of
handlers that do not check one themselves (Raft messages, chunk-internal operations).

A request's identity is ``request.connection.identity``, set by :func:`record_identity` from
the TLS layer (``ConnectionFactory(on_handshake=...)``). With TLS every request must come from
an identity whose role holds the permission and that is not revoked; without TLS (a config
without ``[tls]``, ``--insecure``) nothing is checked, as the operator asked.

Refusals are ``WireError("permission_denied", "identity 'alice' (role reader) may not
write")``: the CLI maps that code to exit status 4 and prints the sentence.

Depends on ``roles``, ``tls`` (for the registry and revocations) and ``dogfs.wire.protocol``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import Logger

from dogfs.security.roles import (
    Identity,
    InvalidIdentity,
    Permission,
    PermissionDenied,
    allowed,
    require,
)
from dogfs.security.tls import RevocationSet, ServerTLS, peer_identity
from dogfs.wire.protocol import Handler, Request, WireError

__all__ = ["Authorizer", "guard", "make_authorizer", "record_identity"]

_log = Logger()

#: ``authorize(request, permission)``: returns if allowed, raises WireError otherwise.
Authorizer = Callable[[Request, str], None]


def make_authorizer(tls_enabled: bool, revocations: RevocationSet | None = None) -> Authorizer:
    """Return ``authorize(request, permission)`` for a daemon.

    ``permission`` is one of ``"read"``, ``"write"``, ``"admin"``, ``"node"``, or several
    joined by ``|`` (any one suffices; a refusal names the first). With
    ``tls_enabled`` False everything is allowed (plaintext has no identities). With TLS, a
    request is refused with ``WireError("permission_denied", ...)`` when its connection has
    no authenticated identity, when the identity is revoked in ``revocations`` (checked per
    request too, so a revocation bites even before open connections are cut), or when its
    role lacks the permission.
    """
    if not tls_enabled:

        def allow_all(request: Request, permission: str) -> None:
            return None

        return allow_all

    def authorize(request: Request, permission: str) -> None:
        try:
            # "write|node": any one of them will do (a repairing node writes shards too).
            choices = [Permission(p) for p in permission.split("|")]
        except ValueError:
            # A programming error in a handler: refuse rather than allow.
            raise WireError("permission_denied", f"unknown permission {permission!r}") from None
        wanted = choices[0]
        identity: Identity | None = getattr(request.connection, "identity", None)
        if identity is None:
            raise WireError(
                "permission_denied",
                f"this connection has no authenticated identity, so it may not {wanted.value}",
            )
        if revocations is not None and revocations.is_revoked(identity):
            raise WireError("permission_denied", f"identity '{identity.name}' is revoked")
        if any(allowed(identity.role, p) for p in choices[1:]):
            return
        try:
            require(identity, wanted)
        except PermissionDenied as e:
            raise WireError(
                "permission_denied", str(e), {"identity": identity.name, "role": identity.role.value,
                                              "permission": wanted.value}
            ) from None

    return authorize


def record_identity(server: ServerTLS | None) -> Callable[[Any], None]:
    """Return an ``on_handshake`` callback setting ``connection.identity`` from TLS.

    The registry of ``server`` already knows the identity it verified; a connection it does
    not know (or with ``server`` None) is read from the peer certificate.
    """

    def on_handshake(connection: Any) -> None:
        transport = connection.transport
        identity = server.registry.identity_of(transport) if server is not None else None
        if identity is None:
            try:
                identity = peer_identity(transport)
            except InvalidIdentity as e:
                _log.info("dropping a TLS peer without a DogFS identity: {e}", e=str(e))
                transport.abortConnection()
                return
        connection.identity = identity

    return on_handshake


def guard(
    handlers: Mapping[type, Handler],
    authorize: Authorizer,
    permissions: Mapping[type, str],
) -> dict[type, Handler]:
    """Return ``handlers`` with ``authorize(request, permissions[type])`` run first.

    Only the message types named in ``permissions`` are wrapped; the others are returned as
    they are (they authorize inside, or need nothing).
    """
    table = dict(handlers)
    for msg_type, permission in permissions.items():
        inner = table.get(msg_type)
        if inner is None:
            continue
        table[msg_type] = _guarded(inner, authorize, permission)
    return table


def _guarded(inner: Handler, authorize: Authorizer, permission: str) -> Handler:
    def handler(request: Request) -> Any:
        authorize(request, permission)
        return inner(request)

    return handler
