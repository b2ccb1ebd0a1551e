"""`tidal optimize` and `tidal profile`: build, measure and record variants.

optimize: check the inputs, write the fp32 variant, build every other kind
that applies (a kind named in --variants that does not fails the run),
profile each on every backend that can load it and keep those whose outputs
are exact (choose.py), fastest first; measure accuracy on the backend that
will serve it (validation labels, else agreement with fp32 on the calibration
rows), leave out what falls below --min-accuracy, then write variants.json
(and a config.pbtxt when the model has none yet). profile: only the
profiling and the choice, for a repository moved to other hardware.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from tidal import backends
from tidal.backends import hardware
from tidal.errors import ConfigError, NotFound, TidalError
from tidal.optimize import choose, evaluate
from tidal.optimize.build import (
    BUILDERS,
    CANDIDATE_BACKENDS,
    DEFAULT_KINDS,
    KINDS,
    RUNNABLE_ON,
    BuildSettings,
    Built,
    Context,
    build_fp32,
    unsupported,
)
from tidal.optimize.data import Dataset, load_dataset
from tidal.optimize.graph import (
    check_batchable,
    graph_inputs,
    graph_outputs,
    is_classifier_output,
    load_model,
    show_shape,
)
from tidal.optimize.modelconfig import CONFIG_FILE, existing_max_batch_size, write_config
from tidal.optimize.profile import ProfileSettings, current_hardware, measure
from tidal.repository.layout import list_versions, model_dir
from tidal.repository.variants import (
    Accuracy,
    BackendChoice,
    LatencyProfile,
    Variant,
    VariantManifest,
    load_manifest,
    profile_key,
    profiles_on,
    save_manifest,
)

Log = Callable[[str], None]
DEFAULT_MAX_BATCH_SIZE = 64
_CHECK_ROWS = 256  # rows each backend runs for the exactness check against the reference


@dataclass(frozen=True, slots=True)
class OptimizeOptions:
    model: Path
    repository: Path
    name: str
    calibration: Path
    validation: Path | None = None
    version: int = 1
    kinds: tuple[str, ...] | None = None  # None: every kind that applies; named kinds must all be built
    for_tensorrt: bool = False  # kinds None: also the int8 variant TensorRT can build (int8-symmetric)
    build: BuildSettings = field(default_factory=BuildSettings)
    calibration_rows: int = 2048
    min_accuracy: float = 0.0
    max_batch_size: int | None = None  # None: the existing config's, else DEFAULT_MAX_BATCH_SIZE
    instances: int = 1
    intra_op_threads: int = 0
    profile_seconds: float = 0.3
    progress: bool = True


def optimize(options: OptimizeOptions, log: Log) -> VariantManifest:
    requested = options.kinds
    if requested is None:
        requested = (*DEFAULT_KINDS, "int8-symmetric") if options.for_tensorrt else DEFAULT_KINDS
    unknown = sorted(set(requested) - set(KINDS))
    if unknown or "fp32" not in requested:
        raise ConfigError(f"variant kinds must include fp32 and come from {', '.join(KINDS)}; got {requested}")
    source = load_model(options.model)
    check_batchable(source, options.model)
    _check_classifier(source, options.model)
    kinds = [k for k in KINDS if k in requested and _applies(k, source, options, log)]
    inputs = graph_inputs(source)
    calibration = load_dataset(options.calibration, inputs, "calibration").take(options.calibration_rows)
    validation = load_dataset(options.validation, inputs, "validation") if options.validation else None
    folder = model_dir(Path(options.repository), options.name)
    version_dir = folder / str(options.version)
    version_dir.mkdir(parents=True, exist_ok=True)
    max_batch = options.max_batch_size or existing_max_batch_size(folder) or DEFAULT_MAX_BATCH_SIZE
    built = _build(options, kinds, calibration, version_dir, log)
    data = validation or calibration
    reference = evaluate.predict(version_dir / built[0].file, data)
    settings = ProfileSettings(max_batch, options.instances, options.intra_op_threads, options.profile_seconds)
    check_rows = {k: v[:_CHECK_ROWS] for k, v in data.feeds.items()}
    variants = {}
    for b in tqdm(built, desc="measuring variants", disable=not options.progress, leave=False):
        runnable = RUNNABLE_ON[b.kind]
        try:
            usable, profiles, choice = _profile(
                version_dir / b.file, b.name, CANDIDATE_BACKENDS[b.kind], runnable, settings, check_rows, log,
                options.progress,
            )
        except ConfigError as exc:
            if b.kind == "fp32":
                raise
            log(f"left out {b.name}: {exc}")
            (version_dir / b.file).unlink(missing_ok=True)
            continue
        accuracy = _accuracy(version_dir / b.file, choice.chosen if choice else "onnxruntime", data, reference)
        if not _passes(b, accuracy, options.min_accuracy, version_dir, log):
            continue
        variants[b.name] = Variant(
            b.name, b.file, b.kind, usable, runnable, (version_dir / b.file).stat().st_size,
            b.parameters, b.flops_per_row, accuracy, profiles, b.details, choice,
        )  # fmt: skip
    if not (folder / CONFIG_FILE).is_file():
        write_config(folder, options.name, version_dir / "model.onnx", max_batch)
    manifest = VariantManifest(options.name, "fp32", current_hardware(), variants)
    save_manifest(version_dir, manifest)
    for stale in version_dir.glob("model.*.onnx"):
        if stale.name not in {v.file for v in variants.values()}:
            stale.unlink()
    return manifest


def _check_classifier(model: onnx.ModelProto, path: Path) -> None:
    out = graph_outputs(model)[0]
    if not is_classifier_output(out):
        raise ConfigError(
            f"{path}: tidal optimize measures variants by top-1 accuracy, so the first output must be "
            f"[N, classes] with 2 or more classes; '{out.name}' is {show_shape(out.shape)}"
        )


def _applies(kind: str, source: onnx.ModelProto, options: OptimizeOptions, log: Log) -> bool:
    """Whether to build `kind`: what cannot be built is refused before anything is written if named."""
    reason = unsupported(kind, source)
    if reason is None:
        return True
    _not_built(kind, ConfigError(reason), options, log)
    return False


def _not_built(kind: str, exc: ConfigError, options: OptimizeOptions, log: Log) -> None:
    """A kind asked for by name fails the run; one built by default is skipped with the reason."""
    if options.kinds is not None:
        raise ConfigError(f"cannot build the {kind} variant asked for: {exc}") from exc
    log(f"skipped {kind}: {exc}")


def _build(
    options: OptimizeOptions, kinds: list[str], calibration: Dataset, version_dir: Path, log: Log
) -> list[Built]:
    kinds = [k for k in kinds if k != "fp32"]
    with tqdm(total=len(kinds) + 1, desc="building variants", disable=not options.progress, leave=False) as bar:
        fp32, fp32_model = build_fp32(options.model, version_dir)
        bar.update()
        built = [fp32]
        for kind in kinds:
            bar.set_postfix_str(kind)
            built += _run_builder(kind, Context(version_dir, fp32_model, calibration, options.build), options, log)
            bar.update()
    return built


def _run_builder(kind: str, ctx: Context, options: OptimizeOptions, log: Log) -> list[Built]:
    """One kind's variants, with a per-epoch bar for training; [] (reported) when a default kind does not apply."""
    show = options.progress and kind == "distilled"
    with tqdm(total=options.build.train.epochs, desc="distilling", leave=False, disable=not show) as epochs:

        def on_epoch(_epoch: int, loss: float) -> None:
            epochs.set_postfix(loss=f"{loss:.4f}")
            epochs.update()

        try:
            return BUILDERS[kind](dataclasses.replace(ctx, on_epoch=on_epoch))
        except ConfigError as exc:
            _not_built(kind, exc, options, log)
            return []


def _accuracy(path: Path, backend: str, data: Dataset, reference: np.ndarray) -> Accuracy | None:
    """Measured on the backend that will serve the variant here, so the number is what clients get."""
    try:
        return evaluate.score(evaluate.predict(path, data, backend), reference, data.labels)
    except TidalError:  # e.g. fp16 kernels ONNX Runtime lacks on this CPU
        return None


def _passes(b: Built, acc: Accuracy | None, minimum: float, version_dir: Path, log: Log) -> bool:
    if b.kind == "fp32" or acc is None or acc.value >= minimum:
        return True
    log(f"left out {b.name}: {acc.metric} {acc.value:.4f} is below --min-accuracy {minimum}")
    (version_dir / b.file).unlink()
    return False


def _profile(
    path: Path,
    name: str,
    candidates: tuple[str, ...],
    runnable_on: tuple[str, ...],
    settings: ProfileSettings,
    check_rows: dict[str, np.ndarray],
    log: Log,
    progress: bool,
) -> tuple[tuple[str, ...], dict[str, LatencyProfile], BackendChoice | None]:
    """Profiles on every candidate backend this host has; those that agree with the exact result, fastest first.

    On a host with GPUs, a variant that runs there is also profiled on each GPU backend that can run it (ONNX
    Runtime's CUDA provider at least), under `backend@gpu`: the controller plans GPU instances from those. The
    CPU choice stands; a GPU instance tries the variant's backends in order, as loaded."""
    profiles = {}
    cpu = [b for b in candidates if backends.runs_on(b, "cpu")] if "cpu" in runnable_on else []
    gpu = ([b for b in dict.fromkeys([*candidates, "onnxruntime"]) if backends.runs_on(b, "gpu")]
           if "gpu" in runnable_on and hardware.gpus() else [])
    for backend, device in [*((b, "cpu") for b in cpu), *((b, "gpu") for b in gpu)]:
        key = profile_key(backend, device)
        if device == "gpu" and (why := backends.gpu_unavailable(backend)) is not None:
            log(f"{name}: not profiled on {key}: {why}")
            continue
        sizes = settings.batch_sizes()
        with tqdm(total=len(sizes), desc=f"profiling {name} on {key}", disable=not progress, leave=False) as bar:
            try:
                profiles[key] = measure(path, backend, settings, lambda _size, bar=bar: bar.update(), device)
            except Exception as exc:  # one failing engine must not sink the other variants
                log(f"{name}: backend {key} cannot run it here: {type(exc).__name__}: {exc}")
    on_cpu = profiles_on(profiles, "cpu")
    if not on_cpu:
        if "cpu" in runnable_on:
            raise ConfigError(f"{path}: no backend on this host can run variant {name}")
        return candidates, profiles, None
    usable, choice = choose.choose(path, on_cpu, check_rows)
    if len(on_cpu) > 1:
        log(f"{name}: backend chosen: {choice.reason}")
    # GPU-only backends (TensorRT, put first by `--backend tensorrt`) keep their place ahead of the CPU ones.
    gpu_only = (b for b in candidates if backends.runs_on(b, "gpu") and not backends.runs_on(b, "cpu"))
    return (*gpu_only, *usable), profiles, choice


def profile_repository(
    repository: Path,
    name: str,
    *,
    version: int | None = None,
    max_batch_size: int | None = None,
    instances: int = 1,
    intra_op_threads: int = 0,
    profile_seconds: float = 0.3,
    progress: bool = True,
    log: Log = print,
) -> VariantManifest:
    """Re-measure the latency profiles of NAME's variants on this host; accuracy and files stay."""
    folder = model_dir(Path(repository), name)
    if not folder.is_dir():
        raise NotFound(f"model '{name}' is not in repository {repository}")
    versions = list_versions(folder)
    version_dir = folder / str(version if version is not None else (versions[-1] if versions else 1))
    manifest = load_manifest(version_dir)
    if manifest is None:
        raise NotFound(f"{version_dir} has no variants.json; run `tidal optimize` first")
    max_batch = max_batch_size or existing_max_batch_size(folder) or DEFAULT_MAX_BATCH_SIZE
    settings = ProfileSettings(max_batch, instances, intra_op_threads, profile_seconds)
    variants = {}
    check_rows = choose.synthetic_feeds(version_dir / manifest.variants[manifest.default].file, _CHECK_ROWS)
    for v in manifest.variants.values():
        tried = tuple(dict.fromkeys([*v.backends, *CANDIDATE_BACKENDS[v.kind]]))
        usable, profiles, choice = _profile(
            version_dir / v.file, v.name, tried, v.runnable_on, settings, check_rows, log, progress
        )
        variants[v.name] = dataclasses.replace(v, backends=usable, profiles=profiles, choice=choice)
    updated = dataclasses.replace(manifest, hardware=current_hardware(), variants=variants)
    save_manifest(version_dir, updated)
    return updated
