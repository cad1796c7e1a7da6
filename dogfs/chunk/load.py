# -*- test-case-name: tests.test_chunk_service -*-
"""Rates of a chunk server's traffic over a sliding window, for its heartbeat's `load`.

Counts are kept in one-second buckets stamped with the injected clock, so a simulated clock
gives exact, repeatable rates and no wall-clock time is ever read here.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from typing import Any

from twisted.internet.interfaces import IReactorTime


class LoadMeter:
    """Event counters that report per-second rates over the last `window` seconds."""

    def __init__(self, clock: IReactorTime, window: float = 10.0, bucket: float = 1.0) -> None:
        """Count on `clock`; rates cover `window` seconds in buckets of `bucket` seconds."""
        if window <= 0 or bucket <= 0 or bucket > window:
            raise ValueError("LoadMeter needs 0 < bucket <= window")
        self._clock: Any = clock
        self.window = window
        self.bucket = bucket
        self._started = self._clock.seconds()
        self._buckets: deque[tuple[float, defaultdict[str, float]]] = deque()
        #: Totals since start, never reset (for logs and tests).
        self.totals: defaultdict[str, float] = defaultdict(float)

    def add(self, name: str, amount: float = 1) -> None:
        """Count `amount` of `name` (e.g. "put_bytes") now."""
        now = self._clock.seconds()
        start = math.floor(now / self.bucket) * self.bucket
        if not self._buckets or self._buckets[-1][0] != start:
            self._buckets.append((start, defaultdict(float)))
            self._prune(now)
        self._buckets[-1][1][name] += amount
        self.totals[name] += amount

    def _prune(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] + self.bucket <= now - self.window:
            self._buckets.popleft()

    def rates(self, names: tuple[str, ...] = ()) -> dict[str, float]:
        """Per-second rates over the window, keyed "<name>_s"; `names` are always present."""
        now = self._clock.seconds()
        self._prune(now)
        # A young meter has not seen a whole window yet: average over what it has seen.
        span = min(self.window, max(self.bucket, now - self._started))
        since = now - self.window
        summed: dict[str, float] = dict.fromkeys(names, 0.0)
        for start, counts in self._buckets:
            if start + self.bucket > since:
                for name, value in counts.items():
                    summed[name] = summed.get(name, 0.0) + value
        return {f"{name}_s": value / span for name, value in summed.items()}
