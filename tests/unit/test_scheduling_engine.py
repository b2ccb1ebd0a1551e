"""ModelScheduler with real threads and a real event loop, over a numpy Backend implementation.

"Busy" instances are held with gates (threading.Event), never with sleeps, and time is a FakeClock that
drives the engine's timer too: batching windows and timeouts pass when a test advances the clock, so every
test is deterministic and none waits on real time.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from scheduling_support import BATCHING, sched, serving, started

from tidal.clock import FakeClock
from tidal.errors import BackendError, DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from tidal.scheduling import Knobs, ModelScheduler, QueuePolicy, SchedulerConfig
from tidal.types import InferRequest


def test_queued_requests_form_full_batches_and_outputs_split_back(run_async, row_backend, make_request):
    gate = threading.Event()
    backend = row_backend(gate)

    async def main():
        async with serving(sched([backend]), gate) as s:
            first = asyncio.create_task(s.infer(make_request(value=0.0)))
            await started(backend)  # the instance is now busy with a batch of one
            requests = [make_request(rows=1 + i % 2, value=i) for i in range(1, 7)]
            tasks = [asyncio.create_task(s.infer(r)) for r in requests]
            await asyncio.sleep(0)
            assert s.pending() == 1 + 6
            gate.set()
            responses = await asyncio.gather(first, *tasks)
        assert backend.batches == [1, 3, 3, 3]  # rows 1+2, 1+2, 1+2: each batch full at 4 would need 5
        for request, response in zip(requests, responses[1:], strict=True):
            want = backend.reference(request.inputs["x"])
            assert set(response.outputs) == {"y", "s"}
            assert all(np.array_equal(response.outputs[k], want[k]) for k in want)
            assert "tidal_variant" not in response.parameters  # the model has no variants to name

    run_async(main())


def test_requested_outputs_only_and_unknown_output_is_invalid(run_async, row_backend, make_request):
    async def main():
        async with serving(sched([row_backend()])) as s:
            response = await s.infer(make_request(value=2.0, outputs=("s",)))
            assert list(response.outputs) == ["s"]
            with pytest.raises(InvalidArgument, match="no output 'z'"):
                await s.infer(make_request(outputs=("z",)))
            with pytest.raises(InvalidArgument, match="exceeds"):
                await s.infer(make_request(rows=5))
            # a priority beyond the model's levels selects the default level, as Triton's SetPriority does
            assert list((await s.infer(make_request(priority=2, outputs=("s",)))).outputs) == ["s"]
            assert s.stats().failures_by_reason["OTHER"] == 2

    run_async(main())


@pytest.mark.parametrize("use_uvloop", [False, True])
def test_sub_millisecond_window_is_honoured(run_async, row_backend, make_request, use_uvloop):
    """While a batch runs, a request for the other instance waits the whole window for company (then leaves
    on the timer, not on the loop's timers, which uvloop would fire at once). A lone head never waits."""
    gate = threading.Event()
    backends = [row_backend(gate), row_backend(gate)]
    clock = FakeClock()

    async def main():
        async with serving(sched(backends, knobs=Knobs(4, 500, instance_count=2), clock=clock), gate) as s:
            head = asyncio.create_task(s.infer(make_request(arrival_s=clock.now())))
            await started(backends[0])
            assert s.stats().queue.ns == 0  # the lone head left at once
            follower = asyncio.create_task(s.infer(make_request(arrival_s=clock.now())))
            await asyncio.sleep(0)
            clock.advance(0.0004)
            assert not backends[1].started.acquire(blocking=False)  # before its target nothing can fire
            clock.advance(0.0001)
            await started(backends[1])
            gate.set()
            await asyncio.gather(head, follower)
            assert s.stats().queue.ns == 500_000  # exactly the window, on the clock the engine was given

    run_async(main(), use_uvloop=use_uvloop)


def test_an_idle_model_never_waits_the_window(run_async, row_backend, make_request):
    """The fake clock never moves: a request that waited the 200 ms window would never be answered."""

    async def main():
        async with serving(sched([row_backend()], knobs=Knobs(4, 200_000))) as s:
            for _ in range(5):
                await s.infer(make_request())
            assert s.stats().queue.ns == 0

    run_async(main())


def test_backend_failure_fails_only_its_batch(run_async, row_backend, make_request):
    gate = threading.Event()
    backend = row_backend(gate, fail_on=13.0)

    async def main():
        async with serving(sched([backend]), gate) as s:
            head = asyncio.create_task(s.infer(make_request(value=0.0)))
            await started(backend)
            doomed = [asyncio.create_task(s.infer(make_request(value=v))) for v in (1.0, 13.0, 2.0, 3.0)]
            fine = asyncio.create_task(s.infer(make_request(value=4.0)))
            gate.set()
            await head
            for task in doomed:
                with pytest.raises(BackendError, match="contains 13"):
                    await task
            assert (await fine).outputs["y"][0, 0] == 9.0
            stats = s.stats()
            assert stats.failures_by_reason["BACKEND"] == 4 and stats.success.count == 2

    run_async(main())


def test_wrong_row_count_from_backend_is_a_backend_error(run_async, row_backend, make_request):
    async def main():
        async with serving(sched([row_backend(drop_row=True)])) as s:
            with pytest.raises(BackendError, match="rows for output"):
                await s.infer(make_request(rows=2))
            with pytest.raises(BackendError):  # the scheduler keeps serving
                await s.infer(make_request(rows=2))

    run_async(main())


def test_cancelled_queued_request_leaves_at_once_and_never_runs(run_async, row_backend, make_request):
    gate = threading.Event()
    backend = row_backend(gate)

    async def main():
        async with serving(sched([backend]), gate) as s:
            head = asyncio.create_task(s.infer(make_request(value=0.0)))
            await started(backend)
            victim = asyncio.create_task(s.infer(make_request(value=7.0)))
            other = asyncio.create_task(s.infer(make_request(value=8.0)))
            await asyncio.sleep(0)
            assert s.pending() == 3
            victim.cancel()
            with pytest.raises(asyncio.CancelledError):
                await victim
            assert s.pending() == 2
            gate.set()
            await asyncio.gather(head, other)
            assert s.stats().failures_by_reason["CANCELED"] == 1
        assert backend.firsts() == [[0.0], [8.0]]

    run_async(main())


def test_deadline_and_timeout_expire_in_the_queue_on_the_timer(run_async, row_backend, make_request):
    """The fake clock jumps past both limits; the engine's own timer notices, no new arrival needed."""
    gate = threading.Event()
    backend = row_backend(gate)
    clock = FakeClock(50.0)
    config = SchedulerConfig(
        batching=True, max_batch_size=4, default_policy=QueuePolicy(default_timeout_us=0, allow_timeout_override=True)
    )

    async def main():
        async with serving(sched([backend], config, clock=clock), gate) as s:
            head = asyncio.create_task(s.infer(make_request(arrival_s=clock.now())))
            await started(backend)
            by_deadline = asyncio.create_task(s.infer(make_request(arrival_s=clock.now(), deadline_s=50.002)))
            by_timeout = asyncio.create_task(s.infer(make_request(arrival_s=clock.now(), timeout_us=3000)))
            await asyncio.sleep(0)
            clock.advance(1.0)
            for task, match in ((by_deadline, "deadline"), (by_timeout, "timeout")):
                with pytest.raises(DeadlineExceeded, match=match):
                    await task
            assert s.pending() == 1 and s.stats().failures_by_reason["REJECTED"] == 2
            gate.set()
            await head
        assert backend.batches == [1]  # the expired requests never took a batch slot

    run_async(main())


def test_queue_full_is_resource_exhausted_at_once(run_async, row_backend, make_request):
    gate = threading.Event()
    backend = row_backend(gate)
    config = SchedulerConfig(batching=True, max_batch_size=4, default_policy=QueuePolicy(max_queue_size=1))

    async def main():
        async with serving(sched([backend], config), gate) as s:
            head = asyncio.create_task(s.infer(make_request()))
            await started(backend)
            queued = asyncio.create_task(s.infer(make_request()))
            await asyncio.sleep(0)
            with pytest.raises(ResourceExhausted):
                await s.infer(make_request())
            gate.set()
            await asyncio.gather(head, queued)

    run_async(main())


def test_queue_refusal_pushes_back_by_the_measured_pace(run_async, row_backend, make_request):
    gate = threading.Event()
    backend = row_backend(gate)
    clock = FakeClock()
    config = SchedulerConfig(batching=True, max_batch_size=4, default_policy=QueuePolicy(max_queue_size=2))

    async def main():
        async with serving(sched([backend], config, Knobs(1, 0), clock), gate) as s:
            first = asyncio.create_task(s.infer(make_request()))
            await started(backend)
            clock.advance(0.005)  # the one measured batch: 5 ms for one request
            gate.set()
            await first
            gate.clear()
            head = asyncio.create_task(s.infer(make_request()))
            await started(backend)
            queued = [asyncio.create_task(s.infer(make_request())) for _ in range(2)]
            await asyncio.sleep(0)
            with pytest.raises(ResourceExhausted) as refused:
                await s.infer(make_request())
            assert refused.value.pushback_ms == 10  # two queued ahead at 5 ms each
            gate.set()
            await asyncio.gather(head, *queued)

    run_async(main())


def test_model_without_batching_runs_one_request_per_execution(run_async, row_backend):
    gate = threading.Event()
    backend = row_backend(gate)
    config = SchedulerConfig(batching=False, max_batch_size=0)

    async def main():
        async with serving(sched([backend], config, Knobs(0, 1000)), gate) as s:
            xs = [np.full((2, 3), float(i), np.float32) for i in range(4)]  # no batch dim: (2, 3) is the shape
            tasks = [asyncio.create_task(s.infer(InferRequest("m", "1", {"x": x}, arrival_s=0.0))) for x in xs]
            await started(backend)
            gate.set()
            responses = await asyncio.gather(*tasks)
        assert backend.batches == [2, 2, 2, 2]
        assert all(np.array_equal(r.outputs["y"], x * 2 + 1) for r, x in zip(responses, xs, strict=True))

    run_async(main())


def test_stop_drains_or_fails_the_queue_and_then_refuses(run_async, row_backend, make_request):
    for drain in (True, False):
        gate = threading.Event()
        backend = row_backend(gate)

        async def main(drain=drain, gate=gate, backend=backend):
            s = sched([backend], knobs=Knobs(4, 10_000_000))  # a 10 s window: draining must not wait it out
            await s.start()
            running = asyncio.create_task(s.infer(make_request(rows=4)))
            await started(backend)
            queued = asyncio.create_task(s.infer(make_request()))
            await asyncio.sleep(0)
            stopping = asyncio.create_task(s.stop(drain=drain))
            await asyncio.sleep(0)
            with pytest.raises(Unavailable):
                await s.infer(make_request())
            gate.set()
            await stopping
            await running
            if drain:
                await queued
            else:
                with pytest.raises(Unavailable, match="unloading"):
                    await queued
            assert s.pending() == 0

        run_async(main())



@pytest.mark.parametrize("coupled", [True, False])
def test_a_non_finite_request_never_shares_a_coupled_batch(run_async, row_backend, make_request, coupled: bool):
    class BatchRange(row_backend):
        """Scales by the largest magnitude in the whole batch, as a per-batch quantization range does."""

        @staticmethod
        def reference(x: np.ndarray) -> dict[str, np.ndarray]:
            with np.errstate(invalid="ignore", divide="ignore"):  # inf / inf: the NaN a real range gives
                scaled = x / np.abs(x).max()
            return {"y": scaled, "s": scaled.sum(axis=-1, keepdims=True)}

    gate = threading.Event()
    backend = BatchRange(gate)
    variants = frozenset({"int8-dynamic"} if coupled else ())
    scheduler = ModelScheduler(
        "m", BATCHING, Knobs(4, 0), {"int8-dynamic": [backend]}, ["y", "s"], FakeClock(), coupled=variants
    )

    async def main():
        async with serving(scheduler, gate) as s:
            first = asyncio.create_task(s.infer(make_request(value=1.0)))
            await started(backend)  # the instance is busy: the next three queue up and form one batch
            tasks = [asyncio.create_task(s.infer(make_request(value=v))) for v in (2.0, np.inf, 2.0)]
            await asyncio.sleep(0)
            gate.set()
            return await asyncio.gather(first, *tasks)

    responses = run_async(main())
    as_if_alone = [np.array_equal(r.outputs["y"], np.ones((1, 3), np.float32)) for r in responses[1::2]]
    if coupled:
        assert backend.batches == [1, 2, 1]  # the clean pair together, the inf request on its own
        assert all(as_if_alone)
    else:
        assert backend.batches == [1, 3] and not any(as_if_alone)  # the harm the isolation prevents
