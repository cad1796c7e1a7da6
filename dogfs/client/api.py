# -*- test-case-name: tests.test_client -*-
"""The DogFS client API: every method returns a Deferred.

Metadata calls go to any metadata node and follow "not_leader" redirects; calls whose outcome
is unknown are retried within the client's timeout with the same session sequence number, so
a retried commit, mv or rm takes effect once. Data moves directly between this client and the
chunk servers (dogfs.client.transfer).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import IO, Any

import msgpack
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dogfs.config import ClientConfig
from dogfs.meta import commands as c
from dogfs.wire import messages as m
from dogfs.wire.pool import ConnectionPool, EndpointMaker
from dogfs.wire.protocol import Reply, RequestTimeout, WireError

log = Logger()

#: Block groups one client writes at once (see DogFSClient.group_uploads).
MAX_GROUP_UPLOADS = 64
# Error codes after which the same request may be sent again (elsewhere, or later).
RETRYABLE = {"not_leader", "unreachable", "connection_closed", "timeout", "no_quorum", "not_ready"}
#: Seconds a metadata member gets to complete a connection before the next one is tried
#: (its dial goes on meanwhile: every member is dialled at once when none is connected). A
#: member that accepts TCP but never answers (stopped with SIGSTOP, a host gone without a
#: reset) would otherwise cost each command the whole handshake timeout.
CONNECT_HEDGE = 1.0
#: Seconds a metadata member gets to answer one request before the client asks another
#: (resending a command is safe: its session makes it take effect once). Longer than a member
#: takes to answer for itself when the group cannot decide in time (its operation timeout,
#: 5 s): a slow but healthy leader's answer must win, since a request that times out here
#: drops the connection every other request shares. Short enough that a member that stopped
#: answering on an open connection (SIGSTOP) leaves time to find the one that leads now.
META_CALL_TIMEOUT = 6.0
#: Redirects (not_leader with a hint) followed without a pause, between two pauses.
MAX_REDIRECTS = 2
#: The pause after MAX_REDIRECTS redirects in a row (seconds).
REDIRECT_PAUSE = 0.02
#: Called with the bytes moved since the last call; a put whose block group is written again
#: (a chunk server failed) calls it with minus what that group had counted.
Progress = Callable[[int], None]


#: Seconds after which an idle session is dropped rather than used again: well within the
#: metadata's SESSION_MIN_AGE (600 s), for which it keeps every session it has seen.
SESSION_REUSE_LIMIT = 300.0


class DogFSError(WireError):
    """A client operation failed. `code` is stable (not_found, exists, timeout, ...)."""


def _connection_failed(e: WireError) -> bool:
    """Whether ``e`` says the connection itself is in doubt (closed, or a request on it got
    no answer in time), so it should be dropped and made again. A member that answered,
    even with its own "timeout" (the group did not decide in time, the leader is
    overloaded), has shown its connection works: dropping it would fail every other
    request in flight on it."""
    return e.code == "connection_closed" or isinstance(e, RequestTimeout)


def _error(e: WireError, what: str | None = None) -> DogFSError:
    message = e.message if what is None else f"{what}: {e.message}"
    return DogFSError(e.code, message, e.details)


class DogFSClient:
    """A connection to a DogFS cluster."""

    def __init__(
        self,
        reactor: Any,
        config: ClientConfig,
        *,
        endpoints: EndpointMaker | None = None,
        timeout: float | None = None,
        client_id: str | None = None,
    ) -> None:
        from dogfs.plugins.common import client_endpoints

        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.config = config
        self.timeout = timeout if timeout is not None else config.timeout
        #: Whether uploads carry their block tokens: with TLS, where chunk servers check them.
        #: Without, a chunk server of a release before block tokens must still read them.
        self.sends_tokens = config.tls is not None
        self.pool = ConnectionPool(
            reactor,
            endpoints or client_endpoints(reactor, config.tls, timeout=min(5.0, self.timeout)),
            handshake_timeout=min(5.0, self.timeout),
        )
        #: Block groups being written at once by this client's puts, each with one PutShard
        #: stream on each of its chunk servers' connections: at most what a chunk server takes
        #: on one connection (its MAX_UPLOADS_PER_CONNECTION), which would refuse the excess.
        self.group_uploads = defer.DeferredSemaphore(MAX_GROUP_UPLOADS)
        self.client_id = client_id or uuid.uuid4().hex
        # Session ids must never repeat across client instances: the metadata answers a
        # (session, seq) it has seen with that command's remembered result. A caller's own
        # client_id (a label, possibly reused by a restarted process) gets a random part.
        self._session_prefix = self.client_id if client_id is None else f"{client_id}.{uuid.uuid4().hex[:16]}"
        # (session id, last sequence number, when it was last answered), last used at the end.
        self._idle_sessions: list[tuple[str, int, float]] = []
        self._sessions_made = 0
        self._leader: str | None = None
        self._info: dict[str, Any] | None = None

    # --- metadata plumbing --------------------------------------------------------------

    def _addresses(self, last: str | None = None) -> list[str]:
        ordered = list(self.config.meta)
        if self._leader is not None:
            ordered = [self._leader] + [a for a in ordered if a != self._leader]
        if last is not None and last in ordered:
            ordered = [a for a in ordered if a != last] + [last]
        return ordered

    def _meta_call(self, msg: Any, payload: bytes = b"") -> defer.Deferred[Reply]:
        """L{_meta}, sent at once on the open connection to the leader when there is one.

        The usual request (the leader known, its connection up) costs no coroutine: only a
        failure that calls for another try goes on through L{_meta}, within the same
        deadline.
        """
        address = self._leader
        connection = None if address is None else self.pool.open_connection(address)
        if connection is None:
            return defer.Deferred.fromCoroutine(self._meta(msg, payload))
        connection_address: str = address  # type: ignore[assignment] # not None here
        deadline = self.clock.seconds() + self.timeout
        d = connection.call(msg, payload, timeout=min(self.timeout, META_CALL_TIMEOUT))

        def answered(reply: Reply) -> Reply:
            if isinstance(reply.msg, m.MetaReply) and reply.msg.leader_hint:
                self._leader = reply.msg.leader_hint
            return reply

        def failed(failure: Failure) -> Any:
            failure.trap(WireError)
            e: WireError = failure.value  # type: ignore[assignment]
            if e.code not in RETRYABLE:
                raise _error(e)
            if e.code == "not_leader" and e.details.get("leader"):
                self._leader = e.details["leader"]
            if _connection_failed(e):
                self.pool.drop(connection_address)
            if self._leader == connection_address:
                self._leader = None  # whoever leads now will say so
            return defer.Deferred.fromCoroutine(self._meta(msg, payload, deadline, e, connection_address))

        return d.addCallbacks(answered, failed)

    async def _meta(
        self,
        msg: Any,
        payload: bytes = b"",
        deadline: float | None = None,
        first: WireError | None = None,
        tried: str | None = None,
    ) -> Reply:
        """Send to the leader (found by redirects), retrying within the timeout.

        Retrying is safe for commands too: they carry this client's session and sequence
        number, so the metadata applies a retried command once and answers the retry with
        the first result. ``first`` is how an earlier try (within ``deadline``) at ``tried``
        failed: that member is asked last in the first round.
        """
        if deadline is None:
            deadline = self.clock.seconds() + self.timeout
        last: WireError | None = first
        no_quorum: WireError | None = first if first is not None and first.code == "no_quorum" else None
        delay = 0.05
        # Redirects followed at once since the last pause: two members each naming the other
        # (a leadership transfer under way) must not have the client bounce between them
        # without a pause until the deadline.
        redirects = 0
        while True:
            redirected = False
            addresses, tried = self._addresses(tried), None
            if not any(self.pool.open_connection(a) for a in addresses):
                # Dial every member at once: the first to answer may not be the first listed.
                for address in addresses:
                    self.pool.get(address).addErrback(lambda f: None)
            for address in addresses:
                remaining = deadline - self.clock.seconds()
                if remaining <= 0:
                    break
                try:
                    connection = await self._connect(address, min(remaining, CONNECT_HEDGE))
                    remaining = deadline - self.clock.seconds()
                    if remaining <= 0:
                        break
                    reply = await connection.call(msg, payload, timeout=min(remaining, META_CALL_TIMEOUT))
                except WireError as e:
                    last = e
                    if e.code == "no_quorum":
                        no_quorum = e  # the most telling reason, whatever came after it
                    if e.code not in RETRYABLE:
                        raise _error(e) from None
                    if e.code == "not_leader" and e.details.get("leader"):
                        hinted = e.details["leader"]
                        if hinted != address:
                            self._leader = hinted
                            redirected = True
                            break  # retry at once at the hinted leader
                    if _connection_failed(e):
                        self.pool.drop(address)
                    if self._leader == address and e.code in ("unreachable", "connection_closed", "timeout"):
                        self._leader = None  # whoever leads now will say so
                    continue
                if isinstance(reply.msg, m.MetaReply) and reply.msg.leader_hint:
                    self._leader = reply.msg.leader_hint
                return reply
            if redirected and self.clock.seconds() < deadline:
                if redirects < MAX_REDIRECTS:
                    redirects += 1
                    continue
                # Members naming one another: a short pause that does not grow the backoff,
                # since a leader is being settled and its name comes in a moment.
                if self.clock.seconds() + REDIRECT_PAUSE >= deadline:
                    break
                await _sleep(self.clock, REDIRECT_PAUSE)
                redirects = 0
                continue
            if self.clock.seconds() + delay >= deadline:
                break
            await _sleep(self.clock, delay)
            delay = min(delay * 2, 1.0)
            redirects = 0
        where = ", ".join(self.config.meta)
        if no_quorum is not None:
            raise DogFSError("no_quorum", no_quorum.message)
        if last is None:
            raise DogFSError("timeout", f"no metadata node answered within {self.timeout:g}s ({where})")
        if last.code == "not_ready":
            raise DogFSError(last.code, last.message)
        if last.code == "unreachable":
            raise DogFSError("unreachable", f"no metadata node is reachable ({where}): {last.message}")
        raise DogFSError(last.code, f"the metadata service did not answer within {self.timeout:g}s: {last.message}")

    def _connect(self, address: str, wait: float) -> defer.Deferred[Any]:
        """The pool's connection to ``address``, or an ``unreachable`` WireError if none is
        ready within ``wait`` seconds. Only this caller stops waiting: the dial goes on (up
        to the pool's handshake timeout), for a later try to find it done."""
        d = self.pool.get(address)
        if d.called:
            return d

        def late(failure: Failure) -> Any:
            failure.trap(defer.CancelledError, defer.TimeoutError)
            raise WireError("unreachable", f"{address} did not complete a connection within {wait:g}s")

        return d.addTimeout(wait, self.clock).addErrback(late)

    def _command(self, command: Any) -> defer.Deferred[Any]:
        # One session per command in flight: the metadata remembers each session's last
        # sequence number, so two concurrent commands must never share one (a retry of the
        # older would be refused as expired).
        # A session idle for SESSION_REUSE_LIMIT is not used again: the metadata may forget
        # sessions unseen for SESSION_MIN_AGE (far longer), and a forgotten session's command
        # would run as a new session's first.
        now = self.clock.seconds()
        while self._idle_sessions and now - self._idle_sessions[0][2] > SESSION_REUSE_LIMIT:
            self._idle_sessions.pop(0)
        if self._idle_sessions:
            session, seq, _ = self._idle_sessions.pop()
        else:
            self._sessions_made += 1
            session, seq = f"{self._session_prefix}.{self._sessions_made}", 0
        seq += 1
        d = self._meta_call(m.MetaCommand(session, seq, wants_tokens=True), c.encode_command(command))

        def done(result: Any) -> Any:
            self._idle_sessions.append((session, seq, self.clock.seconds()))
            return result

        return d.addBoth(done).addCallback(_result)

    def _query(self, op: str, path: str = "", args: dict[str, Any] | None = None) -> defer.Deferred[Reply]:
        return self._meta_call(m.MetaQuery(op, path, args or {}))

    async def cluster_info(self) -> dict[str, Any]:
        """Default policy, cell and block sizes (cached)."""
        if self._info is None:
            reply = await self._query("cluster_info")
            self._info = msgpack.unpackb(bytes(reply.payload), raw=False)
        return self._info

    # --- namespace ----------------------------------------------------------------------

    def stat(self, path: str) -> defer.Deferred[c.FileInfo | c.DirInfo]:
        """A file's or directory's metadata (FileInfo or DirInfo)."""
        return defer.Deferred.fromCoroutine(self._stat(path))

    async def _stat(self, path: str) -> Any:
        reply = await self._query("stat", path)
        return _result(reply)

    def ls(self, path: str) -> defer.Deferred[list[c.EntryInfo]]:
        """Every entry of a directory (or the file itself), sorted by name."""
        return defer.Deferred.fromCoroutine(self._ls(path))

    async def _ls(self, path: str) -> list[c.EntryInfo]:
        entries: list[c.EntryInfo] = []
        start_after: str | None = None
        while True:
            args: dict[str, Any] = {"limit": 1000}
            if start_after is not None:
                args["start_after"] = start_after
            reply = await self._query("list", path, args)
            listing = _result(reply)
            entries.extend(listing.entries)
            if not listing.more or not listing.entries:
                return entries
            start_after = listing.entries[-1].name

    def mkdir(self, path: str, parents: bool = False, ec: str | None = None) -> defer.Deferred[c.DirInfo]:
        """Create a directory (with `parents`, its missing ancestors too)."""
        return self._command(c.Mkdir(path, parents, ec))

    def rm(self, path: str, recursive: bool = False) -> defer.Deferred[Any]:
        """Delete a file or an empty directory (with `recursive`, a whole tree)."""
        return self._command(c.Delete(path, recursive))

    def mv(self, src: str, dst: str) -> defer.Deferred[Any]:
        """Rename `src` to `dst` (which must not exist)."""
        return self._command(c.Rename(src, dst))

    def status(self) -> defer.Deferred[dict[str, Any]]:
        """The cluster as a metadata node sees it."""
        return self._view("status")

    def repair_status(self) -> defer.Deferred[dict[str, Any]]:
        """The metadata leader's repair scheduler: lost and draining servers, tasks, errors
        (admin role)."""
        return self._view("repair_status")

    def _view(self, op: str) -> defer.Deferred[dict[str, Any]]:
        async def run() -> dict[str, Any]:
            reply = await self._query(op)
            return msgpack.unpackb(bytes(reply.payload), raw=False)  # type: ignore[no-any-return]

        return defer.Deferred.fromCoroutine(run())

    def backup(self, sink: Callable[[memoryview], object]) -> defer.Deferred[dict[str, Any]]:
        """A consistent copy of the namespace (admin role; see dogfs.meta.backup): its bytes
        go to ``sink`` in parts as they arrive; fires with the member's account of them
        (``index``, ``size``, ``sha256``, ``cluster_id``, ``node``, ``taken``).

        Served by the member that leads (found as for any request); not retried once parts
        have arrived. Fails with ``timeout`` if no part comes for the client's timeout.
        """
        return defer.Deferred.fromCoroutine(self._backup(sink))

    async def _backup(self, sink: Callable[[memoryview], object]) -> dict[str, Any]:
        await self._query("cluster_info")  # finds the leader, and checks that we may read
        address = self._leader or self.config.meta[0]
        connection = await self.pool.get(address)
        stalled: list[Any] = []

        def watchdog() -> None:
            stalled.append(True)
            connection.transport.abortConnection()

        timer = self.clock.callLater(self.timeout, watchdog)

        def part(_msg: Any, payload: memoryview) -> None:
            timer.reset(self.timeout)
            sink(payload)

        try:
            reply = await connection.call(m.MetaQuery("backup", "", {}), on_part=part)
        except WireError as e:
            if stalled:
                raise DogFSError(
                    "timeout", f"the backup from {address} stalled: nothing arrived for {self.timeout:g}s"
                ) from None
            raise _error(e, f"backup from {address}") from None
        finally:
            if timer.active():
                timer.cancel()
        return msgpack.unpackb(bytes(reply.payload), raw=False)  # type: ignore[no-any-return]

    def drain(self, node_id: str, draining: bool = True) -> defer.Deferred[Any]:
        """Mark a chunk server draining (its shards move elsewhere, it gets no new ones), or
        with ``draining`` False, no longer (admin role)."""
        return self._command(c.DrainChunkServer(node_id, draining))

    def remove_chunk_server(self, node_id: str, force: bool = False) -> defer.Deferred[Any]:
        """Forget a stopped chunk server; refused while block groups place shards on it,
        unless ``force`` (repair then rebuilds them elsewhere) (admin role)."""
        return self._command(c.RemoveChunkServer(node_id, force))

    # --- data -----------------------------------------------------------------------------

    def put(
        self, path: str, source: IO[bytes] | Any, ec: str | None = None, progress: Progress | None = None
    ) -> defer.Deferred[c.FileInfo]:
        """Upload `source` as the file `path`: a binary file object (read to its end) or a
        Twisted `IBodyProducer` (paused while the upload is behind).

        The new version becomes visible atomically when every shard is durable.
        """
        from dogfs.client.transfer import put

        return defer.Deferred.fromCoroutine(put(self, path, source, ec, progress))

    def get(
        self,
        path: str,
        sink: IO[bytes] | Any,
        progress: Progress | None = None,
        on_info: Callable[[c.FileInfo], None] | None = None,
    ) -> defer.Deferred[c.FileInfo]:
        """Download the file `path` into `sink`: a binary file object, or a Twisted
        `IConsumer` (which may pause the download through the producer we register).

        `on_info` is called with the file's metadata before any data is written.
        """
        from dogfs.client.transfer import get

        return defer.Deferred.fromCoroutine(get(self, path, sink, progress, on_info))

    def close(self) -> defer.Deferred[None]:
        """Close every connection."""
        return self.pool.close_all()


def _result(reply: Reply) -> Any:
    """The metadata result in a reply (its type depends on the request)."""
    return c.decode_result(bytes(reply.payload))


def _sleep(clock: IReactorTime, seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    clock.callLater(seconds, d.callback, None)
    return d


def sleep(clock: IReactorTime, seconds: float) -> defer.Deferred[None]:
    """Fire after `seconds` on `clock`."""
    return _sleep(clock, seconds)


def unique_temp_name(path: str) -> str:
    """A sibling name for a partial download: renamed over `path` only on success."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.dogfs-{uuid.uuid4().hex[:8]}.part")
