"""The pure queue policy: admission, priorities, timeouts, cancellation, and the knob/config checks."""

from __future__ import annotations

import numpy as np
import pytest

from tidal.clock import FakeClock
from tidal.errors import MAX_PUSHBACK_MS, ConfigError, DeadlineExceeded, InvalidArgument, ResourceExhausted
from tidal.scheduling.knobs import Knobs
from tidal.scheduling.ordering import InOrder
from tidal.scheduling.queue import QueuePolicy, RequestQueue, SchedulerConfig, TimeoutAction
from tidal.types import InferRequest

DELAY = TimeoutAction.DELAY


def config(**kw) -> SchedulerConfig:
    return SchedulerConfig(**{"batching": True, "max_batch_size": 8, **kw})


def ids(queue: RequestQueue) -> list[str]:
    return [entry.request.id for entry in queue.in_order()]


def test_priority_zero_or_beyond_the_levels_means_the_default_level_as_in_triton(make_request):
    queue = RequestQueue(config(priority_levels=3, default_priority_level=2))
    assert queue.admit(make_request(priority=0), 0.0).level == 2
    assert queue.admit(make_request(priority=3), 0.0).level == 3
    assert queue.admit(make_request(priority=4), 0.0).level == 2
    assert queue.admit(make_request(priority=2**64 - 1), 0.0).level == 2
    assert len(queue) == 4


def test_service_order_is_strict_by_level_then_fifo(make_request):
    queue = RequestQueue(config(priority_levels=3))
    for i, level in enumerate([3, 2, 3, 1, 2, 1]):
        queue.admit(make_request(priority=level, id=f"{level}.{i}"), float(i))
    assert ids(queue) == ["1.3", "1.5", "2.1", "2.4", "3.0", "3.2"]
    assert queue.depth_by_level() == {1: 2, 2: 2, 3: 2}


def test_max_queue_size_is_per_level_and_rejects_at_once(make_request):
    policy = QueuePolicy(max_queue_size=2)
    queue = RequestQueue(config(priority_levels=2, level_policies={1: policy}))
    first = queue.admit(make_request(priority=1), 0.0)
    queue.admit(make_request(priority=1), 0.0)
    with pytest.raises(ResourceExhausted, match="level 1"):
        queue.admit(make_request(priority=1), 0.0)
    for _ in range(5):  # level 2 keeps the unbounded default policy
        queue.admit(make_request(priority=2), 0.0)
    queue.cancel(first)  # a freed place is usable again
    queue.admit(make_request(priority=1), 0.0)
    assert queue.depth_by_level() == {1: 2, 2: 5}


def test_a_full_queue_pushes_back_for_the_time_the_requests_ahead_take(make_request):
    queue = RequestQueue(config(priority_levels=2, default_policy=QueuePolicy(max_queue_size=2)))
    for level in (1, 1, 2, 2):
        queue.admit(make_request(priority=level), 0.0)
    with pytest.raises(ResourceExhausted, match="retry after 8 ms") as refused:
        queue.admit(make_request(priority=1), 0.0, request_s=0.004)  # two of level 1 ahead, 4 ms each
    assert refused.value.pushback_ms == 8
    with pytest.raises(ResourceExhausted) as refused:
        queue.admit(make_request(priority=2), 0.0, request_s=0.004)  # level 1 drains first: four ahead
    assert refused.value.pushback_ms == 16
    with pytest.raises(ResourceExhausted) as refused:
        queue.admit(make_request(priority=2), 0.0)  # nothing served yet: the pace is unknown
    assert refused.value.pushback_ms == 1  # never 0, which would invite an immediate retry
    with pytest.raises(ResourceExhausted) as refused:
        queue.admit(make_request(priority=2), 0.0, request_s=10.0)
    assert refused.value.pushback_ms == MAX_PUSHBACK_MS  # so long a wait says: go to another replica


def test_reject_timeout_counts_from_arrival_and_expires_in_queue(make_request):
    clock = FakeClock(10.0)
    queue = RequestQueue(config(default_policy=QueuePolicy(default_timeout_us=1000)))
    # Arrived 0.4 ms before it reached the queue: that time counts.
    entry = queue.admit(make_request(arrival_s=clock.now() - 0.0004), clock.now())
    assert queue.next_event_s() == pytest.approx(10.0006)
    clock.advance(0.0005)
    assert queue.expire(clock.now()) == []
    clock.advance(0.0001)
    assert queue.expire(clock.now()) == [entry]
    assert len(queue) == 0 and queue.next_event_s() is None


def test_timeout_already_passed_on_admission(make_request):
    reject = RequestQueue(config(default_policy=QueuePolicy(default_timeout_us=100)))
    with pytest.raises(DeadlineExceeded):
        reject.admit(make_request(arrival_s=0.0), 1.0)
    delay = RequestQueue(config(default_policy=QueuePolicy(DELAY, default_timeout_us=100)))
    assert delay.admit(make_request(arrival_s=0.0), 1.0).delayed


def test_delay_serves_timed_out_requests_after_in_time_ones_of_their_level(make_request):
    delayed_policy = QueuePolicy(DELAY, default_timeout_us=1000)
    queue = RequestQueue(config(priority_levels=2, level_policies={1: delayed_policy}))
    queue.admit(make_request(priority=1, id="old"), 0.0)
    queue.admit(make_request(priority=2, id="low"), 0.0)
    queue.admit(make_request(priority=1, id="new", arrival_s=0.0009), 0.0009)
    assert queue.expire(0.0015) == []  # DELAY never answers on its own
    assert ids(queue) == ["new", "old", "low"]
    assert queue.expire(0.002) == []  # both timed out now: served in the order they timed out
    assert ids(queue) == ["old", "new", "low"]


def test_grpc_deadline_always_ends_the_request_even_under_delay(make_request):
    queue = RequestQueue(config(default_policy=QueuePolicy(DELAY, default_timeout_us=100)))
    entry = queue.admit(make_request(deadline_s=0.001), 0.0)
    assert queue.expire(0.0002) == [] and entry.delayed
    assert queue.next_event_s() == 0.001
    assert queue.expire(0.001) == [entry]
    with pytest.raises(DeadlineExceeded):
        queue.admit(make_request(deadline_s=0.5), 0.5)


@pytest.mark.parametrize(
    ("allow", "default_us", "asked_us", "expected_us"),
    [
        (True, 1000, 200, 200),  # lowered
        (True, 1000, 5000, 1000),  # may not raise it
        (True, 0, 300, 300),  # no default: any timeout lowers "never"
        (False, 1000, 200, 1000),  # override not allowed: ignored
        (False, 0, 200, None),
    ],
)
def test_timeout_override_may_only_lower(make_request, allow, default_us, asked_us, expected_us):
    policy = QueuePolicy(default_timeout_us=default_us, allow_timeout_override=allow)
    queue = RequestQueue(config(default_policy=policy))
    queue.admit(make_request(timeout_us=asked_us), 0.0)
    assert queue.next_event_s() == (None if expected_us is None else pytest.approx(expected_us * 1e-6))


def test_cancel_removes_at_once_and_only_once(make_request):
    queue = RequestQueue(config(default_policy=QueuePolicy(default_timeout_us=1000)))
    a = queue.admit(make_request(id="a"), 0.0)
    queue.admit(make_request(id="b"), 0.0)
    assert queue.cancel(a) and not queue.cancel(a)
    assert ids(queue) == ["b"] and len(queue) == 1
    assert [e.request.id for e in queue.expire(1.0)] == ["b"]  # a's timeout row is skipped, not answered


def test_take_and_drain(make_request):
    queue = RequestQueue(config())
    entries = [queue.admit(make_request(id=str(i)), 0.0) for i in range(4)]
    queue.take(entries[1:3])
    assert ids(queue) == ["0", "3"]
    assert [e.request.id for e in queue.drain()] == ["0", "3"] and len(queue) == 0


def test_expiry_rows_of_dispatched_requests_do_not_pile_up(make_request):
    queue = RequestQueue(config())
    for _ in range(10_000):  # every request leaves at once, its far deadline row stays behind
        queue.take([queue.admit(make_request(deadline_s=3600.0), 0.0)])
    assert len(queue._events) < 200
    assert queue.next_event_s() is None


def test_rows_and_shape_key(make_request):
    queue = RequestQueue(config(max_batch_size=4))
    a = queue.admit(make_request(rows=2, width=3), 0.0)
    b = queue.admit(make_request(rows=1, width=3), 0.0)
    c = queue.admit(make_request(rows=1, width=5), 0.0)
    assert (a.rows, b.rows) == (2, 1) and a.key == b.key != c.key
    with pytest.raises(InvalidArgument, match="exceeds"):
        queue.admit(make_request(rows=5), 0.0)
    with pytest.raises(InvalidArgument, match="at least one row"):
        queue.admit(make_request(rows=0), 0.0)
    two = InferRequest("m", "1", {"x": np.zeros((2, 3)), "z": np.zeros((3, 3))})
    with pytest.raises(InvalidArgument, match="rows"):
        queue.admit(two, 0.0)


def test_models_without_batch_dim_take_any_shape_as_one_row():
    queue = RequestQueue(SchedulerConfig(batching=False, max_batch_size=0))
    entry = queue.admit(InferRequest("m", "1", {"x": np.zeros((100, 7))}), 0.0)
    assert entry.rows == 1 and entry.key is None


def test_config_and_knob_validation():
    with pytest.raises(ConfigError):
        SchedulerConfig(batching=True, max_batch_size=0)
    with pytest.raises(ConfigError):
        SchedulerConfig(batching=True, max_batch_size=4, priority_levels=2, default_priority_level=3)
    with pytest.raises(ConfigError):
        SchedulerConfig(batching=True, max_batch_size=4, level_policies={2: QueuePolicy()})
    with pytest.raises(InvalidArgument):
        Knobs(max_batch_size=-1, max_queue_delay_us=0)
    with pytest.raises(InvalidArgument):
        Knobs(max_batch_size=4, max_queue_delay_us=0, instance_count=0)
    with pytest.raises(InvalidArgument):
        Knobs(max_batch_size=4, max_queue_delay_us=0, preferred_batch_sizes=(0,))
    assert Knobs(8, 100, preferred_batch_sizes=(8, 2, 4, 2)).preferred_batch_sizes == (2, 4, 8)


def test_in_order_release():
    order: InOrder[str] = InOrder()
    for seq in range(4):
        order.add(seq)
    assert order.resolve(2, "c") == []
    assert order.resolve(0, "a") == ["a"]
    assert order.drop(1) == ["c"]  # 1 left without an answer: 2 was only waiting for it
    assert order.drop(1) == []
    assert order.resolve(3, "d") == ["d"] and len(order) == 0
