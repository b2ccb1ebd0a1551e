"""Load generation inside one process: closed loop, open loop and trace replay.

A `LoadWorker` owns one channel and runs on one event loop. The coordinator
starts a load, takes a `WorkerWindow` every tick (counts since the last
one), and stops it, which waits for stragglers up to a timeout and then
cancels them, so every request sent ends with exactly one outcome.

Open-loop latency counts from the *scheduled* send time: when the server
(or this client) falls behind, the delay shows up as latency instead of
silently thinning the offered load. The lateness of the actual send is
recorded separately as send lag, the client's own health signal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from tidal.bench.client import Target, raw_infer
from tidal.bench.spec import Stage, TrafficClass
from tidal.bench.stats import OK, ClassRecorder, ClassWindow, new_histogram
from tidal.errors import Unavailable

_NS = 1_000_000_000
_HEARTBEAT_S = 0.05  # often enough for a p99 per window, rare enough to cost nothing
_CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class ClosedLoad:
    concurrency: int


@dataclass(frozen=True, slots=True)
class OpenLoad:
    stages: tuple[Stage, ...]
    poisson: bool = True
    phase: float = 0.0  # where in the first gap constant arrivals start, so processes interleave


@dataclass(frozen=True, slots=True)
class TraceRequest:
    send_s: float
    class_index: int
    deadline_us: int = 0


@dataclass(frozen=True, slots=True)
class TraceLoad:
    requests: tuple[TraceRequest, ...]


Load = ClosedLoad | OpenLoad | TraceLoad


def split_load(load: Load, parts: int) -> list[Load]:
    """Shares of one load for `parts` processes that add up to the whole."""
    if isinstance(load, ClosedLoad):
        base, extra = divmod(load.concurrency, parts)
        return [ClosedLoad(base + (i < extra)) for i in range(parts)]
    if isinstance(load, OpenLoad):
        stages = tuple(Stage(s.duration_s, s.rate_start / parts, s.rate_end / parts) for s in load.stages)
        return [OpenLoad(stages, load.poisson, (load.phase + i / parts) % 1.0) for i in range(parts)]
    return [TraceLoad(load.requests[i::parts]) for i in range(parts)]


def arrival_offsets(load: OpenLoad, rng: random.Random) -> Iterator[float]:
    """Send times in seconds from the start, exact for piecewise-linear rates.

    Arrivals are points of the cumulative intensity L(t) = integral of rate:
    constant arrivals sit at L = phase, phase+1, ...; Poisson ones at sums
    of unit exponentials. Within a stage L is quadratic in t, so each point
    is found by solving that quadratic.
    """
    target = rng.expovariate(1.0) if load.poisson else load.phase
    stage_start = 0.0
    for stage in load.stages:
        r0, r1, dur = stage.rate_start, stage.rate_end, stage.duration_s
        total = math.inf if math.isinf(dur) else (r0 + r1) / 2 * dur
        a = 0.0 if math.isinf(dur) else (r1 - r0) / (2 * dur)
        while target < total:
            offset = target / r0 if a == 0 else (-r0 + math.sqrt(r0 * r0 + 4 * a * target)) / (2 * a)
            yield stage_start + offset
            target += rng.expovariate(1.0) if load.poisson else 1.0
        target -= total
        stage_start += dur


@dataclass(frozen=True, slots=True)
class WorkerWindow:
    """One process's tick: per-class windows plus its own health; picklable."""

    t_ns: int
    classes: dict[str, ClassWindow]
    loop_lag: bytes
    inflight: int
    # When the run ran out (schedule over, last answer in), on perf_counter_ns: one clock for every
    # process of the machine. None while it runs.
    finished_ns: int | None
    capped: int = 0  # sends held back by the in-flight cap
    stragglers: int = 0


@dataclass
class _Run:
    tasks: set[asyncio.Task] = field(default_factory=set)
    driver: asyncio.Task | None = None
    stopping: bool = False
    ended_ns: int = 0  # the later of the schedule's end and the last answer so far


class LoadWorker:
    """Generates one process's share of the load; all methods run on its event loop."""

    def __init__(self, target: Target, classes: list[TrafficClass], payloads: dict[tuple[int, int], bytes],
                 request_timeout_s: float, max_inflight: int, seed: int) -> None:
        self._target = target
        self._classes = classes
        self._payloads = payloads
        self._timeout_s = request_timeout_s
        self._max_inflight = max_inflight
        self._rng = random.Random(seed)
        self._weights = [c.weight for c in classes]
        self._slo_ns = [int(c.slo_ms * 1e6) if c.slo_ms is not None else None for c in classes]
        self._channel: grpc.aio.Channel | None = None
        self._run = _Run()
        self._slot_freed = asyncio.Event()
        self._inflight = 0
        self._reset()

    def _reset(self) -> None:
        self._rec = {c.key: ClassRecorder() for c in self._classes}
        self._loop_lag = new_histogram()
        self._capped = 0

    async def open(self) -> None:
        self._channel = self._target.channel()
        self._infer = raw_infer(self._channel)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), _CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise Unavailable(f"cannot connect to {self._target.url}") from None
        # Everything built so far lives for the whole run: keep the collector from rescanning it,
        # which would otherwise show up as client-made tail latency.
        gc.freeze()
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def close(self) -> None:
        self._heartbeat.cancel()
        if self._channel is not None:
            await self._channel.close()

    def start(self, load: Load) -> None:
        self._run = _Run()
        self._reset()
        loop = asyncio.get_running_loop()
        if isinstance(load, ClosedLoad):
            self._run.driver = loop.create_task(self._closed(load.concurrency))
        elif isinstance(load, OpenLoad):
            offsets = arrival_offsets(load, self._rng)
            end_s = sum(s.duration_s for s in load.stages)
            self._run.driver = loop.create_task(self._open(((t, self._pick(), 0) for t in offsets), end_s))
        else:
            self._run.driver = loop.create_task(
                self._open(((r.send_s, r.class_index, r.deadline_us) for r in load.requests), 0.0)
            )

    def window(self) -> WorkerWindow:
        """Counts since the previous window; resets them."""
        run = self._run
        finished = run.driver is not None and run.driver.done() and not run.tasks
        out = WorkerWindow(
            t_ns=time.perf_counter_ns(),
            classes={k: r.window() for k, r in self._rec.items()},
            loop_lag=self._loop_lag.encode(),
            inflight=self._inflight,
            finished_ns=run.ended_ns if finished else None,
            capped=self._capped,
        )
        self._reset()
        return out

    async def stop(self, drain_timeout_s: float) -> WorkerWindow:
        """Stops sending, waits for in-flight requests, cancels those past the timeout."""
        run = self._run
        run.stopping = True
        if run.driver is not None:
            run.driver.cancel()
            await asyncio.gather(run.driver, return_exceptions=True)
        stragglers = 0
        if run.tasks:
            _, pending = await asyncio.wait(set(run.tasks), timeout=drain_timeout_s)
            stragglers = len(pending)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return dataclasses.replace(self.window(), inflight=0, finished_ns=run.ended_ns, stragglers=stragglers)

    def _pick(self) -> int:
        if len(self._classes) == 1:
            return 0
        return self._rng.choices(range(len(self._classes)), self._weights)[0]

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._run.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._run.tasks.discard(task)
        self._slot_freed.set()

    async def _closed(self, concurrency: int) -> None:
        for _ in range(concurrency):
            self._spawn(self._slot())

    async def _slot(self) -> None:
        """One of the closed loop's concurrent users: sends again as soon as its reply is in."""
        freed = time.perf_counter_ns()
        while not self._run.stopping:
            await self._one(self._pick(), 0, freed, from_schedule=False)
            freed = time.perf_counter_ns()

    async def _open(self, schedule: Iterator[tuple[float, int, int]], end_s: float) -> None:
        """Sends on schedule, then waits out `end_s`: a profile lasts its stages, not up to its last arrival."""
        start = time.perf_counter_ns()
        for offset_s, index, deadline_us in schedule:
            due = start + int(offset_s * _NS)
            delay = due - time.perf_counter_ns()
            if delay > 0:
                await asyncio.sleep(delay / _NS)
            if len(self._run.tasks) >= self._max_inflight:
                self._capped += 1
            while len(self._run.tasks) >= self._max_inflight:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            self._spawn(self._one(index, deadline_us, due, from_schedule=True))
        delay_s = end_s - (time.perf_counter_ns() - start) / _NS
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        self._run.ended_ns = time.perf_counter_ns()

    async def _one(self, index: int, deadline_us: int, intended_ns: int, from_schedule: bool) -> None:
        """Sends one request and records its single outcome, whatever happens to it."""
        key = self._classes[index].key
        slo_ns = deadline_us * 1000 if deadline_us else self._slo_ns[index]
        sent = time.perf_counter_ns()
        self._rec[key].sent += 1
        self._inflight += 1
        details = ""
        try:
            await self._infer(self._payloads[index, deadline_us], timeout=self._timeout_s)
            code = OK
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code().name, exc.details() or ""
        except asyncio.CancelledError:
            code, details = grpc.StatusCode.CANCELLED.name, "cancelled by tidal bench at the end of the drain"
        finally:
            self._inflight -= 1
        done = self._run.ended_ns = time.perf_counter_ns()
        origin = intended_ns if from_schedule else sent
        # Looked up again: the window may have turned while the request was in flight.
        self._rec[key].record(code, done - origin, done - sent, sent - intended_ns, slo_ns, details)

    async def _beat(self) -> None:
        """Measures how late the event loop runs a timer: the client's own saturation."""
        while True:
            due = time.perf_counter_ns() + int(_HEARTBEAT_S * _NS)
            await asyncio.sleep(_HEARTBEAT_S)
            self._loop_lag.record_value(max((time.perf_counter_ns() - due) // 1000, 1))
