"""Checks tidal's CUDA int8 GEMM for exactness and times it against torch._int_mm (cuBLASLt int8), on a GPU.

    python -u perf/gpu_int8_check.py [--iters 20] [--md OUT.md]

The timed shapes are perf/bench_int8.py's: every layer of the reference MLP (256-1024-1024-10) and the wide
one (1024-4096-4096-1024) at each of its batch sizes M, read from that file so the two cannot drift apart.
A large square product and two ragged shapes (M and N not multiples of the 64 x 64 tile, K a multiple of 4
but not of 32) are checked and timed too, outside the target. Target (the issue's): tidal >= 0.5x the speed
of torch._int_mm on every bench shape with M >= 16 that torch._int_mm accepts, for the algorithm the `int8`
backend uses by default here (mma on sm_80+, else dp4a). torch._int_mm refuses some shapes (M <= 16 on
some versions, K or N not a multiple of 8): those rows say "no baseline" and do not count.

Exactness: every product is compared in full with a float64 product on the GPU (exact, since every partial
sum is an integer far below 2^53), and on sampled rows and columns (first, last and random ones; all of them
for small shapes) with an int64 product on the host, which does not rely on the GPU at all. A full int64
product on the host would take minutes for the large shapes (numpy's integer matmul runs at about 1 GMAC/s).

Timing: both contenders are captured in CUDA graphs of `--iters` launches and replayed, so the figures are
GPU time without Python launch overhead (small shapes would otherwise compare launch costs); where capture
fails both are timed eagerly instead, and the row says so. Best of 3 replays.

Needs tidal built with a CUDA toolkit (tidal._kernels.HAS_CUDA), a visible GPU and PyTorch with CUDA.
Exits 1 on any mismatch, 2 when it cannot run; a missed target is reported, not an error.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from tidal import _kernels

# perf/bench_int8.py's values, used only when that file cannot be read (it imports ONNX Runtime's quantizer
# and the ISA mask, so it is parsed, not imported).
BENCH = Path(__file__).with_name("bench_int8.py")
_FALLBACK = {"REFERENCE_MLP": [256, 1024, 1024, 10], "WIDE_MLP": [1024, 4096, 4096, 1024],
             "GEMM_M": [1, 4, 16, 64, 256]}
# Outside the target: peak throughput on a large square product, and ragged edges for exactness.
EXTRA_SHAPES = [("square", 4096, 4096, 4096), ("ragged", 33, 100, 77), ("ragged", 130, 36, 250)]
TARGET_RATIO, TARGET_MIN_M = 0.5, 16
FULL_HOST_CHECK_MACS = 1 << 24  # below this the int64 host product is a fraction of a second: check all of it
SAMPLES = 6  # rows and columns per sampled host check, besides the first and the last


@dataclass
class Row:
    group: str
    m: int
    k: int
    n: int
    algo: str
    exact: str  # "yes", or what disagreed
    ours_ms: float
    theirs_ms: float | None
    baseline_note: str  # why there is no baseline, or "" when there is one
    mode: str  # "graph" or "eager"

    @property
    def ratio(self) -> float | None:
        return self.theirs_ms / self.ours_ms if self.theirs_ms else None

    @property
    def in_target(self) -> bool:
        return self.group in ("reference", "wide") and self.m >= TARGET_MIN_M and self.ratio is not None


def bench_shapes(bench: Path = BENCH) -> list[tuple[str, int, int, int]]:
    """(group, M, K, N) of every GEMM perf/bench_int8.py measures."""
    values = dict(_FALLBACK)
    try:
        for node in ast.parse(bench.read_text()).body:
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
            if isinstance(target, ast.Name) and target.id in values:
                values[target.id] = ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError) as exc:
        print(f"note: could not read {bench} ({exc}); using its shapes as of this script's writing")
    return [(group, m, k, n)
            for group, dims in (("reference", values["REFERENCE_MLP"]), ("wide", values["WIDE_MLP"]))
            for k, n in itertools.pairwise(dims) for m in values["GEMM_M"]]


class HostReference:
    """Exact int64 products on the host, computed once per shape: all of them for small shapes, else whole rows
    and whole columns (the first, the last and random ones), which cross every tile row and tile column."""

    def __init__(self, a: np.ndarray, bt: np.ndarray, rng: np.random.Generator) -> None:
        (m, k), n = a.shape, bt.shape[0]
        a64, bt64 = a.astype(np.int64), bt.astype(np.int64)
        if m * k * n <= FULL_HOST_CHECK_MACS:
            self.rows, self.cols = np.arange(m), np.arange(0)
            self.by_row = a64 @ bt64.T
        else:
            self.rows = np.unique(np.concatenate([[0, m - 1], rng.integers(0, m, SAMPLES)]))
            self.cols = np.unique(np.concatenate([[0, n - 1], rng.integers(0, n, SAMPLES)]))
            self.by_row = a64[self.rows] @ bt64.T
        self.by_col = a64 @ bt64[self.cols].T

    def matches(self, out: np.ndarray) -> bool:
        return bool(np.array_equal(out[self.rows], self.by_row) and np.array_equal(out[:, self.cols], self.by_col))


def _replay_ms(torch: Any, fn: Callable[[], object], iters: int, graph: bool) -> float:
    """GPU milliseconds per call of `fn`, best of 3: a CUDA graph of `iters` calls replayed, or eager calls."""
    for _ in range(3):  # lazy initialisation (cuBLASLt handles, workspaces) must not happen during capture
        fn()
    torch.cuda.synchronize()
    run: Callable[[], object]
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                fn()
        run, per_run = g.replay, iters
    else:
        def run() -> None:
            for _ in range(iters):
                fn()
        per_run = iters
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        run()
        stop.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(stop) / per_run)
    return best


def measure(torch: Any, group: str, m: int, k: int, n: int, algos: list[str], iters: int) -> list[Row]:
    gen = torch.Generator(device="cuda").manual_seed(m * 7919 + k * 31 + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda", generator=gen)
    bt = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda", generator=gen)
    host = HostReference(a.cpu().numpy(), bt.cpu().numpy(), np.random.default_rng(m + k + n))
    full = (a.double() @ bt.double().T).to(torch.int32)  # exact: |sums| <= 128 * 128 * K, far below 2^53
    out = torch.empty((m, n), dtype=torch.int32, device="cuda")
    stream = torch.cuda.current_stream

    def ours(algo: str) -> Callable[[], None]:
        # The raw-pointer entry point the `int8` backend calls, on torch's current stream (captured in a graph).
        return lambda: _kernels.cuda_gemm_s8_ptr(a.data_ptr(), bt.data_ptr(), out.data_ptr(), m, n, k, algo,
                                                 stream().cuda_stream)

    def theirs() -> object:
        return torch._int_mm(a, bt.t())  # bt.t(): column-major K x N, cuBLASLt's fast int8 layout

    baseline_note = ""
    try:
        theirs()
    except RuntimeError as exc:  # shape limits of torch._int_mm / cuBLASLt
        baseline_note = f"no baseline: torch._int_mm refused ({str(exc).splitlines()[0][:80]})"
    rows = []
    for algo in algos:
        out.fill_(0)
        _kernels.cuda_gemm_s8(a, bt, out, algo)  # the DLPack entry point (legacy default stream), checked once
        torch.cuda.synchronize()
        dlpack_ok = bool(torch.equal(out, full))
        out.fill_(0)
        ours(algo)()
        torch.cuda.synchronize()
        checks = {
            "DLPack call vs float64": dlpack_ok,
            "vs float64": bool(torch.equal(out, full)),
            "vs int64 on the host": host.matches(out.cpu().numpy()),
        }
        wrong = [what for what, ok in checks.items() if not ok]
        mode, theirs_ms = "graph", None
        try:
            ours_ms = _replay_ms(torch, ours(algo), iters, graph=True)
            if not baseline_note:
                theirs_ms = _replay_ms(torch, theirs, iters, graph=True)
        except RuntimeError:  # capture refused: time both the same (eager) way
            mode = "eager"
            ours_ms = _replay_ms(torch, ours(algo), iters, graph=False)
            theirs_ms = None if baseline_note else _replay_ms(torch, theirs, iters, graph=False)
        rows.append(Row(group, m, k, n, algo, "NO: " + ", ".join(wrong) if wrong else "yes", ours_ms, theirs_ms,
                        baseline_note, mode))
    return rows


def markdown_row(r: Row) -> str:
    tops = 2.0 * r.m * r.k * r.n / (r.ours_ms * 1e-3) / 1e12
    versus = (f"{r.theirs_ms:.4f} | {r.ratio:.2f}x" if r.ratio is not None else f"- | {r.baseline_note or '-'}")
    return (f"| {r.group} | {r.algo} | {r.m} | {r.k} | {r.n} | {r.exact} | {r.ours_ms:.4f} | {tops:.1f} | "
            f"{versus} | {r.mode} |")


def verdict(rows: list[Row], algo: str) -> str:
    """The target line for one algorithm: every bench shape with M >= 16 and a baseline at >= 0.5x."""
    counted = [r for r in rows if r.algo == algo and r.in_target]
    skipped = [r for r in rows if r.algo == algo and r.group in ("reference", "wide") and r.m >= TARGET_MIN_M
               and r.ratio is None]
    no_base = ""
    if skipped:
        no_base = f"; no baseline for {len(skipped)} shape(s): " + ", ".join(f"{r.m}x{r.k}x{r.n}" for r in skipped)
    if not counted:
        return f"INT8 TARGET ({algo}): NOT MEASURED (no bench shape with M >= {TARGET_MIN_M} had a baseline{no_base})"
    worst = min(counted, key=lambda r: r.ratio or 0.0)
    ratios = [r.ratio or 0.0 for r in counted]
    ok = min(ratios) >= TARGET_RATIO
    return (f"INT8 TARGET ({algo}, >= {TARGET_RATIO}x torch._int_mm at M >= {TARGET_MIN_M}): "
            f"{'PASS' if ok else 'FAIL'}: min {min(ratios):.2f}x ({worst.group} {worst.m}x{worst.k}x{worst.n}), "
            f"median {statistics.median(ratios):.2f}x over {len(counted)} shapes{no_base}")


class Report:
    """Prints each line and appends it to the markdown file at once, so a run stopped midway leaves its rows."""

    def __init__(self, path: Path | None) -> None:
        self._file: TextIO | None = path.open("w") if path else None

    def line(self, text: str) -> None:
        print(text, flush=True)
        if self._file:
            self._file.write(text + "\n")
            self._file.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20, help="launches per timed CUDA graph")
    parser.add_argument("--md", type=Path, help="also write the table and the verdict here, row by row")
    args = parser.parse_args()
    out = Report(args.md)
    if not _kernels.HAS_CUDA:
        out.line("not run: tidal._kernels was built without CUDA (no nvcc at build time)")
        return 2
    try:
        import torch
    except ImportError:
        out.line("not run: PyTorch is not installed; it supplies device tensors and the torch._int_mm baseline")
        return 2
    sm = _kernels.cuda_device_sm()
    if not torch.cuda.is_available() or sm == 0:
        out.line("not run: no usable CUDA device (torch.cuda.is_available() false or tidal sees sm 0)")
        return 2
    default = "mma" if sm >= 80 else "dp4a"  # what the `int8` backend runs unless `cuda_algo` says otherwise
    algos = [default, *(["dp4a"] if default == "mma" else [])]
    out.line(f"{torch.cuda.get_device_name()} (sm_{sm}), torch {torch.__version__} (CUDA {torch.version.cuda}); "
             f"GPU time per call, best of 3 replays of {args.iters} launches")
    out.line("")
    out.line("| shapes | algo | M | K | N | exact | tidal ms | tidal TOPS | torch._int_mm ms | tidal / torch |"
             " timing |")
    out.line("|---|---|---|---|---|---|---|---|---|---|---|")
    rows: list[Row] = []
    errors = 0
    for group, m, k, n in [*bench_shapes(), *EXTRA_SHAPES]:
        try:
            measured = measure(torch, group, m, k, n, algos, args.iters)
        except Exception as exc:  # one shape's failure (a CUDA error, a refused capture) must not lose the rest
            errors += 1
            out.line(f"| {group} | - | {m} | {k} | {n} | ERROR: {type(exc).__name__}: {str(exc)[:150]} |"
                     " | | | | |")
            continue
        for row in measured:
            rows.append(row)
            out.line(markdown_row(row))
    out.line("")
    for algo in algos:
        out.line(verdict(rows, algo) + (" (the backend's default)" if algo == default else ""))
    mismatches = [r for r in rows if r.exact != "yes"]
    out.line(f"EXACT: {'all products exact' if not mismatches else f'{len(mismatches)} MISMATCH(ES)'}"
             + (f"; {errors} shape(s) failed to run (ERROR rows)" if errors else ""))
    return 1 if mismatches or errors else 0


if __name__ == "__main__":
    sys.exit(main())
