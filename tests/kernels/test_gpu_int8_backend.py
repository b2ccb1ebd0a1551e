"""The int8 backend on a GPU instance, without a GPU: the CUDA GEMM is replaced by the fake runtime's exact
int64 product on the bytes actually uploaded, so the zero-point terms, the K padding, the epilogue on the host
and the signed-output path must reproduce the CPU kernels byte for byte (and the exact QDQ reference within
one output step), and every device allocation must be released."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gpu_fakes import FakeCudaRuntime
from mlp_qdq import exact_reference, mlp, quantize

from tidal.backends import cuda, cuda_int8
from tidal.backends.base import BackendOptions
from tidal.backends.int8 import Int8Unsupported
from tidal.backends.int8 import load as load_cpu
from tidal.errors import InvalidArgument


@pytest.fixture
def rt(monkeypatch: pytest.MonkeyPatch) -> FakeCudaRuntime:
    fake = FakeCudaRuntime(devices=2)
    monkeypatch.setattr(cuda, "runtime", lambda: fake)
    monkeypatch.setattr(cuda, "unavailable_reason", lambda: None)
    return fake


def _both(path: Path, x: np.ndarray, options: BackendOptions) -> tuple[np.ndarray, np.ndarray]:
    gpu, cpu = cuda_int8.load(path, options), load_cpu(path, BackendOptions())
    name = cpu.outputs()[0].name
    try:
        return gpu.run({"x": x}, [name])[name], cpu.run({"x": x}, [name])[name]
    finally:
        gpu.close()
        cpu.close()


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul-add", "gemm"])
@pytest.mark.parametrize("signed", [False, True], ids=["u8-act", "s8-act"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_same_bytes_as_the_cpu_kernels(rt: FakeCudaRuntime, tmp_path: Path, gemm: bool, signed: bool,
                                       per_channel: bool) -> None:
    dims = [30, 64, 40, 10]  # K = 30 is not a multiple of 4: the GEMM sees it padded with zeros
    path = quantize(mlp(dims, gemm=gemm), tmp_path, signed=signed, per_channel=per_channel)
    x = (np.random.default_rng(3).standard_normal((17, dims[0])) * 3).astype(np.float32)
    got, cpu = _both(path, x, BackendOptions(device="gpu", device_id=1))
    assert got.dtype == cpu.dtype and np.array_equal(got, cpu)
    assert np.abs(got - exact_reference(path).run(None, {"x": x})[0]).max() < 0.5
    assert rt.current == 1 and {g[3] for g in rt.gemms} == {"mma"} and all(g[2] % 4 == 0 for g in rt.gemms)
    assert rt.live() == 0


def test_algo_follows_the_device_and_the_parameter(rt: FakeCudaRuntime, tmp_path: Path, monkeypatch) -> None:
    path = quantize(mlp([8, 16, 4]), tmp_path)
    x = np.ones((2, 8), np.float32)
    monkeypatch.setattr(rt, "cuda_device_sm", lambda: 75)
    _both(path, x, BackendOptions(device="gpu"))
    _both(path, x, BackendOptions(device="gpu", parameters={"cuda_algo": "mma"}))
    assert [g[3] for g in rt.gemms] == ["dp4a", "dp4a", "mma", "mma"]
    monkeypatch.setattr(rt, "cuda_device_sm", lambda: 52)
    assert "6.1 or newer" in cuda_int8.gpu_unavailable()


def test_refusals(rt: FakeCudaRuntime, tmp_path: Path) -> None:
    path = quantize(mlp([8, 16, 4]), tmp_path)
    backend = cuda_int8.load(path, BackendOptions(device="gpu"))
    with pytest.raises(InvalidArgument, match=r"must be float32 \[\.\.\., 8\]"):
        backend.run({"x": np.ones((2, 7), np.float32)}, [backend.outputs()[0].name])
    backend.close()
    with pytest.raises(Int8Unsupported):
        cuda_int8.load(tmp_path / "fp32.onnx", BackendOptions(device="gpu"))  # not QDQ: the same refusal as on CPU
