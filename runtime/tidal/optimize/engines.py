"""`tidal optimize --backend tensorrt`: TensorRT engines built ahead of time, beside the variants.

Building an engine takes seconds to minutes per variant and GPU model; done at load, it delays the model's
readiness by that much. Here every variant TensorRT can take is built for each kind of GPU on this host,
keyed as the backend keys them at load (model hash, GPU name, compute capability, TensorRT version, batch
profile from the model's config as a load auto-completes it), into the version's `engines/` folder, where a
load looks first. The manifest then lists tensorrt first for those variants and marks them runnable on a GPU.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType

from tidal.backends import cuda, hardware
from tidal.errors import ConfigError
from tidal.repository.config import load_config, version_spec
from tidal.repository.variants import VariantManifest, load_manifest, save_manifest

ENGINES_DIR = "engines"
# int8-dynamic quantizes activations with DynamicQuantizeLinear/MatMulInteger, which a strongly typed
# TensorRT network does not take; every other kind is plain fp32/fp16 or explicit Q/DQ.
KINDS = frozenset({"fp32", "int8", "pruned", "distilled", "fp16"})


def _tensorrt() -> ModuleType:
    """Imported only when asked for: TensorRT is an optional dependency."""
    try:
        return importlib.import_module("tidal.backends.tensorrt")
    except ImportError as exc:
        raise ConfigError(f"--backend tensorrt needs TensorRT 10 or later: {exc} (tidal's tensorrt extra: "
                          "pip install 'tensorrt>=10', from pypi.nvidia.com)") from None


def check_available() -> None:
    """ConfigError saying why engines cannot be built here; called before anything else is built."""
    reason = _tensorrt().gpu_unavailable()
    if reason is None and not hardware.gpus():
        reason = "no GPU is visible to this process"
    if reason is not None:
        raise ConfigError(f"--backend tensorrt: {reason}")


def build_engines(model_dir: Path, version: int, log: Callable[[str], None]) -> VariantManifest:
    """Engines for every variant of `model_dir/version` that TensorRT can take, on each kind of GPU here."""
    trt = _tensorrt()
    check_available()
    version_dir = model_dir / str(version)
    manifest = load_manifest(version_dir)
    if manifest is None:
        raise ConfigError(f"{version_dir}: no variants.json (run `tidal optimize` without --backend first)")
    options = version_spec(load_config(model_dir, model_dir.name), version_dir).spec.backend_options
    target = version_dir / ENGINES_DIR
    gpus = {(g.name, g.compute_capability): g for g in hardware.gpus()}.values()
    chosen = [v for v in manifest.variants.values() if v.kind in KINDS]
    if not chosen:
        raise ConfigError(f"{version_dir}: no variant TensorRT can build (kinds {', '.join(sorted(KINDS))})")
    runtime = cuda.runtime()
    for gpu in gpus:
        gpu_options = replace(options, device="gpu", device_id=gpu.index)
        runtime.cuda_set_device(gpu.index)
        for variant in chosen:
            path = version_dir / variant.file
            model = path.read_bytes()
            key = trt.engine_key(model, gpu_options)
            found = trt.find_engine(key, (target,))
            if found is not None:
                log(f"{variant.name} on {gpu.name}: engine {found.name} already built")
                continue
            log(f"{variant.name} on {gpu.name}: building a TensorRT engine (can take minutes)")
            engine = trt.build_engine(model, path, key, trt.workspace_bytes(gpu_options))
            log(f"{variant.name} on {gpu.name}: {trt.save_engine(engine, key, target)}")
    variants = dict(manifest.variants)
    for v in chosen:
        variants[v.name] = replace(
            v,
            backends=("tensorrt", *(b for b in v.backends if b != "tensorrt")),
            runnable_on=tuple(sorted({*v.runnable_on, "gpu"})),
        )
    updated = replace(manifest, variants=variants)
    save_manifest(version_dir, updated)
    return updated

