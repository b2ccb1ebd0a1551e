"""Scheduler benchmark: tidal between its two limits, in one run, driven by Triton's perf_analyzer.

    .venv/bin/python perf/bench_scheduler.py [--repeats 3] [--write perf/RESULTS.md] [--json out.json]

On the reference models of perf/models.py (`--models`), each point measured by
perf_analyzer with batch-1 requests and no `-x` (the same flags work against Triton):
- tidal, batching off (`max_batch_size: 1`, one request per execution) and on (`max_batch_size: 128`,
  dynamic batching without a window); one ONNX Runtime instance, intra_op_thread_count 1, no spinning;
- tidal's native front end (`--frontend native`, gRPC C++ taking the calls), batching on, where this build
  has it;
- the bare grpc.aio echo (perf/echo_server.py, uvloop) serving the same input shape: the ceiling of any
  Python gRPC server on this machine;
- the floor (perf/floor_server.py): the echo's server running the model through one worker thread with
  nothing else on the request path, so floor -> tidal is what tidal's own request path costs;
- PyTriton (perf/pytriton_server.py, Triton's core with the model in a Python callable), where
  `.venv-pytriton` exists;
- the raw backend called in this process at each batch size: the ceiling of the model itself.
Servers run as separate processes but share the machine's cores with perf_analyzer; the echo is measured
the same way, so the ratios compare like with like. Points are interleaved (echo, floor, off, on, native, PyTriton)
and repeated; tables give the median and the min-max spread of throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tritonclient.grpc as tc

from tidal.backends.base import BackendOptions
from tidal.backends.onnxruntime import OnnxRuntimeBackend
from tidal.transport.native import available as native_available

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import environment, log, write_section
from models import MODELS, model_config, write_model_dir

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 8, 32, 128)
EXTRA_CONCURRENCY = {"wide_mlp": (64,)}  # the batching target is set at 64 for the compute-bound model
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_BATCH = 128
SERVERS = ("echo", "floor", "off", "on", "native", "pytriton")
LABELS = {"echo": "echo", "floor": "floor", "off": "off", "on": "on", "native": "native", "pytriton": "PyTriton"}
SERVER_KEYS = {"echo": "echo:{}", "floor": "floor:{}", "native": "tidal-native", "pytriton": "pytriton"}  # else "tidal"
BATCHED = ("on", "native")  # the servers measured on the `_batched` models
PYTRITON = ROOT / ".venv-pytriton" / "bin" / "python"
PYTRITON_WINDOW_US = 100  # Triton's dynamic batching as its users set it for small requests
TARGET_MODELS = ("mlp", "cnn", "wide_mlp")  # the targets name these; `linear` isolates tidal's own cost
IDLE_GAPS_MS = (0.5, 1.0, 2.0)  # idle time before a batch-1 run: a c1 server idles for the client's round trip


def build_repository(root: Path, window_us: int) -> None:
    """`NAME` (batching off) and `NAME_batched` (on) for every reference model, sharing one ONNX file."""
    for name, model in MODELS.items():
        onnx_file = write_model_dir(root, name, model, model_config(name, model, 1, None)) / "1" / "model.onnx"
        batched = f"{name}_batched"
        write_model_dir(root, batched, model, model_config(batched, model, MAX_BATCH, window_us), onnx_file)


def raw_limits(root: Path, seconds: float) -> dict[str, dict[int, dict[str, float]]]:
    """p50 latency (ms) and rows/s (at that p50) of `backend.run` per batch size, in this process, with the
    server's settings. Medians, so a burst of other load on the machine does not lower the ceiling.

    Back to back the model's weights stay in cache; a server at concurrency 1 leaves the core idle between
    runs. Batch 1 is therefore also timed after each of IDLE_GAPS_MS of sleep (`idle_<gap>_ms`)."""
    options = BackendOptions(intra_op_threads=1, allow_spinning=False)
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, model in MODELS.items():
        backend = OnnxRuntimeBackend(root / name / "1" / "model.onnx", options)
        out[name] = {}
        for batch in BATCH_SIZES:
            x = np.random.default_rng(0).random((batch, *model.input_dims), dtype=np.float32)
            for _ in range(3):
                backend.run({"INPUT": x}, ["OUTPUT"])
            p50_s = _p50_run(backend, x, seconds, 0.0)
            out[name][batch] = {"p50_ms": p50_s * 1e3, "rows_s": batch / p50_s}
            if batch == 1:
                for gap in IDLE_GAPS_MS:
                    out[name][1][f"idle_{gap}_ms"] = _p50_run(backend, x, seconds, gap * 1e-3) * 1e3
        backend.close()
        log(f"raw {name}: " + ", ".join(f"b{b} {v['rows_s']:.0f}/s" for b, v in out[name].items()))
    return out


def _p50_run(backend: OnnxRuntimeBackend, x: np.ndarray, seconds: float, idle_s: float) -> float:
    """Median seconds of one run, each after `idle_s` of sleep; at least 5 runs, and `seconds` in all."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - started < seconds:
        if idle_s:
            time.sleep(idle_s)
        t0 = time.perf_counter()
        backend.run({"INPUT": x}, ["OUTPUT"])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ticks(stat: Path) -> tuple[int, int]:
    """(user + system clock ticks, parent pid) from a /proc stat file."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[1])


class Server:
    """A server child process on a free loopback port; its CPU time is read from /proc."""

    def __init__(
        self, cmd: list[str], port_pattern: str, log_path: Path, start_timeout_s: float = 180.0,
        loop_in_main_thread: bool = True,
    ) -> None:
        """`loop_in_main_thread`: the process's main thread is its event loop (tidal, the echo, the floor), so
        its CPU is the loop's share; PyTriton's main thread only launches Triton."""
        self.loop_in_main_thread = loop_in_main_thread
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        # A server that hangs before printing its port (seen once with PyTriton) is killed, not waited on forever.
        watchdog = threading.Timer(start_timeout_s, self.proc.kill)
        watchdog.start()
        try:
            for line in self.proc.stdout:
                match = re.search(port_pattern, line.strip())
                if match:
                    self.port = int(match.group(1))
                    return
        finally:
            watchdog.cancel()
        raise RuntimeError(f"{cmd[:4]} exited with {self.proc.wait()} before printing its port; see {log_path}")

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_s(self, loop_thread_only: bool = False) -> float:
        """CPU seconds of the process and its descendants (PyTriton runs Triton and its Python backend as
        children), or of the main thread only (where tidal's event loop runs)."""
        if loop_thread_only:
            return _ticks(Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/stat"))[0] / os.sysconf("SC_CLK_TCK")
        children: dict[int, list[int]] = {}
        ticks: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):  # a process that ended meanwhile
                pid = int(stat.parent.name)
                ticks[pid], ppid = _ticks(stat)
                children.setdefault(ppid, []).append(pid)
        total, todo = 0, [self.proc.pid]
        while todo:
            pid = todo.pop()
            total += ticks.get(pid, 0)
            todo += children.get(pid, [])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self._log.close()


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_pytriton(models: dict[str, Path], work: Path, window_us: int) -> tuple[Server, dict[str, str]] | None:
    """perf/pytriton_server.py serving `models` (name -> ONNX file) with dynamic batching, once every model is
    ready (PyTriton prints its port before Triton has loaded them); None where `.venv-pytriton` is missing."""
    if not PYTRITON.exists():
        log("PyTriton not measured: no .venv-pytriton (see perf/pytriton_server.py)")
        return None
    http, grpc, metrics = free_ports(3)
    cmd = [str(PYTRITON), str(ROOT / "perf" / "pytriton_server.py"), str(http), str(grpc), str(metrics)]
    cmd += [f"{name}={path}" for name, path in models.items()] + ["--window-us", str(window_us)]
    server = Server(cmd, r"^(\d+)$", work / "pytriton.log", loop_in_main_thread=False)  # the gRPC port
    urls = {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}"}
    client = tc.InferenceServerClient(urls["grpc"])
    deadline = time.monotonic() + 120
    while not all(_ready(client, name) for name in models):
        if time.monotonic() > deadline or server.proc.poll() is not None:
            server.stop()
            raise RuntimeError(f"PyTriton did not load {sorted(models)}; see {work / 'pytriton.log'}")
        time.sleep(0.5)
    client.close()
    return server, urls


def _ready(client: tc.InferenceServerClient, model: str) -> bool:
    try:
        return client.is_model_ready(model)
    except Exception:  # Triton's gRPC endpoint comes up after PyTriton prints its port
        return False


@contextmanager
def servers(repo: Path, work: Path) -> Iterator[dict[str, Server]]:
    """One tidal (every model, both configs), one echo and one floor per reference model and one PyTriton
    (every model, batching on), all started up front."""
    started: dict[str, Server] = {}
    try:
        tidal_cmd = [sys.executable, "-m", "tidal", "serve", "--model-repository", str(repo)]
        tidal_cmd += ["--grpc-port", "0", "--metrics-port", "0", "--http-port", "0"]
        started["tidal"] = Server(tidal_cmd, r"serving gRPC on .*:(\d+)$", work / "tidal.log")
        if native_available() is None:
            started["tidal-native"] = Server([*tidal_cmd, "--frontend", "native"], r"serving gRPC on .*:(\d+)$",
                                             work / "tidal-native.log")
        onnx_files = {name: repo / name / "1" / "model.onnx" for name in MODELS}
        for name, model in MODELS.items():
            echo_cmd = [sys.executable, str(ROOT / "perf" / "echo_server.py"), "--port", "0", "--model", name]
            echo_cmd += ["--dims", ",".join(map(str, model.input_dims)), "--max-batch-size", str(MAX_BATCH)]
            started[f"echo:{name}"] = Server(echo_cmd, r"^(\d+)$", work / f"echo-{name}.log")
            floor_cmd = [sys.executable, str(ROOT / "perf" / "floor_server.py"), *echo_cmd[2:]]
            floor_cmd += ["--onnx", str(onnx_files[name])]
            started[f"floor:{name}"] = Server(floor_cmd, r"^(\d+)$", work / f"floor-{name}.log")
        pytriton = start_pytriton(onnx_files, work, PYTRITON_WINDOW_US)
        if pytriton is not None:
            started["pytriton"] = pytriton[0]
        yield started
    finally:
        for server in started.values():
            server.stop()


def perf_analyzer_binary() -> str:
    found = os.environ.get("PERF_ANALYZER")
    if found:
        return found
    out = subprocess.run(["bash", str(ROOT / "perf" / "install-perf-analyzer.sh")], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"perf_analyzer is not installed and the installer failed:\n{out.stderr}")
    return out.stdout.strip().splitlines()[-1]


def perf_analyzer_trials(text: str) -> int:
    """--max-trials as perf_analyzer can use it: it calls a measurement stable by comparing its last 3 windows,
    so fewer trials never stabilize and every point would come back empty."""
    trials = int(text)
    if trials < 3:
        raise argparse.ArgumentTypeError(f"{trials}: at least 3 (perf_analyzer compares 3 windows for stability)")
    return trials


def run_perf_analyzer(
    args: argparse.Namespace, url: str, model: str, concurrency: int, protocol: str = "grpc"
) -> dict | None:
    """One perf_analyzer measurement: throughput, p50 and p99 (client side) and the server's queue and compute
    means, or None if it never stabilized."""
    with tempfile.NamedTemporaryFile(suffix=".csv") as report:
        cmd = [args.perf_analyzer, "-m", model, "-u", url, "-i", protocol, "--concurrency-range", str(concurrency)]
        cmd += ["--measurement-interval", str(args.interval_ms), "--max-trials", str(args.max_trials)]
        cmd += ["-s", str(args.stability), "-f", report.name]
        for _attempt in range(2):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            text = Path(report.name).read_text()
            if proc.returncode == 0 and text.strip():
                row = dict(zip(*[line.split(",") for line in text.strip().splitlines()[:2]], strict=True))
                return {
                    "throughput": float(row["Inferences/Second"]),
                    "p50_ms": float(row["p50 latency"]) / 1e3,
                    "p99_ms": float(row["p99 latency"]) / 1e3,
                    # server-side means from ModelStatistics, per request (JSON only: where the time went)
                    "server_queue_us": float(row["Server Queue"]),
                    "server_compute_us": sum(float(row[f"Server Compute {k}"]) for k in ("Input", "Infer", "Output")),
                }
            log(f"  perf_analyzer {model} c{concurrency} failed: {(proc.stdout + proc.stderr).strip()[-300:]}")
    return None


def measure_point(args, server: Server, model: str, concurrency: int, stats_client) -> dict | None:
    """perf_analyzer against one model, plus the server's CPU use and (tidal) the batch size it formed."""
    before = stats_client.get_inference_statistics(model).model_stats[0] if stats_client else None
    cpu0, loop0, wall0 = server.cpu_s(), server.cpu_s(loop_thread_only=True), time.monotonic()
    result = run_perf_analyzer(args, server.url, model, concurrency)
    if result is None:
        return None
    elapsed = time.monotonic() - wall0
    result["server_cpu"] = (server.cpu_s() - cpu0) / elapsed
    if server.loop_in_main_thread:
        result["loop_cpu"] = (server.cpu_s(loop_thread_only=True) - loop0) / elapsed
    if stats_client is not None:
        after = stats_client.get_inference_statistics(model).model_stats[0]
        executions = after.execution_count - before.execution_count
        result["batch"] = (after.inference_count - before.inference_count) / max(executions, 1)
    return result


def sweep(args: argparse.Namespace, running: dict[str, Server], repeat: int) -> list[dict]:
    """Every (model, concurrency) point for every server kind, interleaved."""
    stats_clients = {k: tc.InferenceServerClient(s.url) for k, s in running.items() if not k.startswith("echo")}
    points = []
    for name in args.models:
        for concurrency in args.concurrency or sorted((*CONCURRENCY, *EXTRA_CONCURRENCY.get(name, ()))):
            for kind in SERVERS:
                key = SERVER_KEYS.get(kind, "tidal").format(name)
                if key not in running:
                    continue
                model = f"{name}_batched" if kind in BATCHED else name
                result = measure_point(args, running[key], model, concurrency, stats_clients.get(key))
                if result is None:
                    continue
                points.append({"repeat": repeat, "model": name, "server": kind, "concurrency": concurrency, **result})
                batch = f" batch {result['batch']:.1f}" if "batch" in result else ""
                log(
                    f"r{repeat} {name:8s} c{concurrency:<3d} {kind:6s} {result['throughput']:8.0f}/s "
                    f"p50 {result['p50_ms']:7.2f} p99 {result['p99_ms']:7.2f} ms cpu {result['server_cpu']:.2f}{batch}"
                )
    for client in stats_clients.values():
        client.close()
    return points


def warm_up(running: dict[str, Server]) -> None:
    """One request per model of tidal and PyTriton, so no measured window pays first-run allocations."""
    for key, suffixes in (("tidal", ("", "_batched")), ("tidal-native", ("_batched",)), ("pytriton", ("",))):
        if key not in running:
            continue
        client = tc.InferenceServerClient(running[key].url)
        for name, model in MODELS.items():
            for suffix in suffixes:
                tensor = tc.InferInput("INPUT", [1, *model.input_dims], "FP32")
                tensor.set_data_from_numpy(np.zeros((1, *model.input_dims), np.float32))
                client.infer(name + suffix, [tensor])
        client.close()


# -- report ---------------------------------------------------------------------------------------
BEGIN, END = "<!-- bench_scheduler: generated, do not edit -->", "<!-- bench_scheduler: end -->"
SECTION = "## Request path: tidal against the echo, the floor and PyTriton (issue 16)"


def summarize(points: Iterable[dict], **where) -> dict | None:
    """Medians over the repeats of the matching points, with the throughput's min and max."""
    chosen = [p for p in points if all(p[k] == v for k, v in where.items())]
    if not chosen:
        return None
    keys = [k for k in ("throughput", "p50_ms", "p99_ms", "batch", "server_cpu", "loop_cpu") if k in chosen[0]]
    out = {k: statistics.median(p[k] for p in chosen) for k in keys}
    out["lo"], out["hi"] = min(p["throughput"] for p in chosen), max(p["throughput"] for p in chosen)
    return out


def raw_rate(raw: dict[int, dict[str, float]], batch: float) -> float:
    """The raw backend's rows/s at a (fractional) batch size, linear between measured sizes."""
    sizes = sorted(raw)
    batch = min(max(batch, sizes[0]), sizes[-1])
    return float(np.interp(batch, sizes, [raw[b]["rows_s"] for b in sizes]))


def _rate(m: dict | None) -> str:
    if m is None:
        return "-"
    spread = f" ({m['lo']:,.0f}-{m['hi']:,.0f})" if m["hi"] > m["lo"] else ""
    return f"{m['throughput']:,.0f}{spread}"


def _cpu(m: dict | None) -> str:
    """Server CPU per request; in brackets the part on the event-loop thread (older runs lack it)."""
    if m is None:
        return "-"
    loop = f" ({m['loop_cpu'] * 1e6 / m['throughput']:.0f})" if "loop_cpu" in m else ""
    return f"{m['server_cpu'] * 1e6 / m['throughput']:.0f}{loop}"


def _lat(m: dict | None) -> str:
    return "-" if m is None else f"{m['p50_ms']:.2f} / {m['p99_ms']:.1f}"


def model_table(points: list[dict], raw: dict, name: str) -> list[str]:
    kinds = [k for k in SERVERS if any(p["model"] == name and p["server"] == k for p in points)]
    batching = [k for k in ("floor", *BATCHED, "pytriton") if k in kinds]
    tidal = [k for k in BATCHED if k in kinds]
    ratios = [(k, other) for k in tidal for other in ("echo", "floor", "pytriton") if other in kinds]
    label = LABELS.get
    lines = [
        "| conc | " + " | ".join(f"{label(k)} infer/s | {label(k)} p50 / p99 ms" for k in kinds)
        + f" | batch formed ({', '.join(map(label, batching))}) | "
        + " | ".join(f"{label(k)} / {label(other)}" for k, other in ratios)
        + " | " + " | ".join(f"{label(k)} / raw at that batch" for k in tidal)
        + f" | server CPU per request, us ({', '.join(map(label, kinds))}) |",
        "|---:|" + "---:|" * (2 * len(kinds) + 1 + len(ratios) + len(tidal)) + "---|",
    ]
    for c in sorted({p["concurrency"] for p in points if p["model"] == name}):
        m = {k: summarize(points, model=name, server=k, concurrency=c) for k in kinds}
        cells = [f"{_rate(m[k])} | {_lat(m[k])}" for k in kinds]
        cells.append(" / ".join(f"{m[k]['batch']:.1f}" if m[k] and "batch" in m[k] else "-" for k in batching))
        cells += [_ratio(paired(points, name, c, k, other)) for k, other in ratios]
        cells += [f"{m[k]['throughput'] / raw_rate(raw[name], m[k]['batch']):.2f}" if m[k] else "-" for k in tidal]
        cells.append(", ".join(_cpu(m[k]) for k in kinds))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def _throughput(point: dict) -> float:
    return point["throughput"]


def _cpu_per_request(point: dict) -> float:
    return point["server_cpu"] / point["throughput"]


def paired(points: list[dict], model: str, concurrency: int, a: str, b: str, value=_throughput) -> list[float]:
    """`value` of server a over server b within each repeat: the two were measured minutes apart at most, so the
    ratio keeps what a shared host's load does to both out of the comparison."""
    at = {(p["repeat"], p["server"]): p for p in points if p["model"] == model and p["concurrency"] == concurrency}
    repeats = sorted({r for r, _ in at})
    return [value(at[r, a]) / value(at[r, b]) for r in repeats if (r, a) in at and (r, b) in at]


def _ratio(ratios: list[float]) -> str:
    if not ratios:
        return "-"
    spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
    return f"{statistics.median(ratios):.2f}{spread}"


def targets(points: list[dict], raw: dict) -> list[str]:
    """The native request path's targets (issue 16) and the batching targets that must keep holding, each
    with the measured value and whether it is met."""
    rows = []

    def add(what: str, measured: float, goal: float, fmt: str, at_least: bool) -> None:
        met = measured >= goal if at_least else measured <= goal
        rows.append(
            f"| {what} | {measured:{fmt}} | {'>=' if at_least else '<='} {goal:{fmt}} | {'yes' if met else 'NO'} |"
        )

    def add_paired(what: str, kind: str, other: str, goal: float, at_least: bool, value=_throughput) -> None:
        ratios = paired(points, "mlp", 128, kind, other, value)
        if ratios:
            add(what, statistics.median(ratios), goal, ".2f", at_least)

    pyt = summarize(points, model="mlp", server="pytriton", concurrency=128)
    for kind in BATCHED:
        add_paired(f"mlp c128 {kind}: throughput / echo (median of paired repeats)", kind, "echo", 0.7, True)
        add_paired(f"mlp c128 {kind}: server CPU per request / echo's", kind, "echo", 1.4, False, _cpu_per_request)
        add_paired(f"mlp c128 {kind}: throughput / PyTriton", kind, "pytriton", 1.2, True)
        m = summarize(points, model="mlp", server=kind, concurrency=128)
        if m and pyt:
            add(f"mlp c128 {kind}: p99 (ms), below PyTriton's", m["p99_ms"], pyt["p99_ms"], ".1f", False)
    echo = summarize(points, model="mlp", server="echo", concurrency=1)
    for kind in ("off", *BATCHED):
        m = summarize(points, model="mlp", server=kind, concurrency=1)
        if echo and m:
            bound = echo["p50_ms"] + raw["mlp"][1]["idle_1.0_ms"] + 0.3
            add(f"mlp c1 {kind}: p50 (ms) vs echo p50 + raw b1 after 1 ms idle + 0.3", m["p50_ms"], bound,
                ".2f", False)
    off, on = (summarize(points, model="wide_mlp", server=k, concurrency=64) for k in ("off", "on"))
    if off and on:
        add("wide_mlp c64: batching on / off", on["throughput"] / off["throughput"], 3.0, ".2f", True)
        at_batch = raw_rate(raw["wide_mlp"], on["batch"])
        add(f"wide_mlp c64 on / raw at batch {on['batch']:.1f}", on["throughput"] / at_batch, 0.7, ".2f", True)
    return ["| target | measured | goal | met |", "|---|---:|---:|---|", *rows]


def render(points: list[dict], raw: dict, env: dict[str, str], command: str) -> str:
    repeats = len({p["repeat"] for p in points})
    lines = [
        BEGIN,
        f"Command: `{command}` ({env['minutes']} min, {repeats} repeats, medians; throughput spread min-max).",
        f"Machine: {env['cpu']}; Python {env['python']}, onnxruntime {env['onnxruntime']}, "
        f"grpcio {env['grpcio']}; load average at start {env['load_average']}, at the end {env['load_end']}.",
        f"Settings: one ONNX Runtime instance per model, intra_op_thread_count 1, allow_spinning false; batching off "
        f"= `max_batch_size: 1`, on = `max_batch_size: {MAX_BATCH}` with `max_queue_delay_microseconds: "
        f"{env['window_us']}`. PyTriton (perf/pytriton_server.py): Triton with the same ONNX file in a Python "
        f"callable, same ONNX Runtime settings, `max_batch_size: {MAX_BATCH}`, `max_queue_delay_microseconds: "
        f"{PYTRITON_WINDOW_US}`. Every server and perf_analyzer share the machine's cores.",
        "",
    ]
    for name, model in MODELS.items():
        if any(p["model"] == name for p in points):
            dims = "x".join(map(str, model.input_dims))
            lines += [f"**{name}** (input {dims})", "", *model_table(points, raw, name), ""]
    sizes = " | ".join(str(b) for b in BATCH_SIZES)
    idle = " / ".join(f"{gap:g}" for gap in IDLE_GAPS_MS)
    lines += [
        f"**Raw backend in process** (rows/s; p50 ms per run in brackets; last column: batch-1 p50 ms when each run "
        f"follows {idle} ms of idle, as between the requests of a concurrency-1 client)",
        "",
        f"| model | {sizes} | b1 after {idle} ms idle |",
        "|---|" + "---:|" * (len(BATCH_SIZES) + 1),
    ]
    for name in MODELS:
        cells = " | ".join(f"{raw[name][b]['rows_s']:,.0f} ({raw[name][b]['p50_ms']:.2f})" for b in BATCH_SIZES)
        after_idle = " / ".join(f"{raw[name][1][f'idle_{gap}_ms']:.2f}" for gap in IDLE_GAPS_MS)
        lines.append(f"| {name} | {cells} | {after_idle} |")
    lines += ["", "**Targets**", "", *targets(points, raw), END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of every point (median reported)")
    parser.add_argument("--interval-ms", type=int, default=1500, help="perf_analyzer --measurement-interval")
    parser.add_argument("--max-trials", type=perf_analyzer_trials, default=4, help="perf_analyzer --max-trials")
    parser.add_argument("--stability", type=int, default=100, help="perf_analyzer -s (percent)")
    parser.add_argument("--raw-seconds", type=float, default=0.5, help="time per batch size of the raw backend")
    parser.add_argument("--window-us", type=int, default=0, help="max_queue_delay_microseconds with batching on")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models to load-test")
    parser.add_argument("--concurrency", nargs="+", type=int, help="only these concurrencies (default: all)")
    parser.add_argument("--write", type=Path, help="update the generated part of this RESULTS.md")
    parser.add_argument("--json", type=Path, help="also write every point here")
    args = parser.parse_args(argv)
    args.perf_analyzer = perf_analyzer_binary()
    started = time.monotonic()
    env = {**environment(), "window_us": str(args.window_us)}
    points, raws = [], []
    with tempfile.TemporaryDirectory(prefix="tidal-bench-scheduler-") as tmp:
        work = Path(tmp)
        build_repository(work / "repo", args.window_us)
        with servers(work / "repo", work) as running:
            warm_up(running)
            for repeat in range(args.repeats):
                raws.append(raw_limits(work / "repo", args.raw_seconds))  # idle servers take no CPU meanwhile
                points += sweep(args, running, repeat)
    raw = {
        name: {b: {k: statistics.median(r[name][b][k] for r in raws) for k in raws[0][name][b]} for b in BATCH_SIZES}
        for name in MODELS
    }
    env["minutes"] = f"{(time.monotonic() - started) / 60:.1f}"
    env["load_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    command = "python perf/bench_scheduler.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(points, raw, env, command.strip())
    print(text)
    if args.write:
        write_section(args.write, text, BEGIN, END, SECTION)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "raw": raw, "points": points}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
