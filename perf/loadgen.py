"""What the benchmarks share: `tidal bench` as the load, the bare echo server as the transport's reference,
capacity search, and a watcher of health latency, memory and the saturation gauge while a run lasts."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ECHO = Path(__file__).with_name("echo_server.py")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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


RATES = [125 * 1.25**i for i in range(20)]  # 125 .. ~8,700 requests/s, 25% apart


def _holds(stats: dict[str, Any], rate: float) -> bool:
    return (stats["slo_attainment"] or 0.0) >= 0.99 and stats["throughput_rps"] >= 0.9 * rate


def find_capacity(url: str, model: str, rows: int, slo_ms: float, out: Path, sweep_s: float = 4.0,
                  workers: int = 1, metrics_url: str | None = None) -> float:
    """The highest rate (requests/s) with 99% of answers within the SLO and the throughput keeping up, below
    the first rate that fails two tries (past the knee a lucky pass is noise; below it, on a shared machine,
    so is one stall)."""
    best = 0.0
    for rate in RATES:
        for attempt in ("", "-again"):
            result = run_bench(url, out.with_name(f"{out.name}-{rate:.0f}{attempt}"), [model], rows, slo_ms,
                               ["--rate", f"{rate:.0f}", "--duration-s", str(sweep_s), "--warmup-s", "1"],
                               metrics_url, workers=workers)
            stats = result["points"][0]["measurement"]["all"]
            log(f"{out.name}{attempt} {rate:.0f} rps: attainment {stats['slo_attainment']:.3f}, "
                f"{stats['throughput_rps']:.0f} rps")
            if _holds(stats, rate):
                break
        else:
            return best
        best = rate
    return best


@dataclass
class Watch:
    """While a run lasts: gRPC health latency every 50 ms, the server's RSS and the saturation gauge every 250 ms."""

    url: str
    metrics_url: str = ""
    pid: int = 0
    health_ms: list[float] = field(default_factory=list)
    health_failures: int = 0
    saturation: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, value)
    received: list[tuple[float, float]] = field(default_factory=list)  # inference RPCs the server has seen, all models
    rss_mib: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Watch:
        self.t0 = time.monotonic()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._health, self._sample)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _health(self) -> None:
        with grpc.insecure_channel(self.url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.wait(0.05):
                start = time.monotonic()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    self.health_ms.append((time.monotonic() - start) * 1e3)
                except grpc.RpcError:
                    self.health_failures += 1

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            at = time.monotonic() - self.t0
            if self.pid:
                self.rss_mib.append((at, rss_mib(self.pid)))
            if self.metrics_url:
                with contextlib.suppress(OSError):
                    text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
                    value = re.search(r'^tidal_saturation\{model=""\} (\S+)$', text, re.MULTILINE)
                    if value:
                        self.saturation.append((at, float(value.group(1))))
                    seen = re.findall(r"^tidal_edge_received_total\{[^}]*\} (\S+)$", text, re.MULTILINE)
                    self.received.append((at, sum(map(float, seen))))

    def reached(self, level: float) -> float | None:
        """Seconds from the load's arrival to the first gauge sample at or above `level`. The arrival is the last
        sample before the server's received counter moved, so the figure errs long by up to one sample period
        (250 ms), never short; the load generator's own start-up is not counted."""
        if not self.received:
            return None
        first = self.received[0][1]
        start = next((self.received[i - 1][0] for i, (_, n) in enumerate(self.received) if i and n > first), None)
        if start is None:
            return None
        return next((round(at - start, 2) for at, v in self.saturation if at >= start and v >= level), None)

    def health(self) -> dict[str, Any]:
        ms = sorted(self.health_ms)
        return {"checks": len(ms), "failed": self.health_failures,
                "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 1) if ms else None,
                "max_ms": round(ms[-1], 1) if ms else None}


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def cpu_description() -> str:
    """The CPU model, core count and the ISA flags that matter here: every figure is stated beside it."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", text)
    flags = re.search(r"flags\s*:\s*(.*)", text)
    have = set(flags.group(1).split()) if flags else set()
    isa = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in have)
    return f"{model.group(1) if model else platform.processor()}, {os.cpu_count()} cores, {isa}"


def environment() -> dict[str, str]:
    """What a results table states about the machine and the software it ran on."""
    import onnxruntime

    return {
        "cpu": cpu_description(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
        "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def write_section(path: Path, text: str, begin: str, end: str, section: str) -> None:
    """Replace the generated block between `begin` and `end` inside `section` (one script may own blocks in
    several sections); create the block, the section or the file when absent."""
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    if section not in current:
        path.write_text(f"{current.rstrip()}\n\n{section}\n\n{text}\n")
        return
    head, rest = current.split(section, 1)
    body_end = rest.find("\n## ")
    body, tail = (rest, "") if body_end < 0 else (rest[:body_end], rest[body_end:])
    if begin in body and end in body:
        before, block = body.split(begin, 1)
        body = before + text + block.split(end, 1)[1]
    else:
        body = f"\n\n{text}\n{body}"
    path.write_text(head + section + body + tail)
