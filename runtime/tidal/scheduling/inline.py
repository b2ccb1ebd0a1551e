"""When a batch runs on the event loop itself instead of its instance's worker thread.

Handing a batch to a worker thread and its result back costs two thread
wake-ups and two GIL hand-overs: about 0.1 ms of latency per request, more
than a small model's whole execution. With one request at a time that is
pure loss, so a cheap batch (measured, per batch-size bucket) runs inline.
As soon as requests overlap, the worker threads win: execution then overlaps
the loop's gRPC work for the next requests (measured with perf_analyzer on
the 256-1024-1024-10 MLP: inline 0.1 ms better p50 at concurrency 1, 11%
lower throughput at 8).

Overlap is seen as a request arriving while another is queued or running.
Inline execution hides it (each request is answered before the next is
read), so while inline, one batch per probe period still goes to a worker
to look again.

Pure: time comes from the injected clock, so tests drive it by hand.
"""

from __future__ import annotations

from collections.abc import Callable

INLINE_MAX_S = 1e-3  # a batch predicted to take longer always goes to its worker: the loop stalls that long
QUIET_S = 0.1  # no overlapping arrival for this long before batches run inline
PROBE_S = 0.02  # while inline, one batch per period goes to a worker
_EMA = 0.2  # weight of a new run-time measurement


def _bucket(rows: int) -> int:
    return rows.bit_length()  # 1, 2-3, 4-7, ...: run time is near-flat within a bucket


class InlinePolicy:
    """Decides inline vs worker per batch, from arrivals and measured run times.

    Run times measured on a worker include GIL waits, so under load they grow and keep batches off
    the loop, which is the direction wanted.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._run_s: dict[int, float] = {}
        self._overlap_s = clock()  # start as if requests overlapped: no inline run before QUIET_S
        self._probe_s = float("-inf")

    def arrived(self, pending: int) -> None:
        """A request arrived while `pending` others were queued or running."""
        if pending:
            self._overlap_s = self._clock()

    def inline(self, rows: int) -> bool:
        predicted = self._run_s.get(_bucket(rows))
        if predicted is None or predicted > INLINE_MAX_S:
            return False
        now = self._clock()
        if now - self._overlap_s < QUIET_S:
            return False
        if now - self._probe_s >= PROBE_S:
            self._probe_s = now
            return False
        return True

    def ran(self, rows: int, run_s: float) -> None:
        """A batch of `rows` spent `run_s` in the backend."""
        key = _bucket(rows)
        previous = self._run_s.get(key)
        self._run_s[key] = run_s if previous is None else previous + _EMA * (run_s - previous)
