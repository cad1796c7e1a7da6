# -*- test-case-name: tests.test_cli -*-
"""`dogfs admin ...`: operations on a running cluster (membership, security, repair).

Each area registers its own subcommands here so that they can grow independently.
"""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    """Add the `admin` command group to the dogfs parser."""
    from dogfs.cli import admin_chunk, admin_meta, admin_security

    admin = subparsers.add_parser(
        "admin", help="operate a running cluster", description="Operate a running cluster."
    )
    admin_sub = admin.add_subparsers(dest="admin_command", metavar="ADMIN_COMMAND", parser_class=type(admin))
    admin_sub.required = True
    admin_meta.register(admin_sub)
    admin_chunk.register(admin_sub)
    admin_security.register(admin_sub)


