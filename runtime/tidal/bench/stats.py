"""Per-class outcome counters and HDR latency histograms, and their summaries.

Load processes record into `ClassRecorder`s and ship `ClassWindow`s (counts
plus base64 HDR encodings, so they pickle cheaply) to the coordinator, which
adds them up into `ClassStats` per window, per measurement and per run.
Latencies are kept in microseconds over 1 us .. 10 min at 3 significant
digits, which is the precision perf tools conventionally report.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

_LOWEST_US = 1
_HIGHEST_US = 600_000_000
_DIGITS = 3
OK = "OK"
PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)


def _us(ns: int) -> int:
    return min(max(ns // 1000, _LOWEST_US), _HIGHEST_US)


class ClassRecorder:
    """Outcomes of one traffic class since the last window; lives in one load process, one thread."""

    def __init__(self) -> None:
        self.sent = 0
        self.outcomes: Counter[str] = Counter()
        self.details: dict[str, str] = {}  # the first message seen per error code
        self.slo_met = 0
        self.slo_judged = 0
        self.latency_sum_us = 0
        self.latency = new_histogram()
        self.service = new_histogram()
        self.send_lag = new_histogram()

    def record(self, code: str, latency_ns: int, service_ns: int, lag_ns: int, slo_ns: int | None,
               details: str = "") -> None:
        """`latency` counts from the intended send, `service` from the actual send."""
        self.outcomes[code] += 1
        if code != OK:
            self.details.setdefault(code, details)
        self.send_lag.record_value(_us(lag_ns))
        if code == OK:
            self.latency_sum_us += _us(latency_ns)
            self.latency.record_value(_us(latency_ns))
            self.service.record_value(_us(service_ns))
        if slo_ns is not None:
            self.slo_judged += 1
            self.slo_met += code == OK and latency_ns <= slo_ns

    def window(self) -> ClassWindow:
        return ClassWindow(
            sent=self.sent,
            outcomes=dict(self.outcomes),
            details=self.details,
            slo_met=self.slo_met,
            slo_judged=self.slo_judged,
            latency_sum_us=self.latency_sum_us,
            latency=self.latency.encode(),
            service=self.service.encode(),
            send_lag=self.send_lag.encode(),
        )


@dataclass(frozen=True, slots=True)
class ClassWindow:
    """What one load process saw of one class during one tick; picklable."""

    sent: int
    outcomes: dict[str, int]
    details: dict[str, str]
    slo_met: int
    slo_judged: int
    latency_sum_us: int
    latency: bytes
    service: bytes
    send_lag: bytes


@dataclass
class ClassStats:
    """A sum of windows: the unit every table row and JSON entry is made from."""

    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    details: dict[str, str] = field(default_factory=dict)
    slo_met: int = 0
    slo_judged: int = 0
    latency_sum_us: int = 0
    latency: HdrHistogram = field(default_factory=new_histogram)
    service: HdrHistogram = field(default_factory=new_histogram)
    send_lag: HdrHistogram = field(default_factory=new_histogram)

    def add_window(self, w: ClassWindow) -> None:
        self.sent += w.sent
        self.outcomes.update(w.outcomes)
        self.details = w.details | self.details
        self.slo_met += w.slo_met
        self.slo_judged += w.slo_judged
        self.latency_sum_us += w.latency_sum_us
        self.latency.decode_and_add(w.latency)
        self.service.decode_and_add(w.service)
        self.send_lag.decode_and_add(w.send_lag)

    def add(self, other: ClassStats) -> None:
        self.sent += other.sent
        self.outcomes.update(other.outcomes)
        self.details = other.details | self.details
        self.slo_met += other.slo_met
        self.slo_judged += other.slo_judged
        self.latency_sum_us += other.latency_sum_us
        self.latency.add(other.latency)
        self.service.add(other.service)
        self.send_lag.add(other.send_lag)

    @property
    def mean_latency_ms(self) -> float | None:
        """Exact, from the running sum; the histogram's own mean walks every bucket in Python."""
        n = self.latency.get_total_count()
        return self.latency_sum_us / n / 1000.0 if n else None

    @property
    def ok(self) -> int:
        return self.outcomes.get(OK, 0)

    @property
    def completed(self) -> int:
        return sum(self.outcomes.values())

    @property
    def errors(self) -> dict[str, int]:
        return {code: n for code, n in sorted(self.outcomes.items()) if code != OK}

    def summary(self, duration_s: float) -> dict[str, Any]:
        """Rates over `duration_s`; latencies in ms; None where nothing was measured."""
        rate = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
        out: dict[str, Any] = {
            "sent": self.sent,
            "completed": self.completed,
            "ok": self.ok,
            "errors": self.errors,
            "error_details": dict(sorted(self.details.items())),
            "throughput_rps": rate(self.ok),
            "latency_ms": {"mean": self.mean_latency_ms, **latency_summary(self.latency)},
            "service_latency_ms": latency_summary(self.service),
            "send_lag_ms": latency_summary(self.send_lag),
            "slo_attainment": self.slo_met / self.slo_judged if self.slo_judged else None,
            "goodput_rps": rate(self.slo_met) if self.slo_judged else None,
        }
        return out


def latency_summary(hist: HdrHistogram) -> dict[str, float | None]:
    """Percentiles and max in milliseconds (one pass over the buckets); all None for an empty histogram."""
    keys = [*(f"p{p:g}" for p in PERCENTILES), "max"]
    if hist.get_total_count() == 0:
        return dict.fromkeys(keys)
    by_pct = hist.get_percentile_to_value_dict(list(PERCENTILES))
    values = [*(by_pct[p] for p in PERCENTILES), hist.get_max_value()]
    return {k: v / 1000.0 for k, v in zip(keys, values, strict=True)}


def merge(stats: list[dict[str, ClassStats]]) -> dict[str, ClassStats]:
    """Adds per-class stats key by key (a new object; the inputs are left alone)."""
    total: dict[str, ClassStats] = {}
    for per_class in stats:
        for key, s in per_class.items():
            total.setdefault(key, ClassStats()).add(s)
    return total


def overall(per_class: dict[str, ClassStats]) -> ClassStats:
    total = ClassStats()
    for s in per_class.values():
        total.add(s)
    return total
