"""Device memory, page-locked host memory and streams for the GPU backends, over tidal._kernels.

tidal._kernels, when built with a CUDA toolkit, exposes the few CUDA runtime calls the backends need as
functions on integer handles (kernels/cuda/runtime_binding.cpp); these classes give each handle an owner
that frees it once. Tests pass a fake runtime with the same functions (tests/gpu_fakes.py).

Threading: a Stream and the buffers used on it belong to one backend instance, so to one worker thread.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from tidal.errors import ConfigError


class GpuUnavailable(ConfigError):
    """This GPU backend cannot run here (no CUDA build, no device, an engine's libraries missing)."""


def runtime() -> Any:
    """The CUDA half of tidal._kernels; GpuUnavailable when this build or host has none."""
    try:
        from tidal import _kernels
    except ImportError as exc:
        raise GpuUnavailable(f"tidal._kernels is not built ({exc})") from exc
    if not _kernels.HAS_CUDA:
        raise GpuUnavailable("tidal was built without a CUDA toolkit (no nvcc at install); reinstall where one is")
    if not hasattr(_kernels, "cuda_device_count"):
        raise GpuUnavailable("tidal._kernels predates the CUDA runtime calls; reinstall tidal (make install)")
    if _kernels.cuda_device_count() == 0:
        raise GpuUnavailable("the CUDA runtime sees no device (driver missing or too old for the toolkit tidal used)")
    return _kernels


def unavailable_reason() -> str | None:
    try:
        runtime()
    except GpuUnavailable as exc:
        return str(exc)
    return None


class Stream:
    """One non-blocking stream on the device current for the creating thread."""

    def __init__(self, rt: Any) -> None:
        self._rt = rt
        self.handle: int = rt.cuda_stream_create()

    def synchronize(self) -> None:
        self._rt.cuda_stream_synchronize(self.handle)

    def close(self) -> None:
        if self.handle:
            self._rt.cuda_stream_destroy(self.handle)
            self.handle = 0


class DeviceBuffer:
    """Device memory that grows to the largest size asked for (a batch larger than any before)."""

    def __init__(self, rt: Any, nbytes: int = 0) -> None:
        self._rt, self.ptr, self.nbytes = rt, 0, 0
        if nbytes:
            self.reserve(nbytes)

    def reserve(self, nbytes: int) -> int:
        """The address of at least `nbytes`; earlier contents are lost when it grows."""
        if nbytes > self.nbytes:
            self.close()
            self.ptr, self.nbytes = self._rt.cuda_malloc(nbytes), nbytes
        return self.ptr

    def close(self) -> None:
        if self.ptr:
            self._rt.cuda_free(self.ptr)
            self.ptr, self.nbytes = 0, 0


class PinnedBuffer:
    """Page-locked host memory, grown like DeviceBuffer, seen from Python as numpy arrays."""

    def __init__(self, rt: Any) -> None:
        self._rt, self.ptr, self.nbytes = rt, 0, 0

    def array(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A view of the buffer as `shape` of `dtype` (valid until the next call or close)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes > self.nbytes:
            self.close()
            self.ptr, self.nbytes = self._rt.cuda_host_alloc(nbytes), nbytes
        raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(self.ptr)
        return np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)

    def close(self) -> None:
        if self.ptr:
            self._rt.cuda_free_host(self.ptr)
            self.ptr, self.nbytes = 0, 0


class PinnedPool:
    """Page-locked host buffers, one per tensor name, reused from batch to batch."""

    def __init__(self, rt: Any) -> None:
        self._rt = rt
        self._host: dict[str, PinnedBuffer] = {}

    def host(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        return self._host.setdefault(name, PinnedBuffer(self._rt)).array(dtype, shape)

    def close(self) -> None:
        for buffer in self._host.values():
            buffer.close()
        self._host.clear()


class Staging(PinnedPool):
    """Host <-> device copies through the pool's buffers, queued on one stream."""

    def __init__(self, rt: Any, stream: Stream) -> None:
        super().__init__(rt)
        self._stream = stream

    def upload(self, name: str, value: np.ndarray, device_ptr: int) -> None:
        """Queue the copy of `value` to `device_ptr` (through its pinned buffer, so it is truly asynchronous)."""
        staged = self.host(name, value.dtype, value.shape)
        np.copyto(staged, value)
        self._rt.cuda_memcpy_async(device_ptr, staged.ctypes.data, staged.nbytes, self._stream.handle)

    def download(self, name: str, device_ptr: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """Queue the copy back; the returned view is filled once the stream is synchronized."""
        staged = self.host(name, dtype, shape)
        self._rt.cuda_memcpy_async(staged.ctypes.data, device_ptr, staged.nbytes, self._stream.handle)
        return staged


__all__ = ["DeviceBuffer", "GpuUnavailable", "PinnedBuffer", "PinnedPool", "Staging", "Stream", "runtime",
           "unavailable_reason"]
