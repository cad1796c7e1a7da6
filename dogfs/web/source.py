# -*- test-case-name: tests.test_web -*-
"""What the dashboard needs from a metadata node: the L{IClusterSource} interface.

The metadata service implements it; tests and the screenshot script's demo mode use
L{dogfs.web.fake.FakeClusterSource}. Imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zope.interface import Attribute, Interface

EventCallback = Callable[[dict[str, Any]], None]
Unsubscribe = Callable[[], None]


class IClusterSource(Interface):
    """A metadata node's view of the cluster, as the dashboard shows it."""

    node_id = Attribute("The id of this metadata node as `cluster status` names it, e.g. 'meta-1'.")

    def snapshot() -> dict[str, Any]:  # type: ignore[misc]
        """Return the status dict of META_PROTOCOL.md (`cluster`, `meta`, `chunks`, `namespace`).

        Called a few times a second while a dashboard is open and at every `/metrics` scrape,
        so it must be cheap and must not block. Extra keys are passed through to the page.
        """

    def subscribe(callback: EventCallback) -> Unsubscribe:  # type: ignore[misc]
        """Call C{callback(event)} for each cluster event from now on; return an unsubscriber.

        An event is a dict: C{kind} (C{"election"}, C{"leader"}, C{"chunk_state"},
        C{"meta_state"}, C{"write_refused"}, ... ), C{message} (one human sentence), and
        optionally C{level} (C{"info"}, C{"warn"}, C{"error"}), C{node} (a node id) and
        C{t} (clock seconds; filled in by the dashboard when missing).
        """

    def is_leader() -> bool:  # type: ignore[misc]
        """Whether this node is the Raft leader now (its view of the chunk servers is live)."""

    def leader_http_address() -> str | None:  # type: ignore[misc]
        """The leader's dashboard "host:port", or None when no leader is known."""
