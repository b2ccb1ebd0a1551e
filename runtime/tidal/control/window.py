"""Sliding windows over what the scheduler reports: latency percentiles and arrival rates.

Pure: every method takes the observation time (`at_s`, the scheduler's
monotonic clock); nothing here reads a clock or starts a thread.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping

import numpy as np

from tidal.types import LatencySample


class LatencyWindow:
    """End-to-end latencies of the last `span_s` seconds, per priority level.

    Samples arrive in blocks (one per observation) and leave as blocks, so
    adding and expiring cost one append and a few pops per period.
    """

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self._blocks: deque[tuple[float, np.ndarray, np.ndarray]] = deque()  # (at_s, levels, latency ms)

    def add(
        self, at_s: float, samples: Iterable[LatencySample], since_s: float = -math.inf, done_after_s: float = -math.inf
    ) -> None:
        """Keep the samples of requests that surely arrived at or after `since_s`, so a backlog left
        by a previous setting is not blamed on the new one. The samples finished after `done_after_s`
        (the previous collection), so each arrived after `done_after_s - total_s`."""
        samples = tuple(s for s in samples if since_s == -math.inf or done_after_s - s.total_s >= since_s)
        if samples:
            levels = np.fromiter((s.level for s in samples), dtype=np.int32, count=len(samples))
            millis = np.fromiter((s.total_s * 1e3 for s in samples), dtype=np.float64, count=len(samples))
            self._blocks.append((at_s, levels, millis))
        while self._blocks and self._blocks[0][0] <= at_s - self.span_s:
            self._blocks.popleft()

    def clear(self) -> None:
        """Forget every sample: after a switch, latencies of the old setting say nothing about the new one."""
        self._blocks.clear()

    def _values(self, level: int | None) -> np.ndarray:
        if not self._blocks:
            return np.empty(0)
        if level is None:
            return np.concatenate([millis for _, _, millis in self._blocks])
        return np.concatenate([millis[levels == level] for _, levels, millis in self._blocks])

    def count(self, level: int | None = None) -> int:
        return int(self._values(level).size)

    def percentile(self, q: float, level: int | None = None) -> float | None:
        """The q-th percentile in ms (nearest rank, so it is a latency some request really had); None if empty."""
        values = self._values(level)
        if not values.size:
            return None
        return float(np.percentile(values, q, method="inverted_cdf"))

    def exceeding(self, limit_ms: float, level: int | None = None) -> int:
        """How many samples took longer than `limit_ms`."""
        return int(np.count_nonzero(self._values(level) > limit_ms))

    def levels(self) -> set[int]:
        return {int(level) for _, levels, _ in self._blocks for level in np.unique(levels)}


class RateMeter:
    """Per-level rates from cumulative counters, over any span up to `span_s`.

    Differencing cumulative counts (rather than summing per-period deltas)
    keeps the estimate exact however irregular the periods are.
    """

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self._history: deque[tuple[float, dict[int, int]]] = deque()

    def add(self, at_s: float, counts: Mapping[int, int]) -> None:
        self._history.append((at_s, dict(counts)))
        # Keep one point at or before the longest span, so a full-span difference is always possible.
        while len(self._history) > 2 and self._history[1][0] <= at_s - self.span_s:
            self._history.popleft()

    def rate(self, span_s: float, level: int | None = None, min_events: int = 0) -> float:
        """Events per second over the last `span_s` seconds (or all the history there is when shorter).

        With fewer than `min_events` events the time counts as at least the full
        span: two Poisson arrivals a few ms apart are not a burst of hundreds a second.
        """
        if len(self._history) < 2:
            return 0.0
        now_s, now = self._history[-1]
        then_s, then = self._history[0]
        for at_s, counts in reversed(self._history):
            if at_s <= now_s - span_s:
                then_s, then = at_s, counts
                break
        if now_s <= then_s:
            return 0.0
        delta = sum(now.values()) - sum(then.values()) if level is None else now.get(level, 0) - then.get(level, 0)
        seconds = now_s - then_s if delta >= min_events else max(now_s - then_s, span_s)
        return max(delta, 0) / seconds

    def clear(self) -> None:
        self._history.clear()


class Ewma:
    """Exponentially weighted mean; `None` until the first value."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, value: float) -> float:
        self.value = value if self.value is None else self.value + self.alpha * (value - self.value)
        return self.value
