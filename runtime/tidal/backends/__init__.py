"""Backend registry: a backend name from config and a device -> the module that loads it.

Modules are imported on first use so a missing optional engine (TensorRT, onnxruntime-gpu, the compiled
int8 kernels) only matters to the models that ask for it. The same name may load through different
modules per device: `int8` on a GPU instance is the CUDA GEMM (backends/cuda_int8.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable

from tidal.backends.base import Backend, BackendFactory, BackendOptions
from tidal.errors import ConfigError

# Each module exposes `load(path: Path, options: BackendOptions) -> Backend`; GPU modules also
# `gpu_unavailable() -> str | None`, a cheap check that loads no model.
_MODULES = {
    ("onnxruntime", "cpu"): "tidal.backends.onnxruntime",
    ("onnxruntime", "gpu"): "tidal.backends.onnxruntime",
    ("int8", "cpu"): "tidal.backends.int8",
    ("int8", "gpu"): "tidal.backends.cuda_int8",
    ("tensorrt", "gpu"): "tidal.backends.tensorrt",
}


def onnxruntime_missing() -> str | None:
    """Why ONNX Runtime cannot be imported, with the fix: tidal depends on neither of its two wheels, which
    install the same module, so an install without the `cpu` or `gpu` extra has none. The fix names the wheels
    and this interpreter's pip: tidal installs from its checkout, where `tidal[cpu]` would mean PyPI's."""
    if importlib.util.find_spec("onnxruntime") is None:
        return (f"ONNX Runtime is not installed: {sys.executable} -m pip install onnxruntime (tidal's cpu extra), "
                "or onnxruntime-gpu (its gpu extra) on a host with NVIDIA GPUs")
    return None


def names() -> list[str]:
    return sorted({name for name, _ in _MODULES})


def runs_on(name: str, device: str) -> bool:
    return (name, device) in _MODULES


def factory(name: str, device: str = "cpu") -> BackendFactory:
    """The loader for `name` on `device`; ConfigError if tidal has no such backend there or it cannot import."""
    module_name = _MODULES.get((name, device))
    if module_name is None:
        if name not in names():
            raise ConfigError(f"unknown backend '{name}' (known: {', '.join(names())})")
        raise ConfigError(f"backend '{name}' does not run on a {device.upper()}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        reason = onnxruntime_missing() if exc.name == "onnxruntime" else None
        raise ConfigError(f"backend '{name}' is not available on this machine: {reason or exc}") from exc
    return module.load


def gpu_unavailable(name: str) -> str | None:
    """Why backend `name` cannot run on this host's GPUs (None when it can), without loading a model."""
    module_name = _MODULES.get((name, "gpu"))
    if module_name is None:
        return f"{name} has no GPU backend"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return f"{name}: {exc}"
    return module.gpu_unavailable()


def gpu_blocker(candidates: Iterable[str]) -> str | None:
    """None when one of `candidates` runs on a GPU here, else every one's reason, for placement to quote."""
    reasons = []
    for name in dict.fromkeys(candidates):
        reason = gpu_unavailable(name)
        if reason is None:
            return None
        reasons.append(reason)
    return "; ".join(reasons) or "no backend named"


__all__ = ["Backend", "BackendFactory", "BackendOptions", "factory", "gpu_blocker", "gpu_unavailable", "names",
           "onnxruntime_missing", "runs_on"]
