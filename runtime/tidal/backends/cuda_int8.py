"""The `int8` backend on a GPU instance: the same QDQ chains as int8.py, each product on tidal's CUDA GEMM.

The graph is read exactly as the CPU backend reads it (int8.parse), so the same models load and the same
ones are refused. Weights go to the device once, transposed to N x K as the kernel wants them; every batch
runs each layer's s8 x s8 -> s32 product on the instance's stream (`mma` tensor-core tiles on sm_80+,
`dp4a` before that; `parameters { key: "cuda_algo" }` forces one). The zero-point terms and the epilogue
(scale, rounding points, bias, ReLU, requantization) are applied on the host between layers, in float32
in the order the CPU kernels apply them, so both backends give the same bytes; moving the epilogue onto
the device, which would drop the per-layer round trip, is the next step for small batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tidal.backends import cuda
from tidal.backends.base import BackendOptions
from tidal.backends.int8 import Layer, LayerPlan, parse
from tidal.errors import BackendError, InvalidArgument
from tidal.types import TensorSpec


def _round_clip(v: np.ndarray, inv: np.float32, lo: float, hi: float) -> np.ndarray:
    return np.clip(np.rint(v * inv), np.float32(lo), np.float32(hi))


def quantize_input(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """fp32 -> u8 as the CPU kernels do: saturate(round_half_even(x / scale) + zero_point)."""
    q = np.rint(x / np.float32(scale)) + np.float32(zero_point)
    return np.clip(q, 0, 255).astype(np.uint8)


def epilogue(acc: np.ndarray, layer: Layer) -> np.ndarray:
    """int32 products (zero points already removed) -> the layer's output, in the CPU kernels' float32 order."""
    v = acc.astype(np.float32) * layer.scale
    if layer.mid is not None:
        scale, zero = layer.mid
        v = _round_clip(v, np.float32(1) / np.float32(scale), -zero, 255 - zero) * np.float32(scale)
    if layer.bias is not None:
        v = v + layer.bias
    if layer.output == "f32":
        return np.maximum(v, np.float32(0)) if layer.relu else v
    scale, zero = layer.out
    inv = np.float32(1) / np.float32(scale)
    q = _round_clip(v, inv, max(0.0, -zero) if layer.relu else -zero, 255 - zero)
    return (q + np.float32(zero)).astype(np.uint8) if layer.output == "u8" else q * np.float32(scale)


class _DeviceLayer:
    """One layer's weights on the device, with the sums its zero-point terms need."""

    def __init__(self, rt: Any, stream: cuda.Stream, layer: Layer) -> None:
        k, n = layer.weights.shape
        self.layer, self.k, self.n, self.k_pad = layer, k, n, -(-k // 4) * 4
        bt = np.zeros((n, self.k_pad), np.int8)
        bt[:, :k] = layer.weights.T
        self.weights = cuda.DeviceBuffer(rt, bt.nbytes)
        rt.cuda_memcpy_async(self.weights.ptr, bt.ctypes.data, bt.nbytes, stream.handle)
        stream.synchronize()  # `bt` is pageable and goes out of scope
        self.w_sum = layer.weights.astype(np.int64).sum(axis=0)  # per output column
        self.w_zero = layer.w_zero_point.astype(np.int64)


class CudaInt8Backend:
    """One instance on one GPU; see tidal.backends.base for the threading contract."""

    def __init__(self, plan: LayerPlan, input_spec: TensorSpec, output_spec: TensorSpec, rt: Any,
                 options: BackendOptions) -> None:
        self._plan, self._input, self._output, self._rt = plan, input_spec, output_spec, rt
        self._device = options.device_id
        rt.cuda_set_device(self._device)
        self._algo = options.parameters.get("cuda_algo") or ("mma" if rt.cuda_device_sm() >= 80 else "dp4a")
        self._stream = cuda.Stream(rt)
        self._staging = cuda.Staging(rt, self._stream)
        self._layers = [_DeviceLayer(rt, self._stream, layer) for layer in plan.layers]
        self._a, self._c = cuda.DeviceBuffer(rt), cuda.DeviceBuffer(rt)

    def inputs(self) -> list[TensorSpec]:
        return [self._input]

    def outputs(self) -> list[TensorSpec]:
        return [self._output]

    def _product(self, a_u8: np.ndarray, dl: _DeviceLayer) -> np.ndarray:
        """sum_k (a - a_zero) * (w - w_zero) for every row, the s8 x s8 part on the GPU."""
        m = a_u8.shape[0]
        a_s8 = np.zeros((m, dl.k_pad), np.int8)
        a_s8[:, : dl.k] = (a_u8.astype(np.int16) - 128).astype(np.int8)
        za = dl.layer.a_zero_point - 128
        self._staging.upload("a", a_s8, self._a.reserve(a_s8.nbytes))
        c_ptr = self._c.reserve(m * dl.n * 4)
        self._rt.cuda_gemm_s8_ptr(self._a.ptr, dl.weights.ptr, c_ptr, m, dl.n, dl.k_pad, self._algo,
                                  self._stream.handle)
        raw = self._staging.download("c", c_ptr, np.int32, (m, dl.n))
        self._stream.synchronize()
        row_sum = a_s8.astype(np.int64).sum(axis=1, keepdims=True)
        acc = raw.astype(np.int64) - za * dl.w_sum - (row_sum - dl.k * za) * dl.w_zero
        return acc.astype(np.int32)

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        for name in output_names:
            if name != self._output.name:
                raise InvalidArgument(f"unknown output '{name}' (the model has '{self._output.name}')")
        x, k = inputs.get(self._input.name), self._layers[0].k
        if x is None or x.dtype != np.float32 or x.ndim < 1 or x.shape[-1] != k:
            got = "nothing" if x is None else f"{x.dtype} {x.shape}"
            raise InvalidArgument(f"input '{self._input.name}' must be float32 [..., {k}], got {got}")
        self._rt.cuda_set_device(self._device)
        y = quantize_input(x.reshape(-1, k), self._plan.input_scale, self._plan.input_zero_point)
        try:
            for dl in self._layers:
                y = epilogue(self._product(y, dl), dl.layer)
        except RuntimeError as exc:  # CUDA errors from tidal._kernels
            raise BackendError(f"int8 (CUDA): {exc}") from exc
        if self._plan.signed_output:  # s8 results travel as u8 + 128, as on the CPU
            y = (y ^ np.uint8(0x80)).view(np.int8)
        return {self._output.name: y.reshape(*x.shape[:-1], y.shape[-1])}

    def close(self) -> None:
        for dl in self._layers:
            dl.weights.close()
        self._a.close()
        self._c.close()
        self._staging.close()
        self._stream.close()


def gpu_unavailable() -> str | None:
    reason = cuda.unavailable_reason()
    if reason is None and cuda.runtime().cuda_device_sm() < 61:
        return "the CUDA int8 GEMM needs compute capability 6.1 or newer (dp4a)"
    return reason


def load(path: Path, options: BackendOptions) -> CudaInt8Backend:
    reason = gpu_unavailable()
    if reason is not None:
        raise cuda.GpuUnavailable(f"int8 backend on GPU: {reason}")
    input_spec, output_spec, plan = parse(path)
    return CudaInt8Backend(plan, input_spec, output_spec, cuda.runtime(), options)


__all__ = ["CudaInt8Backend", "epilogue", "gpu_unavailable", "load", "quantize_input"]
