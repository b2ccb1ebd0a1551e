"""Small real ONNX models the tests build with onnx.helper, and Triton-style repositories of them."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tidal.optimize.graph import save_graph

DTYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def add_sub(path: Path, width: int = 16, dtype: int = TensorProto.FLOAT) -> Path:
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1, batch dim 0 dynamic."""
    shape = ["batch", width]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "add_sub",
        [helper.make_tensor_value_info("INPUT0", dtype, shape), helper.make_tensor_value_info("INPUT1", dtype, shape)],
        [
            helper.make_tensor_value_info("OUTPUT0", dtype, shape),
            helper.make_tensor_value_info("OUTPUT1", dtype, shape),
        ],
    )
    return save_graph(graph, path)


def identity_all(path: Path, exclude: tuple[str, ...] = ()) -> Path:
    """One Identity per KServe datatype: IN_<DT> -> OUT_<DT>, shape [batch, n]."""
    nodes, inputs, outputs = [], [], []
    for name, elem in DTYPES.items():
        if name in exclude:
            continue
        nodes.append(helper.make_node("Identity", [f"IN_{name}"], [f"OUT_{name}"]))
        inputs.append(helper.make_tensor_value_info(f"IN_{name}", elem, ["batch", "n"]))
        outputs.append(helper.make_tensor_value_info(f"OUT_{name}", elem, ["batch", "n"]))
    return save_graph(helper.make_graph(nodes, "identity_all", inputs, outputs), path)


def scale(path: Path, factor: float, width: int = 4) -> Path:
    """OUTPUT = INPUT * factor: versions differ by factor, so tests can tell which answered."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["INPUT", "factor"], ["OUTPUT"])],
        "scale",
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(np.array([factor], dtype=np.float32), "factor")],
    )
    return save_graph(graph, path)


def reshape3(path: Path) -> Path:
    """OUTPUT = reshape(INPUT, [-1, 3]): ONNX Runtime fails when the element count is not a multiple of 3."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["INPUT", "shape"], ["OUTPUT"])],
        "reshape3",
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["rows", 3])],
        [numpy_helper.from_array(np.array([-1, 3], dtype=np.int64), "shape")],
    )
    return save_graph(graph, path)


def mlp(path: Path, sizes: tuple[int, ...], seed: int = 0) -> Path:
    """A ReLU MLP with seeded random weights: input INPUT [batch, sizes[0]], output OUTPUT."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "INPUT"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = "OUTPUT" if i == len(sizes) - 2 else f"h{i}"
        pre = f"pre{i}" if out != "OUTPUT" else "OUTPUT"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [pre]))
        if out != "OUTPUT":
            nodes.append(helper.make_node("Relu", [pre], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["batch", sizes[-1]])],
        inits,
    )
    return save_graph(graph, path)


def tanh_matmul_body(state_shape: list, width: int, seed: int) -> onnx.GraphProto:
    """A Loop body: state = tanh(state @ W), W orthogonal (so values stay finite); slow models repeat it."""
    w, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((width, width)))
    return helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["state_in", "w"], ["product"]),
            helper.make_node("Tanh", ["product"], ["state_out"]),
        ],
        "iteration",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, state_shape),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, state_shape),
        ],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
    )


def spin(path: Path, size: int = 256) -> Path:
    """OUTPUT = INPUT, after max(INPUT) iterations of state = tanh(state @ W) (W orthogonal, so values stay finite).

    The trip count comes from the input, so ONNX Runtime cannot fold the loop away.
    """
    body = tanh_matmul_body([size, size], size, seed=0)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["INPUT"], ["most"], keepdims=0),
            helper.make_node("Cast", ["most"], ["trips"], to=TensorProto.INT64),
            helper.make_node("Loop", ["trips", "", "state0"], ["state"], body=body),
            helper.make_node("ReduceSum", ["state"], ["total"], keepdims=0),
            helper.make_node("Mul", ["total", "zero"], ["nothing"]),
            helper.make_node("Add", ["INPUT", "nothing"], ["OUTPUT"]),
        ],
        "spin",
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["batch", 1])],
        [
            numpy_helper.from_array(np.eye(size, dtype=np.float32), "state0"),
            numpy_helper.from_array(np.zeros((), np.float32), "zero"),
        ],
    )
    return save_graph(graph, path)


def write_config(model_dir: Path, text: str) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text)


SIMPLE_CONFIG = """
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] }
]
dynamic_batching { max_queue_delay_microseconds: 500 }
instance_group [ { count: 2 kind: KIND_CPU } ]
# Triton fields tidal accepts without acting on them:
optimization { input_pinned_memory { enable: true } }
model_warmup [ { name: "w" batch_size: 1
  inputs { key: "INPUT0" value { data_type: TYPE_FP32 dims: [ 16 ] zero_data: true } } } ]
"""


def build_repository(root: Path) -> Path:
    """The repository every integration test serves; each model exercises one repository feature."""
    write_config(root / "simple", SIMPLE_CONFIG)
    add_sub(root / "simple" / "1" / "model.onnx")
    # No config.pbtxt: auto-completed from the graph.
    identity_all(root / "identity" / "1" / "model.onnx")
    # FP16 has no typed-contents field in the protocol; this one takes every other type typed.
    identity_all(root / "identity_typed" / "1" / "model.onnx", exclude=("FP16",))
    write_config(root / "scale", "version_policy { latest { num_versions: 2 } }\nmax_batch_size: 4\n")
    for version in (1, 2, 3):
        scale(root / "scale" / str(version) / "model.onnx", float(version))
    write_config(root / "scale_specific", "version_policy { specific { versions: [1, 3] } }\n")
    for version in (1, 2, 3):
        scale(root / "scale_specific" / str(version) / "model.onnx", float(version))
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
    # Runs fine unless the rows do not split into threes: a real backend failure at run time.
    write_config(root / "fragile", "max_batch_size: 0\n")
    reshape3(root / "fragile" / "1" / "model.onnx")
    write_config(root / "misconfigured", "max_batch_size: 4\nbogus_field: 3\n")
    add_sub(root / "misconfigured" / "1" / "model.onnx")
    return root
