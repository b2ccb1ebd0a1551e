"""INT8 kernels and the `int8` backend against ONNX Runtime on this machine, in one run.

    .venv/bin/python perf/bench_int8.py            # prints the "## INT8 kernels" section of perf/RESULTS.md
    .venv/bin/python perf/bench_int8.py --quick    # fewer shapes and shorter windows, for a smoke run
    .venv/bin/python perf/bench_int8.py --hide-isa avx512,vnni --repeat 3   # as on an AVX2-only host

--hide-isa re-runs the bench under perf/isa_mask.py, which hides ISA extensions from CPUID and /proc/cpuinfo,
so tidal's kernels, tidal's hardware detection and MLAS all dispatch as on a host without them (the ISA is
emulated, not the microarchitecture). --repeat N measures the GEMM table N times and reports per-cell medians.

Single-thread figures divide work by the calling thread's CPU time (both tidal's kernels and ONNX Runtime
with one intra-op thread run on the calling thread), so another process sharing the core does not read as
a slower kernel. Multi-thread figures and latencies are wall-clock. Every measurement alternates between
the contenders in short windows and keeps each one's best window, so a burst of background load hurts
both sides alike. Raw numbers go to perf/out/int8.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import isa_mask  # perf/, beside this script
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from tidal import _kernels
from tidal.backends import int8
from tidal.backends.base import BackendOptions
from tidal.backends.hardware import cpu_info

REFERENCE_MLP = [256, 1024, 1024, 10]
WIDE_MLP = [1024, 4096, 4096, 1024]
GEMM_M = [1, 4, 16, 64, 256]
BATCHES = [1, 8, 32, 128, 256, 512, 1024]


def best_rates(contenders: dict[str, Callable[[], object]], work: float, clock: Callable[[], float],
               rounds: int, window_s: float) -> dict[str, float]:
    """work / time for each contender: best window over `rounds` rounds, contenders alternating."""
    best = dict.fromkeys(contenders, 0.0)
    for fn in contenders.values():
        fn()  # warm caches and lazy initialisation
    for _ in range(rounds):
        for name, fn in contenders.items():
            calls, start = 0, clock()
            while (elapsed := clock() - start) < window_s or calls == 0:
                fn()
                calls += 1
            best[name] = max(best[name], work * calls / elapsed)
    return best


def matmul_integer(b: np.ndarray) -> ort.InferenceSession:
    """ONNX Runtime's MLAS u8 x s8 GEMM behind one MatMulInteger node, on one thread."""
    k, n = b.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "a_zero"], ["y"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["M", n])],
        [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.array(3, np.uint8), "a_zero")],
    )
    return session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString(), 1)


def session(model: bytes | str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def mlas_saturation() -> int:
    """Largest error of MLAS's u8 x s8 GEMM against exact integer arithmetic on inputs whose pair sums overflow
    int16: 0 on a VNNI kernel, large on MLAS's AVX2 kernel (vpmaddubsw saturates), so it names the kernel run."""
    rng = np.random.default_rng(3)
    b = rng.integers(-128, 128, (256, 64), dtype=np.int8)
    a = rng.integers(200, 256, (16, 256), dtype=np.uint8)
    y = matmul_integer(b).run(None, {"a": a})[0]
    return int(np.abs(y - (a.astype(np.int64) - 3) @ b.astype(np.int64)).max())


def median_rows(runs: list[list[dict]]) -> list[dict]:
    """Cell-wise medians of repeated GEMM tables (same shapes in the same order)."""
    return [{key: statistics.median(run[i][key] for run in runs) if key.endswith("_gops") else value
             for key, value in row.items()} for i, row in enumerate(runs[0])]


RATIOS = {"tidal / MLAS": ("tidal", "mlas"), "avx2 7-bit / MLAS 7-bit": ("avx2_7bit", "mlas_7bit"),
          "avx2 8-bit / MLAS": ("avx2_8bit", "mlas")}


def ratio_spread(runs: list[list[dict]], min_m: int = 16) -> list[str]:
    """Per ratio, over cells with M >= min_m: median of the cell medians and min-max over every run's cells."""
    lines = []
    for label, (num, den) in RATIOS.items():
        if f"{num}_gops" not in runs[0][0]:
            continue
        cells = [[run[i][f"{num}_gops"] / run[i][f"{den}_gops"] for run in runs]
                 for i, row in enumerate(runs[0]) if row["m"] >= min_m]
        medians, every = [statistics.median(c) for c in cells], [v for cell in cells for v in cell]
        lines.append(f"{label} {statistics.median(medians):.2f}x (cell medians {min(medians):.2f}-"
                     f"{max(medians):.2f}x, single runs {min(every):.2f}-{max(every):.2f}x)")
    return lines


def gemm_table(shapes: list[tuple[str, int, int]], ms: list[int], rounds: int, window_s: float) -> list[dict]:
    """Per shape: tidal on its best ISA, tidal's AVX2 paths forced (7-bit weights: vpmaddubsw; 8-bit: widened
    vpmaddwd), and MLAS on the same 8-bit and 7-bit weights."""
    rng = np.random.default_rng(0)
    avx2 = "avx2" in _kernels.isas()
    rows = []
    for mlp, k, n in shapes:
        b8 = rng.integers(-128, 128, (k, n), dtype=np.int8)
        b7 = rng.integers(-64, 65, (k, n), dtype=np.int8)  # what `tidal optimize` makes without VNNI
        packed = {"tidal": _kernels.PackedWeights(b8)}
        if avx2:
            packed |= {"avx2_7bit": _kernels.PackedWeights(b7, isa="avx2"),
                       "avx2_8bit": _kernels.PackedWeights(b8, isa="avx2")}
        mlas = {"mlas": matmul_integer(b8), "mlas_7bit": matmul_integer(b7)}
        for m in ms:
            a = rng.integers(0, 256, (m, k), dtype=np.uint8)
            contenders = {name: lambda a=a, w=w: _kernels.gemm_s32(a, w, 3, threads=1) for name, w in packed.items()}
            contenders |= {name: lambda a=a, s=s: s.run(None, {"a": a}) for name, s in mlas.items()}
            rates = best_rates(contenders, 2.0 * m * k * n / 1e9, time.thread_time, rounds, window_s)
            rows.append({"mlp": mlp, "m": m, "k": k, "n": n, **{f"{key}_gops": v for key, v in rates.items()}})
    return rows


class _Calibration(CalibrationDataReader):
    def __init__(self, k: int) -> None:
        rng = np.random.default_rng(1)
        self._data = iter([{"x": rng.standard_normal((64, k)).astype(np.float32)} for _ in range(8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._data, None)


def reference_models(workdir: Path) -> tuple[Path, Path]:
    """The reference MLP in fp32 and its ORT static QDQ form (u8 activations, per-channel s8 weights)."""
    rng = np.random.default_rng(0)
    dims, nodes, inits, x = REFERENCE_MLP, [], [], "x"
    for i, (k, n) in enumerate(itertools.pairwise(dims)):
        inits += [numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"])]
        x = f"y{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    graph = helper.make_graph(nodes, "reference_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dims[0]])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", dims[-1]])], inits)
    fp32, qdq = workdir / "fp32.onnx", workdir / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    quantize_static(str(fp32), str(qdq), _Calibration(dims[0]), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return fp32, qdq


def end_to_end(fp32: Path, qdq: Path, threads: int, clock: Callable[[], float], batches: list[int],
               rounds: int, window_s: float) -> dict:
    backend = int8.load(qdq, BackendOptions(intra_op_threads=threads))
    out = backend.outputs()[0].name
    ort_int8, ort_fp32 = session(str(qdq), threads), session(str(fp32), threads)
    rng = np.random.default_rng(2)
    table = []
    for batch in batches:
        x = rng.standard_normal((batch, REFERENCE_MLP[0])).astype(np.float32)
        rates = best_rates({"tidal_int8": lambda x=x: backend.run({"x": x}, [out]),
                            "ort_int8": lambda x=x: ort_int8.run(None, {"x": x}),
                            "ort_fp32": lambda x=x: ort_fp32.run(None, {"x": x})},
                           float(batch), clock, rounds, window_s)
        table.append({"batch": batch, **{f"{key}_rows_s": v for key, v in rates.items()}})
    x1 = rng.standard_normal((1, REFERENCE_MLP[0])).astype(np.float32)
    latency = batch1_latency({"tidal_int8": lambda: backend.run({"x": x1}, [out]),
                              "ort_int8": lambda: ort_int8.run(None, {"x": x1}),
                              "ort_fp32": lambda: ort_fp32.run(None, {"x": x1})})
    return {"threads": threads, "throughput": table, "batch1_latency_us": latency}


def batch1_latency(contenders: dict[str, Callable[[], object]], blocks: int = 40,
                   per_block: int = 100) -> dict[str, dict[str, float]]:
    """Wall-clock time of single-row calls, contenders alternating in blocks."""
    clock = time.perf_counter
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(blocks):
        for name, fn in contenders.items():
            for _ in range(per_block):
                start = clock()
                fn()
                samples[name].append(clock() - start)
    return {name: {"p50": float(np.percentile(v, 50) * 1e6), "p99": float(np.percentile(v, 99) * 1e6)}
            for name, v in samples.items()}


def _host(m: dict) -> str:
    return f"{m['cpu']}, {m['cores']} cores, ISA flags `{' '.join(m['flags'])}`"


def masked_host(m: dict) -> str:
    if not m.get("hidden"):
        return ""
    return (f" Run under `perf/isa_mask.py --hide {m['hidden']}`: CPUID and /proc/cpuinfo hide those extensions "
            f"from tidal's kernels, tidal's hardware detection and MLAS alike (host's own flags `{m['host_flags']}`). "
            "This emulates the ISA of such a host, not its microarchitecture: the AVX2 instructions run on this "
            "core's units at this core's speed.")


def markdown(result: dict) -> str:
    m = result["machine"]
    avx2_insns = "vpmaddubsw + vpmaddwd + vpaddd"
    peaks = f"**{result['avx2_peak_gops']:.0f} GOPS** on `avx2` ({avx2_insns})"
    if m["isa"] != "avx2":
        peaks = f"**{result['peak_gops']:.0f} GOPS** on `{m['isa']}` (vpdpbusd), {peaks}"
    repeat = f"median of {result['repeat']} runs per cell" if result["repeat"] > 1 else "one run"
    lines = [
        "## INT8 kernels", "",
        f"One run of `perf/bench_int8.py` on {_host(m)}; kernels `{m['isa']}` by default, ONNX Runtime "
        f"{m['onnxruntime']}.{masked_host(m)} Peak of one core, measured in the same run with a register-only loop "
        f"of each ISA's multiply-add: {peaks}. Other work on "
        f"the machine: 1-minute load average {m['load_before']:.1f} at the start, {m['load_after']:.1f} at the end.",
        "", f"### GEMM, one thread (u8 x s8 -> s32, GOPS per core, {repeat}; {_host(m)})", "",
        f"MLAS runs whatever its CPUID dispatch picks here; its largest error against exact integer arithmetic on "
        f"inputs whose int16 pair sums overflow: {result['mlas_saturation']} (0 on its VNNI kernels, large on its "
        f"AVX2 kernel, which saturates).", "",
        "| MLP | K x N | M | tidal | % of peak | MLAS | tidal / MLAS | avx2 7-bit | / MLAS 7-bit | "
        "avx2 8-bit | / MLAS | 8-bit / 7-bit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in median_rows(result["gemm_runs"]):
        row = (f"| {r['mlp']} | {r['k']} x {r['n']} | {r['m']} | {r['tidal_gops']:.0f} | "
               f"{100 * r['tidal_gops'] / result['peak_gops']:.0f}% | {r['mlas_gops']:.0f} | "
               f"{r['tidal_gops'] / r['mlas_gops']:.2f}x |")
        if "avx2_7bit_gops" in r:
            row += (f" {r['avx2_7bit_gops']:.0f} | {r['avx2_7bit_gops'] / r['mlas_7bit_gops']:.2f}x | "
                    f"{r['avx2_8bit_gops']:.0f} | {r['avx2_8bit_gops'] / r['mlas_gops']:.2f}x | "
                    f"{r['avx2_8bit_gops'] / r['avx2_7bit_gops']:.2f} |")
        else:
            row += " - | - | - | - | - |"
        lines.append(row)
    lines += ["", f"At M >= 16 ({repeat}): " + "; ".join(ratio_spread(result["gemm_runs"])) + "."]
    for run in result["end_to_end"]:
        unit = "rows/s per core (thread CPU time)" if run["threads"] == 1 else "rows/s (wall clock)"
        lines += ["", f"### Reference MLP 256-1024-1024-10, {run['threads']} thread(s), {unit}; {_host(m)}", "",
                  "| batch | tidal int8 | ORT int8 (QDQ) | ORT fp32 | vs ORT int8 | vs ORT fp32 |",
                  "|---|---|---|---|---|---|"]
        for r in run["throughput"]:
            lines.append(f"| {r['batch']} | {r['tidal_int8_rows_s']:,.0f} | {r['ort_int8_rows_s']:,.0f} | "
                         f"{r['ort_fp32_rows_s']:,.0f} | {r['tidal_int8_rows_s'] / r['ort_int8_rows_s']:.2f}x | "
                         f"{r['tidal_int8_rows_s'] / r['ort_fp32_rows_s']:.2f}x |")
        names = ("tidal_int8", "ort_int8", "ort_fp32")
        best = {key: max(r[f"{key}_rows_s"] for r in run["throughput"]) for key in names}
        lat = {key: "{p50:.1f} / {p99:.1f}".format(**run["batch1_latency_us"][key]) for key in names}
        lines += ["", f"Best batch: tidal int8 {best['tidal_int8']:,.0f} rows/s = "
                  f"{best['tidal_int8'] / best['ort_int8']:.2f}x ORT int8 (best {best['ort_int8']:,.0f}), "
                  f"{best['tidal_int8'] / best['ort_fp32']:.2f}x ORT fp32 (best {best['ort_fp32']:,.0f}). "
                  f"Batch-1 latency, wall clock, p50 / p99 (us): tidal {lat['tidal_int8']}, "
                  f"ORT int8 {lat['ort_int8']}, ORT fp32 {lat['ort_fp32']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and shorter windows")
    parser.add_argument("--json", type=Path, default=Path("perf/out/int8.json"))
    parser.add_argument("--repeat", type=int, default=1, help="measure the GEMM table this many times")
    parser.add_argument("--hide-isa", metavar="GROUPS",
                        help=f"re-run as on a host without these ISA groups ({', '.join(isa_mask.GROUPS)})")
    parser.add_argument("--host-flags", help=argparse.SUPPRESS)  # set by the --hide-isa parent for its child
    args = parser.parse_args()
    if args.hide_isa and args.host_flags is None:
        child = [sys.executable, __file__, *sys.argv[1:], "--host-flags", " ".join(cpu_info().isa_flags)]
        try:
            raise SystemExit(isa_mask.run(args.hide_isa, child))
        except ValueError as exc:
            parser.error(str(exc))
    rounds, window_s = (3, 0.02) if args.quick else (8, 0.05)
    cpu = cpu_info()
    isa = _kernels.best_isa()
    result: dict = {"machine": {"cpu": cpu.model, "cores": cpu.cores, "flags": list(cpu.isa_flags), "isa": isa,
                                "onnxruntime": ort.__version__, "load_before": os.getloadavg()[0],
                                "hidden": args.hide_isa, "host_flags": args.host_flags}, "repeat": args.repeat}
    if isa == "scalar":
        raise SystemExit("bench_int8: this CPU runs none of the SIMD kernels (no AVX2)")
    result["peak_gops"] = max(_kernels.peak_gops(isa, 0.2) for _ in range(5))  # the ISA in use, never nan
    result["avx2_peak_gops"] = max(_kernels.peak_gops("avx2", 0.2) for _ in range(5))
    shapes = [("reference", k, n) for k, n in itertools.pairwise(REFERENCE_MLP)]
    shapes += [("wide", k, n) for k, n in itertools.pairwise(WIDE_MLP)]
    result["mlas_saturation"] = mlas_saturation()
    result["gemm_runs"] = [gemm_table(shapes[:2] if args.quick else shapes, GEMM_M, rounds, window_s)
                           for _ in range(args.repeat)]
    batches = [1, 32, 256] if args.quick else BATCHES
    with tempfile.TemporaryDirectory() as tmp:
        fp32, qdq = reference_models(Path(tmp))
        result["end_to_end"] = [
            end_to_end(fp32, qdq, 1, time.thread_time, batches, rounds, window_s),
            end_to_end(fp32, qdq, cpu.cores, time.perf_counter, batches, rounds, window_s),
        ]
    result["machine"]["load_after"] = os.getloadavg()[0]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
