"""A priority level routed to instances of its own (Knobs.route): the placement the controller chooses,
carried out by the real ModelScheduler over numpy backends, with gates instead of sleeps."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest
from scheduling_support import sched, serving, started

from tidal.clock import FakeClock
from tidal.errors import InvalidArgument, ResourceExhausted
from tidal.scheduling import Knobs, QueuePolicy, SchedulerConfig
from tidal.types import LevelRoute

TWO_LEVELS = SchedulerConfig(batching=True, max_batch_size=4, priority_levels=2, default_priority_level=2)
ROUTED = Knobs(4, 0, instance_count=2, active_variant="bulk", route=LevelRoute(1, (1,), "fast", 1, 0))


def test_priority_1_runs_on_its_own_instance_and_variant_while_the_bulk_waits_for_the_others(
    run_async, row_backend, make_request
):
    gate = threading.Event()
    bulk = [row_backend(gate), row_backend()]
    fast = [row_backend(), row_backend()]

    async def main():
        scheduler = sched({"bulk": bulk, "fast": fast}, TWO_LEVELS, ROUTED)
        async with serving(scheduler, gate) as s:
            held = asyncio.create_task(s.infer(make_request(priority=2, value=1.0)))
            await started(bulk[0])  # instance 0 is busy with the bulk
            waiting = [asyncio.create_task(s.infer(make_request(priority=2, value=2.0))) for _ in range(3)]
            urgent = await asyncio.gather(*(s.infer(make_request(priority=1, value=3.0)) for _ in range(3)))
            assert {r.parameters["tidal_variant"] for r in urgent} == {"fast"}
            assert fast[1].batches == [1, 1, 1]  # the route's own batch limit
            assert not any(w.done() for w in waiting)  # instance 1 is not the bulk's, even while idle
            gate.set()
            rest = await asyncio.gather(held, *waiting)
        assert {r.parameters["tidal_variant"] for r in rest} == {"bulk"}
        assert bulk[0].batches == [1, 3] and not bulk[1].runs and not fast[0].runs

    run_async(main())


def test_priority_1_batches_with_the_route_s_own_window_not_the_bulk_s(run_async, row_backend, make_request):
    """The bulk takes no window; the route waits 500 us for company while its other instance is busy."""
    gate = threading.Event()
    fast = [row_backend(), row_backend(gate), row_backend(gate)]
    knobs = Knobs(4, 0, instance_count=3, active_variant="bulk", route=LevelRoute(1, (1, 2), "fast", 4, 500))
    clock = FakeClock()

    async def main():
        scheduler = sched({"bulk": [row_backend() for _ in range(3)], "fast": fast}, TWO_LEVELS, knobs, clock)
        async with serving(scheduler, gate) as s:
            head = asyncio.create_task(s.infer(make_request(priority=1, arrival_s=clock.now())))
            await started(fast[1])
            follower = asyncio.create_task(s.infer(make_request(priority=1, arrival_s=clock.now())))
            await asyncio.sleep(0)
            clock.advance(0.0005)
            await started(fast[2])
            gate.set()
            await asyncio.gather(head, follower)
            assert s.stats().queue.ns == 500_000  # the follower waited the route's window, not the bulk's 0

    run_async(main())


def test_a_refusal_pushes_back_by_the_pace_of_its_own_lane(run_async, row_backend, make_request):
    """The bulk's lane drains at 5 ms a request on its one instance; priority 1's faster batch, finished
    last, says nothing of that pace."""
    bulk_gate, fast_gate = threading.Event(), threading.Event()
    bulk, fast = [row_backend(bulk_gate), row_backend()], [row_backend(), row_backend(fast_gate)]
    config = replace(TWO_LEVELS, default_policy=QueuePolicy(max_queue_size=2))
    clock = FakeClock()

    async def main():
        async with serving(sched({"bulk": bulk, "fast": fast}, config, replace(ROUTED, max_batch_size=1), clock),
                           bulk_gate, fast_gate) as s:
            for backend, gate, level, ms in ((bulk[0], bulk_gate, 2, 5), (fast[1], fast_gate, 1, 1)):
                measured = asyncio.create_task(s.infer(make_request(priority=level)))
                await started(backend)
                clock.advance(ms / 1e3)
                gate.set()
                await measured
            bulk_gate.clear()
            head = asyncio.create_task(s.infer(make_request(priority=2)))
            await started(bulk[0])
            queued = [asyncio.create_task(s.infer(make_request(priority=2))) for _ in range(2)]
            await asyncio.sleep(0)
            with pytest.raises(ResourceExhausted) as refused:
                await s.infer(make_request(priority=2))
            assert refused.value.pushback_ms == 10  # two queued ahead at the bulk's 5 ms each
            bulk_gate.set()
            await asyncio.gather(head, *queued)

    run_async(main())


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (LevelRoute(2, (1,), "fast", 1, 0), "it has 2 priority level"),
        (LevelRoute(1, (0, 1), "fast", 1, 0), r"instances \(0, 1\) are not a part of 0..1"),
        (LevelRoute(1, (2,), "fast", 1, 0), r"instances \(2,\) are not a part"),
        (LevelRoute(1, (1,), "nope", 1, 0), "no variant 'nope' is loaded"),
        (LevelRoute(1, (1,), "fast", 8, 0), "max_batch_size 8 exceeds its limit 4"),
    ],
)
def test_a_route_the_model_cannot_take_is_refused_and_changes_nothing(row_backend, route, message):
    runners = {"bulk": [row_backend(), row_backend()], "fast": [row_backend(), row_backend()]}
    scheduler = sched(runners, TWO_LEVELS, ROUTED)
    with pytest.raises(InvalidArgument, match=f"cannot route levels 1..{route.levels}: {message}"):
        scheduler.apply(replace(ROUTED, route=route))
    assert scheduler.knobs == ROUTED
