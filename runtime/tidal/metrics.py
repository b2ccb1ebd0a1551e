"""Prometheus metrics: Triton-compatible `nv_*` counters plus tidal's own `tidal_*`.

Counters that ModelStatistics also reports are not kept twice: a collector
reads the schedulers' statistics at scrape time, so `/metrics` and the RPC
agree by construction and the request path pays nothing for them. Only what
needs a per-request observation (end-to-end latency, SLO attainment) is
recorded as it happens, on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from tidal.types import EdgeObservation

log = logging.getLogger(__name__)
disable_created_metrics()  # Triton exports no `_created` series: one sample per counter, as dashboards expect

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
GOODPUT_WINDOW_S = 10.0


@dataclass(frozen=True)
class ModelSnapshot:
    """One served version, read on the event loop for a scrape."""

    model: str
    version: str
    stats: object  # tidal.scheduling.stats.ModelStats
    pending: int
    queue_depth: dict[int, int]
    knobs: object  # tidal.scheduling.knobs.Knobs
    variants: tuple[str, ...]
    instances: int
    slo_p99_ms: float
    edge: EdgeObservation | None = None  # the transport's view of the model (by name, shared by its versions)
    received_rps: float = 0.0  # inference RPCs reaching the server per second, admitted or not


class _TritonCounter(Metric):
    """A counter under exactly Triton's name: prometheus_client appends `_total` to every counter it exposes,
    and dashboards built for Triton query `nv_inference_count`, not `nv_inference_count_total`. Exposed as
    untyped, the one type whose samples keep their name; `rate()` and `increase()` work on it all the same."""

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        super().__init__(name, documentation, "unknown")
        self._label_names = labels

    def add_metric(self, values: list[str], value: float) -> None:
        self.add_sample(self.name, dict(zip(self._label_names, values, strict=True)), value)


class _SnapshotCollector(Collector):
    """Builds the scrape from snapshots taken on the event loop (the HTTP thread never touches live state)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        snaps = self._metrics.snapshots()
        labels = ["model", "version"]

        def family(kind, name: str, doc: str, extra: tuple[str, ...] = ()):
            return kind(name, doc, labels=[*labels, *extra])

        success = family(_TritonCounter, "nv_inference_request_success", "Successful inference requests")
        failure = family(_TritonCounter, "nv_inference_request_failure", "Failed inference requests", ("reason",))
        count = family(_TritonCounter, "nv_inference_count", "Inferences performed (batch rows)")
        execs = family(_TritonCounter, "nv_inference_exec_count", "Model executions (batches)")
        pending = family(GaugeMetricFamily, "nv_inference_pending_request_count", "Requests queued or running")
        durations = {
            key: family(_TritonCounter, f"nv_inference_{key}_duration_us", f"Cumulative {key} duration (us)")
            for key in ("request", "queue", "compute_input", "compute_infer", "compute_output")
        }
        batch = family(HistogramMetricFamily, "tidal_batch_size", "Rows per executed batch")
        depth = family(GaugeMetricFamily, "tidal_queue_depth", "Requests waiting, per priority level", ("priority",))
        busy = family(CounterMetricFamily, "tidal_backend_busy_seconds", "Time backend instances spent executing")
        instances = family(
            GaugeMetricFamily, "tidal_backend_instances", "Backend instances loaded for the active variant"
        )
        variant = family(GaugeMetricFamily, "tidal_active_variant", "1 for the variant serving now", ("variant",))
        knob = family(GaugeMetricFamily, "tidal_knob", "Current scheduler knob values", ("knob",))
        target = family(GaugeMetricFamily, "tidal_slo_target_ms", "p99 latency target (0: none)")
        for s in snaps:
            lv = [s.model, s.version]
            st = s.stats
            success.add_metric(lv, st.success.count)
            for reason, n in st.failures_by_reason.items():
                failure.add_metric([*lv, reason], n)
            count.add_metric(lv, st.inference_count)
            execs.add_metric(lv, st.execution_count)
            pending.add_metric(lv, s.pending)
            durations["request"].add_metric(lv, (st.success.ns + st.fail.ns) / 1e3)
            for key in ("queue", "compute_input", "compute_infer", "compute_output"):
                durations[key].add_metric(lv, getattr(st, key).ns / 1e3)
            buckets, running, total_rows, busy_ns = [], 0, 0, 0
            for size in sorted(st.batch_stats):
                c_in, c_inf, c_out = st.batch_stats[size]
                running += c_inf.count
                total_rows += size * c_inf.count
                busy_ns += c_in.ns + c_inf.ns + c_out.ns
                buckets.append((str(size), running))
            buckets.append(("+Inf", running))
            batch.add_metric(lv, buckets, total_rows)
            for level, n in sorted(s.queue_depth.items()):
                depth.add_metric([*lv, str(level)], n)
            busy.add_metric(lv, busy_ns / 1e9)
            instances.add_metric(lv, s.instances)
            for name in s.variants:
                variant.add_metric([*lv, name], 1.0 if name == s.knobs.active_variant else 0.0)
            for name in ("max_batch_size", "max_queue_delay_us", "instance_count"):
                knob.add_metric([*lv, name], getattr(s.knobs, name))
            target.add_metric(lv, s.slo_p99_ms)
        yield from (success, failure, count, execs, pending, *durations.values())
        yield from (batch, depth, busy, instances, variant, knob, target)
        yield from self._metrics.slo_gauges(snaps)
        yield from self._metrics.edge_gauges(snaps)


class ServerMetrics:
    """The registry of one server process and the per-request metrics fed from the transport."""

    def __init__(self, snapshot: Callable[[], list[ModelSnapshot]]) -> None:
        self.registry = CollectorRegistry()
        self._snapshot = snapshot
        self._loop: asyncio.AbstractEventLoop | None = None
        self.latency = Histogram(
            "tidal_request_duration_seconds",
            "End-to-end latency of successful requests, arrival to response",
            ["model", "version", "priority"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        # (model, version) -> [judged, met]; read by the collector at scrape time.
        self._slo: dict[tuple[str, str], list[int]] = {}
        # (model, version) -> the p99 target in force (SetSlo changes it while serving)
        self._slo_target: dict[tuple[str, str], float] = {}
        self._latency_children: dict[tuple[str, str, int], Any] = {}
        self.load_failures = Counter(
            "tidal_model_load_failures", "Model loads that failed", ["model"], registry=self.registry
        )
        self._goodput: dict[tuple[str, str], deque[tuple[float, float]]] = {}
        self._saturation: dict[str, float] = {}  # model -> its gauge as of its last control period
        self.registry.register(_SnapshotCollector(self))
        mv = ["model", "version"]
        self.decisions = Counter(
            "tidal_controller_decisions", "SLO controller periods, by outcome", [*mv, "reason"], registry=self.registry
        )
        self.controller_p99 = Gauge(
            "tidal_controller_p99_ms",
            "p99 latency inside the server as the controller measured it and predicted it (0: none)",
            [*mv, "kind"],
            registry=self.registry,
        )
        self.arrival_rps = Gauge(
            "tidal_controller_arrival_rps", "Offered requests per second, shed included", mv, registry=self.registry
        )
        self.shedding = Gauge(
            "tidal_controller_shedding", "1 while admission limits refuse requests to hold the SLO", mv,
            registry=self.registry,
        )

    def controller_decision(
        self, model: str, version: str, reason: str, observed_ms: float | None, predicted_ms: float | None,
        arrival_rps: float, shedding: bool,
    ) -> None:
        """One control period's outcome (on the loop)."""
        self.decisions.labels(model, version, reason).inc()
        self.controller_p99.labels(model, version, "observed").set(observed_ms or 0.0)
        self.controller_p99.labels(model, version, "predicted").set(predicted_ms or 0.0)
        self.arrival_rps.labels(model, version).set(arrival_rps)
        self.shedding.labels(model, version).set(1.0 if shedding else 0.0)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def serve_http(self, address: str, port: int) -> int:
        """Start the /metrics endpoint on its own thread; returns the bound port."""
        try:
            server, _ = start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:  # named like the gRPC and HTTP ports' failures: which port, which flag
            flags = "--metrics-port, --no-metrics"
            raise OSError(f"cannot bind metrics to {address}:{port}: {exc.strerror} ({flags})") from None
        return server.server_port

    def snapshots(self) -> list[ModelSnapshot]:
        """Take the snapshot on the event loop, where the schedulers live."""
        if self._loop is None:
            return []
        future = asyncio.run_coroutine_threadsafe(_call(self._snapshot), self._loop)
        return future.result(timeout=10)

    def set_saturation(self, model: str, value: float) -> None:
        """The model's saturation gauge as of its last control period (on the loop)."""
        self._saturation[model] = value

    def edge_gauges(self, snaps: list[ModelSnapshot]) -> Iterable[Metric]:
        """What the transport sees, read at scrape time; one series per model name (versions share the edge)."""
        received = CounterMetricFamily(
            "tidal_edge_received", "Inference RPCs that reached the server, admitted or not", labels=["model"]
        )
        rps = GaugeMetricFamily(
            "tidal_edge_received_rps", "Inference RPCs reaching the server per second, last second", labels=["model"]
        )
        refused = CounterMetricFamily(
            "tidal_edge_refused", "Requests refused at the edge before decoding (RESOURCE_EXHAUSTED)",
            labels=["model", "priority"],
        )
        inflight = GaugeMetricFamily("tidal_edge_inflight", "Admitted requests not yet answered", labels=["model"])
        limit = GaugeMetricFamily(
            "tidal_edge_inflight_limit", "The edge's adaptive in-flight limit (0: admits all)", labels=["model"]
        )
        saturation = GaugeMetricFamily(
            "tidal_saturation",
            "Offered load over what a replica serves within the SLO, edge or backend, whichever binds; 1 = full, "
            "above 1 = that many replicas' worth. model=\"\" is the server's: the autoscaling signal",
            labels=["model"],
        )
        lag = GaugeMetricFamily("tidal_edge_loop_lag_seconds", "Event-loop lag, worst of the last second")
        busy = GaugeMetricFamily(
            "tidal_edge_loop_busy", "Share of the event loop's time spent running or waiting for a CPU, last second"
        )
        seen: dict[str, ModelSnapshot] = {s.model: s for s in snaps if s.edge is not None}
        for name, s in seen.items():
            edge = s.edge
            assert edge is not None
            received.add_metric([name], edge.received)
            rps.add_metric([name], s.received_rps)
            for level, n in sorted(edge.refused.items()):
                refused.add_metric([name, str(level)], n)
            inflight.add_metric([name], edge.inflight)
            limit.add_metric([name], edge.limit)
        for name in set(self._saturation) - {s.model for s in snaps}:
            del self._saturation[name]
        for name, value in sorted(self._saturation.items()):
            saturation.add_metric([name], value)
        server = max(self._saturation.values(), default=0.0)
        if seen:
            edge = next(iter(seen.values())).edge
            assert edge is not None
            lag.add_metric([], edge.lag_ms / 1e3)
            busy.add_metric([], edge.busy)
            server = max(server, edge.busy)
        saturation.add_metric([""], server)
        yield from (received, rps, refused, inflight, limit, saturation, lag, busy)

    def set_slo(self, model: str, version: str, slo_ms: float) -> None:
        """The SLO that requests are judged against from now on (on the loop)."""
        self._slo_target[model, version] = slo_ms

    def observe(
        self, model: str, version: str, priority: int, latency_s: float, configured_slo_ms: float, ok: bool
    ) -> None:
        """One finished request (on the loop): latency histogram and SLO bookkeeping.

        Judged against the SLO last passed to `set_slo`, or the configured one before that.
        """
        if ok:
            child = self._latency_children.get((model, version, priority))
            if child is None:
                child = self._latency_children[model, version, priority] = self.latency.labels(
                    model, version, str(priority)
                )
            child.observe(latency_s)
        slo_ms = self._slo_target.get((model, version), configured_slo_ms)
        if slo_ms > 0:
            counts = self._slo.setdefault((model, version), [0, 0])
            counts[0] += 1
            if ok and latency_s * 1e3 <= slo_ms:
                counts[1] += 1

    def slo_gauges(self, snaps: list[ModelSnapshot]) -> Iterable[Metric]:
        judged_f = CounterMetricFamily(
            "tidal_slo_requests", "Requests judged against the SLO", labels=["model", "version"]
        )
        met_f = CounterMetricFamily(
            "tidal_slo_met", "Requests answered successfully within the SLO", labels=["model", "version"]
        )
        attainment = GaugeMetricFamily(
            "tidal_slo_attainment", "Fraction of judged requests within the SLO", labels=["model", "version"]
        )
        goodput = GaugeMetricFamily(
            "tidal_goodput_rps",
            f"Requests within the SLO per second, last {GOODPUT_WINDOW_S:.0f}s",
            labels=["model", "version"],
        )
        now = time.monotonic()
        for s in snaps:
            if s.slo_p99_ms <= 0:
                continue
            judged, met = self._slo.get((s.model, s.version), (0, 0))
            judged_f.add_metric([s.model, s.version], judged)
            met_f.add_metric([s.model, s.version], met)
            attainment.add_metric([s.model, s.version], met / judged if judged else 1.0)
            history = self._goodput.setdefault((s.model, s.version), deque())
            history.append((now, met))
            while len(history) > 2 and now - history[1][0] >= GOODPUT_WINDOW_S:
                history.popleft()
            (t0, m0) = history[0]
            goodput.add_metric([s.model, s.version], (met - m0) / (now - t0) if now > t0 else 0.0)
        yield from (judged_f, met_f, attainment, goodput)


async def _call(fn: Callable[[], list[ModelSnapshot]]) -> list[ModelSnapshot]:
    return fn()
