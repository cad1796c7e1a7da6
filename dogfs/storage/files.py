"""Small files written so that a crash leaves the old version or the new one, never a torn one.

Depends on nothing else in DogFS.
"""

from __future__ import annotations

import errno
import os


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (a rename, a new or removed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str) -> None:
    """Create directory ``path`` and its missing parents durably: each directory created is
    followed by an fsync of its parent, since a new directory's entry is lost in a crash as
    easily as a new file's (and everything stored under it with it).

    @raise NotADirectoryError: ``path`` or one of its parents exists and is not a directory.
    """
    missing = []
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory) from None
            # Made by another process just now: its entry may not be durable yet either.
        fsync_dir(os.path.dirname(directory))


def owner_only(directory: str) -> None:
    """Make the files of the LMDB environment in ``directory`` readable by their owner alone,
    as a data directory holding secrets must be: an environment made by a release that left
    them to the umask is tightened when it is next opened."""
    for name in ("data.mdb", "lock.mdb"):
        try:
            os.chmod(os.path.join(directory, name), 0o600)
        except FileNotFoundError:
            pass


def replace_file(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` durably: a temporary file with ``mode``, fsync, rename,
    fsync of the directory."""
    temp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        # O_CREAT's mode is masked by the umask and ignored for an existing file: set it again.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
