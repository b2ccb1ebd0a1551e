"""What the benchmarks share: `tidal bench` as the load, the bare echo server as the transport's reference."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ECHO = Path(__file__).with_name("echo_server.py")


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def run_bench(url: str, out: Path, classes: list[str], rows: int, slo_ms: float, load: list[str],
              metrics_url: str | None = None, plot: Path | None = None, timeout_s: float = 10.0,
              workers: int = 1) -> dict[str, Any]:
    """One `tidal bench` run; its JSON result. `load` is the load shape (--rate/--profile/... and timing)."""
    cmd = [sys.executable, "-m", "tidal", "bench", "-u", url, "-b", str(rows), "--slo-ms", str(slo_ms),
           "--no-progress", "--request-timeout-s", str(timeout_s), "--workers", str(workers), "-o", str(out), *load]
    if metrics_url:
        cmd += ["--metrics-url", metrics_url]
    for cls in classes:
        cmd += ["-m", cls]
    if plot is not None:
        cmd += ["--plot", str(plot)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"tidal bench failed:\n{done.stdout}\n{done.stderr}")
    for line in done.stdout.splitlines():
        if "bottleneck" in line:
            log(line)
    return json.loads(out.with_suffix(".json").read_text())


@contextmanager
def echo_server(model: str, dims: int, max_batch_size: int = 128) -> Iterator[str]:
    """perf/echo_server.py serving `model` with one [N, dims] FP32 input; yields its host:port."""
    proc = subprocess.Popen(
        [sys.executable, str(ECHO), "--port", "0", "--model", model, "--dims", str(dims),
         "--max-batch-size", str(max_batch_size)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
