"""Small float MLPs, their QDQ-quantized forms (made the way `tidal optimize` makes them, ORT static QDQ), and
the exact reference the int8 kernels are judged against."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static


def mlp(dims: list[int], *, gemm: bool = False, leading: tuple[str, ...] = ("N",), seed: int = 0) -> onnx.ModelProto:
    """Linear layers with ReLU between them: MatMul+Add, or Gemm with transB=1 as torch exports Linear."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i, (k, n) in enumerate(itertools.pairwise(dims)):
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        b = (rng.standard_normal(n) * 0.1).astype(np.float32)
        if gemm:
            inits += [numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"y{i}"], name=f"fc{i}", transB=1))
        else:
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"matmul{i}"))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"], name=f"add{i}"))
        x = f"y{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*leading, dims[0]])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [*leading, dims[-1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class _Calibration(CalibrationDataReader):
    def __init__(self, input_shape: tuple[int, ...], seed: int) -> None:
        rng = np.random.default_rng(seed)
        self._batches = iter([{"x": rng.standard_normal(input_shape).astype(np.float32)} for _ in range(4)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize(model: onnx.ModelProto, out_dir: Path, *, signed: bool = False, per_channel: bool = True,
             calibration_shape: tuple[int, ...] | None = None, seed: int = 0) -> Path:
    """Writes the float model and its QDQ form (int8 weights; u8 or s8 activations); returns the QDQ path."""
    fp32 = out_dir / "fp32.onnx"
    qdq = out_dir / "qdq.onnx"
    onnx.save(model, fp32)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    shape = calibration_shape or (16, dims[-1])
    quantize_static(
        str(fp32), str(qdq), _Calibration(shape, seed), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8 if signed else QuantType.QUInt8, weight_type=QuantType.QInt8,
        per_channel=per_channel,
    )
    return qdq


def exact_reference(path: Path) -> ort.InferenceSession:
    """ONNX Runtime with every graph optimization off: each DequantizeLinear -> float MatMul -> QuantizeLinear
    runs as written. The optimized session fuses them into MLAS's int8 GEMM, whose AVX2 u8 x s8 path (hosts
    without VNNI) saturates its int16 pair sums, so it is no oracle on such hosts."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
