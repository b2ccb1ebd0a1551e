"""Precision variants: offline-optimized fp32, static and dynamic INT8, fp16.

The fp32 variant gets ONNX Runtime's *basic* graph optimizations (constant
folding, redundant-node removal, MatMul+Add -> Gemm) saved to disk. Higher
levels write ONNX Runtime-only fused ops and layouts tied to this CPU, which
would make model.onnx unreadable for other backends; the serving backend
applies them itself at load time.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from tidal.errors import ConfigError
from tidal.optimize.data import Dataset
from tidal.optimize.graph import save_model

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
_CALIBRATION_BATCH = 64
_MATMUL_OPS = frozenset({"MatMul", "Gemm"})
_CONV_OPS = frozenset({"Conv", "ConvTranspose"})


def optimize_fp32(src: Path, dst: Path) -> None:
    """Write `src` with ONNX Runtime's basic graph optimizations applied (see module doc)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own exception types
        raise ConfigError(f"{src}: ONNX Runtime cannot load it: {exc}") from exc
    save_model(onnx.load(str(dst)), dst)


class _Batches(CalibrationDataReader):
    """Feeds calibration rows in batches, the way the served model sees them."""

    def __init__(self, data: Dataset) -> None:
        self._iter = self._batches(data)

    @staticmethod
    def _batches(data: Dataset) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, data.rows, _CALIBRATION_BATCH):
            yield {k: v[start : start + _CALIBRATION_BATCH] for k, v in data.feeds.items()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)


def quantize_int8_static(
    src: Path,
    dst: Path,
    calibration: Dataset,
    method: str = "minmax",
    reduce_range: bool = False,
    symmetric: bool = False,
) -> None:
    """Static INT8 in QDQ format, S8S8, per-channel weights, calibrated on `calibration`.

    S8S8 is ONNX Runtime's recommended QDQ default; ReLU is folded into the
    activation ranges. `reduce_range` makes 7-bit weights (|w| <= 64): no
    u8 x s8 pair sum can then saturate int16, so ONNX Runtime's AVX2 kernels
    are exact and tidal's run their fast one-instruction path (see kernels/).
    `symmetric` makes what TensorRT's explicit quantization takes: every zero
    point 0 (activations too, so a ReLU output uses half the int8 range) and
    biases left in float, where TensorRT refuses int32 ones.
    """
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"unknown calibration method '{method}' (known: {', '.join(CALIBRATION_METHODS)})")
    with tempfile.TemporaryDirectory(prefix="tidal-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        _quiet(quant_pre_process, str(src), str(prepared), skip_symbolic_shape=True)
        _quiet(
            quantize_static,
            str(prepared),
            str(dst),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=reduce_range,
            calibrate_method=CALIBRATION_METHODS[method],
            extra_options={"ActivationSymmetric": True, "QuantizeBias": False} if symmetric else {},
        )
    save_model(onnx.load(str(dst)), dst)


def suits_dynamic(model: onnx.ModelProto) -> bool:
    """Dynamic quantization pays off on MatMul-heavy graphs; on convolutions it is slower than fp32."""
    ops = {n.op_type for n in model.graph.node}
    return bool(ops & _MATMUL_OPS) and not ops & _CONV_OPS


def quantize_int8_dynamic(src: Path, dst: Path, reduce_range: bool = False) -> None:
    """INT8 weights, activations quantized per batch at run time: no calibration needed.

    ONNX Runtime runs it as u8 x s8 MatMulInteger, whose AVX2 kernel saturates without `reduce_range`.
    """
    _quiet(
        quantize_dynamic, str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False, reduce_range=reduce_range
    )
    save_model(onnx.load(str(dst)), dst)


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Half-precision weights and compute, with fp32 inputs and outputs kept (Cast at the edges).

    The served model's config stays the same, so clients never notice which
    precision the active variant runs in.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for node in graph.node:
        _node_to_fp16(node)
    del graph.value_info[:]
    edge_nodes = []
    for value in graph.input:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            edge_nodes.append(helper.make_node("Cast", [value.name], [value.name + ".fp16"], to=TensorProto.FLOAT16))
            _rename_uses(graph, value.name, value.name + ".fp16")
    for value in graph.output:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            _rename_producer(graph, value.name, value.name + ".fp16")
            graph.node.append(helper.make_node("Cast", [value.name + ".fp16"], [value.name], to=TensorProto.FLOAT))
    for i, node in enumerate(edge_nodes):
        graph.node.insert(i, node)
    onnx.checker.check_model(out)
    return out


def _node_to_fp16(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
            attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _rename_producer(graph: onnx.GraphProto, old: str, new: str) -> None:
    _rename_uses(graph, old, new)
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new


def _quiet(fn: Callable[..., object], *args: object, **kwargs: object) -> None:
    """onnxruntime.quantization logs advice at WARNING on the root logger; keep the CLI output readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        fn(*args, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # the quantizer raises bare exceptions on graphs it cannot handle
        raise ConfigError(f"quantization failed: {exc}") from exc
    finally:
        root.setLevel(level)
