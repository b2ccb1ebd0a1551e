"""Latency profiles through the serving backends, with the settings recorded beside the numbers."""

from __future__ import annotations

import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tidal.backends import hardware
from tidal.backends.base import BackendOptions
from tidal.errors import ConfigError
from tidal.optimize.profile import ProfileSettings, current_hardware, measure, synthetic_batch
from tidal.types import DataType, TensorSpec


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [onnx.numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    path = tmp_path_factory.mktemp("profile") / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_batch_sizes_double_up_to_the_maximum() -> None:
    assert ProfileSettings(1).batch_sizes() == (1,)
    assert ProfileSettings(5).batch_sizes() == (1, 2, 4, 5)
    assert ProfileSettings(8).batch_sizes() == (1, 2, 4, 8)


@pytest.mark.parametrize("instances", [1, 2])
def test_profile_records_its_settings(model_path: Path, instances: int) -> None:
    settings = ProfileSettings(4, instances=instances, seconds_per_point=0.01, min_runs=5)
    seen: list[int] = []
    profile = measure(model_path, "onnxruntime", settings, seen.append)
    assert seen == [1, 2, 4] and profile.batch_sizes == (1, 2, 4)
    assert profile.instances == instances and profile.allow_spinning is False
    assert profile.intra_op_threads == max(1, hardware.cpu_info().cores // instances)
    points = zip(profile.batch_sizes, profile.p50_ms, profile.p99_ms, profile.throughput_rps, strict=True)
    for size, p50, p99, rps in points:
        assert p99 >= p50 > 0
        assert rps == pytest.approx(size * instances / (p50 / 1e3), rel=1e-2)  # p50 is rounded to 10 ns
    assert profile.hardware == current_hardware() and profile.hardware.cores >= 1


def test_unknown_backend_is_a_config_error(model_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown backend"):
        measure(model_path, "no-such-engine", ProfileSettings(2))


def test_synthetic_batch_follows_the_specs() -> None:
    feeds = synthetic_batch([TensorSpec("a", DataType.FP16, (-1, 3)), TensorSpec("b", DataType.INT32, (-1, 2, 2))], 5)
    assert feeds["a"].shape == (5, 3) and feeds["a"].dtype == np.float16
    assert feeds["b"].shape == (5, 2, 2) and feeds["b"].dtype == np.int32
    with pytest.raises(ConfigError, match="string input"):
        synthetic_batch([TensorSpec("s", DataType.BYTES, (-1, 1))], 1)


def test_a_gpu_host_profiles_each_variant_on_the_gpu_backends_too(model_path: Path, monkeypatch) -> None:
    """Under `backend@gpu`, through the GPU instance's loader with its options; the CPU choice stands, and a GPU
    backend that cannot run here is named, not measured."""
    from tidal import backends
    from tidal.backends import onnxruntime as ort_backend
    from tidal.backends.hardware import GpuInfo
    from tidal.optimize import pipeline

    asked: list[BackendOptions] = []

    def load(path: Path, options: BackendOptions) -> ort_backend.OnnxRuntimeBackend:  # a GPU that computes here
        asked.append(options)
        return ort_backend.OnnxRuntimeBackend(path, replace(options, device="cpu"))

    fake = types.ModuleType("fake_gpu_ort")
    fake.load, fake.gpu_unavailable = load, lambda: None
    monkeypatch.setitem(sys.modules, "fake_gpu_ort", fake)
    monkeypatch.setitem(backends._MODULES, ("onnxruntime", "gpu"), "fake_gpu_ort")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(hardware, "gpus", lambda: (GpuInfo(0, "NVIDIA H100", 81559, "9.0", "GPU-aaaa"),))
    settings = ProfileSettings(4, seconds_per_point=0.01, min_runs=5)
    feeds = synthetic_batch([TensorSpec("x", DataType.FP32, (-1, 8))], 16)
    lines: list[str] = []

    usable, profiles, choice = pipeline._profile(
        model_path, "fp32", ("onnxruntime",), ("cpu", "gpu"), settings, feeds, lines.append, False
    )
    assert set(profiles) == {"onnxruntime", "onnxruntime@gpu"} and usable == ("onnxruntime",)
    assert choice is not None and set(choice.measured) == {"onnxruntime"}  # exactness is checked on the CPU
    assert profiles["onnxruntime@gpu"].batch_sizes == (1, 2, 4)
    assert {(o.device, o.device_id, o.max_batch_size) for o in asked} == {("gpu", 0, 4)}

    usable, profiles, choice = pipeline._profile(
        model_path, "fp16", ("tensorrt",), ("gpu",), settings, feeds, lines.append, False
    )
    assert (usable, set(profiles), choice) == (("tensorrt",), {"onnxruntime@gpu"}, None)
    assert any(line.startswith("fp16: not profiled on tensorrt@gpu:") for line in lines), lines

    # After `tidal optimize --backend tensorrt` put TensorRT first: kept first, and never tried on the CPU.
    lines.clear()
    usable, profiles, _ = pipeline._profile(
        model_path, "fp32", ("tensorrt", "onnxruntime"), ("cpu", "gpu"), settings, feeds, lines.append, False
    )
    assert usable == ("tensorrt", "onnxruntime") and set(profiles) == {"onnxruntime", "onnxruntime@gpu"}
    assert not [line for line in lines if "cannot run it here" in line], lines
