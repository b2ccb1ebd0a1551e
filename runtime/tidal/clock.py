"""Injected monotonic clock: the scheduler and controller never read wall time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    def real_wait_s(self, clock_s: float) -> float | None:
        """How long a thread waits, in real seconds, for `clock_s` of this clock to pass; None: until woken
        by `watch` (a clock that only moves when told to)."""
        ...

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from any thread) whenever the clock jumps; a clock that runs by itself never does."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    def real_wait_s(self, clock_s: float) -> float | None:
        return clock_s

    def watch(self, callback: Callable[[], None]) -> None:
        return None


class FakeClock:
    """A clock tests advance by hand, so batch windows are never slept through."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._watchers: list[Callable[[], None]] = []

    def now(self) -> float:
        return self._now

    def real_wait_s(self, clock_s: float) -> float | None:
        return None  # no real time passes on this clock: timers wake when `advance` says so

    def watch(self, callback: Callable[[], None]) -> None:
        self._watchers.append(callback)

    def advance(self, seconds: float) -> None:
        self._now += seconds
        for callback in self._watchers:
            callback()
