"""Backend registry: a backend name from config -> the module that loads it.

Modules are imported on first use so a missing optional engine (TensorRT, the
compiled int8 kernels) only matters to the models that ask for it.
"""

from __future__ import annotations

import importlib

from tidal.backends.base import Backend, BackendFactory, BackendOptions
from tidal.errors import ConfigError

# Each module exposes `load(path: Path, options: BackendOptions) -> Backend`.
_MODULES = {
    "onnxruntime": "tidal.backends.onnxruntime",
    "int8": "tidal.backends.int8",
}


def names() -> list[str]:
    return sorted(_MODULES)


def factory(name: str) -> BackendFactory:
    """The loader for `name`; ConfigError if tidal has no such backend or it cannot import."""
    module_name = _MODULES.get(name)
    if module_name is None:
        raise ConfigError(f"unknown backend '{name}' (known: {', '.join(names())})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"backend '{name}' is not available on this machine: {exc}") from exc
    return module.load


__all__ = ["Backend", "BackendFactory", "BackendOptions", "factory", "names"]
