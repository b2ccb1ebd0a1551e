"""Placement choice: whether priority 1 should leave the shared instances for a pool of its own.

One queue feeds every instance, and level 1 is served first, but a level-1 request still waits for the batch
in progress: when the bulk runs large batches (a GPU's best throughput), the tight level-1 target caps the
batch of everyone, and the model may have to serve a less accurate variant, or shed, to keep level 1 in time.
Reserving a pool (one instance_group) for level 1, with whichever variant runs fast enough there, lets the
others batch at the looser target of the remaining levels.

Pure: the caller gives the batch-latency line of each (variant, device) pair, the rates and targets per level;
the answer is the split that keeps the most accurate bulk variant, then the most accurate level-1 variant, with
both sides under `utilisation`, or None. Whether a split beats serving everyone together is the caller's call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from tidal.control.api import Pool
from tidal.control.plan import Line, Load, Plan, plan_variant
from tidal.types import LevelRoute

RESERVED_LEVELS = 1  # the levels a pool may be reserved for: priority 1, the latency-critical one


@dataclass(frozen=True, slots=True)
class Split:
    route: LevelRoute
    bulk: Plan  # the other levels on the other instances
    reserved: Plan  # level 1 on the route's instances
    bulk_delay_ms: float  # the batching window the bulk may keep at its own target


def best_split(
    pools: Sequence[Pool],
    ranked: Sequence[str],
    line: Callable[[str, str], Line | None],
    load: Load,
    rates: Mapping[int, float],
    targets_ms: Mapping[int, float],
    limit: int,
    utilisation: float,
    max_delay_ms: float,
    delay_share: float,
) -> Split | None:
    """`ranked`: variant names, most accurate first; `line(variant, device)`: its batch latency there, None
    when unknown; `rates` rows/ms and `targets_ms` (margin applied) per level; `max_delay_ms`: the
    configured batching window, which each side keeps at most `delay_share` of its own target of."""
    top = range(1, RESERVED_LEVELS + 1)
    rest = [lv for lv in targets_ms if lv not in top]
    if len(pools) < 2 or not rest or not any(rates.get(lv, 0.0) > 0 for lv in top):
        return None
    busy = [lv for lv in rest if rates.get(lv, 0.0) > 0] or rest
    reserved_target, bulk_target = min(targets_ms[lv] for lv in top), min(targets_ms[lv] for lv in busy)
    reserved_load = _part(load, top, rates, reserved_target, min(max_delay_ms, reserved_target * delay_share), 0.0)
    bulk_load = _part(load, rest, rates, bulk_target, min(max_delay_ms, bulk_target * delay_share), load.queued_rows)
    for bulk_variant in ranked:
        for pool in sorted(pools, key=lambda p: len(p.instances)):  # the smallest reservation leaves the most
            others = [p for p in pools if p is not pool]
            bulk = _plan(bulk_variant, others, line, bulk_load, limit)
            if bulk is None or not bulk.fits(utilisation, bulk_load.target_ms):
                continue
            for variant in ranked:
                reserved = _plan(variant, [pool], line, reserved_load, limit)
                if reserved is not None and reserved.fits(utilisation, reserved_load.target_ms):
                    delay_us = round(reserved_load.delay_ms * 1e3)
                    route = LevelRoute(RESERVED_LEVELS, pool.instances, variant, max(reserved.max_batch, 1), delay_us)
                    return Split(route, bulk, reserved, bulk_load.delay_ms)
    return None


def _part(
    load: Load, levels: Sequence[int], rates: Mapping[int, float], target_ms: float, delay_ms: float, queued: float
) -> Load:
    rate = sum(rates.get(lv, 0.0) for lv in levels)
    return replace(load, rate=rate, queued_rows=queued, target_ms=target_ms, delay_ms=delay_ms)


def _plan(
    variant: str, pools: Sequence[Pool], line: Callable[[str, str], Line | None], load: Load, limit: int
) -> Plan | None:
    """The plan for `variant` on `pools`, which must share one kind of device; None when they do not or the
    variant has no line there."""
    devices = {p.device for p in pools}
    if len(devices) != 1:
        return None
    found = line(variant, devices.pop())
    if found is None:
        return None
    return plan_variant(variant, found, load, sum(len(p.instances) for p in pools), limit)
