"""Write seed inputs for each harness into fuzz/corpus/TARGET/ (deterministic).

    .venv/bin/python fuzz/seeds.py

Seeds are valid encodings of every wire message, metadata command and result, and Raft
message type (built by hypothesis from the classes' annotations, derandomized), plus frames
that carry them: coverage-guided fuzzing mutates from valid inputs far faster than from
nothing. Named ``seed-*``; inputs the fuzzer finds are named by their SHA-1.
"""

from __future__ import annotations

import hashlib
import os
import sys
import typing
from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import targets  # noqa: E402

from dogfs.meta import commands  # noqa: E402
from dogfs.raft import core as raft  # noqa: E402
from dogfs.wire import frame, messages  # noqa: E402

PER_CLASS = 4


def _examples(strategy: Any, count: int) -> list[Any]:
    found: list[Any] = []

    @settings(max_examples=count, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: Any) -> None:
        found.append(value)

    try:
        collect()
    except Exception as e:  # a class hypothesis cannot build from its annotations
        print(f"  skipped: {e.__class__.__name__}: {str(e)[:100]}", file=sys.stderr)
    return found[:count]


_REGISTERED: set[type] = set()


def _field_strategy(tp: Any) -> Any:
    if tp is int:
        # Indexes, terms, sizes: the decoders refuse negative ones, so seeds should not be.
        return st.integers(0, 1 << 40)
    if tp is Any:
        return st.none() | st.integers(0, 3) | st.text(max_size=4)
    for arg in typing.get_args(tp):
        _field_strategy(arg)
    if isinstance(tp, type) and attrs.has(tp) and tp not in _REGISTERED:
        _REGISTERED.add(tp)
        st.register_type_strategy(tp, st.deferred(lambda: _builds(tp)))
    return st.from_type(tp)


def _builds(cls: type) -> Any:
    # The modules use postponed annotations, which st.builds cannot read: resolve each field.
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    kwargs = {a.name: _field_strategy(hints[a.name]) for a in attrs.fields(cls) if a.init}
    return st.builds(cls, **kwargs)


def _write(target: str, name: str, data: bytes) -> None:
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    digest = hashlib.sha1(data).hexdigest()[:12]
    with open(os.path.join(folder, f"seed-{name}-{digest}"), "wb") as f:
        f.write(data)


def main() -> None:
    """Build and write every seed."""
    st.register_type_strategy(int, st.integers(0, 1 << 40))
    for type_id, cls in sorted(messages._REGISTRY.items()):
        index = targets.WIRE_TYPES.index(type_id)
        for msg in _examples(_builds(cls), PER_CLASS):
            try:
                header = messages.encode(msg)
            except (OverflowError, TypeError, ValueError):
                continue  # an integer msgpack cannot carry: not a valid seed
            _write("message", cls.__name__, bytes([index]) + header)
            payload = b"p" * 8
            prefix = frame.encode_frame(1, 0, type_id, 7, header, len(payload))
            _write("frame", cls.__name__, b"\x02\x10\x80" + prefix + header + payload)
    for cls in sorted(commands._TAGS, key=lambda c: c.__name__):
        for value in _examples(_builds(cls), PER_CLASS):
            try:
                try:
                    data = commands.encode_command(value)
                except TypeError:
                    data = commands.encode_result(value)
            except (OverflowError, TypeError, ValueError):
                continue
            _write("meta", cls.__name__, data)
    for cls in typing.get_args(raft.Message):
        for msg in _examples(_builds(cls), PER_CLASS):
            try:
                _write("raft", cls.__name__, raft.encode_message(msg))
            except (OverflowError, TypeError, ValueError):
                continue
    config = raft.Configuration(frozenset({"meta-1", "meta-2"}), frozenset({"meta-3"}))
    _write("raft", "Configuration", config.encode())


if __name__ == "__main__":
    main()
