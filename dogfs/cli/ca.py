# -*- test-case-name: tests.test_security_cli -*-
"""`dogfs ca init` and `dogfs ca issue NAME --role ROLE`: the cluster CA from the command line.

`init` creates HOME/ca/ (ca.pem, ca.key mode 0600) and refuses to replace an existing CA.
`issue` signs a certificate for an identity and writes HOME/identities/NAME/ (cert.pem,
key.pem, ca.pem, client.toml) with the cluster's metadata addresses taken from
HOME/cluster.toml, else HOME/client.toml, else --meta.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from typing import Any

from dogfs.cli import output
from dogfs.cli.output import CLIError


def register(subparsers: Any) -> None:
    """Add the `ca` command group."""
    ca = subparsers.add_parser(
        "ca", help="the cluster certificate authority", description="The cluster CA: create it, issue identities."
    )
    sub = ca.add_subparsers(dest="ca_command", metavar="CA_COMMAND", parser_class=type(ca))
    sub.required = True
    p = sub.add_parser("init", help="create the cluster CA in HOME/ca", description="Create the cluster CA in HOME/ca.")
    p.add_argument("--force", action="store_true", help="replace an existing CA (invalidates every certificate)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser(
        "issue",
        help="issue an identity: HOME/identities/NAME/ with cert, key and client.toml",
        description="Issue a certificate for NAME with ROLE and write HOME/identities/NAME/.",
    )
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=["node", "admin", "user", "reader"])
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.add_argument(
        "--host", action="append", default=[], metavar="HOST",
        help="(node role) an address the node is dialled by; repeat for several",
    )
    p.add_argument(
        "--meta", action="append", default=[], metavar="HOST:PORT",
        help="metadata addresses for client.toml (default: from HOME/cluster.toml or client.toml)",
    )
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    p.set_defaults(func=cmd_issue)


def cmd_init(args: argparse.Namespace) -> int:
    """dogfs ca init"""
    from dogfs.security.ca import CAExists, init_ca

    ca_dir = os.path.join(args.home, "ca")
    try:
        ca = init_ca(ca_dir, force=args.force)
    except CAExists:
        raise CLIError(
            f"a CA already exists in {ca_dir}; a new one would invalidate every certificate it "
            "issued (pass --force to replace it anyway)",
            output.FAILED,
        ) from None
    except OSError as e:
        raise CLIError(f"cannot create the CA in {ca_dir}: {e.strerror}", output.FAILED) from None
    if args.json:
        output.print_json({"ca": ca.cert_path, "key": os.path.join(ca_dir, "ca.key")})
    else:
        print(f"created the cluster CA in {ca_dir} (keep ca.key secret)")
    return output.OK


def meta_addresses(home: str, config: str | None) -> list[str]:
    """The metadata addresses of the cluster in HOME (cluster.toml, else the client config)."""
    from dogfs.cli.cluster_layout import load_spec

    spec = load_spec(home)
    if spec is not None:
        return [n.address for n in spec.nodes if n.kind == "meta"]
    for path in (config, os.path.join(home, "client.toml")):
        if path and os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    meta = tomllib.load(f).get("client", {}).get("meta", [])
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise CLIError(f"cannot read {path}: {e}", output.FAILED) from None
            if isinstance(meta, list) and all(isinstance(a, str) for a in meta):
                return list(meta)
    return []


def cmd_issue(args: argparse.Namespace) -> int:
    """dogfs ca issue NAME --role ROLE"""
    from dogfs.security.ca import load_ca, write_identity_dir
    from dogfs.security.roles import Role

    ca_dir = os.path.join(args.home, "ca")
    try:
        ca = load_ca(ca_dir)
    except FileNotFoundError:
        raise CLIError(f"no CA in {ca_dir}: run 'dogfs ca init' first", output.FAILED) from None
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot load the CA in {ca_dir}: {e}", output.FAILED) from None
    role = Role(args.role)
    if args.host and role is not Role.NODE:
        raise CLIError("--host is for node certificates only", output.USAGE)
    if args.days <= 0:
        raise CLIError("--days must be positive", output.USAGE)
    meta = args.meta or meta_addresses(args.home, args.config)
    try:
        out_dir = write_identity_dir(ca, args.home, args.name, role, meta, hosts=args.host, days=args.days)
    except ValueError as e:
        raise CLIError(str(e), output.USAGE) from None
    except OSError as e:
        raise CLIError(f"cannot write the identity of {args.name}: {e.strerror}", output.FAILED) from None
    config = os.path.join(out_dir, "client.toml")
    if args.json:
        output.print_json({"name": args.name, "role": role.value, "dir": out_dir, "config": config})
    else:
        print(f"issued {args.name} (role {role.value}) in {out_dir}")
        print(f"use it with: dogfs --config {config} ls /")
        if not meta:
            print(f"note: no metadata addresses known; edit [client] meta in {config}")
    return output.OK
