"""Distillation: a real, seeded training loop whose loss goes down and whose student tracks the teacher."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from tidal.errors import ConfigError
from tidal.optimize.data import Dataset
from tidal.optimize.distill import default_student, distill
from tidal.optimize.graph import parameter_count
from tidal.optimize.reference import synthetic_classification, train_classifier
from tidal.optimize.train import TrainConfig

X, Y = synthetic_classification(1200, 20, 5, seed=11, spread=1.5)


@pytest.fixture(scope="module")
def teacher() -> onnx.ModelProto:
    return train_classifier(X[:800], Y[:800], (128, 64), TrainConfig(epochs=12, seed=1))


def _predict(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_student_is_smaller_learns_and_tracks_the_teacher(teacher: onnx.ModelProto) -> None:
    result = distill(teacher, Dataset({"input": X[:800]}, None, "cal"), config=TrainConfig(epochs=25, seed=0))
    assert default_student(teacher) == result.hidden == (32,)  # one layer fewer, a quarter as wide
    assert len(result.losses) == 25
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert parameter_count(result.model) < parameter_count(teacher) / 4
    held = X[800:]
    agreement = np.mean(_predict(result.model, held).argmax(1) == _predict(teacher, held).argmax(1))
    assert agreement >= 0.9
    inputs = [(i.name, i.type.tensor_type.elem_type) for i in result.model.graph.input]
    assert inputs == [(i.name, i.type.tensor_type.elem_type) for i in teacher.graph.input]


def test_same_seed_same_student_other_seed_other_student(teacher: onnx.ModelProto) -> None:
    data = Dataset({"input": X[:300]}, None, "cal")
    runs = [distill(teacher, data, (16,), TrainConfig(epochs=3, seed=s)) for s in (4, 4, 5)]
    assert runs[0].model.SerializeToString() == runs[1].model.SerializeToString()
    assert runs[0].losses == runs[1].losses
    assert runs[0].model.SerializeToString() != runs[2].model.SerializeToString()


def test_probability_teacher_gets_a_probability_student(teacher: onnx.ModelProto) -> None:
    probs = onnx.ModelProto()
    probs.CopyFrom(teacher)
    out = probs.graph.output[0]
    probs.graph.node[-1].output[0] = "raw"
    probs.graph.node.append(helper.make_node("Softmax", ["raw"], [out.name], axis=-1))
    result = distill(probs, Dataset({"input": X[:300]}, None, "cal"), (16,), TrainConfig(epochs=25, seed=0))
    assert result.model.graph.node[-1].op_type == "Softmax"
    p = _predict(result.model, X[800:900])
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(p.argmax(1) == _predict(probs, X[800:900]).argmax(1)) >= 0.8


def test_student_flattens_image_inputs() -> None:
    x = np.random.default_rng(0).standard_normal((64, 1, 4, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["img"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])], "img",
        [helper.make_tensor_value_info("img", onnx.TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
        [onnx.numpy_helper.from_array(np.ones((16, 3), np.float32), "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    student = distill(model, Dataset({"img": x}, None, "cal"), (2,), TrainConfig(epochs=2)).model
    session = ort.InferenceSession(student.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"img": x})[0].shape == (64, 3)


def test_multi_output_teacher_is_refused(teacher: onnx.ModelProto) -> None:
    two = onnx.ModelProto()
    two.CopyFrom(teacher)
    two.graph.output.append(two.graph.output[0])
    with pytest.raises(ConfigError, match="one input and one output"):
        distill(two, Dataset({"input": X[:10]}, None, "cal"))


def _conv_teacher(channels: int) -> onnx.ModelProto:
    """Conv -> Relu -> global pool -> Gemm on [N, 3, 8, 8]: no dense hidden layer to size a student from."""
    rng = np.random.default_rng(0)
    weights = {"cw": (channels, 3, 3, 3), "cb": (channels,), "w": (channels, 10), "b": (10,)}
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "w", "b"], ["y"]),
        ],
        "conv",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])],
        [onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_teacher_gets_a_student_sized_from_it() -> None:
    teacher = _conv_teacher(64)  # 2,442 parameters; a fixed 256-wide student on 192 inputs would have 52,234
    x = np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)
    result = distill(teacher, Dataset({"x": x}, None, "cal"), config=TrainConfig(epochs=1))
    assert result.hidden == default_student(teacher) == (8,)
    assert parameter_count(result.model) < parameter_count(teacher)


def test_no_student_bigger_than_its_teacher(teacher: onnx.ModelProto) -> None:
    x = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    with pytest.raises(ConfigError, match="1,634 parameters, not fewer than the teacher's 618"):
        distill(_conv_teacher(16), Dataset({"x": x}, None, "cal"), config=TrainConfig(epochs=1))
    with pytest.raises(ConfigError, match="no smaller student"):
        distill(teacher, Dataset({"input": X[:10]}, None, "cal"), (512,), TrainConfig(epochs=1))


def test_non_fp32_teacher_is_refused(teacher: onnx.ModelProto) -> None:
    double = onnx.ModelProto()
    double.CopyFrom(teacher)
    for value in [*double.graph.input, *double.graph.output]:
        value.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    with pytest.raises(ConfigError, match="fp32 model inputs and outputs"):
        distill(double, Dataset({"input": X[:10].astype(np.float64)}, None, "cal"), (8,), TrainConfig(epochs=1))
