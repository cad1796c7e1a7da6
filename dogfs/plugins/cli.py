"""The `dogfs` console script: the command line, run on the process's reactor.

Like the twistd plugins beside it, this entry point is where the process's (global) reactor
is taken; the command line gets it injected, and takes it only for a command that runs it
(local commands such as `dogfs ca` never do).
"""

from __future__ import annotations

from typing import Any


def installed_reactor() -> Any:
    """The process's reactor (installing the default one on first use)."""
    from twisted.internet import reactor

    return reactor


def main(argv: list[str] | None = None) -> None:
    """Run the dogfs command line on the process's reactor and exit with its status."""
    from dogfs.cli.main import main as run

    run(argv, reactor=installed_reactor)
