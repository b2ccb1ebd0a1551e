"""The controller's parts: sliding windows, the online batch-latency model, the queueing plan, and the
admission limits the scheduler's queue enforces for it; plus the config fields that set it up."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tidal.control.latency import BatchLatency
from tidal.control.plan import Line, Load, admission_limits, largest_batch, plan_variant, predict_p99, steady_batch
from tidal.control.window import Ewma, LatencyWindow, RateMeter
from tidal.errors import ConfigError, InvalidArgument, ResourceExhausted
from tidal.repository.config import build_spec
from tidal.repository.pbtxt import parse_model_config
from tidal.scheduling.knobs import Knobs
from tidal.scheduling.queue import RequestQueue, SchedulerConfig
from tidal.types import LatencySample


def samples(level: int, *millis: float) -> list[LatencySample]:
    return [LatencySample(level, ms / 1e3, 0.0) for ms in millis]


def load(rate: float = 0.0, target: float = 17.0, **kw) -> Load:
    values = {"rate": rate, "rows_per_request": 1.0, "queued_rows": 0.0, "target_ms": target, "delay_ms": 0.0,
              "offset_ms": 0.0, "tail": 2.0, **kw}
    return Load(**values)


# -- windows ------------------------------------------------------------------------------
def test_latency_window_percentiles_per_level_and_expiry() -> None:
    window = LatencyWindow(span_s=2.0)
    window.add(0.0, samples(1, *range(1, 101)))
    window.add(1.0, samples(2, 500.0, 600.0))
    assert window.percentile(50, 1) == pytest.approx(50.0)
    assert window.percentile(99, 1) == pytest.approx(99.0)
    assert window.percentile(100) == pytest.approx(600.0)
    assert window.count() == 102 and window.levels() == {1, 2}
    assert window.exceeding(98.0, 1) == 2
    window.add(2.5, [])  # the first block is now older than the span
    assert window.count(1) == 0 and window.percentile(50, 1) is None
    assert window.count(2) == 2
    window.clear()
    assert window.count() == 0


def test_latency_window_drops_requests_that_arrived_before_a_switch() -> None:
    window = LatencyWindow(span_s=2.0)
    # Collected at 10.0, finished after 9.9: the 500 ms one arrived before 9.4, the 5 ms one after 9.895.
    window.add(10.0, samples(1, 500.0, 5.0), since_s=9.6, done_after_s=9.9)
    assert window.count() == 1 and window.percentile(50) == pytest.approx(5.0)


def test_rate_meter_differences_cumulative_counts_over_the_span() -> None:
    meter = RateMeter(span_s=2.0)
    assert meter.rate(1.0) == 0.0
    counts = {1: 0, 2: 0}
    for i in range(1, 31):  # 100/s on level 1 for 2 s, then 400/s; 10/s on level 2 throughout
        counts[1] += 10 if i <= 20 else 40
        counts[2] += 1
        meter.add(i * 0.1, counts)
    assert meter.rate(0.5, 1) == pytest.approx(400.0)
    assert meter.rate(2.0, 1) == pytest.approx((10 * 10 + 10 * 40) / 2.0)
    assert meter.rate(2.0, 2) == pytest.approx(10.0)
    assert meter.rate(0.5) == pytest.approx(410.0)
    assert meter.rate(60.0, 1) <= 400.0  # longer than the history: what there is


def test_a_handful_of_events_is_not_read_as_a_burst() -> None:
    meter = RateMeter(span_s=2.0)
    meter.add(0.0, {1: 0})
    meter.add(0.1, {1: 2})  # two arrivals 0.1 s apart
    assert meter.rate(0.3, 1) == pytest.approx(20.0)
    assert meter.rate(0.3, 1, min_events=20) == pytest.approx(2 / 0.3)
    meter.add(0.3, {1: 62})
    assert meter.rate(0.3, 1, min_events=20) == pytest.approx(62 / 0.3)


def test_ewma_starts_at_the_first_value() -> None:
    mean = Ewma(0.5)
    assert mean.value is None
    assert mean.add(4.0) == 4.0
    assert mean.add(0.0) == 2.0


# -- the batch-latency model -------------------------------------------------------------
def test_an_affine_profile_is_fitted_exactly() -> None:
    sizes = (1, 4, 16, 64)
    model = BatchLatency(sizes, [0.5 + 0.1 * b for b in sizes])
    intercept, slope = model.line()
    assert intercept == pytest.approx(0.5) and slope == pytest.approx(0.1)
    assert model.ms(32) == pytest.approx(3.7)
    assert model.line(drift=2.0) == pytest.approx((1.0, 0.2))


def test_measurements_pull_the_model_off_a_drifted_profile() -> None:
    sizes = (1, 4, 16, 64)
    model = BatchLatency(sizes, [0.5 + 0.1 * b for b in sizes])
    rng = np.random.default_rng(0)
    for _ in range(200):  # the machine is now three times slower
        rows = int(rng.integers(1, 64))
        model.add(rows, 3 * (0.5 + 0.1 * rows) / 1e3)
    assert model.ms(32) == pytest.approx(3 * 3.7, rel=0.05)
    assert model.measured_weight == pytest.approx(200)
    model.decay(dt_s=5.0, half_life_s=5.0)
    assert model.measured_weight == pytest.approx(100)
    assert model.ms(32) == pytest.approx(3 * 3.7, rel=0.05)  # decay alone leaves the fit where it is


def test_without_a_profile_the_model_learns_from_batches_alone() -> None:
    model = BatchLatency()
    assert not model.known()
    model.add(8, 0.004)
    assert model.known()
    assert model.ms(8) == pytest.approx(4.0)  # one size seen: proportional
    model.add(32, 0.010)
    model.add(32, 0.010)
    model.add(8, 0.004)
    assert model.line() == pytest.approx((2.0, 0.25))


def test_outliers_are_capped_near_the_prediction() -> None:
    sizes = (1, 64)
    model = BatchLatency(sizes, [1.0, 1.0 + 63 * 0.1])
    model.add(16, 10.0)  # a 10 s hiccup
    assert model.ms(16) < 5 * (1.0 + 16 * 0.1) + 1e-9


# -- the plan -----------------------------------------------------------------------------
def test_largest_batch_meets_the_target_with_the_tail_factor() -> None:
    line = Line(1.0, 0.1)
    # 2 * (1 + 0.1 b) <= 17  ->  b <= 75
    assert largest_batch(line, load(), 128) == 75
    assert largest_batch(line, load(), 32) == 32
    assert largest_batch(line, load(offset_ms=5.0), 128) == 50
    assert largest_batch(line, load(target=2.0), 128) == 0


def test_steady_batch_and_saturation() -> None:
    line = Line(1.0, 0.1)
    assert steady_batch(line, 5.0) == pytest.approx(5.0 * 1.0 / (1 - 0.5))
    assert math.isinf(steady_batch(line, 10.0))
    plan = plan_variant("v", line, load(rate=5.0), instances=1, limit=128)
    assert plan.max_batch == 75 and plan.capacity == pytest.approx(75 / 8.5)
    assert plan.utilisation == pytest.approx(5.0 / plan.capacity)
    assert plan.predicted_p99_ms == pytest.approx(2 * (1.0 + 0.1 * 10))
    assert math.isinf(plan_variant("v", line, load(rate=20.0), 1, 128).predicted_p99_ms)
    assert plan_variant("v", line, load(rate=5.0), instances=2, limit=128).utilisation == pytest.approx(
        plan.utilisation / 2
    )


def test_a_backlog_adds_its_drain_time() -> None:
    line = Line(1.0, 0.1)
    quiet = predict_p99(line, load(rate=1.0), 1, 10)
    backlog = predict_p99(line, load(rate=1.0, queued_rows=110.0), 1, 10)
    assert backlog - quiet == pytest.approx(100 / (10 / 2.0))


def test_admission_limits_give_lower_levels_only_what_higher_ones_leave() -> None:
    line = Line(1.0, 0.1)
    plan = plan_variant("v", line, load(), 1, 10)  # batches of 10 rows take 2 ms: 5 rows/ms
    targets = {1: 17.0, 2: 17.0, 3: 17.0}
    limits = dict(admission_limits(plan, {1: 2.0, 2: 2.0, 3: 2.0}, targets, load(), 1, 1.0))
    # floor(17 / 2) - 1 = 7 batches of 10 rows may wait; level 2 keeps 60%, level 3 20%.
    assert limits == {1: 70, 2: 42, 3: 14}
    limits = dict(admission_limits(plan, {1: 5.0, 2: 2.0, 3: 2.0}, targets, load(), 1, 1.0))
    assert limits == {1: 70, 2: 0, 3: 0}
    halved = dict(admission_limits(plan, {1: 1.0}, {1: 17.0, 2: 17.0}, load(), 1, 0.5))
    assert halved == {1: 70, 2: 42}  # the top level keeps its budget; level 2 shares 2.5 rows/ms, not 5
    tight = dict(admission_limits(plan, {}, {1: 17.0, 2: 3.0}, load(), 1, 1.0))
    assert tight[2] == 0  # its own target leaves no room for a wait


# -- what the scheduler's queue does with the limits --------------------------------------
def test_queue_refuses_at_arrival_by_the_count_at_or_above_the_level(make_request) -> None:
    queue = RequestQueue(SchedulerConfig(batching=True, max_batch_size=8, priority_levels=2))
    limits = ((1, 3), (2, 2))
    queue.admit(make_request(priority=1), 0.0, limits)
    queue.admit(make_request(priority=1), 0.0, limits)
    with pytest.raises(ResourceExhausted, match="shed at arrival to hold the latency SLO") as shed:
        queue.admit(make_request(priority=2), 0.0, limits, request_s=0.003)  # two of level 1 are ahead of it
    assert shed.value.pushback_ms == 6  # the time they take to drain
    queue.admit(make_request(priority=1), 0.0, limits)
    with pytest.raises(ResourceExhausted, match="priority 1"):
        queue.admit(make_request(priority=1), 0.0, limits)
    assert queue.shed_by_level() == {1: 1, 2: 1}
    queue.admit(make_request(priority=2), 0.0)  # no limits: admitted
    with pytest.raises(ResourceExhausted):
        queue.admit(make_request(priority=2), 0.0, ((2, 0),))  # 0 sheds the level entirely
    assert len(queue) == 4


def test_admission_limits_knob_is_validated() -> None:
    assert Knobs(8, 0, admission_limits=((2, 0), (1, 5))).admission_limits == ((2, 0), (1, 5))
    for bad in (((0, 1),), ((1, -1),), ((1, 2), (1, 3))):
        with pytest.raises(InvalidArgument):
            Knobs(8, 0, admission_limits=bad)


# -- config -------------------------------------------------------------------------------
def spec_of(tmp_path, text: str):
    path = tmp_path / "config.pbtxt"
    path.write_text('name: "m"\nmax_batch_size: 8\ndynamic_batching { priority_levels: 2 }\n' + text)
    return build_spec(parse_model_config(path).config)


def test_an_slo_turns_the_controller_on_unless_the_config_says_otherwise(tmp_path) -> None:
    assert spec_of(tmp_path, "").controller_mode == "off"
    spec = spec_of(tmp_path, "slo { p99_ms: 25 min_accuracy: 0.9 priority_p99_ms { key: 2 value: 80 } }")
    assert (spec.slo_p99_ms, spec.slo_min_accuracy, spec.controller_mode) == (25.0, 0.9, "full")
    assert spec.slo_priority_p99_ms == ((2, 80.0),)
    spec = spec_of(tmp_path, "slo { p99_ms: 25 }\ncontroller { mode: BATCH period_ms: 50 }")
    assert (spec.controller_mode, spec.controller_period_ms) == ("batch", 50)
    assert spec_of(tmp_path, "slo { p99_ms: 25 }\ncontroller { }").controller_mode == "off"


@pytest.mark.parametrize(
    "text",
    [
        "slo { p99_ms: -1 }",
        "slo { min_accuracy: 2 }",
        "slo { p99_ms: 10 priority_p99_ms { key: 3 value: 5 } }",
        "controller { period_ms: 5 }",
    ],
)
def test_bad_slo_config_names_the_field(tmp_path, text: str) -> None:
    with pytest.raises(ConfigError, match=r"slo|controller"):
        spec_of(tmp_path, text)
