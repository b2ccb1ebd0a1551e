"""Helpers the scheduler tests share: a ModelScheduler over test backends, served with gates, and the wait
for a backend's next run."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

from tidal.clock import FakeClock
from tidal.scheduling import Knobs, ModelScheduler, SchedulerConfig

BATCHING = SchedulerConfig(batching=True, max_batch_size=4)


@contextlib.asynccontextmanager
async def serving(scheduler: ModelScheduler, *gates: threading.Event) -> AsyncIterator[ModelScheduler]:
    """Start; on exit open every gate, drain, and require that nothing is left pending."""
    await scheduler.start()
    try:
        yield scheduler
    finally:
        for gate in gates:
            gate.set()
        await scheduler.stop()
    assert scheduler.pending() == 0


async def started(backend) -> None:
    """Wait until `backend` has begun one more run."""
    await asyncio.to_thread(backend.started.acquire)


def sched(backends, config=BATCHING, knobs=None, clock=None) -> ModelScheduler:
    runners = backends if isinstance(backends, dict) else {"": backends}
    return ModelScheduler("m", config, knobs or Knobs(4, 0), runners, ["y", "s"], clock or FakeClock())
