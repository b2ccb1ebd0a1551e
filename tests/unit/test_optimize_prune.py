"""Structured pruning removes whole neurons/channels: smaller weights, same function on the kept ones."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tidal.errors import ConfigError
from tidal.optimize.graph import OPSET, flops_per_row, parameter_count
from tidal.optimize.prune import find_boundaries, prune

RNG = np.random.default_rng(7)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


Layers = list[tuple[np.ndarray, np.ndarray]]


def _mlp(dims: tuple[int, ...], gemm_trans_b: bool = False) -> tuple[onnx.ModelProto, Layers]:
    """MatMul+Add+Relu chain (or Gemm with transposed weights), returning the weights as [in, out]."""
    nodes, inits, layers, prev = [], [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        w = (RNG.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = RNG.standard_normal(b).astype(np.float32) * 0.1
        layers.append((w, bias))
        if gemm_trans_b:
            inits += [numpy_helper.from_array(w.T.copy(), f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
            nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"z{i}"], transB=1))
        else:
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"z{i}"]))
        prev = f"z{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dims[0]])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", dims[-1]])],
        inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), layers


def _masked_forward(layers: Layers, x: np.ndarray, ratio: float) -> np.ndarray:
    """The original MLP with the lowest |w_in| x |w_out| neurons of each hidden layer zeroed, in order."""
    layers = [(w.copy(), b.copy()) for w, b in layers]
    for i in range(len(layers) - 1):
        w_in, b_in = layers[i]
        w_out, _ = layers[i + 1]
        score = np.linalg.norm(w_in, axis=0) * np.linalg.norm(w_out, axis=1)
        drop = np.argsort(-score)[int(np.ceil(len(score) * (1 - ratio))) :]
        w_in[:, drop] = 0.0
        b_in[drop] = 0.0
        w_out[drop, :] = 0.0  # as removed: the next boundary scores what is left
    h = x
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


@pytest.mark.parametrize("trans_b", [False, True])
def test_mlp_pruning_keeps_the_function_of_the_kept_neurons(trans_b: bool) -> None:
    model, layers = _mlp((12, 40, 24, 5), gemm_trans_b=trans_b)
    pruned = prune(model, 0.5)
    shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    if trans_b:
        assert shapes["w0"] == (20, 12) and shapes["w1"] == (12, 20) and shapes["w2"] == (5, 12)
    else:
        assert shapes["w0"] == (12, 20) and shapes["w1"] == (20, 12) and shapes["w2"] == (12, 5)
    assert shapes["b0"] == (20,) and shapes["b1"] == (12,) and shapes["b2"] == (5,)
    x = RNG.standard_normal((9, 12)).astype(np.float32)
    np.testing.assert_allclose(_run(pruned, x), _masked_forward(layers, x, 0.5), rtol=1e-4, atol=1e-5)
    assert parameter_count(pruned) < parameter_count(model) / 2
    assert flops_per_row(pruned) == 2 * (12 * 20 + 20 * 12 + 12 * 5)


def test_original_model_is_left_alone() -> None:
    model, _ = _mlp((8, 16, 3))
    before = model.SerializeToString()
    prune(model, 0.75)
    assert model.SerializeToString() == before


def test_high_ratio_keeps_at_least_one_neuron() -> None:
    model, _ = _mlp((8, 4, 3))
    pruned = prune(model, 0.99)
    assert {t.name: tuple(t.dims) for t in pruned.graph.initializer}["w0"] == (8, 1)
    assert _run(pruned, np.ones((2, 8), np.float32)).shape == (2, 3)


def _conv_net() -> onnx.ModelProto:
    w0 = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b0 = RNG.standard_normal(8).astype(np.float32)
    bn = [np.abs(RNG.standard_normal(8)).astype(np.float32) + 0.5 for _ in range(4)]
    w1 = RNG.standard_normal((4, 8, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [(w0, "w0"), (b0, "b0"), (w1, "w1")]]
    inits += [numpy_helper.from_array(a, n) for a, n in zip(bn, ["g", "beta", "mean", "var"], strict=True)]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c0", "g", "beta", "mean", "var"], ["n0"]),
        helper.make_node("Relu", ["n0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])],
        inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def test_conv_channels_are_removed_through_batchnorm() -> None:
    model = _conv_net()
    pruned = prune(model, 0.5)
    shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert shapes["w0"] == (4, 3, 3, 3) and shapes["w1"] == (4, 4, 3, 3)
    assert shapes["b0"] == shapes["g"] == shapes["var"] == (4,)
    x = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    assert _run(pruned, x).shape == _run(model, x).shape
    assert flops_per_row(pruned) < flops_per_row(model) / 1.9


def test_graph_without_hidden_layers_is_refused() -> None:
    model, _ = _mlp((8, 3))
    assert find_boundaries(model) == []
    with pytest.raises(ConfigError, match="nothing to prune"):
        prune(model, 0.5)


def test_shared_weights_are_not_pruned() -> None:
    model, _ = _mlp((8, 8, 8))
    model.graph.node[3].input[1] = "w0"  # the second MatMul reuses the first weight
    del model.graph.initializer[2]
    with pytest.raises(ConfigError, match="nothing to prune"):
        prune(model, 0.5)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5])
def test_ratio_must_be_a_fraction(ratio: float) -> None:
    model, _ = _mlp((8, 8, 3))
    with pytest.raises(ConfigError, match="ratio"):
        prune(model, ratio)
