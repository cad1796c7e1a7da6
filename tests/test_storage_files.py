# -*- test-case-name: tests.test_storage_files -*-
"""dogfs.storage.files: small files replaced durably."""

from __future__ import annotations

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from dogfs.storage.files import make_dirs, replace_file


class ReplaceFileTests(SynchronousTestCase):
    def test_replaces_with_mode_and_leaves_no_temporary(self) -> None:
        """The new content replaces the old, with the mode asked for (whatever the umask or
        the old file's mode), and no temporary file is left beside it."""
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "client.toml")
        with open(path, "wb") as f:
            f.write(b"old and longer")
        os.chmod(path, 0o644)
        old_umask = os.umask(0o077)
        self.addCleanup(os.umask, old_umask)
        replace_file(path, b"new", 0o640)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"new")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)
        self.assertEqual(os.listdir(directory), ["client.toml"])


def record_fsyncs(case: SynchronousTestCase) -> list[tuple[int, int]]:
    """Patch os.fsync for ``case`` to record the (device, inode) of every file it syncs."""
    synced: list[tuple[int, int]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        real(fd)

    case.patch(os, "fsync", fsync)
    return synced


def identity(path: str) -> tuple[int, int]:
    """The (device, inode) of ``path``."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


class MakeDirsTests(SynchronousTestCase):
    def test_each_new_directory_is_made_durable(self) -> None:
        """Every directory created is followed by an fsync of its parent, from the outermost
        one created; directories that already exist cost nothing."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        synced = record_fsyncs(self)
        deep = os.path.join(base, "a", "b", "c")
        make_dirs(deep)
        self.assertTrue(os.path.isdir(deep))
        self.assertEqual(
            synced,
            [identity(base), identity(os.path.join(base, "a")), identity(os.path.join(base, "a", "b"))],
        )
        del synced[:]
        make_dirs(deep)
        make_dirs(os.path.join(base, "a"))
        self.assertEqual(synced, [])

    def test_a_file_in_the_way(self) -> None:
        """A file where a directory should be is NotADirectoryError naming it, whether it is
        the directory asked for or one of its parents."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        path = os.path.join(base, "shards")
        with open(path, "wb"):
            pass
        for target in (path, os.path.join(path, "00")):
            error = self.assertRaises(NotADirectoryError, make_dirs, target)
            self.assertEqual(error.filename, path)
