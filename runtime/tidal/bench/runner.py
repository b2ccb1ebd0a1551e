"""The coordinator: sweep points, ticks, stable windows, server views, drain.

Time is cut into ticks (`tick_s`, at most 1 s). Every tick the load
processes hand over their counts, which feed the time series and the
current measurement window. A sweep point measures windows of `window_s`
until the last three agree (throughput and mean latency within
`stability_pct` of their mean) or `max_windows` is reached, and reports
those three. Profiles and traces run to their end and report everything.
Each point ends with a drain, so its totals satisfy sent = ok + errors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from tidal.bench.client import ServerCounters, ServerView
from tidal.bench.load import Load, WorkerWindow
from tidal.bench.metrics import MetricsScraper
from tidal.bench.stats import ClassStats, latency_summary, merge, new_histogram, overall
from tidal.bench.workers import WorkerPool


@dataclass(frozen=True, slots=True)
class Point:
    label: str
    load: Load
    finite: bool  # ends by itself (profile, trace): measure it whole


@dataclass(frozen=True, slots=True)
class Timing:
    window_s: float = 2.0
    stability_pct: float = 10.0
    max_windows: int = 10
    duration_s: float | None = None  # a fixed measurement instead of stable windows
    warmup_s: float = 0.5
    drain_timeout_s: float = 10.0
    lag_threshold_ms: float = 5.0

    @property
    def tick_s(self) -> float:
        return min(1.0, self.duration_s or self.window_s)


@dataclass
class _Tick:
    duration_s: float
    classes: dict[str, ClassStats]
    loop_lag: HdrHistogram
    inflight: int
    finished: bool
    capped: int = 0
    stragglers: int = 0

    @classmethod
    def of(cls, windows: list[WorkerWindow], last: float, now: float) -> tuple[_Tick, float]:
        """The tick since `last` and where it ends: `now`, or once every process has run out, when the
        last one did, so a finite load is measured up to its end and not up to the tick that notices it."""
        classes: dict[str, ClassStats] = {}
        lag = new_histogram()
        for w in windows:
            for key, cw in w.classes.items():
                classes.setdefault(key, ClassStats()).add_window(cw)
            lag.decode_and_add(w.loop_lag)
        ended = [w.finished_ns for w in windows if w.finished_ns is not None]
        finished = len(ended) == len(windows)
        end = max(last, max(ended) / 1e9) if finished else now
        tick = cls(end - last, classes, lag, sum(w.inflight for w in windows), finished,
                   sum(w.capped for w in windows), sum(w.stragglers for w in windows))
        return tick, end


@dataclass
class _Window:
    ticks: list[_Tick] = field(default_factory=list)
    server: dict[str, ServerCounters] | None = None

    @property
    def duration_s(self) -> float:
        return sum(t.duration_s for t in self.ticks)

    def classes(self) -> dict[str, ClassStats]:
        return merge([t.classes for t in self.ticks])

    def key_figures(self) -> tuple[float, float | None]:
        total = overall(self.classes())
        return (total.ok / self.duration_s if self.duration_s else 0.0), total.mean_latency_ms


def stable(windows: list[_Window], pct: float) -> bool:
    """The last three windows agree: each figure within `pct` percent of their mean."""
    if len(windows) < 3:
        return False
    figures = [w.key_figures() for w in windows[-3:]]
    for series in zip(*figures, strict=True):
        if any(v is None for v in series):
            return False
        mean = sum(series) / 3
        if mean == 0 or any(abs(v - mean) > mean * pct / 100 for v in series):
            return False
    return True


class Coordinator:
    """Runs points one after another against one pool of load processes."""

    def __init__(self, pool: WorkerPool, view: ServerView, models: list[str], timing: Timing,
                 scraper: MetricsScraper | None, progress: Callable[[dict[str, Any]], None]) -> None:
        self._pool = pool
        self._view = view
        self._models = models
        self._timing = timing
        self._scraper = scraper
        self._progress = progress
        self._t0 = time.perf_counter()
        self.timeseries: list[dict[str, Any]] = []

    async def run_point(self, point: Point) -> dict[str, Any]:
        all_ticks: list[_Tick] = []
        windows: list[_Window] = []
        await self._pool.start(point.load)
        started = last = time.perf_counter()
        try:
            last = await self._warm_up(point, all_ticks, last)
            is_stable, last = await self._measure(point, all_ticks, windows, last)
        finally:
            final, _ = _Tick.of(await self._pool.stop(self._timing.drain_timeout_s), last, time.perf_counter())
        all_ticks.append(final)
        if point.finite:
            windows[-1].ticks.append(final)
            windows[-1].server = await self._server_delta(windows[-1].server)
        measured = windows if point.finite or self._timing.duration_s else windows[-3:]
        judged = not (point.finite or self._timing.duration_s)
        return self._report(point, all_ticks, measured, is_stable if judged else None,
                            len(windows), time.perf_counter() - started)

    async def _warm_up(self, point: Point, ticks: list[_Tick], last: float) -> float:
        end = last + (0 if point.finite else self._timing.warmup_s)
        while time.perf_counter() < end:
            tick, last = await self._tick(point, last)
            ticks.append(tick)
        return last

    async def _measure(self, point: Point, ticks: list[_Tick], windows: list[_Window],
                       last: float) -> tuple[bool, float]:
        """Whether the windows came out stable, and where the last tick ended."""
        timing = self._timing
        span = timing.duration_s or timing.window_s
        while True:
            window = _Window(server=await self._view.statistics(self._models))
            windows.append(window)
            window_end = time.perf_counter() + (1e9 if point.finite else span)
            while time.perf_counter() < window_end - timing.tick_s / 10:
                tick, last = await self._tick(point, last)
                ticks.append(tick)
                window.ticks.append(tick)
                if tick.finished:
                    return True, last
            window.server = await self._server_delta(window.server)
            if timing.duration_s or stable(windows, timing.stability_pct):
                return True, last
            if len(windows) >= timing.max_windows:
                return False, last

    async def _tick(self, point: Point, last: float) -> tuple[_Tick, float]:
        await asyncio.sleep(max(0.0, last + self._timing.tick_s - time.perf_counter()))
        tick, end = _Tick.of(await self._pool.window(), last, time.perf_counter())
        sample = await self._scraper.sample() if self._scraper else None
        entry = _tick_entry(point.label, end - self._t0, tick, sample)
        self.timeseries.append(entry)
        self._progress(entry)
        return tick, end

    async def _server_delta(self, before: dict[str, ServerCounters] | None) -> dict[str, ServerCounters] | None:
        after = await self._view.statistics(self._models)
        if before is None or after is None:
            return None
        return {m: after[m] - before[m] for m in after if m in before}

    def _report(self, point: Point, ticks: list[_Tick], measured: list[_Window], is_stable: bool | None,
                n_windows: int, elapsed_s: float) -> dict[str, Any]:
        duration = sum(w.duration_s for w in measured)
        classes = merge([w.classes() for w in measured])
        totals = overall(merge([t.classes for t in ticks]))
        return {
            "label": point.label,
            "stable": is_stable,
            "windows": n_windows,
            "elapsed_s": elapsed_s,
            "measurement": {
                "duration_s": duration,
                "all": overall(classes).summary(duration),
                "classes": {k: s.summary(duration) for k, s in sorted(classes.items())},
            },
            "totals": {
                "sent": totals.sent,
                "completed": totals.completed,
                "ok": totals.ok,
                "errors": totals.errors,
                "error_details": dict(sorted(totals.details.items())),
                "stragglers": sum(t.stragglers for t in ticks),
            },
            "server": _server_summary(measured),
            "client": self._client_health(overall(classes), [t for w in measured for t in w.ticks]),
        }

    def _client_health(self, total: ClassStats, ticks: list[_Tick]) -> dict[str, Any]:
        """Could this client keep its own schedule? Late sends or a late event loop say it could not."""
        loop_lag = new_histogram()
        for t in ticks:
            loop_lag.add(t.loop_lag)
        send = latency_summary(total.send_lag)["p99"]
        loop = latency_summary(loop_lag)["p99"]
        capped = sum(t.capped for t in ticks)
        threshold = self._timing.lag_threshold_ms
        reasons = [f"{name} lag p99 {v:.2f} ms > {threshold:g} ms"
                   for name, v in (("send", send), ("event-loop", loop)) if v is not None and v > threshold]
        if capped:
            reasons.append(f"{capped} sends waited for the in-flight cap (--max-inflight)")
        return {"send_lag_p99_ms": send, "loop_lag_p99_ms": loop, "capped_sends": capped,
                "bottleneck": bool(reasons), "reasons": reasons}


def _server_summary(measured: list[_Window]) -> dict[str, Any] | None:
    if not measured or any(w.server is None for w in measured):
        return None
    total: dict[str, ServerCounters] = {}
    for w in measured:
        assert w.server is not None
        for model, counters in w.server.items():
            total[model] = total.get(model, ServerCounters()) + counters
    return {m: c.summary() for m, c in sorted(total.items())}


def _tick_entry(label: str, t_s: float, tick: _Tick, sample: dict[str, Any] | None) -> dict[str, Any]:
    total = overall(tick.classes)
    lat = latency_summary(total.latency)
    entry: dict[str, Any] = {
        "t_s": round(t_s, 3),
        "point": label,
        "sent": total.sent,
        "ok": total.ok,
        "errors": total.completed - total.ok,
        "offered_rps": total.sent / tick.duration_s if tick.duration_s > 0 else 0.0,
        "throughput_rps": total.ok / tick.duration_s if tick.duration_s > 0 else 0.0,
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "slo_met": total.slo_met,  # answered OK within the SLO (with --slo-ms), of...
        "slo_judged": total.slo_judged,  # ...every request answered in this tick
        "inflight": tick.inflight,
        "send_lag_p99_ms": latency_summary(total.send_lag)["p99"],
        "loop_lag_p99_ms": latency_summary(tick.loop_lag)["p99"],
    }
    if sample:
        entry.update(sample)
    return entry
