# -*- test-case-name: tests.test_logs -*-
"""Log observers for the daemons: plain text or JSON lines on stdout.

twistd takes a log observer factory by name and calls it with no arguments
(`twisted.application.app.ServerOptions.opt_logger` resolves the name with `namedAny`;
`AppLogger.start` calls it and installs the result ahead of `--logfile`):

    twistd -n --logger dogfs.logs.json_observer dogfs-meta --config meta.toml

The cluster manager passes that option when a node's config says `log_format = "json"`, and
sends the daemon's stdout to its node directory's `twistd.log`. JSON lines are what log
shippers (journald, Loki, Elasticsearch) ingest without parsing rules.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, formatEvent, textFileLogObserver
from zope.interface import implementer

__all__ = ["text_observer", "json_observer", "json_line_observer", "JSON_OBSERVER"]

#: The value of twistd's --logger option that selects JSON lines.
JSON_OBSERVER = "dogfs.logs.json_observer"


def text_observer(stream: IO[str] | None = None) -> ILogObserver:
    """Twisted's usual text lines (`2026-01-01T00:00:00+0000 [system] text`) on stdout."""
    return textFileLogObserver(stream if stream is not None else sys.stdout)


def _json_line(event: dict[str, Any]) -> str:
    # Twisted's own jsonFileLogObserver frames records with a leading RS (\x1e) and dumps
    # its internal keys (log_logger, log_flattened, pickled failures); log shippers want
    # plain JSON lines with a readable message, so we write a small record of our own:
    # time, level, system, text, and the event's own fields (those not starting "log_").
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            text = f"{text}\n{failure.getTraceback()}"
        except Exception:  # a broken failure must not break logging
            pass
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": event.get("log_time"),
        "level": level.name if level is not None else None,
        "system": event.get("log_system") or event.get("log_namespace"),
        "text": text,
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in record and key != "format":
            record[key] = value
    return json.dumps(record, default=repr, ensure_ascii=False) + "\n"


@implementer(ILogObserver)
class _FlushingObserver:
    """Writes each event as one line and flushes, so a crash loses no line."""

    def __init__(self, stream: IO[str]) -> None:
        self._inner = FileLogObserver(stream, _json_line)
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        self._inner(event)
        flush = getattr(self._stream, "flush", None)
        if flush is not None:
            flush()


def json_line_observer(stream: IO[str]) -> ILogObserver:
    """One JSON object per line on `stream`, each with `text`, `level`, `time`, `system`."""
    return _FlushingObserver(stream)


def json_observer(stream: IO[str] | None = None) -> ILogObserver:
    """JSON lines on stdout: what `twistd --logger dogfs.logs.json_observer` installs."""
    return json_line_observer(stream if stream is not None else sys.stdout)
