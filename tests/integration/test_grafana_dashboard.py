"""deploy/grafana/tidal-dashboard.json queries only metrics a live tidal exposes (Triton's names and tidal's)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as tc

from live_server import ServerProcess, start_server
from tidal.demo import ensure_demo_repository

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "tidal-dashboard.json"
# PromQL's own words and functions, which are not metric names.
PROMQL = {"sum", "by", "rate", "increase", "histogram_quantile", "max", "le", "model", "reason", "priority"}


def _exposed(server: ServerProcess) -> set[str]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_query_names_an_exposed_metric() -> None:
    """On the demo (its models have SLOs and the controller on), after one request: every family exists."""
    server = start_server(ensure_demo_repository(progress=False))
    try:
        inputs = [tc.InferInput(f"INPUT{i}", [1, 16], "FP32") for i in (0, 1)]
        for tensor in inputs:
            tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
        tc.InferenceServerClient(server.url).infer("add_sub", inputs)
        exposed = _exposed(server)
    finally:
        assert server.stop() == 0
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    named = {word for e in exprs for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", re.sub(r"\[[^]]*\]", "", e))}
    metrics = {w for w in named if w.startswith(("nv_", "tidal_"))}
    assert named - metrics <= PROMQL, named - metrics - PROMQL
    assert metrics <= exposed, sorted(metrics - exposed)
    assert {"nv_inference_request_success", "tidal_saturation", "tidal_slo_attainment"} <= metrics
