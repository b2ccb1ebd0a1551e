"""One `tidal bench` run from a config to a result document.

Asks the server for model metadata, builds every request body once, starts
the load processes and the metrics scraper, runs the points in order and
assembles the JSON-ready result (the format the output and plot modules read).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tidal.bench.client import ModelInfo, ServerView, Target
from tidal.bench.inputs import InputSource, build_request
from tidal.bench.load import TraceLoad, TraceRequest
from tidal.bench.metrics import MetricsScraper
from tidal.bench.runner import Coordinator, Point, Timing
from tidal.bench.spec import TraceRow, TrafficClass
from tidal.bench.workers import WorkerPool, WorkerSetup

RESULT_FORMAT = 1
TIDAL_GRPC_PORT = 8001
TIDAL_METRICS_PORT = 8002


@dataclass
class BenchConfig:
    target: Target
    classes: list[TrafficClass]
    points: list[Point]
    mode: str
    timing: Timing = field(default_factory=Timing)
    input_data: str = "random"
    shapes: dict[str, list[int]] = field(default_factory=dict)
    workers: int = 1
    request_timeout_s: float = 60.0
    max_inflight: int = 4096
    metrics_url: str | None = None
    seed: int = 0


def trace_plan(rows: list[TraceRow], slo_ms: float | None) -> tuple[list[TrafficClass], TraceLoad]:
    """Classes are the trace's distinct (model, priority, batch size); requests point at them."""
    index: dict[tuple[str, int, int], int] = {}
    for r in rows:
        index.setdefault((r.model, r.priority, r.batch_size), len(index))
    classes = [TrafficClass(m, p, b, slo_ms=slo_ms) for (m, p, b) in index]
    requests = tuple(
        TraceRequest(r.send_s, index[r.model, r.priority, r.batch_size], round((r.deadline_ms or 0) * 1000))
        for r in rows
    )
    return classes, TraceLoad(requests)


def _payload_keys(cfg: BenchConfig) -> set[tuple[int, int]]:
    keys = {(i, 0) for i in range(len(cfg.classes))}
    for point in cfg.points:
        if isinstance(point.load, TraceLoad):
            keys.update((r.class_index, r.deadline_us) for r in point.load.requests)
    return keys


async def _payloads(cfg: BenchConfig, view: ServerView) -> dict[tuple[int, int], bytes]:
    infos: dict[str, ModelInfo] = {}
    for cls in cfg.classes:
        if cls.model not in infos:
            infos[cls.model] = await view.model(cls.model)
    source = InputSource(cfg.input_data, cfg.seed)
    bodies: dict[tuple[int, int], bytes] = {}
    for i, deadline_us in sorted(_payload_keys(cfg)):
        cls = cfg.classes[i]
        bodies[i, deadline_us] = build_request(infos[cls.model], cls, source, cfg.shapes, deadline_us or None)
    return bodies


def metrics_url(target: str, server_name: str | None, given: str | None) -> tuple[str | None, str | None]:
    """Where to read tidal's server-side series, else why not.

    Only tidal's default pair (gRPC 8001, /metrics 8002) says where /metrics is: beside any other gRPC
    port, 8002 may well be another server's, whose figures would pass for this one's.
    """
    if given or server_name != "tidal":
        return given, None
    # Beside a Unix socket tidal serves /metrics on loopback TCP.
    if target.startswith("unix:"):
        return f"http://127.0.0.1:{TIDAL_METRICS_PORT}/metrics", None
    address = urlsplit(f"//{target}")
    if address.port != TIDAL_GRPC_PORT:
        return None, (f"{target} is not on tidal's default gRPC port {TIDAL_GRPC_PORT}, so its /metrics port is "
                      "unknown; pass --metrics-url for batch size, queue depth, active variant and saturation")
    host = address.netloc.removesuffix(f":{TIDAL_GRPC_PORT}") or "127.0.0.1"
    return f"http://{host}:{TIDAL_METRICS_PORT}/metrics", None


async def run_bench(cfg: BenchConfig, progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Runs every point of `cfg`; `progress` sees each tick's time-series entry as it happens."""
    started = dt.datetime.now(dt.UTC)
    channel = cfg.target.channel()
    try:
        view = ServerView(channel)
        server = await view.server_metadata()
        setup = WorkerSetup(cfg.target, cfg.classes, await _payloads(cfg, view), cfg.request_timeout_s,
                            cfg.max_inflight, cfg.seed)
        url, unread = metrics_url(cfg.target.url, server.get("name"), cfg.metrics_url)
        models = sorted({c.model for c in cfg.classes})
        scraper = MetricsScraper(url, models) if url else None
        pool = WorkerPool(setup, cfg.workers)
        coordinator = Coordinator(pool, view, models, cfg.timing, scraper, progress)
        try:
            await pool.open()
            points = [await coordinator.run_point(p) for p in cfg.points]
        finally:
            await pool.close()
    finally:
        await channel.close()
    return {
        "tool": "tidal bench",
        "format": RESULT_FORMAT,
        "started_at": started.isoformat(timespec="seconds"),
        "target": cfg.target.url,
        "server": server,
        "mode": cfg.mode,
        "workers": cfg.workers,
        "timing": dataclasses.asdict(cfg.timing),
        "classes": [dataclasses.asdict(c) | {"key": c.key} for c in cfg.classes],
        "metrics": ({"url": url, "samples": scraper.samples, "error": scraper.error} if scraper
                    else {"url": None, "samples": 0, "error": unread} if unread else None),
        "points": points,
        "timeseries": coordinator.timeseries,
    }
