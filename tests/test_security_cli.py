# -*- test-case-name: tests.test_security_cli -*-
"""Tests for `dogfs ca init`, `dogfs ca issue` and the argument checks of `dogfs admin revoke`."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import tempfile
import tomllib

from twisted.trial.unittest import SynchronousTestCase

from dogfs.cli.main import main
from dogfs.security.ca import load_ca


def dogfs(*argv: str) -> tuple[int, str, str]:
    """Run the dogfs command in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as e:
            return int(e.code or 0), out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


class CACommandTests(SynchronousTestCase):
    """The CA from the command line."""

    def setUp(self) -> None:
        self.home = tempfile.mkdtemp(prefix="dogfs-ca-cli-")
        self.addCleanup(shutil.rmtree, self.home, True)

    def test_init_once(self) -> None:
        """init creates HOME/ca with a private key; a second init refuses to replace it."""
        code, out, _ = dogfs("--home", self.home, "ca", "init")
        self.assertEqual(code, 0)
        key = os.path.join(self.home, "ca", "ca.key")
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        load_ca(os.path.join(self.home, "ca"))
        code, _, err = dogfs("--home", self.home, "ca", "init")
        self.assertEqual(code, 1)
        self.assertIn("already exists", err)

    def test_issue_writes_a_usable_identity(self) -> None:
        """issue writes cert, key, ca and a client.toml naming the cluster's metadata."""
        with open(os.path.join(self.home, "client.toml"), "w") as f:
            f.write('[client]\nmeta = ["127.0.0.1:7000", "127.0.0.1:7001"]\n')
        dogfs("--home", self.home, "ca", "init")
        code, out, err = dogfs("--home", self.home, "ca", "issue", "alice", "--role", "reader")
        self.assertEqual(code, 0, err)
        directory = os.path.join(self.home, "identities", "alice")
        self.assertEqual(sorted(os.listdir(directory)), ["ca.pem", "cert.pem", "client.toml", "key.pem"])
        with open(os.path.join(directory, "client.toml"), "rb") as f:
            config = tomllib.load(f)
        self.assertEqual(config["client"]["meta"], ["127.0.0.1:7000", "127.0.0.1:7001"])
        self.assertEqual(config["tls"]["cert"], os.path.join(directory, "cert.pem"))
        self.assertIn(f"--config {directory}/client.toml", out)

    def test_issue_refusals(self) -> None:
        """No CA, --host on a client role, a bad role or name: one sentence, nonzero status."""
        code, _, err = dogfs("--home", self.home, "ca", "issue", "bob", "--role", "user")
        self.assertEqual(code, 1)
        self.assertIn("dogfs ca init", err)
        dogfs("--home", self.home, "ca", "init")
        code, _, err = dogfs("--home", self.home, "ca", "issue", "bob", "--role", "user", "--host", "10.0.0.1")
        self.assertEqual(code, 2)
        code, _, err = dogfs("--home", self.home, "ca", "issue", "bob", "--role", "root")
        self.assertEqual(code, 2)
        code, _, err = dogfs("--home", self.home, "ca", "issue", "../evil", "--role", "user")
        self.assertEqual(code, 2)
        self.assertFalse(os.path.exists(os.path.join(self.home, "evil")))

    def test_revoke_serial_checked(self) -> None:
        """A serial that is not a number is a usage error before anything is contacted."""
        code, _, err = dogfs("--home", self.home, "admin", "revoke", "bob", "--serial", "zz")
        self.assertEqual(code, 2)
        self.assertIn("not a number", err)
