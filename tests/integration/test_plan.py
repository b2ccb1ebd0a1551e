"""`tidal plan`'s capacity for one replica against a `tidal bench` run of the same model on this host."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from live_server import start_server
from tidal.demo import ensure_demo_repository
from tidal.plan_cli import measure_capacity_rps, measure_path_rps

ROUNDS = 2  # path and model measured in turn, so a change in the host's other load hits both alike


@pytest.mark.slow
def test_planned_replica_capacity_is_within_20_percent_of_a_measured_one() -> None:
    repository = ensure_demo_repository(progress=False)
    paths, measured = [], []
    for _ in range(ROUNDS):
        paths.append(measure_path_rps())
        server = start_server(repository, "--load-model", "digits", "--no-metrics")
        try:
            measured.append(measure_capacity_rps(server.url, "digits"))
        finally:
            assert server.stop() == 0
    plan = subprocess.run(
        [sys.executable, "-m", "tidal", "plan", "--model", "digits", "--model-repository", str(repository),
         "--rate", "20000", "--slo-ms", "50", "--min-accuracy", "0.97", "--cost-per-core-hour", "0.05",
         "--path-rps", str(statistics.median(paths)), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert plan.returncode == 0, plan.stderr
    best = json.loads(plan.stdout)["sized"][0]
    assert best["meets_slo"] and best["replicas"] >= 1 and best["cost_per_million"] > 0
    predicted, observed = best["capacity_rps"], statistics.median(measured)
    assert abs(predicted - observed) <= 0.2 * observed, (predicted, measured, paths)
