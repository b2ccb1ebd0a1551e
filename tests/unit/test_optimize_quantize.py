"""Precision variants: offline fp32 optimization, static/dynamic INT8 and fp16 on a trained classifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from tidal.errors import ConfigError
from tidal.optimize import quantize
from tidal.optimize.data import Dataset
from tidal.optimize.evaluate import predict, score
from tidal.optimize.reference import synthetic_classification, train_classifier
from tidal.optimize.train import TrainConfig


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset, Dataset]:
    x, y = synthetic_classification(1500, 16, 4, seed=3, spread=1.5)
    model = train_classifier(x[:1000], y[:1000], (64, 64), TrainConfig(epochs=10, seed=3))
    folder = tmp_path_factory.mktemp("quant")
    onnx.save(model, str(folder / "source.onnx"))
    quantize.optimize_fp32(folder / "source.onnx", folder / "model.onnx")
    return folder, Dataset({"input": x[:1000]}, y[:1000], "cal"), Dataset({"input": x[1000:]}, y[1000:], "val")


def test_fp32_offline_optimization_keeps_standard_ops_and_outputs(trained: tuple[Path, Dataset, Dataset]) -> None:
    folder, _, val = trained
    model = onnx.load(str(folder / "model.onnx"))
    assert {n.domain for n in model.graph.node} == {""}
    assert [o.domain for o in model.opset_import] == [""]
    np.testing.assert_allclose(predict(folder / "model.onnx", val), predict(folder / "source.onnx", val), atol=1e-4)


def test_static_int8_is_qdq_s8s8_per_channel_and_accurate(trained: tuple[Path, Dataset, Dataset]) -> None:
    folder, cal, val = trained
    quantize.quantize_int8_static(folder / "model.onnx", folder / "int8.onnx", cal)
    model = onnx.load(str(folder / "int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {t.name: t for t in model.graph.initializer}
    int8_weights = [t for t in inits.values() if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8_weights) == 3  # every Gemm weight stored as int8
    per_channel = [
        n for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in {t.name for t in int8_weights}
    ]  # fmt: skip
    assert all(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1 for n in per_channel)
    activation_zero_points = [
        inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits
    ]
    assert activation_zero_points and all(z.data_type == TensorProto.INT8 for z in activation_zero_points)
    reference = predict(folder / "model.onnx", val)
    acc = score(predict(folder / "int8.onnx", val), reference, val.labels)
    assert acc.top1_agreement >= 0.97
    assert acc.value >= score(reference, reference, val.labels).value - 0.02


def test_dynamic_int8(trained: tuple[Path, Dataset, Dataset]) -> None:
    folder, _, val = trained
    fp32 = onnx.load(str(folder / "model.onnx"))
    assert quantize.suits_dynamic(fp32)
    quantize.quantize_int8_dynamic(folder / "model.onnx", folder / "dyn.onnx")
    ops = {n.op_type for n in onnx.load(str(folder / "dyn.onnx")).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    acc = score(predict(folder / "dyn.onnx", val), predict(folder / "model.onnx", val), None)
    assert acc.metric == "top1_agreement" and acc.value >= 0.95


def _largest_int8_weight(path: Path) -> int:
    inits = onnx.load(str(path)).graph.initializer
    return max(int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max()) for t in inits
               if t.data_type == TensorProto.INT8 and len(t.dims) == 2)  # fmt: skip


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_reduce_range_makes_seven_bit_weights(trained: tuple[Path, Dataset, Dataset], dynamic: bool) -> None:
    # |w| <= 64 keeps every u8 x s8 pair sum (2 * 255 * 64) inside int16: what hosts without VNNI need.
    folder, cal, val = trained
    full, seven = folder / f"full-{dynamic}.onnx", folder / f"seven-{dynamic}.onnx"
    for path, reduce_range in ((full, False), (seven, True)):
        if dynamic:
            quantize.quantize_int8_dynamic(folder / "model.onnx", path, reduce_range=reduce_range)
        else:
            quantize.quantize_int8_static(folder / "model.onnx", path, cal, reduce_range=reduce_range)
    assert _largest_int8_weight(full) > 64 >= _largest_int8_weight(seven)
    acc = score(predict(seven, val), predict(folder / "model.onnx", val), val.labels)
    assert acc.top1_agreement >= 0.95


def test_dynamic_int8_does_not_suit_convolutions() -> None:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"])], "c",
        [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")],
    )  # fmt: skip
    assert not quantize.suits_dynamic(onnx.helper.make_model(graph))


def test_fp16_keeps_fp32_edges(trained: tuple[Path, Dataset, Dataset]) -> None:
    folder, _, val = trained
    fp32 = onnx.load(str(folder / "model.onnx"))
    half = quantize.convert_fp16(fp32)
    assert all(t.data_type == TensorProto.FLOAT16 for t in half.graph.initializer)
    assert [v.type.tensor_type.elem_type for v in [*half.graph.input, *half.graph.output]] == [TensorProto.FLOAT] * 2
    onnx.save(half, str(folder / "fp16.onnx"))
    reference = predict(folder / "model.onnx", val)
    np.testing.assert_allclose(predict(folder / "fp16.onnx", val), reference, atol=0.05 * np.abs(reference).max())


def test_unknown_calibration_method(trained: tuple[Path, Dataset, Dataset]) -> None:
    folder, cal, _ = trained
    with pytest.raises(ConfigError, match="calibration method"):
        quantize.quantize_int8_static(folder / "model.onnx", folder / "x.onnx", cal, method="magic")


def test_unloadable_model_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="cannot load"):
        quantize.optimize_fp32(tmp_path / "bad.onnx", tmp_path / "out.onnx")
