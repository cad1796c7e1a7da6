# -*- test-case-name: tests.test_config -*-
"""Tests for dogfs.config: the example files load, and bad files fail with clear sentences."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from dogfs import config

ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")


class ConfigTests(SynchronousTestCase):
    """Loading and validating configuration files."""

    def write(self, text: str) -> str:
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_examples_load(self) -> None:
        """The shipped etc/ examples are valid and carry their documented defaults."""
        meta = config.load_meta(os.path.join(ETC, "meta.toml"))
        self.assertEqual((meta.id, meta.address, meta.default_ec), ("meta-1", "127.0.0.1:7000", "RS-4-2"))
        self.assertEqual(dict(meta.peers), {"meta-1": "127.0.0.1:7000"})
        self.assertTrue(os.path.isabs(meta.data_dir))
        chunk = config.load_chunk(os.path.join(ETC, "chunk.toml"))
        self.assertEqual(chunk.meta, ("127.0.0.1:7000",))
        self.assertIsNone(chunk.tls)
        self.assertIsNone(chunk.direct_io)  # "auto"
        client = config.load_client(os.path.join(ETC, "client.toml"))
        self.assertEqual(client.timeout, 30.0)

    def test_missing_file(self) -> None:
        """A missing file names its path."""
        e = self.assertRaises(config.ConfigError, config.load_client, "/nonexistent/client.toml")
        self.assertIn("/nonexistent/client.toml does not exist", str(e))

    def test_bad_toml(self) -> None:
        """Invalid TOML is reported as such."""
        path = self.write("[client\n")
        self.assertIn("not valid TOML", str(self.assertRaises(config.ConfigError, config.load_client, path)))

    def test_wrong_type_names_key(self) -> None:
        """A value of the wrong type names the table, the key and the value."""
        path = self.write('[client]\nmeta = ["a:1"]\ntimeout = "soon"\n')
        e = self.assertRaises(config.ConfigError, config.load_client, path)
        self.assertIn("[client] timeout must be a float", str(e))

    def test_unknown_setting_refused(self) -> None:
        """A misspelt key or table is refused with the known ones named, instead of being
        ignored (its default silently used)."""
        path = self.write('[client]\nmeta = ["a:1"]\ntimout = 3\n')
        e = str(self.assertRaises(config.ConfigError, config.load_client, path))
        self.assertIn("[client] has no setting 'timout'", e)
        self.assertIn("known: meta, timeout", e)
        path = self.write('[client]\nmeta = ["a:1"]\n[tsl]\nca = "x"\n')
        e = str(self.assertRaises(config.ConfigError, config.load_client, path))
        self.assertIn("no table [tsl]", e)
        path = self.write('[raft]\nelection_tick = 5\n[meta]\nid = "m"\nlisten = "tcp:1"\naddress = "a:1"\ndata_dir = "d"\n')
        e = str(self.assertRaises(config.ConfigError, config.load_meta, path))
        self.assertIn("[raft] has no setting 'election_tick'", e)

    def test_required_key(self) -> None:
        """A missing required key is named."""
        path = self.write('[chunk]\nid = "c"\n')
        e = self.assertRaises(config.ConfigError, config.load_chunk, path)
        self.assertIn("[chunk] meta is required", str(e))

    def test_direct_io(self) -> None:
        """[chunk] direct_io is true, false or "auto" (None: where the disk allows it)."""
        base = '[chunk]\nid = "c"\nlisten = "tcp:1"\naddress = "a:1"\ndata_dir = "d"\nmeta = ["m:1"]\n'
        for text, expected in (("true", True), ("false", False), ('"auto"', None)):
            chunk = config.load_chunk(self.write(base + f"direct_io = {text}\n"))
            self.assertEqual(chunk.direct_io, expected)
        e = self.assertRaises(config.ConfigError, config.load_chunk, self.write(base + 'direct_io = "yes"\n'))
        self.assertIn('[chunk] direct_io must be true, false or "auto"', str(e))

    def test_non_positive(self) -> None:
        """Durations and sizes must be positive."""
        path = self.write('[client]\nmeta = ["a:1"]\ntimeout = 0\n')
        self.assertIn("must be positive", str(self.assertRaises(config.ConfigError, config.load_client, path)))
        # gc_grace is what keeps uploads in flight and reads of a replaced file safe from GC.
        chunk = '[chunk]\nid = "c"\nlisten = "tcp:1"\naddress = "a:1"\ndata_dir = "d"\nmeta = ["m:1"]\n'
        path = self.write(chunk + "gc_grace = -1e9\n")
        e = str(self.assertRaises(config.ConfigError, config.load_chunk, path))
        self.assertIn("gc_grace must be positive", e)

    def test_tls_paths_relative_to_file(self) -> None:
        """TLS paths resolve against the config file's directory."""
        path = self.write('[client]\nmeta = ["a:1"]\n[tls]\nca = "ca.pem"\ncert = "c.pem"\nkey = "k.pem"\n')
        tls = config.load_client(path).tls
        assert tls is not None
        self.assertEqual(tls.ca, os.path.join(os.path.dirname(os.path.abspath(path)), "ca.pem"))
        self.assertTrue(tls.sealed)

    def test_tls_sealed(self) -> None:
        """[tls] sealed = false keeps TLS records for every byte; it must be a boolean."""
        text = '[client]\nmeta = ["a:1"]\n[tls]\nca = "ca.pem"\ncert = "c.pem"\nkey = "k.pem"\n'
        tls = config.load_client(self.write(text + "sealed = false\n")).tls
        assert tls is not None
        self.assertFalse(tls.sealed)
        e = str(self.assertRaises(config.ConfigError, config.load_client, self.write(text + 'sealed = "no"\n')))
        self.assertIn("sealed", e)

    def test_bad_default_ec(self) -> None:
        """[meta] default_ec must be a policy the metadata can parse: a bad one is refused
        when the file is read, naming the file and the key, not by a traceback at start."""
        base = '[meta]\nid = "m"\nlisten = "tcp:1"\naddress = "a:1"\ndata_dir = "d"\n'
        self.assertEqual(config.load_meta(self.write(base + 'default_ec = "rs-6-3"\n')).default_ec, "rs-6-3")
        for bad in ('"RS-6"', '"RS-30-5"', '"mirror"'):
            path = self.write(base + f"default_ec = {bad}\n")
            e = str(self.assertRaises(config.ConfigError, config.load_meta, path))
            self.assertIn(f"{path}: [meta] default_ec is not a policy", e)
            self.assertIn(bad.strip('"'), e)

    def test_bad_endpoints(self) -> None:
        """Listen and http addresses are Twisted endpoint strings, parsed when the file is
        read: a bad one is one sentence naming the file, the key and the value."""
        meta = '[meta]\nid = "m"\naddress = "a:1"\ndata_dir = "d"\n'
        chunk = '[chunk]\nid = "c"\naddress = "a:1"\ndata_dir = "d"\nmeta = ["m:1"]\n'
        good = config.load_meta(self.write(meta + 'listen = "tcp:7000:interface=127.0.0.1"\nhttp = "unix:/tmp/d.sock"\n'))
        self.assertEqual((good.listen, good.http), ("tcp:7000:interface=127.0.0.1", "unix:/tmp/d.sock"))
        self.assertEqual(config.load_meta(self.write(meta + 'listen = "tcp:1"\nhttp = ""\n')).http, "")
        cases = [
            (config.load_meta, meta + 'listen = "127.0.0.1:7000"\n', "[meta] listen '127.0.0.1:7000'"),
            (config.load_meta, meta + 'listen = "tcp:abc"\n', "[meta] listen 'tcp:abc'"),
            (config.load_meta, meta + 'listen = "tcp:70000"\n', "port 70000 outside 0-65535"),
            (config.load_meta, meta + 'listen = "tcp:1"\nhttp = "htp:8080"\n', "[meta] http 'htp:8080'"),
            (config.load_chunk, chunk + 'listen = "bogus:1"\n', "[chunk] listen 'bogus:1'"),
            (config.load_chunk, chunk + 'listen = "tcp"\n', "[chunk] listen 'tcp'"),
        ]
        for load, text, expected in cases:
            path = self.write(text)
            e = str(self.assertRaises(config.ConfigError, load, path))
            self.assertIn(path, e)
            self.assertIn(expected, e)
            self.assertNotIn("\n", e)

    def test_tls_listen_is_plain(self) -> None:
        """With [tls], DogFS adds TLS itself: a listen address that names ssl: is refused."""
        text = (
            '[meta]\nid = "m"\nlisten = "ssl:7000"\naddress = "a:1"\ndata_dir = "d"\n'
            '[tls]\nca = "ca.pem"\ncert = "c.pem"\nkey = "k.pem"\n'
        )
        e = str(self.assertRaises(config.ConfigError, config.load_meta, self.write(text)))
        self.assertIn("[meta] listen 'ssl:7000' names a TLS endpoint", e)
