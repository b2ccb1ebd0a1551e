"""ONNX Runtime: the default backend, on the CPU or (with onnxruntime-gpu) on a GPU instance.

Each instance is its own InferenceSession. Thread settings are explicit:
on a 2-core sidecar, ORT's spinning intra-op threads steal the core the gRPC
server needs, so spinning is off unless the config turns it on. A GPU
instance gets the CUDA (and, when asked, TensorRT) execution provider on its
device and runs through I/O binding with page-locked buffers (ort_gpu.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tidal.backends import cuda, ort_gpu
from tidal.backends.base import BackendOptions
from tidal.errors import BackendError, ConfigError
from tidal.types import DataType, TensorSpec

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(bool)": DataType.BOOL,
    "tensor(uint8)": DataType.UINT8,
    "tensor(uint16)": DataType.UINT16,
    "tensor(uint32)": DataType.UINT32,
    "tensor(uint64)": DataType.UINT64,
    "tensor(int8)": DataType.INT8,
    "tensor(int16)": DataType.INT16,
    "tensor(int32)": DataType.INT32,
    "tensor(int64)": DataType.INT64,
    "tensor(float16)": DataType.FP16,
    "tensor(float)": DataType.FP32,
    "tensor(double)": DataType.FP64,
    "tensor(string)": DataType.BYTES,
}

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(options: BackendOptions) -> ort.SessionOptions:
    """Session settings shared by serving and offline profiling, so both measure the same thing."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = _LEVELS.get(options.graph_optimization_level, _LEVELS["all"])
    spin = "1" if options.allow_spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    so.log_severity_level = 3
    return so


def _specs(args: list[ort.NodeArg]) -> list[TensorSpec]:
    specs = []
    for arg in args:
        dtype = _ORT_TYPES.get(arg.type)
        if dtype is None:
            raise ConfigError(f"tensor '{arg.name}' has type {arg.type}, which tidal does not serve")
        shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
        specs.append(TensorSpec(arg.name, dtype, shape))
    return specs


class OnnxRuntimeBackend:
    """One InferenceSession; see tidal.backends.base for the threading contract."""

    def __init__(self, path: Path, options: BackendOptions) -> None:
        wanted = ort_gpu.providers(path, options, ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(str(path), session_options(options), providers=wanted)
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise ConfigError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc
        self._inputs = _specs(self._session.get_inputs())
        self._outputs = _specs(self._session.get_outputs())
        self._strings = {s.name for s in self._inputs if s.datatype is DataType.BYTES}
        self._io: ort_gpu.PinnedIo | None = None
        self._staging: cuda.PinnedPool | None = None
        if options.device == "gpu":
            ort_gpu.check_started(path, wanted, self._session.get_providers())
            self._io = self._pinned_io(path, options.max_batch_size > 0)

    def _pinned_io(self, path: Path, batching: bool) -> ort_gpu.PinnedIo | None:
        """I/O binding through pinned buffers when tidal's CUDA runtime is built; ORT's own copies otherwise."""
        if self._strings:
            return None
        try:
            rt = cuda.runtime()
        except cuda.GpuUnavailable as exc:
            log.info("%s: inputs and outputs copied by ONNX Runtime from pageable memory (%s)", path, exc)
            return None
        self._staging = cuda.PinnedPool(rt)
        # An output is bound ahead, sized from the batch's rows, only where its dim 0 is the batch: a batching
        # model's dynamic dim 0. Any other output is allocated by ONNX Runtime once its shape is known.
        fixed = {s.name: (s.datatype.np_dtype, s.shape[1:]) for s in self._outputs
                 if batching and s.shape and s.shape[0] == -1 and -1 not in s.shape[1:]
                 and s.datatype is not DataType.BYTES}
        return ort_gpu.PinnedIo(self._session, self._staging, fixed)

    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        feed = {name: _to_ort_strings(arr) if name in self._strings else arr for name, arr in inputs.items()}
        try:
            if self._io is not None:
                return self._io.run(feed, output_names)
            results = self._session.run(list(output_names), feed)
        except Exception as exc:  # the backend's message is what the client needs to see
            raise BackendError(f"onnxruntime: {exc}") from exc
        return dict(zip(output_names, results, strict=True))

    def close(self) -> None:
        self._io = None
        del self._session
        if self._staging is not None:
            self._staging.close()


def gpu_unavailable() -> str | None:
    if ort_gpu.CUDA_EP not in ort.get_available_providers():
        return ort_gpu.cuda_missing(ort.get_available_providers())
    return None


def _to_ort_strings(arr: np.ndarray) -> np.ndarray:
    """ORT string tensors take str objects; the wire carries bytes."""
    flat = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.reshape(-1)]
    return np.array(flat, dtype=object).reshape(arr.shape)


def load(path: Path, options: BackendOptions) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(path, options)
