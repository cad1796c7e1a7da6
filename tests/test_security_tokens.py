# -*- test-case-name: tests.test_security_tokens -*-
"""Block tokens (dogfs.security.tokens): what a token binds, and what is not one."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from dogfs.security.tokens import BLOCK_KEY_HEX, block_token, valid_block_key, valid_block_token

KEY = "3c" * 32
OTHER_KEY = "c3" * 32


class BlockTokenTests(SynchronousTestCase):
    def test_a_token_binds_its_key_and_block_group(self) -> None:
        """A token is the same wherever it is computed, valid for its block group under its
        key only, and 32 hex digits."""
        token = block_token(KEY, 42)
        self.assertEqual(token, block_token(KEY, 42))
        self.assertEqual(len(token), 32)
        self.assertTrue(valid_block_token(KEY, 42, token))
        self.assertFalse(valid_block_token(KEY, 43, token))
        self.assertFalse(valid_block_token(OTHER_KEY, 42, token))
        self.assertNotEqual(block_token(KEY, 0), block_token(KEY, 1 << 63))

    def test_what_is_not_a_token(self) -> None:
        """None, other types, other lengths, a changed digit and block group ids out of range
        are refused, never raised on."""
        token = block_token(KEY, 7)
        changed = ("0" if token[0] != "0" else "1") + token[1:]
        # Not ASCII: compare_digest would raise TypeError on it (an internal error, logged
        # with a traceback per request, for any writer to provoke).
        for bad in (None, 7, b"x" * 32, "", token[:-1], token + "0", changed, token.upper(), "\u00e9" * 32):
            self.assertFalse(valid_block_token(KEY, 7, bad), repr(bad))
        self.assertFalse(valid_block_token(KEY, -1, token))
        self.assertFalse(valid_block_token(KEY, 1 << 64, token))

    def test_keys(self) -> None:
        """A block key is exactly 64 lower-case hex digits."""
        self.assertEqual(BLOCK_KEY_HEX, 64)
        self.assertTrue(valid_block_key(KEY))
        for bad in (None, b"3c" * 32, "", "3c" * 31, "3C" * 32, "zz" * 32, "3c" * 32 + "\n"):
            self.assertFalse(valid_block_key(bad), repr(bad))
