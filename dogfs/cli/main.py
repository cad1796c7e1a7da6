"""Entry point of the dogfs command (filled in by the CLI module)."""


def main() -> None:
    """Run the dogfs command line."""
    raise SystemExit("dogfs: not built yet")
