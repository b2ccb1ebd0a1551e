"""The edge gate's rule, on a fake clock: priority order, adaptation to latency and transport delay."""

from __future__ import annotations

import pytest

from tidal.control.admission import MAX_DEMAND, AdmissionGate, GateTuning, saturation

STRICT = GateTuning(burst=1.0)  # no burst window: the rules below are about the limit itself


def fill(gate: AdmissionGate, level: int, count: int, now: float = 0.0) -> int:
    """Admit up to `count` requests of `level` at `now`; how many got in."""
    return sum(gate.admit(level, now) is None for _ in range(count))


def run_period(gate: AdmissionGate, now: float, latency_ms: float, delay_ms: float = 0.0, count: int = 20) -> float:
    """`count` requests admitted and answered after `latency_ms`, then the period closes; returns the new now."""
    for _ in range(count):
        if gate.admit(1, now) is None:
            gate.release(1, latency_ms / 1e3)
    now += gate.tuning.period_s
    gate.adapt(now, delay_ms)
    return now


def test_without_a_target_everything_is_admitted() -> None:
    gate = AdmissionGate(levels=2, tuning=STRICT)
    assert fill(gate, 2, 10_000) == 10_000
    assert gate.state().refused == {1: 0, 2: 0}


def test_lower_priorities_are_refused_first_and_higher_ones_keep_what_they_use() -> None:
    gate = AdmissionGate(levels=3, tuning=STRICT)
    gate.configure(target_ms=50, predicted=40)
    assert fill(gate, 3, 100) == 40  # alone, the lowest level may fill the whole limit
    assert gate.admit(1, 0.0) is not None  # ...and level 1 has to wait for a slot
    for _ in range(40):
        gate.release(3, 0.01)
    assert fill(gate, 1, 5) == 5  # level 1 in use: 5 in flight at its peak
    gate.adapt(0.0, 0.0)
    gate.adapt(gate.tuning.period_s, 0.0)  # a period closes: level 1 keeps 5 + 1
    limit = gate.limit  # it grew: the limit bound while latency was far inside the budget
    assert (gate.cap(1), gate.cap(2), gate.cap(3)) == (limit, limit - 6, limit - 6)
    assert fill(gate, 3, 100) == limit - 11  # what level 1's reserve leaves, minus its 5 in flight
    assert fill(gate, 2, 100) == 0
    assert fill(gate, 1, 100) == 6  # level 1 still finds room up to the whole limit
    refusal = gate.admit(1, 0.0)
    assert refusal is not None and refusal.level == 1 and refusal.inflight == limit
    gate.release(1, 0.01)
    assert gate.admit(1, 0.0) is None and gate.admit(3, 0.0) is not None  # a freed slot goes to the top level


def test_a_refused_level_takes_the_next_free_slots_even_without_a_reserve() -> None:
    """Level 1 sent nothing for a while (its calls were dropped before the gate, say): its reserve is gone and
    level 2 filled the limit. Its refusal reserves room at once, so level 2, arriving first each time a slot
    frees, is refused until level 1 has what it asked for: level 1 is not locked out period after period."""
    gate = AdmissionGate(levels=2, tuning=STRICT)
    gate.configure(target_ms=50, predicted=10)
    now = 0.0
    gate.adapt(now, 0.0)
    assert fill(gate, 2, 100) == 10 and gate.admit(1, 0.0) is not None  # the limit is full
    for _ in range(3):  # each time a slot frees, level 2 arrives first, then level 1; periods pass
        gate.release(2, 0.01)
        assert gate.admit(2, now) is not None and gate.admit(1, now) is None
        now += gate.tuning.period_s
        gate.adapt(now, 0.0)
    assert gate.state().refused == {1: 1, 2: 90 + 3}


def test_an_idle_level_gives_its_reserve_back() -> None:
    gate = AdmissionGate(levels=2, tuning=STRICT)
    gate.configure(target_ms=50, predicted=20)
    fill(gate, 1, 4)
    for _ in range(4):
        gate.release(1, 0.01)
    now = 0.0
    gate.adapt(now, 0.0)
    for _ in range(30):
        now += gate.tuning.period_s
        gate.adapt(now, 0.0)
    assert gate.cap(2) == 20


def test_the_limit_shrinks_while_latency_breaks_the_budget_left_by_the_transport() -> None:
    gate = AdmissionGate(levels=1, tuning=STRICT)
    gate.configure(target_ms=50, predicted=100)
    now = 0.0
    gate.adapt(now, 0.0)
    now = run_period(gate, now, latency_ms=40)  # inside 50 ms: no cut
    assert gate.limit == 100
    now = run_period(gate, now, latency_ms=40, delay_ms=20)  # the loop ate 20 ms: 40 > 30 left
    assert gate.limit == 80
    for _ in range(30):
        now = run_period(gate, now, latency_ms=200)
    assert gate.limit == gate.tuning.min_limit


def test_the_limit_grows_only_while_it_binds_and_never_past_twice_the_prediction() -> None:
    gate = AdmissionGate(levels=1, tuning=STRICT)
    gate.configure(target_ms=50, predicted=10)
    now = 0.0
    gate.adapt(now, 0.0)
    now = run_period(gate, now, latency_ms=5, count=8)  # fast, but the limit did not bind
    assert gate.limit == 10
    for _ in range(50):
        fill(gate, 1, 1000)  # the limit binds: refusals
        for _ in range(gate.state().inflight):
            gate.release(1, 0.005)
        now = run_period(gate, now, latency_ms=5)
    assert gate.limit == 20


def test_too_few_answers_in_a_period_change_nothing() -> None:
    gate = AdmissionGate(levels=1, tuning=STRICT)
    gate.configure(target_ms=50, predicted=30)
    gate.adapt(0.0, 0.0)
    run_period(gate, 0.0, latency_ms=500, count=3)
    assert gate.limit == 30


def test_pushback_follows_the_latest_p99() -> None:
    gate = AdmissionGate(levels=1, tuning=STRICT)
    gate.configure(target_ms=50, predicted=20)
    gate.adapt(0.0, 0.0)
    run_period(gate, 0.0, latency_ms=30)
    fill(gate, 1, 20)
    refusal = gate.admit(1, 0.0)
    assert refusal is not None and refusal.pushback_ms == 30


def test_a_jump_in_the_prediction_lifts_the_limit_at_once_and_drift_does_not() -> None:
    """A faster variant under a step of load: the gate admits what it can now serve in the next period, not
    after seconds of growing by a tenth; small moves of the prediction leave the measured limit alone."""
    gate = AdmissionGate(levels=1, tuning=STRICT)
    gate.configure(target_ms=50, predicted=24)
    now = 0.0
    gate.adapt(now, 0.0)
    for _ in range(3):
        now = run_period(gate, now, latency_ms=200)  # over budget: cut to 24 x 0.8^3
    assert gate.limit == 12
    gate.configure(target_ms=50, predicted=30)  # drift: the measurement stands
    assert gate.limit == 12
    gate.configure(target_ms=50, predicted=120)  # the controller switched variant
    assert gate.limit == 120
    assert fill(gate, 1, 200) == 120


def test_a_new_target_restarts_from_the_prediction() -> None:
    gate = AdmissionGate(levels=1, tuning=STRICT)
    gate.configure(target_ms=50, predicted=30)
    gate.configure(target_ms=20, predicted=12)
    assert gate.limit == 12
    gate.configure(target_ms=0)
    assert not gate.active and fill(gate, 1, 500) == 500



def test_a_burst_after_a_quiet_spell_is_let_in_up_to_twice_the_limit_within_one_target() -> None:
    """A stall of the host makes calls arrive in a clump at moderate load: they are answered late, not refused."""
    gate = AdmissionGate(levels=1)
    gate.configure(target_ms=50, predicted=10)
    assert fill(gate, 1, 100, now=5.0) == 20 and gate.state().refused == {1: 80}
    for _ in range(20):
        gate.release(1, 0.01)
    assert fill(gate, 1, 100, now=5.02) == 10  # a refusal ends the quiet: the limit alone holds
    for _ in range(10):
        gate.release(1, 0.01)
    assert fill(gate, 1, 100, now=6.1) == 20  # quiet for a second again: the next burst gets its window


def test_a_queue_that_stands_past_the_window_is_refused() -> None:
    gate = AdmissionGate(levels=1)
    gate.configure(target_ms=50, predicted=10)
    assert fill(gate, 1, 15, now=5.0) == 15  # the burst's first 5 over the limit get in
    assert fill(gate, 1, 1, now=5.03) == 1  # still within 50 ms of the first
    assert gate.admit(1, 5.06) is not None  # 60 ms on, 16 in flight: a standing queue, not a burst
    assert fill(gate, 1, 1, now=6.0) == 0  # and no new window until a quiet second has passed


def test_bursts_keep_priority_order() -> None:
    """A lower level's burst window is bounded by its own share: the reserve of the level above stays free."""
    gate = AdmissionGate(levels=2)
    gate.configure(target_ms=50, predicted=20)
    fill(gate, 1, 5, now=0.0)
    gate.adapt(0.0, 0.0)
    gate.adapt(gate.tuning.period_s, 0.0)  # level 1 keeps 5 + 1 in reserve
    limit = gate.limit
    assert fill(gate, 2, 1000, now=5.0) == 2 * limit - 6 - 5  # twice the limit, less level 1's reserve
    assert fill(gate, 1, 10, now=5.0) == 6  # level 1 keeps the room of its reserve above the burst of level 2

@pytest.mark.parametrize(
    ("busy", "received", "admitted", "utilisation", "expected"),
    [
        (0.3, 100, 100, 0.2, 0.3),  # idle-ish: the loop's share
        (0.95, 2000, 1000, 0.4, 1.9),  # the loop is full and turns away half: two replicas' worth
        (0.2, 100, 100, 1.5, 1.5),  # the backend binds
        (1.0, 500, 0, 0.0, MAX_DEMAND),  # everything refused
        (0.0, 0, 0, 0.0, 0.0),
    ],
)
def test_saturation_takes_whichever_side_binds(busy, received, admitted, utilisation, expected) -> None:
    assert saturation(busy, received, admitted, utilisation) == pytest.approx(expected)
