"""HTTP against gRPC on one tidal, driven by Triton's perf_analyzer, with Triton's own HTTP front end beside it.

    .venv/bin/python perf/bench_http.py [--repeats 3] [--concurrency 64] [--write perf/RESULTS.md]

The reference mlp (perf/models.py) with dynamic batching on (max_batch_size 128, no window), batch-1
requests, perf_analyzer with no `-x` and its default binary tensors over HTTP. Points are interleaved
(tidal gRPC, tidal HTTP, PyTriton HTTP) and repeated; tables give the median and the min-max spread.
PyTriton (Triton's server with a Python model, here the same ONNX file through ONNX Runtime, batching on) is
perf/pytriton_server.py, run from `.venv-pytriton` when that exists (see there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_scheduler import (
    MAX_BATCH,
    Server,
    perf_analyzer_binary,
    perf_analyzer_trials,
    run_perf_analyzer,
    start_pytriton,
)
from loadgen import environment, log, write_section
from models import MODELS, model_config, write_model_dir

MODEL = "mlp"
BEGIN, END = "<!-- bench_http:begin -->", "<!-- bench_http:end -->"
SECTION = "## HTTP/REST against gRPC"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--interval-ms", type=int, default=2000, help="perf_analyzer --measurement-interval")
    parser.add_argument("--max-trials", type=perf_analyzer_trials, default=4, help="perf_analyzer --max-trials")
    parser.add_argument("--stability", type=int, default=100, help="perf_analyzer -s (percent)")
    parser.add_argument("--write", type=Path, help="update the generated part of this RESULTS.md")
    args = parser.parse_args(argv)
    args.perf_analyzer = perf_analyzer_binary()
    env = environment()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="tidal-bench-http-") as tmp:
        work = Path(tmp)
        model = MODELS[MODEL]
        onnx_file = write_model_dir(work / "repo", MODEL, model, model_config(MODEL, model, MAX_BATCH, 0))
        onnx_file = onnx_file / "1" / "model.onnx"
        cmd = [sys.executable, "-m", "tidal", "serve", "--model-repository", str(work / "repo"),
               "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0"]
        tidal = Server(cmd, r"serving HTTP on .*:(\d+)$", work / "tidal.log")
        pytriton = None
        try:
            http_port = tidal.port
            assert tidal.proc.stdout is not None
            for line in tidal.proc.stdout:  # the gRPC line follows once the models are loaded
                if "serving gRPC on" in line:
                    grpc_port = int(line.strip().rsplit(":", 1)[1])
                    break
            targets = {"tidal gRPC": (f"127.0.0.1:{grpc_port}", "grpc"),
                       "tidal HTTP": (f"127.0.0.1:{http_port}", "http")}
            pytriton = start_pytriton({MODEL: onnx_file}, work, window_us=0)
            if pytriton is not None:
                targets["PyTriton HTTP"] = (pytriton[1]["http"], "http")
            for repeat in range(args.repeats):
                for label, (url, protocol) in targets.items():
                    log(f"repeat {repeat + 1}: {label}")
                    point = run_perf_analyzer(args, url, MODEL, args.concurrency, protocol)
                    if point is not None:
                        results.setdefault(label, []).append(point)
        finally:
            tidal.stop()
            if pytriton is not None:
                pytriton[0].stop()
    text = render(results, env, args, "python perf/bench_http.py " + " ".join(argv or sys.argv[1:]))
    print(text)
    if args.write:
        write_section(args.write, text, BEGIN, END, SECTION)
    return 0


def render(results: dict[str, list[dict]], env: dict[str, str], args, command: str) -> str:
    def cell(label: str, key: str, fmt: str) -> str:
        values = [p[key] for p in results.get(label, [])]
        if not values:
            return "n/a"
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    rows = [f"| {label} | {cell(label, 'throughput', '{:.0f}')} | {cell(label, 'p50_ms', '{:.2f}')} | "
            f"{cell(label, 'p99_ms', '{:.2f}')} |" for label in results]
    grpc = statistics.median(p["throughput"] for p in results.get("tidal gRPC", [{"throughput": 0}]))
    http = statistics.median(p["throughput"] for p in results.get("tidal HTTP", [{"throughput": 0}]))
    ratio = f"{http / grpc:.2f}" if grpc else "n/a"
    return "\n".join([
        BEGIN,
        f"`{command}`: {MODEL}, batching on (max 128, no window), batch-1 requests, perf_analyzer "
        f"concurrency {args.concurrency}, {args.repeats} interleaved repeats; median (min-max).",
        f"Machine: {env.get('cpu', '?')}, Python {env.get('python', '?')}.",
        "",
        "| server | inferences/s | p50 ms | p99 ms |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        f"tidal HTTP / tidal gRPC throughput: **{ratio}** (target >= 0.8).",
        END,
    ])


if __name__ == "__main__":
    sys.exit(main())
