# -*- test-case-name: tests.test_security_authz -*-
"""The security of one running daemon: its TLS, its authorizer, its revocation list.

What this module owns:

- :class:`DaemonSecurity`: a Twisted service a daemon adds to its tree. Built from the
  config's ``[tls]`` files (or None for plaintext), it holds the ``ServerTLS`` for the
  listener, the ``ClientTLS`` for outgoing connections, the ``authorize`` callable and the
  ``on_handshake`` callback that records each connection's identity. Started, it logs the
  plaintext warning (without TLS) or reloads the certificates on SIGHUP (with TLS), and, given
  a ``source`` of the revocation list, polls it and cuts connections newly revoked.
- :func:`secure_meta_handlers`: the metadata node's handler table with authorization wired
  in, the ``Revoke`` / ``Reinstate`` admin commands, the revocation list in every
  ``HeartbeatReply`` and Raft messages restricted to nodes.
- :class:`RevocationTap`: how a chunk server learns the list from its heartbeat replies.
- :func:`revoked_entries` / :func:`parse_revoked_entries`: the list as it travels in
  ``HeartbeatReply.revoked`` (names, and ``serial:N``).

Imports ``dogfs.meta`` lazily (only :func:`secure_meta_handlers` needs it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dogfs.config import TLSFiles
from dogfs.plugins.common import client_tls, server_tls, warn_plaintext
from dogfs.security.authz import guard, make_authorizer, record_identity
from dogfs.security.tls import RevocationSet, reload_on_sighup
from dogfs.storage.files import replace_file
from dogfs.wire import messages as m
from dogfs.wire.protocol import Handler, Reply, Request, WireError

__all__ = [
    "DaemonSecurity",
    "REVOCATION_POLL",
    "RevocationTap",
    "parse_revoked_entries",
    "revoked_entries",
    "secure_meta_handlers",
]

log = Logger()

#: Seconds between two reads of the revocation list from the local metadata state: how long
#: a revoked identity's open connections may outlive the commit of the revocation.
REVOCATION_POLL = 0.25

_SERIAL = "serial:"

RevocationSource = Callable[[], tuple[Iterable[str], Iterable[int]]]


def revoked_entries(names: Iterable[str], serials: Iterable[int]) -> tuple[str, ...]:
    """The revocation list as ``HeartbeatReply.revoked`` carries it (sorted)."""
    return tuple(sorted(names)) + tuple(f"{_SERIAL}{s}" for s in sorted(serials))


def parse_revoked_entries(entries: Iterable[str]) -> tuple[frozenset[str], frozenset[int]]:
    """Undo :func:`revoked_entries`; malformed serial entries are ignored."""
    names: set[str] = set()
    serials: set[int] = set()
    for entry in entries:
        if entry.startswith(_SERIAL):
            digits = entry[len(_SERIAL):]
            if digits.isascii() and digits.isdigit() and len(digits) <= 60:
                serials.add(int(digits))
        else:
            names.add(entry)
    return frozenset(names), frozenset(serials)


class DaemonSecurity(Service):
    """A daemon's TLS, authorization and revocation, as a service in its tree.

    :param tls: the config's ``[tls]`` files, or None (plaintext: every request allowed, a
        warning at every start).
    :param what: the daemon's id for log lines (``meta-1``).
    :param address: the address it serves, for the plaintext warning.
    :param source: returns the current revocation list (names, serials); polled every
        ``poll`` seconds while running. Chunk servers call :meth:`set_revocations` instead.
    :param keep: a file where the list is kept across restarts (chunk servers: until the
        metadata leader sends the list again, a restarted chunk server enforces the last one
        it had, rather than none).
    :raises OSError, ValueError, OpenSSL.SSL.Error: when the TLS files are unusable.
    """

    def __init__(
        self,
        reactor: Any,
        tls: TLSFiles | None,
        what: str,
        address: str,
        *,
        source: RevocationSource | None = None,
        poll: float = REVOCATION_POLL,
        keep: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.tls_files = tls
        self.what = what
        self.address = address
        self.revocations = RevocationSet()
        self.server = server_tls(tls, self.revocations)
        self.client = client_tls(tls, self.revocations)
        self.authorize = make_authorizer(tls is not None, self.revocations)
        self.on_handshake = record_identity(self.server)
        self.source = source
        self.poll = poll
        self._undo_sighup: Callable[[], None] | None = None
        self._poller: LoopingCall | None = None
        self.keep = keep
        if keep is not None:
            self._load_kept(keep)

    def _load_kept(self, path: str) -> None:
        """Enforce the list kept in ``path`` by an earlier run, if there is one."""
        try:
            with open(path, "rb") as f:
                kept = json.load(f)
            names = [str(n) for n in kept["names"]]
            serials = [int(s) for s in kept["serials"]]
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warn(
                "{node}: cannot read the revocation list kept in {path} ({error}); none is "
                "enforced until the metadata leader sends it",
                node=self.what, path=path, error=e,
            )
            return
        self.revocations.replace(frozenset(names), frozenset(serials))
        log.info("{node}: enforcing the revocation list kept in {path} ({n} names, {s} serials)",
                 node=self.what, path=path, n=len(names), s=len(serials))

    @property
    def tls_enabled(self) -> bool:
        """Whether the daemon runs mutual TLS."""
        return self.server is not None

    def startService(self) -> None:
        """Warn about plaintext, or reload certificates on SIGHUP; start polling revocations."""
        super().startService()
        warn_plaintext(self.what, self.address, self.tls_files)
        if self.server is not None and self.client is not None:
            self._undo_sighup = reload_on_sighup(self.reactor, [self.server, self.client])
        if self.source is not None:
            self._poller = LoopingCall(self.refresh)
            self._poller.clock = self.reactor
            self._poller.start(self.poll, now=True).addErrback(
                lambda f: log.failure("revocation polling stopped", f)
            )

    def stopService(self) -> defer.Deferred[None] | None:
        """Stop polling and restore the previous SIGHUP handler."""
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._poller = None
        if self._undo_sighup is not None:
            self._undo_sighup()
            self._undo_sighup = None
        return super().stopService()  # type: ignore[no-any-return]

    def refresh(self) -> None:
        """Read the revocation list from ``source`` and enforce it (no error if unreadable)."""
        if self.source is None:
            return
        try:
            names, serials = self.source()
        except RuntimeError:
            return  # the state is closed (stopping): nothing to enforce
        except Exception:
            # Anything else (a read of the state failed) must not end the polling: this
            # member would enforce a stale list for good. The last list stays in force.
            log.failure("{node}: cannot read the revocation list; keeping the last one", node=self.what)
            return
        self.set_revocations(names, serials)

    def set_revocations(self, names: Iterable[str], serials: Iterable[int]) -> int:
        """Make the revocation list exactly this; abort newly revoked connections.

        Returns how many connections were cut.
        """
        names, serials = frozenset(names), frozenset(serials)
        if names == self.revocations.names and serials == self.revocations.serials:
            return 0
        self.revocations.replace(names, serials)
        if self.keep is not None:
            try:
                replace_file(self.keep, json.dumps({"names": sorted(names), "serials": sorted(serials)}).encode())
            except OSError as e:
                log.warn("{node}: cannot keep the revocation list in {path}: {error}",
                         node=self.what, path=self.keep, error=e)
        cut = self.server.enforce_revocations() if self.server is not None else 0
        cut += self.client.drop_revoked() if self.client is not None else 0
        log.info(
            "{node}: revocation list now {n} names and {s} serials; {cut} connections cut",
            node=self.what, n=len(names), s=len(serials), cut=cut,
        )
        return cut

    def revoked(self) -> tuple[str, ...]:
        """The current list in the form ``HeartbeatReply.revoked`` carries."""
        return revoked_entries(self.revocations.names, self.revocations.serials)


def secure_meta_handlers(handlers: Any, security: DaemonSecurity) -> dict[type, Handler]:
    """The handler table of a metadata node (``MetaHandlers``) with security wired in.

    Sets ``handlers.authorize`` (and ``authorize_fresh``, which reads the revocation list
    from the state first); serves ``Revoke`` / ``Reinstate`` (admin role) through the
    command log; adds the revocation list to every ``HeartbeatReply``; and lets only node
    certificates send Raft messages (any message type named ``Raft...``), heartbeats and shard
    reports.
    """
    handlers.authorize = security.authorize

    def authorize_fresh(request: Request, permission: str) -> None:
        if security.tls_enabled:  # plaintext has no identities to revoke
            security.refresh()
        security.authorize(request, permission)

    handlers.authorize_fresh = authorize_fresh
    table = dict(handlers.handlers())
    if m.MetaCommand in table:
        table[m.MetaCommand] = _revocation_commands(handlers, table[m.MetaCommand], security)
    if m.Heartbeat in table:
        current = getattr(handlers.log, "caught_up", None) or (lambda: True)
        table[m.Heartbeat] = _with_revoked_list(table[m.Heartbeat], security, current)
    # Heartbeats and shard reports come from chunk servers (and, relayed one-way, from the
    # leader): nodes only, whatever path serves them; a chunk server speaks for itself only.
    for own in (m.Heartbeat, m.ShardReport):
        if own in table:
            table[own] = _own_node_only(table[own])
    node_only = {t: "node" for t in table if t.__name__.startswith("Raft")}
    node_only.update({m.Heartbeat: "node", m.ShardReport: "node"})
    return guard(table, security.authorize, node_only)


def _own_node_only(inner: Handler) -> Handler:
    """``inner``, refusing a request whose ``node_id`` is not its node certificate's name.

    A chunk server's certificate is issued in its id's name: with someone else's id, its
    heartbeat would re-register that server at its own address (placements would follow)
    and its shard report would speak for shards it does not hold. Relayed heartbeats (one-way,
    from the leader to the other members, feeding only their liveness view) carry the
    chunk server's id, not the leader's: they are let through. Plaintext has no identities.
    """

    def handler(request: Request) -> Any:
        identity = getattr(request.connection, "identity", None)
        node_id = getattr(request.msg, "node_id", None)
        if identity is not None and not request.oneway and node_id != identity.name:
            raise WireError(
                "permission_denied",
                f"identity '{identity.name}' may not speak for chunk server {node_id!r}: a node "
                "certificate speaks for the node of its own name",
            )
        return inner(request)

    return handler


def _revocation_commands(handlers: Any, inner: Handler, security: DaemonSecurity) -> Handler:
    from dogfs.meta import commands as c
    from dogfs.meta.service import error_from_result

    own_tags = frozenset({c.tag_of(c.Revoke), c.tag_of(c.Reinstate)})

    def command(request: Request) -> Any:
        tag = c.command_tag(bytes(request.payload[:2]))
        if tag is not None and tag not in own_tags:
            return inner(request)  # the common case, without decoding the command twice
        try:
            cmd = c.decode_command(bytes(request.payload))
        except ValueError:
            return inner(request)  # it answers with the decoding error
        if not isinstance(cmd, c.Revoke | c.Reinstate):
            return inner(request)
        security.authorize(request, "admin")
        handlers._require_leader()
        msg: m.MetaCommand = request.msg
        proposed = c.Sessioned(msg.client_id, msg.seq, cmd, handlers.clock.seconds()) if msg.client_id else cmd
        d = handlers.log.propose(proposed)

        def answered(result: Any) -> Reply:
            if isinstance(result, c.MetaError):
                raise error_from_result(result)
            # Enforce at once here; the other members follow within REVOCATION_POLL.
            security.refresh()
            handlers.emit("revocation", name=cmd.name, serial=cmd.serial,
                          revoked=isinstance(cmd, c.Revoke))
            return Reply(m.MetaReply(handlers.log.leader_address()), c.encode_result(result))

        return d.addCallback(answered)

    return command


def _with_revoked_list(inner: Handler, security: DaemonSecurity, current: Callable[[], bool]) -> Handler:
    """The heartbeat handler, its replies carrying the revocation list as the state holds it
    now, or None ("no news") while ``current()`` says the state may lack committed entries
    (a leader just elected): chunk servers must not take a list without a revocation the
    cluster already acknowledged."""

    def heartbeat(request: Request) -> Any:
        d = defer.maybeDeferred(inner, request)

        def add(reply: Any) -> Any:
            if isinstance(reply, m.HeartbeatReply):
                if not current():
                    return attrs.evolve(reply, revoked=None)
                security.refresh()
                return attrs.evolve(reply, revoked=security.revoked())
            return reply

        return d.addCallback(add)

    return heartbeat


class RevocationTap:
    """A connection pool to the metadata that hands every ``HeartbeatReply`` to a daemon.

    Chunk servers learn the revocation list from their heartbeat replies: wrap the pool their
    heartbeat service uses, and each reply's ``revoked`` list is applied with
    :meth:`DaemonSecurity.set_revocations` (cutting connections newly revoked). Everything
    else is the wrapped pool's.
    """

    def __init__(self, pool: Any, security: DaemonSecurity) -> None:
        self._pool = pool
        self._security = security

    def get(self, address: str) -> defer.Deferred[Any]:
        """The pool's connection to ``address``, watched for heartbeat replies."""
        return self._pool.get(address).addCallback(_TappedConnection, self._seen)  # type: ignore[no-any-return]

    def drop(self, address: str) -> None:
        """Close the connection to ``address`` (the pool's)."""
        self._pool.drop(address)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def _seen(self, reply: Any) -> Any:
        msg = getattr(reply, "msg", None)
        if isinstance(msg, m.HeartbeatReply) and msg.revoked is not None:
            self._security.set_revocations(*parse_revoked_entries(msg.revoked))
        return reply


class _TappedConnection:
    """A wire Connection whose ``call`` results pass through ``seen`` first."""

    def __init__(self, connection: Any, seen: Callable[[Any], Any]) -> None:
        self._connection = connection
        self._seen = seen

    def call(self, msg: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = self._connection.call(msg, *args, **kwargs)
        if isinstance(msg, m.Heartbeat):
            d.addCallback(self._seen)
        return d

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)
