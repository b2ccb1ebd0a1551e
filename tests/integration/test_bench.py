"""`tidal bench` against a live tidal server: every load shape, files checked, counts that add up."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tidal.bench.output import SUMMARY_COLUMNS, TIMESERIES_COLUMNS

FAST = ["--window-s", "0.5", "--max-windows", "4", "--warmup-s", "0.2", "--no-progress"]


def run_bench(out: Path, *args: str, timeout: float = 120) -> tuple[dict[str, Any], str]:
    """Runs `tidal bench` as a user would; returns the JSON result and the terminal output."""
    cmd = [sys.executable, "-m", "tidal", "bench", *args, "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.with_name(out.name + ".json").read_text()), proc.stdout


def check_result(result: dict[str, Any], out: Path, points: int, classes: int) -> None:
    """The three files agree with each other, and every request sent has exactly one outcome."""
    assert result["tool"] == "tidal bench" and result["format"] == 1
    assert len(result["points"]) == points and len(result["classes"]) == classes
    for point in result["points"]:
        totals = point["totals"]
        assert totals["sent"] > 0
        assert totals["sent"] == totals["completed"] == totals["ok"] + sum(totals["errors"].values())
        assert set(totals["error_details"]) == set(totals["errors"])
        m = point["measurement"]
        assert m["duration_s"] > 0 and set(m["classes"]) == {c["key"] for c in result["classes"]}
        assert m["all"]["ok"] == sum(c["ok"] for c in m["classes"].values())
        assert m["all"]["ok"] <= totals["ok"]
        assert set(point["client"]) == {"send_lag_p99_ms", "loop_lag_p99_ms", "capped_sends", "bottleneck", "reasons"}
    rows = list(csv.DictReader(out.with_name(out.name + ".csv").open()))
    assert list(rows[0]) == SUMMARY_COLUMNS
    assert len(rows) == points * (1 + (classes if classes > 1 else 0))
    series = list(csv.DictReader(out.with_name(out.name + "-timeseries.csv").open()))
    assert list(series[0]) == TIMESERIES_COLUMNS
    assert len(series) == len(result["timeseries"]) > 0
    ticks_ok = sum(e["ok"] for e in result["timeseries"])
    assert ticks_ok <= sum(p["totals"]["ok"] for p in result["points"])


def metrics_args(server) -> list[str]:
    """The server's Prometheus endpoint, as it announced it."""
    for line in server.lines:
        match = re.search(r"serving metrics on (\S+)", line)
        if match:
            return ["--metrics-url", match[1]]
    return []


def test_closed_loop_sweep(server, tmp_path: Path) -> None:
    out = tmp_path / "closed"
    result, stdout = run_bench(out, "-u", server.url, "-m", "simple", "--concurrency", "1:4:x4", "--slo-ms", "500",
                               *metrics_args(server), *FAST)
    check_result(result, out, points=2, classes=1)
    assert [p["label"] for p in result["points"]] == ["concurrency=1", "concurrency=4"]
    assert result["server"]["name"] == "tidal" and result["mode"] == "closed"
    for point in result["points"]:
        assert 1 <= point["windows"] <= 4 and point["stable"] in (True, False)
        server_view = point["server"]["simple"]
        assert server_view["requests"] > 0 and server_view["avg_compute_us"] > 0
        assert point["measurement"]["all"]["slo_attainment"] is not None
    assert "concurrency=4" in stdout and "p99.9" in stdout
    if metrics_args(server):
        assert any(e.get("batch_size_mean") for e in result["timeseries"])
        assert result["metrics"]["samples"] > 0


def test_open_loop_rate_sweep(server, tmp_path: Path) -> None:
    out = tmp_path / "open"
    result, stdout = run_bench(out, "-u", server.url, "-m", "simple", "--rate", "100,200", "--arrival", "poisson",
                               *FAST)
    check_result(result, out, points=2, classes=1)
    for point, rate in zip(result["points"], (100, 200), strict=True):
        assert point["measurement"]["all"]["throughput_rps"] == pytest.approx(rate, rel=0.5)
        assert point["measurement"]["all"]["send_lag_ms"]["p50"] is not None
    assert "from the scheduled send time" in stdout


def test_step_and_ramp_profile(server, tmp_path: Path) -> None:
    out = tmp_path / "profile"
    result, _ = run_bench(out, "-u", server.url, "-m", "simple", "--profile", "1s@50rps,1s@50-150rps",
                          "--arrival", "constant", "--no-progress")
    check_result(result, out, points=1, classes=1)
    point = result["points"][0]
    assert point["stable"] is None
    # Constant arrivals: exactly 50 + 100 requests, each with one outcome.
    assert point["totals"]["sent"] == 150


def test_trace_replay_with_deadlines(server, tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    lines = ["send_s,model,priority,batch_size,deadline_ms"]
    lines += [f"{i / 50:.3f},simple,1,{1 + i % 2},{'' if i % 3 else 1000}" for i in range(60)]
    lines += [f"{i / 50:.3f},scale,0,1," for i in range(0, 60, 4)]
    trace.write_text("\n".join(lines) + "\n")
    out = tmp_path / "trace"
    result, _ = run_bench(out, "-u", server.url, "--trace", str(trace), "--slo-ms", "500", "--no-progress")
    check_result(result, out, points=1, classes=3)
    assert result["points"][0]["totals"]["sent"] == 75
    assert {c["key"] for c in result["classes"]} == {"simple/p1/b1", "simple/p1/b2", "scale/p0/b1"}
    assert set(result["points"][0]["server"]) == {"simple", "scale"}


def test_mixed_models_and_batch_sizes_with_two_load_processes(server, tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    result, stdout = run_bench(out, "-u", server.url, "-m", "simple:weight=3", "-m", "simple:batch=4,slo_ms=800",
                               "-m", "scale:batch=2", "--rate", "150", "--duration-s", "1.5", "--workers", "2",
                               *FAST)
    check_result(result, out, points=1, classes=3)
    classes = result["points"][0]["measurement"]["classes"]
    assert classes["simple/p0/b1"]["ok"] > classes["scale/p0/b2"]["ok"] > 0
    assert classes["simple/p0/b4"]["slo_attainment"] is not None and classes["simple/p0/b1"]["slo_attainment"] is None
    assert result["workers"] == 2 and "simple/p0/b4" in stdout
