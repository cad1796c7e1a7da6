# -*- test-case-name: tests.test_codec -*-
"""Rebuilding lost data fragments with ISA-L directly, from the buffers they arrived in.

pyeclib's ``reconstruct`` is correct but costly on the read path: it takes only ``bytes`` (so
every received fragment is copied first), liberasurecode copies the fragments again into
aligned buffers, one call rebuilds one fragment (so two lost fragments pay all of that twice),
and the whole call holds the GIL. On a degraded read that made rebuilding cost several times
the Reed-Solomon arithmetic itself.

This module calls the ISA-L library that pyeclib ships (and that its ``isa_l_rs_cauchy``
backend uses) through ctypes: it builds the same Cauchy encoding matrix as that backend,
inverts the rows of the fragments at hand (``gf_invert_matrix``) and runs ``ec_encode_data``
over the received payloads in place, writing the lost ones into buffers the caller provides.
The arithmetic is ISA-L's own; only the choice of matrix rows is made here, and the tests
check every result against pyeclib byte for byte. ctypes releases the GIL during the calls.

When the library cannot be found, `IsalRebuilder.load` returns None and callers use pyeclib.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["IsalRebuilder"]

_Buffer = bytes | bytearray | memoryview

_library: Any = None
_library_lock = threading.Lock()
_NOT_FOUND = object()


def _find_library() -> Any:
    """The ISA-L shared library bundled with pyeclib, or None."""
    global _library
    with _library_lock:
        if _library is None:
            _library = _NOT_FOUND
            try:
                import pyeclib

                libs = os.path.join(os.path.dirname(os.path.dirname(pyeclib.__file__)), "pyeclib.libs")
                candidates = sorted(glob.glob(os.path.join(libs, "libisal*.so*")))
            except ImportError:
                candidates = []
            for path in [*candidates, "libisal.so.2"]:
                try:
                    lib = ctypes.CDLL(path)
                    functions = (lib.gf_gen_cauchy1_matrix, lib.gf_invert_matrix,
                                 lib.ec_init_tables, lib.ec_encode_data)
                except (OSError, AttributeError):
                    continue
                # isa-l/include/erasure_code.h
                bytes_p, p = ctypes.c_void_p, ctypes.c_int
                lib.gf_gen_cauchy1_matrix.argtypes = [bytes_p, p, p]
                lib.gf_invert_matrix.argtypes = [bytes_p, bytes_p, p]
                lib.ec_init_tables.argtypes = [p, p, bytes_p, bytes_p]
                lib.ec_encode_data.argtypes = [p, p, p, bytes_p, bytes_p, bytes_p]
                for f in functions:
                    f.restype = None
                lib.gf_invert_matrix.restype = ctypes.c_int
                _library = lib
                break
        return None if _library is _NOT_FOUND else _library


class IsalRebuilder:
    """Rebuilds data fragments of one (k, m) Cauchy Reed-Solomon code.

    Thread-safe: the tables it caches are immutable once built.
    """

    def __init__(self, lib: Any, k: int, m: int) -> None:
        self._lib = lib
        self.k = k
        self.m = m
        rows = k + m
        # The encoding matrix of liberasurecode's isa_l_rs_cauchy backend: identity on top,
        # then the Cauchy rows that make parity.
        self._matrix = (ctypes.c_ubyte * (rows * k))()
        lib.gf_gen_cauchy1_matrix(self._matrix, rows, k)
        self._tables: dict[tuple[tuple[int, ...], tuple[int, ...]], Any] = {}

    @classmethod
    def load(cls, k: int, m: int) -> IsalRebuilder | None:
        """A rebuilder for RS(k, m), or None when ISA-L is not available."""
        lib = _find_library()
        return None if lib is None else cls(lib, k, m)

    def _decode_tables(self, sources: tuple[int, ...], lost: tuple[int, ...]) -> Any:
        """ISA-L's tables that compute fragments ``lost`` from fragments ``sources``."""
        key = (sources, lost)
        tables = self._tables.get(key)
        if tables is not None:
            return tables
        k = self.k
        # Data = inverse(rows of the fragments we have) x those fragments.
        chosen = (ctypes.c_ubyte * (k * k))()
        for r, index in enumerate(sources):
            ctypes.memmove(ctypes.byref(chosen, r * k), ctypes.byref(self._matrix, index * k), k)
        inverse = (ctypes.c_ubyte * (k * k))()
        if self._lib.gf_invert_matrix(chosen, inverse, k) != 0:
            raise ValueError(f"fragments {list(sources)} do not determine the data")
        decode = (ctypes.c_ubyte * (k * len(lost)))()
        for r, index in enumerate(lost):
            ctypes.memmove(ctypes.byref(decode, r * k), ctypes.byref(inverse, index * k), k)
        tables = (ctypes.c_ubyte * (32 * k * len(lost)))()
        self._lib.ec_init_tables(k, len(lost), decode, tables)
        if len(self._tables) < 256:
            self._tables[key] = tables
        return tables

    def rebuild(
        self,
        payloads: Mapping[int, _Buffer],
        lost: Sequence[int],
        length: int,
        allocate: Callable[[int], bytearray] = bytearray,
    ) -> dict[int, bytearray]:
        """Compute the payloads of data fragments ``lost`` from those in ``payloads``.

        ``payloads`` maps fragment index to at least ``length`` bytes of that fragment's payload
        (after pyeclib's header); the first ``k`` indexes in order are used. Each result is a
        buffer from ``allocate(length)`` whose first ``length`` bytes are the rebuilt payload.
        """
        k = self.k
        wanted = tuple(sorted(set(lost)))
        if not wanted:
            return {}
        if any(not 0 <= i < k for i in wanted):
            raise ValueError(f"only data fragments are rebuilt here, not {list(wanted)}")
        sources = tuple(sorted(payloads)[:k])
        if len(sources) < k:
            raise ValueError(f"{k} fragments are needed, {len(sources)} given")
        if any(len(payloads[i]) < length for i in sources):
            raise ValueError(f"a fragment payload is shorter than {length} bytes")
        tables = self._decode_tables(sources, wanted)
        keep: list[Any] = []
        source_ptrs = (ctypes.c_void_p * k)(*(_address(payloads[i], keep) for i in sources))
        out = {i: allocate(length) for i in wanted}
        out_ptrs = (ctypes.c_void_p * len(wanted))(*(_address(out[i], keep) for i in wanted))
        self._lib.ec_encode_data(length, k, len(wanted), tables, source_ptrs, out_ptrs)
        del keep
        return out


def _address(buffer: _Buffer, keep: list[Any]) -> int:
    """The address of ``buffer``'s first byte; what must stay alive for it goes in ``keep``."""
    if isinstance(buffer, bytes):
        keep.append(buffer)
        return ctypes.cast(ctypes.c_char_p(buffer), ctypes.c_void_p).value or 0
    view = memoryview(buffer).cast("B")
    if view.readonly:
        # A view of bytes (small frames arrive that way): ctypes cannot point into it.
        copy = bytes(view)
        keep.append(copy)
        return ctypes.cast(ctypes.c_char_p(copy), ctypes.c_void_p).value or 0
    array = (ctypes.c_char * len(view)).from_buffer(view)
    keep.append(array)
    return ctypes.addressof(array)
