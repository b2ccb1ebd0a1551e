"""Native TensorRT (10 and later): an ONNX model built into an engine, one execution context per instance.

Networks are strongly typed: precision is what the ONNX graph says, so INT8 comes only from the explicit
Q/DQ models `tidal optimize` makes and FP16 from its fp16 variant; no builder precision flag is set and no
calibration runs. One optimization profile covers batch 1..max_batch_size, tuned at the preferred batch
size. Serialized engines are cached, keyed by (model hash, GPU name, compute capability, TensorRT version,
profile), looked for in `options.cache_dirs` in order (the version folder's `engines/`, where an engine built
ahead of time goes, then the user's cache) and, when none matches, built at load, said in the log, and
written to the last directory.

The instances of one engine on one GPU share one deserialized engine (its weights are on the device once,
not once per instance), as TensorRT recommends: the engine is read-only and thread-safe, the execution
context is what must not be shared. Each instance owns an execution context, a CUDA stream, device buffers
sized for max_batch_size (so their addresses never change) and page-locked staging buffers. A batch runs
as: copy in, `execute_async_v3`, copy out, synchronize. Where the engine allows it, the enqueue of each
batch size is captured once as a CUDA graph and replayed after that (fewer launches per batch);
`parameters { key: "cuda_graphs" value: "false" }` turns that off, and so does, for that instance, a
capture that fails (an engine with a layer CUDA cannot capture), with one warning.

Q/DQ models TensorRT refuses (asymmetric zero points, int32 bias, unsigned types) are caught before the
parser with a reason that says what to change (`qdq_refusal`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tensorrt as trt
from onnx import TensorProto, numpy_helper

from tidal.backends import cuda, hardware
from tidal.backends.base import BackendOptions
from tidal.errors import BackendError, ConfigError, InvalidArgument
from tidal.types import DataType, TensorSpec

log = logging.getLogger(__name__)

MIN_VERSION = 10  # execute_async_v3, set_tensor_address and strongly typed networks
_LOGGER = trt.Logger(trt.Logger.WARNING)


@dataclass(frozen=True, slots=True)
class EngineKey:
    model_sha256: str
    gpu_name: str
    compute_capability: str
    trt_version: str
    opt_batch: int
    max_batch: int

    def filename(self) -> str:
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu_name).strip("-").lower()
        return (f"{self.model_sha256[:20]}-{gpu}-sm{self.compute_capability.replace('.', '')}"
                f"-trt{self.trt_version}-b{self.opt_batch}of{self.max_batch}.engine")


def engine_key(model: bytes, options: BackendOptions) -> EngineKey:
    """What an engine depends on: the model's bytes, the GPU it was tuned on, TensorRT's version, the profile."""
    gpu = _visible_gpu(options)
    cc = gpu.compute_capability or _sm_of_current_device()
    return EngineKey(hashlib.sha256(model).hexdigest(), gpu.name, cc, trt.__version__,
                     options.opt_batch if options.max_batch_size else 0, options.max_batch_size)


def _visible_gpu(options: BackendOptions) -> hardware.GpuInfo:
    gpu = {g.index: g for g in hardware.gpus()}.get(options.device_id)
    if gpu is None:
        raise cuda.GpuUnavailable(f"GPU {options.device_id} is not visible to this process")
    return gpu


def _sm_of_current_device() -> str:
    sm = cuda.runtime().cuda_device_sm()
    return f"{sm // 10}.{sm % 10}"


def _network(builder: Any, model: bytes, path: Path) -> Any:
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, _LOGGER)
    if not parser.parse(model, str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"{path}: TensorRT cannot parse it: {errors}")
    return network


def _profile(builder: Any, network: Any, key: EngineKey, path: Path) -> Any | None:
    """One profile over the batch dim; the other dims must be fixed (TensorRT tunes for exact shapes)."""
    if key.max_batch == 0:
        return None
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise ConfigError(f"{path}: input '{tensor.name}' {tuple(tensor.shape)} has unknown dims besides the "
                              "batch; the tensorrt backend needs them fixed")
        profile.set_shape(tensor.name, (1, *rest), (key.opt_batch, *rest), (key.max_batch, *rest))
    return profile


# The element types TensorRT's Q/DQ layers quantize to (INT8, FP8 E4M3, INT4 and, from 10.8, FP4). ONNX
# Runtime's quantizer also writes UINT8 activations and INT32 biases, which TensorRT's ONNX parser refuses.
_QDQ_TYPES = frozenset(getattr(TensorProto, t) for t in ("INT8", "FLOAT8E4M3FN", "INT4", "FLOAT4E2M1")
                       if hasattr(TensorProto, t))
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def qdq_refusal(model: bytes, path: Path) -> str | None:
    """Why TensorRT's explicit quantization would refuse this model's Q/DQ nodes; None when it would not.

    TensorRT quantizes symmetrically only: every QuantizeLinear/DequantizeLinear zero point must be 0 and the
    quantized type signed. ONNX Runtime's static quantizer (tidal's int8 variant) writes non-zero activation
    zero points unless asked for symmetric activations, and int32 biases. TensorRT's parser would refuse such
    a model too, but only after reading it and with an assertion; this names the nodes and the cure, for a
    protobuf parse. Zero points computed at run time (neither initializer nor Constant) are left to the parser.
    """
    try:
        graph = onnx.load_model_from_string(model).graph
    except Exception:  # not ONNX protobuf (DecodeError): TensorRT's parser says what is wrong with it
        return None
    nodes = [n for n in graph.node if n.op_type in _QDQ_OPS]
    if not nodes:
        return None
    constants = {t.name: t for t in graph.initializer}
    constants.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value"})
    problems = []
    for node in nodes:
        zero_point = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        quantized = zero_point
        if quantized is None and node.op_type == "DequantizeLinear":
            quantized = constants.get(node.input[0])
        name = node.name or node.output[0]
        if quantized is not None and quantized.data_type not in _QDQ_TYPES:
            problems.append(f"{node.op_type} '{name}' is {TensorProto.DataType.Name(quantized.data_type)}")
        elif zero_point is not None and _nonzero(zero_point, path):
            problems.append(f"{node.op_type} '{name}' has a non-zero zero point")
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return (f"TensorRT only supports symmetric quantization to signed types (every Q/DQ zero point 0; INT8, FP8 "
            f"or INT4, no INT32 bias): {'; '.join(problems[:3])}{more}; quantize with symmetric activations and "
            "unquantized biases for TensorRT")


def _nonzero(tensor: onnx.TensorProto, path: Path) -> bool:
    try:
        return bool(np.any(np.asarray(numpy_helper.to_array(tensor, str(path.parent))).astype(np.float64) != 0))
    except (TypeError, ValueError):  # a type numpy cannot widen: the parser decides
        return False


def build_engine(model: bytes, path: Path, key: EngineKey, workspace_bytes: int = 0) -> bytes:
    """A serialized engine for `model` on the current device; ConfigError naming what TensorRT refused."""
    builder = trt.Builder(_LOGGER)
    network = _network(builder, model, path)
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = _profile(builder, network, key, path)
    if profile is not None:
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConfigError(f"{path}: TensorRT could not build an engine (its log above says why)")
    return bytes(serialized)


def find_engine(key: EngineKey, directories: Sequence[Path]) -> Path | None:
    """The first of `directories` holding the engine for `key`."""
    return next((d / key.filename() for d in directories if (d / key.filename()).is_file()), None)


def save_engine(engine: bytes, key: EngineKey, directory: Path) -> Path:
    """Written atomically: a server loading from the same folder never reads half an engine."""
    target = directory / key.filename()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(engine)
    os.replace(tmp, target)
    return target


# The key README documents, the one the TensorRT execution provider reads too (`tensorrt_` + its option), so
# one config line sets the workspace for both TensorRT paths; then the older key this backend read alone.
WORKSPACE_KEYS = ("tensorrt_max_workspace_size_bytes", "max_workspace_size_bytes")


def workspace_bytes(options: BackendOptions) -> int:
    """The builder's workspace limit in bytes from the config's parameters; 0: TensorRT's default (the GPU)."""
    for key in WORKSPACE_KEYS:
        if key in options.parameters:
            value = options.parameters[key]
            try:
                limit = int(value)
            except ValueError:
                limit = -1
            if limit < 0:
                raise ConfigError(f"parameter '{key}' must be a number of bytes, got '{value}'")
            return limit
    return 0


def _engine_bytes(path: Path, model: bytes, key: EngineKey, options: BackendOptions) -> bytes:
    """The engine `key` names for `path` (whose bytes are `model`): from the first cache directory holding it,
    else built and saved."""
    found = find_engine(key, options.cache_dirs)
    if found is not None:
        log.info("%s: TensorRT engine %s", path, found)
        return found.read_bytes()
    refusal = qdq_refusal(model, path)
    if refusal is not None:
        raise ConfigError(f"{path}: {refusal}")
    log.warning("%s: no TensorRT engine for %s (sm %s, TensorRT %s) in %s; building one now, which can take "
                "minutes (`tidal optimize --backend tensorrt` builds them ahead of time)", path, key.gpu_name,
                key.compute_capability, key.trt_version, ", ".join(map(str, options.cache_dirs)) or "no cache")
    engine = build_engine(model, path, key, workspace_bytes(options))
    if options.cache_dirs:
        log.info("%s: TensorRT engine saved to %s", path, save_engine(engine, key, options.cache_dirs[-1]))
    return engine


_TYPES = {np.dtype(t.np_dtype): t for t in DataType if t is not DataType.BYTES}


def _spec(engine: Any, name: str) -> TensorSpec:
    dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
    if dtype not in _TYPES:
        raise ConfigError(f"tensor '{name}' has type {dtype}, which tidal does not serve")
    return TensorSpec(name, _TYPES[dtype], tuple(engine.get_tensor_shape(name)))


def _deserialize(path: Path, engine_bytes: bytes) -> tuple[Any, Any]:
    """The runtime and the engine it read: the runtime is kept as long as the engine (TensorRT's rule)."""
    runtime = trt.Runtime(_LOGGER)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise ConfigError(f"{path}: TensorRT could not load its engine (built by another version?)")
    return runtime, engine


@dataclass(eq=False, slots=True)
class _Shared:
    users: int = 0
    loaded: tuple[Any, Any] | None = None  # (runtime, engine)
    lock: threading.Lock = field(default_factory=threading.Lock)


class EnginePool:
    """Deserialized engines by (engine key, device), shared by the instances that run them there.

    An ICudaEngine holds the network's weights on its GPU; one per instance would hold them once per instance.
    TensorRT's engine is read-only and may serve several execution contexts on several threads at once (one
    context per stream), so instances share it and own only their context. Counted: the last instance to
    close drops the engine, after its own context. Versions load on several threads: the first instance to
    ask loads (or builds) the engine under the entry's lock and the others wait for it instead of building
    it again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[EngineKey, int], _Shared] = {}

    def open(self, key: tuple[EngineKey, int], load: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
        """The engine for `key` (from `load` when no instance holds it) and a new execution context on it."""
        with self._lock:
            entry = self._entries.setdefault(key, _Shared())
            entry.users += 1
        try:
            with entry.lock:  # context creation too: TensorRT does not promise it is thread-safe
                if entry.loaded is None:
                    entry.loaded = load()
                engine = entry.loaded[1]
                context = engine.create_execution_context()
            if context is None:
                raise ConfigError("TensorRT could not create an execution context (out of GPU memory?)")
        except BaseException:
            self.release(key)
            raise
        return engine, context

    def release(self, key: tuple[EngineKey, int]) -> None:
        with self._lock:
            entry = self._entries[key]
            entry.users -= 1
            if entry.users == 0:
                del self._entries[key]

    def held(self) -> int:
        """Engines some instance still uses."""
        with self._lock:
            return len(self._entries)


ENGINES = EnginePool()


class TensorRTBackend:
    """One execution context on its own stream; see tidal.backends.base for the threading contract.

    `engine` may be shared with other instances (EnginePool); `release` gives this instance's share back.
    """

    def __init__(self, path: Path, options: BackendOptions, rt: Any, engine: Any, context: Any,
                 release: Callable[[], None]) -> None:
        self._path, self._rt, self._device = path, rt, options.device_id
        rt.cuda_set_device(self._device)
        self._engine, self._context, self._release = engine, context, release
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = [_spec(self._engine, n) for n in names if is_input[n]]
        self._outputs = [_spec(self._engine, n) for n in names if not is_input[n]]
        self._max_batch = options.max_batch_size
        self._stream = cuda.Stream(rt)
        self._staging = cuda.Staging(rt, self._stream)
        self._device_buffers = {s.name: cuda.DeviceBuffer(rt) for s in (*self._inputs, *self._outputs)}
        self._reserve()
        self._graphs: dict[tuple, int] = {}
        self._use_graphs = options.parameters.get("cuda_graphs", "true").lower() not in ("0", "false", "no")

    def _reserve(self) -> None:
        """Buffers for the largest batch at load: a captured graph holds their addresses for good."""
        rows = max(self._max_batch, 1)
        for spec in (*self._inputs, *self._outputs):
            dims = [rows if i == 0 and self._max_batch else d for i, d in enumerate(spec.shape)]
            if all(d >= 0 for d in dims):
                count = int(np.prod(dims, dtype=np.int64))
                self._device_buffers[spec.name].reserve(count * spec.datatype.np_dtype.itemsize)

    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def _bind(self, inputs: Mapping[str, np.ndarray]) -> tuple:
        """Shapes set, inputs queued for upload, every address set; the shapes, which key the graphs."""
        for spec in self._inputs:
            value = inputs.get(spec.name)
            if value is None or value.dtype != spec.datatype.np_dtype:
                got = "nothing" if value is None else str(value.dtype)
                raise InvalidArgument(f"input '{spec.name}' must be {spec.datatype.np_dtype}, got {got}")
            value = np.ascontiguousarray(value)
            if not self._context.set_input_shape(spec.name, value.shape):
                raise InvalidArgument(f"input '{spec.name}': shape {value.shape} is outside the engine's profile")
            buffer = self._device_buffers[spec.name]
            self._staging.upload(spec.name, value, buffer.reserve(value.nbytes))
            self._context.set_tensor_address(spec.name, buffer.ptr)
        for spec in self._outputs:
            shape = tuple(self._context.get_tensor_shape(spec.name))
            nbytes = int(np.prod(shape, dtype=np.int64)) * spec.datatype.np_dtype.itemsize
            self._context.set_tensor_address(spec.name, self._device_buffers[spec.name].reserve(nbytes))
        return tuple(tuple(inputs[s.name].shape) for s in self._inputs)

    def _enqueue(self, shapes: tuple) -> None:
        graph = self._graphs.get(shapes)
        if graph is not None:
            self._rt.cuda_graph_launch(graph, self._stream.handle)
            return
        if not self._context.execute_async_v3(self._stream.handle):
            raise BackendError("tensorrt: execute_async_v3 failed (see the TensorRT log)")
        if self._use_graphs:
            self._capture(shapes)

    def _capture(self, shapes: tuple) -> None:
        """Record this shape's enqueue as a graph, after one plain run has settled the context's state.

        The batch itself ran in that plain run, so a failed capture loses only the graph. It fails two ways:
        CUDA invalidates the capture when the engine enqueues something not capturable (a host sync, an
        allocation), and then ending it raises; or TensorRT's enqueue reports failure while capturing. Such
        an engine fails the same way at every batch size, so graphs go off for this instance, with one
        warning, rather than each new batch size failing (NVIDIA's trtexec falls back the same way).
        """
        stream = self._stream.handle
        try:
            self._rt.cuda_graph_begin_capture(stream)
        except RuntimeError as exc:
            self._graphs_off(str(exc))
            return
        try:
            captured, why = bool(self._context.execute_async_v3(stream)), "execute_async_v3 failed while capturing"
        except Exception as exc:  # the plain run of this batch succeeded: only the capture failed
            captured, why = False, f"execute_async_v3 raised while capturing: {exc}"
        try:  # always ended: a stream left capturing would record the next batches instead of running them
            graph = self._rt.cuda_graph_end_capture(stream)
        except RuntimeError as exc:  # invalidated, or the graph would not instantiate: no graph was made
            self._graphs_off(str(exc))
            return
        if captured:
            self._graphs[shapes] = graph
            return
        self._rt.cuda_graph_destroy(graph)
        self._graphs_off(why)

    def _graphs_off(self, reason: str) -> None:
        self._use_graphs = False
        log.warning("tensorrt: %s: its engine cannot be captured as a CUDA graph (%s); this instance enqueues "
                    "each batch without graphs from now on", self._path, reason)

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        known = {s.name: s for s in self._outputs}
        unknown = [n for n in output_names if n not in known]
        if unknown:
            raise InvalidArgument(f"unknown output {unknown[0]!r} (the engine has {', '.join(known)})")
        self._rt.cuda_set_device(self._device)  # the worker thread may not have this device current
        try:
            self._enqueue(self._bind(inputs))
            views = {n: self._staging.download(f"out:{n}", self._device_buffers[n].ptr, known[n].datatype.np_dtype,
                                               tuple(self._context.get_tensor_shape(n))) for n in output_names}
            self._stream.synchronize()
        except RuntimeError as exc:  # CUDA errors from tidal._kernels
            raise BackendError(f"tensorrt: {exc}") from exc
        return {n: v.copy() for n, v in views.items()}

    def close(self) -> None:
        """Idempotent. Every resource is freed even when freeing one fails (the first failure is raised after),
        and the instance's share of the engine is given back once, after its context."""
        if self._context is None:
            return
        steps: list[Callable[[], object]] = [lambda graph=g: self._rt.cuda_graph_destroy(graph)
                                             for g in self._graphs.values()]
        self._graphs.clear()
        steps.append(self._drop_context)
        steps += [buffer.close for buffer in self._device_buffers.values()]
        steps += [self._staging.close, self._stream.close]
        failure: BaseException | None = None
        for step in steps:
            try:
                step()
            except Exception as exc:  # freeing the rest matters more than this one
                failure = failure or exc
        if failure is not None:
            raise failure

    def _drop_context(self) -> None:
        self._context = self._engine = None  # the context first: it must not outlive a shared engine
        self._release()


def gpu_unavailable() -> str | None:
    if int(trt.__version__.split(".")[0]) < MIN_VERSION:
        return f"tensorrt {trt.__version__} is older than {MIN_VERSION}"
    return cuda.unavailable_reason()


def load(path: Path, options: BackendOptions) -> TensorRTBackend:
    reason = gpu_unavailable()
    if reason is not None:
        raise cuda.GpuUnavailable(f"tensorrt backend: {reason}")
    _visible_gpu(options)
    rt = cuda.runtime()
    rt.cuda_set_device(options.device_id)
    model = path.read_bytes()
    key = (engine_key(model, options), options.device_id)
    engine, context = ENGINES.open(key, lambda: _deserialize(path, _engine_bytes(path, model, key[0], options)))
    try:
        return TensorRTBackend(path, options, rt, engine, context, lambda: ENGINES.release(key))
    except BaseException:
        ENGINES.release(key)
        raise


__all__ = ["ENGINES", "EngineKey", "EnginePool", "TensorRTBackend", "build_engine", "engine_key", "find_engine",
           "gpu_unavailable", "load", "qdq_refusal", "save_engine", "workspace_bytes"]
