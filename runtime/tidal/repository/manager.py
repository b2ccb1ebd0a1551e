"""Loading, serving and unloading models: the repository's live side.

Each ready version owns its backend instances and one ModelScheduler. A
reload builds the new versions completely before swapping them in; requests
already holding the old version finish on it while it drains. A model that
fails to load is UNAVAILABLE with its reason, and nothing else is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from tidal import backends
from tidal.backends import hardware
from tidal.backends.base import Backend, BackendOptions
from tidal.backends.placement import Placement, place
from tidal.clock import Clock, SystemClock
from tidal.errors import ConfigError, InvalidArgument, NotFound, TidalError, Unavailable
from tidal.repository import layout
from tidal.repository.config import (
    MAX_INSTANCES,
    ModelSpec,
    couples_rows,
    load_config,
    read_graph,
    run_time_follows_shapes,
    version_spec,
)
from tidal.repository.pbtxt import ParsedConfig
from tidal.repository.served import ServedVersion, close_runners
from tidal.repository.variants import Variant, VariantManifest, load_manifest, profile_key
from tidal.scheduling.engine import ModelScheduler

log = logging.getLogger(__name__)

DEFAULT_VARIANT = ""


class ModelState(enum.Enum):
    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ModelEntry:
    name: str
    state: ModelState = ModelState.UNAVAILABLE
    reason: str = ""
    versions: dict[int, ServedVersion] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _load_instances(
    path: Path, names: Sequence[str], options: BackendOptions, placement: Placement
) -> tuple[str, list[Backend]]:
    """One instance per placed device, from the first backend in `names` that loads on each kind of device,
    and the profile key of the backend serving the GPU instances (the CPU ones when there are none)."""
    loaded: dict[int, Backend] = {}
    engines: dict[str, str] = {}
    try:
        for kind in sorted(placement.kinds):
            indices = [i for i, d in enumerate(placement.devices) if d.kind == kind]
            engines[kind] = _load_on(path, names, options, placement, indices, loaded)
    except TidalError:
        close_runners({"": list(loaded.values())})
        raise
    kind = "gpu" if "gpu" in engines else "cpu"
    return profile_key(engines[kind], kind), [loaded[i] for i in range(len(placement.devices))]


def _load_on(
    path: Path, names: Sequence[str], options: BackendOptions, placement: Placement, indices: list[int],
    loaded: dict[int, Backend],
) -> str:
    """Loads the instances at `indices` (one kind of device) into `loaded`; the backend's name."""
    kind = placement.devices[indices[0]].kind
    order = [n for n in dict.fromkeys([*names, "onnxruntime"] if kind == "gpu" else names) if backends.runs_on(n, kind)]
    errors = []
    for name in order:
        batch: dict[int, Backend] = {}
        try:
            loader = backends.factory(name, kind)
            for i in indices:
                device = placement.devices[i]
                batch[i] = loader(path, replace(options, instance_index=i, device=device.kind, device_id=device.index))
        except TidalError as exc:
            close_runners({"": list(batch.values())})
            errors.append(f"{name}: {exc}")
            continue
        loaded.update(batch)
        if errors:  # the backend preferred for this file did not load: say so, or it is served slower unnoticed
            log.warning("model %s version %s: %s: serving on %s (%s) because %s", path.parent.parent.name,
                        path.parent.name, path.name, name, kind, "; ".join(errors))
        return name
    detail = "; ".join(errors) or f"none of {', '.join(names)} runs there"
    raise ConfigError(f"{path.name}: no backend could load it on the {kind.upper()} ({detail})")


def _engine_cache_dirs(version_dir: Path) -> tuple[Path, ...]:
    """Engines `tidal optimize --backend tensorrt` built beside the model first, then the user's cache,
    where engines built at load are written (a repository may be mounted read-only)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tidal" / "engines"
    return (version_dir / "engines", cache)


def _placement(spec: ModelSpec, candidates: Iterable[str], where: str) -> Placement:
    """Where the instances go on this host, logged once with the reason."""
    blocker = None
    gpus = hardware.gpus()
    if gpus and (not spec.instance_groups or any(g.kind != "cpu" for g in spec.instance_groups)):
        blocker = backends.gpu_blocker(n for n in candidates if backends.runs_on(n, "gpu"))
    placement = place(spec.instance_groups, gpus, blocker, MAX_INSTANCES)
    log.info("%s: instances %s (%s)", where, placement.summary(), placement.reason)
    return placement


@dataclass
class _Built:
    spec: ModelSpec
    runners: dict[str, list[Backend]]
    engines: dict[str, str]
    manifest: VariantManifest | None
    predictable: bool  # every variant's run time follows its batch size (see scheduling/inline.py)
    coupled: frozenset[str]  # variants whose rows share statistics across the batch (see config.couples_rows)
    placement: Placement


def _build_version(model_path: Path, parsed: ParsedConfig, version: int) -> _Built:
    """Blocking: parse, auto-complete and load every variant of one version.

    A variant no backend here can load is left out with a warning; the version fails only if none loads.
    """
    version_dir = model_path / str(version)
    spec, default_file, graph = version_spec(parsed, version_dir)
    manifest = load_manifest(version_dir)
    runners: dict[str, list[Backend]] = {}
    engines: dict[str, str] = {}
    default_order = (*([spec.backend] if spec.backend not in ("", "onnxruntime") else []), "onnxruntime")
    wanted = set(spec.variants)
    chosen = [v for v in manifest.variants.values() if not wanted or v.name in wanted] if manifest else []
    candidates = [b for v in chosen for b in v.backends] if manifest else default_order
    placement = _placement(spec, candidates, f"model {spec.name} version {version}")
    count = len(placement.devices)
    spec = replace(spec, instance_count=count, knobs=replace(spec.knobs, instance_count=count))
    options = replace(spec.backend_options, cache_dirs=_engine_cache_dirs(version_dir))
    if manifest is None:
        engines[DEFAULT_VARIANT], runners[DEFAULT_VARIANT] = _load_instances(
            default_file, default_order, options, placement
        )
        coupled = frozenset({DEFAULT_VARIANT} if couples_rows(graph) else ())
        return _Built(spec, runners, engines, None, _predictable(spec, {default_file: graph}), coupled, placement)
    errors = []
    for variant in chosen:
        if off := placement.kinds - set(variant.runnable_on):
            # A GPU-only variant (fp16) on a CPU host is routine; a CPU-only one beside GPU instances comes from a
            # variants.json written before every ONNX variant was recorded as runnable on a GPU too.
            log.log(logging.WARNING if "gpu" in off else logging.INFO,
                    "model %s version %d: variant %s left out: it runs on %s (variants.json), the instances are on "
                    "%s%s", spec.name, version, variant.name, "/".join(variant.runnable_on), "/".join(sorted(off)),
                    "; `tidal optimize` again records where it runs" if "gpu" in off else "")
            errors.append(f"{variant.name}: runs on {'/'.join(variant.runnable_on)}, not on {'/'.join(sorted(off))}")
            continue
        try:
            engines[variant.name], runners[variant.name] = _load_instances(
                version_dir / variant.file, _serving_order(spec.name, version, variant), options, placement
            )
        except ConfigError as exc:
            log.warning("model %s version %d: variant %s left out: %s", spec.name, version, variant.name, exc)
            errors.append(f"{variant.name}: {exc}")
    if not runners:
        detail = "; ".join(errors) or f"none of {sorted(wanted)} is in the manifest"
        raise ConfigError(f"{version_dir}: no variant can run here ({detail})")
    default = manifest.default if manifest.default in runners else next(iter(runners))
    spec = replace(spec, knobs=replace(spec.knobs, active_variant=default))
    files = {name: version_dir / manifest.variants[name].file for name in runners}
    graphs = {f: graph if f == default_file else _graph_or_none(f) for f in files.values()}
    coupled = frozenset(name for name, f in files.items() if (g := graphs[f]) is not None and couples_rows(g))
    return _Built(spec, runners, engines, manifest, _predictable(spec, graphs), coupled, placement)


def _serving_order(model: str, version: int, variant: Variant) -> tuple[str, ...]:
    """The variant's backends, fastest exact one first as `tidal optimize` measured; logs the choice."""
    cpu = hardware.cpu_info()
    order, distrust = variant.serving_order(cpu.model, cpu.isa_flags)
    where = f"model {model} version {version}: variant {variant.name}"
    if distrust:
        log.warning("%s: %s; run `tidal profile REPOSITORY %s` on this host to choose again", where, distrust, model)
    elif variant.choice is not None:
        log.info("%s: backend %s", where, variant.choice.reason)
    return order


def _graph_or_none(path: Path) -> onnx.GraphProto | None:
    """A variant file's graph; None for one that is not ONNX (an engine file that only its backend reads)."""
    try:
        return read_graph(path)
    except ConfigError:
        return None


def _predictable(spec: ModelSpec, graphs: Mapping[Path, onnx.GraphProto | None]) -> bool:
    """`graphs`: every variant file with its graph, None where it is not ONNX."""
    fixed = all(-1 not in s.shape for s in spec.inputs)
    return fixed and all(g is not None and run_time_follows_shapes(f, g) for f, g in graphs.items())


async def _build_all(path: Path, parsed: ParsedConfig, versions: list[int]) -> list[_Built]:
    """Build the versions in parallel; if one fails, release what the others loaded and raise its error."""
    results = await asyncio.gather(
        *(asyncio.to_thread(_build_version, path, parsed, v) for v in versions), return_exceptions=True
    )
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is None:
        return list(results)
    for result in results:
        if isinstance(result, _Built):
            close_runners(result.runners)
    raise failure


def _read_model(name: str, path: Path) -> tuple[ParsedConfig, list[int]]:
    """Blocking: the model's config and the versions its policy selects."""
    parsed = load_config(path, name)
    try:
        available = layout.list_versions(path)
    except FileNotFoundError as exc:  # removed after the load was asked for: a missing model, not a bug
        raise NotFound(f"model '{name}' is not in the repository (its folder went away during the load)") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot list its versions: {exc.strerror}") from exc
    versions = layout.select_versions(available, parsed.config.version_policy, str(path))
    if not versions:
        raise ConfigError(f"{path}: no numeric version folder")
    return parsed, versions


StateListener = Callable[[str, ModelState, str, bool], Awaitable[None]]


class ModelManager:
    """Owns every model's state; the only writer of it. Call from the event loop.

    `on_change(name, state, reason, failed)` is awaited after every transition (health, metrics and logs follow
    it); `failed` marks a load that failed, which leaves a reloaded model READY on its old versions.
    """

    def __init__(self, root: Path, clock: Clock | None = None, on_change: StateListener | None = None) -> None:
        self.root = root.resolve()
        self.clock = clock or SystemClock()
        self._entries: dict[str, ModelEntry] = {}
        self._on_change = on_change
        self._work: set[asyncio.Task] = set()  # loads and unloads under way (the loop keeps only weak references)

    async def _changed(self, entry: ModelEntry, failed: bool = False) -> None:
        if self._on_change is not None:
            await self._on_change(entry.name, entry.state, entry.reason, failed)

    def _entry(self, name: str) -> ModelEntry:
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = ModelEntry(name)
        return entry

    async def load_all(self, names: Iterable[str] | None = None) -> None:
        """Start-up load; a failure marks that model unavailable and is logged, never raised."""
        for name in list(names) if names is not None else layout.list_models(self.root):
            with contextlib.suppress(TidalError):  # load() recorded and logged the reason
                await self.load(name)

    def _detached(self, work: Coroutine[Any, Any, None]) -> Awaitable[None]:
        """Run a load or unload to its end whatever becomes of its caller. A client that gives up (deadline,
        cancel) cancels the RPC's task; cut short there, a model stayed LOADING or UNLOADING for good and a
        draining scheduler never released its threads and sessions."""
        task = asyncio.create_task(work)
        self._work.add(task)
        task.add_done_callback(self._work.discard)
        return asyncio.shield(task)

    async def load(self, name: str) -> None:
        path = layout.require_model_dir(self.root, name)
        await self._detached(self._load(name, path))

    async def _load(self, name: str, path: Path) -> None:
        entry = self._entry(name)
        async with entry.lock:
            if not entry.versions:  # the reason of an earlier unload or failure is not this load's
                entry.state, entry.reason = ModelState.LOADING, ""
            try:
                new = await self._load_versions(name, path)
            except TidalError as exc:
                log.error("model %s: load failed: %s", name, exc)
                await self._load_failed(entry, str(exc))
                raise
            except Exception as exc:
                # A case the checks miss (or a bug) must fail this model like any other load error, not
                # start-up, the other models or the poll loop; the traceback is for whoever fixes it.
                log.exception("model %s: load failed with an internal error", name)
                reason = f"internal error: {type(exc).__name__}: {exc}"
                await self._load_failed(entry, reason)
                raise TidalError(reason) from exc
            old, entry.versions = entry.versions, new
            entry.state, entry.reason = ModelState.READY, ""
            log.info("model %s: ready, version(s) %s", name, ", ".join(map(str, new)))
            await self._changed(entry)
        for served in old.values():
            await served.close()

    async def _load_failed(self, entry: ModelEntry, reason: str) -> None:
        """A failed reload keeps the versions already serving; a first load leaves the model UNAVAILABLE."""
        entry.reason = reason
        if not entry.versions:
            entry.state = ModelState.UNAVAILABLE
        await self._changed(entry, failed=True)

    async def _load_versions(self, name: str, path: Path) -> dict[int, ServedVersion]:
        """Every selected version built and its scheduler started; on failure nothing is left open."""
        # Reading and parsing files is blocking work on whatever the repository holds: off the event loop,
        # so a slow disk or a pathological config cannot stall requests, health checks or a SIGTERM.
        parsed, versions = await asyncio.to_thread(_read_model, name, path)
        built = await _build_all(path, parsed, versions)
        new: dict[int, ServedVersion] = {}
        try:
            for version, b in zip(versions, built, strict=True):
                outputs = [o.name for o in b.spec.outputs]
                scheduler = ModelScheduler(
                    f"{name}:{version}", b.spec.scheduler, b.spec.knobs, b.runners, outputs, self.clock, b.predictable,
                    b.coupled,
                )
                new[version] = ServedVersion(
                    name, version, b.spec, b.runners, scheduler, b.engines, b.manifest, b.placement
                )
                await scheduler.start()
        except BaseException:
            for served in new.values():
                await served.close()
            for b in built[len(new) :]:
                close_runners(b.runners)
            raise
        return new

    async def unload(self, name: str) -> None:
        """Unloading a model that is not loaded (unknown, or unloaded already) succeeds, as in Triton: the
        model is not served afterwards either way. A name no repository could hold is still refused."""
        entry = self._entries.get(name)
        if entry is None or entry.state is ModelState.UNAVAILABLE:
            layout.model_dir(self.root, name)
            return
        await self._detached(self._unload(entry))

    async def _unload(self, entry: ModelEntry) -> None:
        name = entry.name
        async with entry.lock:
            old, entry.versions = entry.versions, {}
            entry.state = ModelState.UNLOADING
            await self._changed(entry)
            for served in old.values():
                await served.close()
            entry.state, entry.reason = ModelState.UNAVAILABLE, "unloaded"
            await self._changed(entry)
        log.info("model %s: unloaded", name)

    def get(self, name: str, version: str = "") -> ServedVersion:
        """The version to serve: `version` exactly, or the newest ready one for ""."""
        if version and not (version.isascii() and version.isdigit()):
            # Triton refuses a version that is not an integer >= 0 INVALID_ARGUMENT, before the lookup. Its
            # std::stol would take " 2" and "2a" as 2; tidal refuses those too rather than guess.
            raise InvalidArgument(f"model version '{version[:32]}' is not an integer > 0")
        if len(version) > 19:  # past int64, as Triton reads versions; int() would refuse 4,300 digits uncaught
            raise InvalidArgument(f"model version '{version[:32]}...' is out of range ({len(version)} digits)")
        entry = self._entries.get(name)
        if entry is None:
            raise NotFound(f"model '{name}' is not in the repository")
        if entry.state is not ModelState.READY or not entry.versions:
            detail = f": {entry.reason}" if entry.reason else ""
            raise Unavailable(f"model '{name}' is not ready ({entry.state.value}{detail})")
        if not version:
            return entry.versions[max(entry.versions)]
        served = entry.versions.get(int(version))
        if served is None:
            raise NotFound(f"model '{name}' has no ready version '{version}'")
        return served

    def ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except TidalError:
            return False
        return True

    def served(self) -> list[ServedVersion]:
        return [v for e in self._entries.values() for v in e.versions.values()]

    def select(self, name: str = "", version: str = "") -> list[ServedVersion]:
        """What a statistics or control request names: everything (""), one version, or every ready version."""
        if not name:
            return self.served()
        if version:
            return [self.get(name, version)]
        self.get(name)  # NOT_FOUND / UNAVAILABLE with the usual messages
        return [v for _, v in sorted(self._entries[name].versions.items())]

    def ready_versions(self, name: str) -> tuple[str, ...]:
        """The versions of `name` that serve, from memory: metadata calls need no look at the disk."""
        entry = self._entries.get(name)
        ready = entry is not None and entry.state is ModelState.READY
        return tuple(str(v) for v in sorted(entry.versions)) if ready else ()

    async def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) for every model on disk or known, as RepositoryIndex reports. The
        folder is listed on a thread, as the poller scans it: a slow or large repository must not stall requests."""
        rows = []
        on_disk = await asyncio.to_thread(layout.list_models, self.root)
        names = sorted(set(on_disk) | set(self._entries))
        for name in names:
            entry = self._entries.get(name)
            if entry is None:
                rows.append((name, "", ModelState.UNAVAILABLE.value, ""))
            elif entry.versions:
                rows.extend((name, str(v), entry.state.value, entry.reason) for v in sorted(entry.versions))
            else:
                rows.append((name, "", entry.state.value, entry.reason))
        return rows

    async def close(self) -> None:
        """Unload what is loaded. A load or unload under way is left to the process's end, not awaited: a load
        can take minutes or hang on a stalled disk, and waiting on it held a SIGTERM's exit past its grace."""
        for name, entry in list(self._entries.items()):
            if entry.versions and not entry.lock.locked():
                await self.unload(name)
