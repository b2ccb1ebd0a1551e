"""ONNX graph helpers shared by the variant builders: loading with clear errors,
batch-dim checks, parameter and FLOP counts, and building MLP graphs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tidal.errors import ConfigError, NotFound

OPSET = 17  # new enough for per-channel QDQ, old enough for every ONNX Runtime tidal supports


@dataclass(frozen=True, slots=True)
class IoSpec:
    """A graph input or output; `shape[0]` is None for the (symbolic) batch dim."""

    name: str
    elem_type: int
    shape: tuple[int | None, ...]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The dims of one batch row; None (unknown) dims never reach here after `check_batchable`."""
        return tuple(int(d) if d is not None else -1 for d in self.shape[1:])


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Every model file tidal writes: without the opset imports no node uses, at the lowest IR version its
    opsets allow. onnx.helper stamps the newest IR its release knows (onnx 1.23: IR 14), which an older ONNX
    Runtime refuses although nothing in the file needs it, and onnxruntime-gpu trails the CPU wheel (1.31.1
    reads IR 13 at most)."""
    drop_unused_opsets(model)
    model.ir_version = min(model.ir_version, helper.find_min_ir_version_for(model.opset_import, ignore_unknown=True))
    onnx.save(model, str(path))
    return path


def save_graph(graph: onnx.GraphProto, path: Path, opset: int = OPSET) -> Path:
    """A checked model file from a graph built with onnx.helper (tests and benchmarks build theirs this way)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_model(model, path)


def load_model(path: Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"model file {path} does not exist")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, OSError...
        raise ConfigError(f"{path}: not a valid ONNX model: {exc}") from exc
    return model


def graph_inputs(model: onnx.ModelProto) -> list[IoSpec]:
    initializers = {t.name for t in model.graph.initializer}
    return [_spec(v) for v in model.graph.input if v.name not in initializers]


def graph_outputs(model: onnx.ModelProto) -> list[IoSpec]:
    return [_spec(v) for v in model.graph.output]


def _spec(value: onnx.ValueInfoProto) -> IoSpec:
    tensor = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim)
    return IoSpec(value.name, tensor.elem_type, dims)


def check_batchable(model: onnx.ModelProto, path: Path) -> None:
    """Variants are served behind dynamic batching: dim 0 must be a free batch dim, the rest fixed."""
    for spec in graph_inputs(model) + graph_outputs(model):
        if not spec.shape or spec.shape[0] is not None:
            raise ConfigError(
                f"{path}: tensor '{spec.name}' has shape {show_shape(spec.shape)}: tidal optimize needs a variable "
                "batch dimension first (e.g. ['N', 64]); re-export the model with a dynamic dim 0"
            )
        if any(d is None for d in spec.shape[1:]):
            raise ConfigError(f"{path}: tensor '{spec.name}' has shape {show_shape(spec.shape)}: only dim 0 may vary")


def show_shape(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def is_classifier_output(spec: IoSpec) -> bool:
    """[N, classes] with 2 or more classes: top-1 of a single class would always agree."""
    return len(spec.shape) == 2 and (spec.shape[1] or 0) >= 2


_OTHER_FLOATS = (TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def non_fp32_floats(model: onnx.ModelProto) -> list[str]:
    """Floating-point types other than fp32 among the inputs, outputs and weights, e.g. ['DOUBLE']."""
    found = {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    found |= {t.data_type for t in model.graph.initializer}
    return [TensorProto.DataType.Name(t) for t in _OTHER_FLOATS if t in found]


def parameter_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def flops_per_row(model: onnx.ModelProto) -> int | None:
    """2 x multiply-adds of MatMul/Gemm/Conv for one batch row; None if a Conv output shape is unknown.

    Element-wise work is left out: it is a rounding error next to the products
    and it is what pruning and distillation shrink along with them anyway.
    """
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: _spec(v).shape for v in [*inferred.graph.value_info, *inferred.graph.output]}
    total = 0
    for node in model.graph.node:
        w = weights.get(node.input[1]) if len(node.input) > 1 else None
        if w is None or len(w) < 2:
            continue
        if node.op_type in ("MatMul", "Gemm") and len(w) == 2:
            total += 2 * w[0] * w[1]
        elif node.op_type == "Conv":
            out = shapes.get(node.output[0])
            if out is None or any(d is None for d in out[2:]):
                return None
            total += 2 * int(np.prod(w)) * int(np.prod(out[2:]))
    return total


def _domains(nodes: Sequence[onnx.NodeProto]) -> set[str]:
    """The operator domains of `nodes` and of the subgraphs their attributes hold (If, Loop, Scan)."""
    found = set()
    for node in nodes:
        found.add(node.domain)
        for attr in node.attribute:
            for graph in [attr.g, *attr.graphs] if attr.HasField("g") else attr.graphs:
                found |= _domains(graph.node)
    return found


def drop_unused_opsets(model: onnx.ModelProto) -> None:
    """Drop opset imports no node uses (ONNX Runtime's saved graphs list every domain it knows); nodes in
    subgraphs and model-local functions count, and so do the functions' own domains."""
    domains = _domains(model.graph.node) | {""}
    for function in model.functions:
        domains |= _domains(function.node) | {function.domain}
    kept = [o for o in model.opset_import if o.domain in domains]
    del model.opset_import[:]
    model.opset_import.extend(kept)


@dataclass(frozen=True, slots=True)
class Dense:
    """One fully connected layer: y = x @ weight + bias, then `activation` (Relu or None)."""

    weight: np.ndarray  # [in, out]
    bias: np.ndarray  # [out]
    activation: str | None


def build_mlp(
    layers: Sequence[Dense],
    input_spec: IoSpec,
    output_spec: IoSpec,
    softmax: bool = False,
    name: str = "mlp",
) -> onnx.ModelProto:
    """An ONNX MLP with the given input/output names and shapes; rows are flattened first if needed."""
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    current = input_spec.name
    if len(input_spec.shape) != 2:
        nodes.append(helper.make_node("Flatten", [current], ["flat"], axis=1))
        current = "flat"
    for i, layer in enumerate(layers):
        w, b = f"dense{i}.weight", f"dense{i}.bias"
        inits += [
            numpy_helper.from_array(layer.weight.astype(np.float32), w),
            numpy_helper.from_array(layer.bias.astype(np.float32), b),
        ]
        last = i == len(layers) - 1 and not softmax
        out = output_spec.name if last and layer.activation is None else f"dense{i}"
        nodes.append(helper.make_node("Gemm", [current, w, b], [out]))
        current = out
        if layer.activation is not None:
            act_out = output_spec.name if last else f"{layer.activation.lower()}{i}"
            nodes.append(helper.make_node(layer.activation, [current], [act_out]))
            current = act_out
    if softmax:
        nodes.append(helper.make_node("Softmax", [current], [output_spec.name], axis=-1))
    graph = helper.make_graph(
        nodes,
        name,
        [_value_info(input_spec)],
        [_value_info(output_spec)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tidal")
    onnx.checker.check_model(model)
    return model


def _value_info(spec: IoSpec) -> onnx.ValueInfoProto:
    dims = ["N" if d is None else d for d in spec.shape]
    return helper.make_tensor_value_info(spec.name, spec.elem_type, dims)
