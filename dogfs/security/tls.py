# -*- test-case-name: tests.test_security_tls -*-
"""Mutually authenticated TLS for DogFS's Twisted endpoints.

What this module owns:

- :class:`ServerTLS`: the server side of every DogFS listener. It requires a client certificate
  signed by the cluster CA (a peer without one gets a handshake alert and nothing else), speaks
  TLS 1.2 or 1.3 only, refuses identities without a role and revoked identities during the
  handshake, and can :meth:`ServerTLS.reload` its certificate, key and CA from disk for new
  connections while open ones carry on (what a daemon's SIGHUP handler calls).
- :class:`ClientTLS` / :func:`client_tls`: the client side. It trusts only the cluster CA,
  presents our certificate, and checks that the server's certificate names the host we dialled
  (an IP address against IP subjectAltNames, a name against DNS ones).
- :func:`server_endpoint` / :func:`client_endpoint`: endpoints from DogFS's address strings
  (``tcp:7000:interface=127.0.0.1`` to listen, ``host:port`` to dial), with TLS or, when
  ``tls`` is ``None``, plaintext.
- :func:`peer_identity`: the :class:`~dogfs.security.roles.Identity` at the other end.
- :class:`RevocationSet` and :class:`ConnectionRegistry`: revocation consulted at every
  handshake, and the way to cut connections a revoked identity already holds.

How a protocol learns who its peer is: the TLS layer calls the application protocol's
``handshakeCompleted()`` if the protocol provides
:class:`twisted.internet.interfaces.IHandshakeListener`; from then on
``peer_identity(self.transport)`` returns the peer's Identity. No application data is delivered
before the handshake completes, so reading the identity at the first ``dataReceived`` works too.
``connectionMade`` runs *before* the handshake: the identity is not known there.

Session resumption is disabled on the server: a resumed session skips certificate
verification, and so would skip the revocation check.

Depends on ``roles`` only (and Twisted, pyOpenSSL, cryptography, service_identity).
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import mmap
import os
import signal
import socket
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, cast

from attrs import frozen
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import error, main, ssl, tcp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import (
    IHandshakeListener,
    IListeningPort,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from dogfs.security import sealed
from dogfs.security.roles import Identity, InvalidIdentity, identity_from_certificate
from dogfs.wire.protocol import nothing_queued

__all__ = [
    "ClientTLS",
    "ConnectionRegistry",
    "RevocationSet",
    "ServerTLS",
    "TLSConfig",
    "client_endpoint",
    "client_tls",
    "describe_tls_failure",
    "endpoint_maker",
    "parse_address",
    "peer_identity",
    "reload_on_sighup",
    "server_endpoint",
]

_log = Logger()

# OpenSSL's X509_V_ERR_* codes a DogFS operator is likely to meet, so that a refused handshake
# is logged as a sentence instead of a number.
_VERIFY_ERRORS: dict[int, str] = {
    2: "its issuer's certificate is unavailable",
    7: "its signature does not verify",
    9: "it is not valid yet",
    10: "it has expired",
    18: "it is self-signed",
    19: "its chain ends in a CA we do not trust",
    20: "it was not issued by the cluster CA",
    21: "it was not issued by the cluster CA",
    26: "it may not be used for this purpose",
}

#: Seconds a server gives a new connection to present a valid certificate before aborting it.
HANDSHAKE_TIMEOUT = 10.0

# Forward-secret AEAD suites only, for TLS 1.2 (TLS 1.3 suites are all of that kind), AES-128-GCM
# first: with AES-NI/VAES it is the cheapest per byte (OpenSSL's default order puts AES-256
# first, which costs ~5-30% more CPU here), and bulk data is CPU-bound on the data path. The
# server's order decides (OP_CIPHER_SERVER_PREFERENCE); AES-256 and ChaCha20 stay acceptable.
_TLS12_CIPHERS = b"ECDHE+AES128+AESGCM:ECDHE+AESGCM:ECDHE+CHACHA20"
_TLS13_CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


@frozen
class TLSConfig:
    """Where a process finds its TLS material: absolute paths of PEM files.

    :ivar ca_cert: the cluster CA's certificate (``ca.pem``), the only root trusted.
    :ivar cert: this process's certificate (``cert.pem``).
    :ivar key: its private key (``key.pem``).
    :ivar sealed: offer (as a client) and accept (as a server) sealed frames after a TLS 1.3
        handshake (:mod:`dogfs.security.sealed`); False keeps every byte in TLS records.
    """

    ca_cert: str
    cert: str
    key: str
    sealed: bool = True

    @classmethod
    def from_section(cls, section: Mapping[str, Any], relative_to: str) -> TLSConfig:
        """Build from a config file's ``[tls]`` table (keys ``ca``, ``cert``, ``key``).

        Relative paths are taken relative to ``relative_to`` (the config file's directory),
        as the example configs in ``etc/`` say.

        :raises ValueError: naming the missing key.
        """
        paths = []
        for key in ("ca", "cert", "key"):
            value = section.get(key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"the [tls] section needs a '{key}' path")
            paths.append(os.path.join(os.path.abspath(relative_to), os.path.expanduser(value)))
        sealed_frames = section.get("sealed", True)
        if not isinstance(sealed_frames, bool):
            raise ValueError("the [tls] section's 'sealed' must be true or false")
        return cls(ca_cert=paths[0], cert=paths[1], key=paths[2], sealed=sealed_frames)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def peer_identity(transport: object) -> Identity | None:
    """Return the Identity whose certificate the peer presented on ``transport``.

    ``transport`` is a protocol's ``self.transport`` on a TLS connection made by this module.
    Returns ``None`` when the transport is not TLS, the handshake has not completed yet, or the
    connection is gone.

    :raises InvalidIdentity: if the peer's certificate carries no DogFS role. (A server made by
        :class:`ServerTLS` already refused such a peer during the handshake.)
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        cert = get()
    except AttributeError:
        # TLSMemoryBIOProtocol drops its OpenSSL connection once the connection is lost.
        return None
    if cert is None:
        return None
    crypto_cert: x509.Certificate = (
        cert if isinstance(cert, x509.Certificate) else cert.to_cryptography()
    )
    return identity_from_certificate(crypto_cert)


class RevocationSet:
    """Identities no longer allowed in: by name (every certificate of it) or by serial.

    Mutable at runtime; the metadata service feeds it (e.g. with :meth:`replace` whenever its
    committed revocation list changes). A :class:`ServerTLS` consults it at each handshake;
    connections already open are cut with :meth:`ServerTLS.enforce_revocations` or
    :meth:`ConnectionRegistry.drop`.
    """

    def __init__(self, names: Iterable[str] = (), serials: Iterable[int] = ()) -> None:
        self._names: set[str] = set(names)
        self._serials: set[int] = set(serials)

    @property
    def names(self) -> frozenset[str]:
        """The revoked names."""
        return frozenset(self._names)

    @property
    def serials(self) -> frozenset[int]:
        """The revoked certificate serial numbers."""
        return frozenset(self._serials)

    def revoke_name(self, name: str) -> None:
        """Revoke every certificate whose CN is ``name``."""
        self._names.add(name)

    def revoke_serial(self, serial: int) -> None:
        """Revoke the one certificate with this serial number (e.g. a rotated-out one)."""
        self._serials.add(serial)

    def reinstate_name(self, name: str) -> None:
        """Undo :meth:`revoke_name` (no error if ``name`` was not revoked)."""
        self._names.discard(name)

    def replace(self, names: Iterable[str], serials: Iterable[int]) -> None:
        """Make the set exactly ``names`` and ``serials`` (a fresh list from the metadata)."""
        self._names = set(names)
        self._serials = set(serials)

    def is_revoked(self, identity: Identity) -> bool:
        """Return whether ``identity`` is revoked by its name or by its serial."""
        return identity.name in self._names or identity.serial in self._serials


class ConnectionRegistry:
    """Open TLS connections by the Identity that authenticated their peer.

    :class:`ServerTLS` registers each connection once its client certificate is verified, and
    the factories made by :meth:`ServerTLS.wrap_factory` unregister it when it closes;
    :class:`ClientTLS` registers the connections it makes once the server's certificate is
    verified (it has no close hook: the registry holds its connections weakly, and passes
    over closed ones). It exists so that revoking an identity can cut the connections it
    already holds.
    """

    def __init__(self) -> None:
        self._by_transport: weakref.WeakKeyDictionary[Any, Identity] = weakref.WeakKeyDictionary()

    def register(self, identity: Identity, transport: object) -> None:
        """Record that ``transport`` is authenticated as ``identity``."""
        self._by_transport[transport] = identity

    def unregister(self, transport: object) -> None:
        """Forget ``transport`` (it closed); no error if it was never registered."""
        self._by_transport.pop(transport, None)

    def identity_of(self, transport: object) -> Identity | None:
        """Return the Identity ``transport`` authenticated as, if it is registered."""
        return self._by_transport.get(transport)

    def identities(self) -> list[Identity]:
        """Return the Identity of each open connection (one entry per connection)."""
        return list(self._by_transport.values())

    def _drop_where(self, doomed: Callable[[Identity], bool]) -> int:
        victims = [t for t, ident in list(self._by_transport.items()) if doomed(ident)]
        cut = 0
        for transport in victims:
            self.unregister(transport)
            underlying = getattr(transport, "transport", None)
            if underlying is None or getattr(underlying, "disconnected", False):
                continue  # closed already
            # abortConnection, not loseConnection: a revoked peer gets no more bytes, not even
            # the rest of a response already queued.
            transport.abortConnection()
            cut += 1
        return cut

    def drop(self, identity_name: str) -> int:
        """Abort every open connection of ``identity_name``; return how many there were."""
        return self._drop_where(lambda ident: ident.name == identity_name)

    def drop_revoked(self, revocations: RevocationSet) -> int:
        """Abort every open connection whose identity ``revocations`` revokes; return the count."""
        return self._drop_where(revocations.is_revoked)


def _describe_peer(tls_protocol: TLSMemoryBIOProtocol) -> str:
    transport = getattr(tls_protocol, "transport", None)
    peer = transport.getPeer() if transport is not None else None
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    return f"{host}:{port}" if host is not None else "an unknown peer"


def _check_issued(config: TLSConfig) -> None:
    """Raise ValueError unless ``config``'s certificate was issued by its CA."""
    ca = x509.load_pem_x509_certificate(_read(config.ca_cert))
    cert = x509.load_pem_x509_certificate(_read(config.cert))
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise ValueError(f"{config.cert} was not issued by the CA in {config.ca_cert}: {e}") from e


def _check_current(config: TLSConfig) -> None:
    """Raise ValueError if ``config``'s certificate has expired: a reload must not swap a
    working certificate for one that every peer refuses."""
    cert = x509.load_pem_x509_certificate(_read(config.cert))
    expired = cert.not_valid_after_utc
    if expired <= datetime.datetime.now(datetime.UTC):
        raise ValueError(f"{config.cert} expired on {expired:%Y-%m-%d %H:%M} UTC")


def _build_server_context(config: TLSConfig) -> SSL.Context:
    """Build a server Context from ``config``'s files, checking they belong together."""
    _check_issued(config)
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_TICKET
        | SSL.OP_NO_RENEGOTIATION
    )
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_cipher_list(_TLS12_CIPHERS)
    ctx.set_tls13_ciphersuites(_TLS13_CIPHERSUITES)
    ctx.use_certificate_chain_file(config.cert)
    ctx.use_privatekey_file(config.key)
    ctx.check_privatekey()
    ctx.load_verify_locations(config.ca_cert)
    # Tell clients which CA we want their certificate from.
    ctx.load_client_ca(config.ca_cert.encode())
    # The real verification callback is set per connection (it needs the connection's
    # protocol); this one only keeps a Context built here safe if used on its own.
    ctx.set_verify(
        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE,
        lambda conn, cert, errno, depth, ok: bool(ok),
    )
    if config.sealed and _can_seal():
        ctx.set_alpn_select_callback(_select_sealed)
    return ctx


def _can_seal() -> bool:
    """Whether this process can switch a connection to sealed frames (it needs pyOpenSSL's
    private bindings to take the bytes that follow the peer's marker out of OpenSSL)."""
    return _lib is not None


def _select_sealed(connection: SSL.Connection, offered: list[bytes]) -> Any:
    """The server's ALPN choice: sealed frames if the client offers them and this connection
    runs over DogFS's TLS layer (ServerTLS may also serve Twisted's own, which cannot switch),
    else nothing."""
    if sealed.ALPN in offered and isinstance(connection.get_app_data(), _BulkTLSProtocol):
        return sealed.ALPN
    return SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The TLS server side of a DogFS listener, reloadable from disk.

    Every connection must present a certificate issued by the cluster CA, carrying a known
    role and not revoked by ``revocations``; otherwise the handshake fails with an alert and
    the application protocol never sees a byte. Accepted connections are registered in
    ``registry`` under their Identity until they close. A connection that has not presented
    a valid certificate within ``handshake_timeout`` seconds is aborted (``None``: no limit).

    Use it through :func:`server_endpoint`, or wrap a factory with :meth:`wrap_factory`. It also
    provides ``IOpenSSLServerConnectionCreator``, so ``TLSMemoryBIOFactory(server_tls, False,
    factory)`` works too, but then the registry is not told when connections close and the
    handshake timeout does not apply.

    :raises OSError, ValueError, OpenSSL.SSL.Error: when the files are missing, unreadable or
        do not belong together (the certificate not issued by the CA, the key not matching).
    """

    def __init__(
        self,
        config: TLSConfig,
        *,
        revocations: RevocationSet | None = None,
        registry: ConnectionRegistry | None = None,
        handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.revocations = revocations if revocations is not None else RevocationSet()
        self.registry = registry if registry is not None else ConnectionRegistry()
        self.handshake_timeout = handshake_timeout
        self.config = config
        self._context = _build_server_context(config)

    def reload(self, config: TLSConfig | None = None) -> None:
        """Re-read the certificate, key and CA (from ``config`` if given, else the same paths).

        New connections use the new files; open connections keep the session they have. All or
        nothing: if the new files are missing, do not belong together or hold an expired
        certificate, this raises and the old ones stay in use.
        """
        config = config if config is not None else self.config
        _check_current(config)
        context = _build_server_context(config)
        self._context = context
        self.config = config

    def enforce_revocations(self) -> int:
        """Abort the open connections of every identity now revoked; return how many."""
        return self.registry.drop_revoked(self.revocations)

    def wrap_factory(
        self, factory: IProtocolFactory, clock: IReactorTime | None = None
    ) -> IProtocolFactory:
        """Return a factory that runs ``factory``'s protocols over this server's TLS."""
        return cast(IProtocolFactory, _RegisteringTLSFactory(self, factory, clock))

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """Create the OpenSSL connection for one accepted TCP connection (Twisted calls this)."""
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)  # for _select_sealed
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE,
            self._verifier(tlsProtocol),
        )
        return connection

    def _verifier(
        self, tls_protocol: TLSMemoryBIOProtocol
    ) -> Callable[[SSL.Connection, object, int, int, int], bool]:
        def verify(conn: SSL.Connection, cert: object, errno: int, depth: int, ok: int) -> bool:
            # An exception escaping an OpenSSL callback is lost or worse: catch everything.
            try:
                if not ok:
                    reason = _VERIFY_ERRORS.get(errno, f"OpenSSL verify error {errno}")
                    _log.info(
                        "refused TLS client {peer}: its certificate is not acceptable: {reason}",
                        peer=_describe_peer(tls_protocol),
                        reason=reason,
                    )
                    return False
                if depth != 0:
                    return True
                identity = identity_from_certificate(cert.to_cryptography())  # type: ignore[attr-defined]
                if self.revocations.is_revoked(identity):
                    _log.info(
                        "refused TLS client {peer}: identity {name!r} (serial {serial}) is revoked",
                        peer=_describe_peer(tls_protocol),
                        name=identity.name,
                        serial=identity.serial,
                    )
                    return False
                self.registry.register(identity, tls_protocol)
                return True
            except InvalidIdentity as e:
                _log.info(
                    "refused TLS client {peer}: {reason}",
                    peer=_describe_peer(tls_protocol),
                    reason=str(e),
                )
                return False
            except BaseException:
                _log.failure("while verifying a TLS client certificate")
                return False

        return verify


try:
    # pyOpenSSL's cffi bindings: calling SSL_write/SSL_read/BIO_read directly skips a Python
    # wrapper, an allocation and a copy per call. Private, so every use has a fallback.
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _alloc: Any = _ffi.new_allocator(should_clear_after_alloc=False)
    _lib.BIO_get_mem_data  # noqa: B018 - the drain below needs it
except (ImportError, AttributeError):  # pragma: no cover - other pyOpenSSL layouts
    _ffi = _lib = _alloc = None


def _bytes_allocator() -> Callable[[Any, int], bytes] | None:
    """``PyBytes_FromStringAndSize(NULL, n)``: a new bytes object of ``n`` unset bytes.

    The C API's way to build a bytes object in place: the send path reads the encrypted
    bytes out of OpenSSL straight into the object it hands the socket, instead of into a
    scratch buffer that is then copied. Only ever filled before anyone else can see it.
    """
    try:
        import ctypes

        make = ctypes.pythonapi.PyBytes_FromStringAndSize
    except (ImportError, AttributeError):  # pragma: no cover - not CPython
        return None
    make.restype = ctypes.py_object
    make.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    return cast(Callable[[Any, int], bytes], make)


_new_bytes = _bytes_allocator()

# A TLS record carries at most 16 KiB of application data.
_RECORD = 1 << 14
# Plaintext handed to one SSL_write call (which writes its records into the memory BIO
# without returning to Python: partial writes are turned off, see makeConnection) before the
# encrypted bytes are drained to the socket. A whole frame (a 1 MiB cell) goes out as one
# bytes object and, when nothing is queued before it, one send.
_WRITE_CHUNK = 1 << 22
# Decrypted bytes gathered before one delivery to the application protocol.
_READ_BATCH = 1 << 20
# Below this, the send path drains through a scratch buffer (small writes, handshakes).
_FILL_MIN = 1 << 12
# Bytes read from the socket per doRead once the handshake is done (Twisted's 64 KiB reads
# cost a reactor turn and a Python call chain each).
_SOCKET_READ = 1 << 20
# Pieces handed to one sendmsg (the kernel takes at most IOV_MAX, 1024); more are queued.
_SENDMSG_PIECES = 512
# Sealed frames: a write piece at least this large is sealed in a frame of its own.
_SEAL_ALONE = 1 << 16
# Sealed frames: bytes read per doRead when no frame is partly received. The rest of a large
# frame is then read straight into its own buffer, so only this much of it is ever copied.
_SEALED_READ = 1 << 16


class _ReceivePool:
    """The one page-aligned buffer every TLS connection of the process reads its socket into.

    One buffer is enough: the reactor runs one ``doRead`` at a time, and each one hands
    OpenSSL the bytes it read and has them all decrypted (or copied out, see
    ``_BulkTLSProtocol._feed``) before it returns. Page-aligned because the kernel copies into
    such buffers about 2x faster here (PERFORMANCE.md).
    """

    _buffer: mmap.mmap | None = None
    _view: memoryview | None = None
    _pointer: Any = None

    @classmethod
    def get(cls) -> tuple[memoryview, Any]:
        """The buffer (a writable memoryview) and its cffi pointer, made on first use."""
        if cls._view is None:
            cls._buffer = mmap.mmap(-1, _SOCKET_READ)
            cls._view = memoryview(cls._buffer)
            cls._pointer = _ffi.from_buffer(cls._view, require_writable=True)
        return cls._view, cls._pointer


def _receive(sock: socket.socket, into: memoryview) -> tuple[int, Any]:
    """``recv_into`` for a doRead: (bytes read, None), or (0, what doRead returns: None when
    nothing is there yet, else CONNECTION_DONE or CONNECTION_LOST)."""
    try:
        count = sock.recv_into(into)
    except OSError as e:
        return 0, None if e.errno == errno.EWOULDBLOCK else main.CONNECTION_LOST
    return count, None if count else main.CONNECTION_DONE


def _can_send_now(transport: Any) -> bool:
    """Whether bytes may go to a plain TCP transport's socket at once: nothing is queued
    before them and the connection is not closing."""
    return not transport.disconnecting and nothing_queued(transport)


class _BulkTLSProtocol(TLSMemoryBIOProtocol):
    """Twisted's memory-BIO TLS with the per-byte and per-record work cut down for bulk data.

    Twisted encrypts a write 16 KiB at a time, copying a slice for each record and writing
    each record to the socket as it comes; it delivers each decrypted record to the
    application on its own. DogFS moves 1 MiB cells, so this subclass:

    - encrypts up to ``_WRITE_CHUNK`` bytes per ``SSL_write`` straight from the caller's
      buffer (a memoryview, never a sliced copy), with a frame's small prefix and header
      sharing the first record of its payload instead of costing a record of their own.
      pyOpenSSL turns on partial writes, which make ``SSL_write`` return after every 16 KiB
      record; they are turned off, since a memory BIO always takes a whole write;
    - drains all the encrypted bytes the memory BIO holds with one ``BIO_read`` into the
      bytes object handed to the socket (one copy, not a scratch buffer and a slice of it),
      and on a plain TCP transport with nothing queued, sends it at once with one ``send``
      instead of queueing it for Twisted to join and send on a later reactor turn;
    - once the handshake is done, reads the socket itself, up to 1 MiB at a time, into one
      page-aligned buffer shared by the process, and lets OpenSSL read the records straight
      from there (a read-only memory BIO over the buffer, swapped in for each read) instead
      of from a copy in a growing memory BIO (which zero-fills before every copy);
    - decrypts every record available into one buffer and delivers it in one call, or
      straight into the application's buffer for a large frame (``read_target``).

    Same bytes, same order, a fraction of the calls and copies (bench/tls.py measures it).
    Each fast path needs pyOpenSSL's private cffi handles and falls back to the public API.

    When both ends negotiated sealed frames (ALPN :data:`~dogfs.security.sealed.ALPN` over
    TLS 1.3), none of that is used after the handshake: each end sends its marker as its
    last TLS record, and from then on seals what it writes (one AES-GCM call per frame,
    sent with one ``sendmsg``) and opens what it reads, a large frame straight into the
    application's buffer. See :mod:`dogfs.security.sealed`.

    Either way, what the socket does not take at once is queued with the TCP transport,
    whose flow control then applies (``_send_pieces``).
    """

    _read_buffer: Any = None
    # Sealed frames: this end's sealer (set once its marker is sent) and opener (set then
    # too; used once the peer's marker has been read, which sets _sealed_in).
    _sealer: sealed.Sealer | None = None
    _opener: sealed.Opener | None = None
    _sealed_in = False
    _close_sent = False
    _peer_closed = False
    # A sealed frame partly received: its header, its body buffer and how much is filled.
    _seal_partial = b""
    _seal_header = b""
    _seal_body: memoryview | None = None
    _seal_have = 0
    #: Plaintext bytes under one key before moving to the next (tests lower it).
    rekey_bytes = sealed.REKEY_BYTES
    # Received bytes reach OpenSSL through read-only BIOs over the caller's buffer (_feed),
    # from the end of the handshake on.
    _feeding = False
    # The socket under a plain TCP transport, read and written directly after the handshake.
    _socket: socket.socket | None = None

    def makeConnection(self, transport: Any) -> None:
        """Set up TLS over ``transport`` and start the handshake; see the class docstring."""
        super().makeConnection(transport)
        ssl_ptr = getattr(self._tlsConnection, "_ssl", None)
        if _lib is not None and ssl_ptr is not None:
            _lib.SSL_clear_mode(ssl_ptr, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)

    def _checkHandshakeStatus(self) -> None:
        """Twisted's, with two changes once the handshake is done, before the application
        hears of it (it may write at once): sealed frames are set up, and writes buffered
        before the handshake are sent first (in either mode; Twisted would send the
        application's new ones ahead of them)."""
        if self._aborted:
            return
        try:
            self._tlsConnection.do_handshake()
        except SSL.WantReadError:
            self._flushSendBIO()
            return
        except SSL.Error:
            self._tlsShutdownFinished(Failure())
            return
        self._handshakeDone = True
        self._start_sealing()
        if self._lostTLSConnection or self._aborted:
            return
        if self._appSendBuffer:
            # Writes made before the handshake go first, before any the application makes
            # on hearing of it (Twisted's layer would send those first).
            self._unbufferPendingWrites()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()
        if not self._feeding and not self._aborted:
            self._start_bulk_reads()

    def _start_sealing(self) -> None:
        """If sealed frames were negotiated: derive the keys, send our marker, and seal
        every write from now on."""
        connection: Any = self._tlsConnection
        if (
            not _can_seal()
            or connection.get_alpn_proto_negotiated() != sealed.ALPN
            or connection.get_protocol_version_name() != "TLSv1.3"
        ):
            return
        try:
            exported = connection.export_keying_material(sealed.EXPORTER_LABEL, 64)
        except SSL.Error:
            self._tlsShutdownFinished(Failure())
            return
        # The factory knows which end this is (a server's is _RegisteringTLSFactory); the
        # two ends must not seal with the same direction's key.
        factory = cast(_BulkTLSFactory, self.factory)
        sealer, opener = sealed.directions(exported, factory.is_client, self.rekey_bytes)
        if self._write_direct(memoryview(sealed.MARKER), connection._ssl) != len(sealed.MARKER):
            if not self._lostTLSConnection:  # TLS wants to read first: it cannot switch now
                self._sealed_failed(sealed.SealedFrameError("could not send the sealed-frames marker"))
            return
        self._flushSendBIO()
        self._sealer, self._opener = sealer, opener

    def _start_bulk_reads(self) -> None:
        """After the handshake: feed OpenSSL without copies, and read a TCP socket ourselves."""
        connection: Any = self._tlsConnection
        if _lib is None or getattr(connection, "_into_ssl", None) is None:
            return
        self._feeding = True
        transport: Any = self.transport
        if isinstance(transport, tcp.Connection) and not transport.TLS:
            sock = getattr(transport, "socket", None)
            if isinstance(sock, socket.socket):
                self._socket = sock
                raw: Any = transport  # (mypy: no assigning to a method)
                # The reactor calls the transport's doRead when the socket is readable.
                raw.doRead = self._read_socket
                # Frames go out whole, each drained from the memory BIO into one send: Nagle's
                # algorithm would only hold a small frame that follows another until the
                # peer's ACK.
                raw.setTcpNoDelay(True)

    def _read_socket(self) -> Any:
        """The TCP transport's doRead after the handshake; returns what Twisted's would."""
        sock = self._socket
        if sock is None:  # pragma: no cover - doRead is put back before this is cleared
            return None
        if self._sealed_in:
            return self._read_sealed(sock)
        view, pointer = _ReceivePool.get()
        count, ended = _receive(sock, view)
        if not count:
            return ended
        self._feed(pointer, count)
        return None

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the transport: Twisted's path during the handshake, then ``_feed``
        (or, once the peer's marker is read, the sealed frames' reader)."""
        if self._sealed_in:
            self._sealed_received(memoryview(data))
            return
        if not self._feeding:
            super().dataReceived(data)
            return
        with _ffi.from_buffer(data) as pointer:
            self._feed(pointer, len(data))

    def _feed(self, pointer: Any, size: int) -> None:
        """Hand OpenSSL ``size`` received bytes at ``pointer`` and deliver what they decrypt to.

        OpenSSL reads them in place, through a read-only memory BIO swapped in as the
        connection's read BIO. Whatever it has not read when this returns (a connection
        closing half-way) is copied into an ordinary memory BIO: the bytes at ``pointer``
        are only valid until then.
        """
        connection: Any = self._tlsConnection
        rbio = _lib.BIO_new_mem_buf(pointer, size)
        if rbio == _ffi.NULL:  # pragma: no cover - out of memory
            raise MemoryError("BIO_new_mem_buf")
        # An empty BIO means "wait for more" (WANT_READ), not end of stream.
        _lib.BIO_set_mem_eof_return(rbio, -1)
        # Frees the previous read BIO (pyOpenSSL's, or the last one of these) and keeps the
        # write BIO: pyOpenSSL's bio_shutdown must then find the new one.
        _lib.SSL_set_bio(connection._ssl, rbio, connection._from_ssl)
        connection._into_ssl = rbio
        try:
            if self._appSendBuffer:
                self._unbufferPendingWrites()
            self._flushReceiveBIO()
        finally:
            self._keep_unread(connection, rbio)

    @staticmethod
    def _keep_unread(connection: Any, rbio: Any) -> None:
        """If ``rbio`` (a read-only BIO over a caller's buffer) is still the connection's
        read BIO and holds unread bytes, move them into a memory BIO of their own."""
        if connection._into_ssl != rbio:  # pragma: no cover - nothing swaps it but _feed
            return
        if _lib.BIO_get_mem_data(rbio, _ffi.NULL) <= 0:
            return  # all read: the usual case
        where = _ffi.new("char **")
        left = _lib.BIO_get_mem_data(rbio, where)
        rest = _lib.BIO_new(_lib.BIO_s_mem())
        if rest == _ffi.NULL:  # pragma: no cover - out of memory
            raise MemoryError("BIO_new")
        _lib.BIO_write(rest, where[0], left)
        _lib.BIO_set_mem_eof_return(rest, -1)
        _lib.SSL_set_bio(connection._ssl, rest, connection._from_ssl)
        connection._into_ssl = rest

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        """TLS is over (the peer's close_notify, or a failure): let go of the application's
        producer before closing TCP. A TCP transport whose producer is paused (the peer
        stopped reading what we stream) waits for it to resume and never closes once its
        buffer drains, since the application, having lost TLS, writes nothing more."""
        if self._producer is not None:
            self._producer = None
            self._producerPaused = False
            transport: Any = self.transport
            transport.unregisterProducer()
        super()._tlsShutdownFinished(reason)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        """Give the transport its own doRead back (breaking the cycle with us), then close.

        A sealed stream that ends without the peer's close frame was cut (as a TLS stream
        without close_notify is): the application hears of a lost connection, not a done one.
        """
        if self._sealed_in and not self._peer_closed and self._reason is None:
            self._reason = Failure(main.CONNECTION_LOST)
        self._seal_body = None  # a partly received frame, up to 4 MiB
        self._read_buffer = None
        if self._socket is not None:
            self._socket = None
            self.transport.__dict__.pop("doRead", None)
        super().connectionLost(reason)

    def _flushSendBIO(self) -> None:
        connection: Any = self._tlsConnection
        if self._sealer is not None:
            self._discard_tls_output(connection)
            return
        bio = getattr(connection, "_from_ssl", None)
        if _lib is None or bio is None:
            self._flush_send_bio_public()
            return
        pending = _lib.BIO_get_mem_data(bio, _ffi.NULL)
        if pending <= 0:
            return
        data: bytes
        if pending >= _FILL_MIN and _new_bytes is not None:
            data = _new_bytes(None, pending)
            with _ffi.from_buffer(data) as target:
                got = _lib.BIO_read(bio, target, pending)
        else:
            scratch = _alloc("char[]", pending)
            got = _lib.BIO_read(bio, scratch, pending)
            data = _ffi.buffer(scratch, max(got, 0))[:]
        if got != pending:  # pragma: no cover - a memory BIO returns all it holds
            data = data[: max(got, 0)]
        if data:
            self._send_pieces([data])

    @staticmethod
    def _discard_tls_output(connection: Any) -> None:
        """Once our marker is sent the peer reads sealed frames only: whatever OpenSSL still
        writes (an alert on a failure) would be misread as a frame, so it is dropped."""
        bio = connection._from_ssl
        pending = _lib.BIO_get_mem_data(bio, _ffi.NULL)
        if pending > 0:
            _lib.BIO_read(bio, _alloc("char[]", pending), pending)

    def _send_pieces(self, pieces: list[bytes]) -> None:
        """Send ``pieces`` with one ``sendmsg`` if the socket takes them now; queue the rest
        with the transport.

        Queued bytes keep Twisted's flow control (past its buffer size the transport pauses
        the producer). An aborted connection sends nothing more: its bytes are queued, and
        the abort drops them.
        """
        transport: Any = self.transport
        sock = self._socket
        if sock is not None and not self._aborted and len(pieces) <= _SENDMSG_PIECES and _can_send_now(transport):
            try:
                sent = sock.sendmsg(pieces)
            except OSError:
                # Full (EWOULDBLOCK, ENOBUFS) or broken: Twisted sends it or reports the loss.
                sent = 0
            while pieces and sent >= len(pieces[0]):
                sent -= len(pieces.pop(0))
            if pieces and sent:
                pieces[0] = pieces[0][sent:]
        if pieces:
            transport.writeSequence(pieces)

    def _flush_send_bio_public(self) -> None:
        chunks = []
        while True:
            try:
                chunks.append(self._tlsConnection.bio_read(_READ_BATCH))
            except SSL.WantReadError:
                break
        transport: Any = self.transport
        if len(chunks) == 1:
            transport.write(chunks[0])
        elif chunks:
            transport.writeSequence(chunks)

    def _write(self, data: Any) -> None:
        self._write_views([memoryview(data).cast("B")])

    def _write_views(self, views: list[memoryview]) -> None:
        """Encrypt ``views`` in order and send the result (or buffer it until the handshake)."""
        if self._lostTLSConnection:
            return
        if self._sealer is not None:
            self._write_sealed(views)
            return
        ssl_ptr = getattr(self._tlsConnection, "_ssl", None)
        for i, view in enumerate(views):
            if not len(view):
                continue
            if _lib is not None and ssl_ptr is not None:
                sent = self._write_direct(view, ssl_ptr)
            else:
                sent = self._write_public(view)
            if sent < 0:
                return  # the connection failed
            if sent < len(view):
                # Not writable yet (before the handshake): keep the rest, in order, for later.
                self._bufferedWrite(bytes(view[sent:]))
                self._appSendBuffer.extend(bytes(v) for v in views[i + 1 :] if len(v))
                break
        self._flushSendBIO()

    def _write_direct(self, view: memoryview, ssl_ptr: Any) -> int:
        """Hand ``view`` to ``SSL_write``; return the bytes taken, or -1 if TLS failed."""
        connection: Any = self._tlsConnection
        total = len(view)
        sent_total = 0
        with _ffi.from_buffer(view) as base:
            while sent_total < total:
                size = min(_WRITE_CHUNK, total - sent_total)
                sent = _lib.SSL_write(ssl_ptr, base + sent_total, size)
                if sent <= 0:
                    try:
                        connection._raise_ssl_error(ssl_ptr, sent)
                    except SSL.WantReadError:
                        return sent_total
                    except SSL.Error:
                        self._tlsShutdownFinished(Failure())
                        return -1
                    return sent_total  # pragma: no cover - an error OpenSSL did not name
                sent_total += sent
                if sent_total < total:
                    self._flushSendBIO()
        return sent_total

    def _write_public(self, view: memoryview) -> int:
        """``_write_direct`` through pyOpenSSL's public API, one record per call."""
        total = len(view)
        sent_total = 0
        while sent_total < total:
            try:
                sent = self._tlsConnection.send(view[sent_total : sent_total + _RECORD])
            except SSL.WantReadError:
                return sent_total
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
                return -1
            sent_total += sent
            if sent_total % _WRITE_CHUNK < sent:
                self._flushSendBIO()
        return sent_total

    def writeSequence(self, iovec: Iterable[Any]) -> None:
        if self.disconnecting and self._producer is None:
            return
        pieces = [memoryview(p).cast("B") for p in iovec]
        if self._sealer is not None:
            if not self._lostTLSConnection:
                self._write_sealed(pieces)
            return
        if self._appSendBuffer:
            # Earlier writes wait for the handshake: queue behind them, in order.
            self._appSendBuffer.extend(bytes(p) for p in pieces if len(p))
            return
        # A frame is a 16-byte prefix, a small header and a large payload. Joining the payload
        # would copy it; sending the small pieces alone would cost a record of their own. So
        # small pieces are joined with the first record's worth of what follows them.
        views: list[memoryview] = []
        small: list[Any] = []
        small_size = 0
        for piece in pieces:
            if len(piece) < _RECORD:
                small.append(piece)
                small_size += len(piece)
                if small_size >= _RECORD:
                    views.append(memoryview(b"".join(small)))
                    small, small_size = [], 0
                continue
            if small:
                cut = _RECORD - small_size
                small.append(piece[:cut])
                views.append(memoryview(b"".join(small)))
                small, small_size = [], 0
                piece = piece[cut:]
            views.append(piece)
        if small:
            views.append(memoryview(b"".join(small)))
        self._write_views(views)

    def _flushReceiveBIO(self) -> None:
        ssl_ptr = getattr(self._tlsConnection, "_ssl", None)
        if _lib is not None and ssl_ptr is not None:
            self._receive_direct(ssl_ptr)
            return
        parts: list[bytes] = []
        size = 0

        def deliver() -> None:
            nonlocal parts, size
            if parts and not self._aborted:
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                parts, size = [], 0
                ProtocolWrapper.dataReceived(self, data)
            parts, size = [], 0

        while not self._lostTLSConnection:
            try:
                data = self._tlsConnection.recv(1 << 16)
            except SSL.WantReadError:
                break
            except SSL.Error as e:
                self._read_ended(e, deliver)
            else:
                parts.append(data)
                size += len(data)
                if size >= _READ_BATCH:
                    deliver()
        deliver()
        self._flushSendBIO()

    # -- sealed frames ------------------------------------------------------------------

    def _write_sealed(self, views: list[memoryview]) -> None:
        """Seal ``views`` and send them: small pieces (a frame's prefix and header) together
        in one frame, each large one (a payload) in frames of its own, so that the peer
        opens a payload straight into the buffer its application reads it into."""
        sealer = self._sealer
        assert sealer is not None
        if self._close_sent:
            return  # after our close frame the peer reads nothing more (TLS drops them too)
        out: list[bytes] = []
        small: list[memoryview] = []
        small_size = 0
        limit = sealed.MAX_PLAINTEXT
        for view in views:
            size = len(view)
            if not size:
                continue
            if size < _SEAL_ALONE and small_size + size <= limit:
                small.append(view)
                small_size += size
                continue
            if small:
                out.extend(sealer.seal(small[0] if len(small) == 1 else b"".join(small)))
                small, small_size = [], 0
            if size < _SEAL_ALONE:
                small, small_size = [view], size
                continue
            for start in range(0, size, limit):
                out.extend(sealer.seal(view[start : start + limit]))
        if small:
            out.extend(sealer.seal(small[0] if len(small) == 1 else b"".join(small)))
        self._send_pieces(out)

    def _shutdownTLS(self) -> None:
        """Once sealed, end the stream with a close frame, not a TLS alert (the peer reads
        sealed frames now). As with TLS's close_notify, TCP is closed once the peer's close
        frame has come too (or at once when aborting)."""
        if self._sealer is None:
            super()._shutdownTLS()
            return
        if not self._close_sent and not self._aborted:
            self._close_sent = True
            self._send_pieces([self._sealer.close()])
        if self._peer_closed or self._aborted:
            transport: Any = self.transport
            transport.loseConnection()

    def _receive_marker(self, ssl_ptr: Any) -> None:
        """Read TLS records until the peer's marker; then hand what follows it, still in
        OpenSSL's read BIO, to the sealed frames' reader."""
        connection: Any = self._tlsConnection
        size = len(sealed.MARKER)
        buffer = _alloc("char[]", size + 1)
        got = _lib.SSL_read(ssl_ptr, buffer, size + 1)
        if got <= 0:
            try:
                connection._raise_ssl_error(ssl_ptr, got)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                # A clean TLS close: the peer agreed to end its stream with a close frame,
                # so one that closes before its marker is misbehaving (or was cut).
                self._sealed_failed(sealed.SealedFrameError("TLS closed before the peer's sealed-frames marker"))
            except SSL.Error as e:
                # An alert (the server refusing our certificate): the application hears of it
                # as TLS's failure, which describe_tls_failure explains.
                self._read_ended(e, lambda: None)
            return
        if _ffi.buffer(buffer, got)[:] != sealed.MARKER:
            self._sealed_failed(sealed.SealedFrameError("the peer sent data before its sealed-frames marker"))
            return
        # What follows the marker is still in the read BIO, because OpenSSL reads one record
        # at a time (read-ahead is off); if it ever held some back, they would be lost here.
        if connection.pending():
            self._sealed_failed(sealed.SealedFrameError("OpenSSL read past the sealed-frames marker"))
            return
        self._sealed_in = True
        rbio = connection._into_ssl
        left = _lib.BIO_get_mem_data(rbio, _ffi.NULL)
        if left > 0:
            rest = _alloc("char[]", left)
            left = _lib.BIO_read(rbio, rest, left)
            self._sealed_received(memoryview(_ffi.buffer(rest, max(left, 0))))

    def _read_sealed(self, sock: socket.socket) -> Any:
        """doRead once sealed: the rest of a large frame's body straight into its buffer,
        else up to ``_SEALED_READ`` bytes into the shared buffer, then open what came."""
        body = self._seal_body
        view = body[self._seal_have :] if body is not None else _ReceivePool.get()[0][:_SEALED_READ]
        count, ended = _receive(sock, view)
        if not count:
            return ended
        if body is None:
            self._sealed_received(view[:count])
            return None
        self._seal_have += count
        if self._seal_have == len(body):
            self._seal_body = None
            self._open_frame(self._seal_header, body)
        return None

    def _sealed_received(self, data: memoryview) -> None:
        """Open the sealed frames in ``data`` (valid only during this call), keeping a
        partial frame's bytes for the next read."""
        position, end = 0, len(data)
        # After the peer's close frame (which sets _lostTLSConnection) the rest is ignored,
        # as bytes after close_notify are.
        while position < end and not self._lostTLSConnection and not self._aborted:
            body = self._seal_body
            if body is not None:
                take = min(end - position, len(body) - self._seal_have)
                body[self._seal_have : self._seal_have + take] = data[position : position + take]
                self._seal_have += take
                position += take
                if self._seal_have == len(body):
                    self._seal_body = None
                    self._open_frame(self._seal_header, body)
                continue
            need = sealed.HEADER.size - len(self._seal_partial)
            header = self._seal_partial + bytes(data[position : position + need])
            position += len(header) - len(self._seal_partial)
            if len(header) < sealed.HEADER.size:
                self._seal_partial = header
                return
            self._seal_partial = b""
            try:
                size = sealed.Opener.body_size(header)
            except sealed.SealedFrameError as e:
                self._sealed_failed(e)
                return
            if end - position >= size:
                self._open_frame(header, data[position : position + size])
                position += size
                continue
            self._seal_header = header
            self._seal_body = memoryview(_ffi.buffer(_alloc("char[]", size)))
            self._seal_have = 0

    def _open_frame(self, header: bytes, body: memoryview) -> None:
        """Check and decrypt one frame and deliver its plaintext: straight into the
        application's read target when the whole frame fits there."""
        opener = self._opener
        assert opener is not None
        if self._aborted or self._lostTLSConnection:
            return
        size = len(body) - sealed.TAG
        app = self.wrappedProtocol
        read_target = getattr(app, "read_target", None)
        received_into = getattr(app, "received_into", None)
        try:
            target = read_target() if size and read_target is not None and received_into is not None else None
            if target is not None and len(target) >= size:
                opener.open_into(header, body, target[:size])
                received_into(size)  # type: ignore[misc]
                return
            data = opener.open(header, body)
        except sealed.SealedFrameError as e:
            self._sealed_failed(e)
            return
        if not size:
            self._peer_closed = True
            self._shutdownTLS()
            self._tlsShutdownFinished(None)
            return
        self._deliver_opened(data, read_target, received_into)

    def _deliver_opened(self, data: bytes, read_target: Any, received_into: Any) -> None:
        """Hand decrypted bytes to the application: into its read targets while it offers
        them, the rest through dataReceived."""
        view = memoryview(data)
        while len(view) and not self._aborted and not self._lostTLSConnection:
            target = read_target() if read_target is not None and received_into is not None else None
            if target is None or not len(target):
                ProtocolWrapper.dataReceived(self, data if len(view) == len(data) else bytes(view))
                return
            take = min(len(target), len(view))
            target[:take] = view[:take]
            view = view[take:]
            received_into(take)

    @property
    def partly_received(self) -> int:
        """Bytes of a sealed frame received but not yet opened: the wire connection's
        watchdog counts them as a frame begun (a peer trickling one is cut off)."""
        return self._seal_have + len(self._seal_header) if self._seal_body is not None else len(self._seal_partial)

    def _sealed_failed(self, failure: sealed.SealedFrameError) -> None:
        """A frame that does not open: nothing more is read or written on this connection."""
        _log.info("closing TLS connection from {peer}: {reason}", peer=_describe_peer(self), reason=str(failure))
        self._aborted = True
        if self._reason is None:
            self._reason = Failure(failure)
        self._tlsShutdownFinished(None)
        transport: Any = self.transport
        transport.abortConnection()

    def _receive_direct(self, ssl_ptr: Any) -> None:
        """``_flushReceiveBIO`` through ``SSL_read``.

        Decrypted bytes go into one reused buffer and are delivered a batch at a time; but if
        the application protocol offers ``read_target()`` (a writable buffer for the rest of
        a large frame, or None) and ``received_into(count)``, as DogFS's wire connection does
        for plain sockets, the records of a large frame are decrypted straight into its
        buffer: no copy out of ours, and no join of the pieces by the frame decoder.
        """
        if self._opener is not None:
            if not self._sealed_in:
                self._receive_marker(ssl_ptr)
            self._flushSendBIO()
            return
        connection: Any = self._tlsConnection
        buffer = self._read_buffer
        if buffer is None:
            buffer = self._read_buffer = _alloc("char[]", _READ_BATCH)
        app = self.wrappedProtocol
        read_target = getattr(app, "read_target", None)
        received_into = getattr(app, "received_into", None)
        if read_target is None or received_into is None:
            read_target = None
        filled = 0

        def deliver() -> None:
            nonlocal filled
            if filled and not self._aborted:
                data = _ffi.buffer(buffer, filled)[:]
                filled = 0
                ProtocolWrapper.dataReceived(self, data)
            filled = 0

        while not self._lostTLSConnection:
            target = None
            if read_target is not None:
                # Bytes the application has not seen yet come first: the frame's start.
                deliver()
                if self._aborted or self._lostTLSConnection:
                    break
                target = read_target()
            if target is not None and len(target):
                # Fill the target record after record before telling the application: one
                # Python call per frame, not per 16 KiB record.
                size = len(target)
                total = got = 0
                with _ffi.from_buffer(target, require_writable=True) as into:
                    while total < size:
                        got = _lib.SSL_read(ssl_ptr, into + total, size - total)
                        if got <= 0:
                            break
                        total += got
                if total:
                    received_into(total)  # type: ignore[misc]
                if got > 0:
                    continue
            else:
                got = _lib.SSL_read(ssl_ptr, buffer + filled, _READ_BATCH - filled)
                if got > 0:
                    filled += got
                    if filled > _READ_BATCH - _RECORD:
                        deliver()
                    continue
            try:
                connection._raise_ssl_error(ssl_ptr, got)
            except SSL.WantReadError:
                break
            except SSL.Error as e:
                self._read_ended(e, deliver)
            else:
                break
        deliver()
        self._flushSendBIO()

    def _read_ended(self, error: SSL.Error, deliver: Callable[[], None]) -> None:
        """The peer closed TLS (``ZeroReturnError``) or reading failed: pass on what was
        decrypted, then end the connection, cleanly or with the failure being handled."""
        failure = None if isinstance(error, SSL.ZeroReturnError) else Failure()
        deliver()
        if failure is None:
            self._shutdownTLS()
        self._tlsShutdownFinished(failure)


class _BulkTLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` building :class:`_BulkTLSProtocol`."""

    protocol = _BulkTLSProtocol

    def __init__(
        self,
        contextFactory: Any,  # noqa: N803
        isClient: bool,  # noqa: N803
        wrappedFactory: Any,  # noqa: N803
        clock: Any = None,
        *,
        offer_sealed: bool = False,
    ) -> None:
        super().__init__(contextFactory, isClient, wrappedFactory, clock)
        #: Whether the protocols are TLS clients (which sealed frames' keys they seal with).
        self.is_client = isClient
        if isClient and offer_sealed and _can_seal():
            # Offered here, by the only protocol that speaks sealed frames, not by the
            # connection creator: a creator may also serve Twisted's own TLS layer.
            create = self._creatorCallable

            def offering_sealed(protocol: Any) -> SSL.Connection:
                connection: SSL.Connection = create(protocol)
                connection.set_alpn_protos([sealed.ALPN])
                return connection

            self._creatorCallable = offering_sealed


class _RegisteringTLSFactory(_BulkTLSFactory):
    """A server TLS factory that bounds the handshake and keeps the registry up to date.

    A connection whose handshake (client certificate verified, and proved) has not completed
    within the server's ``handshake_timeout`` is aborted (a peer that opens TCP, or sends
    someone's certificate, and stalls would otherwise hold a socket for good); a closed
    connection leaves the registry.
    """

    def __init__(
        self, server: ServerTLS, wrapped: IProtocolFactory, clock: IReactorTime | None
    ) -> None:
        super().__init__(cast(IOpenSSLServerConnectionCreator, server), False, wrapped, clock)
        self._server = server
        self._timer_clock: Any = clock
        self._timers: dict[object, Any] = {}

    def buildProtocol(self, addr: Any) -> Any:
        """Build the TLS protocol and start its handshake timer."""
        protocol = super().buildProtocol(addr)
        timeout = self._server.handshake_timeout
        if protocol is not None and timeout is not None and self._timer_clock is not None:
            self._timers[protocol] = self._timer_clock.callLater(
                timeout, self._handshake_expired, protocol, timeout
            )
        return protocol

    def _handshake_expired(self, protocol: TLSMemoryBIOProtocol, timeout: float) -> None:
        self._timers.pop(protocol, None)
        # The identity is registered when its certificate is verified, which comes before
        # the peer proves it holds the key (CertificateVerify): anyone may send a valid
        # certificate and stall. Only a completed handshake ends the clock.
        if not getattr(protocol, "_handshakeDone", False):
            _log.info(
                "refused TLS client {peer}: no completed handshake within {timeout:g}s",
                peer=_describe_peer(protocol),
                timeout=timeout,
            )
            protocol.abortConnection()

    def unregisterProtocol(self, p: object) -> None:
        """Called by the TLS protocol's connectionLost: forget the connection."""
        timer = self._timers.pop(p, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._server.registry.unregister(p)
        super().unregisterProtocol(p)


class ClientTLS:
    """The client side of DogFS TLS: trust the cluster CA, present our certificate.

    Loads the three files once; :meth:`creator` then makes a connection creator per host
    dialled. Build a new one (or call :meth:`reload`) after the certificate is rotated.
    """

    def __init__(self, config: TLSConfig, revocations: RevocationSet | None = None) -> None:
        self.config = config
        self._trust_root, self._client_cert = self._load(config)
        # One creator (and so one OpenSSL context) per host: building a context costs more
        # than the handshake's Python overhead.
        self._creators: dict[str, IOpenSSLClientConnectionCreator] = {}
        #: With a daemon's revocation list, a server whose certificate it revokes is refused
        #: (a revoked member must not be sent a byte, even when we dial it), and
        #: :meth:`drop_revoked` cuts connections already open to one.
        self.revocations = revocations
        self._open = ConnectionRegistry()

    @staticmethod
    def _load(config: TLSConfig) -> tuple[ssl.Certificate, ssl.PrivateCertificate]:
        trust_root = ssl.Certificate.loadPEM(_read(config.ca_cert))
        client_cert = ssl.PrivateCertificate.loadPEM(_read(config.cert) + b"\n" + _read(config.key))
        return trust_root, client_cert

    def reload(self, config: TLSConfig | None = None) -> None:
        """Re-read the files (all or nothing); connections made later use the new ones.

        Refuses, as the server side does, a certificate its CA did not issue: a daemon that
        took it would go on serving with its old certificate while every connection it
        makes to its peers is refused.
        """
        config = config if config is not None else self.config
        _check_current(config)
        _check_issued(config)
        self._trust_root, self._client_cert = self._load(config)
        self._creators = {}
        self.config = config

    def creator(self, host: str) -> IOpenSSLClientConnectionCreator:
        """A connection creator that checks the server's certificate names ``host``."""
        creator = self._creators.get(host)
        if creator is None:
            creator = ssl.optionsForClientTLS(
                host,
                trustRoot=self._trust_root,
                clientCertificate=self._client_cert,
                extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
            )
            if self.revocations is not None:
                creator = _RevocationChecking(creator, self, host)
            self._creators[host] = creator
        return creator

    def drop_revoked(self) -> int:
        """Abort every open connection we made to a server whose identity is now revoked;
        return the count."""
        return 0 if self.revocations is None else self._open.drop_revoked(self.revocations)

    def _verifier(self, tls_protocol: Any, host: str) -> Callable[[SSL.Connection, object, int, int, int], bool]:
        """The verify callback of a connection to ``host``: the chain as OpenSSL verified it,
        then, for the server's own certificate, its name (as Twisted's own callback does,
        which this one replaces) and the revocation list."""
        service: Any = IPAddress_ID(host) if isIPAddress(host) or isIPv6Address(host) else DNS_ID(host)
        protocol: Any = tls_protocol
        verdict: list[bool] = []  # the server certificate's, once checked

        def check(cert: Any) -> bool:
            try:
                verify_service_identity(extract_patterns(cert), [service], [])
            except VerificationError:
                protocol.failVerification(Failure())
                return False
            identity = identity_from_certificate(cert.to_cryptography())
            if self.revocations is not None and self.revocations.is_revoked(identity):
                _log.info(
                    "refused TLS server {peer}: identity {name!r} (serial {serial}) is revoked",
                    peer=_describe_peer(protocol), name=identity.name, serial=identity.serial,
                )
                return False
            self._open.register(identity, protocol)
            return True

        def verify(conn: SSL.Connection, cert: object, errno: int, depth: int, ok: int) -> bool:
            nonlocal protocol
            if not ok or depth != 0:
                return bool(ok)  # the chain as OpenSSL verified it
            if verdict:
                return verdict[0]
            # An exception escaping an OpenSSL callback is lost or worse: catch everything.
            try:
                verdict.append(check(cert))
            except InvalidIdentity as e:
                _log.info("refused TLS server {peer}: {reason}", peer=_describe_peer(protocol), reason=str(e))
                verdict.append(False)
            except BaseException:
                _log.failure("while verifying a TLS server certificate")
                verdict.append(False)
            protocol = None  # no cycle between the protocol and its connection
            return verdict[0]

        return verify


@implementer(IOpenSSLClientConnectionCreator)
class _RevocationChecking:
    """A client connection creator that also refuses servers whose identity is revoked.

    Its verify callback replaces the one Twisted's creator set (a connection has one), so it
    checks the server's name itself as well.
    """

    def __init__(self, inner: IOpenSSLClientConnectionCreator, client: ClientTLS, host: str) -> None:
        self._inner = inner
        self._client = client
        self._host = host

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802, N803
        connection: SSL.Connection = self._inner.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            self._client._verifier(tlsProtocol, self._host),
        )
        return connection


def client_tls(config: TLSConfig, host: str) -> IOpenSSLClientConnectionCreator:
    """Return a client connection creator for dialling ``host`` (an IP address or a name).

    The server must present a certificate issued by the cluster CA whose subjectAltNames
    include ``host``; we present ``config``'s certificate.
    """
    return ClientTLS(config).creator(host)


# What a client sees when a handshake fails, and what it means, in the order checked. Alerts
# come from the server refusing us; "certificate verify failed" is us refusing the server.
_CLIENT_FAILURES: tuple[tuple[str, str], ...] = (
    (
        "certificate verify failed",
        "presented a certificate not issued by this cluster's CA, or expired",
    ),
    ("unknown ca", "refused our certificate: it was not issued by this cluster's CA"),
    ("certificate expired", "refused our certificate: it has expired"),
    ("certificate required", "requires a client certificate and we presented none"),
    ("bad certificate", "refused our certificate"),
    ("certificate revoked", "refused our certificate: it is revoked"),
    # ServerTLS refuses revoked and role-less identities from its own verify callback, which
    # OpenSSL reports to the peer as an internal error.
    ("internal error", "refused our identity: it is revoked or carries no DogFS role"),
    ("wrong version number", "does not speak TLS (is it running with --insecure?)"),
    ("packet length too long", "does not speak TLS (is it running with --insecure?)"),
)


def describe_tls_failure(error: BaseException, address: str) -> str | None:
    """Say in one clause why a TLS connection to ``address`` failed, or None if not TLS's fault.

    ``error`` is what the protocol's ``connectionLost`` received (``reason.value``). The result
    reads after the address, e.g. ``"127.0.0.1:7000 refused our certificate: it has
    expired"``, ready for the CLI's one-sentence error.
    """
    if isinstance(error, VerificationError):
        host = parse_address(address)[0] if ":" in address else address
        return f"{address} presented a certificate that does not name {host}"
    if isinstance(error, SSL.Error):
        text = str(error).lower()
        for needle, meaning in _CLIENT_FAILURES:
            if needle in text:
                return f"{address} {meaning}"
        return f"TLS with {address} failed: {error}"
    return None


@implementer(IStreamServerEndpoint)
class _TLSServerEndpoint:
    """A stream server endpoint with :class:`ServerTLS` layered over it."""

    def __init__(
        self, wrapped: IStreamServerEndpoint, tls: ServerTLS, clock: IReactorTime | None
    ) -> None:
        # Any: zope interfaces are not understood by mypy without a plugin.
        self._wrapped: Any = wrapped
        self._tls = tls
        self._clock = clock

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Listen on the wrapped endpoint, every connection running TLS."""
        return self._wrapped.listen(self._tls.wrap_factory(protocolFactory, self._clock))


@implementer(IStreamClientEndpoint)
class _TLSClientEndpoint:
    """A stream client endpoint with client TLS layered over it (like ``wrapClientTLS``)."""

    def __init__(
        self,
        wrapped: IStreamClientEndpoint,
        creator: IOpenSSLClientConnectionCreator,
        clock: IReactorTime | None,
        offer_sealed: bool = True,
    ) -> None:
        self._wrapped: Any = wrapped
        self._creator = creator
        self._clock = clock
        self._offer_sealed = offer_sealed

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """Connect; fires with the application protocol once TCP is up (before the handshake)."""
        factory = _BulkTLSFactory(
            self._creator, True, protocolFactory, self._clock, offer_sealed=self._offer_sealed
        )
        d = self._wrapped.connect(factory)
        return d.addCallback(lambda proto: proto.wrappedProtocol)


def server_endpoint(
    reactor: object, description: str, tls: ServerTLS | None
) -> IStreamServerEndpoint:
    """Return a listening endpoint for ``description``, with TLS unless ``tls`` is None.

    ``description`` is a Twisted server endpoint string for a plain stream, e.g.
    ``tcp:7000:interface=127.0.0.1`` (``unix:`` works too). TLS comes from ``tls``, so an
    ``ssl:`` description together with ``tls`` is refused. ``reactor`` also serves as the TLS
    layer's clock.
    """
    kind = description.split(":", 1)[0].strip().lower()
    if tls is not None and kind in ("ssl", "tls", "txtorcon"):
        raise ValueError(
            f"listen address {description!r} already names a TLS endpoint; give a plain "
            "'tcp:PORT:interface=HOST' address and DogFS adds its own TLS"
        )
    wrapped = serverFromString(reactor, description)
    if tls is None:
        return wrapped
    clock = reactor if IReactorTime.providedBy(reactor) else None
    return cast(IStreamServerEndpoint, _TLSServerEndpoint(wrapped, tls, cast(Any, clock)))


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6 literals) into a host and a port number.

    :raises ValueError: with a sentence naming the address when it is malformed.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"address {address!r} is not of the form HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"address {address!r} has port {port} outside 1-65535")
    return host, port


def client_endpoint(
    reactor: IReactorTCP,
    address: str,
    tls: TLSConfig | ClientTLS | None,
    timeout: float = 10.0,
) -> IStreamClientEndpoint:
    """Return an endpoint dialling ``address`` (``host:port``), with TLS unless ``tls`` is None.

    ``timeout`` bounds the TCP connection attempt. The endpoint's ``connect`` Deferred fires
    once TCP is up; the handshake completes later (see the module docstring), and a failed one
    (the server's certificate not from our CA, or not naming ``host``) arrives as the
    protocol's ``connectionLost`` reason. Pass a :class:`ClientTLS` to avoid re-reading the
    files on every connection.
    """
    host, port = parse_address(address)
    endpoint: IStreamClientEndpoint
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False
    if is_v6:
        endpoint = cast(IStreamClientEndpoint, TCP6ClientEndpoint(reactor, host, port, timeout))
    else:
        endpoint = cast(IStreamClientEndpoint, TCP4ClientEndpoint(reactor, host, port, timeout))
    if tls is None:
        return endpoint
    client = tls if isinstance(tls, ClientTLS) else ClientTLS(tls)
    clock = reactor if IReactorTime.providedBy(reactor) else None
    return cast(
        IStreamClientEndpoint,
        _TLSClientEndpoint(endpoint, client.creator(host), cast(Any, clock), client.config.sealed),
    )


def endpoint_maker(
    reactor: IReactorTCP, tls: TLSConfig | ClientTLS | None, timeout: float = 10.0
) -> Callable[[str], IStreamClientEndpoint]:
    """Return ``address -> endpoint`` (what ``dogfs.wire.pool`` takes), TLS files read once."""
    client = ClientTLS(tls) if isinstance(tls, TLSConfig) else tls

    def make(address: str) -> IStreamClientEndpoint:
        return client_endpoint(reactor, address, client, timeout)

    return make


class Reloadable(Protocol):
    """Anything with a ``reload()`` that re-reads its files: ServerTLS, ClientTLS."""

    def reload(self) -> None:
        """Re-read the files, or raise and keep the old ones."""


def reload_on_sighup(
    reactor: Any, targets: Iterable[Reloadable], signum: int = signal.SIGHUP
) -> Callable[[], None]:
    """Make ``signum`` (SIGHUP) reload every target in the reactor thread; return an undo.

    Meant for a daemon's ``startService``: after a certificate is rotated on disk,
    ``kill -HUP PID`` switches new connections to it. A target whose reload fails is logged
    (one line naming the error) and keeps its old files; the others still reload. The undo
    restores the previous signal handler (call it from ``stopService``).
    """
    chosen = list(targets)

    def reload_all() -> None:
        for target in chosen:
            try:
                target.reload()
            except Exception as e:
                _log.error(
                    "TLS reload refused, still using the previous files: {error}",
                    error=f"{type(e).__name__}: {e}",
                )
            else:
                _log.info("TLS material reloaded for {target!r}", target=target)

    def handler(signo: int, frame: object) -> None:
        # Signal handlers run between bytecodes of whatever the reactor was doing: hand the
        # work to the reactor rather than touching its state here.
        reactor.callFromThread(reload_all)

    previous = signal.signal(signum, handler)

    def undo() -> None:
        signal.signal(signum, previous)

    return undo
