"""ModelScheduler: the one place with futures, threads and timers.

Drives the pure parts (queue, batcher, ordering, inline policy) from the
event loop: `_schedule` runs synchronously on every arrival, batch completion,
timer fire and knob change, so a request that finds a free instance is sent to
its worker thread (or, when cheap and the loop is idle, run right there, see
inline.py) inside the caller's own `infer` call, with no extra task.

Threading contract: `start`, `infer`, `stop`, `stats`, `observe` and
`pending` are called on the event loop that `start` ran on. `apply` may be
called from any thread: the swap is one reference assignment and the
re-evaluation is posted to the loop.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

from tidal.backends.base import Backend
from tidal.clock import Clock, SystemClock
from tidal.errors import (
    BackendError,
    ConfigError,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    TidalError,
    Unavailable,
)
from tidal.scheduling.batcher import BatchLimits, Wait, form_batch
from tidal.scheduling.execute import BatchOutcome, run_batch
from tidal.scheduling.inline import InlinePolicy
from tidal.scheduling.knobs import Knobs
from tidal.scheduling.ordering import InOrder
from tidal.scheduling.queue import Entry, RequestQueue, SchedulerConfig
from tidal.scheduling.stats import ModelStats, Observation, StatsRecorder
from tidal.scheduling.threads import InstanceWorkers, PreciseTimer
from tidal.types import InferRequest, InferResponse

VARIANT_PARAMETER = "tidal_variant"


class _State(enum.Enum):
    NEW = 1
    RUNNING = 2
    STOPPING = 3
    STOPPED = 4


class _Lane(NamedTuple):
    """Instances serving some priority levels with one variant (every level, without a route)."""

    levels: range | None  # None: every level
    instances: tuple[int, ...]
    variant: str
    backends: Sequence[Backend]
    limits: BatchLimits


class _Active(NamedTuple):
    """Everything derived from one Knobs object; replaced as a whole."""

    knobs: Knobs
    lanes: tuple[_Lane, ...]
    by_level: tuple[_Lane, ...]  # the lane serving each priority level (index: level - 1)


class ModelScheduler:
    """Queues, batches and runs the requests of one loaded model version."""

    def __init__(
        self,
        name: str,
        config: SchedulerConfig,
        knobs: Knobs,
        runners: Mapping[str, Sequence[Backend]],
        output_names: Sequence[str],
        clock: Clock | None = None,
        inline: bool = True,
        coupled: frozenset[str] = frozenset(),
    ) -> None:
        """`inline` False keeps every batch off the loop: for models whose run time the batch size does
        not predict (variable input dims, loops and other data-dependent ops). `coupled`: variants whose
        rows share statistics across the batch (execute.py keeps non-finite requests out of their batches)."""
        if not runners or not all(runners.values()):
            raise ConfigError(f"model '{name}': every variant needs at least one backend instance")
        self._name = name
        self._config = config
        self._clock = clock or SystemClock()
        self._runners = {variant: tuple(instances) for variant, instances in runners.items()}
        self._declared = tuple(output_names)
        self._declared_set = frozenset(output_names)
        self._batched = config.max_batch_size > 0
        self._active = self._resolve(knobs)
        self._queue = RequestQueue(config)
        self._order: InOrder[tuple[Entry, Any]] | None = InOrder() if config.preserve_ordering else None
        slots = max(len(instances) for instances in self._runners.values())
        self._busy = [False] * slots
        self._running = 0  # requests inside executing batches
        # Per lane (keyed by its levels): its last batch's time per request, the pace its queue drains at per
        # instance. Lanes differ in variant and device, so one lane's pace says nothing of another's.
        self._request_s: dict[range | None, float] = {}
        self._workers = InstanceWorkers(slots, name)
        self._timer = PreciseTimer(name, self._on_timer, self._clock)
        self._timer_at: float | None = None
        self._may_inline = inline
        self._coupled = coupled
        self._inline: InlinePolicy | None = None
        self._stats = StatsRecorder(config.priority_levels)
        self._state = _State.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._idle: asyncio.Event | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._state is not _State.NEW:
            raise RuntimeError(f"scheduler '{self._name}' was already started")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self._may_inline:
            self._inline = InlinePolicy(self._clock.now)
        self._workers.start(self._loop)
        self._timer.start(self._loop)
        self._state = _State.RUNNING

    async def stop(self, drain: bool = True) -> None:
        """Refuse new requests; finish (drain) or fail queued ones; wait for running batches.

        The backends stay open: their owner closes them after this returns.
        """
        if self._state is _State.NEW:
            self._state = _State.STOPPED
        if self._state is _State.STOPPED:
            return
        if self._state is _State.RUNNING:
            self._state = _State.STOPPING
            self._idle = asyncio.Event()
            if not drain:
                now = self._clock.now()
                for entry in self._queue.drain():
                    self._fail(entry, Unavailable(f"model '{self._name}' is unloading"), "OTHER", now)
            self._schedule()
        assert self._idle is not None
        await self._idle.wait()
        if self._state is _State.STOPPING:
            self._state = _State.STOPPED
            self._timer.close()
            self._workers.close()

    # -- requests -------------------------------------------------------------------------
    async def infer(self, request: InferRequest) -> InferResponse:
        """Answer one request; cancelling the caller removes a queued request at once."""
        if self._state is not _State.RUNNING:
            raise Unavailable(f"model '{self._name}' is not accepting requests")
        now = self._clock.now()
        try:
            for output in request.requested_outputs:
                if output not in self._declared_set:
                    raise InvalidArgument(f"model '{self._name}' has no output '{output}'")
            lane = self._active.by_level[self._config.level_of(request.priority) - 1]
            pace_s = self._request_s.get(lane.levels, 0.0) / len(lane.instances)
            entry = self._queue.admit(request, now, self._active.knobs.admission_limits, pace_s)
        except TidalError as exc:
            reason = "REJECTED" if isinstance(exc, ResourceExhausted | DeadlineExceeded) else "OTHER"
            self._stats.failed(request.arrival_s, reason, now)
            raise
        assert self._loop is not None
        if self._inline is not None:
            self._inline.arrived(self.pending() - 1)
        waiter = entry.waiter = self._loop.create_future()
        self._stats.admitted(entry.level)
        if self._order is not None:
            self._order.add(entry.seq)
        self._schedule()
        try:
            return await waiter
        except asyncio.CancelledError:
            if self._queue.cancel(entry):
                self._fail(entry, None, "CANCELED", self._clock.now())
                self._check_idle()
            raise

    # -- knobs and observation ------------------------------------------------------------
    @property
    def knobs(self) -> Knobs:
        return self._active.knobs

    def apply(self, knobs: Knobs) -> None:
        """Swap the knob set atomically; InvalidArgument (and no change) if it does not fit this model."""
        self._active = self._resolve(knobs)
        if self._state in (_State.RUNNING, _State.STOPPING) and self._loop is not None:
            if threading.get_ident() == self._loop_thread:
                self._schedule()
            else:
                self._loop.call_soon_threadsafe(self._schedule)

    def stats(self) -> ModelStats:
        return self._stats.snapshot()

    def observe(self) -> Observation:
        """The controller's view; drains the latency and batch samples collected since the last call."""
        queue = self._queue
        return self._stats.observe(self._clock.now(), queue.depth_by_level(), self._running, queue.shed_by_level())

    def queue_depth(self) -> dict[int, int]:
        """Requests waiting per priority level, without draining the controller's samples."""
        return self._queue.depth_by_level()

    def pending(self) -> int:
        """Requests queued or inside a running batch."""
        return len(self._queue) + self._running

    # -- the scheduling step --------------------------------------------------------------
    def _resolve(self, knobs: Knobs) -> _Active:
        variant = knobs.active_variant
        if variant not in self._runners:
            if variant:
                raise InvalidArgument(f"model '{self._name}' has no variant '{variant}' loaded")
            variant = next(iter(self._runners))
        backends = self._runners[variant]
        if knobs.instance_count > len(backends):
            raise InvalidArgument(
                f"instance_count {knobs.instance_count} exceeds the {len(backends)} instances of '{variant}'"
            )
        if self._config.batching and knobs.max_batch_size > self._config.max_batch_size:
            raise InvalidArgument(
                f"max_batch_size {knobs.max_batch_size} exceeds the model's limit {self._config.max_batch_size}"
            )
        everyone = tuple(range(knobs.instance_count))
        lane = _Lane(None, everyone, variant, backends, BatchLimits.of(self._config, knobs))
        route = knobs.route
        levels = self._config.priority_levels
        if route is None:
            return _Active(knobs, (lane,), (lane,) * levels)
        rest = tuple(i for i in everyone if i not in route.instances)
        problem = ""
        if not 1 <= route.levels < levels:
            problem = f"it has {levels} priority level(s)"
        elif not rest or not route.instances or not set(route.instances) < set(everyone):
            problem = f"instances {route.instances} are not a part of 0..{knobs.instance_count - 1}"
        elif route.variant not in self._runners:
            problem = f"no variant '{route.variant}' is loaded"
        elif self._config.batching and route.max_batch_size > self._config.max_batch_size:
            problem = f"max_batch_size {route.max_batch_size} exceeds its limit {self._config.max_batch_size}"
        if problem:
            raise InvalidArgument(f"model '{self._name}' cannot route levels 1..{route.levels}: {problem}")
        top = _Lane(range(1, route.levels + 1), route.instances, route.variant, self._runners[route.variant],
                    BatchLimits.of(self._config, replace(knobs, max_batch_size=route.max_batch_size,
                                                         max_queue_delay_us=route.max_queue_delay_us)))
        bulk = lane._replace(levels=range(route.levels + 1, levels + 1), instances=rest)
        return _Active(knobs, (top, bulk), (top,) * route.levels + (bulk,) * (levels - route.levels))

    def _schedule(self) -> None:
        """Expire, then fill every free instance the batcher allows, lane by lane, then arm the timer."""
        if self._state is _State.STOPPED:
            return
        now = self._expire()
        wake_s = None
        for lane in self._active.lanes:
            now, until_s = self._fill(lane, now)
            if until_s is not None and (wake_s is None or until_s < wake_s):
                wake_s = until_s
        event_s = self._queue.next_event_s()
        if event_s is not None and (wake_s is None or event_s < wake_s):
            wake_s = event_s
        if wake_s is not None and (self._timer_at is None or wake_s < self._timer_at):
            self._timer_at = wake_s
            self._timer.arm(wake_s)
        self._check_idle()

    def _fill(self, lane: _Lane, now: float) -> tuple[float, float | None]:
        """Start batches of the lane's levels on its free instances; (now, when the batcher asks to look again)."""
        limits = lane.limits if self._state is _State.RUNNING else lane.limits.without_window()
        while True:
            index = next((i for i in lane.instances if not self._busy[i]), None)
            if index is None:
                return now, None
            # Nothing executing: waiting could only add latency, since no running batch will free an
            # instance sooner. The window applies only while another batch is running.
            running = any(self._busy[i] for i in lane.instances)
            decision = form_batch(self._queue, limits if running else limits.without_window(), now, lane.levels)
            if decision is None:
                return now, None
            if isinstance(decision, Wait):
                return now, decision.until_s
            self._queue.take(decision.entries)
            if self._launch(index, lane, decision.entries, now):
                now = self._expire()  # time passed while it ran

    def _expire(self) -> float:
        now = self._clock.now()
        for entry in self._queue.expire(now):
            self._fail(entry, _expired(entry, now), "REJECTED", now)
        return now

    def _launch(self, index: int, lane: _Lane, entries: list[Entry], now: float) -> bool:
        """Start a batch on instance `index`; True if it already ran, inline."""
        self._busy[index] = True
        self._running += len(entries)
        job = functools.partial(
            run_batch, lane.backends[index], entries, self._declared, self._batched, self._clock,
            lane.variant in self._coupled,
        )
        if self._inline is not None and self._inline.inline(sum(entry.rows for entry in entries)):
            self._complete(index, entries, lane, now, job())
            return True
        done = functools.partial(self._finish, index, entries, lane, now)
        self._workers.submit(index, job, done)
        return False

    def _finish(self, index: int, entries: list[Entry], lane: _Lane, started_s: float, outcome: BatchOutcome) -> None:
        self._complete(index, entries, lane, started_s, outcome)
        self._schedule()

    def _complete(
        self, index: int, entries: list[Entry], lane: _Lane, started_s: float, outcome: BatchOutcome
    ) -> None:
        self._busy[index] = False
        self._running -= len(entries)
        now = self._clock.now()
        if outcome.error is None:
            self._request_s[lane.levels] = (outcome.input_s + outcome.infer_s + outcome.output_s) / len(entries)
            if self._inline is not None:
                self._inline.ran(sum(entry.rows for entry in entries), outcome.infer_s)
            self._stats.executed(entries, outcome, started_s, lane.variant, now)
            named = {VARIANT_PARAMETER: lane.variant} if lane.variant else {}  # a model without variants: none
            for entry, outputs in zip(entries, outcome.outputs, strict=True):
                request = entry.request
                response = InferResponse(request.model_name, request.model_version, outputs, request.id, named)
                self._answer(entry, response)
        else:
            for entry in entries:
                self._stats.failed(entry.request.arrival_s, "BACKEND", now)
                self._answer(entry, BackendError(str(outcome.error)))

    def _on_timer(self) -> None:
        self._timer_at = None
        self._schedule()

    # -- answers --------------------------------------------------------------------------
    def _answer(self, entry: Entry, result: InferResponse | TidalError) -> None:
        if self._order is None:
            _settle(entry, result)
        else:
            for held, held_result in self._order.resolve(entry.seq, (entry, result)):
                _settle(held, held_result)

    def _fail(self, entry: Entry, exc: TidalError | None, reason: str, now: float) -> None:
        """A request that leaves without running; `exc` None when its caller is already gone."""
        self._stats.failed(entry.request.arrival_s, reason, now)
        if exc is not None:
            _settle(entry, exc)
        if self._order is not None:
            for held, held_result in self._order.drop(entry.seq):
                _settle(held, held_result)

    def _check_idle(self) -> None:
        if self._idle is not None and self._state is _State.STOPPING and not self.pending():
            self._idle.set()


def _settle(entry: Entry, result: InferResponse | TidalError) -> None:
    waiter = entry.waiter
    if waiter.done():  # the caller was cancelled while its batch ran
        return
    if isinstance(result, TidalError):
        waiter.set_exception(result)
    else:
        waiter.set_result(result)


def _expired(entry: Entry, now: float) -> DeadlineExceeded:
    if entry.deadline_s <= now:
        return DeadlineExceeded("the request deadline passed while it was queued")
    return DeadlineExceeded("the request timeout passed while it was queued")
