"""Serves the reference models on the CPU and on every GPU backend this host can run, and measures each with
tidal bench at one concurrency (perf/gpu_check.sh runs it; it needs a GPU to say anything).

    python -u perf/gpu_serve_check.py OUT_DIR [--concurrency 128] [--seconds 8] [--budget-s 70]

The reference MLP (256-1024-1024-10) is the one the target names: `mlp_cpu` (ONNX Runtime on the CPU, every
core: an instance of 2 threads per 2 cores) against `mlp_ort_gpu` (ONNX Runtime, CUDA EP), `mlp_ort_trt` (the
same with the TensorRT EP in front), `mlp_trt` (native TensorRT) and `mlp_int8_gpu` (tidal's CUDA int8 GEMM
on the static QDQ model), each only where `tidal hardware` calls its backend usable. Every GPU model batches
dynamically up to 128 rows. Target (the issue's): ONNX Runtime CUDA or TensorRT serving the MLP at >= 5x the
CPU backend's throughput at concurrency 128. tidal's int8 backend is reported beside it, not counted.

The other reference models of perf/models.py (`--extra-models`, cheapest to serve first) follow on the CPU and
on one GPU engine each, as long as `--budget-s` leaves time; what does not fit is listed as skipped.

The engine that actually served each model is recorded: a GPU model falls back to ONNX Runtime CUDA when its
first-choice backend fails to load, and ONNX Runtime drops a TensorRT EP whose libraries fail, both without
an error. The server runs under a thin wrapper (`--tidal-serve`) that prints the backend each model's
instances loaded on (tidal.repository.manager._load_on's answer); the TensorRT EP's own log lines tell
whether ONNX Runtime kept it. A bare `tidal serve` logs neither.

Writes OUT_DIR/serve.md and OUT_DIR/serve.json after every measurement, so a run stopped midway keeps what it
measured; the model repository, the bench outputs and the server log go to --work (default OUT_DIR/work).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The wrapper's stderr lines: "<tag> <model file> <cpu|gpu> <backend that loaded> <backends asked, in order>".
ENGINE_TAG = "gpu_serve_check engine:"
MAX_BATCH = 128
TARGET_RATIO = 5.0
TARGET_ENGINES = ("onnxruntime", "tensorrt")  # on a GPU instance: what the target counts
# name -> (backend that must be usable on the GPU, extra config lines)
GPU_MLP = {
    "mlp_ort_gpu": ("onnxruntime", ""),
    "mlp_ort_trt": ("onnxruntime", 'parameters { key: "gpu_accelerator" value: { string_value: "tensorrt" } }'),
    "mlp_trt": ("tensorrt", 'backend: "tensorrt"'),
    "mlp_int8_gpu": ("int8", 'backend: "int8"'),
}
DENSE = ("mlp", "wide_mlp", "linear")  # the models tidal's int8 backend can run (Gemm chains; cnn has Conv)
# Modules `tidal serve` and `tidal bench` import beyond what a torch image usually holds.
NEEDED_MODULES = ("onnx", "onnxruntime", "grpc", "grpc_health", "grpc_reflection", "hdrh", "aiohttp", "uvloop")


@dataclass
class Planned:
    name: str
    model: str  # key of perf/models.py's MODELS
    kind: str  # "cpu" or "gpu"
    backend: str  # what the config asks for
    extra: str = ""  # config lines
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def tensorrt(self) -> bool:
        """Native TensorRT or ONNX Runtime's TensorRT EP: engines are built at load or on the first batches."""
        return self.backend == "tensorrt" or "gpu_accelerator" in self.extra


def _serve_with_engine_log(argv: list[str]) -> int:
    """`tidal ARGV` with one stderr line per model version and kind of device: the backend that loaded it."""
    from tidal.cli import main as tidal_main

    try:
        from tidal.repository import manager

        original = manager._load_on
    except (ImportError, AttributeError) as exc:  # tidal refactored: the table says "unknown" instead
        print(f"{ENGINE_TAG} unavailable ({exc})", file=sys.stderr, flush=True)
        return tidal_main(argv)

    def load_on(*args: Any, **kwargs: Any) -> str:
        name = original(*args, **kwargs)
        try:  # (path, names, options, placement, indices, loaded), as tidal calls it
            path, asked, placement, indices = args[0], args[1], args[3], args[4]
            kind = placement.devices[indices[0]].kind
            print(f"{ENGINE_TAG} {path} {kind} {name} {','.join(asked)}", file=sys.stderr, flush=True)
        except (IndexError, AttributeError, TypeError) as exc:
            print(f"{ENGINE_TAG} unreadable call ({exc}); loaded {name}", file=sys.stderr, flush=True)
        return name

    manager._load_on = load_on
    return tidal_main(argv)


def missing_modules() -> list[str]:
    return [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]


def _config(planned: Planned, instances: int, threads: int) -> str:
    from models import MODELS, model_config

    text = model_config(planned.name, MODELS[planned.model], MAX_BATCH, 100, instances=instances,
                        intra_op_threads=threads)
    kind = "KIND_GPU" if planned.kind == "gpu" else "KIND_CPU"
    text = text.replace('platform: "onnxruntime_onnx"\n', "").replace("KIND_CPU", kind)
    text = text.replace("dynamic_batching {", "dynamic_batching { preferred_batch_size: [ 64 ]", 1)
    return text + planned.extra + "\n"


def _qdq(fp32: Path, target: Path, input_dims: tuple[int, ...]) -> None:
    """The model's static QDQ form (u8 activations, per-channel s8 weights), calibrated on random rows."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Rows(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"INPUT": np.random.default_rng(i).standard_normal((32, *input_dims), np.float32)}
                                 for i in range(4)])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    quantize_static(str(fp32), str(target), Rows(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)


def plan(usable: dict[str, bool], extras: list[str], budget_s: float, bench_s: float,
         ) -> tuple[list[Planned], list[str]]:
    """The models to serve, the required MLP first, and why each extra one is left out."""
    planned = [Planned("mlp_cpu", "mlp", "cpu", "onnxruntime")]
    planned += [Planned(name, "mlp", "gpu", backend, extra) for name, (backend, extra) in GPU_MLP.items()
                if usable.get(backend)]
    skipped = []
    # Loading is quick except TensorRT engine builds (tens of seconds each); then each model costs one bench.
    start_s = 25.0 + 30.0 * sum(p.tensorrt for p in planned)
    for model in extras:
        # One GPU engine for the extra models: ONNX Runtime CUDA, else tidal's int8 on the dense ones. Native
        # TensorRT is left out here: its engine build at load could take the whole budget.
        if usable.get("onnxruntime"):
            engine = "onnxruntime"
        elif usable.get("int8") and model in DENSE:
            engine = "int8"
        else:
            skipped.append(f"{model}: no GPU engine for it here (ONNX Runtime CUDA unusable, int8 takes Gemm only)")
            continue
        if budget_s and start_s + (len(planned) + 2) * bench_s > budget_s:
            skipped.append(f"{model}: does not fit the {budget_s:.0f} s budget")
            continue
        extra = 'backend: "int8"' if engine == "int8" else ""
        planned += [Planned(f"{model}_cpu", model, "cpu", "onnxruntime"),
                    Planned(f"{model}_gpu", model, "gpu", engine, extra)]
    return planned, skipped


def build_repository(root: Path, planned: list[Planned]) -> None:
    from models import MODELS, write_model_dir

    cores = len(os.sched_getaffinity(0))  # each CPU model gets every core: 2 threads per instance
    fp32: dict[str, Path] = {}  # the first (CPU) model of each kind writes the ONNX file; the others link to it
    for p in planned:
        instances, threads = (max(1, cores // 2), 2) if p.kind == "cpu" else (2, 1)
        config = _config(p, instances, threads)
        if p.backend == "int8":
            model_dir = write_model_dir(root, p.name, MODELS[p.model], config, fp32[p.model])
            (model_dir / "1" / "model.onnx").unlink()
            _qdq(fp32[p.model], model_dir / "1" / "model.onnx", MODELS[p.model].input_dims)
            continue
        model_dir = write_model_dir(root, p.name, MODELS[p.model], config, fp32.get(p.model))
        fp32.setdefault(p.model, model_dir / "1" / "model.onnx")


class Server:
    """`tidal serve` under the engine-logging wrapper, on a free loopback port; stderr goes to `log_path`."""

    def __init__(self, repo: Path, log_path: Path, start_timeout_s: float) -> None:
        cmd = [sys.executable, "-u", __file__, "--tidal-serve", "serve", "--model-repository", str(repo),
               "--grpc-address", "127.0.0.1", "--grpc-port", "0", "--no-metrics", "--no-http"]
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     cwd=Path(__file__).resolve().parent)
        assert self.proc.stdout is not None
        watchdog = threading.Timer(start_timeout_s, self.proc.kill)  # a hung load must not take the budget
        watchdog.start()
        try:
            for line in self.proc.stdout:
                if match := re.search(r"serving gRPC on .*:(\d+)$", line.strip()):
                    self.url = f"127.0.0.1:{match.group(1)}"
                    return
        finally:
            watchdog.cancel()
        self._log.close()
        raise RuntimeError(f"tidal serve exited ({self.proc.wait()}) before serving; see {log_path}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def engines_from_log(log_text: str) -> dict[str, dict[str, str]]:
    """Model name -> {kind: engine label} from the wrapper's lines and ONNX Runtime's TensorRT EP lines."""
    found: dict[str, dict[str, str]] = {}
    for line in log_text.splitlines():
        if ENGINE_TAG not in line:
            continue
        parts = line.split(ENGINE_TAG, 1)[1].split()
        if len(parts) != 4:
            continue
        path, kind, backend, asked = parts
        model = Path(path).parent.parent.name  # REPO/MODEL/VERSION/model.onnx (links are not followed)
        label = f"{backend} (CPU)" if kind == "cpu" else backend
        if kind == "gpu" and backend == "onnxruntime":
            if re.search(rf"/{re.escape(model)}/\d+/[^ ]*: TensorRT EP active", log_text):
                label = "onnxruntime (TensorRT EP)"
            elif re.search(rf"/{re.escape(model)}/\d+/[^ ]*: (TensorRT libraries did not load|the config asks for "
                           "TensorRT)", log_text):
                label = "onnxruntime (CUDA EP; the TensorRT EP did not start)"
            else:
                label = "onnxruntime (CUDA EP)"
        elif kind == "gpu" and backend == "int8":
            label = "int8 (tidal's CUDA GEMM)"
        if backend != asked.split(",")[0]:  # the server logged why, just before
            label += f", FELL BACK from {asked.split(',')[0]}"
        found.setdefault(model, {})[kind] = label
    return found


def load_error(log_text: str, model: str) -> str:
    """The server's reason for not serving `model`, if it logged one."""
    found = re.findall(rf"model {re.escape(model)}: load failed(?: with an internal error)?:? ?(.*)", log_text)
    return found[-1].strip()[-300:] if found else ""


def bench(url: str, model: str, args: argparse.Namespace, warmup_s: float, work: Path) -> dict[str, Any]:
    prefix = work / f"bench-{model}"
    cmd = [sys.executable, "-m", "tidal", "bench", "-u", url, "-m", model, "--concurrency", str(args.concurrency),
           "--duration-s", str(args.seconds), "--warmup-s", str(warmup_s), "--workers", str(args.workers),
           "--drain-timeout-s", "5", "--no-progress", "-o", str(prefix)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + warmup_s + 60)
    except subprocess.TimeoutExpired:
        return {"error": "tidal bench timed out"}
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr).strip()[-300:]}
    point = json.loads(prefix.with_suffix(".json").read_text())["points"][0]
    measured = point["measurement"]["all"]
    return {"rps": measured["throughput_rps"], "p50_ms": measured["latency_ms"]["p50"],
            "p99_ms": measured["latency_ms"]["p99"], "errors": sum(measured.get("errors", {}).values()),
            "client_bound": bool(point.get("client", {}).get("bottleneck"))}


def verdict(planned: list[Planned], hw: dict[str, Any]) -> list[str]:
    """The target line for the MLP, and tidal's int8 backend beside it."""
    cpu = next(p for p in planned if p.name == "mlp_cpu").result.get("rps")
    if not cpu:
        return ["SERVE TARGET: NOT MEASURED (the CPU baseline mlp_cpu did not run)"]
    gpu = [p for p in planned if p.model == "mlp" and p.kind == "gpu" and p.result.get("rps")]
    for p in gpu:  # where the wrapper could not say, the config's backend stands in, marked as unconfirmed
        if p.result.get("engine", "unknown") == "unknown":
            p.result["engine"] = f"{p.backend} (asked for; engine not confirmed)"
    counted = [p for p in gpu if p.result["engine"].split(" ")[0] in TARGET_ENGINES]
    lines = []
    if counted:
        best = max(counted, key=lambda p: p.result["rps"])
        ratio = best.result["rps"] / cpu
        lines.append(f"SERVE TARGET (>= {TARGET_RATIO:.0f}x the CPU backend on the MLP at concurrency 128): "
                     f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'}: {ratio:.2f}x, {best.name} on "
                     f"{best.result['engine']} ({best.result['rps']:,.0f} rows/s against {cpu:,.0f})")
    else:
        why = "; ".join(f"{name}: {state['reason']}" for name, state in hw["gpu_backends"].items()
                        if name in TARGET_ENGINES and not state["usable"])
        lines.append("SERVE TARGET: NOT MEASURED (no ONNX Runtime CUDA or TensorRT engine served the MLP here"
                     + (f": {why})" if why else ")"))
    for p in gpu:
        if p not in counted:
            lines.append(f"- beside the target: {p.name} on {p.result.get('engine', 'unknown engine')}: "
                         f"{p.result['rps'] / cpu:.2f}x the CPU backend")
    return lines


def write(out: Path, planned: list[Planned], skipped: list[str], hw: dict[str, Any], args: argparse.Namespace,
          note: str = "") -> None:
    lines = [f"Reference models of perf/models.py, batch-1 requests, closed loop at concurrency {args.concurrency} "
             f"({args.workers} tidal bench processes), {args.seconds:.0f} s each after warm-up, dynamic batching "
             f"up to {MAX_BATCH}; the CPU models use every core.", "",
             "| model | asked for | engine that served it | rows/s | p50 ms | p99 ms | vs same model on CPU |",
             "|---|---|---|---|---|---|---|"]
    for p in planned:
        r = p.result
        asked = f"{p.backend} ({p.kind.upper()})" + (" + TensorRT EP" if "gpu_accelerator" in p.extra else "")
        if "rps" not in r:
            lines.append(f"| {p.name} | {asked} | {r.get('engine', '-')} | {r.get('error', 'not run')} | | | |")
            continue
        base = next((q.result.get("rps") for q in planned if q.model == p.model and q.kind == "cpu"), None)
        ratio = f"{r['rps'] / base:.2f}x" if base and p.kind == "gpu" else "-"
        flags = " (client-bound)" if r.get("client_bound") else ""
        flags += f" ({r['errors']} errors)" if r["errors"] else ""
        lines.append(f"| {p.name} | {asked} | {r.get('engine', 'unknown')} | {r['rps']:,.0f}{flags} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {ratio} |")
    lines += ["", *verdict(planned, hw), ""]
    lines += [f"- GPU backend {name}: not usable here ({state['reason']})"
              for name, state in hw["gpu_backends"].items() if not state["usable"]]
    lines += [f"- skipped {reason}" for reason in skipped]
    if note:
        lines.append(f"- {note}")
    (out / "serve.md").write_text("\n".join(lines) + "\n")
    (out / "serve.json").write_text(json.dumps({"hardware": hw, "models": [asdict(p) for p in planned],
                                                "skipped": skipped, "note": note}, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--work", type=Path, help="model repository, bench outputs, server log (default OUT/work)")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per model")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured seconds before each (TensorRT: 5x)")
    parser.add_argument("--workers", type=int, default=4, help="tidal bench load processes (one can be the limit)")
    parser.add_argument("--budget-s", type=float, default=0.0, help="stop starting benches after this (0: no limit)")
    parser.add_argument("--extra-models", default="wide_mlp,linear,cnn",
                        help="other perf/models.py models to serve while the budget lasts, in this order")
    args = parser.parse_args()
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # perf/models.py

    if missing := missing_modules():
        (args.out / "serve.md").write_text(f"not run: Python modules missing for tidal serve/bench: "
                                           f"{', '.join(missing)} (carry their wheels; see perf/gpu_check.sh)\n")
        print((args.out / "serve.md").read_text())
        return 2
    from tidal.hardware_cli import report

    hw = report()
    usable = {name: state["usable"] for name, state in hw["gpu_backends"].items()}
    per_bench_s = args.seconds + args.warmup_s + 5  # tidal bench's own start and drain
    extras = [m for m in args.extra_models.split(",") if m]
    planned, skipped = plan(usable, extras, args.budget_s, per_bench_s)
    build_repository(work / "repo", planned)
    write(args.out, planned, skipped, hw, args, "loading the models")

    def left_s() -> float:
        return args.budget_s - (time.monotonic() - started) if args.budget_s else float("inf")

    try:
        server = Server(work / "repo", work / "server.log", min(180.0, max(10.0, left_s() - 10)))
    except RuntimeError as exc:
        write(args.out, planned, skipped, hw, args, f"the server did not start: {exc}")
        print((work / "server.log").read_text()[-3000:], file=sys.stderr)
        return 1
    note = ""
    try:
        for p in planned:
            log_text = server.log_path.read_text()
            engines = engines_from_log(log_text).get(p.name, {})
            if p.kind in engines:
                p.result["engine"] = engines[p.kind]
            elif reason := load_error(log_text, p.name):
                p.result.update(engine="none", error=f"not loaded: {reason}")
                write(args.out, planned, skipped, hw, args)
                continue
            else:  # the wrapper could not hook tidal's loader (see server.log): measured, engine not known
                p.result["engine"] = "unknown"
            warmup = args.warmup_s * (5 if p.tensorrt else 1)  # TensorRT EP engines build on the first batches
            if left_s() < args.seconds + warmup + 5:
                p.result["error"] = "skipped: out of the time budget"
                note = "the time budget ran out before every model was measured"
                continue
            print(f"bench {p.name} ({p.result['engine']})", flush=True)
            p.result.update(bench(server.url, p.name, args, warmup, work))
            write(args.out, planned, skipped, hw, args)
    finally:
        server.stop()
    write(args.out, planned, skipped, hw, args, note)
    print((args.out / "serve.md").read_text())
    return 0 if all("error" not in p.result for p in planned) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--tidal-serve"]:
        sys.exit(_serve_with_engine_log(sys.argv[2:]))
    sys.exit(main())
