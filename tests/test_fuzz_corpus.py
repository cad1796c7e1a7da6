# -*- test-case-name: tests.test_fuzz_corpus -*-
"""The fuzzers' saved inputs, replayed through DogFS's decoders under plain Python.

fuzz/ holds coverage-guided harnesses (atheris, run by hand: fuzz/README.md) for the frame
decoder, every wire message, metadata commands and results, and Raft messages. Their corpora
(fuzz/corpus/TARGET/: the inputs that reached new code) are replayed here through the same
checks (fuzz/targets.py), so a change that makes a decoder crash, hang on, or mis-decode an
input the fuzzers once explored fails `make test` without atheris installed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

from twisted.trial.unittest import SynchronousTestCase

FUZZ = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz")


def _targets() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dogfs_fuzz_targets", os.path.join(FUZZ, "targets.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


targets = _targets()


def _inputs(folder: str) -> list[tuple[str, bytes]]:
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out.append((name, f.read()))
    return out


class CorpusTests(SynchronousTestCase):
    """Every saved input of every harness passes its check."""

    def _replay(self, target: str) -> None:
        check = targets.TARGETS[target]
        inputs = _inputs(os.path.join(FUZZ, "corpus", target))
        self.assertGreater(len(inputs), 10, f"fuzz/corpus/{target} is missing or nearly empty")
        for name, data in inputs:
            try:
                check(data)
            except Exception as e:
                self.fail(f"fuzz/corpus/{target}/{name}: {type(e).__name__}: {e}")

    def test_frame(self) -> None:
        """The frame decoder: only FrameError, the same frames however the bytes are split,
        within the limits, nothing buffered beyond what was fed."""
        self._replay("frame")

    def test_message(self) -> None:
        """Every wire message decoder: only MalformedMessage; accepted messages round-trip."""
        self._replay("message")

    def test_meta(self) -> None:
        """Metadata commands and results: only ValueError; accepted values round-trip."""
        self._replay("meta")

    def test_raft(self) -> None:
        """Raft messages and configurations: only ValueError; accepted values round-trip."""
        self._replay("raft")

    def test_checks_can_fail(self) -> None:
        """The checks are not vacuous: a decoder letting an undocumented exception out fails
        them, for the frame decoder and for a wire message."""

        def broken(*args: object) -> list[object]:
            raise KeyError("decoder bug")

        frame = next(data for _, data in _inputs(os.path.join(FUZZ, "corpus", "frame")))
        message = next(data for _, data in _inputs(os.path.join(FUZZ, "corpus", "message")))
        for owner, name, check, data in (
            (targets.frame.FrameDecoder, "feed", targets.check_frames, frame),
            (targets.messages, "decode", targets.check_message, message),
        ):
            original = getattr(owner, name)
            setattr(owner, name, broken)
            try:
                self.assertRaises(KeyError, check, data)
            finally:
                setattr(owner, name, original)
