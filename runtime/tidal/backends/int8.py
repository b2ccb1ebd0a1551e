"""The `int8` backend: QDQ-quantized MLPs on tidal's own u8 x s8 kernels.

It runs graphs that are a single chain of QuantizeLinear/DequantizeLinear
around MatMul or Gemm with constant DQ'd weights, Add of a constant bias and
Relu (what ONNX Runtime's static QDQ quantizer makes of an MLP). At load the
chain is compiled into one native `Chain`: every MatMul/Gemm becomes a GEMM
on weights packed once, whose epilogue applies each rounding point of the
graph in order (the QuantizeLinear after the product, the bias, ReLU, the
QuantizeLinear feeding the next layer), so results follow the graph rather
than a fused approximation of it; a batch then runs in one call with the GIL
released. Any other graph is refused at load with Int8Unsupported naming the
node, so the repository can fall back to ONNX Runtime.

Signed activations are shifted into u8 (x + 128, zero point + 128), so every
layer runs the same u8 x s8 product. Options: `intra_op_threads` caps the
kernel threads (0: all cores); `parameters["isa"]` forces a kernel path
(avx512_vnni, avx_vnni, avx2 or scalar) instead of the best one this CPU runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from tidal.backends.base import BackendOptions
from tidal.errors import BackendError, ConfigError, InvalidArgument, Unimplemented
from tidal.types import DataType, TensorSpec

_SUPPORTED = "MatMul, Gemm, Add (constant bias), Relu, QuantizeLinear, DequantizeLinear"


class Int8Unsupported(Unimplemented):
    """The model (or this CPU) is outside what the int8 kernels run; serve it with ONNX Runtime instead."""


@dataclass(frozen=True, slots=True)
class _Quant:
    """Per-tensor 8-bit quantization, zero point already in the u8 domain."""

    scale: float
    zero_point: int
    signed: bool


@dataclass(frozen=True, slots=True)
class _Token:
    """One node of the chain, reduced to what the epilogue needs."""

    kind: str  # q | dq | gemm | add | relu
    node: onnx.NodeProto
    quant: _Quant | None = None
    weights: np.ndarray | None = None  # int8 [K, N]
    w_scale: np.ndarray | None = None
    w_zero_point: np.ndarray | None = None
    bias: np.ndarray | None = None
    alpha: float = 1.0


def _describe(node: onnx.NodeProto) -> str:
    return f"node '{node.name or node.output[0]}' ({node.op_type})"


def _refuse(node: onnx.NodeProto | None, why: str) -> Int8Unsupported:
    where = f"{_describe(node)}: " if node is not None else ""
    return Int8Unsupported(f"int8 backend cannot run this model: {where}{why} (it runs chains of {_SUPPORTED})")


class _GraphReader:
    """Constants, producers and consumers of one ONNX graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.graph = graph
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
                continue
            for name in node.output:
                self.producer[name] = node
            for name in dict.fromkeys(node.input):  # Add(x, x) consumes x once
                if name:
                    self.consumers.setdefault(name, []).append(node)

    def const(self, name: str, node: onnx.NodeProto) -> np.ndarray:
        """A constant, also through a DequantizeLinear of a constant (how QDQ stores weights and biases)."""
        if name in self.consts:
            return self.consts[name]
        dq = self.producer.get(name)
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in self.consts:
            values, scale, zero = self._dq_parts(dq)
            axis = _attr(dq, "axis", 1) % max(values.ndim, 1)
            shape = [1] * values.ndim
            if scale.size > 1:
                shape[axis] = -1
            return ((values.astype(np.float64) - zero.reshape(shape)) * scale.reshape(shape)).astype(np.float32)
        raise _refuse(node, f"input '{name}' must be a constant")

    def _dq_parts(self, dq: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if _attr(dq, "block_size", 0):
            raise _refuse(dq, "blocked quantization is not supported")
        values = self.consts[dq.input[0]]
        scale = self.consts.get(dq.input[1])
        zero = self.consts.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), values.dtype)
        if scale is None or zero is None:
            raise _refuse(dq, "scale and zero point must be constants")
        return values, scale.astype(np.float64), zero.astype(np.int64)

    def weights(self, name: str, node: onnx.NodeProto, n_axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int8 weights with per-column (axis `n_axis`) scale and zero point, from DQ(constant int8/uint8)."""
        dq = self.producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in self.consts:
            raise _refuse(node, f"weight '{name}' must be a DequantizeLinear of a constant (a QDQ-quantized model)")
        values, scale, zero = self._dq_parts(dq)
        if values.ndim != 2 or values.dtype not in (np.int8, np.uint8):
            raise _refuse(dq, f"weights must be a 2-D int8 or uint8 matrix, got {values.dtype} {values.shape}")
        n = values.shape[n_axis]
        if scale.size > 1 and (_attr(dq, "axis", 1) % 2 != n_axis or scale.size != n):
            raise _refuse(dq, "per-channel weight scales must run along the output columns")
        if values.dtype == np.uint8:  # (w - z) == ((w - 128) - (z - 128)): exact in int8
            values = (values.astype(np.int16) - 128).astype(np.int8)
            zero = zero - 128
        return values, np.broadcast_to(scale, (n,)).astype(np.float64), np.broadcast_to(zero, (n,)).astype(np.int32)


def _attr(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _quant(reader: _GraphReader, node: onnx.NodeProto) -> _Quant:
    scale = reader.const(node.input[1], node)
    has_zero = len(node.input) > 2 and node.input[2]
    zero = reader.const(node.input[2], node) if has_zero else np.zeros((), np.uint8)
    if scale.size != 1 or zero.size != 1:
        raise _refuse(node, "activations must be quantized per tensor")
    if zero.dtype not in (np.uint8, np.int8) or _attr(node, "output_dtype", 0) not in (0, 2, 3):
        raise _refuse(node, f"activations must be uint8 or int8, got {zero.dtype}")
    signed = zero.dtype == np.int8
    return _Quant(float(scale.reshape(())), int(zero.reshape(())) + (128 if signed else 0), signed)


def _bias(reader: _GraphReader, name: str, node: onnx.NodeProto, n: int | None) -> np.ndarray:
    value = reader.const(name, node).astype(np.float32)
    if (n is not None and value.size not in (1, n)) or (value.ndim > 1 and value.shape[-1] != value.size):
        raise _refuse(node, f"bias '{name}' of shape {value.shape} does not broadcast over the output columns")
    return value.reshape(-1)


def _token(reader: _GraphReader, node: onnx.NodeProto, data: str) -> _Token:
    """Classifies the node that consumes the activation tensor `data`."""
    op = node.op_type
    if op in ("QuantizeLinear", "DequantizeLinear") and node.input[0] == data:
        return _Token("q" if op == "QuantizeLinear" else "dq", node, quant=_quant(reader, node))
    if op == "Relu":
        return _Token("relu", node)
    if op == "Add" and len(node.input) == 2 and data in node.input:
        other = node.input[1] if node.input[0] == data else node.input[0]
        return _Token("add", node, bias=_bias(reader, other, node, None))
    if op == "MatMul" and node.input[0] == data:
        w, s, z = reader.weights(node.input[1], node, n_axis=1)
        return _Token("gemm", node, weights=w, w_scale=s, w_zero_point=z)
    if op == "Gemm" and node.input[0] == data:
        if _attr(node, "transA", 0):
            raise _refuse(node, "transA is not supported")
        trans_b = bool(_attr(node, "transB", 0))
        w, s, z = reader.weights(node.input[1], node, n_axis=0 if trans_b else 1)
        w = np.ascontiguousarray(w.T) if trans_b else w
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = float(_attr(node, "beta", 1.0)) * _bias(reader, node.input[2], node, w.shape[1])
        return _Token("gemm", node, weights=w, w_scale=s, w_zero_point=z, bias=bias,
                      alpha=float(_attr(node, "alpha", 1.0)))
    raise _refuse(node, "unsupported node")


def _chain(reader: _GraphReader) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto, list[_Token]]:
    """Walks the graph from its one input to its one output, refusing branches and unknown nodes."""
    graph = reader.graph
    inputs = [i for i in graph.input if i.name not in reader.consts]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise _refuse(None, f"it needs exactly one input and one output, found {len(inputs)} and {len(graph.output)}")
    tokens: list[_Token] = []
    data, end = inputs[0].name, graph.output[0].name
    while data != end:
        users = reader.consumers.get(data, [])
        if len(users) != 1:
            raise _refuse(None, f"tensor '{data}' feeds {len(users)} nodes; only a single chain is supported")
        token = _token(reader, users[0], data)
        tokens.append(token)
        data = users[0].output[0]
    return inputs[0], graph.output[0], tokens


_OPS = {"q": "QuantizeLinear", "dq": "DequantizeLinear", "gemm": "MatMul or Gemm"}


class _Cursor:
    """Position in the token list while the chain is compiled."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens, self.i = tokens, 0

    def peek(self, ahead: int = 0) -> _Token | None:
        j = self.i + ahead
        return self.tokens[j] if j < len(self.tokens) else None

    def kind(self, ahead: int = 0) -> str:
        token = self.peek(ahead)
        return token.kind if token is not None else "end"

    def take(self, kind: str, after: _Token | None) -> _Token:
        token = self.peek()
        if token is None or token.kind != kind:
            where = token.node if token is not None else (after.node if after is not None else None)
            raise _refuse(where, f"expected {_OPS[kind]} here in the QDQ chain")
        self.i += 1
        return token


def _qdq(cur: _Cursor, q: _Token) -> _Quant:
    """Consumes the DequantizeLinear that pairs with QuantizeLinear `q`; they must agree."""
    dq = cur.take("dq", q)
    if dq.quant != q.quant:
        raise _refuse(dq.node, "DequantizeLinear parameters differ from its QuantizeLinear")
    return dq.quant


def _epilogue(cur: _Cursor, gemm: _Token) -> tuple[np.ndarray | None, _Quant | None, bool, _Quant | None, str]:
    """Folds the nodes after one MatMul/Gemm: (bias, mid rounding, relu, out quant, how the chain goes on).

    The kernel's order is product -> [mid round] -> [+bias] -> [relu] -> [out round]; a chain whose
    nodes need another order is refused rather than approximated.
    """
    bias, mid, relu = gemm.bias, None, False
    while True:
        token, kind = cur.peek(), cur.kind()
        if kind == "add":
            if relu or (mid is not None and gemm.bias is not None):
                raise _refuse(token.node, "a bias after ReLU or around a rounding point cannot be fused")
            bias = token.bias if bias is None else bias + token.bias
            cur.i += 1
        elif kind == "relu":
            relu = True
            cur.i += 1
        elif kind == "q":
            cur.i += 1
            if cur.kind() == "end":
                return bias, mid, relu, token.quant, "quantized"
            quant = _qdq(cur, token)
            follow = cur.kind()
            if follow in ("gemm", "end"):
                return bias, mid, relu, quant, "next" if follow == "gemm" else "dequantized"
            if mid is not None or relu or bias is not None:
                raise _refuse(token.node, "more rounding points than the kernel epilogue applies")
            mid = quant
        elif kind == "end":
            return bias, mid, relu, None, "float"
        else:
            raise _refuse(token.node, "a MatMul output must be quantized before the next MatMul")


_OUTPUT_KIND = {"next": "u8", "quantized": "u8", "dequantized": "dequantize", "float": "f32"}


@dataclass(frozen=True, slots=True)
class Layer:
    """One MatMul/Gemm and its folded epilogue, in the kernels' terms (zero points in the u8 domain):
    v = (sum_k (a - a_zero_point) * (w - w_zero_point)) * scale [-> mid rounding] [+ bias] [relu] -> output."""

    node: onnx.NodeProto
    weights: np.ndarray  # int8 [K, N]
    w_zero_point: np.ndarray  # int32 [N]
    scale: np.ndarray  # float32 [N]: activation scale * weight scale * alpha
    a_zero_point: int
    bias: np.ndarray | None  # float32 [N]
    relu: bool
    mid: tuple[float, int] | None
    out: tuple[float, int] | None
    output: str  # u8 | f32 | dequantize


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """The whole chain, whatever runs it: tidal's CPU kernels here, the CUDA GEMM in cuda_int8.py."""

    input_scale: float
    input_zero_point: int
    layers: tuple[Layer, ...]
    output: str  # float | dequantized | quantized
    signed_output: bool


def plan_layers(tokens: list[_Token]) -> LayerPlan:
    cur = _Cursor(tokens)
    q_in = cur.take("q", None)
    act = _qdq(cur, q_in)
    layers: list[Layer] = []
    while True:
        gemm = cur.take("gemm", None)
        k, n = gemm.weights.shape
        if layers and layers[-1].weights.shape[1] != k:
            raise _refuse(gemm.node, f"expects K={k} but the previous layer gives {layers[-1].weights.shape[1]}")
        bias, mid, relu, out, how = _epilogue(cur, gemm)
        if bias is not None and bias.size == 1:
            bias = np.full(n, bias[0], np.float32)
        elif bias is not None and bias.size != n:
            raise _refuse(gemm.node, f"bias has {bias.size} values for {n} output columns")
        layers.append(Layer(
            gemm.node, gemm.weights, gemm.w_zero_point, (act.scale * gemm.w_scale * gemm.alpha).astype(np.float32),
            act.zero_point, None if bias is None else np.ascontiguousarray(bias, np.float32), relu,
            None if mid is None else (mid.scale, mid.zero_point),
            None if out is None else (out.scale, out.zero_point), _OUTPUT_KIND[how],
        ))
        if how != "next":
            return LayerPlan(q_in.quant.scale, q_in.quant.zero_point, tuple(layers), how,
                             signed_output=how == "quantized" and out.signed)
        act = out


@dataclass(slots=True)
class _Plan:
    chain: object  # tidal._kernels.Chain
    k: int
    isa: str
    output: str  # float | dequantized | quantized
    signed_output: bool


def _compile(plan: LayerPlan, isa: str | None) -> _Plan:
    from tidal import _kernels

    chain = _kernels.Chain(plan.input_scale, plan.input_zero_point)
    packed_first = None
    for layer in plan.layers:
        try:
            packed = _kernels.PackedWeights(layer.weights, layer.w_zero_point, isa=isa)
        except ValueError as exc:
            raise ConfigError(f"int8 backend: {_describe(layer.node)}: {exc}") from exc
        chain.add_layer(packed, layer.scale, layer.a_zero_point, bias=layer.bias, relu=layer.relu, mid=layer.mid,
                        out=layer.out, output=layer.output)
        packed_first = packed_first or packed
    return _Plan(chain, packed_first.k, packed_first.isa, plan.output, plan.signed_output)


def parse(path: Path) -> tuple[TensorSpec, TensorSpec, LayerPlan]:
    """The model's input and output specs and its layer plan; Int8Unsupported outside what the kernels run."""
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError and others for unreadable files
        raise ConfigError(f"cannot read ONNX model '{path}': {exc}") from exc
    input_info, output_info, tokens = _chain(_GraphReader(model))
    plan = plan_layers(tokens)
    output_dtype = DataType.FP32
    if plan.output == "quantized":
        output_dtype = DataType.INT8 if plan.signed_output else DataType.UINT8
    if input_info.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise _refuse(None, f"input '{input_info.name}' must be float32")
    return _spec(input_info, DataType.FP32), _spec(output_info, output_dtype), plan


def _spec(value: onnx.ValueInfoProto, datatype: DataType) -> TensorSpec:
    dims = value.type.tensor_type.shape.dim
    return TensorSpec(value.name, datatype, tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims))


class Int8Backend:
    """One instance of a QDQ model on the int8 kernels; packed weights are built once at load."""

    def __init__(self, plan: _Plan, input_spec: TensorSpec, output_spec: TensorSpec, threads: int) -> None:
        self._plan, self._input, self._output, self._threads = plan, input_spec, output_spec, threads
        self.isa: str = plan.isa

    def inputs(self) -> list[TensorSpec]:
        return [self._input]

    def outputs(self) -> list[TensorSpec]:
        return [self._output]

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        for name in output_names:
            if name != self._output.name:
                raise InvalidArgument(f"unknown output '{name}' (the model has '{self._output.name}')")
        x, k = inputs.get(self._input.name), self._plan.k
        if x is None or x.dtype != np.float32 or x.ndim < 1 or x.shape[-1] != k:
            got = "nothing" if x is None else f"{x.dtype} {x.shape}"
            raise InvalidArgument(f"input '{self._input.name}' must be float32 [..., {k}], got {got}")
        try:
            y = self._plan.chain.run(np.ascontiguousarray(x.reshape(-1, k)), self._threads)
        except (ValueError, TypeError) as exc:
            raise BackendError(f"int8 kernels failed: {exc}") from exc
        if self._plan.signed_output:  # s8 results travel as u8 + 128 inside the kernels
            y = (y ^ np.uint8(0x80)).view(np.int8)
        return {self._output.name: y.reshape(*x.shape[:-1], y.shape[-1])}

    def close(self) -> None:
        self._plan.chain = None


def load(path: Path, options: BackendOptions) -> Int8Backend:
    """Parses and packs the model; Int8Unsupported when the graph or this CPU is out of reach."""
    try:
        from tidal import _kernels
    except ImportError as exc:  # a build without the compiled module
        raise Int8Unsupported(f"int8 backend: tidal._kernels is not built ({exc})") from exc
    isa = options.parameters.get("isa") or None
    if isa is None and _kernels.best_isa() == "scalar":
        raise Int8Unsupported("int8 backend needs AVX2 or newer; this CPU has none of its kernels")
    input_spec, output_spec, layers = parse(path)
    return Int8Backend(_compile(layers, isa), input_spec, output_spec, threads=max(options.intra_op_threads, 0))


__all__ = ["Int8Backend", "Int8Unsupported", "Layer", "LayerPlan", "load", "parse", "plan_layers"]
