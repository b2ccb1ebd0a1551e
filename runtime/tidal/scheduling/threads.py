"""The threads behind the engine: one per backend instance, and one precise timer.

Both hand their results back to the event loop with `call_soon_threadsafe`;
nothing here touches scheduler state.

Why instance threads run at a lower CPU priority than the loop: when the
request path, not the model, is the bottleneck (many small requests), the
loop and an instance thread compete for the same cores. If the instance
thread wins, it runs each batch as soon as one request is queued, the loop
takes the next calls from gRPC late, and batches stay at one or two requests
that each pay the whole hand-off. If the loop wins, calls keep being taken
while a batch waits for its core, so the next batch holds what arrived
meanwhile. Measured with perf_analyzer on the 256-1024-1024-10 MLP at
concurrency 128 on 2 cores, one intra-op thread (perf/RESULTS.md, issue 16):
larger batches, more requests/s and less CPU per request, with no change at
concurrency 1 (where batches run inline). Niceness orders the threads of one
scheduling group (a container's CPU cgroup, an autogroup, else the host).

Why a timer thread: the batching window is often below a millisecond, and
event-loop timers are not. uvloop keeps timers in whole milliseconds and
truncates, so `call_later(0.0005)` fires on the next iteration (a 0.5 ms
window silently becomes 0) and 1.5 ms becomes ~2 ms; the default asyncio loop
rounds every wait up to the next millisecond. A condition-variable wait on a
thread wakes within ~0.1 ms of the target on Linux, costs one thread wake-up
per window (not per request), and keeps the loop free, where spinning on the
loop would steal the core the gRPC server needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

from tidal.clock import Clock

INSTANCE_NICE = 10  # added to the loop's niceness for instance threads (Linux per-thread nice; 19 at most)


def lower_priority() -> None:
    """Raise the calling thread's niceness by INSTANCE_NICE (the thread's only: Linux applies it per thread id;
    elsewhere a thread id is no process id, so nothing is changed)."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError):  # a sandbox that forbids it
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + INSTANCE_NICE))


class InstanceWorkers:
    """`count` threads; thread i runs only the jobs submitted for instance i, one at a time."""

    def __init__(self, count: int, name: str) -> None:
        self._name = name
        self._inboxes: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(count)]
        self._threads: list[threading.Thread] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        for index, inbox in enumerate(self._inboxes):
            thread = threading.Thread(target=_work, args=(inbox, loop), name=f"tidal-{self._name}-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, index: int, job: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Run `job()` on thread `index`, then `done(result)` on the loop. `job` must not raise."""
        self._inboxes[index].put((job, done))

    def close(self) -> None:
        """Let every thread finish its current job and exit; blocks until they have."""
        for inbox in self._inboxes:
            inbox.put(None)
        for thread in self._threads:
            thread.join()
        self._threads.clear()


def _work(inbox: queue.SimpleQueue, loop: asyncio.AbstractEventLoop) -> None:
    lower_priority()
    while (item := inbox.get()) is not None:
        job, done = item
        result = job()
        try:
            loop.call_soon_threadsafe(done, result)
        except RuntimeError:  # the loop closed without stopping the scheduler: nobody is waiting
            return


class PreciseTimer:
    """Calls `callback` on the loop once `clock` reaches the armed time; re-arming replaces the target.

    Targets are on the injected clock, so a test's FakeClock drives the batching window and queue timeouts
    (its `advance` wakes the thread) and no engine test waits on real time."""

    def __init__(self, name: str, callback: Callable[[], None], clock: Clock) -> None:
        self._name = name
        self._callback = callback
        self._clock = clock
        self._cond = threading.Condition()
        self._target: float | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._clock.watch(self._wake)
        self._thread = threading.Thread(target=self._run, args=(loop,), name=f"tidal-{self._name}-timer", daemon=True)
        self._thread.start()

    def arm(self, at_s: float) -> None:
        """Fire once the clock reads `at_s`."""
        with self._cond:
            self._target = at_s
            self._cond.notify()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._cond:
            while not self._closed:
                if self._target is None:
                    self._cond.wait()
                    continue
                remaining = self._target - self._clock.now()
                if remaining > 0:
                    self._cond.wait(self._clock.real_wait_s(remaining))
                    continue
                self._target = None
                try:
                    loop.call_soon_threadsafe(self._callback)
                except RuntimeError:  # the loop closed without stopping the scheduler
                    return
