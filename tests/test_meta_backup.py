# -*- test-case-name: tests.test_meta_backup -*-
"""Metadata backups (dogfs.meta.backup): the file, the metadata member's side, the restore of
a data directory, and the whole round trip on a real cluster."""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import msgpack
from twisted.trial.unittest import SynchronousTestCase

from dogfs.config import MetaConfig
from dogfs.meta import commands as c
from dogfs.meta.backup import (
    MAGIC,
    RESTORE_TERM_GAP,
    BackupError,
    BackupInfo,
    BackupWriter,
    read_backup,
    restore_data_dir,
)
from dogfs.meta.state import RESTORE_BG_GAP, NamespaceState
from dogfs.security.tokens import block_token, valid_block_token
from dogfs.wire import messages as m
from tests.test_meta_state import SERVERS, StateTestCase

KEY = "4b" * 32


def write_backup(path: str, data: bytes, index: int = 9, parts: int = 3) -> BackupInfo:
    """A backup of ``data`` at ``path``, arriving in ``parts`` pieces as from the wire."""
    info = BackupInfo(index, len(data), hashlib.sha256(data).hexdigest(), "cid-a", "meta-2", 1.5)
    writer = BackupWriter(path)
    step = max(1, len(data) // parts)
    for start in range(0, len(data), step):
        writer.write(memoryview(data)[start : start + step])
    writer.finish(info)
    return info


class BackupFileTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """What arrives in parts is read back whole with its trailer; the file is its
        owner's alone (it holds the block key) and no .partial is left."""
        path = os.path.join(self.mktemp(), "ns.bak")
        os.makedirs(os.path.dirname(path))
        data = os.urandom(10_000)
        info = write_backup(path, data)
        self.assertEqual(read_backup(path), (info, data))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(os.path.dirname(path)), ["ns.bak"])

    def test_damage_arriving_is_refused(self) -> None:
        """Bytes that do not match the member's size or checksum leave no file at all."""
        path = os.path.join(self.mktemp(), "ns.bak")
        os.makedirs(os.path.dirname(path))
        writer = BackupWriter(path)
        writer.write(b"abc")
        info = BackupInfo(1, 3, hashlib.sha256(b"abd").hexdigest(), None, "meta-1", 0.0)
        with self.assertRaises(BackupError) as raised:
            writer.finish(info)
        self.assertIn("arrived damaged", str(raised.exception))
        self.assertEqual(os.listdir(os.path.dirname(path)), [])

    def test_what_is_not_a_backup(self) -> None:
        """A changed byte, a cut file, another file, a missing one: each refused, named."""
        base = self.mktemp()
        os.makedirs(base)
        good = os.path.join(base, "good.bak")
        data = os.urandom(5_000)
        write_backup(good, data)
        raw = open(good, "rb").read()
        cases = {
            "flipped": (raw[:100] + bytes([raw[100] ^ 1]) + raw[101:], "damaged"),
            "cut": (raw[:-3], "not a DogFS metadata backup"),
            "headless": (raw[4000:], "namespace bytes"),
            "other": (b"hello, world\n" * 10, "not a DogFS metadata backup"),
            "tiny": (b"x", "too short"),
            "trailer": (raw[:5000] + b"\xc1" * 20 + len(b"\xc1" * 20).to_bytes(4, "big") + MAGIC, "trailer"),
        }
        for name, (content, expected) in cases.items():
            path = os.path.join(base, name)
            with open(path, "wb") as f:
                f.write(content)
            with self.assertRaises(BackupError, msg=name) as raised:
                read_backup(path)
            self.assertIn(expected, str(raised.exception), name)
            self.assertIn(path, str(raised.exception), name)
        with self.assertRaises(BackupError) as raised:
            read_backup(os.path.join(base, "missing"))
        self.assertIn("cannot read", str(raised.exception))


class RestoreTests(StateTestCase):
    """`restore_data_dir`: an empty data directory made to hold a backup."""

    def namespace(self) -> bytes:
        self.register(6)
        self.ok(c.SetClusterId("cid-a"))
        self.ok(c.SetBlockKey(KEY))
        self.upload("/f", [100])
        self.ok(c.Mkdir("/d"))
        return self.state.dump()

    def config(self, node: str = "meta-1", peers: int = 3) -> MetaConfig:
        return MetaConfig(
            id=node, listen="tcp:0", address="127.0.0.1:1", data_dir=self.mktemp(),
            peers={f"meta-{i}": f"127.0.0.1:{i}" for i in range(1, peers + 1)},
        )

    def test_restored_member(self) -> None:
        """A member's data directory gets the namespace and a Raft snapshot at the backup's
        index (its term 2^32 above the backup's, voters from its config) holding exactly that
        namespace; members restored from the same file agree byte for byte. Block group ids
        move on, and the key is gone (the first leader chooses a new one), so no token the
        old cluster gave out is valid."""
        from dogfs.meta.raftlog import NamespaceMachine
        from dogfs.raft.storage import LMDBRaftStorage

        data = self.namespace()
        info = BackupInfo(self.state.applied_index, len(data), hashlib.sha256(data).hexdigest(), "cid-a", "m", 0.0, 7)
        digests = []
        jumps: list[int] = []
        for node in ("meta-1", "meta-2"):
            config = self.config(node)
            restore_data_dir(config, info, data, map_size=1 << 26)
            state = NamespaceState(os.path.join(config.data_dir, "namespace"), map_size=1 << 26)
            state.open()
            self.addCleanup(state.close)
            self.assertEqual(state.applied_index, info.index)
            self.assertIsInstance(state.stat("/f"), c.FileInfo)
            self.assertEqual(state.cluster_id(), "cid-a")
            self.assertIsNone(state.block_key())
            digests.append(state.digest())
            # The next allocation: past every id the old cluster could have used since.
            self.index = info.index
            alloc = self.run_(c.Allocate("/g", "RS-2-1", SERVERS[:3], 2.0), state)
            self.assertGreater(alloc.bg_id, RESTORE_BG_GAP)
            self.assertIsNone(alloc.token)
            # The restored group's leader chooses a key: ids jump again, by a random amount
            # taken from it (the same on every member), once.
            self.run_(c.SetBlockKey(f"{node[-1]}0" + "e5" * 31), state)
            jumped = self.run_(c.Allocate("/g", "RS-2-1", SERVERS[:3], 2.0), state)
            self.assertGreaterEqual(jumped.bg_id - alloc.bg_id, 1 << 32)
            self.run_(c.SetBlockKey("77" * 32), state)
            after = self.run_(c.Allocate("/g", "RS-2-1", SERVERS[:3], 2.0), state)
            self.assertEqual(after.bg_id, jumped.bg_id + 1)
            jumps.append(jumped.bg_id)
            self.assertFalse(valid_block_token(state.block_key(), 2, block_token(KEY, 2)))
            storage = LMDBRaftStorage(os.path.join(config.data_dir, "raft", "log"))
            loaded = storage.load()
            snapshot = storage.snapshot_data()
            storage.close()
            assert loaded.snapshot is not None and snapshot is not None
            self.assertEqual((loaded.snapshot.index, loaded.snapshot.term), (info.index, 7 + RESTORE_TERM_GAP))
            self.assertEqual(loaded.hard_state.term, 7 + RESTORE_TERM_GAP)
            self.assertEqual(loaded.snapshot.config.voters, frozenset({"meta-1", "meta-2", "meta-3"}))
            self.assertEqual(loaded.hard_state.commit, info.index)
            # A member whose namespace is lost restores it from the snapshot: the same one.
            twin = self.make_state()
            from dogfs.meta.raftlog import MemberBook

            NamespaceMachine(twin, MemberBook(None, {})).restore(snapshot)
            self.assertIsNone(twin.block_key())
            self.assertIsInstance(twin.stat("/d"), c.DirInfo)
            self.assertEqual([n for n in os.listdir(config.data_dir) if n.endswith(".restoring")], [])
        self.assertEqual(digests[0], digests[1])
        # Two keys (two restores of one backup, say): two ranges of ids.
        self.assertGreater(abs(jumps[0] - jumps[1]), 1 << 32)

    def test_single_node(self) -> None:
        """A metadata node without Raft peers gets the namespace alone."""
        data = self.namespace()
        info = BackupInfo(self.state.applied_index, len(data), hashlib.sha256(data).hexdigest(), None, "m", 0.0)
        config = self.config(peers=1)
        restore_data_dir(config, info, data, map_size=1 << 26)
        self.assertEqual(sorted(os.listdir(config.data_dir)), ["namespace"])

    def test_refuses_a_data_directory_in_use(self) -> None:
        """Nothing is overwritten: a data directory holding a namespace or a Raft log is
        refused, naming it; so is a node its own config leaves out of the group, and a
        backup whose namespace does not load."""
        data = self.namespace()
        info = BackupInfo(self.state.applied_index, len(data), hashlib.sha256(data).hexdigest(), None, "m", 0.0)
        config = self.config()
        held = os.path.join(config.data_dir, "raft")
        os.makedirs(held)
        with open(os.path.join(held, "members.json"), "w") as f:
            f.write("{}")
        with self.assertRaises(BackupError) as raised:
            restore_data_dir(config, info, data, map_size=1 << 26)
        self.assertIn(held, str(raised.exception))
        self.assertEqual(os.listdir(held), ["members.json"])
        outsider = MetaConfig(id="meta-9", listen="tcp:0", address="127.0.0.1:9", data_dir=self.mktemp(),
                              peers={"meta-1": "127.0.0.1:1", "meta-2": "127.0.0.1:2"})
        with self.assertRaises(BackupError) as raised:
            restore_data_dir(outsider, info, data, map_size=1 << 26)
        self.assertIn("not among", str(raised.exception))
        empty = self.config()
        with self.assertRaises(BackupError) as raised:
            restore_data_dir(empty, info, b"\x93junk", map_size=1 << 26)
        self.assertIn("cannot be loaded", str(raised.exception))
        self.assertEqual(os.listdir(empty.data_dir), [])  # a failed restore leaves nothing

    def test_voters_given(self) -> None:
        """The voters may come from elsewhere than the config (a `dogfs cluster` home's
        metadata nodes): a node added at run time, absent from its own peers, is restored."""
        from dogfs.raft.storage import LMDBRaftStorage

        data = self.namespace()
        info = BackupInfo(self.state.applied_index, len(data), hashlib.sha256(data).hexdigest(), None, "m", 0.0)
        joined = MetaConfig(id="meta-4", listen="tcp:0", address="127.0.0.1:4", data_dir=self.mktemp(),
                            peers={"meta-1": "127.0.0.1:1"})
        voters = {"meta-1": "127.0.0.1:1", "meta-4": "127.0.0.1:4"}
        restore_data_dir(joined, info, data, map_size=1 << 26, voters=voters)
        storage = LMDBRaftStorage(os.path.join(joined.data_dir, "raft", "log"))
        loaded = storage.load()
        storage.close()
        assert loaded.snapshot is not None
        self.assertEqual(loaded.snapshot.config.voters, frozenset(voters))


class BackupQueryTests(SynchronousTestCase):
    """The metadata member's side: `MetaQuery("backup")`."""

    def test_streams_the_namespace(self) -> None:
        """After the read barrier the namespace comes in parts, each read (on the worker) only
        once the one before is sent, then its index, size and checksum; the parts are exactly
        a dump of the state, and the read transaction ends with the stream."""
        from twisted.internet import defer

        from dogfs.meta import service
        from tests.test_meta_service import Harness

        self.patch(service, "BACKUP_PART", 100)
        h = Harness(self)
        h.result(c.Mkdir("/a"))
        steps: list[int] = []
        ended = self.record_end(h)
        h.handlers.in_thread = lambda f: steps.append(len(steps)) or defer.maybeDeferred(f)
        parts: list[bytes] = []
        d = h.client.call(m.MetaQuery("backup", "", {}), on_part=lambda msg, payload: parts.append(bytes(payload)))
        h.pump.flush()
        reply = self.successResultOf(d)
        info = BackupInfo.from_dict(msgpack.unpackb(bytes(reply.payload), raw=False))
        data = b"".join(parts)
        self.assertGreater(len(parts), 2)
        self.assertEqual(len(steps), len(parts) + 1)  # one read per part, and the last finds the end
        self.assertLessEqual(max(map(len, parts)), 100)
        self.assertEqual((info.size, info.sha256), (len(data), hashlib.sha256(data).hexdigest()))
        self.assertEqual(info.index, h.state.applied_index)
        self.assertEqual(data, h.state.dump())
        self.assertEqual(ended, [True])
        self.assertEqual((h.handlers.dumping, h.handlers.backups), (set(), set()))

    def record_end(self, h: Any) -> list[bool]:
        """Note each time a backup's read transaction is ended."""
        ended: list[bool] = []
        real = h.state.dump_parts_at

        def dump_parts_at() -> Any:
            index, pieces, end = real()

            def noted() -> None:
                ended.append(True)
                end()

            return index, pieces, noted

        h.state.dump_parts_at = dump_parts_at
        return ended

    def hold_steps(self, h: Any) -> list[Any]:
        """Make each step of a backup (a part read on the worker) wait for its gate: a
        Deferred appended to the list returned, fired to let the step run."""
        from twisted.internet import defer

        gates: list[defer.Deferred[Any]] = []

        def held(f: Any) -> defer.Deferred[Any]:
            gate: defer.Deferred[Any] = defer.Deferred()
            gates.append(gate)
            return gate.addCallback(lambda _: f())

        h.handlers.in_thread = held
        return gates

    def test_one_at_a_time(self) -> None:
        """A second backup while one is being sent is refused as busy (each holds a read
        transaction open); once the first is sent, the next one is served."""
        from twisted.internet import defer

        from tests.test_meta_service import Harness

        h = Harness(self)
        gates = self.hold_steps(h)
        first = h.client.call(m.MetaQuery("backup", "", {}), on_part=lambda msg, payload: None)
        h.pump.flush()
        self.assertNoResult(first)
        error = h.error(m.MetaQuery("backup", "", {}))
        self.assertEqual(error.code, "busy")
        self.assertIn("already making a backup", error.message)
        # What MetaService.stopService waits for before it closes the namespace.
        (running,) = h.handlers.dumping
        self.assertNoResult(running)
        while not first.called:
            gates[-1].callback(None)
            h.pump.flush()
        self.successResultOf(first)
        self.successResultOf(running)
        h.handlers.in_thread = lambda f: defer.maybeDeferred(f)
        again = h.client.call(m.MetaQuery("backup", "", {}), on_part=lambda msg, payload: None)
        h.pump.flush()
        self.successResultOf(again)

    def test_slow_backup_stopped(self) -> None:
        """A backup still being sent after BACKUP_MAX_SECONDS is stopped with a clear error,
        and its read transaction ended."""
        from twisted.internet import defer

        from dogfs.meta import service
        from tests.test_meta_service import Harness

        self.patch(service, "BACKUP_PART", 100)
        h = Harness(self)
        ended = self.record_end(h)

        def slow(f: Any) -> defer.Deferred[Any]:
            h.clock.advance(service.BACKUP_MAX_SECONDS / 2)
            return defer.maybeDeferred(f)

        h.handlers.in_thread = slow
        parts: list[bytes] = []
        d = h.client.call(m.MetaQuery("backup", "", {}), on_part=lambda msg, payload: parts.append(bytes(payload)))
        h.pump.flush()
        error = self.failureResultOf(d).value
        self.assertEqual(error.code, "timeout")
        self.assertIn("faster link", error.message)
        self.assertEqual(len(parts), 3)  # sent at 0.5, 1 and 1.5 times the limit: stopped after the third
        self.assertEqual((ended, h.handlers.dumping), ([True], set()))

    def test_connection_lost_mid_stream(self) -> None:
        """A backup whose connection is lost (the client went away, or the node stopped and
        cut it) ends: its read transaction is ended and the member can make the next one."""

        from dogfs.meta import service
        from tests.test_meta_service import Harness

        self.patch(service, "BACKUP_PART", 100)
        h = Harness(self)
        ended = self.record_end(h)
        gates = self.hold_steps(h)
        parts: list[bytes] = []
        d = h.client.call(m.MetaQuery("backup", "", {}), on_part=lambda msg, payload: parts.append(bytes(payload)))
        h.pump.flush()
        gates[-1].callback(None)
        h.pump.flush()
        self.assertEqual(len(parts), 1)
        self.assertEqual(len(h.handlers.backups), 1)
        h.server.transport.abortConnection()
        h.pump.flush()
        gates[-1].callback(None)
        h.pump.flush()
        self.failureResultOf(d)
        self.assertEqual(ended, [True])
        self.assertEqual((h.handlers.dumping, h.handlers.backups), (set(), set()))

    def test_admins_only(self) -> None:
        """A backup holds the block key: anyone but an admin is refused."""
        from dogfs.wire.protocol import WireError
        from tests.test_meta_service import Harness

        h = Harness(self)
        asked: list[str] = []

        def authorize(request: Any, permission: str) -> None:
            asked.append(permission)
            if permission == "admin":
                raise WireError("permission_denied", "identity 'bob' (role user) may not run admin commands")

        h.handlers.authorize = authorize
        error = h.error(m.MetaQuery("backup", "", {}))
        self.assertEqual(error.code, "permission_denied")
        self.assertIn("admin", asked)


class BackupProcessTests(SynchronousTestCase):
    """A real 3-member cluster: backup, more writes, down, restore, up."""

    def test_backup_and_restore(self) -> None:
        """The restored cluster has what was acknowledged before the backup (file content
        included: the chunk servers kept the shards) and nothing written after it; it takes
        new files, on block group ids past the old cluster's. A restore over a data directory
        in use, or of a damaged backup, is refused and changes nothing."""
        from tests.test_meta_raft_process import RealCluster

        cluster = RealCluster(metas=3, chunks=3, ec="RS-2-1")
        self.addCleanup(cluster.destroy)
        cluster.up()
        local = os.path.join(cluster.home, "local")
        os.makedirs(local)
        before, after = os.path.join(local, "before"), os.path.join(local, "after")
        with open(before, "wb") as f:
            f.write(b"acknowledged before the backup\n" * 1000)
        with open(after, "wb") as f:
            f.write(b"written after the backup\n")
        cluster.run("mkdir", "/d")
        cluster.run("put", before, "/d/kept")
        backup = os.path.join(cluster.home, "ns.bak")
        out = json.loads(cluster.run("admin", "meta", "backup", backup, "--json").stdout)
        self.assertEqual(out["file"], backup)
        self.assertEqual(os.stat(backup).st_mode & 0o777, 0o600)
        cluster.run("put", after, "/d/later")
        cluster.run("mkdir", "/e")
        refused = cluster.run("admin", "meta", "restore", backup, "--local", check=False)
        self.assertEqual(refused.returncode, 1, refused.stderr)
        self.assertIn("stop the cluster first", refused.stderr)
        cluster.down()
        refused = cluster.run("admin", "meta", "restore", backup, "--local", check=False)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("already holds metadata", refused.stderr)
        for node in cluster.meta_ids():
            data_dir = os.path.join(cluster.home, "nodes", node, "data")
            os.rename(data_dir, data_dir + ".old")
        damaged = os.path.join(cluster.home, "damaged.bak")
        raw = open(backup, "rb").read()
        with open(damaged, "wb") as f:
            f.write(raw[:50] + bytes([raw[50] ^ 0xFF]) + raw[51:])
        refused = cluster.run("admin", "meta", "restore", damaged, "--local", check=False)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("damaged", refused.stderr)
        self.assertFalse(os.path.exists(os.path.join(cluster.home, "nodes", "meta-1", "data", "namespace")))
        cluster.run("admin", "meta", "restore", backup, "--local")
        cluster.up()
        terms = [n["term"] for n in cluster.nodes().values() if n.get("kind") == "meta"]
        self.assertTrue(terms and all(t > out["term"] + (1 << 32) for t in terms), terms)
        copy = os.path.join(local, "copy")
        cluster.run("get", "/d/kept", copy)
        self.assertEqual(open(copy, "rb").read(), open(before, "rb").read())
        missing = cluster.run("get", "/d/later", copy, check=False)
        self.assertEqual(missing.returncode, 3, missing.stderr)
        self.assertEqual(cluster.run("stat", "/e", check=False).returncode, 3)
        cluster.run("put", after, "/d/new")
        stat = json.loads(cluster.run("--json", "stat", "/d/new").stdout)
        self.assertGreater(stat["block_groups"][0]["id"], 1 << 32)
        cluster.run("get", "/d/new", copy)
        self.assertEqual(open(copy, "rb").read(), io.BytesIO(b"written after the backup\n").getvalue())


class SecretFilesTests(SynchronousTestCase):
    """The metadata's LMDB files hold the block key: their owner's alone, even when an
    earlier release made them readable by others."""

    def test_owner_only(self) -> None:
        from dogfs.raft.storage import LMDBRaftStorage

        root = self.mktemp()
        state = NamespaceState(os.path.join(root, "namespace"), map_size=1 << 24)
        state.open()
        state.close()
        storage = LMDBRaftStorage(os.path.join(root, "log"), map_size=1 << 24)
        storage.load()
        storage.close()
        for env in ("namespace", "log"):
            for name in ("data.mdb", "lock.mdb"):
                path = os.path.join(root, env, name)
                self.assertEqual(os.stat(path).st_mode & 0o777, 0o600, path)
                os.chmod(path, 0o644)
        state.open()
        state.close()
        storage.load()
        storage.close()
        for env in ("namespace", "log"):
            self.assertEqual(os.stat(os.path.join(root, env, "data.mdb")).st_mode & 0o777, 0o600)


class TLSBackupProcessTests(SynchronousTestCase):
    """Backup and restore on a cluster as `cluster up` makes it: TLS, identities, block tokens."""

    def test_restore_with_tls(self) -> None:
        """Only an admin may take a backup (a user is refused, and no file is left). After a
        restore the leader chooses a new block key, the chunk servers replace the one they
        kept with it, and uploads work under it. (The window before a server has it, where a
        refused token makes the server ask, is `BlockTokenTests.test_changed_key_is_asked_for`.)"""
        from tests import test_security_process
        from tests.test_security_process import Cluster

        cl = Cluster()
        self.addCleanup(cl.stop)
        cl.start()
        backup = os.path.join(cl.home, "ns.bak")
        user = cl.issue("bob", "user")
        refused = cl.run("admin", "meta", "backup", backup, config=user)
        self.assertEqual(refused.returncode, 4, refused.stderr)
        self.assertIn("admin", refused.stderr)
        self.assertFalse(os.path.exists(backup) or os.path.exists(backup + ".partial"))
        cl.ok("admin", "meta", "backup", backup)
        old_key = open(os.path.join(cl.home, "nodes", "chunk-1", "data", "block_key")).read()
        cl.run("cluster", "down", timeout=60)
        data_dir = os.path.join(cl.home, "nodes", "meta-1", "data")
        os.rename(data_dir, data_dir + ".old")
        cl.ok("admin", "meta", "restore", backup, "--local")
        cl.ok("cluster", "up", "--detach")
        cl.ok("put", __file__, "/after", "--timeout", "30")
        new_key = open(os.path.join(cl.home, "nodes", "chunk-1", "data", "block_key")).read()
        self.assertNotEqual(new_key, old_key)
        # /probe: what Cluster.start put, before the backup.
        for path, source in (("/probe", test_security_process.__file__), ("/after", __file__)):
            target = os.path.join(cl.home, "copy")
            cl.ok("get", path, target)
            with open(source, "rb") as a, open(target, "rb") as b:
                self.assertEqual(a.read(), b.read(), path)
