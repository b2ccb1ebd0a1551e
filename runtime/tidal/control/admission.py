"""Edge admission: how many requests of a model may be inside the server at once, per priority level.

The gate sits at the very front of the request path, before a request is decoded, so that a refusal costs
as little as the transport allows and the requests it admits are the ones that can still finish in time.
It is a concurrency limit (Little's law: in-flight = throughput x latency) that adapts to what it measures,
in the manner of latency-gradient limiters (Netflix's Gradient2, Envoy's adaptive concurrency):

- every `period_s` it compares the p99 time admitted requests spent inside the server with the budget the
  SLO leaves once the transport's own delay (event-loop lag) is paid; over budget, the limit shrinks by
  `decrease`; comfortably under it while the limit was the constraint, it grows by `increase` of itself;
- it starts from, and never grows past twice, the limit the SLO controller predicts from the model's
  batch-time profile (`predicted`), so a cold model is protected before any measurement exists;
- priority levels share it in order: level 1 may fill the whole limit; each lower level may fill what is
  left once every level above it has its reserve, the most it recently had in flight or asked for (rising
  at once, falling slowly) plus one. Excess is refused lowest priority first, and a level's own traffic never
  has to squeeze past a flood of lower-priority requests: a refusal reserves the room its level asked for at
  once, so the next free slots go to it even when it had nothing in flight before (its reserve had decayed)
  and lower levels arrive first;
- a burst is not a standing queue (CoDel's distinction): when a level has had nothing refused for `quiet_s`,
  its requests that push past its cap within one SLO target of the first are still admitted, up to `burst`
  times the limit less the reserves of the levels above. A stall of the host or the event loop (tens of ms)
  makes calls arrive in a clump at moderate load; refusing them turns a late answer into an error (measured:
  a 10-minute soak at 70% of capacity, all of its errors in such seconds, perf/RELIABILITY.md). A real
  overload refuses from the end of that window on, and has no window again until it has been quiet for
  `quiet_s`.

Pure: `admit` and `adapt` take `now`; nothing here reads a clock, sleeps or does I/O; one gate per served
model, driven from the event loop only (not thread-safe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tidal.errors import pushback_ms

_MIN_SAMPLES = 8  # completions in a period before its p99 says anything


@dataclass(frozen=True)
class GateTuning:
    period_s: float = 0.1
    decrease: float = 0.8  # multiplicative cut when the budget is broken
    increase: float = 0.1  # growth per period, as a share of the limit, when it binds and latency fits
    comfort: float = 0.6  # "fits comfortably": p99 under this share of the budget
    reserve_decay: float = 0.8  # how much of a level's reserve survives a period in which it used less
    jump: float = 1.5  # a prediction this many times the last one is a new operating point, not drift
    burst: float = 2.0  # a burst after a quiet spell may fill this many times the limit (1: no bursts)
    quiet_s: float = 1.0  # no refusal for this long before a burst is let in
    min_limit: int = 2
    default_limit: int = 64  # before any prediction or measurement


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was not admitted, and when its client might try again."""

    level: int
    limit: int  # what that level could use when it was refused
    inflight: int
    pushback_ms: int


@dataclass(frozen=True, slots=True)
class GateState:
    """What the gate reports: for status, metrics and the controller."""

    limit: int  # in-flight requests level 1 may fill
    inflight: int
    admitted: int  # cumulative
    refused: dict[int, int]  # priority level -> refused at the edge (cumulative)
    p99_ms: float | None  # of the last full period


class AdmissionGate:
    """One model's adaptive in-flight limit; a no-op until it has a latency target."""

    def __init__(self, levels: int, tuning: GateTuning | None = None) -> None:
        self.tuning = tuning or GateTuning()
        self._levels = 0  # the per-level lists below get their entries from `widen`
        self._target_ms = 0.0
        self._predicted = 0
        self._limit = float(self.tuning.default_limit)
        self._inflight = 0
        self._by_level: list[int] = []  # in flight now
        self._peak: list[int] = []  # most in flight this period
        self._reserve: list[float] = []  # what each level keeps from the levels below it
        self._admitted = 0
        self._refused: list[int] = []
        self._period_start: float | None = None
        self._samples: list[float] = []
        self._bound = False  # the limit refused someone (or was reached) in this period
        self._refused_at: list[float] = []  # per level: the latest refusal
        self._burst_from: list[float] = []  # per level: when its latest burst first went past its cap
        self._p99_ms: float | None = None
        self.widen(levels)

    def widen(self, levels: int) -> None:
        """Room for `levels` priority levels: at construction, and when a reload adds levels to a model whose
        gate lives on (it is the model's, not a version's; its per-level lists once ended at the old count, and
        every request at a new level failed INTERNAL). Counts and requests in flight carry on; fewer levels
        change nothing."""
        extra = levels - self._levels
        if extra <= 0:
            return
        self._levels = levels
        for per_level, start in (
            (self._by_level, 0), (self._peak, 0), (self._reserve, 0.0), (self._refused, 0),
            (self._refused_at, -math.inf), (self._burst_from, -math.inf),
        ):
            per_level.extend([start] * extra)

    # -- knobs the controller sets ---------------------------------------------------------
    def configure(self, target_ms: float, predicted: int = 0) -> None:
        """`target_ms`: the p99 the model must hold (0: no target, admit all); `predicted`: the controller's
        estimate of the in-flight requests that fit the target (0: none).

        A prediction that jumps (the controller moved to a faster variant or more instances under a step of
        load) lifts the limit to it at once: growing there by `increase` a period would keep refusing, for a
        second or more, the load the switch was made to serve (measured: most of the losses of a 3x step)."""
        if target_ms != self._target_ms or (predicted and not self._predicted):
            self._limit = float(predicted or max(self._limit, self.tuning.default_limit))
        elif predicted >= self.tuning.jump * self._predicted > 0:
            self._limit = max(self._limit, float(predicted))
        self._target_ms = max(target_ms, 0.0)
        self._predicted = max(predicted, 0)

    @property
    def active(self) -> bool:
        return self._target_ms > 0

    @property
    def limit(self) -> int:
        return max(int(self._limit), self.tuning.min_limit)

    def cap(self, level: int) -> int:
        """In-flight requests (of every level) below which a request of `level` is admitted."""
        return self._cap(level, self.limit)

    def _cap(self, level: int, limit: int) -> int:
        reserved = sum(math.ceil(r) + 1 for r in self._reserve[: level - 1] if r > 0)
        return max(limit - reserved, 1 if level == 1 else 0)

    # -- per request -----------------------------------------------------------------------
    def admit(self, level: int, now: float) -> Refusal | None:
        """None: admitted (call `release` when it is answered). A Refusal: answer at once, do no work."""
        if self.active:
            cap = self.cap(level)
            if self._inflight >= cap and not self._absorbs(level, now):
                self._bound = True
                self._refused_at[level - 1] = now
                self._refused[level - 1] += 1
                self._reserve[level - 1] = max(self._reserve[level - 1], self._by_level[level - 1] + 1.0)
                return Refusal(level, cap, self._inflight, self._pushback_ms())
            if self._inflight + 1 >= self.limit:
                self._bound = True
        self._inflight += 1
        self._admitted += 1
        count = self._by_level[level - 1] = self._by_level[level - 1] + 1
        self._peak[level - 1] = max(self._peak[level - 1], count)
        return None

    def _absorbs(self, level: int, now: float) -> bool:
        """Whether a request of `level` past its cap belongs to a burst the gate lets in (see the module's
        docstring). The burst's room is the limit scaled by `burst` less the same reserves, so a lower level's
        burst never takes what the levels above it keep."""
        t, i = self.tuning, level - 1
        if now - self._refused_at[i] < t.quiet_s or self._inflight >= self._cap(level, int(t.burst * self.limit)):
            return False
        window = self._target_ms / 1e3
        if now - self._burst_from[i] > window + t.period_s:
            self._burst_from[i] = now  # a new burst
        return now - self._burst_from[i] <= window

    def release(self, level: int, latency_s: float) -> None:
        """An admitted request of `level` was answered after `latency_s` inside the server (failures count
        too: a timeout is exactly the latency the limit must see)."""
        self._inflight -= 1
        self._by_level[level - 1] -= 1
        self._samples.append(latency_s * 1e3)

    # -- adaptation ------------------------------------------------------------------------
    def adapt(self, now: float, transport_delay_ms: float) -> None:
        """Close the period if it is over; `transport_delay_ms` is what requests waited before the gate."""
        if self._period_start is None:
            self._period_start = now
            return
        if now - self._period_start < self.tuning.period_s:
            return
        t = self.tuning
        samples, self._samples = self._samples, []
        bound, self._bound = self._bound, False
        self._period_start = now
        for i, peak in enumerate(self._peak):
            kept = self._reserve[i] * t.reserve_decay
            self._reserve[i] = max(float(peak), kept if kept >= 0.5 else 0.0)
            self._peak[i] = self._by_level[i]
        if len(samples) < _MIN_SAMPLES:
            return
        samples.sort()
        p99 = samples[min(len(samples) - 1, math.ceil(0.99 * len(samples)) - 1)]
        self._p99_ms = p99
        if not self.active:
            return
        budget = self._target_ms - transport_delay_ms
        ceiling = 2 * self._predicted if self._predicted else math.inf
        if p99 > budget:
            self._limit = max(self._limit * t.decrease, t.min_limit)
        elif bound and p99 < t.comfort * budget:
            self._limit = min(self._limit * (1 + t.increase) + 1, ceiling)

    def _pushback_ms(self) -> int:
        """Roughly how long the work already inside takes to drain: the last p99, or the target."""
        wait_ms = self._p99_ms if self._p99_ms is not None else self._target_ms
        return pushback_ms(wait_ms * 1e-3)

    def state(self) -> GateState:
        return GateState(
            self.limit, self._inflight, self._admitted,
            {lv: n for lv, n in enumerate(self._refused, start=1)}, self._p99_ms,
        )


MAX_DEMAND = 10.0  # refusing nine in ten already says "add replicas"; more says nothing new


def saturation(edge_busy: float, received_rps: float, admitted_rps: float, utilisation: float) -> float:
    """One number for autoscalers: how much of a replica's capacity the offered load would take.

    The edge's share is the event loop's busy share scaled by the demand it turned away (received over
    admitted: a loop fully busy while refusing half of what arrives is at 2); the backend's is the load over
    what the model serves within its SLO. The larger one is the bottleneck. 1 means full; above 1, about
    how many replicas' worth of load arrives (capped at `MAX_DEMAND` on the edge side), which is the ratio a
    HorizontalPodAutoscaler on a target of 1 (or 0.7 for headroom) scales by.
    """
    if admitted_rps > 0:
        demand = min(max(received_rps / admitted_rps, 1.0), MAX_DEMAND)
    else:
        demand = MAX_DEMAND if received_rps > 0 else 1.0
    return max(edge_busy * demand, utilisation)
