# -*- test-case-name: tests.test_meta_state -*-
"""Namespace paths: validation and normalisation of absolute, '/'-separated UTF-8 paths.

This module owns the one definition of a valid DogFS path; it imports nothing of ours, so
the client, the CLI and the metadata state machine all agree on what a path is.
"""

from __future__ import annotations

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255


class InvalidPath(ValueError):
    """A path that DogFS refuses; the message is one sentence naming the path."""


def _quote(path: str) -> str:
    """Render a path for an error message without letting NULs or surrogates garble it."""
    return repr(path)


def split(path: str) -> tuple[str, ...]:
    """Return the components of a valid absolute path; the root is the empty tuple.

    A single trailing slash is tolerated ("/a/" is "/a"). Raise L{InvalidPath} for a path
    that is not a string, not absolute, has empty, '.' or '..' components, contains a NUL,
    is not valid UTF-8 (lone surrogates), is longer than 4096 bytes or has a component longer
    than 255 bytes.
    """
    if not isinstance(path, str):
        raise InvalidPath(f"Path {path!r} is not a string.")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPath(f"Path {_quote(path)} is not valid UTF-8.") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise InvalidPath(
            f"Path {_quote(path[:64])}... is {len(encoded)} bytes long, more than the "
            f"{MAX_PATH_BYTES} allowed."
        )
    if "\x00" in path:
        raise InvalidPath(f"Path {_quote(path)} contains a NUL byte.")
    if not path.startswith("/"):
        raise InvalidPath(f"Path {_quote(path)} is not absolute (it must start with '/').")
    if path == "/":
        return ()
    body = path[1:-1] if path.endswith("/") else path[1:]
    parts = tuple(body.split("/"))
    # The usual path passes with three scans in C; only a refused one is walked in Python
    # (every member splits the path of every command it applies).
    if "" in parts or "." in parts or ".." in parts or len(encoded) > MAX_NAME_BYTES:
        for part in parts:
            if part == "":
                raise InvalidPath(f"Path {_quote(path)} has an empty component ('//').")
            if part in (".", ".."):
                raise InvalidPath(f"Path {_quote(path)} has a '{part}' component.")
            if len(part.encode("utf-8")) > MAX_NAME_BYTES:
                raise InvalidPath(
                    f"Path {_quote(path)} has a component longer than {MAX_NAME_BYTES} bytes."
                )
    return parts


def normalize(path: str) -> str:
    """Return the canonical form of a valid path (no trailing slash except for the root).

    Raise L{InvalidPath} when the path is not valid (see L{split}).
    """
    return join(split(path))


def join(parts: tuple[str, ...] | list[str]) -> str:
    """Build the canonical path of already-validated components."""
    return "/" + "/".join(parts)


def parent_and_name(path: str) -> tuple[str, str]:
    """Return (parent path, last component) of a valid non-root path.

    Raise L{InvalidPath} for the root, which has no parent, or for an invalid path.
    """
    parts = split(path)
    if not parts:
        raise InvalidPath("The root '/' has no parent.")
    return join(parts[:-1]), parts[-1]
