"""Tests for the placement planner: distinct servers, domain spread, free space, errors."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dogfs.meta.placement import ChunkServerLoad, NotEnoughChunkServers, choose_placement


@st.composite
def clusters(draw: st.DrawFn) -> list[ChunkServerLoad]:
    """Clusters of up to 14 servers, some full, some in named domains, some without."""
    count = draw(st.integers(min_value=0, max_value=14))
    choices: list[list[str | None]] = [[None], ["r1", "r2"], ["r1", "r2", "r3", None]]
    domains = draw(st.sampled_from(choices))
    servers = []
    for i in range(count):
        capacity = draw(st.integers(min_value=0, max_value=1000))
        used = draw(st.integers(min_value=0, max_value=1200))
        servers.append(ChunkServerLoad(f"c{i}", used, capacity, draw(st.sampled_from(domains))))
    return servers


def domain_of(server: ChunkServerLoad) -> str:
    return server.domain if server.domain is not None else "node:" + server.node_id


class PlacementPropertyTests(SynchronousTestCase):
    """Properties that hold for any cluster and width."""

    @settings(deadline=None, max_examples=300)
    @given(
        clusters(),
        st.integers(min_value=0, max_value=12),
        st.integers(min_value=0, max_value=2**32),
        st.sets(st.sampled_from([f"c{i}" for i in range(14)]), max_size=3),
    )
    def test_properties(
        self, servers: list[ChunkServerLoad], width: int, seed: int, exclude: set[str]
    ) -> None:
        """The result is distinct, usable, domain-balanced, or the error counts correctly."""
        usable = [
            s for s in servers if s.used_bytes < s.capacity_bytes and s.node_id not in exclude
        ]
        try:
            chosen = choose_placement(width, servers, random.Random(seed), exclude)
        except NotEnoughChunkServers as e:
            self.assertLess(len(usable), width)
            self.assertEqual((e.needed, e.alive), (width, len(usable)))
            return
        self.assertEqual(len(chosen), width)
        self.assertEqual(len(set(chosen)), width)
        by_id = {s.node_id: s for s in usable}
        for node in chosen:
            self.assertIn(node, by_id)  # never full, never excluded
        # No domain gets another shard while a domain with spare servers has two fewer.
        placed = Counter(domain_of(by_id[n]) for n in chosen)
        available = Counter(domain_of(s) for s in usable)
        for count in placed.values():
            for other, spare in available.items():
                if placed[other] < spare:
                    self.assertLessEqual(count - placed[other], 1, (placed, available))
        # The same inputs in another order give the same answer.
        again = choose_placement(width, list(reversed(servers)), random.Random(seed), exclude)
        self.assertEqual(again, chosen)


class PlacementTests(SynchronousTestCase):
    """Specific behaviours of choose_placement."""

    def servers(self, count: int, domains: int | None = None) -> list[ChunkServerLoad]:
        return [
            ChunkServerLoad(f"c{i}", 0, 100, None if domains is None else f"r{i % domains}")
            for i in range(count)
        ]

    def test_spreads_across_domains(self) -> None:
        """RS-4-2 over 3 racks puts exactly 2 shards on each rack."""
        servers = self.servers(12, domains=3)
        for seed in range(20):
            chosen = choose_placement(6, servers, random.Random(seed))
            racks = Counter(f"r{int(n[1:]) % 3}" for n in chosen)
            self.assertEqual(sorted(racks.values()), [2, 2, 2])

    def test_small_domain_runs_out(self) -> None:
        """A domain with one server takes one shard; the rest go to the others, balanced."""
        servers = [ChunkServerLoad("solo", 0, 100, "small")] + [
            ChunkServerLoad(f"b{i}", 0, 100, "big") for i in range(5)
        ]
        chosen = choose_placement(6, servers, random.Random(1))
        self.assertEqual(sorted(chosen), sorted(s.node_id for s in servers))

    def test_prefers_emptier(self) -> None:
        """Emptier servers are chosen more often than nearly full ones."""
        servers = [ChunkServerLoad("empty", 0, 100), ChunkServerLoad("full-ish", 95, 100)] + [
            ChunkServerLoad(f"m{i}", 50, 100) for i in range(4)
        ]
        counts: Counter[str] = Counter()
        rng = random.Random(42)
        for _ in range(500):
            counts.update(choose_placement(1, servers, rng))
        self.assertGreater(counts["empty"], counts["m0"])
        self.assertGreater(counts["m0"], counts["full-ish"])

    def test_never_full(self) -> None:
        """Full servers (used >= capacity, or no capacity) are never chosen."""
        servers = [
            ChunkServerLoad("full", 100, 100),
            ChunkServerLoad("over", 200, 100),
            ChunkServerLoad("zero", 0, 0),
        ] + self.servers(3)
        for seed in range(30):
            self.assertEqual(
                sorted(choose_placement(3, servers, random.Random(seed))), ["c0", "c1", "c2"]
            )

    def test_error_message(self) -> None:
        """The error names the policy, how many servers are needed and how many are alive."""
        with self.assertRaises(NotEnoughChunkServers) as caught:
            choose_placement(6, self.servers(4), random.Random(0), policy="RS-4-2")
        self.assertEqual(
            str(caught.exception), "RS-4-2 needs 6 live chunk servers, only 4 are alive."
        )
        with self.assertRaises(NotEnoughChunkServers) as caught:
            choose_placement(
                3,
                [ChunkServerLoad("full", 9, 9)] + self.servers(1),
                random.Random(0),
            )
        self.assertEqual(
            str(caught.exception),
            "A block group of 3 shards needs 3 live chunk servers, only 1 is alive with free "
            "space (1 more is full).",
        )

    def test_exclude_and_duplicates(self) -> None:
        """Excluded servers are skipped and a server listed twice counts once."""
        servers = self.servers(3) + self.servers(3)
        self.assertRaises(NotEnoughChunkServers, choose_placement, 4, servers, random.Random(0))
        chosen = choose_placement(2, servers, random.Random(0), exclude={"c1"})
        self.assertEqual(sorted(chosen), ["c0", "c2"])
        self.assertRaises(ValueError, choose_placement, -1, servers, random.Random(0))
        self.assertEqual(choose_placement(0, [], random.Random(0)), [])
