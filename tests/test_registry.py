"""Tests for the chunk-server liveness registry, driven by a simulated clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dogfs.meta.commands import ChunkServerRecord
from dogfs.meta.placement import ChunkServerLoad
from dogfs.meta.registry import ChunkServerRegistry, ChunkServerView


class RegistryTests(SynchronousTestCase):
    """Heartbeats, timeouts, the grace period and change notifications."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.changes: list[tuple[str, str, str]] = []

    def registry(self, dead_after: float = 10, grace: float = 0) -> ChunkServerRegistry:
        registry = ChunkServerRegistry(self.clock, dead_after, grace, check_interval=1)
        registry.on_change(lambda *change: self.changes.append(change))
        registry.start()
        self.addCleanup(registry.stop)
        return registry

    def beat(self, registry: ChunkServerRegistry, node: str, used: int = 10) -> None:
        registry.heartbeat(node, f"{node}:1", 100, used, 3, {"repairs": 0})

    def test_alive_then_dead_then_alive(self) -> None:
        """A heartbeat makes a server alive; silence past dead_after kills it; a beat revives it."""
        registry = self.registry()
        self.beat(registry, "a")
        self.assertTrue(registry.is_alive("a"))
        self.assertEqual(self.changes, [("a", "unknown", "alive")])
        self.clock.advance(10)
        self.assertTrue(registry.is_alive("a"))  # exactly dead_after is still alive
        self.clock.advance(1)
        self.assertFalse(registry.is_alive("a"))
        self.assertEqual(self.changes[-1], ("a", "alive", "dead"))
        self.beat(registry, "a")
        self.assertEqual(self.changes[-1], ("a", "dead", "alive"))
        self.assertEqual(len(self.changes), 3)

    def test_periodic_check_reports(self) -> None:
        """The looping check reports a death within check_interval without any query."""
        registry = self.registry()
        self.beat(registry, "a")
        self.clock.pump([1] * 12)
        self.assertEqual(self.changes, [("a", "unknown", "alive"), ("a", "alive", "dead")])

    def test_grace_after_start(self) -> None:
        """Known servers not yet heard from stay unknown through the grace period, then die."""
        registry = ChunkServerRegistry(self.clock, 10, grace_after_start=30, check_interval=1)
        registry.on_change(lambda *change: self.changes.append(change))
        registry.known_all([ChunkServerRecord("a", "a:1"), ChunkServerRecord("b", "b:1", "r1")])
        registry.start()
        self.addCleanup(registry.stop)
        self.clock.pump([1] * 29)
        self.assertEqual([v.state for v in registry.view()], ["unknown", "unknown"])
        self.assertTrue(registry.any_unknown())
        self.beat(registry, "b")
        self.clock.pump([1] * 2)
        self.assertEqual(registry.state("a"), "dead")
        self.assertFalse(registry.any_unknown())
        self.assertEqual(registry.state("b"), "alive")
        self.assertEqual(self.changes, [("b", "unknown", "alive"), ("a", "unknown", "dead")])

    def test_new_leader_forgets_servers_removed_before(self) -> None:
        """known_only keeps (and updates) the servers of the persistent registry and forgets
        the rest: one removed while another member led, whose relayed heartbeats left it here."""
        registry = self.registry()
        self.beat(registry, "a")
        self.beat(registry, "gone")
        registry.known_only([ChunkServerRecord("a", "a:2", "r2"), ChunkServerRecord("b", "b:1")])
        self.assertEqual([(v.node_id, v.address, v.state) for v in registry.view()],
                         [("a", "a:2", "alive"), ("b", "b:1", "unknown")])
        self.assertIsNone(registry.state("gone"))

    def test_new_leader_does_not_trust_old_silence(self) -> None:
        """A server last heard long ago (when nobody led, its heartbeats had nowhere to go) is
        "unknown" again when the registry restarts for a new leader, then dead if it stays
        silent for a whole dead_after; awaiting() says when waiting could still help."""
        registry = self.registry()
        self.beat(registry, "a")
        self.beat(registry, "b")
        self.clock.advance(30)
        self.beat(registry, "b")
        self.assertEqual(registry.state("a"), "dead")
        registry.stop()
        registry.start()
        self.clock.advance(1)  # the periodic check reports the change
        self.assertEqual(registry.state("a"), "unknown")
        self.assertTrue(registry.any_unknown())
        self.assertTrue(registry.awaiting(2))  # b alive, a may be
        self.assertFalse(registry.awaiting(1))  # enough already
        self.assertFalse(registry.awaiting(3))  # not enough even if a reports
        self.beat(registry, "a")
        self.assertFalse(registry.awaiting(2))
        self.clock.pump([1] * 11)
        self.beat(registry, "b")
        self.assertEqual(registry.state("a"), "dead")
        self.assertFalse(registry.any_unknown())
        self.assertEqual([c for c in self.changes if c[0] == "a"],
                         [("a", "unknown", "alive"), ("a", "alive", "dead"), ("a", "dead", "unknown"),
                          ("a", "unknown", "alive"), ("a", "alive", "dead")])

    def test_unknown_without_grace(self) -> None:
        """With no grace period a never-heard server is unknown for one dead_after, then dead."""
        registry = self.registry()
        registry.known("a", "a:1")
        self.clock.advance(9)
        self.assertEqual(registry.state("a"), "unknown")
        self.clock.advance(2)
        self.assertEqual(registry.state("a"), "dead")
        self.assertIsNone(registry.state("zz"))
        self.assertFalse(registry.is_alive("zz"))

    def test_live_and_view(self) -> None:
        """live() gives placement loads of alive servers; view() shows everyone, sorted."""
        registry = self.registry()
        registry.known("c", "c:1", "r2")
        self.beat(registry, "b", used=40)
        self.clock.advance(3)
        registry.heartbeat("a", "a:2", 100, 20, 5, {"q": 1}, domain="r1")
        self.assertEqual(
            registry.live(),
            [ChunkServerLoad("a", 20, 100, "r1"), ChunkServerLoad("b", 40, 100, None)],
        )
        self.assertEqual(
            registry.view(),
            [
                ChunkServerView("a", "a:2", "alive", 0.0, 100, 20, 5, {"q": 1}, "r1"),
                ChunkServerView("b", "b:1", "alive", 3.0, 100, 40, 3, {"repairs": 0}, None),
                ChunkServerView("c", "c:1", "unknown", None, 0, 0, 0, {}, "r2"),
            ],
        )
        registry.forget("b")
        self.assertEqual([v.node_id for v in registry.view()], ["a", "c"])

    def test_heartbeat_keeps_domain(self) -> None:
        """A heartbeat without a domain keeps the one known from the persistent registry."""
        registry = self.registry()
        registry.known("a", "a:1", "rack-9")
        self.beat(registry, "a")
        self.assertEqual(registry.live()[0].domain, "rack-9")

    def test_listener_errors_and_removal(self) -> None:
        """A failing listener is logged and others still hear; a removed one hears nothing."""
        registry = self.registry()

        def broken(node: str, old: str, new: str) -> None:
            raise RuntimeError("listener bug")

        registry.on_change(broken)
        heard: list[str] = []
        remove = registry.on_change(lambda node, old, new: heard.append(new))
        self.beat(registry, "a")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        remove()
        remove()
        self.clock.advance(11)
        registry.check()
        self.assertEqual(heard, ["alive"])
        self.assertEqual(self.changes[-1], ("a", "alive", "dead"))
        self.flushLoggedErrors(RuntimeError)

    def test_stop_and_restart(self) -> None:
        """stop() halts the periodic check; start() again restarts the grace clock."""
        registry = ChunkServerRegistry(self.clock, 10, grace_after_start=5)
        registry.start()
        registry.start()  # idempotent
        registry.stop()
        registry.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        registry.known("a", "a:1")
        self.clock.advance(100)
        registry.start()
        self.addCleanup(registry.stop)
        self.assertEqual(registry.state("a"), "unknown")
