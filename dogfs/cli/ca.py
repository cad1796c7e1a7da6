# -*- test-case-name: tests.test_cli -*-
"""`dogfs ca init` and `dogfs ca issue NAME --role ROLE`. Filled in with issue 5."""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    """Add the `ca` command group."""
