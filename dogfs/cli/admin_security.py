# -*- test-case-name: tests.test_cli -*-
"""`dogfs admin revoke ...` and other security operations. Filled in with issue 5."""

from __future__ import annotations

from typing import Any


def register(admin_subparsers: Any) -> None:
    """Add the security administration commands."""
