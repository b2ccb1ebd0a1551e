"""`tidal plan`: size a fleet for a model, a rate and an SLO (the model is in fleet.py).

The request path's capacity is measured on this host, once, and cached beside the demo: a real `tidal serve`
with a model that does no work, driven closed-loop by `tidal bench` until the server is the limit. The
variants' profiles come from the repository's variants.json, measured by `tidal optimize`/`tidal profile`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from onnx import TensorProto, helper

from tidal.argtypes import bounded
from tidal.backends.hardware import cpu_info
from tidal.demo import cache_root
from tidal.errors import ConfigError, TidalError
from tidal.fleet import Ask, Candidate, Sizing, choose
from tidal.optimize.graph import save_graph
from tidal.repository.config import load_config
from tidal.repository.layout import list_versions, require_model_dir
from tidal.repository.variants import Variant, load_manifest, profiles_on

# How a replica's capacity is measured, by the calibration and by whoever checks the plan against a run:
# enough closed-loop callers, in two client processes, that the server and not the client is the limit.
CAPACITY_BENCH = ("--concurrency", "16", "--workers", "2", "--duration-s", "3", "--warmup-s", "1")
CALIBRATION_FILE = "request-path.json"
_START_S = 120.0


def measure_capacity_rps(url: str, model: str) -> float:
    """Requests per second a running server answers `model` with CAPACITY_BENCH's load (a real tidal bench)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "capacity"
        run = subprocess.run(
            [sys.executable, "-m", "tidal", "bench", "-u", url, "-m", model, *CAPACITY_BENCH, "--no-progress",
             "-o", str(out)],
            capture_output=True, text=True, timeout=300,
        )
        if run.returncode != 0:
            raise TidalError(f"tidal bench failed: {run.stderr.strip() or run.stdout.strip()}")
        point = json.loads(out.with_suffix(".json").read_text())["points"][0]["measurement"]["all"]
    if point["errors"]:
        raise TidalError(f"tidal bench saw errors while measuring capacity: {point['errors']}")
    return float(point["throughput_rps"])


def no_work_repository(root: Path) -> Path:
    """A model whose run costs next to nothing: what remains is the request path."""
    model = root / "path"
    (model / "1").mkdir(parents=True)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 16]) for n in ("INPUT", "OUTPUT")]
    graph = helper.make_graph([helper.make_node("Identity", ["INPUT"], ["OUTPUT"])], "path", [io[0]], [io[1]])
    save_graph(graph, model / "1" / "model.onnx")
    (model / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\nmax_batch_size: 8\ndynamic_batching { }\n')
    return root


@contextlib.contextmanager
def serving(repository: Path, *extra: str) -> Iterator[str]:
    """A `tidal serve` of `repository` on a free loopback port, stopped on exit; yields its address."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidal", "serve", "--model-repository", str(repository), "--grpc-port", "0",
         "--no-metrics", "--no-http", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        port = next((m.group(1) for line in proc.stdout if (m := re.search(r"serving gRPC on .*:(\d+)$", line))), None)
        if port is None:
            raise TidalError(f"tidal serve exited with {proc.wait(_START_S)} before serving")
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(_START_S)


def measure_path_rps() -> float:
    """A replica's request-path capacity: what it answers when the model does no work."""
    with tempfile.TemporaryDirectory() as tmp, serving(no_work_repository(Path(tmp))) as url:
        return measure_capacity_rps(url, "path")


def path_rps(recalibrate: bool) -> tuple[float, str]:
    """This host's request-path capacity, measured once per CPU model and core count; and where it came from."""
    cpu = cpu_info()
    path = cache_root() / CALIBRATION_FILE
    if path.is_file() and not recalibrate:
        cached = json.loads(path.read_text())
        if (cached.get("cpu"), cached.get("cores")) == (cpu.model, cpu.cores):
            return float(cached["path_rps"]), f"measured {cached['measured_at']}, {path}"
    print("tidal plan: measuring this host's request path (about 15 s) ...", file=sys.stderr)
    rps = measure_path_rps()
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cpu": cpu.model, "cores": cpu.cores, "path_rps": rps, "measured_at": now}) + "\n")
    return rps, f"measured now, cached in {path}"


def _profile(v: Variant) -> Candidate:
    """The variant's CPU profile (replicas here are sized in cores), of the backend chosen to serve it first."""
    chosen = v.choice.chosen if v.choice else ""
    on_cpu = profiles_on(v.profiles, "cpu")
    profile = next((on_cpu[b] for b in [chosen, *v.backends, *on_cpu] if b in on_cpu), None)
    accuracy = v.accuracy.value if v.accuracy else None
    agreement = v.accuracy.top1_agreement if v.accuracy else 1.0
    if profile is None:
        return Candidate(v.name, accuracy, agreement, (), ())
    return Candidate(v.name, accuracy, agreement, profile.batch_sizes, profile.p50_ms, max(profile.intra_op_threads, 1))


def read_model(repository: Path, name: str) -> tuple[list[Candidate], object]:
    """The newest version's variants (as candidates) and the model's config."""
    folder = require_model_dir(repository, name)
    config = load_config(folder, name).config
    versions = list_versions(folder)
    manifest = load_manifest(folder / str(versions[-1])) if versions else None
    if manifest is None:
        # `tidal profile` only re-measures a variants.json that exists: pointing at it here sent users on to a
        # second error. The profiles come from `tidal optimize`.
        where = f"version {versions[-1]}" if versions else "no version folder"
        raise ConfigError(f"model '{name}' has no variants.json ({where}), so no latency profiles to plan from: "
                          "run `tidal optimize` on its model.onnx first")
    return [_profile(v) for v in manifest.variants.values()], config


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="size a fleet: variant, batch limit, instances, replicas and cost for a rate")
    p.add_argument("--model", required=True, help="a model of the repository, with its variants.json")
    p.add_argument("--rate", type=bounded(float, 1e-3), required=True, help="offered requests per second")
    p.add_argument("--slo-ms", type=bounded(float, 1e-3), help="p99 target (default: the model's slo)")
    p.add_argument("--min-accuracy", type=bounded(float, 0.0, 1.0),
                   help="lowest variant accuracy, 0..1 (default: the model's slo)")
    p.add_argument("--cost-per-core-hour", type=bounded(float, 0.0), default=0.0, help="price of one core-hour")
    p.add_argument("--cores-per-replica", type=bounded(int, 1, 1024), default=2, help="one runs the request path")
    p.add_argument("--batch-size", type=bounded(int, 1), default=1, help="rows per request")
    p.add_argument("--model-repository", type=Path, help="where the model is (default: the demo)")
    p.add_argument("--path-rps", type=bounded(float, 1.0), help="a replica's request-path capacity, not measured")
    p.add_argument("--recalibrate", action="store_true", help="measure the request path again")
    p.add_argument("--json", action="store_true", help="print the sized variants as JSON")
    p.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    try:
        repository = args.model_repository
        if repository is None:
            from tidal.demo import ensure_demo_repository

            repository = ensure_demo_repository()
        candidates, config = read_model(repository, args.model)
        slo_ms = args.slo_ms or config.slo.p99_ms
        if not slo_ms:
            raise ConfigError(f"model '{args.model}' has no slo: give --slo-ms")
        min_accuracy = config.slo.min_accuracy if args.min_accuracy is None else args.min_accuracy
        rps, source = (args.path_rps, "given") if args.path_rps else path_rps(args.recalibrate)
        ask = Ask(args.rate, slo_ms, config.max_batch_size, rps, args.cores_per_replica, args.batch_size,
                  config.dynamic_batching.max_queue_delay_microseconds, args.cost_per_core_hour)
        sized = choose(candidates, ask, min_accuracy)
    except TidalError as exc:
        print(f"tidal plan: {exc}", file=sys.stderr)
        return 1
    if not sized:
        print(f"tidal plan: no profiled variant of '{args.model}' reaches accuracy {min_accuracy:g}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"ask": asdict(ask), "path_source": source, "sized": [asdict(s) for s in sized]}))
    else:
        print(_report(args.model, ask, min_accuracy, source, sized))
    return 0 if sized[0].meets_slo else 1


def _report(model: str, ask: Ask, min_accuracy: float, source: str, sized: list[Sizing]) -> str:
    lines = [
        f"{model}: {ask.rate_rps:,.0f} req/s, p99 <= {ask.slo_ms:g} ms, accuracy >= {min_accuracy:g}; request path "
        f"{ask.path_rps:,.0f} req/s per replica ({source})",
        f"{'variant':<14}{'accuracy':>9}{'batch':>7}{'inst':>6}{'req/s/replica':>15}  {'bound by':<13}"
        f"{'replicas':>9}{'util':>6}{'p99 ms':>8}{'$/1M':>9}",
    ]
    for s in sized:
        accuracy = "-" if s.accuracy is None else f"{s.accuracy:.4f}"
        price = f"{s.cost_per_million:.4f}" if ask.cost_per_core_hour else "-"  # no --cost-per-core-hour: unknown
        lines.append(
            f"{s.variant:<14}{accuracy:>9}{s.batch_limit:>7}{s.instances:>6}{s.capacity_rps:>15,.0f}  {s.bound_by:<13}"
            f"{s.replicas:>9}{s.utilisation:>6.2f}{s.predicted_p99_ms:>8.1f}{price:>9}"
        )
    best = sized[0]
    if not best.meets_slo:
        lines.append(f"no variant holds p99 {ask.slo_ms:g} ms at any replica count")
        return "\n".join(lines)
    cost = f", {best.cost_per_million:.4f} per million inferences" if ask.cost_per_core_hour else ""
    lines.append(
        f"plan: {best.variant}, batch limit {best.batch_limit}, {best.instances} instance(s) per replica, "
        f"{best.replicas} replicas of {ask.cores_per_replica} cores, headroom {best.headroom:.0%}{cost}"
    )
    return "\n".join(lines)
