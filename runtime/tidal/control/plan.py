"""The queueing estimate: what a variant can serve within the SLO, and what p99 it would give.

All times in milliseconds, rates in rows per millisecond. With a batch
latency `L(b) = a + c*b` and `n` instances, each taking the rows that queued
while it ran (the batcher dispatches whatever is waiting as soon as an
instance frees up):

- steady-state batch: an instance that runs batches of `b` rows back to back
  at a per-instance arrival rate `r = rate / n` collects `r * L(b)` rows per
  run, so `b = r*a / (1 - r*c)`; it exists only while `r*c < 1`.
- p99 latency: a request waits for the batch in progress, then runs in the
  next one, so `p99 ~ delay + tail * L(b) + offset` with `tail` about 2; the
  `offset` is what the measurements show beyond the model (transport, event
  loop), learned online. A backlog of more than one batch per instance adds
  its drain time.
- largest batch: the biggest `B` whose `delay + tail * L(B) + offset` fits
  the target. The variant then sustains `capacity = n * B / L(B)` rows/ms,
  and `utilisation = rate / capacity` says how close to the edge it runs.

The controller keeps utilisation under a threshold rather than trusting the
p99 formula near saturation, where every queueing model is optimistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_ROUNDING = 1e-9  # so that 7.5 / 0.1 rows is 75, not 74


@dataclass(frozen=True, slots=True)
class Line:
    """Batch latency `intercept + slope * rows`, in ms."""

    intercept: float
    slope: float

    def ms(self, rows: float) -> float:
        return self.intercept + self.slope * rows


@dataclass(frozen=True, slots=True)
class Load:
    """What the variant would face: shared by every candidate in one period."""

    rate: float  # offered rows per ms
    rows_per_request: float
    queued_rows: float
    target_ms: float  # the p99 to aim at (the SLO times the margin)
    delay_ms: float  # the batching window the plan keeps
    offset_ms: float
    tail: float


@dataclass(frozen=True, slots=True)
class Plan:
    variant: str
    line: Line  # the batch latency the plan assumed
    offset_ms: float
    max_batch: int  # rows; 0 = no batch size holds the target even unloaded
    batch_ms: float  # L(max_batch)
    capacity: float  # rows per ms at max_batch; 0 when max_batch is 0
    utilisation: float  # offered rate / capacity; inf when capacity is 0
    predicted_p99_ms: float  # at the offered rate; inf when saturated

    def fits(self, utilisation: float, target_ms: float) -> bool:
        return self.max_batch > 0 and self.utilisation <= utilisation and self.predicted_p99_ms <= target_ms

    def drain_s(self, queued_rows: float) -> float:
        """How long `queued_rows` take to serve at this plan's capacity; 0 when it has none."""
        return queued_rows / self.capacity / 1e3 if self.capacity > 0 else 0.0


def largest_batch(line: Line, load: Load, limit: int) -> int:
    """The most rows one execution may take and still meet the target; 0 when not even the smallest request does."""
    budget = (load.target_ms - load.delay_ms - load.offset_ms) / load.tail - line.intercept
    if budget < line.slope * load.rows_per_request:
        return 0
    return int(min(limit, budget / line.slope + _ROUNDING))


def steady_batch(line: Line, per_instance_rate: float) -> float:
    """Rows per execution when an instance runs back to back at this arrival rate; inf past saturation."""
    load = per_instance_rate * line.slope
    if load >= 1.0:
        return math.inf
    return per_instance_rate * line.intercept / (1.0 - load)


def plan_variant(variant: str, line: Line, load: Load, instances: int, limit: int) -> Plan:
    """`limit` is the model's own max batch size (1 for a model without batching)."""
    batch = largest_batch(line, load, limit)
    if batch == 0:
        return Plan(variant, line, load.offset_ms, 0, line.ms(load.rows_per_request), 0.0, math.inf, math.inf)
    batch_ms = line.ms(batch)
    capacity = instances * batch / batch_ms
    predicted = predict_p99(line, load, instances, batch)
    return Plan(variant, line, load.offset_ms, batch, batch_ms, capacity, load.rate / capacity, predicted)


def predict_p99(line: Line, load: Load, instances: int, max_batch: int) -> float:
    """p99 in ms at the offered rate with batches of at most `max_batch` rows; inf when that cannot keep up."""
    steady = steady_batch(line, load.rate / instances)
    if steady > max_batch:
        return math.inf
    batch = max(steady, load.rows_per_request)
    capacity = instances * max_batch / line.ms(max_batch)
    backlog_ms = max(load.queued_rows - instances * max_batch, 0.0) / capacity
    return load.delay_ms + load.tail * line.ms(batch) + load.offset_ms + backlog_ms


def admission_limits(
    plan: Plan,
    rates: dict[int, float],
    targets_ms: dict[int, float],
    load: Load,
    instances: int,
    scale: float,
) -> tuple[tuple[int, int], ...]:
    """Per-level caps on queued requests (at or above each level) that still leave in time.

    A request that finds `q` rows ahead of it waits about `q / capacity`, plus
    the batch in progress and its own. Lower levels see the capacity that the
    levels above them leave over, so they are refused first: a level whose
    betters already use all the capacity gets 0, i.e. is shed entirely.
    `scale` (at most 1) shrinks the capacity that lower levels share when the
    measurements say the estimate was too generous: they give way, not the top.
    """
    capacity = plan.capacity * scale
    limits = []
    above = 0.0
    for level in sorted(targets_ms):
        batches = math.floor((targets_ms[level] - load.delay_ms - load.offset_ms) / plan.batch_ms) - 1
        share = 1.0 - above / capacity if capacity > 0 else 0.0
        rows = batches * instances * plan.max_batch * share
        count = int(rows / load.rows_per_request + _ROUNDING) if batches >= 1 and share > 0 else 0
        limits.append((level, max(count, 0)))
        above += rates.get(level, 0.0)
    return tuple(limits)
