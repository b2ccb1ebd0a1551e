"""Knowledge distillation: a smaller MLP student trained to match the teacher.

The student learns the teacher's softened output distribution on the
calibration inputs, plus, every epoch, fresh mixtures of pairs of them
(x = l*a + (1-l)*b) labelled by the teacher on the fly: with only a few
hundred calibration rows, the mixtures show the student how the teacher
behaves between the points it was given, which is what held-out data needs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from tidal.backends.base import BackendOptions
from tidal.backends.onnxruntime import session_options
from tidal.errors import ConfigError
from tidal.optimize.data import Dataset
from tidal.optimize.graph import (
    IoSpec,
    build_mlp,
    graph_inputs,
    graph_outputs,
    is_classifier_output,
    parameter_count,
    show_shape,
)
from tidal.optimize.train import MlpTrainer, TrainConfig

_MIN_WIDTH = 8
_MAX_WIDTH = 256


@dataclass(frozen=True, slots=True)
class Distilled:
    model: onnx.ModelProto
    hidden: tuple[int, ...]
    losses: tuple[float, ...]  # mean KL divergence to the teacher, per epoch


def default_student(teacher: onnx.ModelProto) -> tuple[int, ...]:
    """One hidden layer fewer than the teacher's dense stack, each a quarter as wide.

    A teacher without dense hidden layers (e.g. convolutional) gets the one hidden
    layer, at most 256 wide, that leaves the student a quarter of its parameters:
    a flattened image is wide, so a fixed width could outgrow the teacher.
    """
    matrices = {t.name: t.dims for t in teacher.graph.initializer if len(t.dims) == 2}
    widths = [
        int(matrices[n.input[1]][0 if _trans_b(n) else 1])
        for n in teacher.graph.node
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in matrices
    ]
    hidden = widths[:-1]
    if not hidden:
        n_in, n_out = _widths(teacher)
        width = (parameter_count(teacher) // 4 - n_out) // (n_in + 1 + n_out)
        return (max(_MIN_WIDTH, min(_MAX_WIDTH, width)),)
    kept = hidden[:-1] if len(hidden) > 1 else hidden
    return tuple(max(_MIN_WIDTH, w // 4) for w in kept)


def _widths(teacher: onnx.ModelProto) -> tuple[int, int]:
    """The student's input (flattened row) and output widths."""
    in_spec, out_spec, _ = _teacher_io(teacher)
    return int(np.prod(in_spec.row_shape)), int(out_spec.row_shape[0])


def _check_smaller(teacher: onnx.ModelProto, hidden: tuple[int, ...]) -> None:
    """A distilled variant is worth serving only if it is smaller than its teacher."""
    n_in, n_out = _widths(teacher)
    sizes = [n_in, *hidden, n_out]
    student = sum((a + 1) * b for a, b in itertools.pairwise(sizes))
    teacher_size = parameter_count(teacher)
    if student >= teacher_size:
        raise ConfigError(
            f"a student with hidden layers {list(hidden)} would have {student:,} parameters, not fewer than "
            f"the teacher's {teacher_size:,}: no smaller student to distill"
        )


def _trans_b(node: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)


def _teacher_io(teacher: onnx.ModelProto) -> tuple[IoSpec, IoSpec, bool]:
    inputs, outputs = graph_inputs(teacher), graph_outputs(teacher)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ConfigError(
            f"distillation needs a model with one input and one output; this one has {len(inputs)} and {len(outputs)}"
        )
    out = outputs[0]
    if not is_classifier_output(out):
        shape = show_shape(out.shape)
        raise ConfigError(f"distillation needs a classifier output [N, classes]; '{out.name}' is {shape}")
    if inputs[0].elem_type != TensorProto.FLOAT or out.elem_type != TensorProto.FLOAT:
        raise ConfigError("distillation needs fp32 model inputs and outputs: the student trains and runs in fp32")
    producer = next((n for n in teacher.graph.node if out.name in n.output), None)
    return inputs[0], out, producer is not None and producer.op_type == "Softmax"


def distill(
    teacher: onnx.ModelProto,
    data: Dataset,
    hidden: Sequence[int] | None = None,
    config: TrainConfig | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> Distilled:
    """Train a student on `data`'s inputs; `on_epoch(epoch, loss)` reports progress."""
    config = config or TrainConfig()
    in_spec, out_spec, probabilities = _teacher_io(teacher)
    hidden = tuple(hidden) if hidden else default_student(teacher)
    _check_smaller(teacher, hidden)
    # Serving's settings: spinning ORT threads would steal the cores numpy trains on between teacher calls.
    so = session_options(BackendOptions())
    session = ort.InferenceSession(teacher.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def teacher_logits(x: np.ndarray) -> np.ndarray:
        (y,) = session.run([out_spec.name], {in_spec.name: x.reshape(len(x), *in_spec.row_shape)})
        # A softmax output's log is a valid set of logits for the same distribution.
        return np.log(np.maximum(y, 1e-12)) if probabilities else y

    x = data.feeds[in_spec.name].reshape(data.rows, -1).astype(np.float32)
    targets = teacher_logits(x)
    trainer = MlpTrainer(x.shape[1], hidden, targets.shape[1], config)
    trainer.fit_scaler(x)
    losses = []
    for epoch in range(config.epochs):
        pairs = trainer.rng.permutation(len(x))
        lam = trainer.rng.uniform(0.0, 1.0, size=(len(x), 1)).astype(np.float32)
        mixed = lam * x + (1.0 - lam) * x[pairs]
        batch_x = np.concatenate([x, mixed])
        batch_t = np.concatenate([targets, teacher_logits(mixed)])
        losses.append(trainer.epoch(batch_x, batch_t, soft=True))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    model = build_mlp(trainer.export(), in_spec, out_spec, softmax=probabilities, name="distilled")
    return Distilled(model, hidden, tuple(losses))
