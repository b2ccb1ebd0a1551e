"""InlinePolicy on a fake clock, and the engine running cheap batches on the loop thread only while
requests arrive one at a time."""

from __future__ import annotations

import asyncio
import threading

from tidal.clock import FakeClock
from tidal.scheduling import Knobs, ModelScheduler, SchedulerConfig
from tidal.scheduling.inline import INLINE_MAX_S, PROBE_S, QUIET_S, InlinePolicy

CHEAP = INLINE_MAX_S / 10


def quiet_policy() -> tuple[FakeClock, InlinePolicy]:
    """A policy that has measured cheap single-row batches and seen no overlap for QUIET_S, probe spent."""
    clock = FakeClock()
    policy = InlinePolicy(clock.now)
    policy.ran(1, CHEAP)
    clock.advance(QUIET_S)
    assert not policy.inline(1)  # the first decision after a quiet spell is a probe
    return clock, policy


def test_nothing_runs_inline_before_a_measurement_or_a_quiet_spell():
    clock = FakeClock()
    policy = InlinePolicy(clock.now)
    clock.advance(QUIET_S * 10)
    assert not policy.inline(1)  # never measured
    policy.ran(1, CHEAP)
    fresh = InlinePolicy(clock.now)
    fresh.ran(1, CHEAP)
    assert not fresh.inline(1)  # measured, but not yet quiet for QUIET_S


def test_cheap_batches_run_inline_with_one_probe_per_period():
    clock, policy = quiet_policy()
    assert [policy.inline(1) for _ in range(5)] == [True] * 5
    clock.advance(PROBE_S)
    assert [policy.inline(1) for _ in range(3)] == [False, True, True]


def test_run_time_is_predicted_per_batch_size_bucket_and_expensive_ones_stay_on_workers():
    _, policy = quiet_policy()
    assert not policy.inline(8)  # bucket 8-15 never measured
    policy.ran(8, INLINE_MAX_S * 3)
    assert not policy.inline(9)
    assert policy.inline(1)
    for _ in range(40):  # the estimate follows the measurements down
        policy.ran(12, CHEAP)
    assert policy.inline(15)


def test_an_overlapping_arrival_stops_inline_runs_for_the_quiet_period():
    clock, policy = quiet_policy()
    policy.arrived(0)
    assert policy.inline(1)
    policy.arrived(1)
    clock.advance(QUIET_S / 2)
    assert not policy.inline(1)
    clock.advance(QUIET_S / 2)
    assert not policy.inline(1)  # quiet again: a probe first
    assert policy.inline(1)


class ThreadRecorder:
    """Wraps RowBackend's run to note which thread ran each batch."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.threads: list[int] = []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run(self, inputs, output_names):
        self.threads.append(threading.get_ident())
        return self.backend.run(inputs, output_names)


def test_engine_runs_cheap_batches_inline_while_requests_arrive_one_at_a_time(
    run_async, row_backend, make_request
):
    backend = ThreadRecorder(row_backend())
    clock = FakeClock()
    config = SchedulerConfig(batching=True, max_batch_size=4)

    async def main():
        s = ModelScheduler("m", config, Knobs(4, 0), {"": [backend]}, ["y", "s"], clock)
        await s.start()
        loop_thread = threading.get_ident()
        try:
            await s.infer(make_request())  # measures the run time, on the worker
            clock.advance(QUIET_S)
            for value in range(4):  # a probe, then inline
                response = await s.infer(make_request(value=value))
                assert response.outputs["y"][0, 0] == value * 2 + 1
            assert [t == loop_thread for t in backend.threads] == [False, False, True, True, True]

            clock.advance(PROBE_S)  # the probe runs on a worker, so the second request overlaps it
            await asyncio.gather(s.infer(make_request()), s.infer(make_request()))
            await s.infer(make_request())
            assert not any(t == loop_thread for t in backend.threads[5:])
        finally:
            await s.stop()

    run_async(main())
