"""ModelScheduler under live changes: knobs swapped mid-flight, instances, variants, ordering,
statistics for the controller, a real ONNX Runtime session, and the precise timer itself."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import numpy as np
import pytest
from scheduling_support import sched, serving, started

import onnx_models
from tidal.backends.base import BackendOptions
from tidal.backends.onnxruntime import load
from tidal.clock import FakeClock, SystemClock
from tidal.errors import InvalidArgument
from tidal.scheduling import Knobs, ModelScheduler, SchedulerConfig
from tidal.scheduling.threads import INSTANCE_NICE, InstanceWorkers, PreciseTimer
from tidal.types import InferRequest


def test_lowering_max_batch_live_applies_to_the_queued_requests(run_async, row_backend, make_request):
    gate = threading.Event()
    backend = row_backend(gate)

    async def main():
        async with serving(sched([backend]), gate) as s:
            head = asyncio.create_task(s.infer(make_request()))
            await started(backend)
            tasks = [asyncio.create_task(s.infer(make_request(value=i))) for i in range(6)]
            await asyncio.sleep(0)
            s.apply(Knobs(2, 0))
            assert s.knobs.max_batch_size == 2 and s.pending() == 7  # nothing dropped by the swap
            gate.set()
            await asyncio.gather(head, *tasks)
        assert backend.batches == [1, 2, 2, 2]

    run_async(main())


def test_invalid_knobs_are_refused_and_change_nothing(run_async, row_backend):
    async def main():
        async with serving(sched([row_backend()], knobs=Knobs(4, 100))) as s:
            for bad in (Knobs(8, 0), Knobs(4, 0, instance_count=2), Knobs(4, 0, active_variant="int8")):
                with pytest.raises(InvalidArgument):
                    s.apply(bad)
            assert s.knobs == Knobs(4, 100)

    run_async(main())


def test_instances_take_whole_batches_and_instance_count_changes_live(run_async, row_backend, make_request):
    gates = [threading.Event(), threading.Event()]
    backends = [row_backend(gate) for gate in gates]

    async def main():
        async with serving(sched(backends, knobs=Knobs(4, 0, instance_count=1)), *gates) as s:
            a = asyncio.create_task(s.infer(make_request(value=1.0)))
            await started(backends[0])
            b = asyncio.create_task(s.infer(make_request(value=2.0)))
            await asyncio.sleep(0)
            assert backends[1].runs == []  # one instance allowed: b waits although instance 1 is idle
            s.apply(Knobs(4, 0, instance_count=2))
            await started(backends[1])  # the swap alone sends b to the first free instance
            gates[1].set()
            assert (await b).outputs["y"][0, 0] == 5.0
            assert not a.done()
            gates[0].set()
            await a

    run_async(main())


def test_variant_switch_is_live_and_reported(run_async, row_backend, make_request):
    fast, small = row_backend(), row_backend()

    async def main():
        s = sched({"fp32": [fast], "int8": [small]}, knobs=Knobs(4, 0, active_variant="fp32"))
        async with serving(s):
            assert (await s.infer(make_request())).parameters["tidal_variant"] == "fp32"
            await asyncio.to_thread(s.apply, Knobs(4, 0, active_variant="int8"))  # from another thread
            assert s.knobs.active_variant == "int8"
            assert (await s.infer(make_request())).parameters["tidal_variant"] == "int8"
        assert (fast.batches, small.batches) == ([1], [1])

    run_async(main())


@pytest.mark.parametrize("preserve", [True, False])
def test_preserve_ordering_holds_later_answers(run_async, row_backend, make_request, preserve):
    gates = [threading.Event(), threading.Event()]
    backends = [row_backend(gate) for gate in gates]
    config = SchedulerConfig(batching=True, max_batch_size=4, preserve_ordering=preserve)

    async def main():
        async with serving(sched(backends, config, Knobs(4, 0, instance_count=2)), *gates) as s:
            first = asyncio.create_task(s.infer(make_request(value=1.0)))
            await started(backends[0])
            second = asyncio.create_task(s.infer(make_request(value=2.0)))
            await started(backends[1])
            gates[1].set()
            while s.stats().execution_count < 1:  # the second batch is finished and answered inside
                await asyncio.sleep(0.001)
            await asyncio.sleep(0)
            assert second.done() is not preserve
            gates[0].set()
            await asyncio.gather(first, second)

    run_async(main())


def test_stats_and_observation(run_async, row_backend, make_request):
    gate = threading.Event()
    backend = row_backend(gate)
    config = SchedulerConfig(batching=True, max_batch_size=4, priority_levels=2)

    async def main():
        async with serving(sched([backend], config), gate) as s:
            head = asyncio.create_task(s.infer(make_request(arrival_s=SystemClock().now())))
            await started(backend)
            now = SystemClock().now()
            rest = [asyncio.create_task(s.infer(make_request(priority=p, arrival_s=now))) for p in (1, 2, 2)]
            await asyncio.sleep(0)
            seen = s.observe()
            assert seen.queue_depth == {1: 1, 2: 2} and seen.running == 1
            assert seen.arrivals == {1: 2, 2: 2}  # the head's priority 0 is the default level 1
            gate.set()
            await asyncio.gather(head, *rest)
            stats = s.stats()
            assert (stats.inference_count, stats.execution_count) == (4, 2)
            assert sorted(stats.batch_stats) == [1, 3] and stats.batch_stats[3][1].count == 1
            assert stats.success.count == stats.queue.count == stats.compute_infer.count == 4
            assert stats.last_inference_ms > 0
            seen = s.observe()
            assert [b.rows for b in seen.batches] == [1, 3] and len(seen.latencies) == 4
            assert s.observe().batches == ()  # samples are handed out once

    run_async(main())


def test_real_onnxruntime_session_batched_equals_unbatched(run_async, tmp_path):
    path = onnx_models.add_sub(tmp_path / "model.onnx", width=4)
    instances = [load(path, BackendOptions(intra_op_threads=1)) for _ in range(2)]
    config = SchedulerConfig(batching=True, max_batch_size=8)
    rng = np.random.default_rng(0)
    pairs = [rng.standard_normal((2, 1 + i % 3, 4)).astype(np.float32) for i in range(20)]

    async def main():
        s = ModelScheduler("add_sub", config, Knobs(8, 2000, instance_count=2), {"": instances}, ["OUTPUT0", "OUTPUT1"])
        async with serving(s):
            requests = [
                InferRequest("add_sub", "1", {"INPUT0": a, "INPUT1": b}, arrival_s=SystemClock().now())
                for a, b in pairs
            ]
            responses = await asyncio.gather(*(s.infer(r) for r in requests))
            assert s.stats().execution_count < len(requests)  # some requests did share a batch
        return responses

    try:
        responses = run_async(main())
    finally:
        for instance in instances:
            instance.close()
    for (a, b), response in zip(pairs, responses, strict=True):
        assert np.array_equal(response.outputs["OUTPUT0"], a + b)
        assert np.array_equal(response.outputs["OUTPUT1"], a - b)


@pytest.mark.skipif(
    sys.platform != "linux" or os.getpriority(os.PRIO_PROCESS, 0) > 18,
    reason="per-thread niceness is Linux's; at nice 19 there is no lower priority to show",
)
def test_instance_threads_yield_the_cpu_to_the_loop(run_async):
    """Batches run at a lower CPU priority than the loop that takes calls, so under load the loop keeps
    taking them while a batch waits (threads.py says why); the loop thread itself keeps its niceness."""

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def main():
        loop = asyncio.get_running_loop()
        before = nice()
        workers = InstanceWorkers(2, "nice")
        workers.start(loop)
        seen: asyncio.Queue[int] = asyncio.Queue()
        try:
            for index in range(2):
                workers.submit(index, nice, seen.put_nowait)
            values = [await asyncio.wait_for(seen.get(), 5) for _ in range(2)]
        finally:
            workers.close()
        assert values == [min(19, before + INSTANCE_NICE)] * 2 and values[0] > before
        assert nice() == before

    run_async(main())


def test_precise_timer_fires_once_not_before_its_target(run_async):
    async def main():
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        clock = SystemClock()
        timer = PreciseTimer("t", lambda: fired.append(time.monotonic()), clock)
        timer.start(loop)
        try:
            start = time.monotonic()
            timer.arm(start + 0.0003)
            timer.arm(start + 0.0005)  # re-arming replaces the target
            while not fired:
                await asyncio.sleep(0.0001)
            await asyncio.sleep(0.01)
            assert len(fired) == 1 and fired[0] - start >= 0.0005
        finally:
            timer.close()

    run_async(main(), use_uvloop=True)


def test_precise_timer_follows_the_injected_clock(run_async):
    """On a FakeClock nothing fires until the clock is moved past the target, however long real time runs."""

    async def main():
        loop = asyncio.get_running_loop()
        clock = FakeClock(10.0)
        fired: list[float] = []
        timer = PreciseTimer("t", lambda: fired.append(clock.now()), clock)
        timer.start(loop)
        try:
            timer.arm(10.5)
            clock.advance(0.2)
            clock.advance(0.3)
            while not fired:
                await asyncio.sleep(0)
            assert fired == [10.5]
        finally:
            timer.close()

    run_async(main())
