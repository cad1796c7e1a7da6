"""Tests for dogfs.raft.sim: the seeded whole-group simulator and its proof that checks bite.

Seeds are fixed so the suite is deterministic; ``python -m dogfs.raft.sim`` picks fresh ones
(and longer sweeps are a command away). These runs take most of this module's time, kept to
well under half a minute on two cores.
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from dogfs.raft.core import BUGS
from dogfs.raft.sim import DEFAULT_SEEDS, DEFAULT_STEPS, Simulation, main, run_seeds


class CleanRunTests(SynchronousTestCase):
    """Without planted bugs, no check fails."""

    def assertClean(self, nodes: int, first: int, seeds: int) -> None:
        for res in run_seeds(seeds, first, nodes=nodes, steps=DEFAULT_STEPS):
            self.assertIsNone(
                res.violation, f"seed {res.seed}: {res.violation}\n" + "\n".join(res.trace[-30:])
            )
            # The runs did something: operations completed and a leader came back after heal.
            self.assertGreater(res.acked, 20)
            self.assertIsNotNone(res.ticks_to_leader)

    def test_three_nodes(self) -> None:
        """Thirty seeded runs of a three-node group under faults find no violation."""
        self.assertClean(3, 7000, 30)

    def test_five_nodes(self) -> None:
        """Twelve seeded runs of a five-node group under faults find no violation."""
        self.assertClean(5, 8000, 12)


class PlantedBugTests(SynchronousTestCase):
    """Every planted bug is found within the default number of seeds."""

    def assertFound(self, bug: str) -> None:
        results = run_seeds(DEFAULT_SEEDS, 1, steps=DEFAULT_STEPS, bug=bug, stop_at_first=True)
        found = [r for r in results if r.violation]
        self.assertTrue(found, f"{bug} not found in {DEFAULT_SEEDS} seeds")
        self.assertIn(f"--inject-bug {bug}", found[0].replay_command())

    def test_commit_old_term(self) -> None:
        """The figure-8 bug (counting replicas of an old term's entry) is found."""
        self.assertFound("commit-old-term")

    def test_forget_vote(self) -> None:
        """A vote that is not persisted is found (two leaders in one term)."""
        self.assertFound("forget-vote")

    def test_no_truncate(self) -> None:
        """A follower that keeps conflicting entries is found."""
        self.assertFound("no-truncate")

    def test_stale_read(self) -> None:
        """A deposed leader answering reads locally is found (not linearizable)."""
        self.assertFound("stale-read")

    def test_early_ack(self) -> None:
        """Acknowledging before the write is durable is found."""
        self.assertFound("early-ack")

    def test_every_bug_has_a_test(self) -> None:
        """The list of planted bugs and the tests above agree."""
        for bug in BUGS:
            self.assertTrue(hasattr(self, "test_" + bug.replace("-", "_")), bug)


class ReplayTests(SynchronousTestCase):
    """A seed replays exactly."""

    def test_deterministic(self) -> None:
        """Two runs of one seed produce the same trace and the same history size."""
        a = Simulation(42, steps=300).run()
        b = Simulation(42, steps=300).run()
        self.assertEqual(a.trace, b.trace)
        self.assertEqual((a.ops, a.acked), (b.ops, b.acked))

    def test_violation_replays(self) -> None:
        """A violation found once is found again on replay, with the same message."""
        [first] = [
            r
            for r in run_seeds(
                DEFAULT_SEEDS, 1, steps=DEFAULT_STEPS, bug="no-truncate", stop_at_first=True
            )
            if r.violation
        ]
        again = Simulation(first.seed, first.nodes, first.steps, first.bug).run()
        self.assertEqual(again.violation, first.violation)

    def test_unknown_bug(self) -> None:
        """An unknown bug name is refused."""
        with self.assertRaises(ValueError):
            Simulation(1, bug="no-such-bug")


class CommandLineTests(SynchronousTestCase):
    """python -m dogfs.raft.sim."""

    def run_main(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        with redirect_stdout(out):
            status = main(list(argv))
        return status, out.getvalue()

    def test_clean_summary(self) -> None:
        """The last line is runs=N violations=0 and the status is zero."""
        status, out = self.run_main("--seeds", "2", "--first-seed", "5", "--steps", "200")
        self.assertEqual(status, 0)
        self.assertEqual(out.splitlines()[-1], "runs=2 violations=0")

    def test_violation_report(self) -> None:
        """A violation prints its seed, the replay command and a trace; the status is non-zero."""
        status, out = self.run_main(
            "--seeds", "3", "--first-seed", "2", "--inject-bug", "no-truncate", "--stop-at-first"
        )
        self.assertEqual(status, 1)
        self.assertIn("VIOLATION", out)
        self.assertIn("replay: python -m dogfs.raft.sim --seeds 1 --first-seed", out)
        self.assertIn("trace (last events):", out)
        self.assertRegex(out.splitlines()[-1], r"^runs=\d+ violations=[1-9]\d*$")
