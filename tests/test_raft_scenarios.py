"""Scenario tests of the Raft core, in the style of etcd's interaction tests.

Each test drives a :class:`~dogfs.raft.sim_cluster.Cluster` by hand into one of the classic
situations (the Raft paper's figures 7 and 8, split votes, a node stranded at a higher term, the
partial-connectivity livelock, a follower that needs a snapshot, membership changes, client
retries) and checks the outcome.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from dogfs.raft.core import (
    AppendEntries,
    ConfigChange,
    ConfigChangeKind,
    EntryKind,
    HardState,
    InstallSnapshot,
    Message,
    ProposalRejected,
    RaftOptions,
    RequestVote,
    Role,
)
from dogfs.raft.sim_cluster import Cluster
from dogfs.raft.sim_world import KVStateMachine, encode_command


def run_rounds(c: Cluster, rounds: int) -> None:
    """Tick every live node once per round and let messages flow."""
    for _ in range(rounds):
        c.tick()
        c.stabilize()


def campaign_until_leader(c: Cluster, nid: str, block=lambda m: False, rounds: int = 10) -> None:
    """Make ``nid`` campaign (again, if a first try only taught it a newer term)."""
    for _ in range(3):
        c.nodes[nid].campaign()
        for _ in range(rounds):
            c.process_all()
            c.deliver(lambda m: not block(m))
            c.drop(block)
        if c.nodes[nid].role == Role.LEADER:
            return
    raise AssertionError(f"{nid} did not win")


def expire_leases(c: Cluster, *ids: str) -> None:
    """Let ``ids`` go an election timeout without hearing from a leader."""
    for nid in ids:
        c.tick(nid, c.options.election_tick)
    c.drop()


class Figure7Tests(SynchronousTestCase):
    """Figure 7: a new leader brings followers with missing and extra entries in line."""

    def test_logs_converge(self) -> None:
        """Every follower ends with exactly the leader's log (plus its no-op)."""
        ids = ["leader", "a", "b", "c", "d", "e", "f"]
        c = Cluster(ids)
        logs = {
            "leader": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6],
            "a": [1, 1, 1, 4, 4, 5, 5, 6, 6],
            "b": [1, 1, 1, 4],
            "c": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],
            "d": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],
            "e": [1, 1, 1, 4, 4, 4, 4],
            "f": [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
        }
        for nid, terms in logs.items():
            c.preload(nid, terms, 7)
        # c and d refuse their votes (their logs are more up to date); a, b, e, f elect it.
        campaign_until_leader(c, "leader")
        self.assertEqual(c.nodes["leader"].term, 8)
        c.stabilize()
        c.tick("leader")
        c.stabilize()
        want = [*logs["leader"], 8]
        for nid in ids:
            self.assertEqual(c.log_terms(nid), want, nid)
            self.assertEqual(c.nodes[nid].commit_index, 11, nid)
        # The leader's entries are the ones everywhere, not the followers' extra ones.
        self.assertEqual(c.nodes["d"].entry_at(10).data, b"10/6")  # type: ignore[union-attr]


class Figure8Tests(SynchronousTestCase):
    """Figure 8: an entry of an earlier term must not be committed by counting replicas."""

    def play(self, bug: str | None) -> Cluster:
        """The figure's sequence (a)-(e), with one-entry appends so that (c) can happen."""
        c = Cluster(
            ["s1", "s2", "s3", "s4", "s5"],
            RaftOptions(max_entries_per_msg=1, inject_bug=bug),
        )
        c.elect("s1")
        # (a) s1 leads, replicates index 2 only to s2, then crashes.
        c.nodes["s1"].propose(b"x")
        c.process("s1")
        c.deliver(lambda m: m.dst == "s2")
        c.drop()
        c.process_all()
        c.drop()
        c.crash("s1")
        # (b) s5 is elected by s3, s4 and itself, appends its no-op at 2, and is cut off.
        c.isolate("s2")
        expire_leases(c, "s3", "s4", "s5")
        campaign_until_leader(c, "s5", block=lambda m: isinstance(m, AppendEntries))
        c.heal()
        c.isolate("s5")
        c.drop()
        # (c) s1 restarts, is elected, and replicates its old entry 2 to s3 but not its no-op.
        c.restart("s1")
        expire_leases(c, "s2", "s3", "s4")
        s1 = c.nodes["s1"]

        def no_op_accepted(m: Message) -> bool:
            return (
                isinstance(m, AppendEntries)
                and m.prev_index <= c.nodes[m.dst].last_index
                and any(e.term == s1.term for e in m.entries)
            )

        campaign_until_leader(c, "s1", block=no_op_accepted)
        self.assertEqual(c.log_terms("s3"), [1, 1])
        c.crash("s1")
        # (d) s5 comes back and is elected by s2, s3, s4: its term-2 entry overwrites index 2.
        c.heal()
        expire_leases(c, "s2", "s3", "s4", "s5")
        campaign_until_leader(c, "s5")
        c.stabilize()
        self.committed_by_s1 = s1.commit_index
        return c

    def test_old_term_entry_not_committed(self) -> None:
        """The leader of term 3 does not count replicas of index 2 (term 1): nothing that was
        committed is lost when s5 overwrites it."""
        c = self.play(None)
        self.assertEqual(self.committed_by_s1, 1)
        self.assertEqual(c.log_terms("s3")[:2], [1, 2])

    def test_planted_bug_loses_committed_entry(self) -> None:
        """With the commit-old-term bug, index 2 is committed and then overwritten."""
        c = self.play("commit-old-term")
        self.assertEqual(self.committed_by_s1, 2)
        self.assertEqual(c.log_terms("s3")[:2], [1, 2])


class ElectionScenarioTests(SynchronousTestCase):
    """Split votes and disruptive nodes."""

    def test_split_vote_resolves(self) -> None:
        """Two simultaneous candidates split four votes; randomized timeouts then elect one."""
        c = Cluster(["a", "b", "c", "d"], seed=3)
        c.nodes["a"].campaign()
        c.nodes["b"].campaign()
        c.process_all()
        # Pre-votes pass for both; then c hears a first and d hears b first.
        c.deliver(lambda m: isinstance(m, RequestVote) and m.pre_vote)
        c.process_all()
        c.deliver()
        c.process_all()
        c.deliver(lambda m: m.src == "a" and m.dst == "c" or m.src == "b" and m.dst == "d")
        c.stabilize()
        self.assertEqual((c.nodes["a"].role, c.nodes["b"].role), (Role.CANDIDATE, Role.CANDIDATE))
        self.assertIsNone(c.leader())
        run_rounds(c, 40)
        leaders = [n for n in c.nodes.values() if n.role == Role.LEADER]
        self.assertEqual(len(leaders), 1)
        self.assertGreaterEqual(leaders[0].term, 2)

    def test_isolated_node_keeps_its_term(self) -> None:
        """With pre-vote a partitioned node does not inflate its term, and on its return the
        leader is undisturbed."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        c.isolate("c")
        for _ in range(100):
            c.tick("c")
            c.drop()
        self.assertEqual(c.nodes["c"].term, 1)
        c.heal()
        run_rounds(c, 5)
        self.assertEqual((c.leader(), c.nodes["a"].term), ("a", 1))

    def test_stranded_at_higher_term(self) -> None:
        """A node that comes back at a higher term (say it campaigned alone without pre-vote)
        makes the leader step down once; the group then elects a leader at a newer term and the
        stranded node rejoins."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        c.nodes["a"].propose(b"x")
        c.stabilize()
        c.crash("c")
        c.storage["c"].hard_state = HardState(9, "c", 0)
        c.restart("c")
        run_rounds(c, 60)
        leader = c.leader()
        self.assertIsNotNone(leader)
        assert leader is not None
        self.assertGreater(c.nodes[leader].term, 9)
        self.assertEqual(c.nodes[leader].propose(b"y"), c.nodes[leader].last_index)
        run_rounds(c, 3)
        self.assertEqual(c.nodes["c"].commit_index, c.nodes[leader].commit_index)

    def test_partial_connectivity_no_livelock(self) -> None:
        """a and c cannot talk, both talk to b. With pre-vote and check-quorum, c cannot depose
        the leader: b, hearing from a, ignores c, and the group keeps committing."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        c.cut_link("a", "c")
        for i in range(20):
            c.nodes["a"].propose(b"%d" % i)
            run_rounds(c, 10)
        self.assertEqual((c.leader(), c.nodes["a"].term), ("a", 1))
        self.assertEqual(c.nodes["b"].commit_index, c.nodes["a"].last_index)

    def test_partial_connectivity_livelock_without(self) -> None:
        """Without pre-vote and check-quorum the same partition keeps deposing leaders."""
        c = Cluster(["a", "b", "c"], RaftOptions(pre_vote=False, check_quorum=False))
        c.elect("a")
        c.cut_link("a", "c")
        terms = set()
        for _ in range(200):
            run_rounds(c, 1)
            leader = c.leader()
            if leader is not None:
                terms.add(c.nodes[leader].term)
        self.assertGreater(max(n.term for n in c.nodes.values()), 5)
        self.assertGreater(len(terms), 3)


class SnapshotScenarioTests(SynchronousTestCase):
    """A follower too far behind catches up from a snapshot."""

    def test_slow_follower_gets_chunked_snapshot(self) -> None:
        """The leader compacts past a lagging follower, sends the snapshot in small chunks;
        a lost chunk is resent, and the follower ends with the leader's state and log."""
        c = Cluster(["a", "b", "c"], RaftOptions(snapshot_chunk_bytes=16))
        c.elect("a")
        c.isolate("c")
        for i in range(30):
            c.nodes["a"].propose(b"cmd%02d" % i)
            c.stabilize()
        snap = c.snapshot("a")
        self.assertGreater(len(snap.data), 64)
        c.heal()
        # Deliver until the first chunk after offset 0 is seen, and lose it.
        lost: list[int] = []
        for _ in range(50):
            c.tick("a")
            c.process_all()
            chunks = [m for m in c.queue if isinstance(m, InstallSnapshot) and m.offset > 0]
            if chunks and not lost:
                victim: Message = chunks[0]
                lost.append(chunks[0].offset)

                def is_victim(m: Message, victim: Message = victim) -> bool:
                    return m is victim

                c.drop(is_victim)
            c.deliver()
            c.process_all()
        self.assertTrue(lost)
        c.stabilize()
        node = c.nodes["c"]
        self.assertEqual(node.snapshot_index, snap.meta.index)
        self.assertEqual(c.applied["c"][0].data, b"snap")
        self.assertEqual(c.storage["c"].snapshot, snap)
        a = c.nodes["a"]
        c.nodes["a"].propose(b"after")
        c.stabilize()
        c.tick("a")
        c.stabilize()
        self.assertEqual((node.commit_index, node.last_index), (a.commit_index, a.last_index))
        self.assertEqual(c.applied["c"][-1].data, b"after")


class MembershipScenarioTests(SynchronousTestCase):
    """Configuration changes."""

    def test_learner_catches_up_then_promoted(self) -> None:
        """A learner receives the log without voting, then becomes a voter that counts."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        for i in range(5):
            c.nodes["a"].propose(b"%d" % i)
        c.stabilize()
        a = c.nodes["a"]
        a.propose_config_change(ConfigChange(ConfigChangeKind.ADD_LEARNER, "d"))
        c.add("d", c.nodes["d"].config if "d" in c.nodes else type(a.config)(frozenset()))
        c.stabilize()
        c.tick("a")
        c.stabilize()
        d = c.nodes["d"]
        self.assertEqual(d.role, Role.LEARNER)
        self.assertEqual(d.commit_index, a.commit_index)
        a.propose_config_change(ConfigChange(ConfigChangeKind.ADD_VOTER, "d"))
        c.stabilize()
        c.tick("a")
        c.stabilize()
        self.assertEqual(d.role, Role.FOLLOWER)
        self.assertEqual(a.config.voters, {"a", "b", "c", "d"})
        # With b and c down, a and d are not a quorum of four: nothing commits.
        c.crash("b")
        c.crash("c")
        a.propose(b"needs three")
        run_rounds(c, 3)
        self.assertLess(a.commit_index, a.last_index)

    def test_two_changes_at_once(self) -> None:
        """Two changes proposed together: the second is refused until the first is applied."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        a = c.nodes["a"]
        a.propose_config_change(ConfigChange(ConfigChangeKind.REMOVE, "c"))
        with self.assertRaises(ProposalRejected):
            a.propose_config_change(ConfigChange(ConfigChangeKind.REMOVE, "b"))
        c.stabilize()
        self.assertEqual(a.config.voters, {"a", "b"})
        a.propose_config_change(ConfigChange(ConfigChangeKind.ADD_LEARNER, "c"))

    def test_leader_removal(self) -> None:
        """A leader that removes itself steps down once the change applies; the others elect a
        leader among themselves and the removed node never campaigns."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        c.nodes["a"].propose_config_change(ConfigChange(ConfigChangeKind.REMOVE, "a"))
        c.stabilize()
        self.assertEqual(c.nodes["a"].role, Role.FOLLOWER)
        run_rounds(c, 40)
        leader = c.leader()
        self.assertIn(leader, {"b", "c"})
        assert leader is not None
        self.assertEqual(c.nodes[leader].config.voters, {"b", "c"})
        self.assertFalse(c.nodes["a"].promotable())


class ClientRetryTests(SynchronousTestCase):
    """Exactly-once commands across leader changes."""

    def test_retry_after_timeout_applies_once(self) -> None:
        """A write sent to a leader that is cut off before answering, retried at the next
        leader, ends up twice in the log and executes once."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        cmd = encode_command("client", 1, ("put", "k", "v1"))
        c.nodes["a"].propose(cmd)
        c.process("a")
        # b and c store it, but the acknowledgements never reach a: the client times out.
        c.deliver(lambda m: isinstance(m, AppendEntries))
        c.process_all()
        c.drop()
        c.isolate("a")
        expire_leases(c, "b", "c")
        campaign_until_leader(c, "b")
        c.nodes["b"].propose(cmd)
        c.stabilize()
        c.tick("b")
        c.stabilize()
        sm = KVStateMachine()
        results = []
        for e in c.applied["c"]:
            out = sm.apply(e)
            if out is not None:
                results.append(out)
        normal = [e for e in c.applied["c"] if e.kind == EntryKind.NORMAL]
        self.assertEqual(len(normal), 2)
        self.assertEqual(results, [("client", 1, "ok"), ("client", 1, "ok")])
        self.assertEqual(sm.writes, {("client", 1)})
        self.assertEqual(sm.get("k"), "v1")
