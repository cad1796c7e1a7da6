# -*- test-case-name: tests.test_cli -*-
"""`dogfs admin meta ...`: metadata group membership (add, remove). Filled in with Raft."""

from __future__ import annotations

from typing import Any


def register(admin_subparsers: Any) -> None:
    """Add the metadata membership commands."""
