"""Counters for the ModelStatistics RPC and Prometheus, and samples for the controller.

Durations are cumulative nanoseconds, as the statistics extension reports
them. Per-request counters (success, fail, queue, compute_*) add the whole
batch's time once for every request in it; `batch_stats` counts executions.
The recorder is written from the event loop only; `snapshot` and `observe`
return copies, so readers never see a half-updated batch.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from tidal.scheduling.execute import BatchOutcome
from tidal.scheduling.queue import Entry
from tidal.types import BatchSample, LatencySample, Observation

REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")
SAMPLE_LIMIT = 8192  # samples kept between two observe() calls; older ones are dropped


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9) * count


@dataclass
class ModelStats:
    success: Duration = field(default_factory=Duration)  # arrival -> answer, successful requests
    fail: Duration = field(default_factory=Duration)  # arrival -> answer, failed requests
    queue: Duration = field(default_factory=Duration)  # arrival -> batch start
    compute_input: Duration = field(default_factory=Duration)  # concatenation
    compute_infer: Duration = field(default_factory=Duration)  # backend.run
    compute_output: Duration = field(default_factory=Duration)  # checking and splitting
    inference_count: int = 0  # rows served
    execution_count: int = 0  # batches run
    last_inference_ms: int = 0  # unix ms of the last successful batch
    # batch size -> (compute_input, compute_infer, compute_output), counted per execution
    batch_stats: dict[int, tuple[Duration, Duration, Duration]] = field(default_factory=dict)
    failures_by_reason: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))


class StatsRecorder:
    def __init__(self, priority_levels: int) -> None:
        self._stats = ModelStats()
        self._arrivals = dict.fromkeys(range(1, priority_levels + 1), 0)
        self._batches: deque[BatchSample] = deque(maxlen=SAMPLE_LIMIT)
        self._latencies: deque[LatencySample] = deque(maxlen=SAMPLE_LIMIT)

    def admitted(self, level: int) -> None:
        self._arrivals[level] += 1

    def failed(self, arrival_s: float, reason: str, now: float) -> None:
        self._stats.fail.add(now - arrival_s)
        self._stats.failures_by_reason[reason] += 1

    def executed(
        self, entries: Sequence[Entry], outcome: BatchOutcome, started_s: float, variant: str, now: float
    ) -> None:
        """A batch that produced outputs; failed batches go through `failed` per request."""
        stats, count = self._stats, len(entries)
        rows = sum(entry.rows for entry in entries)
        for entry in entries:
            arrival = entry.request.arrival_s
            stats.success.add(now - arrival)
            stats.queue.add(started_s - arrival)
            self._latencies.append(LatencySample(entry.level, now - arrival, started_s - arrival))
        stats.compute_input.add(outcome.input_s, count)
        stats.compute_infer.add(outcome.infer_s, count)
        stats.compute_output.add(outcome.output_s, count)
        stats.inference_count += rows
        stats.execution_count += 1
        stats.last_inference_ms = time.time_ns() // 1_000_000  # reported wall time, never used to schedule
        per_size = stats.batch_stats.setdefault(rows, (Duration(), Duration(), Duration()))
        per_size[0].add(outcome.input_s)
        per_size[1].add(outcome.infer_s)
        per_size[2].add(outcome.output_s)
        self._batches.append(BatchSample(rows, outcome.input_s + outcome.infer_s + outcome.output_s, variant))

    def snapshot(self) -> ModelStats:
        return copy.deepcopy(self._stats)

    def observe(self, now: float, queue_depth: dict[int, int], running: int, shed: dict[int, int]) -> Observation:
        """A copy for the controller; drains the sample buffers."""
        batches, latencies = tuple(self._batches), tuple(self._latencies)
        self._batches.clear()
        self._latencies.clear()
        return Observation(
            at_s=now,
            queue_depth=queue_depth,
            running=running,
            arrivals=dict(self._arrivals),
            completed=self._stats.success.count,
            failed=self._stats.fail.count,
            batches=batches,
            latencies=latencies,
            shed=shed,
        )
