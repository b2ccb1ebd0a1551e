"""Serves the reference MLP on every GPU backend this host can run and on the CPU, and measures each with
tidal bench at one concurrency (perf/gpu_check.sh runs it; it needs a GPU to say anything).

    python perf/gpu_serve_check.py OUT_DIR [--concurrency 128] [--seconds 10]

Models (one repository, one server): `mlp_cpu` (ONNX Runtime, KIND_CPU, an instance of 2 threads per 2 cores),
`mlp_ort_gpu` (ONNX Runtime CUDA EP, KIND_GPU), `mlp_ort_trt` (the same with the TensorRT EP),
`mlp_trt` (native TensorRT), `mlp_int8_gpu` (tidal's CUDA int8 GEMM on the QDQ model); every GPU model
batches dynamically up to 128 rows. A backend `tidal hardware` calls unusable is listed with its reason,
not run. Writes OUT_DIR/serve.md (a markdown table, with the GPU/CPU throughput ratio) and serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench_scheduler import Server
from models import MODELS, model_config, write_model_dir

from tidal.hardware_cli import report

MAX_BATCH = 128
GPU_MODELS = {  # name -> (backend that must be usable, extra config lines)
    "mlp_ort_gpu": ("onnxruntime", ""),
    "mlp_ort_trt": ("onnxruntime", 'parameters { key: "gpu_accelerator" value: { string_value: "tensorrt" } }'),
    "mlp_trt": ("tensorrt", 'backend: "tensorrt"'),
    "mlp_int8_gpu": ("int8", 'backend: "int8"'),
}


def _config(name: str, kind: str, extra: str, instances: int, threads: int = 1) -> str:
    text = model_config(name, MODELS["mlp"], MAX_BATCH, 100, instances=instances, intra_op_threads=threads)
    text = text.replace('platform: "onnxruntime_onnx"\n', "").replace("KIND_CPU", kind)
    return text.replace("dynamic_batching {", "dynamic_batching { preferred_batch_size: [ 64 ]", 1) + extra + "\n"


def _qdq(fp32: Path, target: Path) -> None:
    """The reference MLP's static QDQ form, calibrated on random rows like the kernels' own tests."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Rows(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"INPUT": np.random.default_rng(i).standard_normal((32, 256), np.float32)}
                                 for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(target), Rows(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)


def build_repository(root: Path, usable: dict[str, bool]) -> list[str]:
    cpu_dir = write_model_dir(root, "mlp_cpu", MODELS["mlp"], "")
    fp32 = cpu_dir / "1" / "model.onnx"
    cores = len(os.sched_getaffinity(0))  # the CPU baseline gets every core: 2 threads per instance
    (cpu_dir / "config.pbtxt").write_text(_config("mlp_cpu", "KIND_CPU", "", max(1, cores // 2), 2))
    served = ["mlp_cpu"]
    for name, (backend, extra) in GPU_MODELS.items():
        if not usable.get(backend):
            continue
        model_dir = write_model_dir(root, name, MODELS["mlp"], _config(name, "KIND_GPU", extra, 2), fp32)
        if backend == "int8":
            (model_dir / "1" / "model.onnx").unlink()
            _qdq(fp32, model_dir / "1" / "model.onnx")
        served.append(name)
    return served


def bench(url: str, model: str, concurrency: int, seconds: float, out: Path) -> dict:
    prefix = out / f"bench-{model}"
    cmd = [sys.executable, "-m", "tidal", "bench", "-u", url, "-m", model, "--concurrency", str(concurrency),
           "--duration-s", str(seconds), "--no-progress", "-o", str(prefix)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 4 + 60)
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr).strip()[-300:]}
    measured = json.loads(prefix.with_suffix(".json").read_text())["points"][0]["measurement"]["all"]
    return {"rps": measured["throughput_rps"], "p50_ms": measured["latency_ms"]["p50"],
            "p99_ms": measured["latency_ms"]["p99"], "errors": sum(measured.get("errors", {}).values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    hw = report()
    usable = {name: state["usable"] for name, state in hw["gpu_backends"].items()}
    served = build_repository(args.out / "repo", usable)
    cmd = [sys.executable, "-m", "tidal", "serve", "--model-repository", str(args.out / "repo"), "--grpc-port", "0",
           "--no-metrics"]
    server = Server(cmd, r"serving gRPC on .*:(\d+)$", args.out / "server.log")
    try:
        results = {m: bench(server.url, m, args.concurrency, args.seconds, args.out) for m in served}
    finally:
        server.stop()
    cpu = results["mlp_cpu"].get("rps") or 0.0
    lines = [f"Reference MLP 256-1024-1024-10, batch-1 requests, closed loop at concurrency {args.concurrency}, "
             f"{args.seconds:.0f} s each, dynamic batching up to {MAX_BATCH}.", "",
             "| model | rows/s | p50 ms | p99 ms | vs CPU |", "|---|---|---|---|---|"]
    for model, r in results.items():
        if "error" in r:
            lines.append(f"| {model} | failed: {r['error']} | | | |")
            continue
        ratio = f"{r['rps'] / cpu:.1f}x" if cpu else "-"
        lines.append(f"| {model} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {ratio} |")
    lines += [f"- {name}: not run ({state['reason']})" for name, state in hw["gpu_backends"].items()
              if not state["usable"]]
    (args.out / "serve.md").write_text("\n".join(lines) + "\n")
    (args.out / "serve.json").write_text(json.dumps({"hardware": hw, "results": results}, indent=2))
    print("\n".join(lines))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
