"""tidal bench against a live tidal server: every load shape reports its rates over the time it measured,
and a profile or a trace is measured over its own length, not over the tick that notices its end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from live_server import ServerProcess
from tidal.cli import main as tidal_main

FAST = ["--window-s", "0.5", "--warmup-s", "0.2", "--slo-ms", "10000", "--no-progress"]
# Load shape -> its flags and the length its measurement should have, in seconds.
SHAPES = {
    "profile": (["--profile", "0.5s@100rps,0.5s@200rps", "--arrival", "constant"], 1.0),
    "trace": (["--trace"], 0.99),  # 100 requests at 100 rps: the last sent at 0.99 s
    "rate": (["--rate", "200", "--duration-s", "1"], 1.0),
    "concurrency": (["--concurrency", "2", "--duration-s", "1"], 1.0),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_rates_are_over_the_measured_window(server: ServerProcess, tmp_path: Path, shape: str) -> None:
    flags, length_s = SHAPES[shape]
    if shape == "trace":
        trace = tmp_path / "trace.csv"
        trace.write_text("send_s,model,priority,batch_size\n" + "".join(f"{i / 100},simple,0,1\n" for i in range(100)))
        flags = [*flags, str(trace)]
    else:
        flags = ["-m", "simple", *flags]
    assert tidal_main(["bench", "-u", server.url, *flags, *FAST, "-o", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run.json").read_text())
    point = result["points"][0]
    measured = point["measurement"]
    duration, summary = measured["duration_s"], measured["all"]
    # Loose above for a loaded machine; a tick counted twice would double a finite load's duration.
    assert length_s - 0.1 <= duration <= length_s + 0.6
    assert duration <= point["elapsed_s"]
    assert summary["ok"] > 0 and summary["throughput_rps"] == pytest.approx(summary["ok"] / duration)
    assert summary["goodput_rps"] == pytest.approx(summary["slo_attainment"] * summary["completed"] / duration)
    if shape in ("profile", "trace"):
        sent = 150 if shape == "profile" else 100
        assert summary["sent"] == summary["completed"] == point["totals"]["sent"] == sent
        assert sum(e["ok"] for e in result["timeseries"]) == summary["ok"]
