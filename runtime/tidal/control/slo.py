"""The SLO controller: from what each model's scheduler observed to the knobs it should run with.

Deterministic and free of I/O, threads and clocks: `step` takes one
`Observation` (whose `at_s` is the only notion of time) and the setpoint in
force, and returns a `Decision`. Per-model memory (sliding windows, the
latency models, hysteresis timers) lives in the controller object, so the
same sequence of observations always yields the same decisions. The loop
that feeds it is the composition root's business.

Each period, for the variants the mode allows (FULL: every variant at or
above the accuracy floor, most accurate first; BATCH: the active one), the
queueing estimate of `plan.py` gives the largest batch that meets the
target and the utilisation at the offered rate. Then:

- the active variant stays while its utilisation is under
  `leave_utilisation`, its predicted p99 meets the target and the measured
  p99 meets the SLO;
- otherwise it moves down at once, to the most accurate variant that fits
  under `settle_utilisation` (only to a faster one when the measurements,
  not the estimate, showed the breach);
- it moves up to a more accurate variant only after that variant has fitted
  under `up_utilisation` for `up_hold_s` without a break: the gap between
  the three thresholds is the hysteresis that stops flapping;
- when nothing fits, the fastest variant runs and admission limits refuse
  at arrival the requests that could not leave in time, lowest priority
  first (see `plan.admission_limits`); measured breaches while shedding
  shrink the capacity the limits assume, quiet periods restore it.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from tidal.control.api import Decision, Mode, ModelInfo, Reason, Setpoint, Slo, VariantInfo
from tidal.control.explain import describe, why_down
from tidal.control.memory import MAX_DRIFT, ModelMemory, Period, Tuning
from tidal.control.plan import Line, Load, Plan, admission_limits, plan_variant, predict_p99
from tidal.control.route import best_split
from tidal.control.window import Ewma
from tidal.errors import NotFound
from tidal.types import Observation

__all__ = ["SloController", "Tuning"]


class SloController:
    """Per-model SLO control; call `step` once per period for each tracked model, from one thread."""

    def __init__(self, tuning: Tuning | None = None) -> None:
        self.tuning = tuning or Tuning()
        self._models: dict[str, ModelMemory] = {}

    # -- tracking -------------------------------------------------------------------------
    def track(self, key: str, info: ModelInfo, slo: Slo) -> None:
        """Start (or restart, after a reload) controlling a model version."""
        self._models[key] = ModelMemory(info, slo, self.tuning)

    def forget(self, key: str) -> None:
        self._models.pop(key, None)

    def tracks(self, key: str) -> bool:
        return key in self._models

    def _model(self, key: str) -> ModelMemory:
        try:
            return self._models[key]
        except KeyError:
            raise NotFound(f"the controller does not track '{key}'") from None

    def slo(self, key: str) -> Slo:
        return self._model(key).slo

    def set_slo(self, key: str, slo: Slo) -> None:
        """Takes effect at the next step; hysteresis timers and the latency window restart."""
        model = self._model(key)
        model.slo, model.fit_since = slo, None
        if model.last_at is not None:
            self._restart_window(model, model.last_at)

    def history(self, key: str) -> tuple[Decision, ...]:
        """The latest decisions that changed something, oldest first."""
        return tuple(self._model(key).history)

    def last(self, key: str) -> Decision | None:
        return self._model(key).last

    # -- the step -------------------------------------------------------------------------
    def step(self, key: str, observation: Observation, active: Setpoint) -> Decision:
        model = self._model(key)
        self._ingest(model, observation)
        period = self._period(model, observation)
        if not model.slo.engaged:
            decision = self._off(model, observation.at_s, active, period)
        else:
            decision = self._control(model, observation.at_s, active, period)
        model.last = decision
        if decision.changed:
            model.engaged = decision.reason is not Reason.OFF
            model.history.append(decision)
            setpoint = decision.setpoint
            if (setpoint.variant, bool(setpoint.admission_limits), setpoint.route) != (
                active.variant, bool(active.admission_limits), active.route
            ):
                # Requests that arrive while the backlog of the old setting drains wait for it: not the new one's doing.
                self._restart_window(model, decision.at_s + model.drain_s)
        return decision

    def _ingest(self, model: ModelMemory, obs: Observation) -> None:
        previous = obs.at_s if model.last_at is None else model.last_at
        dt = max(obs.at_s - previous, 0.0)
        model.last_at = obs.at_s
        model.window.add(obs.at_s, obs.latencies, model.since_s, previous)
        # Offered = admitted + refused anywhere: by the scheduler's admission limits or at the edge.
        edge = obs.edge.refused if obs.edge is not None else {}
        levels = set(obs.arrivals) | set(obs.shed) | set(edge)
        model.offered.add(
            obs.at_s, {lv: obs.arrivals.get(lv, 0) + obs.shed.get(lv, 0) + edge.get(lv, 0) for lv in levels}
        )
        model.busy = sum(b.compute_s for b in obs.batches) / (dt * model.info.instances) if dt > 0 else 0.0
        # Only variants that ran forget: an idle variant's last measurements stay its best evidence.
        for name in {batch.variant for batch in obs.batches} & model.latency.keys():
            model.latency[name].decay(dt, self.tuning.half_life_s)
        drift = model.drift.value or 1.0
        ratios = []
        for batch in obs.batches:
            latency = model.latency.get(batch.variant)
            if latency is None:
                continue
            profiled = latency.profiled_ms(batch.rows)
            if profiled and profiled >= self.tuning.drift_min_ms:
                ratios.append(batch.compute_s * 1e3 / profiled)
            latency.add(batch.rows, batch.compute_s, drift)
        if ratios:
            model.drift.add(min(max(float(np.median(ratios)), 1 / MAX_DRIFT), MAX_DRIFT))
        if obs.batches and obs.latencies:
            model.rows.add(max(sum(b.rows for b in obs.batches) / len(obs.latencies), 1.0))

    def _period(self, model: ModelMemory, obs: Observation) -> Period:
        t, slo = self.tuning, model.slo
        rows = model.rows.value or 1.0
        levels = range(1, model.info.priority_levels + 1)
        breach = self._over(model, 1.0)
        # Under a step of load the rate spans lag (0.3 s in, the fast one holds a third of the new rate), and a
        # move chosen on them lands on one variant per period instead of the one that fits. The latest period's
        # rate says where the load is now; it counts while the SLO is measured broken, or when it is too far
        # above the long span's rate to be Poisson noise (a step seen before any answer came back late).
        rps = {}
        for lv in levels:
            spans = [model.offered.rate(span, lv, t.rate_min_events) for span in (t.fast_rate_s, t.window_s)]
            latest = model.offered.rate(t.breach_rate_s, lv, t.rate_min_events)
            if breach or _surge(latest, spans[1], t.breach_rate_s, t.surge_sigmas):
                spans.append(latest)
            rps[lv] = max(spans)
        busy = [lv for lv in levels if rps[lv] > 0] or list(levels)
        slo_ms = min(slo.target_ms(lv) for lv in busy) if slo.p99_ms > 0 else 0.0
        target = slo_ms * t.latency_margin
        delay_ms = min(model.info.configured.max_queue_delay_us / 1e3, target * t.max_delay_share)
        load = Load(
            rate=sum(rps.values()) * rows / 1e3,
            rows_per_request=rows,
            queued_rows=sum(obs.queue_depth.values()) * rows,
            target_ms=target,
            delay_ms=delay_ms,
            offset_ms=0.0,  # per variant, see _offset
            tail=t.tail_factor,
        )
        return Period(
            load,
            {lv: r * rows / 1e3 for lv, r in rps.items()},
            sum(rps.values()),
            slo_ms,
            breach,
            self._over(model, t.latency_margin),
            model.window.percentile(50),
            model.window.percentile(99),
            model.busy,
        )

    def _over(self, model: ModelMemory, fraction: float) -> str:
        """Which level's measured p99 exceeds `fraction` of its target, if any (with enough samples to say)."""
        window = model.window
        for level in sorted(window.levels()):
            count, limit = window.count(level), model.slo.target_ms(level) * fraction
            if limit > 0 and count >= self.tuning.min_samples and window.exceeding(limit, level) > max(2, 0.01 * count):
                return f"measured p99 {window.percentile(99, level):.1f} ms > {limit:g} ms at priority {level}"
        return ""

    def _decision(
        self, model: ModelMemory, at_s: float, active: Setpoint, setpoint: Setpoint, reason: Reason, detail: str,
        p: Period, predicted: float | None = None, plan: Plan | None = None,
    ) -> Decision:
        changed = setpoint != active
        if reason is Reason.HOLD and changed:
            reason = Reason.RETUNE
        utilisation, inflight = p.busy, 0
        if plan is not None and plan.capacity > 0:
            utilisation = plan.utilisation
            # Little's law: what the plan serves per ms times the time a request may spend inside.
            inflight = int(plan.capacity / p.load.rows_per_request * p.load.target_ms)
        return Decision(
            model.info.name, at_s, setpoint, changed, reason, detail, p.p50, p.p99, predicted, p.request_rps,
            utilisation, inflight,
        )

    def _off(self, model: ModelMemory, at_s: float, active: Setpoint, p: Period) -> Decision:
        """Off (or no SLO): hand back the configured knobs once, then only observe."""
        setpoint = active
        detail = "controller off" if model.slo.p99_ms > 0 else "no SLO set"
        if model.engaged:
            setpoint, model.engaged = model.info.configured, False
            detail += ": configured knobs restored"
        model.shedding, model.scale, model.fit_since = False, 1.0, None
        return self._decision(model, at_s, active, setpoint, Reason.OFF, detail, p)

    # -- choosing -------------------------------------------------------------------------
    def _candidates(self, model: ModelMemory, active: Setpoint) -> list[str]:
        """Variants the mode allows, most accurate first.

        Accuracies closer than `accuracy_resolution` to each other are ties (a
        few hundred validation samples cannot tell them apart); a tie goes to
        the variant that agrees most with the reference. Unmeasured ones come last.
        """
        if model.slo.mode is Mode.BATCH:
            return [active.variant] if active.variant in model.latency else [model.info.configured.variant]
        floor = model.slo.min_accuracy
        allowed = [
            v for v in model.info.variants if (v.accuracy is None and floor == 0) or (v.accuracy or 0.0) >= floor
        ]
        best = max((v.accuracy for v in allowed if v.accuracy is not None), default=0.0)
        resolution = self.tuning.accuracy_resolution

        def rank(v: VariantInfo) -> tuple[bool, float, float]:
            below = math.inf if v.accuracy is None else (best - v.accuracy) // resolution
            return v.accuracy is None, below, -v.agreement

        return [v.name for v in sorted(allowed, key=rank)] or [active.variant]

    def _control(self, model: ModelMemory, at_s: float, active: Setpoint, p: Period) -> Decision:
        candidates = self._candidates(model, active)
        if not any(model.latency[v].known() for v in candidates if v in model.latency):
            return self._decision(model, at_s, active, active, Reason.WARMUP, "no profile or measured batch yet", p)
        drift = model.drift.value or 1.0
        limit = max(model.info.max_batch_size, 1)
        self._learn_offset(model, active, p, drift)
        loads = {v: replace(p.load, offset_ms=self._offset(model, v)) for v in candidates}
        plans = {
            v: self._ceiled(model, at_s, v, plan_variant(v, Line(*model.latency[v].line(drift)), loads[v],
                                                         model.info.instances, limit), p.load.rate)
            for v in candidates
            if model.latency[v].known()
        }
        routed = self._route(model, at_s, active, plans, candidates, p, drift)
        if routed is not None:
            return routed
        slowed = self._slowed(model, at_s, active.variant, plans, loads, drift)
        if not any(plan.max_batch for plan in plans.values()):
            fastest = min(plans.values(), key=lambda plan: plan.batch_ms)
            setpoint = self._setpoint(model, fastest, active, p, loads[fastest.variant], shedding=False)
            offset = loads[fastest.variant].offset_ms  # the time outside the batch: transport, host, queueing
            detail = (f"{fastest.variant} needs {fastest.batch_ms:.2f} ms a batch and {offset:.1f} ms measured beyond "
                      f"it (transport, host); p99 {p.slo_ms:g} ms is out of reach")
            return self._decision(model, at_s, active, setpoint, Reason.UNATTAINABLE, detail, p)
        plan, reason, why = self._choose(model, at_s, active, plans, slowed, p)
        if reason is Reason.SHED:
            self._adapt_scale(model, p)
        setpoint = self._setpoint(model, plan, active, p, loads[plan.variant], shedding=reason is Reason.SHED)
        model.drain_s = plan.drain_s(p.load.queued_rows)
        return self._decision(model, at_s, active, setpoint, reason, describe(why, plan, setpoint, p), p,
                              None if math.isinf(plan.predicted_p99_ms) else plan.predicted_p99_ms, plan)

    def _choose(
        self, model: ModelMemory, at_s: float, active: Setpoint, plans: dict[str, Plan], slowed: dict[str, Plan],
        p: Period,
    ) -> tuple[Plan, Reason, str]:
        """`plans` for holding and moving up; `slowed` (see `_slowed`) for moving down and shedding."""
        t, target = self.tuning, p.load.target_ms
        ranked = [plans[v] for v in plans]  # most accurate first
        down = [slowed[v] for v in plans]
        current = plans.get(active.variant)
        fastest = max(down, key=lambda plan: plan.capacity)
        if model.shedding:
            fits = [plan for plan in down if plan.fits(t.settle_utilisation, target)]
            if not fits or p.breach:
                model.fit_since = None
                return fastest, Reason.SHED, p.breach or "no variant holds the SLO at the offered load"
            if self._held(model, at_s):
                model.shedding = False
                up = [plan for plan in fits if plan.fits(t.up_utilisation, target)]
                return (up or fits)[0], Reason.UP, "load fell: the SLO holds without shedding"
            return fastest, Reason.SHED, "load falling: waiting out the hold before admitting all"
        # A measured breach with the variant lightly loaded and no backlog is not the variant's doing
        # (a stall of the host, the transport): a faster variant would not help, so it is not acted on.
        breach = p.breach if current is None or self._load_explains(model, current, p) else ""
        if current is not None and not breach and current.fits(t.leave_utilisation, p.slo_ms):
            if p.breach:
                model.fit_since = None
                why = f"{p.breach}, not explained by the load (utilisation {current.utilisation:.2f}): holding"
                return current, Reason.HOLD, why
            index = ranked.index(current)
            better = [plan for plan in ranked[:index] if plan.fits(t.up_utilisation, target)]
            if not better:
                model.fit_since = None
                return current, Reason.HOLD, "holding"
            if self._held(model, at_s):
                return better[0], Reason.UP, f"{better[0].variant} is more accurate and holds the SLO with margin"
            return current, Reason.HOLD, f"{better[0].variant} fits; holding until it has for {t.up_hold_s:g} s"
        model.fit_since = None
        pool = down
        if breach and current is not None:
            pool = [plan for plan in down if plan.capacity > 1.1 * current.capacity]
        for plan in pool:
            if plan.fits(t.settle_utilisation, target):
                if breach:
                    if current is not None:
                        model.ceilings[current.variant] = (p.load.rate, at_s)
                    return plan, Reason.DOWN_OBSERVED, breach
                return plan, Reason.DOWN_PREDICTED, why_down(active.variant, current)
        model.shedding, model.scale = True, 1.0
        return fastest, Reason.SHED, breach or "no variant holds the SLO at the offered load"

    def _route(
        self, model: ModelMemory, at_s: float, active: Setpoint, plans: dict[str, Plan], ranked: list[str], p: Period,
        drift: float,
    ) -> Decision | None:
        """Priority 1 on a pool of its own (route.py) when that lets the rest run a more accurate variant than
        sharing every instance, or run at all without shedding; sharing again once it has matched the split
        for `up_hold_s`."""
        t, info = self.tuning, model.info
        if model.slo.mode is not Mode.FULL or len(info.pools) < 2:
            return None
        keep = active.route is not None
        targets = {lv: model.slo.target_ms(lv) * t.latency_margin for lv in range(1, info.priority_levels + 1)}
        split = best_split(
            info.pools, ranked, lambda v, device: model.line(v, device, drift),
            replace(p.load, offset_ms=self._offset(model, active.variant)), p.rates, targets,
            max(info.max_batch_size, 1), t.leave_utilisation if keep else t.settle_utilisation,
            info.configured.max_queue_delay_us / 1e3, t.max_delay_share,
        )
        if split is None:
            return None
        fits = t.up_utilisation if keep else t.settle_utilisation
        shared = next((plan for plan in plans.values() if plan.fits(fits, p.load.target_ms)), None)
        if shared is not None and ranked.index(shared.variant) <= ranked.index(split.bulk.variant):
            if not keep or self._held(model, at_s):
                return None
        else:
            model.fit_since = None
        model.shedding, route = False, split.route
        model.drain_s = split.bulk.drain_s(p.load.queued_rows)  # the bulk side holds the whole queue
        batch = split.bulk.max_batch if info.max_batch_size else 0
        setpoint = Setpoint(split.bulk.variant, batch, round(split.bulk_delay_ms * 1e3), (), route)
        was = active.route
        if was is not None and (active.variant, was.instances, was.variant) == (setpoint.variant, route.instances,
                                                                                route.variant):
            setpoint = active  # the same split: small moves of its batch limits are not worth a change
        detail = (f"priority 1 on instances {', '.join(map(str, route.instances))} with {route.variant} (batch <= "
                  f"{route.max_batch_size}, predicted p99 {split.reserved.predicted_p99_ms:.1f} ms); the other "
                  f"levels on the rest with {split.bulk.variant} (batch <= {split.bulk.max_batch})")
        return self._decision(model, at_s, active, setpoint, Reason.ROUTE, detail, p, split.bulk.predicted_p99_ms,
                              split.bulk)

    def _slowed(
        self, model: ModelMemory, at_s: float, active: str, plans: dict[str, Plan], loads: dict[str, Load],
        drift: float,
    ) -> dict[str, Plan]:
        """The candidates as a move down sees them: slowed against their profiles at least as much as the active
        variant is now. What slows the active variant under load (cores taken by the transport, by the load's own
        clients, by a neighbour) slows any other the same way, while a candidate's own scale dates from when it
        last ran, maybe on a quieter machine. Measured under a 3x step: the fastest variant's batches ran at 3x its
        profile, and a move "down" for a measured breach went to a variant whose older scale made it look faster,
        broke the SLO there, and walked on for seconds."""
        current = model.latency.get(active)
        if current is None or current.profiled_ms(1) is None:
            return plans
        floor = current.scale(drift)
        out = {}
        for name, plan in plans.items():
            latency = model.latency[name]
            own = latency.scale(drift)
            if latency.profiled_ms(1) is None or own >= floor or own <= 0:
                out[name] = plan
                continue
            intercept, slope = latency.line(drift)
            line = Line(intercept * floor / own, slope * floor / own)
            planned = plan_variant(name, line, loads[name], model.info.instances, max(model.info.max_batch_size, 1))
            out[name] = self._ceiled(model, at_s, name, planned, loads[name].rate)
        return out

    def _ceiled(self, model: ModelMemory, at_s: float, variant: str, plan: Plan, rate: float) -> Plan:
        """A variant left because its measured p99 broke the SLO at some load is not trusted above that load
        for `breach_memory_s`, whatever the estimate says: what the estimate misses (cores taken by the
        transport, a neighbour) is still there, and moving back up would only break the SLO again."""
        ceiling = model.ceilings.get(variant)
        if ceiling is None:
            return plan
        if at_s - ceiling[1] > self.tuning.breach_memory_s:
            del model.ceilings[variant]
            return plan
        if ceiling[0] >= plan.capacity or ceiling[0] <= 0:
            return plan
        return replace(plan, capacity=ceiling[0], utilisation=rate / ceiling[0])

    def _load_explains(self, model: ModelMemory, current: Plan, p: Period) -> bool:
        """Whether the active variant is busy enough, or the queue long enough, to account for slow answers."""
        backlog = p.load.queued_rows > model.info.instances * max(current.max_batch, 1)
        return current.utilisation >= self.tuning.breach_utilisation or backlog

    def _held(self, model: ModelMemory, at_s: float) -> bool:
        """Whether the condition being timed has held for `up_hold_s` (starting the timer if it was not running)."""
        if model.fit_since is None:
            model.fit_since = at_s
        if at_s - model.fit_since >= self.tuning.up_hold_s:
            model.fit_since = None
            return True
        return False

    def _learn_offset(self, model: ModelMemory, active: Setpoint, p: Period, drift: float) -> None:
        """What the latencies show beyond the queueing estimate, measured while the load is moderate."""
        t = self.tuning
        latency = model.latency.get(active.variant)
        if latency is None or not latency.known() or p.p99 is None or model.shedding:
            return
        if model.window.count() < t.min_samples:
            return
        line = Line(*latency.line(drift))
        batch = max(active.max_batch_size, 1)
        if p.load.rate * line.ms(batch) / (model.info.instances * batch) > t.offset_utilisation:
            return
        unexplained = predict_p99(line, replace(p.load, offset_ms=0.0), model.info.instances, batch)
        if math.isfinite(unexplained):
            offset = model.offsets.setdefault(active.variant, Ewma(0.2))
            offset.add(min(max(p.p99 - unexplained, 0.0), 0.5 * p.slo_ms))

    @staticmethod
    def _offset(model: ModelMemory, variant: str) -> float:
        """A variant's own offset once it has run; before that, the smallest any variant showed.

        Per variant, because part of what the estimate misses (the spread of batch
        times) grows with the variant's cost: a slow variant's offset applied to a
        fast one would keep the fast one from ever looking good, and the other way
        round would send the controller back up to a variant that just failed.
        """
        own = model.offsets.get(variant)
        if own is not None and own.value is not None:
            return own.value
        return min((o.value for o in model.offsets.values() if o.value is not None), default=0.0)

    def _setpoint(
        self, model: ModelMemory, plan: Plan, active: Setpoint, p: Period, load: Load, shedding: bool
    ) -> Setpoint:
        t = self.tuning
        batch = max(plan.max_batch, 1)
        same = plan.variant == active.variant
        if same and (1 - t.batch_hysteresis) * batch <= active.max_batch_size <= (1 + t.batch_hysteresis / 2) * batch:
            batch = active.max_batch_size  # small steps are not worth a change: the margin covers them
        if model.info.max_batch_size == 0:
            batch = 0
        limits: tuple[tuple[int, int], ...] = ()
        if shedding:
            levels = range(1, model.info.priority_levels + 1)
            targets = {lv: model.slo.target_ms(lv) * t.latency_margin for lv in levels}
            limits = admission_limits(plan, p.rates, targets, load, model.info.instances, model.scale)
            if same and _close(limits, active.admission_limits, t.batch_hysteresis):
                limits = active.admission_limits
        return Setpoint(plan.variant, batch, round(p.load.delay_ms * 1e3), limits)

    @staticmethod
    def _restart_window(model: ModelMemory, at_s: float) -> None:
        """Latencies under the old setting say nothing about the new one."""
        model.window.clear()
        model.since_s = at_s

    def _adapt_scale(self, model: ModelMemory, p: Period) -> None:
        """Shrink the capacity lower levels may share while the measured p99 eats into the margin; grow it back
        while latencies stay well inside."""
        if p.strained:
            model.scale = max(model.scale * 0.8, 0.25)
            self._restart_window(model, model.last_at or 0.0)  # judge the new limits on their own latencies
        elif p.p99 is not None and model.window.count() >= self.tuning.min_samples and p.p99 < 0.7 * p.slo_ms:
            model.scale = min(model.scale * 1.1, 1.0)


def _surge(rate: float, base: float, span_s: float, sigmas: float) -> bool:
    """Whether `rate` over the last `span_s` is more arrivals than a Poisson stream at `base` gives, beyond
    `sigmas` standard deviations (with at least one arrival expected: a start from idle is a surge too)."""
    expected = max(base * span_s, 1.0)
    return rate * span_s > expected + sigmas * math.sqrt(expected)


def _close(new: tuple[tuple[int, int], ...], old: tuple[tuple[int, int], ...], tolerance: float) -> bool:
    """Same levels and every limit within `tolerance` of the old one, or within two requests of it."""
    if [lv for lv, _ in new] != [lv for lv, _ in old]:
        return False
    pairs = zip(new, old, strict=True)
    return all(abs(a - b) <= max(tolerance * max(a, b), 2) for (_, a), (_, b) in pairs)
