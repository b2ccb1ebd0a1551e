"""Checks tidal's CUDA int8 GEMM against numpy and times it against torch._int_mm, on a machine with a GPU.

    .venv/bin/python perf/gpu_int8_check.py [--iters 50]

Needs tidal built with a CUDA toolkit (tidal._kernels.HAS_CUDA), a visible GPU and PyTorch with CUDA
(device tensors reach the kernel through DLPack; torch._int_mm is the cuBLASLt int8 baseline). Every
result is compared exactly with an int64 numpy product; exits 1 on any mismatch, 2 when it cannot run.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from tidal import _kernels

# (M, K, N): batch-1 and batched shapes of the reference and wide MLPs, a large square one, and ragged
# edges (M and N not multiples of the 64 x 64 block tile; K a multiple of 4 but not of 32).
SHAPES = [
    (1, 256, 1024), (32, 1024, 1024), (256, 1024, 4096), (256, 4096, 4096), (4096, 4096, 4096),
    (33, 100, 77), (130, 36, 250),
]


def _time_ms(torch, fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / iters


def _int_mm_ms(torch, a, bt, iters: int) -> float | None:
    """torch._int_mm has shape limits (M > 16, K and N multiples of 8); None where it refuses."""
    try:
        return _time_ms(torch, lambda: torch._int_mm(a, bt.t()), iters)
    except RuntimeError:
        return None


def check(torch, m: int, k: int, n: int, algo: str, iters: int) -> tuple[bool, float, float | None]:
    gen = torch.Generator(device="cuda").manual_seed(m * 7919 + k * 31 + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda", generator=gen)
    bt = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda", generator=gen)
    out = torch.empty((m, n), dtype=torch.int32, device="cuda")
    _kernels.cuda_gemm_s8(a, bt, out, algo)
    torch.cuda.synchronize()
    expected = a.cpu().numpy().astype(np.int64) @ bt.cpu().numpy().astype(np.int64).T
    exact = bool(np.array_equal(out.cpu().numpy(), expected))
    ours = _time_ms(torch, lambda: _kernels.cuda_gemm_s8(a, bt, out, algo), iters)
    return exact, ours, _int_mm_ms(torch, a, bt, iters)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not _kernels.HAS_CUDA:
        print("tidal._kernels was built without CUDA (no nvcc at build time)")
        return 2
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed; it supplies device tensors and the torch._int_mm baseline")
        return 2
    sm = _kernels.cuda_device_sm()
    if not torch.cuda.is_available() or sm == 0:
        print("no usable CUDA device")
        return 2
    algos = ["dp4a", "mma"] if sm >= 80 else ["dp4a"]
    print(f"{torch.cuda.get_device_name()} (sm_{sm}), torch {torch.__version__}")
    print("| algo | M | K | N | exact | tidal ms | tidal TOPS | torch._int_mm ms | tidal speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    failures = 0
    for algo in algos:
        for m, k, n in SHAPES:
            exact, ours, theirs = check(torch, m, k, n, algo, args.iters)
            failures += not exact
            tops = 2.0 * m * k * n / (ours * 1e-3) / 1e12
            versus = f"{theirs:.4f} | {theirs / ours:.2f}x" if theirs else "n/a | n/a"
            print(f"| {algo} | {m} | {k} | {n} | {'yes' if exact else 'NO'} | {ours:.4f} | {tops:.1f} | {versus} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
