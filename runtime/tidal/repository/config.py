"""From config.pbtxt (and the ONNX graph) to the typed settings the server acts on.

The protobuf ModelConfig is kept only as the answer to the ModelConfig RPC;
everything else reads `ModelSpec`, whose fields say their units.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import onnx

from tidal.backends.base import Accelerator, BackendOptions
from tidal.backends.placement import InstanceGroup
from tidal.control.api import Mode, Slo
from tidal.errors import ConfigError, InvalidArgument
from tidal.proto import model_config_pb2 as mc
from tidal.repository.pbtxt import ParsedConfig, parse_model_config
from tidal.scheduling.knobs import Knobs
from tidal.scheduling.queue import QueuePolicy, SchedulerConfig, TimeoutAction
from tidal.types import DataType, TensorSpec

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 4  # what Triton's ONNX auto-complete chooses for a dynamic dim 0
MAX_INSTANCES = 256  # per model: each instance is a worker thread and an ONNX Runtime session, made at load
ONNX_PLATFORM = "onnxruntime_onnx"

_CONFIG_TO_DTYPE = {
    mc.TYPE_BOOL: DataType.BOOL,
    mc.TYPE_UINT8: DataType.UINT8,
    mc.TYPE_UINT16: DataType.UINT16,
    mc.TYPE_UINT32: DataType.UINT32,
    mc.TYPE_UINT64: DataType.UINT64,
    mc.TYPE_INT8: DataType.INT8,
    mc.TYPE_INT16: DataType.INT16,
    mc.TYPE_INT32: DataType.INT32,
    mc.TYPE_INT64: DataType.INT64,
    mc.TYPE_FP16: DataType.FP16,
    mc.TYPE_FP32: DataType.FP32,
    mc.TYPE_FP64: DataType.FP64,
    mc.TYPE_STRING: DataType.BYTES,
}
_DTYPE_TO_CONFIG = {v: k for k, v in _CONFIG_TO_DTYPE.items()}

_ONNX_TO_DTYPE = {
    onnx.TensorProto.BOOL: DataType.BOOL,
    onnx.TensorProto.UINT8: DataType.UINT8,
    onnx.TensorProto.UINT16: DataType.UINT16,
    onnx.TensorProto.UINT32: DataType.UINT32,
    onnx.TensorProto.UINT64: DataType.UINT64,
    onnx.TensorProto.INT8: DataType.INT8,
    onnx.TensorProto.INT16: DataType.INT16,
    onnx.TensorProto.INT32: DataType.INT32,
    onnx.TensorProto.INT64: DataType.INT64,
    onnx.TensorProto.FLOAT16: DataType.FP16,
    onnx.TensorProto.FLOAT: DataType.FP32,
    onnx.TensorProto.DOUBLE: DataType.FP64,
    onnx.TensorProto.STRING: DataType.BYTES,
}

_GRAPH_LEVELS = {-1: "basic", 0: "all", 1: "all"}  # Triton: -1 basic only, 1 (or unset) everything


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Everything tidal acts on for one model, with the batch dim excluded from shapes."""

    name: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    scheduler: SchedulerConfig
    knobs: Knobs
    instance_count: int
    backend_options: BackendOptions
    default_model_filename: str
    slo_p99_ms: float = 0.0
    slo_min_accuracy: float = 0.0
    slo_priority_p99_ms: tuple[tuple[int, float], ...] = ()  # (level, p99 ms) overriding slo_p99_ms
    controller_mode: str = "off"  # off | batch | full; an SLO without a controller block means full
    controller_period_ms: int = 0  # 0 = the server default
    variants: tuple[str, ...] = ()
    instance_groups: tuple[InstanceGroup, ...] = ()  # as configured; placement expands them per host
    backend: str = ""  # config.pbtxt's backend field ("" and onnxruntime: ONNX Runtime)
    config: mc.ModelConfig = field(default_factory=mc.ModelConfig, compare=False)

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    def slo(self) -> Slo:
        """The controller's objective as configured; `build_spec` refuses a config this would reject."""
        period = {"period_s": self.controller_period_ms / 1e3} if self.controller_period_ms else {}
        return Slo(
            self.slo_p99_ms, self.slo_min_accuracy, dict(self.slo_priority_p99_ms), Mode(self.controller_mode), **period
        )


def _onnx_tensors(values: list[onnx.ValueInfoProto], skip: set[str]) -> list[tuple[str, DataType, list[int]]]:
    out = []
    for value in values:
        if value.name in skip:
            continue
        elem = value.type.tensor_type.elem_type
        if elem not in _ONNX_TO_DTYPE:
            raise ConfigError(f"tensor '{value.name}' has an ONNX element type tidal does not serve ({elem})")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        out.append((value.name, _ONNX_TO_DTYPE[elem], dims))
    return out


# Ops whose run time follows the data rather than the input shapes (loops, branches, data-sized outputs).
_DATA_DEPENDENT_OPS = frozenset(
    {"Loop", "If", "Scan", "NonMaxSuppression", "NonZero", "Unique", "Compress", "Range", "SequenceMap"}
)


def read_graph(model_path: Path) -> onnx.GraphProto:
    """The graph of an ONNX file (external weights stay on disk). Parsing a large model takes seconds, so
    callers that need it twice read it once and pass it on."""
    try:
        return onnx.load(str(model_path), load_external_data=False).graph
    except Exception as exc:  # onnx raises several unrelated types for a bad file
        raise ConfigError(f"{model_path}: not a readable ONNX model: {exc}") from exc


def run_time_follows_shapes(model_path: Path, graph: onnx.GraphProto | None = None) -> bool:
    """Whether equal input shapes mean equal work: only then may the scheduler predict a batch's run time
    from its size (and run cheap ones inline). Unreadable files and custom-domain ops count as no.
    `graph`: the file's graph when the caller has already read it."""
    try:
        nodes = (graph if graph is not None else read_graph(model_path)).node
    except ConfigError:
        return False
    return all(node.domain in ("", "ai.onnx") and node.op_type not in _DATA_DEPENDENT_OPS for node in nodes)


# Ops whose result for one row depends on the other rows of the tensor: tidal optimize's int8-dynamic
# variant quantizes activations with one range per tensor, i.e. per batch.
_BATCH_COUPLING_OPS = frozenset({"DynamicQuantizeLinear"})


def couples_rows(graph: onnx.GraphProto) -> bool:
    """Whether a row's output depends on the rows batched with it; the scheduler then keeps a request with
    non-finite values out of other requests' batches, so one client's inf cannot turn another's answer into NaN."""
    return any(node.op_type in _BATCH_COUPLING_OPS for node in graph.node)


def autocomplete(
    config: mc.ModelConfig,
    model_path: Path,
    present: frozenset[str] = frozenset(),
    graph: onnx.GraphProto | None = None,
) -> None:
    """Fill what config.pbtxt leaves out from the ONNX graph, as Triton's auto-complete does.
    `graph`: the file's graph when the caller has already read it."""
    if graph is None:
        graph = read_graph(model_path)
    initializers = {init.name for init in graph.initializer}
    inputs = _onnx_tensors(list(graph.input), initializers)
    # A graph input with an initializer is a default a request may override: served only where the config
    # declares it (then every request gives it, as every declared input), as Triton serves it.
    declared = {entry.name for entry in config.input}
    inputs += _onnx_tensors([v for v in graph.input if v.name in initializers & declared], set())
    outputs = _onnx_tensors(list(graph.output), set())
    if not config.platform and config.backend in ("", "onnxruntime"):
        config.platform = ONNX_PLATFORM  # Triton reports this platform for ONNX Runtime models
    dynamic_first = all(dims and dims[0] == -1 for _, _, dims in inputs + outputs)
    if "max_batch_size" not in present and not config.input and not config.output and dynamic_first:
        config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
    skip = 1 if config.max_batch_size > 0 else 0
    if config.max_batch_size > 0 and not dynamic_first:
        raise ConfigError(f"{model_path}: max_batch_size > 0 needs a dynamic first dim on every input and output")
    for declared, found, kind in ((config.input, inputs, "input"), (config.output, outputs, "output")):
        by_name = {name: (dtype, dims) for name, dtype, dims in found}
        if not declared:
            for name, dtype, dims in found:
                entry = declared.add(name=name, data_type=_DTYPE_TO_CONFIG[dtype])
                entry.dims.extend(dims[skip:])
            continue
        for entry in declared:
            if entry.name not in by_name:
                raise ConfigError(f"{kind} '{entry.name}' is not in the ONNX graph (it has {', '.join(by_name)})")
            dtype, dims = by_name[entry.name]
            if entry.data_type != mc.TYPE_INVALID and _CONFIG_TO_DTYPE.get(entry.data_type) != dtype:
                raise ConfigError(
                    f"{kind} '{entry.name}': config says {mc.DataType.Name(entry.data_type)}, "
                    f"the model has {dtype.wire_name}"
                )
            entry.data_type = _DTYPE_TO_CONFIG[dtype]
            if not entry.dims:
                entry.dims.extend(dims[skip:])
            else:
                _check_dims(f"{kind} '{entry.name}'", list(entry.dims), dims[skip:], batched=skip == 1)
    _check_required_inputs(config, [name for name, _, _ in inputs if name not in initializers])
    if config.max_batch_size > 0 and not config.HasField("dynamic_batching"):
        config.dynamic_batching.SetInParent()


def _check_required_inputs(config: mc.ModelConfig, required: list[str]) -> None:
    """A config that leaves out a graph input would load READY and fail every request, as Triton refuses it at
    load. `required`: the graph's inputs without an initializer (those with one are optional in ONNX)."""
    declared = [entry.name for entry in config.input]
    missing = [name for name in required if name not in declared]
    if missing:
        raise ConfigError(
            f"model '{config.name}' declares input(s) {', '.join(declared)} but its ONNX graph requires "
            f"{', '.join(required)}: {', '.join(missing)} missing (only a graph input with an initializer may be "
            "left out)"
        )


def _check_dims(tensor: str, declared: list[int], graph: list[int], batched: bool) -> None:
    """Config dims the graph contradicts would load READY and fail every request in the backend.

    -1 on either side matches anything; a graph without shape information (no dims) is not checked.
    `graph` excludes the batch dim when `batched`.
    """
    if any(d < -1 for d in declared):
        raise ConfigError(f"{tensor}: dims {declared}: each must be a size >= 0 or -1 (variable)")
    if graph and (
        len(declared) != len(graph) or any(-1 not in (d, g) and d != g for d, g in zip(declared, graph, strict=True))
    ):
        after = " after the batch dim" if batched else ""
        raise ConfigError(f"{tensor}: dims {declared} disagree with the ONNX graph's {graph}{after}")


def _tensor_specs(entries, kind: str) -> tuple[TensorSpec, ...]:
    specs = []
    for entry in entries:
        dtype = _CONFIG_TO_DTYPE.get(entry.data_type)
        if dtype is None:
            raise ConfigError(f"{kind} '{entry.name}': unsupported data_type {mc.DataType.Name(entry.data_type)}")
        specs.append(TensorSpec(entry.name, dtype, tuple(int(d) for d in entry.dims)))
    return tuple(specs)


def _queue_policy(policy: mc.ModelQueuePolicy) -> QueuePolicy:
    return QueuePolicy(
        timeout_action=TimeoutAction.DELAY
        if policy.timeout_action == mc.ModelQueuePolicy.DELAY
        else TimeoutAction.REJECT,
        default_timeout_us=int(policy.default_timeout_microseconds),
        allow_timeout_override=policy.allow_timeout_override,
        max_queue_size=int(policy.max_queue_size),
    )


def _scheduling(config: mc.ModelConfig) -> tuple[SchedulerConfig, Knobs]:
    db = config.dynamic_batching
    batching = config.HasField("dynamic_batching") and config.max_batch_size > 0
    levels = int(db.priority_levels) or 1
    default_level = int(db.default_priority_level) or (levels + 1) // 2 if db.priority_levels else 1
    if db.priority_levels and not 1 <= default_level <= levels:
        raise ConfigError(f"default_priority_level {default_level} is outside 1..{levels}")
    for level in db.priority_queue_policy:
        if not 1 <= level <= levels:
            raise ConfigError(f"priority_queue_policy for level {level} but priority_levels is {levels}")
    for size in db.preferred_batch_size:
        if not 0 < size <= config.max_batch_size:
            raise ConfigError(f"preferred_batch_size {size} is outside 1..max_batch_size ({config.max_batch_size})")
    scheduler = SchedulerConfig(
        batching=batching,
        max_batch_size=max(config.max_batch_size, 0),
        priority_levels=levels,
        default_priority_level=default_level,
        default_policy=_queue_policy(db.default_queue_policy),
        level_policies={int(k): _queue_policy(v) for k, v in db.priority_queue_policy.items()},
        preserve_ordering=db.preserve_ordering,
    )
    instances = sum(max(group.count, 1) * max(len(group.gpus), 1) for group in config.instance_group) or 1
    if instances > MAX_INSTANCES:
        raise ConfigError(f"instance_group: {instances} instances in all, at most {MAX_INSTANCES} per model")
    knobs = Knobs(
        max_batch_size=config.max_batch_size if batching else 0,
        max_queue_delay_us=int(db.max_queue_delay_microseconds),
        preferred_batch_sizes=tuple(int(s) for s in db.preferred_batch_size),
        instance_count=instances,
    )
    return scheduler, knobs


def _backend_options(config: mc.ModelConfig) -> BackendOptions:
    params = {key: value.string_value for key, value in config.parameters.items()}

    def int_param(key: str) -> int:
        try:
            return int(params.get(key, "0"))
        except ValueError:
            raise ConfigError(f"parameter '{key}' must be an integer, got '{params[key]}'") from None

    level = config.optimization.graph.level if config.optimization.HasField("graph") else 1
    accelerators = ()  # parameters gpu_accelerator: tensorrt, tensorrt_precision_mode: FP16, ...
    if params.get("gpu_accelerator", "").lower() == "tensorrt":
        trt = {k.removeprefix("tensorrt_"): v for k, v in params.items() if k.startswith("tensorrt_")}
        accelerators = (Accelerator("tensorrt", trt),)
    return BackendOptions(
        max_batch_size=max(config.max_batch_size, 0),
        opt_batch_size=max(config.dynamic_batching.preferred_batch_size, default=0),
        gpu_accelerators=accelerators,
        intra_op_threads=int_param("intra_op_thread_count"),
        inter_op_threads=int_param("inter_op_thread_count"),
        graph_optimization_level=_GRAPH_LEVELS.get(level, "all"),
        allow_spinning=params.get("allow_spinning", "false").lower() in ("1", "true", "yes"),
        parameters=params,
    )


def _controller(config: mc.ModelConfig, levels: int) -> dict[str, object]:
    """The SLO and controller fields of ModelSpec, checked."""
    slo = config.slo
    for level in slo.priority_p99_ms:
        if not 1 <= level <= levels:
            raise ConfigError(f"slo.priority_p99_ms: level {level} is outside 1..{levels} (priority_levels)")
    if config.HasField("controller"):
        mode = mc.ModelController.Mode.Name(config.controller.mode).lower()
    else:
        mode = "full" if slo.p99_ms > 0 else "off"
    return {
        "slo_p99_ms": slo.p99_ms,
        "slo_min_accuracy": slo.min_accuracy,
        "slo_priority_p99_ms": tuple(sorted((int(k), float(v)) for k, v in slo.priority_p99_ms.items())),
        "controller_mode": mode,
        "controller_period_ms": int(config.controller.period_ms),
    }


_GROUP_KINDS = {
    mc.ModelInstanceGroup.KIND_AUTO: "auto",
    mc.ModelInstanceGroup.KIND_CPU: "cpu",
    mc.ModelInstanceGroup.KIND_GPU: "gpu",
}


def _instance_groups(config: mc.ModelConfig) -> tuple[InstanceGroup, ...]:
    """Triton's instance_group entries, checked; where they land is decided at load, per host."""
    groups = []
    for i, group in enumerate(config.instance_group):
        kind = _GROUP_KINDS.get(group.kind)
        label = mc.ModelInstanceGroup.Kind.Name(group.kind)
        if kind is None:
            raise ConfigError(f"instance_group[{i}]: {label} is not supported by tidal (KIND_AUTO, KIND_CPU, KIND_GPU)")
        if kind == "cpu" and group.gpus:
            raise ConfigError(f"instance_group[{i}]: KIND_CPU cannot list gpus")
        if any(g < 0 for g in group.gpus) or len(set(group.gpus)) != len(group.gpus):
            raise ConfigError(f"instance_group[{i}]: gpus {list(group.gpus)}: each must be a distinct GPU number >= 0")
        groups.append(InstanceGroup(kind, max(group.count, 1), tuple(int(g) for g in group.gpus)))
    return tuple(groups)


def build_spec(config: mc.ModelConfig) -> ModelSpec:
    if config.max_batch_size < 0:
        raise ConfigError(f"max_batch_size must be >= 0, got {config.max_batch_size}")
    groups = _instance_groups(config)
    scheduler, knobs = _scheduling(config)
    spec = ModelSpec(
        name=config.name,
        max_batch_size=max(config.max_batch_size, 0),
        inputs=_tensor_specs(config.input, "input"),
        outputs=_tensor_specs(config.output, "output"),
        scheduler=scheduler,
        knobs=knobs,
        instance_count=knobs.instance_count,
        backend_options=_backend_options(config),
        default_model_filename=config.default_model_filename or "model.onnx",
        **_controller(config, scheduler.priority_levels),
        variants=tuple(config.variants),
        instance_groups=groups,
        backend=config.backend,
        config=config,
    )
    try:  # the controller's own checks (finite, positive targets; accuracy in 0..1; the period), made at load
        spec.slo()
    except InvalidArgument as exc:
        raise ConfigError(f"slo/controller: {exc}") from exc
    return spec


class VersionSpec(NamedTuple):
    spec: ModelSpec
    default_file: Path
    graph: onnx.GraphProto  # the default file's, read once for the callers that inspect it further


def version_spec(parsed: ParsedConfig, version_dir: Path) -> VersionSpec:
    """Blocking: one version's settings as a load serves them, auto-completed from its default file.

    The one way from config to spec (and backend options): a load builds from it, and `tidal optimize --backend
    tensorrt` keys the engines it builds ahead from it, so a setting auto-complete fills in (max_batch_size,
    the batch profile) cannot differ between the engine built and the one a load looks for.
    """
    config = mc.ModelConfig()
    config.CopyFrom(parsed.config)
    default_file = version_dir / (config.default_model_filename or "model.onnx")
    if not default_file.is_file():
        raise ConfigError(f"{default_file} does not exist")
    graph = read_graph(default_file)
    try:
        autocomplete(config, default_file, parsed.present, graph)
        spec = build_spec(config)
    except ConfigError as exc:  # their checks see the settings, not the file they came from
        raise ConfigError(f"{parsed.source}: {exc}") from exc
    return VersionSpec(spec, default_file, graph)


def load_config(model_dir: Path, name: str) -> ParsedConfig:
    """The model's config, or an empty one to auto-complete when config.pbtxt is absent."""
    path = model_dir / "config.pbtxt"
    if path.exists():
        parsed = parse_model_config(path)
    else:
        parsed = ParsedConfig(mc.ModelConfig(), [], frozenset(), f"{model_dir} (no config.pbtxt, auto-completed)")
    config, ignored = parsed.config, parsed.ignored
    if config.name and config.name != name:
        raise ConfigError(f"{path}: name '{config.name}' does not match the folder '{name}'")
    config.name = name
    if ignored:
        log.warning("model %s: accepted but not acted on by tidal: %s", name, ", ".join(ignored))
    return parsed
