"""Per-priority request queues with the queue policy of the model config.

Pure: no asyncio, threads or clock reads; every method that depends on time
takes `now` (monotonic seconds on the scheduler's clock). The engine owns one
`RequestQueue` per model and calls it from the event loop only.

Order of service: level 1 first; inside a level, requests still within their
timeout in arrival order, then requests whose timeout passed under the DELAY
action in the order they timed out. A passed gRPC deadline always ends a
request, whatever the action.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tidal.errors import ConfigError, DeadlineExceeded, InvalidArgument, ResourceExhausted, pushback_ms
from tidal.types import InferRequest

_NEVER = math.inf
# Queues, counters and metrics exist per level from the start, so the count must stay small; Triton
# users rarely go past a handful.
MAX_PRIORITY_LEVELS = 256


class TimeoutAction(enum.Enum):
    REJECT = "REJECT"  # answer DEADLINE_EXCEEDED once the timeout passes in the queue
    DELAY = "DELAY"  # keep it, served after every request of its level still in time


@dataclass(frozen=True)
class QueuePolicy:
    """One priority level's policy; `0` means "none" for the timeout and the size."""

    timeout_action: TimeoutAction = TimeoutAction.REJECT
    default_timeout_us: int = 0
    allow_timeout_override: bool = False  # a request's `timeout` may only lower the default
    max_queue_size: int = 0  # queued requests of this level; over it -> RESOURCE_EXHAUSTED at once


@dataclass(frozen=True)
class SchedulerConfig:
    """What the model config fixes for the lifetime of a loaded model (nothing here changes live)."""

    batching: bool  # the model has dynamic_batching
    max_batch_size: int  # the config's hard limit; 0 = inputs have no batch dim
    priority_levels: int = 1
    default_priority_level: int = 1
    default_policy: QueuePolicy = QueuePolicy()
    level_policies: Mapping[int, QueuePolicy] = field(default_factory=dict)
    preserve_ordering: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise ConfigError(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        if self.batching and self.max_batch_size < 1:
            raise ConfigError("dynamic batching needs max_batch_size >= 1")
        if not 1 <= self.priority_levels <= MAX_PRIORITY_LEVELS:
            raise ConfigError(f"priority_levels must be within 1..{MAX_PRIORITY_LEVELS}, got {self.priority_levels}")
        if not 1 <= self.default_priority_level <= self.priority_levels:
            raise ConfigError(
                f"default_priority_level {self.default_priority_level} is outside 1..{self.priority_levels}"
            )
        for level in self.level_policies:
            if not 1 <= level <= self.priority_levels:
                raise ConfigError(f"queue policy for level {level} but priority_levels is {self.priority_levels}")

    def policy(self, level: int) -> QueuePolicy:
        return self.level_policies.get(level, self.default_policy)

    def level_of(self, priority: int) -> int:
        """The level a request's `priority` parameter selects: 0, or a level the model does not have, means
        the default level, as in Triton (a client written for one model's levels keeps working on another)."""
        if not 1 <= priority <= self.priority_levels:
            return self.default_priority_level
        return priority


@dataclass(slots=True, eq=False)
class Entry:
    """One admitted request. Identity matters (eq=False): the engine finds it again on cancel."""

    request: InferRequest
    rows: int  # dim 0 of every input; 1 for models without a batch dim
    key: Any  # non-batch dims of every input; only entries with equal keys share a batch
    level: int
    seq: int  # admission order, unique per queue
    enqueued_s: float  # when it joined the queue: the batching window counts from here
    timeout_s: float  # arrival + policy timeout; inf when none
    deadline_s: float  # the gRPC deadline; inf when none
    delayed: bool = False  # its timeout passed under DELAY
    waiter: Any = None  # owned by the engine (its future); never read here


class RequestQueue:
    """Admission, cancellation and expiry for one model's queued requests."""

    def __init__(self, config: SchedulerConfig) -> None:
        self._config = config
        self._policies = [config.policy(level) for level in range(1, config.priority_levels + 1)]
        # Lanes in service order: [L1 in time, L1 delayed, L2 in time, ...]; keyed by seq so
        # removal from anywhere (cancel) is O(1) and iteration stays in insertion order.
        self._lanes: list[OrderedDict[int, Entry]] = [OrderedDict() for _ in range(2 * config.priority_levels)]
        self._level_sizes = [0] * config.priority_levels
        self._shed = [0] * config.priority_levels  # refused by admission limits, per level
        self._size = 0
        # (when, seq, entry) for every entry with a timeout or deadline; stale rows are skipped lazily.
        self._events: list[tuple[float, int, Entry]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return self._size

    def admit(
        self, request: InferRequest, now: float, limits: tuple[tuple[int, int], ...] = (), request_s: float = 0.0
    ) -> Entry:
        """Queue `request` or raise the error its client gets at once; `limits` as in `Knobs.admission_limits`.
        `request_s`: what serving one queued request takes now (0 before any was served); a refusal's pushback
        is the time the requests ahead of it take to drain at that pace."""
        config = self._config
        level = config.level_of(request.priority)
        rows, key = _rows_and_key(request, config)
        policy = self._policies[level - 1]
        deadline_s = _NEVER if request.deadline_s is None else request.deadline_s
        if deadline_s <= now:
            raise DeadlineExceeded("the request deadline passed before it was queued")
        ahead = sum(self._level_sizes[:level])  # served before it: its level and every higher one
        if policy.max_queue_size and self._level_sizes[level - 1] >= policy.max_queue_size:
            pushback = pushback_ms(ahead * request_s)
            raise ResourceExhausted(
                f"queue of priority level {level} is full ({policy.max_queue_size} requests); retry after "
                f"{pushback} ms or on another replica", pushback,
            )
        for limited, limit in limits:
            if limited == level and ahead >= limit:
                self._shed[level - 1] += 1
                pushback = pushback_ms(ahead * request_s)
                raise ResourceExhausted(
                    f"shed at arrival to hold the latency SLO of model '{request.model_name}': priority {level} "
                    f"admits at most {limit} queued requests at or above it now; retry after {pushback} ms, on "
                    "another replica, or with a higher priority", pushback,
                )
        timeout_us = policy.default_timeout_us
        if policy.allow_timeout_override and request.timeout_us and (not timeout_us or request.timeout_us < timeout_us):
            timeout_us = request.timeout_us
        timeout_s = request.arrival_s + timeout_us * 1e-6 if timeout_us else _NEVER
        delayed = timeout_s <= now
        if delayed and policy.timeout_action is TimeoutAction.REJECT:
            raise DeadlineExceeded(f"the request timeout ({timeout_us} us) passed before it was queued")
        entry = Entry(request, rows, key, level, next(self._seq), now, timeout_s, deadline_s, delayed)
        self._lane(entry)[entry.seq] = entry
        self._level_sizes[level - 1] += 1
        self._size += 1
        self._push_event(entry)
        return entry

    def cancel(self, entry: Entry) -> bool:
        """Remove a queued entry at once; False when it already left the queue."""
        if self._lane(entry).pop(entry.seq, None) is None:
            return False
        self._forget(entry)
        return True

    def take(self, entries: list[Entry]) -> None:
        """Remove the entries of a batch about to run (they must all be queued)."""
        for entry in entries:
            del self._lane(entry)[entry.seq]
            self._forget(entry)

    def drain(self) -> list[Entry]:
        """Remove and return everything queued, in service order."""
        entries = list(self.in_order())
        self.take(entries)
        return entries

    def expire(self, now: float) -> list[Entry]:
        """Apply deadlines and timeouts up to `now`; returns the entries to answer DEADLINE_EXCEEDED."""
        events, expired = self._events, []
        while events and events[0][0] <= now:
            entry = heapq.heappop(events)[2]
            lane = self._lane(entry)
            if lane.get(entry.seq) is not entry:
                continue  # cancelled or dispatched since it was pushed
            del lane[entry.seq]
            if entry.deadline_s <= now or self._policies[entry.level - 1].timeout_action is TimeoutAction.REJECT:
                self._forget(entry)
                expired.append(entry)
            else:
                entry.delayed = True
                self._lane(entry)[entry.seq] = entry
                self._push_event(entry)
        return expired

    def next_event_s(self) -> float | None:
        """When `expire` next has work to do, or None."""
        events = self._events
        while events and self._lane(events[0][2]).get(events[0][1]) is not events[0][2]:
            heapq.heappop(events)
        return events[0][0] if events else None

    def in_order(self, levels: range | None = None) -> Iterator[Entry]:
        """Queued entries (of `levels` only, when given) in service order; do not change the queue while iterating."""
        lanes = self._lanes if levels is None else self._lanes[2 * (levels.start - 1) : 2 * (levels.stop - 1)]
        for lane in lanes:
            if lane:
                yield from lane.values()

    def depth_by_level(self) -> dict[int, int]:
        return {level: size for level, size in enumerate(self._level_sizes, start=1)}

    def shed_by_level(self) -> dict[int, int]:
        """Requests refused by admission limits since start, per level."""
        return {level: count for level, count in enumerate(self._shed, start=1)}

    def _lane(self, entry: Entry) -> OrderedDict[int, Entry]:
        return self._lanes[2 * (entry.level - 1) + entry.delayed]

    def _forget(self, entry: Entry) -> None:
        self._level_sizes[entry.level - 1] -= 1
        self._size -= 1

    def _push_event(self, entry: Entry) -> None:
        when = entry.deadline_s if entry.delayed else min(entry.timeout_s, entry.deadline_s)
        if when == _NEVER:
            return
        heapq.heappush(self._events, (when, entry.seq, entry))
        if len(self._events) > 2 * self._size + 64:
            # Dispatched entries with far deadlines would otherwise pile up until their time.
            self._events = [e for e in self._events if self._lane(e[2]).get(e[1]) is e[2]]
            heapq.heapify(self._events)


def _rows_and_key(request: InferRequest, config: SchedulerConfig) -> tuple[int, Any]:
    """Rows along dim 0 and the batch-compatibility key (every input's non-batch dims)."""
    if config.max_batch_size == 0:
        return 1, None
    rows = -1
    key = []
    for name, array in request.inputs.items():
        if array.ndim == 0:
            raise InvalidArgument(f"input '{name}' has no batch dimension")
        if rows == -1:
            rows = array.shape[0]
        elif array.shape[0] != rows:
            raise InvalidArgument(f"input '{name}' has {array.shape[0]} rows, other inputs have {rows}")
        key.append((name, array.shape[1:]))
    if rows < 1:
        raise InvalidArgument("a request needs at least one row along the batch dimension")
    if rows > config.max_batch_size:
        raise InvalidArgument(f"batch size {rows} exceeds the model's max_batch_size {config.max_batch_size}")
    if len(key) > 1:
        key.sort()
    return rows, tuple(key)
