# -*- test-case-name: tests.test_cluster_cli -*-
"""Entry point of the `dogfs` command.

A minimal main written by the cluster-manager helper so that `dogfs cluster ...` runs before
the client commands land; the integrator replaces it (keeping `cluster.register(sub)`, the
global options and the error handling below).
"""

from __future__ import annotations

import argparse
import os
import sys

from dogfs.cli import cluster
from dogfs.cli.output import INTERRUPTED, USAGE, CLIError, print_error
from dogfs.config import default_home


def build_parser() -> argparse.ArgumentParser:
    """The `dogfs` parser: global options, then one subparser per command group."""
    parser = argparse.ArgumentParser(prog="dogfs", description="DogFS command line.")
    parser.add_argument(
        "--home",
        default=None,
        metavar="DIR",
        help="the DogFS home (default $DOGFS_HOME, else ~/.dogfs)",
    )
    parser.add_argument(
        "--config", default=None, metavar="FILE", help="client config (default HOME/client.toml)"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    cluster.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the dogfs command line and exit with the command's status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.home = os.path.abspath(args.home or default_home())
    args.config = os.path.abspath(args.config or os.path.join(args.home, "client.toml"))
    try:
        code = args.func(args)
    except CLIError as e:
        print_error(e.message)
        code = e.exit_code
    except KeyboardInterrupt:
        print_error("interrupted")
        code = INTERRUPTED
    sys.exit(code if code is not None else USAGE)


if __name__ == "__main__":
    main()
