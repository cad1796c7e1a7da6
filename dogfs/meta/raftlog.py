# -*- test-case-name: tests.test_meta_raft -*-
"""The replicated command log: the namespace behind a Raft group (``ICommandLog`` on a driver).

Owns what sits between the metadata service and ``dogfs.raft``: the state machine a
``RaftDriver`` applies (``NamespaceMachine``: the LMDB namespace plus the members' address
book), the log the handlers propose to (``RaftCommandLog``), the translation of Raft's
failures into wire errors ("not_leader" with the leader's address, "no_quorum", "timeout"),
and online membership changes through learners.

Entries are namespace commands (``encode_command`` bytes, a msgpack array) or, with a leading
NUL byte, a member's address record: addresses travel through the log too, so every member
(and a future leader) knows how to reach a member added at run time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dogfs.interfaces import ICommandLog
from dogfs.meta import commands as c
from dogfs.meta.state import NamespaceState
from dogfs.raft.core import ProposalRejected, Snapshot
from dogfs.raft.driver import (
    IRaftStateMachine,
    LeadershipLostError,
    NotLeaderError,
    ProposalDroppedError,
    RaftDriver,
    RaftOverloadedError,
    RaftStoppedError,
    RaftTimeoutError,
)
from dogfs.storage.files import replace_file
from dogfs.wire import messages as m
from dogfs.wire.frame import FrameLimits
from dogfs.wire.protocol import WireError

__all__ = ["MemberBook", "NamespaceMachine", "RaftCommandLog", "member_record"]

log = Logger()

_MEMBER_TAG = b"\x00"
#: The ``MetaQuery`` ops of ``dogfs admin meta`` (served by the leader, admin permission).
MEMBER_OPS = ("member_add_learner", "member_promote", "member_remove", "member_lead")
_SNAPSHOT_MAGIC = "dogfs-meta-raft"
#: The largest command the log takes: half a frame's payload, so that the AppendEntries that
#: carries it, alone if need be, always fits in one frame.
MAX_ENTRY_BYTES = FrameLimits().max_payload // 2
_SNAPSHOT_VERSION = 1


def member_record(node_id: str, address: str, http_address: str = "") -> bytes:
    """The entry data that records where member ``node_id`` listens."""
    body = msgpack.packb([node_id, address, http_address], use_bin_type=True)
    return _MEMBER_TAG + body


class MemberBook:
    """Where each member listens: ``id -> (address, http_address)``.

    Starts from the static ``[raft] peers`` and is updated by member records applied from the
    log; kept in a small JSON file (``path``) so a restart knows members added at run time
    before it has replayed anything.
    """

    def __init__(self, path: str | None, peers: dict[str, str]) -> None:
        self.path = path
        self.entries: dict[str, tuple[str, str]] = {k: (v, "") for k, v in peers.items()}
        if path is not None and os.path.exists(path):
            try:
                with open(path) as f:
                    stored = json.load(f)
                for node_id, (address, http) in stored.items():
                    self.entries[str(node_id)] = (str(address), str(http))
            except (OSError, ValueError, TypeError) as e:
                log.warn("ignoring unreadable member book {path}: {why}", path=path, why=str(e))

    def address(self, node_id: str) -> str | None:
        """The binary-protocol address of ``node_id``, if known."""
        entry = self.entries.get(node_id)
        return None if entry is None else entry[0]

    def http_address(self, node_id: str) -> str:
        """The dashboard address of ``node_id`` ("" if unknown)."""
        entry = self.entries.get(node_id)
        return "" if entry is None else entry[1]

    def set(self, node_id: str, address: str, http_address: str = "") -> None:
        """Record (and persist) where ``node_id`` listens."""
        if self.entries.get(node_id) == (address, http_address):
            return
        self.entries[node_id] = (address, http_address)
        self._save()

    def dump(self) -> dict[str, list[str]]:
        """The book as plain data (for snapshots)."""
        return {k: [a, h] for k, (a, h) in sorted(self.entries.items())}

    def replace(self, data: dict[str, Any]) -> None:
        """Merge a snapshot's book into this one."""
        for node_id, (address, http) in data.items():
            self.entries[str(node_id)] = (str(address), str(http))
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        # Rare (membership changes): durable, so a power loss never leaves it empty.
        replace_file(self.path, json.dumps(self.dump()).encode())


def machine_snapshot(peers: dict[str, str], dump: bytes) -> bytes:
    """A `NamespaceMachine` snapshot of namespace ``dump`` whose address book holds
    ``peers`` (node id -> address): what a group restored from a backup starts from."""
    book = MemberBook(None, peers)
    return msgpack.packb(  # type: ignore[no-any-return]
        [_SNAPSHOT_MAGIC, _SNAPSHOT_VERSION, book.dump(), dump], use_bin_type=True
    )


@implementer(IRaftStateMachine)
class NamespaceMachine:
    """The state machine a metadata member's driver applies: namespace and address book.

    The namespace should be ``NamespaceState(durable=False)``: the Raft log is the durable
    record and a restart replays whatever the page cache lost.
    """

    def __init__(self, state: NamespaceState, book: MemberBook) -> None:
        self.state = state
        self.book = book
        #: Called with the result of every applied entry (tests, listeners).
        self.on_apply: list[Callable[[int], None]] = []

    def apply(self, entry: Any) -> Any:
        """Apply a committed NORMAL entry (a command, or a member record)."""
        data = bytes(entry.data)
        if data[:1] == _MEMBER_TAG:
            self._set_member(entry.index, data)
            # Advance the namespace's applied index so a restart does not start before it.
            self.state.apply(entry.index, None)
            return c.Ok()
        return self.state.apply(entry.index, data)

    def _set_member(self, index: int, data: bytes) -> None:
        try:
            node_id, address, http = msgpack.unpackb(data[1:], raw=False)
            self.book.set(str(node_id), str(address), str(http))
        except Exception as e:  # a bad record is skipped the same way on every member
            log.warn("skipping a malformed member record at {index}: {why}", index=index, why=str(e))

    def apply_batch(self, entries: Sequence[Any]) -> list[Any]:
        """Apply committed NORMAL entries in order, in one namespace transaction."""
        batch: list[tuple[int, bytes | None]] = []
        members: set[int] = set()
        for entry in entries:
            data = bytes(entry.data)
            if data[:1] == _MEMBER_TAG:
                # The address book is its own small file, independent of the namespace:
                # setting a record again on a replay is harmless. The namespace only
                # advances its applied index past it.
                self._set_member(entry.index, data)
                members.add(entry.index)
                batch.append((entry.index, None))
            else:
                batch.append((entry.index, data))
        results = self.state.apply_batch(batch)
        return [c.Ok() if index in members else result
                for (index, _), result in zip(batch, results, strict=True)]

    def snapshot(self) -> bytes:
        """Namespace and address book as of the last applied entry."""
        return self.snapshot_later()()

    def snapshot_later(self) -> Callable[[], bytes]:
        """``snapshot`` as of now, serialised by the function returned, on any thread."""
        book = self.book.dump()
        dump = self.state.dump_later()

        def serialise() -> bytes:
            return msgpack.packb(  # type: ignore[no-any-return]
                [_SNAPSHOT_MAGIC, _SNAPSHOT_VERSION, book, dump()], use_bin_type=True
            )

        return serialise

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the state by a snapshot made by ``snapshot`` (on any member)."""
        try:
            magic, version, book, dump = msgpack.unpackb(snapshot.data, raw=False)
            if magic != _SNAPSHOT_MAGIC or version != _SNAPSHOT_VERSION:
                raise ValueError("unknown snapshot format")
        except Exception as e:
            raise ValueError(f"cannot read the metadata snapshot at {snapshot.meta.index}: {e}") from None
        # The address book first: it only merges addresses (harmless to do again), whereas
        # once the namespace holds the snapshot's index a restart does not restore it again,
        # and members added at run time would stay missing from the book.
        self.book.replace(book)
        self.state.load(dump, applied_index=snapshot.meta.index)
        self.state.sync()

    def applied_index(self) -> int:
        """The last index whose effect the namespace holds."""
        return self.state.applied_index


def _cancel(call: Any) -> None:
    if call.active():
        call.cancel()


def _majority(n: int) -> int:
    return n // 2 + 1


@implementer(ICommandLog)
class RaftCommandLog:
    """``ICommandLog`` on a ``RaftDriver``: commands are replicated before they are applied.

    ``last_contact(peer_id)`` gives the clock time a message last came from a peer (None:
    never), for status and for "no quorum" messages. ``probe_member(address)`` fires with a
    member's status entry (its view of itself), used to wait until a learner caught up.
    """

    def __init__(
        self,
        driver: RaftDriver,
        machine: NamespaceMachine,
        *,
        clock: IReactorTime,
        node_id: str,
        address: str,
        http_address: str = "",
        last_contact: Callable[[str], float | None] = lambda peer: None,
        contact_window: float = 2.0,
        read_retry: float = 1.0,
        read_timeout: float = 5.0,
        leader_wait: float = 0.0,
        leader_stale_after: float = 0.25,
        http_peers: Mapping[str, str] | None = None,
    ) -> None:
        self.driver = driver
        # Members' dashboards from the config, for those that have not announced theirs.
        self.http_peers = dict(http_peers or {})
        self.machine = machine
        self.book = machine.book
        self.clock: Any = clock
        self.node_id = node_id
        self.address = address
        self.http_address = http_address
        self.last_contact = last_contact
        self.contact_window = contact_window
        self.read_retry = read_retry
        #: How long a request waits for an election under way before being answered.
        self.leader_wait = leader_wait
        #: A leader not heard from for this long may be dead: wait for the next one.
        self.leader_stale_after = leader_stale_after
        self.read_timeout = read_timeout
        #: Called with True/False when this member gains or loses leadership.
        self.on_leadership: list[Callable[[bool], None]] = []
        self._leading = False
        self._announced = False
        #: The peer transport (set by ``build_raft_log``) and the service to start (driver).
        self.transport: Any = None
        self.service: Any = None

    # --- ICommandLog ----------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:  # type: ignore[override]
        """True while this member leads (it may accept commands)."""
        return self.driver.is_leader

    def caught_up(self) -> bool:
        """Whether this member leads and its state holds every entry committed before its
        election: it has committed an entry of its own term and applied up to it. Until
        then what it reads from its state may lack something the cluster acknowledged."""
        driver = self.driver
        if not driver.is_leader:
            return False
        commit = driver.commit_index
        return driver.applied_index >= commit and driver.node.term_at(commit) == driver.term

    def leader_address(self) -> str | None:
        """The leader's address, if this member knows who leads."""
        hint = self.driver.leader_hint
        if hint is None:
            return None
        if hint == self.node_id:
            return self.address
        return self.book.address(hint)

    def propose(self, command: Any) -> defer.Deferred[Any]:
        """Replicate and apply ``command``; fails with the wire error a client can act on."""
        data = command if isinstance(command, bytes) else c.encode_command(command)
        if len(data) > MAX_ENTRY_BYTES:
            # Its AppendEntries would pass the frame limit: every follower would close the
            # connection (its heartbeats with it) and elect another leader, again and again.
            return defer.fail(WireError(
                "invalid_argument",
                f"a metadata command of {len(data)} bytes is larger than the log takes "
                f"({MAX_ENTRY_BYTES} bytes)",
            ))
        d = self.driver.propose(data)
        d.addErrback(self._wire_error)
        return d

    def read_barrier(self) -> defer.Deferred[None]:
        """ReadIndex: fires once the local state holds every write acknowledged before.

        A follower forwards the request to the leader it knows; if that leader died, no answer
        comes, so the request is made again every ``read_retry`` seconds (to whoever leads
        by then) until ``read_timeout`` has passed.
        """
        result: defer.Deferred[None] = defer.Deferred()
        deadline = self.clock.seconds() + self.read_timeout

        def attempt() -> None:
            if self.removed:
                result.errback(self._not_leader(None))
                return
            if self._cut_off():
                # Waiting out read_timeout would only delay the answer: a client that asked
                # here moves on to a member that can serve.
                result.errback(self.no_quorum("the leader is out of reach"))
                return
            d = self.driver.read_index()
            timer = self.clock.callLater(self.read_retry, again)

            def done(_: object) -> None:
                if not result.called:
                    _cancel(timer)
                    result.callback(None)

            def failed(failure: Failure) -> None:
                if not result.called:
                    _cancel(timer)
                    result.errback(self._wire_error(failure))

            d.addCallbacks(done, failed)

        def again() -> None:
            if result.called:
                return
            if self.clock.seconds() >= deadline:
                seen, total = self.reachable()
                if seen < _majority(total):
                    result.errback(self.no_quorum("read index timed out"))
                else:
                    result.errback(WireError("timeout", "the metadata group did not confirm a read in time"))
                return
            attempt()

        attempt()
        return result

    def members(self) -> list[dict[str, Any]]:
        """Every member as this one sees it: its own live view, the rest from the config."""
        status: dict[str, Any] = self.driver.status()
        leader = status.get("leader")
        now = self.clock.seconds()
        voters = list(status.get("voters") or [])
        learners = list(status.get("learners") or [])
        ids = sorted(set(voters) | set(learners) | {self.node_id})
        out = []
        for member in ids:
            if member == self.node_id:
                role = "removed" if self.removed else str(status["role"])
                term = status["term"]
                commit: Any = status["commit_index"]
                applied: Any = status["applied_index"]
                contact: float | None = 0.0
            else:
                if member == leader:
                    role = "leader"
                elif member in learners:
                    role = "learner"
                else:
                    role = "follower"
                term = status["term"] if member == leader else None
                commit = applied = None
                replicated = (status.get("replicated") or {}).get(member)
                if replicated:
                    # The leader knows how far each follower's log matches its own.
                    term, commit = status["term"], replicated
                seen = self.last_contact(member)
                contact = None if seen is None else max(0.0, now - seen)
            out.append({
                "id": member,
                "address": self.address if member == self.node_id else (self.book.address(member) or ""),
                "http_address": self.http_address
                if member == self.node_id
                else (self.book.http_address(member) or self.http_peers.get(member, "")),
                "role": role,
                "term": term,
                "commit_index": commit,
                "applied_index": applied,
                "last_contact_s": contact,
                "voter": member in voters,
            })
            if member == self.node_id:
                out[-1]["log_version"] = c.LOG_VERSION
                out[-1]["snapshot_index"] = status.get("snapshot_index")
                # Durable writes so far: commit_index / raft_writes is the group-commit factor.
                out[-1]["raft_writes"] = self.driver.batches
        return out

    # --- leadership and errors ------------------------------------------------------------

    @property
    def removed(self) -> bool:
        """Whether this node was removed from the group it belonged to (still running, say
        restarted on its old config): it can neither serve nor learn who leads, and says so
        at once rather than after a timeout. A node waiting to join has no voters yet."""
        cfg = self.driver.config
        return cfg is not None and bool(cfg.voters) and self.node_id not in cfg.members()

    def _cut_off(self) -> bool:
        """A follower that has not heard its leader within the contact window and hears from
        fewer than a majority of the voters: no read can be confirmed through it now."""
        if self.driver.is_leader:
            return False
        hint = self.driver.leader_hint
        seen = self.last_contact(hint) if hint is not None else None
        if seen is not None and self.clock.seconds() - seen <= self.contact_window:
            return False
        reached, total = self.reachable()
        return reached < _majority(total)

    def reachable(self) -> tuple[int, int]:
        """(voters heard from within the contact window, this one included; voters)."""
        cfg = self.driver.config
        voters = sorted(cfg.voters) if cfg is not None else [self.node_id]
        now = self.clock.seconds()
        seen = 0
        for member in voters:
            if member == self.node_id:
                seen += 1
                continue
            when = self.last_contact(member)
            if when is not None and now - when <= self.contact_window:
                seen += 1
        return seen, len(voters)

    def no_quorum(self, why: str = "") -> WireError:
        """The error a client gets when the group cannot decide anything."""
        seen, total = self.reachable()
        extra = f" ({why})" if why else ""
        return WireError(
            "no_quorum",
            f"the metadata group has no quorum: {seen} of {total} members reachable from "
            f"{self.node_id}, {_majority(total)} needed{extra}",
            {"reachable": seen, "members": total},
        )

    def _wire_error(self, failure: Failure) -> Failure:
        error = failure.value
        if isinstance(error, WireError):
            return failure
        if isinstance(error, NotLeaderError):
            return Failure(self._not_leader(error.leader_hint))
        if isinstance(error, LeadershipLostError | ProposalDroppedError):
            # Outcome unknown or lost: a client retries (through its session) at the leader.
            return Failure(self._not_leader(self.driver.leader_hint, str(error)))
        if isinstance(error, RaftTimeoutError):
            seen, total = self.reachable()
            if seen < _majority(total):
                return Failure(self.no_quorum(str(error)))
            return Failure(WireError("timeout", f"the metadata group did not decide in time: {error}"))
        if isinstance(error, RaftOverloadedError):
            return Failure(WireError("timeout", f"the metadata leader is overloaded: {error}"))
        if isinstance(error, RaftStoppedError):
            return Failure(WireError("unreachable", f"metadata member {self.node_id} is stopping: {error}"))
        if isinstance(error, ProposalRejected):
            return Failure(WireError("busy", str(error)))
        return failure

    def _not_leader(self, hint: str | None, why: str = "") -> WireError:
        if self.removed:
            return WireError(
                "not_leader",
                f"{self.node_id} is no longer a member of the metadata group; ask another member",
            )
        if hint is not None and hint != self.node_id:
            address = self.book.address(hint)
            details = {"leader": address} if address else {}
            return WireError(
                "not_leader", f"{self.node_id} is not the metadata leader; {hint} leads ({address})", details
            )
        seen, total = self.reachable()
        if seen < _majority(total):
            return self.no_quorum(why)
        # A majority is there but no leader yet: an election is under way; retry shortly.
        return WireError("not_leader", f"{self.node_id} knows no metadata leader yet (election under way)")

    def watch(self) -> None:
        """Check for a change of leadership and tell the listeners (call after each event)."""
        leading = self.driver.is_leader
        if leading != self._leading:
            self._leading = leading
            if leading and not self._announced:
                # Tell every member where this one (and its dashboard) listens, once per run.
                self._announced = True
                d = self.propose(member_record(self.node_id, self.address, self.http_address))
                d.addErrback(lambda f: setattr(self, "_announced", False))
            for listener in list(self.on_leadership):
                try:
                    listener(leading)
                except Exception:
                    log.failure("leadership listener failed")

    # --- wire -------------------------------------------------------------------------------

    def wire_handlers(self, handlers: Any) -> dict[type, Callable[[Any], Any]]:
        """What this log adds to the node's wire table: Raft envelopes from peers and the
        membership queries of ``dogfs admin meta`` (other queries go to ``handlers``)."""
        from dogfs.wire import messages as m

        table: dict[type, Callable[[Any], Any]] = {}
        if self.transport is not None:

            # Only nodes may speak Raft: the daemon's security guard checks every Raft* type.
            table[m.RaftEnvelope] = self.transport.handle_envelope
        plain_query = handlers.query

        def query(request: Any) -> Any:
            msg = request.msg
            if msg.op in ("status", "version"):
                return plain_query(request)
            if msg.op in MEMBER_OPS:
                handlers.authorize(request, "admin")
                return self._when_leader_known(lambda: self.member_query(msg.op, dict(msg.args)))
            return self._when_leader_known(lambda: plain_query(request))

        table[m.MetaQuery] = query
        plain_command = handlers.command

        def command(request: Any) -> Any:
            return self._when_leader_known(lambda: self._command(handlers, plain_command, request))

        table[m.MetaCommand] = command
        plain_heartbeat = handlers.heartbeat

        def heartbeat(request: Any) -> Any:
            if request.oneway:
                # Relayed by the leader: keep the liveness view warm for a leader change.
                if not self.driver.is_leader:
                    self._note_heartbeat(handlers, request.msg)
                return None

            def beat() -> Any:
                result = plain_heartbeat(request)  # raises not_leader on a follower
                self._relay(request.msg)
                return result

            return self._when_leader_known(beat)

        table[m.Heartbeat] = heartbeat
        return table

    def _command(self, handlers: Any, plain: Any, request: Any) -> Any:
        if not handlers.registry.any_unknown():
            return plain(request)  # the common case: no need to decode the command here
        needed = self._allocation_width(handlers, request)
        if needed is None or not handlers.registry.awaiting(needed):
            return plain(request)
        return defer.Deferred.fromCoroutine(self._allocate_when_heard(handlers, request, plain, needed))

    def leader_known(self) -> bool:
        """Whether this member leads, or follows a leader it heard from very recently."""
        if self.driver.is_leader:
            return True
        hint = self.driver.leader_hint
        if hint is None:
            return False
        seen = self.last_contact(hint)
        return seen is not None and self.clock.seconds() - seen <= self.leader_stale_after

    def _when_leader_known(self, serve: Callable[[], Any]) -> Any:
        """Serve now if a live leader is known; else wait (up to ``leader_wait``) for the
        election under way, so the client is sent straight to the new leader instead of
        backing off and retrying."""
        if self.leader_known() or self.leader_wait <= 0:
            return serve()
        seen, total = self.reachable()
        if seen < _majority(total):
            return serve()  # no election can succeed: answer (no quorum) at once

        async def wait() -> Any:
            from dogfs.client.api import sleep

            deadline = self.clock.seconds() + self.leader_wait
            while not self.leader_known() and self.clock.seconds() < deadline:
                if self.reachable()[0] < _majority(self.reachable()[1]):
                    break
                await sleep(self.clock, 0.01)
            return await defer.maybeDeferred(serve)

        return defer.Deferred.fromCoroutine(wait())

    def _note_heartbeat(self, handlers: Any, msg: Any) -> None:
        handlers.registry.heartbeat(
            msg.node_id, msg.address, msg.capacity_bytes, msg.used_bytes, msg.shards,
            dict(msg.load), msg.domain or None,
        )

    def _relay(self, msg: Any) -> None:
        """Send a chunk server's heartbeat on to the other members (one-way, best effort)."""
        cfg = self.driver.config
        if cfg is None or self.transport is None:
            return
        for member in sorted(cfg.members()):
            address = self.book.address(member)
            if member == self.node_id or address is None:
                continue
            d = self.transport.pool.get(address)
            if d.called:  # only over a connection Raft already keeps open
                d.addCallbacks(lambda conn: conn.send_oneway(msg), lambda f: None)
            else:
                d.addErrback(lambda f: None)

    # A new leader knows no chunk server as alive until it hears its heartbeat (soft state).
    # An allocation in that window waits for them, up to this long, rather than fail.
    ALLOCATION_WAIT = 5.0

    def _allocation_width(self, handlers: Any, request: Any) -> int | None:
        """Shards an allocation needs, if the request is one made while this member leads."""
        if not self.driver.is_leader:
            return None
        try:
            command = c.decode_command(bytes(request.payload))
        except ValueError:
            return None
        if not isinstance(command, c.Allocate):
            return None
        from dogfs.codec.policy import ECPolicy

        try:
            ec = command.ec or handlers._inherited_policy(command.path)
            return ECPolicy.parse(ec).width
        except Exception:
            return None

    async def _allocate_when_heard(self, handlers: Any, request: Any, plain: Any, needed: int) -> Any:
        from dogfs.client.api import sleep

        deadline = self.clock.seconds() + self.ALLOCATION_WAIT
        while self.clock.seconds() < deadline and handlers.registry.awaiting(needed):
            await sleep(self.clock, 0.02)
        return await defer.maybeDeferred(plain, request)

    def member_query(self, op: str, args: dict[str, Any]) -> defer.Deferred[Any]:
        """Serve a membership query: ``member_add_learner`` {id, address, http_address},
        ``member_promote`` {id}, ``member_remove`` {id}, ``member_lead`` {id}; replies carry
        the members' list."""
        from dogfs.meta.service import encode_status
        from dogfs.wire import messages as m
        from dogfs.wire.protocol import Reply

        node_id = args.get("id")
        if not isinstance(node_id, str) or not node_id:
            raise WireError("invalid_argument", f"{op} needs a member id")
        if op == "member_add_learner":
            address = args.get("address")
            http = args.get("http_address") or ""
            if not isinstance(address, str) or not address or not isinstance(http, str):
                raise WireError("invalid_argument", "member_add_learner needs an address")
            d = self.add_learner(node_id, address, http)
        elif op == "member_promote":
            d = self.promote(node_id)
        elif op == "member_lead":
            d = self.lead(node_id)
        else:
            d = self.remove(node_id)

        def answer(outcome: Any) -> Any:
            body = {"outcome": outcome if isinstance(outcome, str) else "done", "meta": self.members()}
            return Reply(m.MetaReply(self.leader_address()), encode_status(body))

        # The core adopts a configuration just after the driver reports the entry applied:
        # list the members a turn later, so the answer shows the change.
        return d.addCallback(lambda outcome: task.deferLater(self.clock, 0, answer, outcome))

    # --- membership -------------------------------------------------------------------------

    #: Seconds a member has to say its log version.
    VERSION_TIMEOUT = 5.0

    def other_members(self) -> list[str]:
        """The ids of the group's other members, voters and learners."""
        cfg = self.driver.config
        return [] if cfg is None else sorted(set(cfg.members()) - {self.node_id})

    def member_version(self, node_id: str) -> defer.Deferred[int]:
        """The metadata log version member ``node_id``'s release applies (0: a release before
        log versions), asked over the connection Raft keeps to it (dogfs.meta.versions)."""
        address = self.book.address(node_id)
        if address is None:
            return defer.fail(WireError("unavailable", f"no address known for {node_id}"))
        return defer.Deferred.fromCoroutine(self._ask_version(address))

    async def _ask_version(self, address: str) -> int:
        if self.transport is None:
            raise WireError("unavailable", "this member has no Raft transport")
        conn = await self.transport.pool.get(address)
        try:
            reply = await conn.call(m.MetaQuery("version"), timeout=self.VERSION_TIMEOUT)
        except WireError as e:
            if e.code == "invalid_argument" and "unknown query" in e.message:
                return 0  # a release before log versions
            raise
        answer = msgpack.unpackb(bytes(reply.payload), raw=False)
        version = answer.get("log_version") if isinstance(answer, dict) else None
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise WireError("invalid_argument", f"{address} answered a malformed log version {version!r}")
        return version

    def require_leader(self) -> None:
        """Raise the wire error that sends a client to the leader, unless this member leads."""
        if not self.driver.is_leader:
            raise self._not_leader(self.driver.leader_hint)

    def add_learner(self, node_id: str, address: str, http_address: str = "") -> defer.Deferred[str]:
        """Record ``node_id``'s address and add it as a learner (no-op if it is a member).

        Fires with "learner", "voter" or "added". A member's address is not moved this way:
        a fresh node under a member's id would take over its vote with none of its log.
        """
        self.require_leader()
        cfg = self.driver.config
        assert cfg is not None
        known = self.book.address(node_id)
        if node_id in cfg.members() and known is not None and known != address:
            raise WireError(
                "invalid_argument",
                f"{node_id} is already a member, at {known}: remove it first to add a node at "
                f"{address} under that id",
            )

        async def run() -> str:
            await self._check_release(node_id, address)
            if self.book.address(node_id) != address or self.book.http_address(node_id) != http_address:
                await self.propose(member_record(node_id, address, http_address))
            if node_id in cfg.voters:
                return "voter"
            if node_id in cfg.learners:
                return "learner"
            await self._change(self.driver.add_learner, node_id)
            return "added"

        return defer.Deferred.fromCoroutine(run())

    async def _check_release(self, node_id: str, address: str) -> None:
        """Refuse to add a node whose release cannot apply the group's log (it would halt)."""
        group = self.machine.state.log_version()
        if not group:
            return
        try:
            theirs = await self._ask_version(address)
        except Exception:
            return  # not answering yet: were it too old, it halts at the first entry it cannot apply
        if theirs < group:
            raise WireError(
                "invalid_argument",
                f"{node_id} at {address} runs a release that applies metadata log version {theirs}, "
                f"below this group's {group}: upgrade it before adding it",
            )

    def promote(self, node_id: str) -> defer.Deferred[Any]:
        """Make learner ``node_id`` a voter."""
        self.require_leader()
        cfg = self.driver.config
        if cfg is not None and node_id in cfg.voters:
            return defer.succeed(None)
        if cfg is not None and node_id not in cfg.learners:
            # A voter no node answers for would raise the quorum for good.
            if not self.caught_up():
                raise WireError("not_ready", f"{node_id} is not a learner here yet (this leader took over recently)")
            raise WireError("invalid_argument", f"{node_id} is not a learner: add it first")
        return defer.Deferred.fromCoroutine(self._change(self.driver.promote, node_id))

    def lead(self, node_id: str) -> defer.Deferred[str]:
        """Hand leadership to voter ``node_id`` (etcd's move-leader): before a planned restart
        of the leader, so the group does not wait out an election timeout. Fires with "moved",
        or "leader" when it leads already."""
        self.require_leader()
        if node_id == self.node_id:
            return defer.succeed("leader")
        cfg = self.driver.config
        if cfg is None or node_id not in cfg.voters:
            raise WireError("invalid_argument", f"{node_id} is not a voter of this metadata group: only a voter can lead")

        async def hand_over() -> str:
            try:
                await self.driver.transfer_leadership(node_id)
            except Exception as e:
                raise WireError("timeout", f"handing leadership to {node_id} failed: {e}") from None
            return "moved"

        return defer.Deferred.fromCoroutine(hand_over())

    def remove(self, node_id: str) -> defer.Deferred[Any]:
        """Remove ``node_id``; when it is this leader, hand leadership over first.

        After a hand-over this member answers "not_leader" naming the new leader, where the
        caller retries the removal.
        """
        self.require_leader()
        cfg = self.driver.config
        assert cfg is not None
        if node_id not in cfg.members():
            return defer.succeed(None)
        if node_id == self.node_id:
            others = sorted(v for v in cfg.voters if v != node_id)
            if not others:
                raise WireError("invalid_argument", f"{node_id} is the only voter; it cannot be removed")
            # The most recently heard-from voter takes over.
            now = self.clock.seconds()
            others.sort(key=lambda v: now - (self.last_contact(v) or float("-inf")))
            target = others[0]

            async def hand_over() -> Any:
                try:
                    await self.driver.transfer_leadership(target)
                except Exception as e:
                    raise WireError("timeout", f"handing leadership to {target} failed: {e}") from None
                raise self._not_leader(target, "leadership handed over before removal")

            return defer.Deferred.fromCoroutine(hand_over())
        return defer.Deferred.fromCoroutine(self._change(self.driver.remove, node_id))

    async def _change(self, action: Callable[[str], defer.Deferred[Any]], node_id: str) -> Any:
        d = action(node_id)
        d.addErrback(self._wire_error)
        return await d


def raft_mode(config: Any) -> bool:
    """Whether a metadata node runs behind Raft: several peers, or joining a group.

    A node whose own id is not among ``[raft] peers`` joins an existing group: it starts with
    no vote and waits for the leader to add it (``dogfs admin meta add``).
    """
    return len(config.peers) > 1 or config.id not in config.peers


def build_raft_log(
    reactor: Any,
    config: Any,
    state: NamespaceState,
    endpoints: Any,
    *,
    snapshot_every: int = 100_000,
    snapshot_growth: float = 1.0,
    operation_timeout: float = 5.0,
) -> RaftCommandLog:
    """The Raft-backed log of metadata node ``config`` (a ``MetaConfig``), not yet started.

    Start ``log.service`` (the driver and a leadership watcher) and serve
    ``log.wire_handlers(handlers)`` on the node's port.
    """
    import random

    from twisted.application.internet import TimerService
    from twisted.application.service import MultiService

    from dogfs.raft.core import Configuration, RaftOptions
    from dogfs.raft.storage import LMDBRaftStorage
    from dogfs.raft.wire_transport import WireRaftTransport

    # etcd's --snapshot-count default: a small namespace is not dumped again every few
    # seconds under load (each dump stalled the apply loop enough to show in p99 latency).
    # Operators and tests may compact more often (a test cannot wait for 100,000 commits).
    snapshot_every = int(os.environ.get("DOGFS_RAFT_SNAPSHOT_EVERY", snapshot_every))
    raft_dir = os.path.join(config.data_dir, "raft")
    os.makedirs(raft_dir, exist_ok=True)
    peers = dict(config.peers)
    book = MemberBook(os.path.join(raft_dir, "members.json"), peers)
    book.entries.setdefault(config.id, (config.address, config.http_address))
    machine = NamespaceMachine(state, book)
    def is_member(node_id: str) -> bool:
        # A metadata node this member knows of (static peers, member records), or one in the
        # group's configuration: never a chunk server, though its certificate is a node's too.
        if book.address(node_id) is not None:
            return True
        current = driver.config if driver.running else None
        return current is not None and node_id in current.members()

    transport = WireRaftTransport(
        reactor, endpoints, node_id=config.id, address_of=book.address,
        retry_after=config.tick_interval * 2, is_member=is_member,
    )
    voters = frozenset(peers) if config.id in peers else frozenset()
    election = max(3, int(config.election_ticks))
    driver = RaftDriver(
        config.id,
        storage=LMDBRaftStorage(os.path.join(raft_dir, "log")),
        transport=transport,
        state_machine=machine,
        clock=reactor,
        bootstrap=Configuration(voters=voters),
        options=RaftOptions(election_tick=election, heartbeat_tick=1),
        tick_interval=config.tick_interval,
        rng=random.Random(os.urandom(16)),
        reactor=reactor,
        operation_timeout=operation_timeout,
        snapshot_every=snapshot_every,
        snapshot_growth=snapshot_growth,
    )
    raft_log = RaftCommandLog(
        driver, machine, clock=reactor, node_id=config.id, address=config.address,
        http_address=config.http_address, last_contact=transport.last_contact,
        contact_window=max(1.0, config.tick_interval * election * 2),
        read_retry=max(0.2, config.tick_interval * election), read_timeout=operation_timeout,
        leader_wait=config.tick_interval * election * 2.5,
        leader_stale_after=max(0.15, config.tick_interval * 4),
        http_peers=config.http_peers,
    )
    raft_log.transport = transport
    service = MultiService()
    driver.setServiceParent(service)
    TimerService(config.tick_interval, raft_log.watch).setServiceParent(service)
    raft_log.service = service
    return raft_log
