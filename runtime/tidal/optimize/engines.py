"""`tidal optimize --backend tensorrt`: TensorRT engines built ahead of time, beside the variants.

Building an engine takes seconds to minutes per variant and GPU model; done at load, it delays the model's
readiness by that much. Here every variant TensorRT can take is built for each kind of GPU on this host,
keyed as the backend keys them at load (model hash, GPU name, compute capability, TensorRT version, batch
profile from the model's config as a load auto-completes it), into the version's `engines/` folder, where a
load looks first. The manifest then lists tensorrt first for those variants and marks them runnable on a GPU.

A variant TensorRT refuses does not stop the others: a Q/DQ model with non-zero zero points (TensorRT
quantizes symmetrically only; tidal's int8 variant has asymmetric activations) is skipped before building,
and an engine that fails to build is logged with TensorRT's reason. Either way the variant keeps the
backends it had, and the manifest lists tensorrt only for the variants with an engine for every kind of
GPU here, so a load never starts a build that already failed here. Nothing built at all is an error.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType

from tidal.backends import cuda, hardware
from tidal.backends.base import BackendOptions
from tidal.errors import ConfigError, TidalError
from tidal.repository.config import load_config, version_spec
from tidal.repository.variants import VariantManifest, load_manifest, save_manifest

ENGINES_DIR = "engines"
# int8-dynamic quantizes activations with DynamicQuantizeLinear/MatMulInteger, which a strongly typed
# TensorRT network does not take; every other kind is plain fp32/fp16 or explicit Q/DQ.
KINDS = frozenset({"fp32", "int8", "int8-symmetric", "pruned", "distilled", "fp16"})


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
    workspace = trt.workspace_bytes(options)  # a bad setting stops here, not once per variant
    failed: dict[str, str] = {}
    for v in chosen:
        refusal = trt.qdq_refusal((version_dir / v.file).read_bytes(), version_dir / v.file)
        if refusal is not None:
            failed[v.name] = refusal
            log(f"{v.name}: not built for TensorRT, it stays on {', '.join(v.backends) or 'no backend'}: {refusal}")
    runtime = cuda.runtime()
    for gpu in gpus:
        gpu_options = replace(options, device="gpu", device_id=gpu.index)
        runtime.cuda_set_device(gpu.index)
        for variant in (v for v in chosen if v.name not in failed):
            failure = _build(trt, variant.name, version_dir / variant.file, gpu_options, workspace, gpu.name, target,
                             log)
            if failure is not None:
                failed[variant.name] = failure
    built = [v for v in chosen if v.name not in failed]
    if not built:
        reasons = "; ".join(f"{name}: {why}" for name, why in failed.items())
        raise ConfigError(f"{version_dir}: TensorRT built no engine ({reasons})")
    variants = dict(manifest.variants)
    for v in built:
        variants[v.name] = replace(
            v,
            backends=("tensorrt", *(b for b in v.backends if b != "tensorrt")),
            runnable_on=tuple(sorted({*v.runnable_on, "gpu"})),
        )
    updated = replace(manifest, variants=variants)
    save_manifest(version_dir, updated)
    return updated


def _build(trt: ModuleType, name: str, path: Path, options: BackendOptions, workspace: int, gpu: str, target: Path,
           log: Callable[[str], None]) -> str | None:
    """One variant's engine for one GPU, unless already built; why it failed (logged), or None."""
    model = path.read_bytes()
    key = trt.engine_key(model, options)
    found = trt.find_engine(key, (target,))
    if found is not None:
        log(f"{name} on {gpu}: engine {found.name} already built")
        return None
    log(f"{name} on {gpu}: building a TensorRT engine (can take minutes)")
    try:
        engine = trt.build_engine(model, path, key, workspace)
    except (TidalError, RuntimeError) as exc:  # TensorRT's refusal, or its C++ exception or a CUDA error
        log(f"{name} on {gpu}: no TensorRT engine, the variant keeps its other backends: {exc}")
        return str(exc)
    log(f"{name} on {gpu}: {trt.save_engine(engine, key, target)}")
    return None

