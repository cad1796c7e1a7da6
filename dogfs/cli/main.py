# -*- test-case-name: tests.test_cli -*-
"""The `dogfs` command: `dogfs [--home DIR] [--config FILE] [--json] COMMAND ...`.

Exit status: 0 success; 1 the operation failed or its outcome is unknown (timeout, no
quorum, unreachable); 2 bad usage; 3 the path does not exist; 4 permission denied. Errors go
to stderr as one sentence.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat as stat_module
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from dogfs.cli import output
from dogfs.cli.output import CLIError

# Error codes of the client and metadata, mapped to exit statuses.
EXIT_CODES = {
    "not_found": output.NOT_FOUND,
    "unknown_chunk_server": output.NOT_FOUND,
    "permission_denied": output.PERMISSION,
    "invalid_path": output.USAGE,
    "invalid_argument": output.USAGE,
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as CLIError (exit 2, one sentence)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise CLIError(f"{message} (see '{self.prog} --help')", output.USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    from dogfs.cli import admin, bench, ca, cluster

    parser = ArgumentParser(
        prog="dogfs",
        description="DogFS: a distributed file system with erasure-coded chunk servers and Raft metadata.",
        epilog="Exit status: 0 ok, 1 failed or unknown outcome, 2 bad usage, 3 no such path, 4 permission denied.",
    )
    parser.add_argument("--home", metavar="DIR", help="cluster home directory (default: $DOGFS_HOME, else ~/.dogfs)")
    parser.add_argument("--config", metavar="FILE", help="client config file (default: HOME/client.toml)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True

    def client_command(name: str, help_: str, fn: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--timeout", type=output.seconds, default=None, metavar="SECONDS",
                       help="fail if the cluster cannot serve within this time (default: the config's, 30 s)")
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
        p.set_defaults(func=fn)
        return p

    p = client_command("put", "upload a local file (- for stdin) to PATH", cmd_put)
    p.add_argument("local", help="the local file, or - for stdin")
    p.add_argument("path", help="where to store it; into it under LOCAL's name if PATH is a directory or ends with /")
    p.add_argument("--ec", help="erasure-coding policy RS-K-M (default: inherited from the directory)")
    p = client_command("get", "download PATH to a local file (- for stdout)", cmd_get)
    p.add_argument("path", help="the file to download")
    p.add_argument("local", help="where to write it (into it if it is a directory), or - for stdout")
    p = client_command("ls", "list a directory", cmd_ls)
    p.add_argument("path", nargs="?", default="/")
    p = client_command("stat", "show a file's or directory's metadata and placement", cmd_stat)
    p.add_argument("path")
    p = client_command("rm", "delete a file or an empty directory", cmd_rm)
    p.add_argument("path")
    p.add_argument("-r", "--recursive", action="store_true", help="delete a directory and everything under it")
    p = client_command("mkdir", "create a directory", cmd_mkdir)
    p.add_argument("path")
    p.add_argument("-p", "--parents", action="store_true", help="create missing parents; no error if it exists")
    p.add_argument("--ec", help="erasure-coding policy RS-K-M for files created under it")
    p = client_command("mv", "rename or move a file or directory", cmd_mv)
    p.add_argument("src", help="what to move")
    p.add_argument("dst", help="its new path; into it under SRC's name if DST is a directory or ends with /")
    cluster.register(sub)
    admin.register(sub)
    ca.register(sub)
    bench.register(sub)
    return parser


# --- helpers --------------------------------------------------------------------------------


def client_config(args: argparse.Namespace) -> Any:
    """The client config named by --config (main() defaults it to HOME/client.toml)."""
    from dogfs.config import ConfigError, load_client

    path = args.config
    if not os.path.exists(path):
        raise CLIError(
            f"no client configuration at {path}: start a cluster with 'dogfs cluster up' or pass --config",
            output.FAILED,
        )
    try:
        return load_client(path)
    except ConfigError as e:
        raise CLIError(str(e), output.USAGE) from None


def run_client(args: argparse.Namespace, body: Callable[[Any], Any]) -> Any:
    """Run `body(client)` (returning a Deferred or coroutine) with a connected client."""
    from twisted.internet import defer

    from dogfs.client.api import DogFSClient, DogFSError

    config = client_config(args)

    def start(reactor: Any) -> Any:
        client = DogFSClient(reactor, config, timeout=args.timeout)

        async def go() -> Any:
            try:
                return await body(client)
            finally:
                await client.close()

        return defer.Deferred.fromCoroutine(go())

    try:
        return output.run_deferred(start, args.reactor())
    except DogFSError as e:
        raise CLIError(e.message, EXIT_CODES.get(e.code, output.FAILED)) from None


async def _into(client: Any, path: str, name: str) -> str:
    """``path`` as cp and mv read a destination: ``path/name`` when ``path`` is a directory
    (it exists as one, or ends with /), else ``path`` itself."""
    from dogfs.client.api import DogFSError
    from dogfs.meta import commands as c

    if path.endswith("/"):
        return path.rstrip("/") + "/" + name
    try:
        info = await client.stat(path)
    except DogFSError as e:
        if e.code in ("not_found", "not_a_directory", "invalid_path"):
            return path  # the command itself says what is wrong with it
        raise
    return path.rstrip("/") + "/" + name if isinstance(info, c.DirInfo) else path


async def _must_be_directory(client: Any, path: str) -> None:
    """A path written with a trailing / names a directory: refuse it when it is a file."""
    from dogfs.client.api import DogFSError
    from dogfs.meta import commands as c

    if path.endswith("/") and path.strip("/"):
        info = await client.stat(path)
        if not isinstance(info, c.DirInfo):
            raise DogFSError("not_a_directory", f"{path!r} ends with / but {path.rstrip('/')!r} is a file")


def _check_policy(ec: str | None) -> None:
    if ec is not None:
        from dogfs.codec.policy import ECPolicy, UnknownPolicy

        try:
            ECPolicy.parse(ec)
        except UnknownPolicy as e:
            raise CLIError(str(e), output.USAGE) from None


# --- commands ---------------------------------------------------------------------------------


def cmd_put(args: argparse.Namespace) -> int:
    """dogfs put LOCAL PATH"""
    _check_policy(args.ec)
    source: IO[bytes]
    if args.local == "-":
        source, total = sys.stdin.buffer, None
    else:
        try:
            source = open(args.local, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise CLIError(f"no such local file: {args.local}", output.NOT_FOUND) from None
        except IsADirectoryError:
            raise CLIError(f"{args.local} is a directory; put uploads one file", output.USAGE) from None
        except OSError as e:
            raise CLIError(f"cannot read {args.local}: {e.strerror}", output.FAILED) from None
        st = os.fstat(source.fileno())
        total = st.st_size if stat_module.S_ISREG(st.st_mode) else None
    bar = output.ProgressBar(total, f"put {args.path}")
    started = time.monotonic()

    async def put(client: Any) -> Any:
        from dogfs.client.api import DogFSError

        if args.local == "-":
            path = args.path
            if path.endswith("/"):
                raise DogFSError("invalid_path", f"{path!r} names a directory: give the name of the file to write from stdin")
        else:
            path = await _into(client, args.path, os.path.basename(args.local))
        return await client.put(path, source, args.ec, bar.update)

    try:
        info = run_client(args, put)
    finally:
        bar.finish()
        if source is not sys.stdin.buffer:
            source.close()
    if args.json:
        output.print_json(info.to_json())
    elif sys.stderr.isatty():
        elapsed = max(time.monotonic() - started, 1e-9)
        print(
            f"put {info.path}: {output.format_bytes(info.size)} as {info.ec} in "
            f"{elapsed:.2f}s ({output.format_bytes(info.size / elapsed)}/s)",
            file=sys.stderr,
        )
    return output.OK


def cmd_get(args: argparse.Namespace) -> int:
    """dogfs get PATH LOCAL: written to a temporary name, renamed on success."""
    from dogfs.client.api import unique_temp_name
    from dogfs.client.transfer import flush_fully

    if args.local == "-":
        sink = sys.stdout.buffer
        bar = output.ProgressBar(None, f"get {args.path}")
        try:
            run_client(args, lambda client: client.get(args.path, sink, bar.update))
        finally:
            bar.finish()
        try:
            # A buffered stdout left non-blocking by its parent may still hold the end.
            flush_fully(sink)
        except OSError as e:
            raise CLIError(f"cannot save {args.path}: {e.strerror or e}", output.FAILED) from None
        return output.OK
    target = args.local
    if os.path.isdir(target):
        target = os.path.join(target, os.path.basename(args.path.rstrip("/")) or "root")
    elif target.endswith(os.sep):
        raise CLIError(f"no such local directory: {target}", output.NOT_FOUND)
    temp = unique_temp_name(target)
    try:
        sink_file = open(temp, "xb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise CLIError(f"cannot write {target}: {e.strerror}", output.FAILED) from None
    bar = output.ProgressBar(None, f"get {args.path}")
    ok = False
    try:

        def on_info(info: Any) -> None:
            bar.total = info.size

        info = run_client(args, lambda client: client.get(args.path, sink_file, bar.update, on_info))
        try:
            sink_file.flush()
            os.fsync(sink_file.fileno())
            sink_file.close()
            os.replace(temp, target)
        except OSError as e:
            raise CLIError(f"cannot write {target}: {e.strerror or e}", output.FAILED) from None
        ok = True
    finally:
        bar.finish()
        if not ok:
            sink_file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
    if args.json:
        output.print_json({"path": args.path, "local": os.path.abspath(target), "size": info.size})
    return output.OK


def cmd_ls(args: argparse.Namespace) -> int:
    """dogfs ls PATH"""
    entries = run_client(args, lambda client: client.ls(args.path))
    if args.json:
        output.print_json({"path": args.path, "entries": [e.to_json() for e in entries]})
        return output.OK
    rows = [
        [
            "d" if e.type == "dir" else "-",
            output.format_bytes(e.size) if e.type == "file" else "-",
            e.ec,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime)) if e.mtime else "-",
            e.name + ("/" if e.type == "dir" else ""),
        ]
        for e in entries
    ]
    if rows:
        sys.stdout.write(output.format_table(["T", "SIZE", "EC", "MODIFIED", "NAME"], rows))
    return output.OK


def cmd_stat(args: argparse.Namespace) -> int:
    """dogfs stat PATH"""
    info = run_client(args, lambda client: client.stat(args.path))
    data = info.to_json()
    if args.json:
        output.print_json(data)
        return output.OK
    print(f"path: {data['path']}")
    print(f"type: {data['type']}")
    print(f"size: {data['size']} ({output.format_bytes(data['size'])})")
    print(f"ec: {data['ec']}")
    if data["type"] == "file":
        print(f"version: {data['version']}")
        for bg in data["block_groups"]:
            servers = ", ".join(f"{s['index']}:{s['chunk_server']}" for s in bg["shards"])
            print(f"block group {bg['id']}: {bg['size']} bytes on {servers}")
    return output.OK


def _done(args: argparse.Namespace, what: dict[str, Any]) -> int:
    if args.json:
        output.print_json(what)
    return output.OK


def cmd_rm(args: argparse.Namespace) -> int:
    """dogfs rm PATH"""
    async def rm(client: Any) -> Any:
        await _must_be_directory(client, args.path)
        return await client.rm(args.path, args.recursive)

    run_client(args, rm)
    return _done(args, {"removed": args.path})


def cmd_mkdir(args: argparse.Namespace) -> int:
    """dogfs mkdir PATH"""
    _check_policy(args.ec)
    info = run_client(args, lambda client: client.mkdir(args.path, args.parents, args.ec))
    return _done(args, info.to_json())


def cmd_mv(args: argparse.Namespace) -> int:
    """dogfs mv SRC DST"""
    async def mv(client: Any) -> str:
        await _must_be_directory(client, args.src)
        dst: str = await _into(client, args.dst, args.src.rstrip("/").rpartition("/")[2])
        await client.mv(args.src, dst)
        return dst

    dst = run_client(args, mv)
    return _done(args, {"moved": args.src, "to": dst})


def main(argv: list[str] | None = None, reactor: Callable[[], Any] | None = None) -> None:
    """Run the dogfs command line and exit with its status.

    `reactor` gives the reactor a command runs on, called only by commands that run one; by
    default the process's, from the entry point `dogfs.plugins.cli`.
    """
    from dogfs.codec.stripe import tune_malloc
    from dogfs.config import default_home

    if reactor is None:
        from dogfs.plugins.cli import installed_reactor as reactor
    tune_malloc()
    try:
        args = build_parser().parse_args(argv)
        args.home = os.path.abspath(args.home or default_home())
        args.config = os.path.abspath(args.config or os.path.join(args.home, "client.toml"))
        args.reactor = reactor
        code = args.func(args)
        sys.stdout.flush()
    except CLIError as e:
        output.print_error(e.message)
        code = e.exit_code
    except KeyboardInterrupt:
        output.print_error("interrupted")
        code = output.INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`dogfs cluster status | head -3`): nothing more reaches it.
        # Python's own flush at exit would fail on the same pipe; give it somewhere to write.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        code = output.FAILED
    raise SystemExit(code if code is not None else output.USAGE)


if __name__ == "__main__":
    main()
