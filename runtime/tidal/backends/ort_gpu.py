"""ONNX Runtime on a GPU: execution providers, their options, and I/O through page-locked buffers.

The CUDA execution provider runs the model on the instance's device; each instance is its own
InferenceSession, and each session's CUDA provider queues on its own stream, so instances on one GPU
overlap. TensorRT's execution provider goes in front when the config asks for it and
this onnxruntime has it (config parameters `gpu_accelerator: tensorrt`, optionally
`tensorrt_precision_mode: FP16` and `tensorrt_max_workspace_size_bytes`; tidal's protobuf config does not
carry Triton's optimization.execution_accelerators); its engines are cached on disk, keyed by ONNX Runtime
itself, and built with one profile from batch 1 to max_batch_size tuned at the preferred size. Nothing
here imports onnxruntime: onnxruntime.py passes in what it found, so the choices are testable without a GPU.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tidal.backends.base import Accelerator, BackendOptions
from tidal.backends.cuda import GpuUnavailable, PinnedPool

log = logging.getLogger(__name__)

CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
CPU_EP = "CPUExecutionProvider"

Provider = tuple[str, dict[str, str]]


def cuda_missing(available: Sequence[str]) -> str:
    """Why ONNX Runtime cannot use a GPU here, with the fix; the usual cause is two wheels in one folder."""
    try:
        gpu_wheel = importlib.metadata.version("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        gpu_wheel = None
    if gpu_wheel is None:
        return (f"onnxruntime has no {CUDA_EP} (providers: {', '.join(available)}); replace the CPU wheel by "
                "tidal's gpu extra: pip uninstall -y onnxruntime && pip install onnxruntime-gpu nvidia-ml-py")
    return (f"onnxruntime-gpu {gpu_wheel} is installed but the CPU-only onnxruntime was installed over it "
            f"(providers: {', '.join(available)}); run: pip uninstall -y onnxruntime onnxruntime-gpu && "
            f"pip install onnxruntime-gpu=={gpu_wheel}")


def _tensorrt(options: BackendOptions) -> Accelerator | None:
    return next((a for a in options.gpu_accelerators if a.name == "tensorrt"), None)


def batch_shapes(path: Path, batch: int) -> str | None:
    """'x:4x256,y:4x3' for every graph input at batch `batch`; None when a dim besides the batch is unknown."""
    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    parts = []
    for value in graph.input:
        if value.name in constants:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        if not dims or any(d <= 0 for d in dims[1:]):
            return None
        parts.append(f"{value.name}:{'x'.join(map(str, [batch, *dims[1:]]))}")
    return ",".join(parts)


def has_qdq(path: Path) -> bool:
    return any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path), load_external_data=False).graph.node)


def tensorrt_options(path: Path, options: BackendOptions, accelerator: Accelerator) -> dict[str, str]:
    """TensorRT EP settings: on-disk engine and timing caches, precision from the config or the model."""
    params = accelerator.parameters
    cache = (options.cache_dirs[-1] if options.cache_dirs else Path(".")) / "ort-tensorrt"
    trt = {
        "device_id": str(options.device_id),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": str(params.get("precision_mode", "").upper() == "FP16"),
        "trt_int8_enable": str(has_qdq(path)),  # explicit Q/DQ only; no calibration table is ever used
    }
    if "max_workspace_size_bytes" in params:
        trt["trt_max_workspace_size"] = params["max_workspace_size_bytes"]
    if options.max_batch_size > 0:
        shapes = {k: batch_shapes(path, b) for k, b in
                  (("min", 1), ("opt", options.opt_batch), ("max", options.max_batch_size))}
        if all(shapes.values()):
            trt.update({f"trt_profile_{k}_shapes": v for k, v in shapes.items() if v})
    return trt


def cuda_options(options: BackendOptions) -> dict[str, str]:
    params = options.parameters
    cuda = {
        "device_id": str(options.device_id),
        # Exhaustive search benchmarks every convolution at load and per new shape; a heuristic is instant.
        "cudnn_conv_algo_search": params.get("cudnn_conv_algo_search", "HEURISTIC"),
        "arena_extend_strategy": "kSameAsRequested",  # grows by what a batch needs, not by doubling
    }
    if "gpu_mem_limit" in params:
        cuda["gpu_mem_limit"] = params["gpu_mem_limit"]
    return cuda


def providers(path: Path, options: BackendOptions, available: Sequence[str]) -> list[Provider]:
    """The execution providers, best first, for an instance on `options.device`."""
    if options.device == "cpu":
        return [(CPU_EP, {})]
    if CUDA_EP not in available:
        raise GpuUnavailable(cuda_missing(available))
    chain: list[Provider] = []
    accelerator = _tensorrt(options)
    if accelerator is not None and TRT_EP in available:
        chain.append((TRT_EP, tensorrt_options(path, options, accelerator)))
    elif accelerator is not None:
        log.warning("%s: the config asks for TensorRT but this onnxruntime has no %s; CUDA only", path, TRT_EP)
    return [*chain, (CUDA_EP, cuda_options(options)), (CPU_EP, {})]


def check_started(path: Path, wanted: Sequence[Provider], started: Sequence[str]) -> None:
    """ONNX Runtime drops a provider whose libraries fail to load and goes on without it: say so, and
    refuse a GPU instance that would silently run on the CPU."""
    if CUDA_EP not in started:
        raise GpuUnavailable(
            f"onnxruntime could not start {CUDA_EP} (CUDA or cuDNN libraries missing or too old for this "
            f"onnxruntime-gpu?); providers running: {', '.join(started)}"
        )
    names = [name for name, _ in wanted]
    if TRT_EP in names and TRT_EP not in started:
        log.warning("%s: TensorRT libraries did not load; serving on %s alone", path, CUDA_EP)
    elif TRT_EP in names:
        log.info("%s: TensorRT EP active; engines build on first use of each shape profile and are cached", path)


class PinnedIo:
    """Runs a session through I/O binding with inputs and outputs in page-locked host buffers reused
    across batches, so ONNX Runtime's copies to and from the device are DMA from pinned memory."""

    def __init__(self, session: Any, staging: PinnedPool, fixed_outputs: Mapping[str, tuple]) -> None:
        self._session, self._staging = session, staging
        self._fixed = dict(fixed_outputs)  # output name -> (dtype, dims after the batch) when all known

    def run(self, feed: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        binding = self._session.io_binding()
        rows = next(iter(feed.values())).shape[0] if feed else 1
        for name, value in feed.items():
            staged = self._staging.host(name, value.dtype, value.shape)
            np.copyto(staged, value)
            binding.bind_input(name, "cpu", 0, value.dtype.type, value.shape, staged.ctypes.data)
        for name in output_names:
            if name in self._fixed:
                dtype, dims = self._fixed[name]
                staged = self._staging.host(f"out:{name}", dtype, (rows, *dims))
                binding.bind_output(name, "cpu", 0, np.dtype(dtype).type, staged.shape, staged.ctypes.data)
            else:
                binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        # Copies in binding order: the pinned buffers are overwritten by the next batch.
        return dict(zip(output_names, binding.copy_outputs_to_cpu(), strict=True))


__all__ = ["CPU_EP", "CUDA_EP", "TRT_EP", "PinnedIo", "check_started", "cuda_missing", "providers"]
