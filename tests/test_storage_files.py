# -*- test-case-name: tests.test_storage_files -*-
"""dogfs.storage.files: small files replaced durably."""

from __future__ import annotations

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from dogfs.storage.files import replace_file


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
