"""ONNX Runtime on a GPU instance, without a GPU: the providers and their options, every refusal, and the
I/O binding through pinned buffers, against fakes of onnxruntime-gpu's providers and of CUDA memory."""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from gpu_fakes import FakeCudaRuntime
from onnx import TensorProto, helper, numpy_helper

import onnx_models as models
from tidal.backends import cuda, ort_gpu
from tidal.backends import onnxruntime as ort_backend
from tidal.backends.base import Accelerator, BackendOptions
from tidal.backends.cuda import GpuUnavailable
from tidal.optimize.graph import save_graph

GPU_EPS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
TRT = Accelerator("tensorrt", {"precision_mode": "FP16", "max_workspace_size_bytes": "1073741824"})


def _gpu(**kw) -> BackendOptions:
    return BackendOptions(device="gpu", device_id=1, max_batch_size=32, opt_batch_size=8, **kw)


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    return models.mlp(tmp_path / "mlp.onnx", (256, 64, 10))


def test_cpu_instances_get_the_cpu_provider_only(mlp: Path) -> None:
    assert ort_gpu.providers(mlp, BackendOptions(), GPU_EPS) == [("CPUExecutionProvider", {})]


def test_gpu_instance_gets_cuda_on_its_device_then_cpu(mlp: Path) -> None:
    chain = ort_gpu.providers(mlp, _gpu(), GPU_EPS)
    assert [name for name, _ in chain] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert chain[0][1]["device_id"] == "1" and chain[0][1]["cudnn_conv_algo_search"] == "HEURISTIC"


def test_tensorrt_ep_first_with_one_profile_and_a_cache(mlp: Path, tmp_path: Path) -> None:
    options = _gpu(gpu_accelerators=(TRT,), cache_dirs=(tmp_path / "repo", tmp_path / "cache"))
    (name, trt), (cuda_name, _), _ = ort_gpu.providers(mlp, options, GPU_EPS)
    assert (name, cuda_name) == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert trt["trt_profile_min_shapes"] == "INPUT:1x256"
    assert trt["trt_profile_opt_shapes"] == "INPUT:8x256"
    assert trt["trt_profile_max_shapes"] == "INPUT:32x256"
    assert trt["trt_engine_cache_path"] == str(tmp_path / "cache" / "ort-tensorrt")
    assert (trt["trt_fp16_enable"], trt["trt_int8_enable"]) == ("True", "False")
    assert trt["trt_max_workspace_size"] == "1073741824" and trt["device_id"] == "1"


def test_tensorrt_int8_only_for_explicit_qdq_models(tmp_path: Path) -> None:
    scale, zero = numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(128), "z")
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [scale, zero],
    )
    path = models.save_graph(graph, tmp_path / "qdq.onnx")
    trt = ort_gpu.providers(path, _gpu(gpu_accelerators=(Accelerator("tensorrt"),)), GPU_EPS)[0][1]
    assert (trt["trt_int8_enable"], trt["trt_fp16_enable"]) == ("True", "False")


def test_no_profile_when_a_dim_besides_the_batch_is_unknown(tmp_path: Path) -> None:
    path = models.add_sub(tmp_path / "m.onnx", width=4)
    assert ort_gpu.batch_shapes(path, 2) == "INPUT0:2x4,INPUT1:2x4"
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "w"])])
    trt = ort_gpu.providers(models.save_graph(graph, tmp_path / "v.onnx"), _gpu(gpu_accelerators=(TRT,)), GPU_EPS)
    assert not any(k.startswith("trt_profile") for k in trt[0][1])


def test_tensorrt_asked_for_but_absent_serves_on_cuda(mlp: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        chain = ort_gpu.providers(mlp, _gpu(gpu_accelerators=(TRT,)), GPU_EPS[1:])
    assert [n for n, _ in chain] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "no TensorrtExecutionProvider" in caplog.text


def test_without_cuda_ep_the_refusal_says_how_to_install(mlp: Path, monkeypatch) -> None:
    def no_gpu_wheel(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", no_gpu_wheel)
    replace = r"pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
    with pytest.raises(GpuUnavailable, match=rf"no CUDAExecutionProvider .*{replace}"):
        ort_gpu.providers(mlp, _gpu(), ["CPUExecutionProvider"])
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.31.1")
    with pytest.raises(GpuUnavailable, match=r"CPU-only onnxruntime was installed over it.*onnxruntime-gpu==1\.31\.1"):
        ort_gpu.providers(mlp, _gpu(), ["CPUExecutionProvider"])


def test_a_gpu_instance_that_ort_starts_on_the_cpu_is_refused(mlp: Path, monkeypatch) -> None:
    """ONNX Runtime drops a CUDA provider whose libraries fail to load; the backend must not serve on the CPU."""
    real_session = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers", lambda: GPU_EPS[1:])
    monkeypatch.setattr(
        ort, "InferenceSession", lambda path, so, providers: real_session(path, so, providers=["CPUExecutionProvider"])
    )
    with pytest.raises(GpuUnavailable, match="could not start CUDAExecutionProvider"):
        ort_backend.load(mlp, _gpu())
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert "no CUDAExecutionProvider" in ort_backend.gpu_unavailable()


class FakeBinding:
    """ORT's IOBinding over host addresses: 'runs' OUTPUT = 2 * INPUT reading and writing through them."""

    def __init__(self) -> None:
        self.inputs: dict[str, tuple] = {}
        self.outputs: list[tuple] = []

    def bind_input(self, name, device, device_id, element_type, shape, ptr) -> None:
        self.inputs[name] = (device, element_type, tuple(shape), ptr)

    def bind_output(self, name, device="cpu", device_id=0, element_type=None, shape=None, ptr=None) -> None:
        self.outputs.append((name, element_type, shape, ptr))

    def run(self) -> None:
        _, _, shape, ptr = self.inputs["INPUT"]
        n = int(np.prod(shape))
        x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(ptr)).reshape(shape)
        _, _, out_shape, out_ptr = self.outputs[0]
        out = np.ctypeslib.as_array((ctypes.c_float * n).from_address(out_ptr)).reshape(out_shape)
        out[:] = 2 * x

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        _, _, shape, ptr = self.outputs[0]
        return [np.ctypeslib.as_array((ctypes.c_float * int(np.prod(shape))).from_address(ptr)).reshape(shape).copy()]


class FakeSession:
    def __init__(self) -> None:
        self.bindings: list[FakeBinding] = []

    def io_binding(self) -> FakeBinding:
        self.bindings.append(FakeBinding())
        return self.bindings[-1]

    def run_with_iobinding(self, binding: FakeBinding) -> None:
        binding.run()


def test_pinned_io_stages_through_page_locked_buffers_reused_across_batches() -> None:
    rt, session = FakeCudaRuntime(), FakeSession()
    pool = cuda.PinnedPool(rt)
    io = ort_gpu.PinnedIo(session, pool, {"OUTPUT": (np.float32, (3,))})
    first = io.run({"INPUT": np.arange(6, dtype=np.float32).reshape(2, 3)}, ["OUTPUT"])["OUTPUT"]
    second = io.run({"INPUT": np.ones((1, 3), np.float32)}, ["OUTPUT"])["OUTPUT"]
    assert first.tolist() == [[0, 2, 4], [6, 8, 10]] and second.tolist() == [[2, 2, 2]]
    ptrs = [b.inputs["INPUT"][3] for b in session.bindings]
    assert ptrs[0] == ptrs[1] and ptrs[0] in rt.pinned  # one pinned buffer, reused for the smaller batch
    assert all(b.outputs[0][3] in rt.pinned for b in session.bindings)
    pool.close()
    assert rt.live() == 0


@pytest.fixture
def started_on_gpu(monkeypatch) -> FakeCudaRuntime:
    """A GPU instance's whole load and run path on this machine: a real CPU session that reports the CUDA
    provider started, ONNX Runtime's own I/O binding reading and writing the fake runtime's pinned buffers."""
    rt, real_session = FakeCudaRuntime(devices=2), ort.InferenceSession

    class Session:
        def __init__(self, path, so, providers) -> None:
            rt.sessions.append(providers)
            self._session = real_session(path, so, providers=["CPUExecutionProvider"])

        def get_providers(self) -> list[str]:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def __getattr__(self, name: str):
            return getattr(self._session, name)

    monkeypatch.setattr(ort, "get_available_providers", lambda: GPU_EPS[1:])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setattr(cuda, "runtime", lambda: rt)
    rt.sessions = []  # the providers each session was asked for
    return rt


def test_a_gpu_instance_runs_each_batch_through_pinned_buffers(mlp: Path, started_on_gpu: FakeCudaRuntime) -> None:
    gpu, cpu = ort_backend.load(mlp, _gpu()), ort_backend.load(mlp, BackendOptions())
    rng = np.random.default_rng(0)
    for rows in (2, 5, 1):
        x = rng.standard_normal((rows, 256)).astype(np.float32)
        assert np.allclose(gpu.run({"INPUT": x}, ["OUTPUT"])["OUTPUT"], cpu.run({"INPUT": x}, ["OUTPUT"])["OUTPUT"])
    provider, provider_options = started_on_gpu.sessions[0][0]
    assert provider == "CUDAExecutionProvider" and provider_options["device_id"] == "1"
    assert len(started_on_gpu.pinned) == 2  # the input's and the output's, each grown once and reused
    gpu.close()
    assert started_on_gpu.live() == 0


def test_an_output_whose_dim_0_is_not_the_batch_is_sized_by_onnx_runtime(
    tmp_path: Path, started_on_gpu: FakeCudaRuntime
) -> None:
    """A model that does not batch, whose output has another dim 0 than its input: binding the output ahead
    with the input's rows would make every run fail."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["INPUT", "axes"], ["OUTPUT"], keepdims=1)], "total",
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(np.array([0], np.int64), "axes")],
    )  # fmt: skip
    path = save_graph(graph, tmp_path / "total.onnx")
    backend = ort_backend.load(path, BackendOptions(device="gpu", device_id=0))
    x = np.arange(64, dtype=np.float32).reshape(4, 16)
    assert backend.run({"INPUT": x}, ["OUTPUT"])["OUTPUT"].tolist() == x.sum(0, keepdims=True).tolist()
    backend.close()


def test_tensorrt_ep_that_does_not_start_is_named_and_cuda_serves(mlp: Path, caplog) -> None:
    wanted = [(ort_gpu.TRT_EP, {}), (ort_gpu.CUDA_EP, {}), (ort_gpu.CPU_EP, {})]
    with caplog.at_level(logging.INFO, logger="tidal.backends.ort_gpu"):
        ort_gpu.check_started(mlp, wanted, [ort_gpu.CUDA_EP, ort_gpu.CPU_EP])
        ort_gpu.check_started(mlp, wanted, [ort_gpu.TRT_EP, ort_gpu.CUDA_EP, ort_gpu.CPU_EP])
    [(missing, level), (active, _)] = [(r.getMessage(), r.levelno) for r in caplog.records]
    assert "TensorRT libraries did not load; serving on CUDAExecutionProvider alone" in missing
    assert level == logging.WARNING and "TensorRT EP active" in active
