"""Triton's own perf_analyzer drives tidal unmodified (no -x, no extra flags)."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def perf_analyzer() -> str:
    """The binary that perf/install-perf-analyzer.sh installs (CI runs it before the tests)."""
    path = os.environ.get("PERF_ANALYZER") or str(ROOT / ".venv-perf-analyzer" / "bin" / "perf_analyzer_env")
    if not Path(path).exists() and not shutil.which(path):
        if os.environ.get("CI"):
            pytest.fail(f"perf_analyzer is missing at {path}: .ci/run must install it")
        pytest.skip("perf_analyzer not installed: run perf/install-perf-analyzer.sh")
    return path


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_concurrency_4(server, tmp_path: Path, protocol: str) -> None:
    report = tmp_path / "pa.csv"
    # A fixed request count instead of stability windows: this checks compatibility, not speed, and
    # must not fail on a busy 2-core machine.
    url = server.url if protocol == "grpc" else server.http_url
    cmd = [
        perf_analyzer(), "-m", "simple", "-u", url, "-i", protocol,
        "--concurrency-range", "4", "--request-count", "3000", "-f", str(report),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(report.open()))
    assert rows, proc.stdout
    assert float(rows[0]["Inferences/Second"]) > 0
    # perf_analyzer read server-side queue and compute times from ModelStatistics.
    assert "Server:" in proc.stdout and "queue" in proc.stdout, proc.stdout
    assert "error" not in proc.stdout.lower(), proc.stdout
