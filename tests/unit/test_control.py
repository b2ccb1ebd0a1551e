"""The SLO controller as a pure function: synthetic observations in, decisions out, no threads or clocks.

The variants have affine profiles (fixed ms per batch + ms per row), so the
capacity each one sustains within the SLO is known in closed form and the
tests can place the offered load exactly below or above it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tidal.clock import FakeClock
from tidal.control.api import Mode, ModelInfo, Reason, Setpoint, Slo, VariantInfo
from tidal.control.loop import ControlLoop
from tidal.control.plan import Line, Load, largest_batch
from tidal.control.slo import SloController, Tuning
from tidal.errors import InvalidArgument
from tidal.types import BatchSample, LatencySample, Observation

SIZES = (1, 8, 32, 128)
PERIOD = 0.1
SLO_MS = 20.0
LINES = {"fp32": (0.5, 0.2), "int8": (0.3, 0.05), "pruned": (0.1, 0.01)}  # (ms per batch, ms per row)
ACCURACY = {"fp32": (0.98, 1.0), "int8": (0.97, 0.99), "pruned": (0.90, 0.93)}


def variant(name: str, accuracy: float | None = None, agreement: float | None = None) -> VariantInfo:
    a, c = LINES[name]
    acc, agree = ACCURACY[name]
    return VariantInfo(
        name,
        acc if accuracy is None else accuracy,
        agree if agreement is None else agreement,
        SIZES,
        tuple(a + c * b for b in SIZES),
    )


def capacity_rps(name: str, slo_ms: float = SLO_MS) -> float:
    """Requests (of one row) per second the controller believes `name` sustains within the SLO."""
    tuning = Tuning()
    line = Line(*LINES[name])
    load = Load(0.0, 1.0, 0.0, slo_ms * tuning.latency_margin, 0.0, 0.0, tuning.tail_factor)
    batch = largest_batch(line, load, 128)
    return batch / line.ms(batch) * 1e3


class Sim:
    """Feeds one model's controller with observations at a given request rate and applies its decisions."""

    def __init__(self, slo: Slo | None = None, variants=None, levels: int = 1, tuning: Tuning | None = None,
                 max_batch: int = 128) -> None:
        self.controller = SloController(tuning)
        variants = variants or (variant("fp32"), variant("int8"), variant("pruned"))
        self.configured = Setpoint(variants[0].name, max_batch, 0)
        info = ModelInfo("m:1", max_batch, 1, levels, tuple(variants), self.configured)
        self.controller.track("m:1", info, slo or Slo(SLO_MS, mode=Mode.FULL))
        self.active = self.configured
        self.now = 0.0
        self.arrived = dict.fromkeys(range(1, levels + 1), 0)
        self.shed = dict.fromkeys(range(1, levels + 1), 0)
        self.decisions = []

    def run(self, rps: float | dict[int, float], seconds: float, latencies_ms: float | None = None,
            slowdown: float | None = None, queued: int = 0, rng: np.random.Generator | None = None) -> list:
        """`rps` per level (a float goes to level 1); optional synthetic latencies, and batches of 8 rows
        that take `slowdown` times what the active variant's profile says; Poisson arrivals with `rng`."""
        rates = rps if isinstance(rps, dict) else {1: rps}
        changed = []
        for _ in range(round(seconds / PERIOD)):
            self.now += PERIOD
            for level, rate in rates.items():
                self.arrived[level] += int(rng.poisson(rate * PERIOD)) if rng is not None else round(rate * PERIOD)
            count = round(sum(rates.values()) * PERIOD)
            lats = () if latencies_ms is None else tuple(
                LatencySample(1, latencies_ms / 1e3, 0.0) for _ in range(count)
            )
            a, c = LINES[self.active.variant]
            batch = BatchSample(8, (slowdown or 1.0) * (a + 8 * c) / 1e3, self.active.variant)
            batches = () if slowdown is None else (batch,) * 4
            obs = Observation(self.now, {1: queued}, 0, dict(self.arrived), 0, 0, batches, lats, dict(self.shed))
            decision = self.controller.step("m:1", obs, self.active)
            self.decisions.append(decision)
            if decision.changed:
                self.active = decision.setpoint
                changed.append(decision)
        return changed

    def variants_seen(self) -> list[str]:
        out = [self.configured.variant]
        for d in self.decisions:
            if d.changed and d.setpoint.variant != out[-1]:
                out.append(d.setpoint.variant)
        return out


def test_serves_the_most_accurate_variant_that_holds_the_slo() -> None:
    fp32, int8 = capacity_rps("fp32"), capacity_rps("int8")
    sim = Sim()
    sim.run(0.3 * fp32, 3)
    assert sim.active.variant == "fp32"
    sim.run(0.6 * int8, 1)
    assert sim.active.variant == "int8"
    sim.run(2 * int8, 1)
    assert sim.active.variant == "pruned"
    assert not sim.active.admission_limits


def test_moves_down_within_a_few_periods_and_up_only_after_the_hold() -> None:
    fp32 = capacity_rps("fp32")
    sim = Sim()
    sim.run(0.3 * fp32, 3)
    changed = sim.run(3 * fp32, 1)
    assert changed and changed[0].reason is Reason.DOWN_PREDICTED
    assert changed[0].at_s - 3.0 <= 3 * PERIOD + 1e-9
    assert sim.active.variant != "fp32"
    before_hold = sim.run(0.3 * fp32, Tuning().up_hold_s)  # the long rate window still remembers the peak
    assert all(d.setpoint.variant != "fp32" for d in before_hold)
    sim.run(0.3 * fp32, 4)
    assert sim.active.variant == "fp32"
    up = [d for d in sim.decisions if d.changed and d.reason is Reason.UP]
    assert up and "more accurate" in up[-1].detail


def test_noisy_load_near_a_threshold_does_not_flap() -> None:
    fp32 = capacity_rps("fp32")
    sim = Sim()
    sim.run(0.7 * fp32, 2)  # between the up and the leave thresholds
    start = len(sim.variants_seen())
    for i in range(60):
        sim.run((0.7 + (0.1 if i % 2 else -0.1)) * fp32, 0.5)
    assert len(sim.variants_seen()) == start


def test_slow_ramp_switches_a_few_times_per_direction() -> None:
    fp32 = capacity_rps("fp32")
    sim = Sim()
    steps = 60
    for i in range(steps + 1):
        sim.run((0.2 + 2.8 * i / steps) * fp32, 1)
    up_ramp = sim.variants_seen()
    for i in range(steps, -1, -1):
        sim.run((0.2 + 2.8 * i / steps) * fp32, 1)
    sim.run(0.2 * fp32, 5)
    down_ramp = sim.variants_seen()[len(up_ramp) - 1:]
    assert up_ramp[0] == "fp32" and up_ramp[-1] != "fp32"
    assert len(up_ramp) - 1 <= 2 and len(down_ramp) - 1 <= 2
    assert down_ramp[-1] == "fp32"


def test_overload_sheds_the_lowest_priority_first() -> None:
    pruned = capacity_rps("pruned")
    sim = Sim(levels=3)
    sim.run({1: 0.2 * pruned, 2: 0.2 * pruned, 3: 0.2 * pruned}, 1)
    assert not sim.active.admission_limits
    sim.run({1: 0.3 * pruned, 2: 0.8 * pruned, 3: 0.6 * pruned}, 1)
    limits = dict(sim.active.admission_limits)
    assert sim.active.variant == "pruned"
    assert sim.decisions[-1].reason is Reason.SHED
    assert limits[1] > limits[2] > 0 and limits[3] == 0  # levels 1+2 use it all: nothing is left for level 3
    sim.run({1: 1.2 * pruned, 2: 0.5 * pruned, 3: 0.5 * pruned}, 1)
    limits = dict(sim.active.admission_limits)
    assert limits[1] > 0 and limits[2] == limits[3] == 0


def test_measured_strain_while_shedding_squeezes_the_lower_levels_only() -> None:
    pruned = capacity_rps("pruned")
    sim = Sim(levels=2)
    sim.run({1: 0.5 * pruned, 2: pruned}, 1)
    before = dict(sim.active.admission_limits)
    sim.run({1: 0.5 * pruned, 2: pruned}, 2, latencies_ms=0.95 * SLO_MS)  # inside the SLO, not its margin
    after = dict(sim.active.admission_limits)
    assert after[1] == before[1] and after[2] < before[2]


def test_shedding_ends_once_load_falls_and_the_hold_passes() -> None:
    pruned, fp32 = capacity_rps("pruned"), capacity_rps("fp32")
    sim = Sim(levels=2)
    sim.run({1: pruned, 2: pruned}, 2)
    assert sim.active.admission_limits
    sim.run({1: 0.1 * fp32, 2: 0.1 * fp32}, 2.5)  # the rate windows and then the hold
    sim.run({1: 0.1 * fp32, 2: 0.1 * fp32}, 1)
    assert not sim.active.admission_limits
    assert sim.active.variant == "fp32"


def test_a_measured_breach_moves_to_a_faster_variant_even_when_the_estimate_is_content() -> None:
    sim = Sim()
    fp32 = capacity_rps("fp32")
    sim.run(0.55 * fp32, 2, latencies_ms=5.0)  # busy enough that slow answers may be the variant's doing
    assert sim.active.variant == "fp32"
    changed = sim.run(0.55 * fp32, 1, latencies_ms=3 * SLO_MS)
    assert changed[0].reason is Reason.DOWN_OBSERVED
    assert "measured p99" in changed[0].detail
    assert sim.active.variant in ("int8", "pruned")


def test_a_breach_under_a_step_goes_to_the_variant_that_fits_the_new_rate_at_once() -> None:
    """The rate spans lag a step; with the SLO measured broken, the latest period's rate chooses, so the move
    lands on the variant that serves the step instead of walking there one variant per period."""
    sim = Sim()
    fp32, int8, pruned = capacity_rps("fp32"), capacity_rps("int8"), capacity_rps("pruned")
    step = 1.3 * int8
    assert step < 0.7 * pruned
    sim.run(0.3 * fp32, 3, latencies_ms=5.0)
    assert sim.active.variant == "fp32"
    changed = sim.run(step, PERIOD, latencies_ms=3 * SLO_MS)  # the step's first period, answered late
    assert changed and sim.variants_seen() == ["fp32", "pruned"]


def test_a_step_lands_on_the_variant_that_fits_it_before_any_answer_is_late() -> None:
    """The latest period's arrivals, far beyond what the long span's rate gives as noise, are the load now."""
    sim = Sim()
    fp32, int8, pruned = capacity_rps("fp32"), capacity_rps("int8"), capacity_rps("pruned")
    step = 1.3 * int8
    assert step < 0.7 * pruned
    sim.run(0.3 * fp32, 3, latencies_ms=5.0)
    changed = sim.run(step, PERIOD, latencies_ms=5.0)  # the step's first period, nothing late yet
    assert changed and changed[0].reason is Reason.DOWN_PREDICTED and sim.variants_seen() == ["fp32", "pruned"]


def test_a_slowed_host_does_not_send_the_fastest_variant_to_a_slower_one() -> None:
    """Under load the fastest variant's batches run 6x its profile; int8 has not run since the host was quiet.
    Nothing is faster than pruned, so it stays and sheds: int8, slowed as much, would serve even less."""
    sim = Sim()
    fp32, int8 = capacity_rps("fp32"), capacity_rps("int8")
    sim.run(0.3 * fp32, 3, latencies_ms=5.0)
    sim.run(1.3 * int8, 2, latencies_ms=5.0)
    assert sim.active.variant == "pruned"
    sim.run(1.3 * int8, 1, latencies_ms=5.0, slowdown=6.0)
    sim.run(1.3 * int8, 1, latencies_ms=3 * SLO_MS, slowdown=6.0)
    assert sim.variants_seen() == ["fp32", "pruned"] and sim.active.admission_limits


def test_poisson_noise_is_not_taken_for_a_step() -> None:
    fp32 = capacity_rps("fp32")
    sim = Sim()
    sim.run(0.75 * fp32, 60, latencies_ms=5.0, rng=np.random.default_rng(7))  # 0.85 leaves: 13% above, 2.5 sigma
    assert sim.variants_seen() == ["fp32"]


def test_a_variant_that_broke_the_slo_is_not_trusted_again_at_that_load_for_a_while() -> None:
    sim = Sim()
    fp32 = capacity_rps("fp32")
    sim.run(0.55 * fp32, 2, latencies_ms=5.0)
    sim.run(0.55 * fp32, 1, latencies_ms=3 * SLO_MS)
    assert sim.active.variant != "fp32"
    sim.run(0.55 * fp32, 20, latencies_ms=5.0)  # the estimate says fp32 fits (utilisation 0.55 < 0.6)
    assert sim.active.variant != "fp32"
    sim.run(0.55 * fp32, 15, latencies_ms=5.0)  # the memory of the breach has expired
    assert sim.active.variant == "fp32"


def test_a_measured_breach_at_light_load_is_held_not_chased() -> None:
    sim = Sim()
    fp32 = capacity_rps("fp32")
    sim.run(0.2 * fp32, 2, latencies_ms=5.0)
    sim.run(0.2 * fp32, 1, latencies_ms=3 * SLO_MS)  # a stalled host: a faster variant would not help
    assert sim.active.variant == "fp32"
    assert "not explained by the load" in sim.decisions[-1].detail


def test_measured_batch_times_correct_a_drifted_profile() -> None:
    fp32 = capacity_rps("fp32")
    sim = Sim()
    rate = 0.5 * fp32
    sim.run(rate, 3, slowdown=1.0)
    assert sim.active.variant == "fp32"
    sim.run(rate, 5, slowdown=4.0)  # the machine got four times slower; corrected within a half-life
    assert sim.active.variant == "int8"  # 4x slower, int8 still has room for this rate
    assert not sim.active.admission_limits


def test_a_breach_the_load_does_not_explain_is_not_answered_by_shedding() -> None:
    sim = Sim(variants=(variant("pruned"),))
    sim.run(200, 2, latencies_ms=1.0)
    changed = sim.run(200, 1, latencies_ms=3 * SLO_MS)  # e.g. a noisy neighbour, at 1% of capacity
    assert not sim.active.admission_limits
    assert "not explained by the load" in sim.decisions[-1].detail
    assert all(d.reason is not Reason.SHED for d in changed)


def test_the_backlog_a_switch_leaves_behind_is_not_blamed_on_the_new_variant() -> None:
    slo = 1000.0
    fp32 = capacity_rps("fp32", slo)
    sim = Sim(Slo(slo, mode=Mode.FULL))
    sim.run(0.3 * fp32, 2)
    changed = sim.run(3 * fp32, 0.1, queued=20000)  # the step: 20,000 rows queued before the first look
    assert changed and sim.active.variant == "pruned"
    # Requests that arrived while those rows drained (about 0.22 s on pruned) took 1.5 s: not pruned's doing.
    sim.run(3 * fp32, 1.7, latencies_ms=1.5 * slo)
    assert all("measured" not in d.detail for d in sim.decisions[-17:])


def test_a_variant_measured_slow_is_remembered_while_it_rests() -> None:
    fp32 = capacity_rps("fp32")
    sim = Sim()
    sim.run(0.3 * fp32, 6, slowdown=4.0)
    assert sim.active.variant != "fp32"
    sim.run(0.3 * fp32, 10)  # no fp32 batch since: its profile alone would say it fits again
    assert sim.active.variant != "fp32"


def test_accuracy_floor_is_never_crossed_shedding_instead() -> None:
    int8 = capacity_rps("int8")
    sim = Sim(Slo(SLO_MS, min_accuracy=0.95, mode=Mode.FULL))
    sim.run(3 * int8, 2)
    assert sim.active.variant == "int8"
    assert sim.active.admission_limits
    assert "pruned" not in sim.variants_seen()


def test_batch_mode_retunes_knobs_but_never_the_variant() -> None:
    fp32 = capacity_rps("fp32")
    sim = Sim(Slo(SLO_MS, mode=Mode.BATCH))
    sim.run(0.3 * fp32, 1)
    assert sim.active.variant == "fp32" and sim.active.max_batch_size < 128
    sim.run(3 * fp32, 1)
    assert sim.active.variant == "fp32"
    assert sim.active.admission_limits


def test_turning_on_forgets_latencies_seen_while_off() -> None:
    sim = Sim(Slo(SLO_MS, mode=Mode.OFF))
    sim.run(100, 1, latencies_ms=10 * SLO_MS)  # e.g. an overload test while it was off
    sim.controller.set_slo("m:1", Slo(SLO_MS, mode=Mode.FULL))
    sim.run(100, 0.2)
    assert all(d.reason is not Reason.DOWN_OBSERVED for d in sim.decisions)
    assert sim.active.variant == "fp32"


def test_turning_off_restores_the_configured_knobs_once() -> None:
    fp32 = capacity_rps("fp32")
    sim = Sim()
    sim.run(3 * fp32, 1)
    assert sim.active != sim.configured
    sim.controller.set_slo("m:1", Slo(SLO_MS, mode=Mode.OFF))
    changed = sim.run(3 * fp32, 1)
    assert [d.reason for d in changed] == [Reason.OFF]
    assert sim.active == sim.configured
    assert "restored" in changed[0].detail


def test_no_slo_means_no_control() -> None:
    sim = Sim(Slo(0.0, mode=Mode.FULL))
    assert sim.run(10 * capacity_rps("pruned"), 2) == []
    assert {d.reason for d in sim.decisions} == {Reason.OFF}


def test_accuracy_ties_go_to_the_variant_closest_to_the_reference() -> None:
    fp32 = capacity_rps("fp32")
    # int8 measured a hair more accurate (one validation sample) but agrees less with fp32.
    sim = Sim(variants=(variant("int8", 0.981, 0.97), variant("fp32"), variant("pruned")))
    sim.run(0.2 * fp32, 4)
    assert sim.active.variant == "fp32"


def test_an_slo_below_one_unloaded_batch_is_reported_not_shed() -> None:
    sim = Sim(Slo(0.1, mode=Mode.FULL))
    sim.run(100, 1)
    assert sim.decisions[-1].reason is Reason.UNATTAINABLE
    assert not sim.active.admission_limits


def test_observed_percentiles_and_rate_are_reported() -> None:
    sim = Sim()
    sim.run(500, 2, latencies_ms=4.0)
    last = sim.decisions[-1]
    assert last.observed_p50_ms == pytest.approx(4.0)
    assert last.observed_p99_ms == pytest.approx(4.0)
    assert last.arrival_rps == pytest.approx(500, rel=0.01)
    assert last.predicted_p99_ms is not None and math.isfinite(last.predicted_p99_ms)


def test_a_backlog_counts_against_the_active_variant() -> None:
    fp32 = capacity_rps("fp32")
    sim = Sim()
    sim.run(0.3 * fp32, 2)
    changed = sim.run(0.3 * fp32, 0.2, queued=2000)  # far more queued than one batch: the estimate sees the wait
    assert changed and changed[0].setpoint.variant != "fp32"


def test_history_keeps_the_changes_only() -> None:
    sim = Sim()
    sim.run(3 * capacity_rps("fp32"), 1)
    history = sim.controller.history("m:1")
    assert history and all(d.changed for d in history)
    assert len(sim.decisions) > len(history)


def test_slo_values_are_checked() -> None:
    nan, inf = float("nan"), float("inf")
    for bad in (
        {"p99_ms": -1},
        {"p99_ms": nan},
        {"p99_ms": inf},
        {"min_accuracy": 1.5},
        {"min_accuracy": nan},
        {"period_s": 0.001},
        {"period_s": nan},
        {"priority_p99_ms": {1: 0.0}},
        {"priority_p99_ms": {1: nan}},
    ):
        with pytest.raises(InvalidArgument):
            Slo(**bad)
    assert Slo(10.0, priority_p99_ms={2: 30.0}).target_ms(2) == 30.0
    assert not Slo(10.0).engaged and Slo(10.0, mode=Mode.BATCH).engaged


class _Plant:
    """A model under control; `broken` makes every observation fail."""

    def __init__(self, key: str, broken: bool = False) -> None:
        self.key, self.generation, self.broken = key, object(), broken
        self.setpoints = [Setpoint("fp32", 128, 0)]
        self.observed = 0

    def info(self) -> ModelInfo:
        return ModelInfo(self.key, 128, 1, 1, (variant("fp32"),), self.setpoints[0])

    def configured_slo(self) -> Slo:
        return Slo(SLO_MS, mode=Mode.FULL)

    def observe(self) -> Observation:
        if self.broken:
            raise ValueError("cannot convert float NaN to integer")
        self.observed += 1
        return Observation(self.observed * PERIOD, {1: 0}, 0, {1: 0}, 0, 0, (), (), {1: 0})

    def setpoint(self) -> Setpoint:
        return self.setpoints[-1]

    def apply(self, setpoint: Setpoint) -> None:
        self.setpoints.append(setpoint)


def test_a_failing_model_neither_stops_the_loop_nor_the_other_models(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    broken, healthy = _Plant("a:1", broken=True), _Plant("b:1")
    loop = ControlLoop(SloController(), lambda: [broken, healthy], clock)
    for _ in range(3):
        loop.tick()
        clock.advance(PERIOD)
    assert healthy.observed == 3
    assert caplog.text.count("controller a:1: step failed") == 1 and "NaN" in caplog.text
