"""Coverage-guided fuzzing of one DogFS decoder with atheris (libFuzzer for Python).

    /tmp/fuzzvenv/bin/python fuzz/run.py TARGET [libFuzzer options...]

TARGET is one of fuzz/targets.py's TARGETS (frame, message, meta, raft). The corpus directory
fuzz/corpus/TARGET is read first and grows with the inputs that reach new code; a crashing
input is written to fuzz/crashes/ (see README.md).
"""

from __future__ import annotations

import os
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# atheris 2.3.0 miscompiles FrameDecoder.feed under Python 3.11 (its instrumented loop calls
# `self._need` on an int: see README.md), so dogfs.wire.frame is imported plain and its other
# functions are instrumented one by one; every other dogfs module is instrumented whole.
from dogfs.wire import frame  # noqa: E402

with atheris.instrument_imports(include=["dogfs"], exclude=["dogfs.wire.frame"]):
    import targets  # noqa: E402

_NOT_INSTRUMENTED = {"feed"}
for _name, _value in list(vars(frame.FrameDecoder).items()):
    if callable(_value) and _name not in _NOT_INSTRUMENTED and hasattr(_value, "__code__"):
        atheris.instrument_func(_value)
for _value in (frame.encode_frame,):
    atheris.instrument_func(_value)


def main() -> None:
    """Run libFuzzer on the chosen target with its corpus directory."""
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        raise SystemExit(f"usage: run.py {{{','.join(targets.TARGETS)}}} [libFuzzer options]")
    name = sys.argv[1]
    check = targets.TARGETS[name]
    corpus = os.path.join(HERE, "corpus", name)
    os.makedirs(corpus, exist_ok=True)
    crashes = os.path.join(HERE, "crashes", "")
    extra = sys.argv[2:]
    # Files or directories given: run (or fuzz from) those instead of the saved corpus.
    inputs = [] if any(not a.startswith("-") for a in extra) else [corpus]
    args = [sys.argv[0], *extra, f"-artifact_prefix={crashes}{name}-", *inputs]
    atheris.Setup(args, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
