# -*- test-case-name: tests.test_codec -*-
"""Reed-Solomon encoding and decoding one stripe at a time, with pyeclib's ISA-L backend.

A block group of a file is cut into stripes of ``k * cell_size`` bytes (the last may be
shorter); each stripe becomes ``k + m`` fragments, one per shard. Fragment ``i < k`` carries
bytes ``[i * p, (i + 1) * p)`` of the stripe (``p = ceil(len / k)``) after pyeclib's 80-byte
header, zero-padded at the end: that is what makes the no-decode read path
(L{StripeCodec.data_payload}) possible.

pyeclib holds the GIL for a whole call, so nothing here encodes more than one stripe per call:
with 1 MiB cells a call takes about 1-3 ms and the caller's reactor (or other threads) keeps
running between calls. pyeclib also aborts the process on some malformed inputs (a memoryview
instead of bytes, a fragment shorter than its header), so every public method checks its
arguments before they reach C.

Backend: ``isa_l_rs_cauchy``. It is MDS for every (k, m), unlike ``isa_l_rs_vand``, and was the
faster of the two here (see ``bench/codec.py``). ``liberasurecode_rs_vand`` is ~20x slower and
never used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

from attrs import frozen
from pyeclib.ec_iface import (
    ECDriver,
    ECDriverError,
    ECInsufficientFragments,
)

from dogfs.codec.isal import IsalRebuilder
from dogfs.codec.policy import ECPolicy

__all__ = [
    "DEFAULT_CELL_SIZE",
    "EC_TYPE",
    "FRAGMENT_HEADER_SIZE",
    "BadFragment",
    "CellSlice",
    "NotEnoughFragments",
    "StripeCodec",
    "tune_malloc",
]

#: The pyeclib backend every DogFS fragment is encoded with.
EC_TYPE = "isa_l_rs_cauchy"

#: Default cell: 1 MiB keeps one pyeclib call around a millisecond or two.
DEFAULT_CELL_SIZE = 1 << 20

#: Size of liberasurecode's per-fragment header (``fragment_header_t``: 59 bytes of metadata,
#: magic, library version, metadata checksum, padding).
FRAGMENT_HEADER_SIZE = 80

# The leading fields of ``fragment_metadata_t`` (packed, little-endian on x86/arm):
# idx u32, payload size u32, backend metadata size u32, original data size u64.
_HEADER = struct.Struct("<IIIQ")

#: The largest cell accepted; a fragment's payload size is a u32 in pyeclib's header.
MAX_CELL_SIZE = 1 << 30


class NotEnoughFragments(Exception):
    """Fewer than ``k`` usable fragments of a stripe were given."""

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(
            f"cannot decode the stripe: {needed} fragments are needed, "
            f"only {available} {'is' if available == 1 else 'are'} available"
        )
        self.needed = needed
        self.available = available


class BadFragment(ValueError):
    """A fragment that is not a well-formed fragment of this codec's stripes."""


@frozen
class CellSlice:
    """Bytes ``[start, stop)`` of the user data in data fragment ``index`` of stripe ``stripe``.

    Stripe ``s`` of a block group is cell ``s`` of every shard, so this names the cell to read
    from shard ``index`` and the part of its L{StripeCodec.data_payload} to keep.
    """

    stripe: int
    index: int
    start: int
    stop: int


_drivers: dict[tuple[int, int], ECDriver] = {}
_drivers_lock = threading.Lock()


def _driver(policy: ECPolicy) -> ECDriver:
    """Return the shared pyeclib driver for ``policy``; creating one costs a matrix setup."""
    key = (policy.k, policy.m)
    driver = _drivers.get(key)
    if driver is None:
        with _drivers_lock:
            driver = _drivers.get(key)
            if driver is None:
                driver = ECDriver(k=policy.k, m=policy.m, ec_type=EC_TYPE)
                _drivers[key] = driver
    return driver


_rebuilders: dict[tuple[int, int], IsalRebuilder | None] = {}


def _rebuilder(policy: ECPolicy) -> IsalRebuilder | None:
    """The shared ISA-L rebuilder for ``policy`` (None without ISA-L: pyeclib does it)."""
    key = (policy.k, policy.m)
    with _drivers_lock:
        if key not in _rebuilders:
            _rebuilders[key] = IsalRebuilder.load(policy.k, policy.m)
        return _rebuilders[key]


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """pyeclib accepts only ``bytes`` (and aborts the process on anything else)."""
    if type(data) is bytes:
        return data
    return bytes(data)


class StripeCodec:
    """Encode and decode the stripes of one policy and cell size.

    Thread-safe: it keeps no per-call state, and the pyeclib driver it shares is used under
    the GIL.
    """

    def __init__(self, policy: ECPolicy, cell_size: int = DEFAULT_CELL_SIZE) -> None:
        if not isinstance(cell_size, int) or not 1 <= cell_size <= MAX_CELL_SIZE:
            raise ValueError(
                f"cell size {cell_size!r} is out of range; expected 1 to {MAX_CELL_SIZE} bytes"
            )
        self.policy = policy
        self.k = policy.k
        self.m = policy.m
        self.width = policy.width
        self.cell_size = cell_size
        #: Bytes of user data in a full stripe: ``k * cell_size``.
        self.stripe_size = policy.k * cell_size
        self.header_size = FRAGMENT_HEADER_SIZE
        self._driver = _driver(policy)
        self._rebuilder = _rebuilder(policy)

    def __repr__(self) -> str:
        return f"<StripeCodec {self.policy.name} cell={self.cell_size}>"

    def __reduce__(self) -> tuple[type[StripeCodec], tuple[ECPolicy, int]]:
        """Pickle as (policy, cell size), so a codec can be sent to a worker process."""
        return (StripeCodec, (self.policy, self.cell_size))

    # -- sizes ---------------------------------------------------------------------------

    def _check_stripe_len(self, stripe_len: int) -> None:
        if not 0 < stripe_len <= self.stripe_size:
            raise ValueError(
                f"stripe length {stripe_len} is out of range; expected 1 to "
                f"{self.stripe_size} bytes for {self.policy.name} with {self.cell_size}-byte cells"
            )

    def payload_size(self, stripe_len: int) -> int:
        """Bytes after the header in each fragment of a stripe of ``stripe_len`` bytes."""
        self._check_stripe_len(stripe_len)
        return -(-stripe_len // self.k)

    def fragment_size(self, stripe_len: int) -> int:
        """Size of every fragment (header included) of a stripe of ``stripe_len`` bytes."""
        return FRAGMENT_HEADER_SIZE + self.payload_size(stripe_len)

    def data_lengths(self, stripe_len: int) -> list[int]:
        """How many user bytes each of the ``k`` data fragments of such a stripe carries.

        They sum to ``stripe_len``; for a short last stripe the trailing data fragments hold
        fewer bytes (or none) and the rest of their payload is zero padding.
        """
        payload = self.payload_size(stripe_len)
        return [max(0, min(payload, stripe_len - i * payload)) for i in range(self.k)]

    def stripe_lengths(self, group_size: int) -> list[int]:
        """The lengths of the stripes of a block group of ``group_size`` bytes, in order.

        Every stripe is ``stripe_size`` bytes but the last, which holds the remainder.
        """
        if group_size < 0:
            raise ValueError(f"block group size {group_size} is negative")
        full, rest = divmod(group_size, self.stripe_size)
        lengths = [self.stripe_size] * full
        if rest:
            lengths.append(rest)
        return lengths

    def stripes(self, group: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """Cut a block group's bytes into its stripes (views, no copies)."""
        view = memoryview(group).cast("B")
        offset = 0
        for length in self.stripe_lengths(len(view)):
            yield view[offset : offset + length]
            offset += length

    def plan_read(self, group_size: int, offset: int, length: int) -> list[CellSlice]:
        """Which data-fragment bytes make up ``[offset, offset + length)`` of a block group.

        Concatenating C{data_payload(fragment)[start:stop]} for each slice, in order, gives
        exactly the requested bytes; a read never needs more than these cells when every data
        shard answers.
        """
        end = offset + length
        if offset < 0 or length < 0 or end > group_size:
            raise ValueError(
                f"range of {length} bytes at {offset} is outside a {group_size}-byte block group"
            )
        slices = []
        position = offset
        while position < end:
            stripe = position // self.stripe_size
            base = stripe * self.stripe_size
            stripe_len = min(self.stripe_size, group_size - base)
            payload = -(-stripe_len // self.k)
            index = (position - base) // payload
            first = base + index * payload
            stop = min(payload, end - first)
            slices.append(CellSlice(stripe, index, position - first, stop))
            position = first + stop
        return slices

    # -- fragment headers ----------------------------------------------------------------

    def fragment_info(self, fragment: bytes | bytearray | memoryview) -> tuple[int, int]:
        """Return ``(index, stripe_len)`` read from a fragment's header, after sanity checks.

        This does not prove the fragment intact: verify its CRC first.

        @raise BadFragment: the header does not describe a fragment of this codec.
        """
        size = len(fragment)
        if size <= FRAGMENT_HEADER_SIZE:
            raise BadFragment(
                f"fragment of {size} bytes is too short; a fragment has an "
                f"{FRAGMENT_HEADER_SIZE}-byte header and at least one byte of payload"
            )
        index, payload, _backend, stripe_len = _HEADER.unpack_from(fragment, 0)
        if index >= self.width:
            raise BadFragment(
                f"fragment index {index} is out of range for {self.policy.name}"
            )
        if not 0 < stripe_len <= self.stripe_size or payload != -(-stripe_len // self.k):
            raise BadFragment(
                f"fragment header claims a {stripe_len}-byte stripe with {payload}-byte "
                f"payloads, which {self.policy.name} with {self.cell_size}-byte cells never makes"
            )
        if payload != size - FRAGMENT_HEADER_SIZE:
            raise BadFragment(
                f"fragment is {size} bytes but its header says "
                f"{payload + FRAGMENT_HEADER_SIZE}"
            )
        return index, stripe_len

    # -- coding --------------------------------------------------------------------------

    def encode(self, stripe: bytes | bytearray | memoryview) -> list[bytes]:
        """Encode one stripe (1 to ``stripe_size`` bytes) into ``k + m`` fragments.

        Fragment ``i`` goes to shard ``i``; the first ``k`` are data fragments.
        """
        self._check_stripe_len(len(stripe))
        fragments: list[bytes] = self._driver.encode(_as_bytes(stripe))
        return fragments

    def data_payload(self, fragment: bytes | bytearray | memoryview) -> memoryview:
        """The user bytes a data fragment (index < k) carries, without header or padding.

        Concatenating the payloads of data fragments ``0 .. k-1`` of a stripe gives the stripe
        back exactly: the read path's no-decode fast path. No copy is made.

        @raise BadFragment: not a data fragment, or a malformed header.
        """
        index, stripe_len = self.fragment_info(fragment)
        if index >= self.k:
            raise BadFragment(
                f"fragment {index} is a parity fragment of {self.policy.name}; "
                f"only fragments 0 to {self.k - 1} carry user data"
            )
        payload = -(-stripe_len // self.k)
        length = max(0, min(payload, stripe_len - index * payload))
        view = memoryview(fragment)
        return view[FRAGMENT_HEADER_SIZE : FRAGMENT_HEADER_SIZE + length]

    def _checked(
        self, fragments: Mapping[int, bytes | bytearray | memoryview]
    ) -> tuple[dict[int, bytes | bytearray | memoryview], int]:
        """Validate the fragments of one stripe; return them with the stripe's length."""
        usable: dict[int, bytes | bytearray | memoryview] = {}
        stripe_len = -1
        size = -1
        for key, fragment in fragments.items():
            index, length = self.fragment_info(fragment)
            if index != key:
                raise BadFragment(f"fragment given as index {key} says it is fragment {index}")
            if stripe_len == -1:
                stripe_len, size = length, len(fragment)
            elif length != stripe_len or len(fragment) != size:
                raise BadFragment(
                    f"fragment {index} belongs to a {length}-byte stripe, fragment "
                    f"{next(iter(usable))} to a {stripe_len}-byte one"
                )
            usable[index] = fragment
        return usable, stripe_len

    def decode(self, fragments: Mapping[int, bytes | bytearray | memoryview]) -> bytes:
        """Rebuild a stripe's bytes (exact original length) from at least ``k`` of its fragments.

        ``fragments`` maps fragment index to fragment. The fragments must be intact (checked
        against their CRC): Reed-Solomon cannot tell a corrupt payload from a good one.

        @raise NotEnoughFragments: fewer than ``k`` were given.
        @raise BadFragment: a fragment is malformed or from another stripe.
        """
        if len(fragments) < self.k:
            raise NotEnoughFragments(self.k, len(fragments))
        usable, stripe_len = self._checked(fragments)
        if all(i in usable for i in range(self.k)):
            # Every data fragment is here: join their payloads, no Reed-Solomon needed.
            return b"".join(self.data_payload(usable[i]) for i in range(self.k))
        # Exactly k fragments, data ones first: liberasurecode decodes least work that way.
        chosen = sorted(usable)[: self.k]
        try:
            data: bytes = self._driver.decode([_as_bytes(usable[i]) for i in chosen])
        except ECInsufficientFragments as e:
            raise NotEnoughFragments(self.k, len(usable)) from e
        except ECDriverError as e:
            raise BadFragment(f"pyeclib refused the fragments: {e}") from e
        if len(data) != stripe_len:
            raise BadFragment(f"decoded {len(data)} bytes where the headers say {stripe_len}")
        return data

    def reconstruct(
        self,
        fragments: Mapping[int, bytes | bytearray | memoryview],
        missing: Sequence[int],
    ) -> dict[int, bytes]:
        """Rebuild the fragments at indexes ``missing`` from at least ``k`` others (repair).

        The rebuilt fragments are byte-identical to the ones the encoder made.

        @raise NotEnoughFragments: fewer than ``k`` were given.
        """
        wanted = sorted(set(missing))
        for index in wanted:
            if not 0 <= index < self.width:
                raise ValueError(f"fragment index {index} is out of range for {self.policy.name}")
        if len(fragments) < self.k:
            raise NotEnoughFragments(self.k, len(fragments))
        usable, _ = self._checked(fragments)
        result: dict[int, bytes] = {}
        todo = []
        for index in wanted:
            if index in usable:
                result[index] = _as_bytes(usable[index])
            else:
                todo.append(index)
        if not todo:
            return result
        chosen = sorted(usable)[: self.k]
        try:
            rebuilt = self._driver.reconstruct([_as_bytes(usable[i]) for i in chosen], todo)
        except ECInsufficientFragments as e:
            raise NotEnoughFragments(self.k, len(usable)) from e
        except ECDriverError as e:
            raise BadFragment(f"pyeclib refused the fragments: {e}") from e
        # pyeclib returns them in its own order: file each under the index its header names.
        for fragment in rebuilt:
            index, _ = self.fragment_info(fragment)
            result[index] = fragment
        if set(result) != set(wanted):
            raise BadFragment(f"pyeclib rebuilt fragments {sorted(result)}, not {wanted}")
        return result


    def rebuild_data(
        self,
        fragments: Mapping[int, bytes | bytearray | memoryview],
        missing: Sequence[int],
        allocate: Callable[[int], bytearray] = bytearray,
    ) -> dict[int, memoryview]:
        """The user bytes of the data fragments ``missing`` (given or rebuilt from ``k`` others),
        by index.

        What `data_payload` of each rebuilt fragment would give, without making the fragments:
        the read path's degraded case. ISA-L works on the received buffers in place and writes
        into buffers from ``allocate`` (see L{dogfs.codec.isal}); without ISA-L, pyeclib.

        @raise NotEnoughFragments: fewer than ``k`` were given.
        @raise BadFragment: a fragment is malformed or from another stripe.
        """
        wanted = sorted(set(missing))
        if any(not 0 <= i < self.k for i in wanted):
            raise ValueError(f"only data fragments 0 to {self.k - 1} carry user data, not {wanted}")
        if len(fragments) < self.k:
            raise NotEnoughFragments(self.k, len(fragments))
        usable, stripe_len = self._checked(fragments)
        payload = -(-stripe_len // self.k)
        result: dict[int, memoryview] = {}
        todo = []
        for index in wanted:
            if index in usable:
                result[index] = self.data_payload(usable[index])
            else:
                todo.append(index)
        rebuilder = self._rebuilder
        if todo and rebuilder is None:
            for index, fragment in self.reconstruct(usable, todo).items():
                result[index] = self.data_payload(fragment)
        elif todo and rebuilder is not None:
            chosen = sorted(usable)[: self.k]
            views = {i: memoryview(usable[i])[FRAGMENT_HEADER_SIZE:] for i in chosen}
            rebuilt = rebuilder.rebuild(views, todo, payload, allocate)
            for index in todo:
                length = max(0, min(payload, stripe_len - index * payload))
                result[index] = memoryview(rebuilt[index])[:length]
        return {i: result[i] for i in wanted}


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_TUNED_MMAP_THRESHOLD = 32 << 20
_TUNED_TRIM_THRESHOLD = 1 << 30


def tune_malloc() -> None:
    """Make glibc keep big buffers in the heap instead of mapping fresh pages for each one.

    With default settings every multi-MiB pyeclib buffer is a new ``mmap`` whose pages fault
    in on first touch, which cuts ISA-L from ~3 GB/s to ~0.3 GB/s. Raising the mmap threshold
    to 32 MiB and the trim threshold to 1 GiB lets freed stripe buffers be reused. Call once at
    process start-up (daemons, CLI); a no-op off glibc. Equivalent to the environment
    ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present on glibc only (not musl)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, _TUNED_MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _TUNED_TRIM_THRESHOLD)
