"""The edge gate's rule, on a fake clock: priority order, adaptation to latency and transport delay."""

from __future__ import annotations

import pytest

from tidal.control.admission import MAX_DEMAND, AdmissionGate, saturation


def fill(gate: AdmissionGate, level: int, count: int) -> int:
    """Admit up to `count` requests of `level`; how many got in."""
    return sum(gate.admit(level) is None for _ in range(count))


def run_period(gate: AdmissionGate, now: float, latency_ms: float, delay_ms: float = 0.0, count: int = 20) -> float:
    """`count` requests admitted and answered after `latency_ms`, then the period closes; returns the new now."""
    for _ in range(count):
        if gate.admit(1) is None:
            gate.release(1, latency_ms / 1e3)
    now += gate.tuning.period_s
    gate.adapt(now, delay_ms)
    return now


def test_without_a_target_everything_is_admitted() -> None:
    gate = AdmissionGate(levels=2)
    assert fill(gate, 2, 10_000) == 10_000
    assert gate.state().refused == {1: 0, 2: 0}


def test_lower_priorities_are_refused_first_and_higher_ones_keep_what_they_use() -> None:
    gate = AdmissionGate(levels=3)
    gate.configure(target_ms=50, predicted=40)
    assert fill(gate, 3, 100) == 40  # alone, the lowest level may fill the whole limit
    assert gate.admit(1) is not None  # ...and level 1 has to wait for a slot
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
    refusal = gate.admit(1)
    assert refusal is not None and refusal.level == 1 and refusal.inflight == limit
    gate.release(1, 0.01)
    assert gate.admit(1) is None and gate.admit(3) is not None  # a freed slot goes to the top level


def test_a_refused_level_takes_the_next_free_slots_even_without_a_reserve() -> None:
    """Level 1 sent nothing for a while (its calls were dropped before the gate, say): its reserve is gone and
    level 2 filled the limit. Its refusal reserves room at once, so level 2, arriving first each time a slot
    frees, is refused until level 1 has what it asked for: level 1 is not locked out period after period."""
    gate = AdmissionGate(levels=2)
    gate.configure(target_ms=50, predicted=10)
    now = 0.0
    gate.adapt(now, 0.0)
    assert fill(gate, 2, 100) == 10 and gate.admit(1) is not None  # the limit is full
    for _ in range(3):  # each time a slot frees, level 2 arrives first, then level 1; periods pass
        gate.release(2, 0.01)
        assert gate.admit(2) is not None and gate.admit(1) is None
        now += gate.tuning.period_s
        gate.adapt(now, 0.0)
    assert gate.state().refused == {1: 1, 2: 90 + 3}


def test_an_idle_level_gives_its_reserve_back() -> None:
    gate = AdmissionGate(levels=2)
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
    gate = AdmissionGate(levels=1)
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
    gate = AdmissionGate(levels=1)
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
    gate = AdmissionGate(levels=1)
    gate.configure(target_ms=50, predicted=30)
    gate.adapt(0.0, 0.0)
    run_period(gate, 0.0, latency_ms=500, count=3)
    assert gate.limit == 30


def test_pushback_follows_the_latest_p99() -> None:
    gate = AdmissionGate(levels=1)
    gate.configure(target_ms=50, predicted=20)
    gate.adapt(0.0, 0.0)
    run_period(gate, 0.0, latency_ms=30)
    fill(gate, 1, 20)
    refusal = gate.admit(1)
    assert refusal is not None and refusal.pushback_ms == 30


def test_a_jump_in_the_prediction_lifts_the_limit_at_once_and_drift_does_not() -> None:
    """A faster variant under a step of load: the gate admits what it can now serve in the next period, not
    after seconds of growing by a tenth; small moves of the prediction leave the measured limit alone."""
    gate = AdmissionGate(levels=1)
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
    gate = AdmissionGate(levels=1)
    gate.configure(target_ms=50, predicted=30)
    gate.configure(target_ms=20, predicted=12)
    assert gate.limit == 12
    gate.configure(target_ms=0)
    assert not gate.active and fill(gate, 1, 500) == 500


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
