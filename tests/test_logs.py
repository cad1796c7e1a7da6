"""Tests for dogfs.logs: the daemons' text and JSON-lines log observers."""

from __future__ import annotations

import io
import json

from twisted.application.app import ServerOptions
from twisted.logger import ILogObserver, Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dogfs import logs


def _logger(observer: ILogObserver) -> Logger:
    return Logger(namespace="dogfs.test", observer=LogPublisher(observer))


class JSONObserverTests(SynchronousTestCase):
    def test_one_object_per_line(self) -> None:
        """Each event becomes one line holding one JSON object with its formatted text."""
        out = io.StringIO()
        log = _logger(logs.json_observer(out))
        log.info("chunk {node} alive", node="chunk-2")
        log.warn("second\nline")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = (json.loads(line) for line in lines)
        self.assertEqual(first["text"], "chunk chunk-2 alive")
        self.assertEqual(first["level"], "info")
        self.assertEqual(first["system"], "dogfs.test")
        self.assertEqual(first["node"], "chunk-2")
        self.assertIsInstance(first["time"], float)
        self.assertEqual(second["text"], "second\nline")
        self.assertEqual(second["level"], "warn")

    def test_failure_traceback_in_text(self) -> None:
        """A logged failure's traceback is part of the text, still on one line."""
        out = io.StringIO()
        log = _logger(logs.json_observer(out))
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("apply failed")
        (line,) = out.getvalue().splitlines()
        record = json.loads(line)
        self.assertIn("apply failed", record["text"])
        self.assertIn("ZeroDivisionError", record["text"])

    def test_unserializable_values(self) -> None:
        """Values JSON cannot hold are written as their repr, not dropped with an error."""
        out = io.StringIO()
        _logger(logs.json_observer(out)).info("x", thing=object())
        self.assertIn("<object object", json.loads(out.getvalue())["thing"])

    def test_is_an_observer(self) -> None:
        """Both factories return ILogObserver providers."""
        verifyObject(ILogObserver, logs.json_observer(io.StringIO()))
        verifyObject(ILogObserver, logs.text_observer(io.StringIO()))


class TextObserverTests(SynchronousTestCase):
    def test_text_line(self) -> None:
        """The text observer writes Twisted's usual line with the system and message."""
        out = io.StringIO()
        _logger(logs.text_observer(out)).info("hello {who}", who="world")
        self.assertIn("[dogfs.test#info] hello world", out.getvalue())


class TwistdOptionTests(SynchronousTestCase):
    def test_logger_option_resolves(self) -> None:
        """twistd's --logger takes our dotted name and resolves it to the factory it calls."""
        options = ServerOptions()
        options.parseOptions(["--logger", logs.JSON_OBSERVER])
        self.assertIs(options["logger"], logs.json_observer)
