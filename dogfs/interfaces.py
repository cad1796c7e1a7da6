# -*- test-case-name: tests.test_meta_service -*-
"""Interfaces with more than one implementation (a local one and a replicated one, a fake
and a real one). Each implementation is checked with `zope.interface.verify.verifyObject`."""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class ICommandLog(Interface):
    """Where metadata commands are ordered, made durable and applied.

    A single node applies them to its LMDB state directly; a Raft group replicates them first.
    Either way a command's Deferred fires only after it is durable and applied.
    """

    is_leader = Attribute("True when this node may accept commands now.")

    def propose(command: Any) -> Any:
        """Order, persist and apply `command`; a Deferred firing with its result.

        Fails with a WireError: "not_leader" (details carry the leader's address),
        "no_quorum", "timeout".
        """

    def read_barrier() -> Any:
        """A Deferred that fires when a linearizable read may be served from local state."""

    def leader_address() -> str | None:
        """The address of the current leader, if known (a hint for redirects)."""

    def members() -> list[dict[str, Any]]:
        """Every member as status shows it: id, address, role, term, commit_index,
        applied_index, last_contact_s."""
