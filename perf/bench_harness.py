"""tidal bench against perf_analyzer: the same server, model and closed loop, measured by both, alternating.

    .venv/bin/python perf/bench_harness.py [--concurrency 1 8 32] [--alternations 7] [--write perf/RESULTS.md]

One tidal server serves the `mlp` reference model of perf/models.py (one ONNX Runtime instance, one
thread, `max_batch_size: 32`, a 200 us window). At each concurrency the two tools take turns
(perf_analyzer, tidal bench, perf_analyzer, ...), each measuring three windows and averaging them
(perf_analyzer `--max-trials 3` with its stability check opened to 100 %, tidal bench
`--max-windows 3 --stability-pct 100`), batch-1 random FP32 inputs. Each cell is the median over the
alternations; "paired" is the median of the per-alternation ratio tidal bench / perf_analyzer, which
cancels slow drifts in the machine's background load. Both clients share the machine with the server.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_scheduler import ROOT, Server, environment, log, perf_analyzer_binary, write_section
from models import MODELS, model_config, write_model_dir

MODEL = "mlp"
BEGIN, END = "<!-- bench_harness: generated, do not edit -->", "<!-- bench_harness: end -->"
SECTION = "### Closed loop: tidal bench against perf_analyzer"


def perf_analyzer(binary: str, url: str, concurrency: int, window_s: float) -> dict | None:
    with tempfile.NamedTemporaryFile(suffix=".csv") as report:
        cmd = [binary, "-m", MODEL, "-u", url, "-i", "grpc", "--concurrency-range", str(concurrency)]
        cmd += ["-p", str(int(window_s * 1000)), "--stability-percentage", "100", "--max-trials", "3"]
        proc = subprocess.run([*cmd, "-f", report.name], capture_output=True, text=True, timeout=600)
        rows = list(csv.DictReader(Path(report.name).read_text().splitlines()))
    if proc.returncode != 0 or not rows:
        log(f"  perf_analyzer c{concurrency} failed: {(proc.stdout + proc.stderr).strip()[-300:]}")
        return None
    return {"rps": float(rows[0]["Inferences/Second"]), "p50_ms": float(rows[0]["p50 latency"]) / 1e3}


def tidal_bench(url: str, concurrency: int, window_s: float, work: Path) -> dict | None:
    prefix = work / f"tb-c{concurrency}"
    cmd = [sys.executable, "-m", "tidal", "bench", "-u", url, "-m", MODEL, "--concurrency", str(concurrency)]
    cmd += ["--window-s", str(window_s), "--stability-pct", "100", "--max-windows", "3", "--warmup-s", "0"]
    proc = subprocess.run([*cmd, "--no-progress", "-o", str(prefix)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        log(f"  tidal bench c{concurrency} failed: {(proc.stdout + proc.stderr).strip()[-300:]}")
        return None
    measured = json.loads(prefix.with_suffix(".json").read_text())["points"][0]["measurement"]["all"]
    return {"rps": measured["throughput_rps"], "p50_ms": measured["latency_ms"]["p50"]}


def run(args: argparse.Namespace) -> dict[int, dict]:
    binary = perf_analyzer_binary()
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tidal-bench-harness-") as tmp:
        work = Path(tmp)
        write_model_dir(work / "repo", MODEL, MODELS[MODEL], model_config(MODEL, MODELS[MODEL], 32, 200))
        cmd = [sys.executable, "-m", "tidal", "serve", "--model-repository", str(work / "repo")]
        server = Server(
            [*cmd, "--grpc-port", "0", "--metrics-port", "0", "--no-http"], r"serving gRPC on .*:(\d+)$", work / "log"
        )
        try:
            tidal_bench(server.url, 1, 1.0, work)  # warm-up: first-run allocations out of every window
            for c in args.concurrency:
                load = os.getloadavg()[0]
                pairs = []
                for i in range(args.alternations):
                    pa = perf_analyzer(binary, server.url, c, args.window_s)
                    tb = tidal_bench(server.url, c, args.window_s, work)
                    log(f"c{c} #{i + 1}: perf_analyzer {pa}, tidal bench {tb}")
                    if pa and tb:
                        pairs.append((pa, tb))
                results[c] = {"pairs": pairs, "load": (load, os.getloadavg()[0])}
        finally:
            server.stop()
    return results


def render(results: dict[int, dict], args: argparse.Namespace, env: dict[str, str]) -> str:
    lines = [
        BEGIN,
        f"Command: `python perf/bench_harness.py {' '.join(sys.argv[1:])}` ({env['minutes']} min). Machine: "
        f"{env['cpu']}; grpcio {env['grpcio']}; client, server and anything else running share "
        "the cores.",
        "",
        f"    perf_analyzer -m {MODEL} -u 127.0.0.1:PORT -i grpc --concurrency-range C -p {int(args.window_s * 1000)} "
        "--stability-percentage 100 --max-trials 3 -f pa.csv",
        f"    tidal bench -u 127.0.0.1:PORT -m {MODEL} --concurrency C --window-s {args.window_s:g} "
        "--stability-pct 100 --max-windows 3 --warmup-s 0 -o tb",
        "",
        "| concurrency | pairs | perf_analyzer infer/s (range) | tidal bench infer/s (range) | difference of medians "
        "| paired (range) | p50 ms, perf_analyzer / tidal bench | 1-min load average |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, r in results.items():
        pairs = r["pairs"]
        if not pairs:
            lines.append(f"| {c} | 0 | - | - | - | - | - | - |")
            continue
        pa = [p["rps"] for p, _ in pairs]
        tb = [t["rps"] for _, t in pairs]
        ratios = [t["rps"] / p["rps"] - 1 for p, t in pairs]
        pa_p50 = statistics.median(p["p50_ms"] for p, _ in pairs)
        tb_p50 = statistics.median(t["p50_ms"] for _, t in pairs)
        lines.append(
            f"| {c} | {len(pairs)} | {statistics.median(pa):,.0f} ({min(pa):,.0f}-{max(pa):,.0f}) "
            f"| {statistics.median(tb):,.0f} ({min(tb):,.0f}-{max(tb):,.0f}) "
            f"| {statistics.median(tb) / statistics.median(pa) - 1:+.1%} "
            f"| {statistics.median(ratios):+.1%} ({min(ratios):+.0%}..{max(ratios):+.0%}) "
            f"| {pa_p50:.2f} / {tb_p50:.2f} | {r['load'][0]:.1f} -> {r['load'][1]:.1f} |"
        )
    lines.append(END)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--alternations", type=int, default=7, help="turns of each tool per concurrency")
    parser.add_argument("--window-s", type=float, default=2.0, help="measurement window of both tools")
    parser.add_argument("--write", type=Path, help="update the generated block of this RESULTS.md")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    started = time.monotonic()
    results = run(args)
    env = {**environment(), "minutes": f"{(time.monotonic() - started) / 60:.1f}"}
    text = render(results, args, env)
    print(text)
    if args.write:
        write_section(args.write, text, BEGIN, END, SECTION)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
