# -*- test-case-name: tests.test_raft_core -*-
"""Client sessions: exactly-once commands over an at-least-once client (Ongaro's thesis 6.3).

A client tags each command with its id and a sequence number that grows by one per new command
(retries reuse it). The state machine's ``apply`` runs every command through
:meth:`SessionTable.apply`: a new sequence number executes and its response is cached; a
duplicate gets the cached response without executing again; an older one (the client has moved
on, so nobody waits for it) is not executed at all. The table is part of the state machine: it
must be in its snapshots (:meth:`SessionTable.to_bytes`) and everything about it is decided by
the log alone (sessions are evicted by the log index of their last use, never by a clock).

May import nothing of DogFS.
"""

from __future__ import annotations

from collections.abc import Callable

import msgpack
from attrs import define

__all__ = ["SESSION_EXPIRED", "ClientSession", "SessionTable"]

#: The response to a command whose session expired or that a newer command superseded: the
#: client cannot learn whether it ran.
SESSION_EXPIRED = b"\x00session-expired"


@define
class ClientSession:
    """What the group remembers of one client."""

    last_seq: int
    response: bytes
    #: Log index of the last command of this client (for deterministic eviction).
    last_index: int


class SessionTable:
    """Sessions of all clients, applied identically on every replica."""

    def __init__(self, max_sessions: int = 10_000) -> None:
        """Keep at most ``max_sessions``; the least recently used (by log index) goes first."""
        self.max_sessions = max_sessions
        self._sessions: dict[str, ClientSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, client_id: str) -> ClientSession | None:
        """The session of ``client_id``, if any."""
        return self._sessions.get(client_id)

    def cached(self, client_id: str, seq: int) -> bytes | None:
        """The cached response for a command that already ran, so that a retry is answered
        without going through the log again; None when it has not run (yet)."""
        s = self._sessions.get(client_id)
        if s is not None and s.last_seq == seq:
            return s.response
        return None

    def apply(
        self, client_id: str, seq: int, index: int, execute: Callable[[], bytes]
    ) -> tuple[bytes, bool]:
        """Run ``execute`` at most once for (client_id, seq), at log index ``index``.

        Returns the response and whether ``execute`` ran now.
        """
        s = self._sessions.get(client_id)
        if s is not None:
            if seq == s.last_seq:
                s.last_index = index
                return s.response, False
            if seq < s.last_seq:
                return SESSION_EXPIRED, False
        response = execute()
        if s is None:
            s = self._sessions[client_id] = ClientSession(seq, response, index)
            self._evict()
        else:
            s.last_seq, s.response, s.last_index = seq, response, index
        return response, True

    def _evict(self) -> None:
        while len(self._sessions) > self.max_sessions:
            oldest = min(self._sessions, key=lambda c: (self._sessions[c].last_index, c))
            del self._sessions[oldest]

    def to_bytes(self) -> bytes:
        """The table, for a state-machine snapshot."""
        return msgpack.packb(
            [
                self.max_sessions,
                [
                    [c, s.last_seq, s.response, s.last_index]
                    for c, s in sorted(self._sessions.items())
                ],
            ],
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionTable:
        """Restore what :meth:`to_bytes` wrote; ``ValueError`` when malformed."""
        try:
            max_sessions, rows = msgpack.unpackb(data, raw=False)
            table = cls(int(max_sessions))
            for c, seq, response, index in rows:
                if not isinstance(c, str) or not isinstance(response, bytes):
                    raise TypeError("bad session row")
                table._sessions[c] = ClientSession(int(seq), response, int(index))
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise ValueError(f"malformed session table: {e}") from None
        return table
