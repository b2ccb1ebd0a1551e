"""What an AVX2-only host (no AVX-512, no VNNI) sees, emulated on this one by perf/isa_mask.py: CPUID and
/proc/cpuinfo hide those extensions, so tidal's kernels, its hardware detection and ONNX Runtime's MLAS all
dispatch as they would there. Runs in a subprocess (the mask is a preload); skips where the kernel offers no
CPUID faulting or no C compiler builds the preload."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tidal.backends import hardware

ROOT = Path(__file__).resolve().parents[2]
CANNOT = 77  # perf/isa_mask.py: this host cannot hide ISA extensions

# Run under the mask; argv[1] is a scratch folder.
_UNDER_MASK = """
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mlp_qdq import mlp, quantize
from tidal import _kernels
from tidal.backends import hardware
from tidal.optimize import choose
from tidal.optimize.build import BuildSettings
from tidal.optimize.profile import current_hardware
from tidal.repository.variants import LatencyProfile

cpu = hardware.cpu_info()
assert cpu.has_avx2 and not cpu.has_vnni, cpu.flags
assert not any(f.startswith("avx512") for f in cpu.flags), cpu.flags
assert _kernels.isas() == ["avx2", "scalar"] and _kernels.best_isa() == cpu.best_int8_isa() == "avx2"
assert BuildSettings().seven_bit_weights()  # `tidal optimize` makes 7-bit weights on this host

# Pair sums beyond int16: tidal's 8-bit AVX2 path is exact, MLAS's AVX2 kernel saturates.
rng = np.random.default_rng(0)
b = rng.integers(-128, 128, (256, 64), dtype=np.int8)
a = rng.integers(200, 256, (16, 256), dtype=np.uint8)
exact = a.astype(np.int64) @ b.astype(np.int64)
assert np.array_equal(_kernels.gemm_s32(a, _kernels.PackedWeights(b), 0), exact)
graph = helper.make_graph(
    [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "gemm",
    [helper.make_tensor_value_info("a", TensorProto.UINT8, ["M", 256])],
    [helper.make_tensor_value_info("y", TensorProto.INT32, ["M", 64])], [numpy_helper.from_array(b, "b")])
mlas = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString(),
                            providers=["CPUExecutionProvider"])
assert np.abs(mlas.run(None, {"a": a})[0] - exact).max() > 1000

# The serving choice: ONNX Runtime claims to be 3x faster, yet the exact backend serves.
qdq = quantize(mlp([64, 128, 8]), Path(sys.argv[1]))
profile = lambda p50: LatencyProfile((1, 4), (p50, p50), (p50, p50), (1.0, 1.0), 1, 1, False,
                                     "2026-01-01T00:00:00+00:00", current_hardware())
order, choice = choose.choose(qdq, {"int8": profile(0.3), "onnxruntime": profile(0.1)}, choose.synthetic_feeds(qdq, 64))
assert order == ("int8",), choice.reason
assert choice.measured["int8"].max_error_steps <= 1 < choice.measured["onnxruntime"].max_error_steps, choice.reason
"""


def test_an_avx2_only_host_gets_exact_kernels(tmp_path: Path) -> None:
    if not hardware.cpu_info().has_avx2:
        pytest.skip("this CPU lacks AVX2: hiding extensions cannot emulate an AVX2 host")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "perf" / "isa_mask.py"), "--hide", "avx512,vnni", "--",
         sys.executable, "-X", "faulthandler", "-c", _UNDER_MASK, str(tmp_path)],  # its SIGSEGV handler chained
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent,
    )  # fmt: skip
    if proc.returncode == CANNOT:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
