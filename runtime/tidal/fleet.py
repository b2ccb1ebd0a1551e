"""Sizing a fleet: how many replicas, with which variant, batch limit and instances, for a rate and an SLO.

A replica answers at most what the smallest of three limits allows:

- its request path (gRPC, decoding, scheduling, encoding on one event loop), measured on this host as the
  requests per second one tidal process answers when the model costs nothing (`path_rps`, a core's worth);
- its model instances, from the variant's latency profile through the controller's queueing estimate
  (control/plan.py): the largest batch whose p99 fits the target, and what `instances` of them sustain;
- its cores: each request takes the path's time (1 / path_rps) plus its share of the batch it runs in (the
  profile's time, on as many cores as it ran intra-op threads), and the replica has `cores_per_replica` cores
  for both (gRPC's own threads run beside the event loop, so the
  path's core is not the only busy one).

Replicas run at the utilisation where the SLO controller settles (`Tuning.settle_utilisation`), so the
fleet keeps the headroom that the controller and the autoscaler expect. The request path's own queueing
adds to the p99 as an M/M/1 queue would: ln(100) mean sojourn times at that utilisation.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tidal.control.latency import BatchLatency
from tidal.control.memory import Tuning
from tidal.control.plan import Line, Load, plan_variant, steady_batch

P99_OF_EXPONENTIAL = math.log(100.0)


@dataclass(frozen=True)
class Candidate:
    """A variant as the plan sees it: accuracy and the batch-latency profile it is served with."""

    name: str
    accuracy: float | None
    agreement: float
    batch_sizes: tuple[int, ...]
    p50_ms: tuple[float, ...]
    threads: int = 1  # intra-op threads the profile ran with: its batches took up to this many cores


@dataclass(frozen=True)
class Ask:
    rate_rps: float  # offered requests per second, fleet-wide
    slo_ms: float  # p99 target
    max_batch_size: int  # the model's (0: no batching)
    path_rps: float  # one replica's request-path capacity, requests per second
    cores_per_replica: int
    rows_per_request: float = 1.0
    max_queue_delay_us: float = 0.0  # the model's configured batching window
    cost_per_core_hour: float = 0.0


@dataclass(frozen=True)
class Sizing:
    variant: str
    accuracy: float | None
    agreement: float
    batch_limit: int  # rows; 0 when no batch meets the SLO
    instances: int  # per replica
    capacity_rps: float  # one replica, requests per second (the smaller of path and model)
    bound_by: str  # "request path" or "model"
    replicas: int
    utilisation: float  # per replica, at the offered rate
    headroom: float  # fleet capacity over the offered rate, minus 1
    predicted_p99_ms: float
    meets_slo: bool
    cost_per_million: float  # 0 without a core price


def _load(rps: float, ask: Ask, t: Tuning, offset_ms: float) -> Load:
    target = ask.slo_ms * t.latency_margin
    return Load(
        rate=rps * ask.rows_per_request / 1e3,
        rows_per_request=ask.rows_per_request,
        queued_rows=0.0,
        target_ms=target,
        delay_ms=min(ask.max_queue_delay_us / 1e3, target * t.max_delay_share),
        offset_ms=offset_ms,
        tail=t.tail_factor,
    )


def _path_p99_ms(ask: Ask, utilisation: float) -> float:
    return P99_OF_EXPONENTIAL * (1e3 / ask.path_rps) / (1.0 - min(utilisation, 0.99))


def size(candidate: Candidate, ask: Ask, tuning: Tuning | None = None) -> Sizing:
    """The cheapest way to serve `ask` with this variant: fewest replicas, then fewest instances."""
    t = tuning or Tuning()
    line = Line(*BatchLatency(candidate.batch_sizes, candidate.p50_ms).line())
    limit = max(ask.max_batch_size, 1)
    # Batches are planned at the rate a replica settles at, leaving the path's queueing out of the target.
    planning = _load(ask.path_rps * t.settle_utilisation, ask, t, _path_p99_ms(ask, t.settle_utilisation))
    for instances in range(1, max(ask.cores_per_replica - 1, 1) + 1):
        plan = plan_variant(candidate.name, line, planning, instances, limit)
        model_rps = plan.capacity * 1e3 / ask.rows_per_request
        if model_rps >= ask.path_rps:
            break  # more instances would only wait on the request path
    # This request's share of the batch it runs in, at the rate the replica settles at.
    rows = ask.rows_per_request
    batch = max(min(steady_batch(line, planning.rate / instances), max(plan.max_batch, rows)), rows)
    model_ms = line.ms(batch) / batch * rows * candidate.threads
    cpu_rps = ask.cores_per_replica * 1e3 / (1e3 / ask.path_rps + model_ms)
    capacity, bound = min((ask.path_rps, "request path"), (model_rps, "model"), (cpu_rps, "cores"))
    if plan.max_batch == 0:
        return Sizing(candidate.name, candidate.accuracy, candidate.agreement, 0, instances, 0.0, bound, 0,
                      math.inf, -1.0, math.inf, False, math.inf)
    replicas = max(math.ceil(ask.rate_rps / (capacity * t.settle_utilisation)), 1)
    per_replica = ask.rate_rps / replicas
    served = plan_variant(candidate.name, line, _load(per_replica, ask, t, 0.0), instances, limit)
    p99 = served.predicted_p99_ms + _path_p99_ms(ask, per_replica / ask.path_rps)
    core_hours_per_million = replicas * ask.cores_per_replica / (ask.rate_rps * 3600 / 1e6)
    return Sizing(
        candidate.name, candidate.accuracy, candidate.agreement, plan.max_batch, instances, capacity, bound,
        replicas, per_replica / capacity, replicas * capacity / ask.rate_rps - 1.0, p99, p99 <= ask.slo_ms,
        core_hours_per_million * ask.cost_per_core_hour,
    )


def choose(candidates: list[Candidate], ask: Ask, min_accuracy: float, tuning: Tuning | None = None) -> list[Sizing]:
    """Every profiled variant at or above `min_accuracy`, sized; first the one to deploy: fewest replicas that
    meet the SLO, then the most accurate (closer than the controller's resolution: a tie, broken by agreement)."""
    t = tuning or Tuning()
    allowed = [c for c in candidates if c.batch_sizes and (c.accuracy if c.accuracy is not None else
                                                             (1.0 if min_accuracy == 0 else 0.0)) >= min_accuracy]

    best = max((c.accuracy for c in allowed if c.accuracy is not None), default=0.0)

    def rank(s: Sizing) -> tuple[bool, int, float, float]:
        below = (best - (s.accuracy or 0.0)) // t.accuracy_resolution  # as the controller ranks them
        return not s.meets_slo, s.replicas, below, -s.agreement

    return sorted((size(c, ask, t) for c in allowed), key=rank)
