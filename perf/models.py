"""The reference models of tidal's benchmarks, built with onnx.helper (no downloads, seeded weights).

Three shapes of cost, so a benchmark shows where serving time goes:
- `mlp`: 256 -> 1024 -> 1024 -> 10. About 1.3 M multiply-adds a row; a batch-1
  run is well under a millisecond, so the transport dominates.
- `cnn`: three 3x3 convolutions with pooling on 3x32x32 images, then a 10-way
  linear layer; about 10 M multiply-adds a row.
- `wide_mlp`: 1024 -> 4096 -> 4096 -> 1024. 100 MB of weights: at batch 1 every
  run streams them all from memory, at batch 32+ the same read serves every row,
  so batching pays several times over.
- `linear`: the mlp's input and output with one 256 -> 10 layer (10 KB of
  weights, about 2.6 k multiply-adds a row): next to no model work, so serving
  it measures the server's own cost per request.

Every model takes `INPUT` (FP32, batch dim first) and returns `OUTPUT`.
`write_model_dir` adds a Triton-style config.pbtxt, so the same files serve
tidal and Triton alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tidal.optimize.graph import save_graph


@dataclass(frozen=True)
class ReferenceModel:
    name: str
    input_dims: tuple[int, ...]  # one row, batch dim excluded
    output_dims: tuple[int, ...]
    build: Callable[[Path], Path]  # writes the ONNX file to the given path


def _io(dims_in: tuple[int, ...], dims_out: tuple[int, ...]) -> tuple[list, list]:
    return (
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["batch", *dims_in])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["batch", *dims_out])],
    )


def dense(path: Path, sizes: tuple[int, ...], seed: int = 0) -> Path:
    """Gemm + ReLU layers of the given widths (no ReLU after the last); He-scaled seeded weights."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "INPUT"
    last = len(sizes) - 2
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}")]
        out = "OUTPUT" if i == last else f"h{i}"
        gemm_out = out if i == last else f"g{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [gemm_out]))
        if i != last:
            nodes.append(helper.make_node("Relu", [gemm_out], [out]))
        prev = out
    inputs, outputs = _io((sizes[0],), (sizes[-1],))
    return save_graph(helper.make_graph(nodes, "dense", inputs, outputs, inits), path)


def small_cnn(path: Path, channels: tuple[int, ...] = (32, 64, 128), classes: int = 10, seed: int = 0) -> Path:
    """Conv3x3+ReLU+MaxPool2 twice, Conv3x3+ReLU, global average pool, Gemm to `classes`."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev, fan_in = [], [], "INPUT", 3
    for i, width in enumerate(channels):
        w = (rng.standard_normal((width, fan_in, 3, 3)) * np.sqrt(2.0 / (9 * fan_in))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"k{i}"), numpy_helper.from_array(np.zeros(width, np.float32), f"c{i}")]
        nodes += [
            helper.make_node("Conv", [prev, f"k{i}", f"c{i}"], [f"conv{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"conv{i}"], [f"act{i}"]),
        ]
        prev = f"act{i}"
        if i < len(channels) - 1:
            nodes.append(helper.make_node("MaxPool", [prev], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2]))
            prev = f"pool{i}"
        fan_in = width
    w = (rng.standard_normal((fan_in, classes)) / np.sqrt(fan_in)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "fc_w"), numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b")]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["OUTPUT"]),
    ]
    inputs, outputs = _io((3, 32, 32), (classes,))
    return save_graph(helper.make_graph(nodes, "small_cnn", inputs, outputs, inits), path)


MODELS: dict[str, ReferenceModel] = {
    "mlp": ReferenceModel("mlp", (256,), (10,), lambda p: dense(p, (256, 1024, 1024, 10))),
    "cnn": ReferenceModel("cnn", (3, 32, 32), (10,), small_cnn),
    "wide_mlp": ReferenceModel("wide_mlp", (1024,), (1024,), lambda p: dense(p, (1024, 4096, 4096, 1024))),
    "linear": ReferenceModel("linear", (256,), (10,), lambda p: dense(p, (256, 10))),
}


def model_config(
    name: str,
    model: ReferenceModel,
    max_batch_size: int,
    queue_delay_us: int | None,
    instances: int = 1,
    intra_op_threads: int = 1,
) -> str:
    """config.pbtxt text. `queue_delay_us` None: no `dynamic_batching` block (with `max_batch_size: 1`
    that serves one request per execution); otherwise dynamic batching with that window.

    ONNX Runtime gets `intra_op_threads` threads per instance and no spin-waiting: on a small
    machine spinning threads take the cores the gRPC server needs.
    """

    def dims(values: tuple[int, ...]) -> str:
        return ", ".join(map(str, values))

    lines = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        f'input [ {{ name: "INPUT" data_type: TYPE_FP32 dims: [ {dims(model.input_dims)} ] }} ]',
        f'output [ {{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ {dims(model.output_dims)} ] }} ]',
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]",
        f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{intra_op_threads}" }} }}',
        'parameters { key: "allow_spinning" value: { string_value: "false" } }',
    ]
    if queue_delay_us is not None:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}")
    return "\n".join(lines) + "\n"


def write_model_dir(root: Path, name: str, model: ReferenceModel, config: str, onnx_file: Path | None = None) -> Path:
    """`root/name/config.pbtxt` and `root/name/1/model.onnx` (a link to `onnx_file` when given, to share weights)."""
    model_dir = root / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(config)
    target = model_dir / "1" / "model.onnx"
    if onnx_file is None:
        model.build(target)
    else:
        target.unlink(missing_ok=True)
        target.symlink_to(onnx_file.resolve())
    return model_dir
