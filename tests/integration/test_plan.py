"""`tidal plan`'s capacity for one replica against a `tidal bench` run of the same model on this host."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tidal.demo import ensure_demo_repository
from tidal.plan_cli import measure_capacity_rps, no_work_repository, serving

# Single rounds on a shared 2-core host vary widely (perf/bench_fleet.py: +8..-45%); the median of five is what
# the 20% bound is held to.
ROUNDS = 5


def plan_capacity_rps(repository: Path, path_rps: float) -> float:
    plan = subprocess.run(
        [sys.executable, "-m", "tidal", "plan", "--model", "digits", "--model-repository", str(repository),
         "--rate", "20000", "--slo-ms", "50", "--min-accuracy", "0.97", "--cost-per-core-hour", "0.05",
         "--path-rps", str(path_rps), "--cores-per-replica", "1", "--json"],  # the client has the other core
        capture_output=True, text=True, timeout=120,
    )
    assert plan.returncode == 0, plan.stderr
    best = json.loads(plan.stdout)["sized"][0]
    assert best["meets_slo"] and best["replicas"] >= 1 and best["cost_per_million"] > 0
    return best["capacity_rps"]


@pytest.mark.slow
def test_planned_replica_capacity_is_within_20_percent_of_a_measured_one() -> None:
    repository = ensure_demo_repository(progress=False)
    ratios = []
    # Both servers up, measured in turn: the host's other load reaches the calibration and the run alike.
    with tempfile.TemporaryDirectory() as tmp, serving(no_work_repository(Path(tmp))) as path_url, \
            serving(repository, "--load-model", "digits") as digits_url:
        for _ in range(ROUNDS):
            predicted = plan_capacity_rps(repository, measure_capacity_rps(path_url, "path"))
            ratios.append(predicted / measure_capacity_rps(digits_url, "digits"))
    assert abs(statistics.median(ratios) - 1) <= 0.2, ratios
