"""The int8 backend against the exact execution of the same QDQ model, on every kernel path this CPU runs.

The oracle is ONNX Runtime with graph optimizations off (see mlp_qdq.exact_reference), never its fused int8
path: on AVX2 hosts without VNNI that path saturates u8 x s8 pair sums while tidal's kernels stay exact.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import onnx
import pytest
from mlp_qdq import exact_reference, mlp, quantize
from onnx import TensorProto, helper

from tidal import _kernels
from tidal.backends import factory
from tidal.backends.base import BackendOptions
from tidal.backends.int8 import Int8Unsupported, load
from tidal.errors import ConfigError, InvalidArgument
from tidal.types import DataType, TensorSpec

# K = 37 is not a multiple of 4 and N = 51 is odd; the last layer is narrower than a 16-column panel.
DIMS = [37, 96, 51, 10]


def _output_scale(path: Path) -> float:
    """Scale of the QuantizeLinear that feeds the graph output: one step of the model's own resolution."""
    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    dq = producer[model.graph.output[0].name]
    scale = next(i for i in model.graph.initializer if i.name == dq.input[1])
    return float(onnx.numpy_helper.to_array(scale))


def _run(path: Path, x: np.ndarray, isa: str, threads: int = 0) -> np.ndarray:
    backend = load(path, BackendOptions(intra_op_threads=threads, parameters={"isa": isa}))
    name = backend.outputs()[0].name
    try:
        return backend.run({"x": x}, [name])[name]
    finally:
        backend.close()


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul-add", "gemm"])
@pytest.mark.parametrize("signed", [False, True], ids=["u8-act", "s8-act"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
@pytest.mark.parametrize("spread", [1.0, 6.0], ids=["in-range", "saturating-input"])
def test_matches_exact_reference(tmp_path: Path, gemm: bool, signed: bool, per_channel: bool, spread: float) -> None:
    # spread 6 puts most activations at the ends of their range (u8 0 or 255): the largest pair sums, where a
    # saturating u8 x s8 kernel (MLAS on AVX2) is furthest from the exact result.
    path = quantize(mlp(DIMS, gemm=gemm), tmp_path, signed=signed, per_channel=per_channel)
    x = (np.random.default_rng(1).standard_normal((33, DIMS[0])) * spread).astype(np.float32)
    expected = exact_reference(path).run(None, {"x": x})[0]
    tolerance = _output_scale(path) * 1.001  # at most one quantization step, from float rounding order
    for isa in _kernels.isas():
        got = _run(path, x, isa)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance, err_msg=f"isa={isa}")


@pytest.mark.parametrize("batch", [1, 2, 64])
def test_batches_and_threads(tmp_path: Path, batch: int) -> None:
    path = quantize(mlp([64, 256, 512, 16]), tmp_path)
    x = np.random.default_rng(batch).standard_normal((batch, 64)).astype(np.float32)
    expected = exact_reference(path).run(None, {"x": x})[0]
    tolerance = _output_scale(path) * 1.001
    for isa in _kernels.isas():
        for threads in (0, 1):
            got = _run(path, x, isa, threads)
            np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance, err_msg=f"isa={isa} threads={threads}")


def test_leading_dims_are_kept(tmp_path: Path) -> None:
    path = quantize(mlp([24, 32, 8], leading=("B", "S")), tmp_path, calibration_shape=(2, 5, 24))
    x = np.random.default_rng(2).standard_normal((3, 4, 24)).astype(np.float32)
    expected = exact_reference(path).run(None, {"x": x})[0]
    for isa in _kernels.isas():
        got = _run(path, x, isa)
        assert got.shape == (3, 4, 8)
        np.testing.assert_allclose(got, expected, rtol=0, atol=_output_scale(path) * 1.001, err_msg=f"isa={isa}")


def test_describes_inputs_and_outputs(tmp_path: Path) -> None:
    backend = load(quantize(mlp(DIMS), tmp_path), BackendOptions())
    assert backend.inputs() == [TensorSpec("x", DataType.FP32, (-1, 37))]
    [out] = backend.outputs()
    assert (out.datatype, out.shape) == (DataType.FP32, (-1, 10))
    assert backend.isa == _kernels.best_isa()


def test_registered_as_int8(tmp_path: Path) -> None:
    backend = factory("int8")(quantize(mlp(DIMS), tmp_path), BackendOptions())
    assert backend.inputs()[0].name == "x"


def test_bad_requests_are_invalid_argument(tmp_path: Path) -> None:
    backend = load(quantize(mlp(DIMS), tmp_path), BackendOptions())
    name = backend.outputs()[0].name
    with pytest.raises(InvalidArgument, match="float32"):
        backend.run({"x": np.ones((2, 37), np.float64)}, [name])
    with pytest.raises(InvalidArgument, match=r"\[..., 37\]"):
        backend.run({"x": np.ones((2, 36), np.float32)}, [name])
    with pytest.raises(InvalidArgument):
        backend.run({"y": np.ones((2, 37), np.float32)}, [name])
    with pytest.raises(InvalidArgument, match="unknown output"):
        backend.run({"x": np.ones((2, 37), np.float32)}, ["nope"])


def test_unknown_isa_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown isa"):
        load(quantize(mlp(DIMS), tmp_path), BackendOptions(parameters={"isa": "mmx"}))


def _with_node_after_first_layer(model: onnx.ModelProto, op: str) -> onnx.ModelProto:
    """Inserts `op` between the first ReLU and the next layer of a float MLP."""
    graph = model.graph
    relu = next(n for n in graph.node if n.op_type == "Relu")
    for node in graph.node:
        node.input[:] = ["extra_out" if i == relu.output[0] else i for i in node.input]
    graph.node.insert(list(graph.node).index(relu) + 1,
                      helper.make_node(op, [relu.output[0]], ["extra_out"], name="the_extra_node"))
    return model


@pytest.mark.parametrize("op", ["Sigmoid", "Tanh"])
def test_unsupported_node_is_refused_by_name(tmp_path: Path, op: str) -> None:
    path = quantize(_with_node_after_first_layer(mlp(DIMS), op), tmp_path)
    with pytest.raises(Int8Unsupported, match=rf"the_extra_node.*\({op}\)"):
        load(path, BackendOptions())


def test_float_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fp32.onnx"
    onnx.save(mlp(DIMS), path)
    with pytest.raises(Int8Unsupported, match="DequantizeLinear of a constant"):
        load(path, BackendOptions())


def test_residual_add_is_refused(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"], name="residual")], "g", [x], [y])
    path = tmp_path / "residual.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(Int8Unsupported, match=r"residual.*'x' must be a constant"):
        load(path, BackendOptions())


def test_two_inputs_are_refused(tmp_path: Path) -> None:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 8])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g", [a, b], [y])
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(Int8Unsupported, match="exactly one input"):
        load(path, BackendOptions())


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ConfigError):
        load(path, BackendOptions())


def _drop_final_dequantize(path: Path) -> Path:
    """The same QDQ model with its last DequantizeLinear removed: the graph output is the int8/uint8 tensor."""
    model = onnx.load(str(path))
    graph = model.graph
    dq = next(n for n in graph.node if graph.output[0].name in n.output)
    q_out = dq.input[0]
    zero_point = next(i for i in graph.initializer if i.name == dq.input[2])
    graph.node.remove(dq)
    shape = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    graph.output.pop()
    graph.output.append(helper.make_tensor_value_info(q_out, zero_point.data_type, shape))
    out = path.with_name("quantized_output.onnx")
    onnx.save(model, out)
    return out


@pytest.mark.parametrize("signed", [False, True], ids=["u8-out", "s8-out"])
def test_quantized_output(tmp_path: Path, signed: bool) -> None:
    path = _drop_final_dequantize(quantize(mlp(DIMS), tmp_path, signed=signed))
    x = np.random.default_rng(3).standard_normal((17, DIMS[0])).astype(np.float32)
    expected = exact_reference(path).run(None, {"x": x})[0]
    for isa in _kernels.isas():
        backend = load(path, BackendOptions(parameters={"isa": isa}))
        [out] = backend.outputs()
        assert out.datatype == (DataType.INT8 if signed else DataType.UINT8)
        got = backend.run({"x": x}, [out.name])[out.name]
        assert got.dtype == expected.dtype
        assert np.abs(got.astype(np.int32) - expected.astype(np.int32)).max() <= 1, f"isa={isa}"


def test_chain_equals_layer_by_layer_kernels() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 30)).astype(np.float32)
    w1, w2 = (_kernels.PackedWeights(rng.integers(-128, 128, shape, dtype=np.int8)) for shape in [(30, 21), (21, 7)])
    s1, s2 = (rng.uniform(1e-4, 1e-3, n).astype(np.float32) for n in (21, 7))
    bias = rng.standard_normal(21).astype(np.float32)
    chain = _kernels.Chain(0.02, 128)
    chain.add_layer(w1, s1, 128, bias=bias, relu=True, mid=(0.05, 3), out=(0.04, 0))
    chain.add_layer(w2, s2, 0, out=(0.1, 100), output="dequantize")
    assert len(chain) == 2

    a = _kernels.quantize_u8(x, 0.02, 128)
    h = _kernels.gemm_u8(a, w1, s1, 0.04, 0, 128, bias=bias, relu=True, mid=(0.05, 3))
    q = _kernels.gemm_u8(h, w2, s2, 0.1, 100, 0)
    np.testing.assert_array_equal(chain.run(x), (q.astype(np.float32) - np.float32(100)) * np.float32(0.1))


def test_chain_refuses_mismatched_layers() -> None:
    chain = _kernels.Chain(0.1, 0)
    w = _kernels.PackedWeights(np.ones((8, 4), np.int8))
    with pytest.raises(ValueError, match="no layers"):
        chain.run(np.ones((1, 8), np.float32))
    chain.add_layer(w, np.ones(4, np.float32), 0, out=(0.1, 0))
    with pytest.raises(ValueError, match="does not match"):
        chain.add_layer(w, np.ones(4, np.float32), 0, out=(0.1, 0))
    with pytest.raises(ValueError, match="K = 8"):
        chain.run(np.ones((1, 5), np.float32))
    with pytest.raises(ValueError, match="required"):
        _kernels.Chain(0.1, 0).add_layer(w, np.ones(4, np.float32), 0)


def test_chain_keeps_its_weights_alive() -> None:
    chain = _kernels.Chain(0.1, 0)
    chain.add_layer(_kernels.PackedWeights(np.full((8, 4), 2, np.int8)), np.ones(4, np.float32), 0, output="f32")
    gc.collect()  # the PackedWeights has no other reference now
    np.testing.assert_array_equal(chain.run(np.ones((2, 8), np.float32)), np.full((2, 4), 160, np.float32))
