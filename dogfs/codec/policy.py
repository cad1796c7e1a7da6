# -*- test-case-name: tests.test_codec -*-
"""Erasure-coding policies: the ``RS-K-M`` names users type and the (k, m) pairs the codec uses.

A policy ``RS-K-M`` splits each stripe into ``k`` data cells and adds ``m`` parity cells; any
``k`` of the ``k + m`` fragments rebuild the stripe. The accepted range is what pyeclib's
``isa_l_rs_cauchy`` backend handles (MDS for every k and m): ``k >= 1``, ``m >= 1`` and
``k + m <= 32``.
"""

from __future__ import annotations

import re

from attrs import frozen

__all__ = ["MAX_WIDTH", "ECPolicy", "UnknownPolicy", "DEFAULT_POLICY"]

#: The largest ``k + m`` accepted; ISA-L's Cauchy matrices are MDS up to here.
MAX_WIDTH = 32

_POLICY_RE = re.compile(r"RS-([0-9]{1,3})-([0-9]{1,3})", re.ASCII | re.IGNORECASE)
_EXPECTED = "expected RS-K-M such as RS-4-2, RS-6-3 or RS-10-4"


class UnknownPolicy(ValueError):
    """A policy name or (k, m) pair that DogFS cannot encode with."""


@frozen
class ECPolicy:
    """A Reed-Solomon policy: ``k`` data fragments plus ``m`` parity fragments per stripe."""

    k: int
    m: int

    def __attrs_post_init__(self) -> None:
        """Refuse (k, m) pairs the backend cannot encode, with one clear sentence."""
        k, m = self.k, self.m
        if (
            not isinstance(k, int)
            or not isinstance(m, int)
            or isinstance(k, bool)
            or isinstance(m, bool)
            or k < 1
            or m < 1
            or k + m > MAX_WIDTH
        ):
            raise UnknownPolicy(
                f"unsupported erasure-coding policy RS-{k}-{m}; {_EXPECTED}, "
                f"with k >= 1, m >= 1 and k + m <= {MAX_WIDTH}"
            )

    @classmethod
    def parse(cls, text: str) -> ECPolicy:
        """Parse ``"RS-4-2"`` (case-insensitive, surrounding spaces ignored) into a policy.

        @raise UnknownPolicy: the text is not ``RS-K-M`` or names an unsupported pair.
        """
        if not isinstance(text, str):
            raise UnknownPolicy(f"unknown erasure-coding policy {text!r}; {_EXPECTED}")
        match = _POLICY_RE.fullmatch(text.strip())
        if match is None:
            raise UnknownPolicy(f"unknown erasure-coding policy {text!r}; {_EXPECTED}")
        k, m = int(match.group(1)), int(match.group(2))
        if k < 1 or m < 1 or k + m > MAX_WIDTH:
            raise UnknownPolicy(
                f"unsupported erasure-coding policy {text!r}; {_EXPECTED}, "
                f"with k >= 1, m >= 1 and k + m <= {MAX_WIDTH}"
            )
        return cls(k, m)

    @property
    def name(self) -> str:
        """The canonical name, e.g. ``"RS-4-2"``."""
        return f"RS-{self.k}-{self.m}"

    @property
    def width(self) -> int:
        """How many fragments (and shards) one stripe becomes: ``k + m``."""
        return self.k + self.m

    def __str__(self) -> str:
        """The canonical name, so policies format naturally in messages."""
        return self.name


#: The cluster default when nothing else is configured.
DEFAULT_POLICY = ECPolicy(4, 2)
