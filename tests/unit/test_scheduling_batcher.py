"""The pure batching policy against a fake clock: windows, preferred sizes, shapes, priorities."""

from __future__ import annotations

import pytest

from tidal.clock import FakeClock
from tidal.scheduling.batcher import BatchLimits, Dispatch, Wait, form_batch
from tidal.scheduling.knobs import Knobs
from tidal.scheduling.queue import QueuePolicy, RequestQueue, SchedulerConfig, TimeoutAction

CONFIG = SchedulerConfig(batching=True, max_batch_size=8, priority_levels=2)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(100.0)


@pytest.fixture
def queue() -> RequestQueue:
    return RequestQueue(CONFIG)


@pytest.fixture
def add(queue, clock, make_request):
    def add(rows: int = 1, width: int = 3, priority: int = 0, id: str = ""):
        return queue.admit(make_request(rows, width, priority=priority, arrival_s=clock.now(), id=id), clock.now())

    return add


def take(queue: RequestQueue, limits: BatchLimits, now: float) -> list[str] | Wait | None:
    """Form and remove the next batch; its request ids, or the Wait/None answer."""
    decision = form_batch(queue, limits, now)
    if not isinstance(decision, Dispatch):
        return decision
    assert decision.rows == sum(entry.rows for entry in decision.entries)
    queue.take(decision.entries)
    return [entry.request.id for entry in decision.entries]


def test_empty_queue_has_nothing_to_do(queue, clock):
    assert form_batch(queue, BatchLimits(8, (), 0.001), clock.now()) is None


def test_a_lone_request_waits_the_window_then_leaves(queue, add, clock):
    limits = BatchLimits(8, (), 0.0005)
    add(id="a")
    assert take(queue, limits, clock.now()) == Wait(100.0005)
    clock.advance(0.0002)
    add(id="b")
    assert take(queue, limits, clock.now()) == Wait(100.0005)  # the window belongs to the oldest
    clock.advance(0.0003)
    assert take(queue, limits, clock.now()) == ["a", "b"]


def test_no_window_dispatches_at_once(queue, add, clock):
    add(id="a")
    assert take(queue, BatchLimits(8, (), 0.0), clock.now()) == ["a"]


def test_a_full_batch_leaves_without_waiting_and_the_rest_waits(queue, add, clock):
    limits = BatchLimits(4, (), 10.0)
    for i, rows in enumerate([2, 1, 1, 3]):
        add(rows, id=str(i))
    assert take(queue, limits, clock.now()) == ["0", "1", "2"]
    assert take(queue, limits, clock.now()) == Wait(110.0)


def test_next_request_that_does_not_fit_closes_the_batch(queue, add, clock):
    limits = BatchLimits(4, (), 10.0)
    add(3, id="a")
    add(2, id="b")  # 5 > 4: b cannot join, waiting cannot grow a's batch
    assert take(queue, limits, clock.now()) == ["a"]
    assert take(queue, limits, clock.now()) == Wait(110.0)


def test_different_non_batch_dims_never_share_a_batch(queue, add, clock):
    limits = BatchLimits(8, (), 10.0)
    add(width=3, id="a")
    add(width=4, id="b")
    add(width=3, id="c")
    assert take(queue, limits, clock.now()) == ["a"]  # b blocks: FIFO is kept, c does not overtake
    assert take(queue, limits, clock.now()) == ["b"]
    assert take(queue, limits, clock.now()) == Wait(110.0)


def test_preferred_size_leaves_at_once_with_the_largest_prefix(queue, add, clock):
    limits = BatchLimits(8, (2, 4), 10.0)
    add(id="a")
    assert take(queue, limits, clock.now()) == Wait(110.0)
    add(id="b")
    add(id="c")
    assert take(queue, limits, clock.now()) == ["a", "b"]  # 2 is preferred; 3 is not
    for rows, name in [(1, "d"), (2, "e")]:
        add(rows, id=name)
    assert take(queue, limits, clock.now()) == ["c", "d", "e"]  # 1+1+2 = 4, the largest preferred


def test_preferred_sizes_cap_the_batch_at_the_largest(queue, add, clock):
    limits = BatchLimits(8, (4,), 10.0)
    for i in range(3):
        add(id=str(i))
    add(2, id="3")  # 3 + 2 > 4: cannot reach a preferred size, so it leaves at once
    assert take(queue, limits, clock.now()) == ["0", "1", "2"]


def test_head_larger_than_a_lowered_limit_runs_alone(queue, add, clock):
    add(6, id="big")  # admitted within the model's 8
    add(1, id="small")
    limits = BatchLimits(4, (), 10.0)
    assert take(queue, limits, clock.now()) == ["big"]


def test_strict_priority_under_saturation(queue, add, clock):
    limits = BatchLimits(2, (), 0.0)
    for i in range(3):
        add(priority=2, id=f"low{i}")
    add(priority=1, id="high0")
    assert take(queue, limits, clock.now()) == ["high0", "low0"]
    add(priority=1, id="high1")
    add(priority=1, id="high2")
    assert take(queue, limits, clock.now()) == ["high1", "high2"]
    assert take(queue, limits, clock.now()) == ["low1", "low2"]


def test_delayed_requests_follow_in_time_ones(clock, make_request):
    config = SchedulerConfig(
        batching=True, max_batch_size=8, default_policy=QueuePolicy(TimeoutAction.DELAY, default_timeout_us=100)
    )
    queue = RequestQueue(config)
    queue.admit(make_request(id="late", arrival_s=clock.now()), clock.now())
    clock.advance(0.001)
    queue.expire(clock.now())
    queue.admit(make_request(id="fresh", arrival_s=clock.now()), clock.now())
    assert take(queue, BatchLimits(1, (), 0.0), clock.now()) == ["fresh"]
    assert take(queue, BatchLimits(1, (), 0.0), clock.now()) == ["late"]


def test_limits_from_knobs():
    assert BatchLimits.of(CONFIG, Knobs(8, 250, (2, 4))) == BatchLimits(8, (2, 4), 0.00025)
    assert BatchLimits.of(CONFIG, Knobs(3, 250, (2, 4))) == BatchLimits(3, (2,), 0.00025)
    assert BatchLimits.of(CONFIG, Knobs(1, 250)) == BatchLimits(1)
    assert BatchLimits.of(CONFIG, Knobs(0, 250)) == BatchLimits(1)
    unbatched = SchedulerConfig(batching=False, max_batch_size=8)
    assert BatchLimits.of(unbatched, Knobs(8, 250)) == BatchLimits(1)
    assert BatchLimits(8, (4,), 1.0).without_window() == BatchLimits(8, (4,), 0.0)
