"""Tests for dogfs.raft.core (the pure Raft core) and dogfs.raft.session (client sessions)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dogfs.raft.core import (
    AppendEntries,
    AppendEntriesResponse,
    ConfigChange,
    ConfigChangeKind,
    Configuration,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    InstallSnapshotResponse,
    NotLeader,
    ProposalRejected,
    RaftNode,
    RaftOptions,
    ReadIndexRequest,
    ReadIndexResponse,
    Ready,
    RequestVote,
    RequestVoteResponse,
    Role,
    Snapshot,
    SnapshotMeta,
    TimeoutNow,
    _ProgressState,
    decode_message,
    encode_message,
)
from dogfs.raft.session import SESSION_EXPIRED, SessionTable
from dogfs.raft.sim_cluster import Cluster
from dogfs.raft.sim_world import MemoryStorage

CONF = Configuration(frozenset({"a", "b", "c"}))


def new_node(
    nid: str = "a",
    config: Configuration = CONF,
    options: RaftOptions | None = None,
    hard_state: HardState | None = None,
    entries: list[Entry] | None = None,
    applied: int = 0,
) -> RaftNode:
    return RaftNode(
        nid,
        options or RaftOptions(),
        hard_state=hard_state or HardState(0, None, 0),
        snapshot=None,
        entries=entries or [],
        config=config,
        applied=applied,
        rng=random.Random(1),
    )


def drain(node: RaftNode) -> Ready:
    """Take one Ready and advance it as if persisted, sent and applied."""
    rd = node.ready()
    node.advance(rd)
    return rd


def granted(node: RaftNode) -> list[bool]:
    """The verdicts of the vote responses in the node's next Ready."""
    return [m.granted for m in node.ready().messages if isinstance(m, RequestVoteResponse)]


def ents(*terms: int) -> list[Entry]:
    return [Entry(t, i, EntryKind.NORMAL, b"e%d" % i) for i, t in enumerate(terms, 1)]


entries_st = st.lists(
    st.builds(
        Entry,
        st.integers(0, 2**40),
        st.integers(0, 2**40),
        st.sampled_from(list(EntryKind)),
        st.binary(max_size=40),
    ),
    max_size=5,
).map(tuple)
names = st.text(min_size=1, max_size=8)
meta_st = st.builds(
    SnapshotMeta,
    st.integers(0, 2**40),
    st.integers(0, 2**40),
    st.builds(
        Configuration,
        st.frozensets(names, max_size=4),
        st.frozensets(names, max_size=3),
    ),
)
n = st.integers(0, 2**40)
messages = st.one_of(
    st.builds(RequestVote, n, names, names, n, n, st.booleans(), st.booleans()),
    st.builds(RequestVoteResponse, n, names, names, st.booleans(), st.booleans()),
    st.builds(AppendEntries, n, names, names, n, n, entries_st, n),
    st.builds(AppendEntriesResponse, n, names, names, st.booleans(), n, n, n),
    st.builds(Heartbeat, n, names, names, n, st.binary(max_size=8)),
    st.builds(HeartbeatResponse, n, names, names, st.binary(max_size=8)),
    st.builds(InstallSnapshot, n, names, names, meta_st, n, st.binary(max_size=30), st.booleans()),
    st.builds(InstallSnapshotResponse, n, names, names, n, n),
    st.builds(TimeoutNow, n, names, names),
    st.builds(ReadIndexRequest, n, names, names, st.binary(max_size=8)),
    st.builds(ReadIndexResponse, n, names, names, st.binary(max_size=8), n, st.booleans()),
)


class CodecTests(SynchronousTestCase):
    """The msgpack encoding of messages."""

    @settings(deadline=None, max_examples=150)
    @given(messages)
    def test_round_trip(self, m: object) -> None:
        """Every message decodes to itself."""
        self.assertEqual(decode_message(encode_message(m)), m)  # type: ignore[arg-type]

    @settings(deadline=None, max_examples=150)
    @given(st.binary(max_size=60))
    def test_garbage_is_value_error(self, data: bytes) -> None:
        """Arbitrary bytes decode or raise ValueError, nothing else."""
        try:
            decode_message(data)
        except ValueError:
            pass

    @settings(deadline=None, max_examples=100)
    @given(messages, st.lists(st.integers(-(2**63), 2**63) | st.binary(max_size=4) | st.none(), min_size=1, max_size=3))
    def test_later_fields_ignored(self, m: object, extra: list[object]) -> None:
        """A message of a later release, with fields after the ones this release knows, decodes
        to what this release knows (so a group may run two releases in a rolling upgrade)."""
        import msgpack

        body = msgpack.unpackb(encode_message(m), raw=False)  # type: ignore[arg-type]
        later = msgpack.packb([*body, *extra], use_bin_type=True)
        self.assertEqual(decode_message(later), m)

    def test_malformed(self) -> None:
        """Wrong types, counts, codes and entry kinds are rejected."""
        import msgpack

        good = encode_message(Heartbeat(1, "a", "b", 3, b"x"))
        body = msgpack.unpackb(good)
        for bad in (
            [99, *body[1:]],
            body[:-1],
            [body[0], "1", *body[2:]],
            [body[0], -1, *body[2:]],
            [body[0], True, *body[2:]],
            {"not": "a list"},
        ):
            with self.assertRaises(ValueError):
                decode_message(msgpack.packb(bad, use_bin_type=True))
        ae = msgpack.unpackb(encode_message(AppendEntries(1, "a", "b", 0, 0, tuple(ents(1)), 0)))
        for entry in (
            [1, 1, 7, b""],
            [1, 1, True, b""],
            [1, 1, "0", b""],
            [-1, 1, 0, b""],
            [1, True, 0, b""],
            [1, 1.0, 0, b""],
            [1, 1, 0, "text"],
            [1, 1, 0],
            [1, 1, 0, b"", b""],
        ):
            ae[6] = [entry]
            with self.assertRaises(ValueError, msg=repr(entry)):
                decode_message(msgpack.packb(ae, use_bin_type=True))
        with self.assertRaises(ValueError):
            decode_message(b"\xc1")


class ElectionTests(SynchronousTestCase):
    """Elections, pre-vote, check-quorum."""

    def test_single_node(self) -> None:
        """A lone voter elects itself, appends a no-op and commits it once persisted."""
        node = new_node(config=Configuration(frozenset({"a"})))
        for _ in range(20):
            node.tick()
        self.assertEqual(node.role, Role.LEADER)
        rd = node.ready()
        self.assertEqual([e.kind for e in rd.entries], [EntryKind.NOOP])
        self.assertEqual(rd.committed, [])
        node.advance(rd)
        self.assertEqual(node.commit_index, 1)
        self.assertEqual(node.propose(b"x"), 2)
        drain(node)
        rd = drain(node)
        self.assertEqual([e.data for e in rd.committed], [b"x"])

    def test_pre_vote_keeps_term(self) -> None:
        """A node that times out asks for pre-votes at term+1 without changing its own term."""
        node = new_node()
        for _ in range(20):
            node.tick()
        self.assertEqual(node.role, Role.PRE_CANDIDATE)
        self.assertEqual(node.term, 0)
        rd = node.ready()
        self.assertIsNone(rd.hard_state)
        votes = [m for m in rd.messages if isinstance(m, RequestVote)]
        self.assertEqual({m.dst for m in votes}, {"b", "c"})
        self.assertTrue(all(m.pre_vote and m.term == 1 for m in votes))

    def test_vote_is_persisted_with_its_response(self) -> None:
        """A granted vote comes out in the same Ready as the hard state recording it."""
        node = new_node("b")
        node.step(RequestVote(1, "a", "b", 0, 0))
        rd = node.ready()
        self.assertEqual(rd.hard_state, HardState(1, "a", 0))
        self.assertEqual(rd.messages, [RequestVoteResponse(1, "b", "a", True, False)])

    def test_one_vote_per_term(self) -> None:
        """A node votes for at most one candidate per term."""
        node = new_node("b")
        node.step(RequestVote(1, "a", "b", 0, 0))
        node.step(RequestVote(1, "c", "b", 0, 0))
        self.assertEqual(granted(node), [True, False])

    def test_up_to_date_check(self) -> None:
        """A vote goes only to a candidate whose log is at least as up to date."""
        node = new_node("b", hard_state=HardState(2, None, 0), entries=ents(1, 2))
        node.step(RequestVote(3, "a", "b", 5, 1))
        node.step(RequestVote(4, "c", "b", 1, 2))
        self.assertEqual(granted(node), [False, False])
        node.step(RequestVote(5, "c", "b", 2, 2))
        self.assertEqual(granted(node), [True])

    def test_check_quorum_steps_down(self) -> None:
        """A leader that hears from no quorum for an election timeout steps down."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        c.isolate("a")
        for _ in range(25):
            c.tick("a")
            c.drop()
        self.assertEqual(c.nodes["a"].role, Role.FOLLOWER)

    def test_lease_ignores_disruptive_candidate(self) -> None:
        """A follower that heard from its leader recently ignores a (pre-)vote request."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        b = c.nodes["b"]
        b.step(RequestVote(5, "c", "b", 10, 5))
        self.assertEqual(b.term, 1)
        self.assertEqual(b.ready().messages, [])

    def test_lower_term_leader_told(self) -> None:
        """An append from an older term is answered with our term so the sender steps down."""
        node = new_node("b", hard_state=HardState(5, None, 0))
        node.step(AppendEntries(3, "a", "b", 0, 0, (), 0))
        [m] = node.ready().messages
        self.assertEqual((m.term, m.dst), (5, "a"))

    def test_learner_does_not_campaign(self) -> None:
        """A learner never campaigns."""
        conf = Configuration(frozenset({"a"}), frozenset({"b"}))
        node = new_node("b", config=conf)
        self.assertEqual(node.role, Role.LEARNER)
        for _ in range(100):
            node.tick()
        self.assertEqual(node.role, Role.LEARNER)
        self.assertEqual(node.ready().messages, [])


class ReplicationTests(SynchronousTestCase):
    """Figure 2's AppendEntries rules."""

    def test_commit_is_min_of_leader_commit_and_last_new(self) -> None:
        """A follower commits up to min(leaderCommit, index of last new entry)."""
        node = new_node("b", hard_state=HardState(1, None, 0))
        node.step(AppendEntries(1, "a", "b", 0, 0, tuple(ents(1, 1)), 5))
        self.assertEqual(node.commit_index, 2)

    def test_no_truncation_without_conflict(self) -> None:
        """A stale, shorter append does not truncate entries that agree with it."""
        node = new_node("b", hard_state=HardState(1, None, 0))
        node.step(AppendEntries(1, "a", "b", 0, 0, tuple(ents(1, 1, 1)), 0))
        node.step(AppendEntries(1, "a", "b", 0, 0, tuple(ents(1)), 0))
        self.assertEqual(node.last_index, 3)
        rd = node.ready()
        self.assertEqual([m.index for m in rd.messages], [3, 1])  # type: ignore[union-attr]

    def test_truncates_on_conflict(self) -> None:
        """A conflicting entry and all that follow it are replaced by the leader's."""
        node = new_node("b", hard_state=HardState(2, None, 0), entries=ents(1, 1, 1))
        drain(node)
        new = (Entry(2, 2, EntryKind.NORMAL, b"n2"),)
        node.step(AppendEntries(2, "a", "b", 1, 1, new, 0))
        self.assertEqual(node.last_index, 2)
        self.assertEqual(node.term_at(2), 2)
        rd = node.ready()
        self.assertEqual([(e.index, e.term) for e in rd.entries], [(2, 2)])

    def test_truncated_batch_keeps_its_durable_prefix(self) -> None:
        """A batch written while a new leader truncated its tail: the entries before the
        truncation are durable, so the next Ready writes only from the truncation on."""
        node = new_node("b", hard_state=HardState(1, None, 0))
        node.step(AppendEntries(1, "a", "b", 0, 0, tuple(ents(1, 1, 1)), 0))
        written = node.ready()
        self.assertEqual([e.index for e in written.entries], [1, 2, 3])
        node.step(AppendEntries(2, "c", "b", 2, 1, (Entry(2, 3, EntryKind.NORMAL, b"n3"),), 0))
        node.advance(written)
        rd = node.ready()
        self.assertEqual([(e.index, e.term) for e in rd.entries], [(3, 2)])

    def test_reject_gives_hint(self) -> None:
        """A mismatched prev entry is rejected with a hint of where logs may agree."""
        node = new_node("b", hard_state=HardState(3, None, 0), entries=ents(1, 1, 2, 2))
        node.step(AppendEntries(3, "a", "b", 6, 3, (), 0))
        [m] = node.ready().messages
        assert isinstance(m, AppendEntriesResponse)
        self.assertFalse(m.success)
        self.assertEqual((m.index, m.hint_index, m.hint_term), (6, 4, 2))

    def test_leader_does_not_commit_old_term_by_counting(self) -> None:
        """Entries of an earlier term commit only with one of the leader's own (figure 8)."""
        node = new_node("a", hard_state=HardState(2, None, 0), entries=ents(1, 2))
        drain(node)
        node.campaign()
        for m in node.ready().messages:
            node.step(RequestVoteResponse(m.term, m.dst, "a", True, True))
        for m in node.ready().messages:
            node.step(RequestVoteResponse(m.term, m.dst, "a", True, False))
        self.assertEqual(node.role, Role.LEADER)
        drain(node)
        # b has everything up to 2 (term 2), not the no-op at 3: nothing commits.
        node.step(AppendEntriesResponse(3, "b", "a", True, 2))
        self.assertEqual(node.commit_index, 0)
        node.step(AppendEntriesResponse(3, "b", "a", True, 3))
        self.assertEqual(node.commit_index, 3)

    def test_batching_and_window(self) -> None:
        """Appends carry at most max_entries_per_msg entries, with at most max_inflight out."""
        c = Cluster(["a", "b"], RaftOptions(max_entries_per_msg=2, max_inflight=2))
        c.elect("a")
        a = c.nodes["a"]
        for i in range(10):
            a.propose(b"%d" % i)
        c.process("a")
        appends = [m for m in c.queue if isinstance(m, AppendEntries)]
        # Ten proposals between two Readies travel together, two per message, two in flight.
        self.assertEqual([len(m.entries) for m in appends], [2, 2])
        c.stabilize()
        self.assertEqual(c.nodes["b"].last_index, a.last_index)
        self.assertEqual(a.commit_index, a.last_index)

    def test_follower_answers_appends_of_one_ready_once(self) -> None:
        """Appends that arrive before the follower's next Ready get one cumulative answer;
        a rejection in between is kept, and so is the order around it."""
        node = new_node("b", hard_state=HardState(1, None, 0))
        node.step(AppendEntries(1, "a", "b", 0, 0, tuple(ents(1, 1)), 0))
        node.step(AppendEntries(1, "a", "b", 2, 1, (Entry(1, 3, EntryKind.NORMAL, b"e3"),), 0))
        node.step(AppendEntries(1, "a", "b", 3, 1, (Entry(1, 4, EntryKind.NORMAL, b"e4"),), 0))
        rd = node.ready()
        self.assertEqual(
            [(type(m).__name__, m.success, m.index) for m in rd.messages],  # type: ignore[union-attr]
            [("AppendEntriesResponse", True, 4)],
        )
        self.assertEqual([e.index for e in rd.entries], [1, 2, 3, 4])
        node.advance(rd)
        node.step(AppendEntries(1, "a", "b", 4, 1, (Entry(1, 5, EntryKind.NORMAL, b"e5"),), 0))
        node.step(AppendEntries(1, "a", "b", 9, 1, (), 0))  # beyond our log: rejected
        node.step(AppendEntries(1, "a", "b", 5, 1, (Entry(1, 6, EntryKind.NORMAL, b"e6"),), 0))
        self.assertEqual(
            [(m.success, m.index) for m in node.ready().messages],  # type: ignore[union-attr]
            [(True, 5), (False, 9), (True, 6)],
        )

    def test_commit_travels_once_per_ready(self) -> None:
        """Acks that move the commit index between two Readies make one append per follower,
        sent at the next Ready; a follower already told the commit index gets no empty one."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        c.stabilize()
        a = c.nodes["a"]
        a.propose(b"x")
        a.propose(b"y")
        rd = a.ready()
        a.advance(rd)
        last = a.last_index
        self.assertEqual(
            sorted((m.dst, len(m.entries)) for m in rd.messages if isinstance(m, AppendEntries)),
            [("b", 2), ("c", 2)],
        )
        a.step(AppendEntriesResponse(a.term, "b", "a", True, last - 1))
        a.step(AppendEntriesResponse(a.term, "b", "a", True, last))
        self.assertEqual(a.commit_index, last)
        a.step(AppendEntriesResponse(a.term, "c", "a", True, last))
        rd = a.ready()
        appends = [m for m in rd.messages if isinstance(m, AppendEntries)]
        self.assertEqual(sorted((m.dst, m.entries, m.commit) for m in appends), [("b", (), last), ("c", (), last)])
        a.advance(rd)
        # The commit index has not moved since: a late duplicate ack sends nothing.
        a.step(AppendEntriesResponse(a.term, "c", "a", True, last))
        self.assertEqual([m for m in a.ready().messages if isinstance(m, AppendEntries)], [])
        # New entries carry the commit index along; the next commit is sent once more.
        a.propose(b"z")
        rd = a.ready()
        self.assertEqual(
            sorted((m.dst, len(m.entries), m.commit) for m in rd.messages if isinstance(m, AppendEntries)),
            [("b", 1, last), ("c", 1, last)],
        )

    def test_lost_commit_append_recovered_by_heartbeat(self) -> None:
        """The append that told a follower the commit index is lost: no other empty append
        is sent for the same commit index, and the next heartbeat carries it instead."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        c.stabilize()
        a, cc = c.nodes["a"], c.nodes["c"]
        a.propose(b"x")
        c.process("a")
        c.deliver(lambda m: m.dst in ("b", "c"))
        c.process_all()
        c.deliver(lambda m: m.dst == "a")
        c.process("a")
        self.assertEqual(a.commit_index, a.last_index)
        c.drop(lambda m: m.dst == "c" and isinstance(m, AppendEntries))
        c.stabilize()
        self.assertLess(cc.commit_index, a.commit_index)
        c.tick("a", a.options.heartbeat_tick)
        c.stabilize()
        self.assertEqual(cc.commit_index, a.commit_index)

    def test_stale_acks_while_probing(self) -> None:
        """A follower the leader went back to probing (after a rejection) whose older,
        cumulative success then arrives: the ack still counts (what a follower acknowledged
        in this term stays in its log), moves it back to replicating and commits; a stale
        rejection after that changes nothing; and the follower catches up."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        c.stabilize()
        a, b = c.nodes["a"], c.nodes["b"]
        before = a.last_index
        a.propose(b"x")
        a.propose(b"y")
        c.process("a")
        c.deliver(lambda m: m.dst == "b")
        c.process("b")
        acks = [m for m in c.queue if m.src == "b" and isinstance(m, AppendEntriesResponse)]
        self.assertEqual([(m.success, m.index) for m in acks], [(True, before + 2)])
        c.drop(lambda m: m.src == "b" or m.dst == "c")  # b's ack is late; c hears nothing
        progress = a._progress["b"]
        # A rejection of an append b never acknowledged puts b back to probing.
        a.step(AppendEntriesResponse(a.term, "b", "a", False, before + 1, before + 1, a.term))
        self.assertEqual(progress.state, _ProgressState.PROBE)
        self.assertEqual(progress.match, before)
        self.assertLess(a.commit_index, before + 2)
        # The late cumulative success: counted, replicating again, and (with a) a majority.
        a.step(acks[0])
        self.assertEqual((progress.state, progress.match), (_ProgressState.REPLICATE, before + 2))
        self.assertEqual(a.commit_index, before + 2)
        # A rejection older than that (of the append that carried x alone) is stale.
        a.step(AppendEntriesResponse(a.term, "b", "a", False, before, before, a.term))
        self.assertEqual((progress.state, progress.match), (_ProgressState.REPLICATE, before + 2))
        c.stabilize()
        self.assertEqual((b.last_index, b.commit_index), (a.last_index, a.commit_index))
        self.assertEqual(c.nodes["c"].commit_index, a.commit_index)

    def test_leader_hint(self) -> None:
        """Followers name the leader when refusing a proposal."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        self.assertEqual(c.nodes["b"].propose(b"x"), NotLeader("a"))


class ReadTests(SynchronousTestCase):
    """ReadIndex and lease reads."""

    def test_read_waits_for_noop_and_quorum(self) -> None:
        """A new leader serves reads only after its no-op commits and a quorum confirms it."""
        c = Cluster(["a", "b", "c"])
        a = c.nodes["a"]
        a.campaign()
        c.process_all()
        for _ in range(4):
            c.deliver(lambda m: not isinstance(m, AppendEntriesResponse))
            c.process_all()
        self.assertEqual(a.role, Role.LEADER)
        self.assertLess(a.commit_index, a.last_index)
        a.read_index(b"r1")
        c.process_all()
        self.assertEqual(c.read_states["a"], [])
        c.stabilize()
        c.tick("a")
        c.stabilize()
        [rs] = c.read_states["a"]
        self.assertEqual((rs.request_ctx, rs.index), (b"r1", a.commit_index))

    def test_isolated_leader_serves_no_reads(self) -> None:
        """A leader cut off from the quorum never confirms a read."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        c.isolate("a")
        c.nodes["a"].read_index(b"r")
        for _ in range(30):
            c.tick("a")
            c.deliver()
        self.assertEqual(c.read_states["a"], [])

    def test_follower_read(self) -> None:
        """A follower forwards the read to the leader and gets an index back."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        self.assertIsNone(c.nodes["b"].read_index(b"fr"))
        c.stabilize()
        c.tick("a")
        c.stabilize()
        [rs] = c.read_states["b"]
        self.assertEqual(rs.request_ctx, b"fr")
        self.assertEqual(rs.index, c.nodes["a"].commit_index)

    def test_no_leader_no_read(self) -> None:
        """Without a known leader a read is refused with no hint."""
        self.assertEqual(new_node().read_index(b"x"), NotLeader(None))

    def test_lease_read(self) -> None:
        """With lease_read the leader answers at once (no heartbeat round)."""
        c = Cluster(["a", "b", "c"], RaftOptions(lease_read=True))
        c.elect("a")
        c.nodes["a"].read_index(b"l")
        c.process("a")
        self.assertEqual(len(c.read_states["a"]), 1)


class TransferTests(SynchronousTestCase):
    """Leadership transfer."""

    def test_transfer(self) -> None:
        """TimeoutNow makes the target campaign at once and win."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        c.nodes["a"].transfer_leadership("c")
        c.stabilize()
        self.assertEqual(c.leader(), "c")

    def test_transfer_to_lagging_target_waits(self) -> None:
        """The leader first brings the target up to date; proposals wait meanwhile."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        c.isolate("c")
        c.nodes["a"].propose(b"x")
        c.stabilize()
        c.heal()
        a = c.nodes["a"]
        a.transfer_leadership("c")
        self.assertEqual(a.propose(b"y"), NotLeader("c"))
        c.stabilize()
        self.assertEqual(c.leader(), "c")
        self.assertEqual(c.nodes["c"].term_at(2), 1)

    def test_timeout_now_follows_the_commit_it_completes(self) -> None:
        """When the target's ack commits an entry, the commit index reaches the target before
        TimeoutNow does: a target whose removal that ack committed must not campaign."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        c.stabilize()
        a, b = c.nodes["a"], c.nodes["b"]
        c.cut |= {("a", "c"), ("c", "a")}  # only b's ack can complete the quorum
        index = a.propose_config_change(ConfigChange(ConfigChangeKind.REMOVE, "b"))
        c.process("a")
        a.transfer_leadership("b")
        c.process("a")
        c.deliver(lambda m: m.dst == "b")
        c.process("b")
        c.deliver(lambda m: m.dst == "a")
        c.process("a")
        self.assertEqual(a.commit_index, index)
        to_b = [m for m in c.queue if m.dst == "b"]
        first_timeout = next(i for i, m in enumerate(to_b) if isinstance(m, TimeoutNow))
        self.assertTrue(
            any(isinstance(m, AppendEntries) and m.commit >= index for m in to_b[:first_timeout]),
            [type(m).__name__ for m in to_b],
        )
        # b takes its messages one Ready at a time, as its driver would.
        for m in to_b:
            c.queue.remove(m)
            b.step(m)
            c.process("b")
        self.assertEqual(b.role, Role.FOLLOWER)
        self.assertEqual(b.term, a.term)
        self.assertEqual(a.role, Role.LEADER)

    def test_transfer_aborts(self) -> None:
        """A transfer that cannot happen is abandoned after an election timeout."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        c.isolate("c")
        a = c.nodes["a"]
        a.transfer_leadership("c")
        self.assertEqual(a.transferee, "c")
        for _ in range(12):
            c.tick("a")
            c.deliver()
            c.process_all()
        self.assertIsNone(a.transferee)
        self.assertEqual(a.role, Role.LEADER)
        self.assertIsInstance(a.propose(b"again"), int)


class MembershipTests(SynchronousTestCase):
    """One-at-a-time configuration changes."""

    def test_one_change_at_a_time(self) -> None:
        """A second change is refused while the first is unapplied."""
        c = Cluster(["a", "b", "c"])
        c.elect("a")
        a = c.nodes["a"]
        a.propose_config_change(ConfigChange(ConfigChangeKind.ADD_LEARNER, "d"))
        with self.assertRaises(ProposalRejected):
            a.propose_config_change(ConfigChange(ConfigChangeKind.REMOVE, "c"))
        c.stabilize()
        a.propose_config_change(ConfigChange(ConfigChangeKind.REMOVE, "c"))

    def test_new_leader_waits_for_own_term(self) -> None:
        """A new leader proposes no change before its no-op (own term) is applied."""
        c = Cluster(["a", "b", "c"])
        a = c.nodes["a"]
        a.campaign()
        c.process_all()
        for _ in range(4):
            c.deliver(lambda m: not isinstance(m, AppendEntriesResponse))
            c.process_all()
        self.assertEqual(a.role, Role.LEADER)
        with self.assertRaises(ProposalRejected):
            a.propose_config_change(ConfigChange(ConfigChangeKind.ADD_LEARNER, "d"))

    def test_no_campaign_with_unapplied_config(self) -> None:
        """A node with a committed but unapplied configuration change does not campaign."""
        conf_entry = Entry(1, 1, EntryKind.CONFIG, Configuration(frozenset({"a", "b"})).encode())
        node = new_node("a", hard_state=HardState(1, None, 1), entries=[conf_entry])
        self.assertFalse(node.promotable())
        drain(node)
        self.assertTrue(node.promotable())
        self.assertEqual(node.config.voters, {"a", "b"})

    def test_invalid_changes(self) -> None:
        """Changes that change nothing, or remove the last voter, are refused."""
        c = Cluster(["a"])
        c.elect("a")
        a = c.nodes["a"]
        for change in (
            ConfigChange(ConfigChangeKind.ADD_VOTER, "a"),
            ConfigChange(ConfigChangeKind.REMOVE, "zz"),
            ConfigChange(ConfigChangeKind.REMOVE, "a"),
        ):
            with self.assertRaises(ProposalRejected):
                a.propose_config_change(change)

    def test_config_replayed_on_restart(self) -> None:
        """Configuration entries up to ``applied`` are replayed over the stored configuration."""
        conf_entry = Entry(1, 1, EntryKind.CONFIG, Configuration(frozenset({"a", "d"})).encode())
        node = new_node(hard_state=HardState(1, None, 1), entries=[conf_entry], applied=1)
        self.assertEqual(node.config.voters, {"a", "d"})


class SnapshotTests(SynchronousTestCase):
    """Compaction."""

    def test_compact(self) -> None:
        """compact drops the log up to the snapshot and keeps what follows."""
        c = Cluster(["a"])
        c.elect("a")
        a = c.nodes["a"]
        for i in range(5):
            a.propose(b"%d" % i)
        c.stabilize()
        c.snapshot("a")
        self.assertEqual(a.snapshot_index, 6)
        self.assertIsNone(a.entry_at(6))
        a.propose(b"more")
        c.stabilize()
        self.assertEqual(a.commit_index, 7)

    def test_compact_past_applied_refused(self) -> None:
        """A snapshot cannot cover entries not yet applied."""
        node = new_node(entries=ents(1, 1), hard_state=HardState(1, None, 0))
        with self.assertRaises(ValueError):
            node.compact(Snapshot(SnapshotMeta(2, 1, CONF), b""))

    def test_restart_from_snapshot(self) -> None:
        """A node restored with a snapshot starts from its index."""
        snap = Snapshot(SnapshotMeta(10, 3, CONF), b"state")
        node = RaftNode(
            "a",
            RaftOptions(),
            hard_state=HardState(3, None, 10),
            snapshot=snap,
            entries=[Entry(3, 11, EntryKind.NORMAL, b"x")],
            config=Configuration(frozenset()),
            applied=10,
            rng=random.Random(0),
        )
        self.assertEqual((node.last_index, node.term_at(10), node.applied), (11, 3, 10))
        self.assertEqual(node.config, CONF)


class StorageModelTests(SynchronousTestCase):
    """The simulator's disk: unsynced writes are lost, torn records discarded."""

    def test_unsynced_lost_on_crash(self) -> None:
        """A crash keeps synced records and at most a prefix of the unsynced ones."""
        for seed in range(20):
            st_ = MemoryStorage()
            st_.write(HardState(1, "a", 0), ents(1), None)
            st_.sync()
            st_.write(HardState(1, "a", 2), [Entry(1, 2, EntryKind.NORMAL, b"2")], None)
            st_.crash(random.Random(seed))
            hs, _, entries = st_.load()
            self.assertGreaterEqual(len(entries), 1)
            if hs.commit == 2:
                self.assertEqual(len(entries), 2)


class SessionTests(SynchronousTestCase):
    """Exactly-once client sessions."""

    def test_duplicate_returns_cached(self) -> None:
        """A retried command is not executed again; its cached response comes back."""
        table = SessionTable()
        runs = []

        def execute() -> bytes:
            runs.append(1)
            return b"r%d" % len(runs)

        self.assertEqual(table.apply("c", 1, 10, execute), (b"r1", True))
        self.assertEqual(table.apply("c", 1, 11, execute), (b"r1", False))
        self.assertEqual(len(runs), 1)
        self.assertEqual(table.cached("c", 1), b"r1")

    def test_superseded_not_executed(self) -> None:
        """A command older than the client's latest is never executed."""
        table = SessionTable()
        table.apply("c", 2, 1, lambda: b"two")
        self.assertEqual(table.apply("c", 1, 2, lambda: b"one"), (SESSION_EXPIRED, False))

    def test_eviction_is_deterministic(self) -> None:
        """The least recently used session (by log index) is evicted."""
        table = SessionTable(max_sessions=2)
        table.apply("x", 1, 1, lambda: b"")
        table.apply("y", 1, 2, lambda: b"")
        table.apply("x", 2, 3, lambda: b"")
        table.apply("z", 1, 4, lambda: b"")
        self.assertIsNone(table.get("y"))
        self.assertIsNotNone(table.get("x"))

    def test_round_trip(self) -> None:
        """The table survives a snapshot."""
        table = SessionTable(5)
        table.apply("x", 3, 7, lambda: b"resp")
        copy = SessionTable.from_bytes(table.to_bytes())
        self.assertEqual(copy.cached("x", 3), b"resp")
        self.assertEqual(copy.max_sessions, 5)
        with self.assertRaises(ValueError):
            SessionTable.from_bytes(b"\x93garbage")
