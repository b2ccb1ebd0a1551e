"""Which queued requests form the next batch, or how long to wait for more.

Pure: the answer depends only on the queue, the limits and `now`. The engine
asks only when a backend instance is free, so a batch keeps growing while
every instance is busy and leaves as soon as one frees up. When no batch is
executing at all, the engine asks without the window: on an idle model a
request never waits for company (unlike Triton, whose lone requests wait the
full max_queue_delay).

Rules, in order (the batch is always a prefix of the queue's service order,
so a later request never overtakes an earlier one of the same or a higher
level):
1. The head of the queue is always taken, even when it alone has more rows
   than the current limit (the limit may have been lowered after it was
   admitted within the model's own limit).
2. Following entries join while their input shapes match the head's and the
   rows stay within the target: the largest preferred size, or the batch
   limit when there are none.
3. If some prefix reaches a preferred size, the largest such prefix leaves now.
4. Otherwise the batch leaves now when it reached the target, when the next
   entry cannot join (other shapes, too many rows: waiting cannot grow it),
   when there is no window, or when its oldest entry has waited the window.
5. Else wait until the oldest entry's window ends.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tidal.scheduling.knobs import Knobs
from tidal.scheduling.queue import Entry, RequestQueue, SchedulerConfig


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """The knobs as the batcher applies them to one model."""

    max_rows: int  # >= 1; 1 = one request per execution
    preferred: tuple[int, ...] = ()  # sorted, all <= max_rows
    delay_s: float = 0.0

    @classmethod
    def of(cls, config: SchedulerConfig, knobs: Knobs) -> BatchLimits:
        if not config.batching or knobs.max_batch_size <= 1:
            return cls(max_rows=1)
        max_rows = min(knobs.max_batch_size, config.max_batch_size)
        preferred = tuple(size for size in knobs.preferred_batch_sizes if size <= max_rows)
        return cls(max_rows, preferred, knobs.max_queue_delay_us * 1e-6)

    def without_window(self) -> BatchLimits:
        """The same limits with no waiting: used while draining, and on every look at an idle model."""
        return replace(self, delay_s=0.0) if self.delay_s else self


@dataclass(frozen=True, slots=True)
class Dispatch:
    entries: list[Entry]
    rows: int


@dataclass(frozen=True, slots=True)
class Wait:
    until_s: float  # re-ask at this time (or earlier, on any arrival)


def form_batch(
    queue: RequestQueue, limits: BatchLimits, now: float, levels: range | None = None
) -> Dispatch | Wait | None:
    """The next batch (of `levels` only, when given) to run now, when to ask again, or None for an empty queue."""
    order = queue.in_order(levels)
    head = next(order, None)
    if head is None:
        return None
    preferred = limits.preferred
    target = preferred[-1] if preferred else limits.max_rows
    entries, rows, oldest_s = [head], head.rows, head.enqueued_s
    best = 1 if rows in preferred else 0  # length of the largest prefix at a preferred size
    blocked = False
    if rows < target:
        for entry in order:
            if entry.key != head.key or rows + entry.rows > target:
                blocked = True
                break
            entries.append(entry)
            rows += entry.rows
            oldest_s = min(oldest_s, entry.enqueued_s)
            if rows in preferred:
                best = len(entries)
            if rows == target:
                break
    if best and best < len(entries):
        chosen = entries[:best]
        return Dispatch(chosen, sum(entry.rows for entry in chosen))
    if best or rows >= target or blocked or limits.delay_s <= 0.0 or now >= oldest_s + limits.delay_s:
        return Dispatch(entries, rows)
    return Wait(oldest_s + limits.delay_s)
