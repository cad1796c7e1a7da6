# -*- test-case-name: tests.test_security_cli -*-
"""`dogfs admin revoke NAME [--serial N]` and `dogfs admin reinstate NAME`.

The revocation list lives in the replicated metadata (the `Revoke` / `Reinstate` commands), so
every metadata node enforces it and chunk servers learn it from their heartbeat replies. Both
commands need the admin role.
"""

from __future__ import annotations

import argparse
from typing import Any

from dogfs.cli import output


def register(admin_subparsers: Any) -> None:
    """Add the security administration commands."""
    for name, fn, help_ in (
        ("revoke", cmd_revoke, "refuse an identity's connections from now on and cut its open ones"),
        ("reinstate", cmd_reinstate, "undo a revocation"),
    ):
        p = admin_subparsers.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
        p.add_argument("name", help="the identity's name (its certificate's commonName)")
        p.add_argument(
            "--serial", default=None, metavar="N",
            help="only the certificate with this serial number (decimal, or hex with 0x)",
        )
        output.admin_options(p)
        p.set_defaults(func=fn)


def _serial(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        value = int(text, 16) if text.lower().startswith("0x") else int(text)
    except ValueError:
        raise output.CLIError(f"--serial {text!r} is not a number", output.USAGE) from None
    if value <= 0:
        raise output.CLIError("--serial must be positive", output.USAGE)
    return str(value)


def _run(args: argparse.Namespace, revoke: bool) -> int:
    from dogfs.cli.main import run_client
    from dogfs.meta import commands as c

    serial = _serial(args.serial)
    command = c.Revoke(args.name, serial) if revoke else c.Reinstate(args.name, serial)
    run_client(args, lambda client: client._command(command))
    what = {"identity": args.name, "serial": serial, "revoked": revoke}
    if args.json:
        output.print_json(what)
    else:
        verb = "revoked" if revoke else "reinstated"
        target = f"certificate {serial} of {args.name}" if serial else f"identity {args.name}"
        print(f"{verb} {target}")
    return output.OK


def cmd_revoke(args: argparse.Namespace) -> int:
    """dogfs admin revoke NAME"""
    return _run(args, True)


def cmd_reinstate(args: argparse.Namespace) -> int:
    """dogfs admin reinstate NAME"""
    return _run(args, False)
