"""The native TensorRT backend without a GPU: a fake `tensorrt` module (the calls tidal makes, recording
them; its engine computes OUTPUT = 2 * INPUT through the device addresses it is given) over the fake CUDA
runtime. Checks the strongly typed network, the one profile, the engine cache and its key, CUDA graphs per
batch size and the fallback when a capture fails, one engine shared by the instances on a GPU, the
refusals (asymmetric Q/DQ among them), that close releases everything, and `tidal optimize --backend
tensorrt`, one variant's failure included.

The fake behaves as TensorRT does where tidal depends on it: its ONNX parser refuses a Q/DQ zero point that
is not 0 (as onnx-tensorrt's importer asserts), a failed build returns None, a context runs only on its
engine's device, and an engine whose enqueue is not capturable fails the capture the ways CUDA and
TensorRT report it (`Recorder.capture_failure`)."""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import json
import logging
import sys
import threading
import time
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from gpu_fakes import FakeCudaRuntime
from onnx import TensorProto, helper, numpy_helper

import onnx_models as models
from tidal.backends import cuda, hardware
from tidal.backends.base import BackendOptions
from tidal.backends.hardware import GpuInfo
from tidal.cli import main
from tidal.errors import ConfigError, InvalidArgument
from tidal.optimize import engines, quantize
from tidal.optimize.data import Dataset
from tidal.optimize.graph import save_graph
from tidal.repository.config import DEFAULT_MAX_BATCH_SIZE
from tidal.repository.manager import ModelManager
from tidal.repository.variants import (
    Hardware,
    LatencyProfile,
    Variant,
    VariantManifest,
    load_manifest,
    profile_key,
    save_manifest,
)

GPU = GpuInfo(0, "NVIDIA H100 80GB HBM3", 81559, "9.0", "GPU-aaaa")


class Recorder:
    def __init__(self) -> None:
        self.builds: list[dict] = []
        self.parse_ok = True
        self.unbuildable: set[bytes] = set()  # models whose build fails (build_serialized_network -> None)
        self.build_seconds = 0.0
        self.deserialized: list = []  # every engine deserialized, in order
        # How a capture of the engine's enqueue fails: None (it does not), "invalidated" (the enqueue makes a
        # call CUDA refuses while capturing, TensorRT reports it), "invalidated-unreported" (the same, but the
        # enqueue returns True), "refused" (TensorRT returns False, the capture itself stays valid).
        self.capture_failure: str | None = None


def _parser_error(model: bytes) -> str | None:
    """What TensorRT's ONNX parser (onnx-tensorrt) asserts on a Q/DQ zero point that is not all zeros."""
    try:
        graph = onnx.load_model_from_string(model).graph
    except Exception:  # the tests' placeholder bytes stand for a model TensorRT takes
        return None
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for i, node in enumerate(graph.node):
        zero_point = inits.get(node.input[2]) if len(node.input) > 2 else None
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and zero_point is not None and zero_point.any():
            return (f"In node {i} with name: {node.name} and operator: {node.op_type}: UNSUPPORTED_NODE: Assertion "
                    "failed: shiftIsAllZeros(zeroPoint) && \"TensorRT only supports symmetric quantization. The "
                    "zero point for the QuantizeLinear/DequantizeLinear operator must be all zeros.\"")
    return None


def _fake_trt(rec: Recorder, rt: FakeCudaRuntime, version: str = "10.13.0") -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda t: t

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.num_inputs, self.model = flags, 1, b""

        def get_input(self, i: int):
            return types.SimpleNamespace(name="INPUT", shape=(-1, 4))

    class Parser:
        def __init__(self, network, logger) -> None:
            self.network, self.errors = network, []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def parse(self, model: bytes, path: str) -> bool:
            self.network.model = model
            error = "Unsupported ONNX op: NonMaxSuppression" if not rec.parse_ok else _parser_error(model)
            if error is not None:
                self.errors.append(error)
            return error is None

        def get_error(self, i: int) -> str:
            return self.errors[i]

    class Profile:
        def __init__(self) -> None:
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi) -> None:
            self.shapes[name] = [lo, opt, hi]

    class Config:
        def __init__(self) -> None:
            self.profiles, self.pools, self.flags = [], {}, []

        def set_memory_pool_limit(self, pool, size) -> None:
            self.pools[pool] = size

        def add_optimization_profile(self, profile) -> None:
            self.profiles.append(profile.shapes)

        def set_flag(self, flag) -> None:
            self.flags.append(flag)

    class Builder:
        def __init__(self, logger) -> None:
            pass

        create_network = staticmethod(Network)
        create_optimization_profile = staticmethod(Profile)
        create_builder_config = staticmethod(Config)

        def build_serialized_network(self, network, config):
            time.sleep(rec.build_seconds)
            rec.builds.append({"flags": network.flags, "profiles": config.profiles, "pools": config.pools,
                               "precision_flags": config.flags})
            if network.model in rec.unbuildable:
                return None  # TensorRT logs why ("could not find any implementation for node ...")
            return json.dumps(config.profiles).encode()

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine, self.shapes, self.addresses, self.enqueues = engine, {}, {}, 0

        def set_input_shape(self, name, shape) -> bool:
            ok = json.loads(self.engine.blob)[0]["INPUT"][2][0] >= shape[0]
            self.shapes[name] = tuple(shape)
            return ok

        def get_tensor_shape(self, name):
            return self.shapes["INPUT"]

        def set_tensor_address(self, name, ptr) -> None:
            self.addresses[name] = ptr

        def execute_async_v3(self, stream: int) -> bool:
            self.enqueues += 1
            if rt.current != self.engine.device:
                return False  # an engine's kernels and weights are on the device it was deserialized on
            if stream in rt.capturing and rec.capture_failure == "refused":
                return False
            if stream in rt.capturing and rec.capture_failure in ("invalidated", "invalidated-unreported"):
                try:  # a layer that syncs with the host or allocates: CUDA refuses it while capturing
                    rt.capture_unsupported(stream, "cudaStreamSynchronize")
                except RuntimeError:
                    return rec.capture_failure == "invalidated-unreported"
            n, src, dst = int(np.prod(self.shapes["INPUT"])), self.addresses["INPUT"], self.addresses["OUTPUT"]

            def kernel() -> None:
                x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(src))
                np.ctypeslib.as_array((ctypes.c_float * n).from_address(dst))[:] = 2 * x

            rt._enqueue(stream, kernel)
            return True

    class Engine:
        num_io_tensors = 2

        def __init__(self, blob: bytes) -> None:
            self.blob, self.device = blob, rt.current
            self.contexts: list[Context] = []

        def get_tensor_name(self, i: int) -> str:
            return ["INPUT", "OUTPUT"][i]

        def get_tensor_mode(self, name: str) -> str:
            return "in" if name == "INPUT" else "out"

        def get_tensor_dtype(self, name: str):
            return np.float32

        def get_tensor_shape(self, name: str):
            return (-1, 4)

        def create_execution_context(self) -> Context:
            self.contexts.append(Context(self))
            return self.contexts[-1]

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, blob: bytes) -> Engine:
            rec.engine = Engine(blob)
            rec.deserialized.append(rec.engine)
            return rec.engine

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime
    return trt


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch):
    rec, rt = Recorder(), FakeCudaRuntime()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt(rec, rt))
    monkeypatch.delitem(sys.modules, "tidal.backends.tensorrt", raising=False)
    monkeypatch.setattr(cuda, "runtime", lambda: rt)
    monkeypatch.setattr(cuda, "unavailable_reason", lambda: None)
    monkeypatch.setattr(hardware, "gpus", lambda: (GPU,))
    module = importlib.import_module("tidal.backends.tensorrt")
    yield module, rec, rt
    sys.modules.pop("tidal.backends.tensorrt", None)


def _options(tmp_path: Path, **kw) -> BackendOptions:
    base = BackendOptions(device="gpu", max_batch_size=32, opt_batch_size=8,
                          cache_dirs=(tmp_path / "repo-engines", tmp_path / "cache"))
    return replace(base, **kw)


def _model(tmp_path: Path, content: bytes = b"onnx bytes") -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    return path


def test_engine_key_changes_with_everything_an_engine_depends_on(fakes, tmp_path: Path, monkeypatch) -> None:
    trt_backend, _, _ = fakes
    options = _options(tmp_path)
    key = trt_backend.engine_key(b"a", options)
    assert key == trt_backend.engine_key(b"a", options)
    monkeypatch.setattr(hardware, "gpus", lambda: (replace(GPU, name="NVIDIA L4", compute_capability="8.9"),))
    others = [
        trt_backend.engine_key(b"b", options),
        trt_backend.engine_key(b"a", options),
        trt_backend.engine_key(b"a", replace(options, opt_batch_size=16)),
        trt_backend.engine_key(b"a", replace(options, max_batch_size=64)),
    ]
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", "11.0.0")
    others.append(trt_backend.engine_key(b"a", options))
    names = {k.filename() for k in [key, *others]}
    assert len(names) == 6
    assert key.filename().endswith("-nvidia-h100-80gb-hbm3-sm90-trt10.13.0-b8of32.engine")


def test_strongly_typed_network_with_one_batch_profile(fakes, tmp_path: Path) -> None:
    trt_backend, rec, _ = fakes
    trt_backend.load(_model(tmp_path), _options(tmp_path, parameters={"max_workspace_size_bytes": "1024"}))
    (build,) = rec.builds
    assert build["flags"] == 1 << 5 and build["precision_flags"] == []  # precision from the graph, never flags
    assert build["profiles"] == [{"INPUT": [(1, 4), (8, 4), (32, 4)]}]
    assert build["pools"] == {"workspace": 1024}


def test_the_documented_workspace_key_sets_the_builders_workspace(fakes, tmp_path: Path) -> None:
    """README documents `tensorrt_max_workspace_size_bytes` (the TensorRT execution provider's key too)."""
    trt_backend, rec, _ = fakes
    trt_backend.load(_model(tmp_path), _options(tmp_path, parameters={"tensorrt_max_workspace_size_bytes": "2048"}))
    assert rec.builds[-1]["pools"] == {"workspace": 2048}
    with pytest.raises(ConfigError, match="'tensorrt_max_workspace_size_bytes' must be a number of bytes, got '1G'"):
        trt_backend.load(_model(tmp_path, b"other"),
                         _options(tmp_path, parameters={"tensorrt_max_workspace_size_bytes": "1G"}))


def test_engines_are_cached_and_found_ahead_of_time_first(fakes, tmp_path: Path) -> None:
    trt_backend, rec, _ = fakes
    path, options = _model(tmp_path), _options(tmp_path)
    trt_backend.load(path, options).close()
    key = trt_backend.engine_key(path.read_bytes(), options)
    assert (tmp_path / "cache" / key.filename()).is_file()
    trt_backend.load(path, options).close()
    assert len(rec.builds) == 1  # the second load read the cache
    ahead = tmp_path / "repo-engines" / key.filename()
    ahead.parent.mkdir()
    ahead.write_bytes(json.dumps([{"INPUT": [[1, 4], [8, 4], [99, 4]]}]).encode())
    trt_backend.load(path, options).close()
    assert rec.engine.blob == ahead.read_bytes() and len(rec.builds) == 1


def test_runs_batches_and_replays_a_graph_per_batch_size(fakes, tmp_path: Path) -> None:
    trt_backend, rec, rt = fakes
    backend = trt_backend.load(_model(tmp_path), _options(tmp_path))
    x3, x1 = np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((1, 4), np.float32)
    for x in (x3, x3, x1, x3):
        assert np.array_equal(backend.run({"INPUT": x}, ["OUTPUT"])["OUTPUT"], 2 * x)
    context = rec.engine.contexts[0]
    assert context.enqueues == 4  # per shape: one plain run and one captured; repeats replay the graph
    assert len(rt.graphs) == 2 and len(rt.launched) == 2
    backend.close()
    assert rt.live() == 0


@pytest.mark.parametrize("failure", ["invalidated", "invalidated-unreported", "refused"])
def test_a_failed_capture_turns_graphs_off_and_every_batch_still_runs(fakes, tmp_path: Path, caplog,
                                                                       failure: str) -> None:
    """An engine CUDA cannot capture: the batch that tried still answers (its plain run did the work), graphs
    go off for the instance with one warning, and no batch size fails or tries again."""
    trt_backend, rec, rt = fakes
    rec.capture_failure = failure
    backend = trt_backend.load(_model(tmp_path), _options(tmp_path))
    x3, x1 = np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((1, 4), np.float32)
    with caplog.at_level(logging.WARNING, logger="tidal.backends.tensorrt"):
        for x in (x3, x3, x1, x3):
            assert np.array_equal(backend.run({"INPUT": x}, ["OUTPUT"])["OUTPUT"], 2 * x)
    (warning,) = [r for r in caplog.records if "CUDA graph" in r.getMessage()]
    assert warning.levelno == logging.WARNING and "without graphs from now on" in warning.getMessage()
    assert rec.engine.contexts[0].enqueues == 5  # one capture tried, then one plain enqueue per batch
    assert not rt.graphs and not rt.launched and not rt.capturing and not rt.invalidated
    backend.close()
    assert rt.live() == 0


def test_no_graphs_when_turned_off(fakes, tmp_path: Path) -> None:
    trt_backend, _, rt = fakes
    backend = trt_backend.load(_model(tmp_path), _options(tmp_path, parameters={"cuda_graphs": "false"}))
    x = np.ones((2, 4), np.float32)
    for _ in range(3):
        assert np.array_equal(backend.run({"INPUT": x}, ["OUTPUT"])["OUTPUT"], 2 * x)
    assert not rt.graphs and not rt.launched
    backend.close()


def test_refusals_name_the_cause(fakes, tmp_path: Path, monkeypatch) -> None:
    trt_backend, rec, _ = fakes
    backend = trt_backend.load(_model(tmp_path), _options(tmp_path))
    with pytest.raises(InvalidArgument, match="outside the engine's profile"):
        backend.run({"INPUT": np.ones((33, 4), np.float32)}, ["OUTPUT"])
    with pytest.raises(InvalidArgument, match="must be float32, got float64"):
        backend.run({"INPUT": np.ones((2, 4))}, ["OUTPUT"])
    with pytest.raises(InvalidArgument, match="unknown output 'nope'"):
        backend.run({"INPUT": np.ones((2, 4), np.float32)}, ["nope"])
    backend.close()
    rec.parse_ok = False
    with pytest.raises(ConfigError, match="TensorRT cannot parse it: Unsupported ONNX op: NonMaxSuppression"):
        trt_backend.load(_model(tmp_path, b"other"), _options(tmp_path))
    with pytest.raises(cuda.GpuUnavailable, match="GPU 3 is not visible"):
        trt_backend.load(_model(tmp_path, b"third"), _options(tmp_path, device_id=3))
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", "8.6.1")
    assert trt_backend.gpu_unavailable() == "tensorrt 8.6.1 is older than 10"


def test_instances_on_one_gpu_share_one_engine_each_with_its_own_context(fakes, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """One deserialized engine per (engine, GPU): the weights are on a GPU once, however many instances run
    there; each instance has its own context (and stream), and the engine goes with the last instance."""
    trt_backend, rec, rt = fakes
    rt.devices = 2
    monkeypatch.setattr(hardware, "gpus", lambda: (GPU, replace(GPU, index=1, uuid="GPU-bbbb")))
    path, options = _model(tmp_path), _options(tmp_path)
    a, b = trt_backend.load(path, options), trt_backend.load(path, options)
    c = trt_backend.load(path, replace(options, device_id=1))
    assert len(rec.builds) == 1 and [e.device for e in rec.deserialized] == [0, 1]
    assert len(rec.deserialized[0].contexts) == 2 and len(rec.deserialized[1].contexts) == 1
    xa, xb = np.ones((2, 4), np.float32), np.arange(20, dtype=np.float32).reshape(5, 4)
    for backend, x in ((a, xa), (b, xb), (c, xa), (a, xb), (b, xa)):
        assert np.array_equal(backend.run({"INPUT": x}, ["OUTPUT"])["OUTPUT"], 2 * x)
    a.close()
    assert np.array_equal(b.run({"INPUT": xb}, ["OUTPUT"])["OUTPUT"], 2 * xb)
    assert trt_backend.ENGINES.held() == 2
    b.close()
    c.close()
    assert trt_backend.ENGINES.held() == 0 and rt.live() == 0
    trt_backend.load(path, options).close()
    assert len(rec.deserialized) == 3  # the engine went with its last instance; a new load reads it again


def test_concurrent_loads_build_one_engine(fakes, tmp_path: Path) -> None:
    """Versions load on several threads: the second instance waits for the engine the first is building."""
    trt_backend, rec, rt = fakes
    rec.build_seconds = 0.3
    path, options = _model(tmp_path), _options(tmp_path)
    loaded: list = []
    threads = [threading.Thread(target=lambda: loaded.append(trt_backend.load(path, options))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loaded) == 2 and len(rec.builds) == 1 and len(rec.deserialized) == 1
    for backend in loaded:
        backend.close()
    assert rt.live() == 0


def _qdq_scale(path: Path, zero_point: int) -> Path:
    """OUTPUT = 2 * INPUT through one int8 Q/DQ pair, as ONNX Runtime's static quantizer writes activations:
    zero point 0 with symmetric activations, else the calibrated range's offset."""
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
             numpy_helper.from_array(np.array(zero_point, np.int8), "zero_point"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("QuantizeLinear", ["INPUT", "scale", "zero_point"], ["q"], name="INPUT_q"),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["dq"], name="INPUT_dq"),
             helper.make_node("Mul", ["dq", "two"], ["OUTPUT"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["b", 4])],
                              [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["b", 4])], inits)
    return save_graph(graph, path)


def test_qdq_refusal_names_what_tensorrt_would_refuse_in_tidals_int8(fakes, tmp_path: Path) -> None:
    """tidal's own static int8 (asymmetric activations, int32 biases) is refused with the cure; a symmetric
    Q/DQ model and a plain one are not."""
    trt_backend, _, _ = fakes
    models.mlp(tmp_path / "mlp.onnx", (4, 8, 3))
    rows = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32) + 1
    quantize.quantize_int8_static(tmp_path / "mlp.onnx", tmp_path / "int8.onnx", Dataset({"INPUT": rows}, None, "cal"))
    refusal = trt_backend.qdq_refusal((tmp_path / "int8.onnx").read_bytes(), tmp_path / "int8.onnx")
    assert refusal is not None and "only supports symmetric quantization" in refusal
    assert "non-zero zero point" in refusal and "is INT32" in refusal and "symmetric activations" in refusal
    # The int8-symmetric variant `tidal optimize --backend tensorrt` makes, through the same real quantizer.
    quantize.quantize_int8_static(tmp_path / "mlp.onnx", tmp_path / "sym.onnx", Dataset({"INPUT": rows}, None, "cal"),
                                  symmetric=True)
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(tmp_path / "sym.onnx")).graph.node}
    for path in (_qdq_scale(tmp_path / "symmetric.onnx", 0), tmp_path / "mlp.onnx", tmp_path / "sym.onnx"):
        assert trt_backend.qdq_refusal(path.read_bytes(), path) is None
    assert trt_backend.qdq_refusal(_qdq_scale(tmp_path / "asym.onnx", -41).read_bytes(), tmp_path) is not None


def test_a_load_refuses_an_asymmetric_qdq_model_before_parsing_it(fakes, tmp_path: Path) -> None:
    trt_backend, rec, rt = fakes
    path = _qdq_scale(tmp_path / "model.int8.onnx", -41)
    with pytest.raises(ConfigError, match=r"INPUT_q' has a non-zero zero point.*quantize with symmetric activations"):
        trt_backend.load(path, _options(tmp_path))
    assert not rec.builds and trt_backend.ENGINES.held() == 0
    symmetric = _qdq_scale(tmp_path / "model.sym.onnx", 0)
    trt_backend.load(symmetric, _options(tmp_path)).close()
    assert len(rec.builds) == 1 and rt.live() == 0


def test_closing_twice_gives_the_engine_back_once(fakes, tmp_path: Path) -> None:
    trt_backend, _, rt = fakes
    first, second = (trt_backend.load(_model(tmp_path), _options(tmp_path, instance_index=i)) for i in (0, 1))
    first.close()
    first.close()  # a second close must not take the other instance's share of the shared engine
    assert trt_backend.ENGINES.held() == 1
    second.close()
    assert trt_backend.ENGINES.held() == 0 and rt.live() == 0


def test_a_close_that_fails_midway_still_frees_the_rest(fakes, tmp_path: Path, monkeypatch) -> None:
    trt_backend, _, rt = fakes
    backend = trt_backend.load(_model(tmp_path), _options(tmp_path))
    for rows in (1, 1, 2, 2):  # two graphs captured
        backend.run({"INPUT": np.ones((rows, 4), np.float32)}, ["OUTPUT"])
    real_destroy, calls = rt.cuda_graph_destroy, []

    def destroy(graph: int) -> None:
        calls.append(graph)
        if len(calls) == 1:
            raise RuntimeError("cudaGraphExecDestroy: an illegal memory access was encountered")
        real_destroy(graph)

    monkeypatch.setattr(rt, "cuda_graph_destroy", destroy)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        backend.close()
    assert len(calls) == 2 and trt_backend.ENGINES.held() == 0
    assert rt.live() == 1  # only the graph whose destroy failed; buffers, staging and stream were freed
    backend.close()  # nothing left to do, nothing raised
    assert len(calls) == 2


def _repository(tmp_path: Path, config: str) -> Path:
    """A model with fp32, int8, int8-dynamic and fp16 variants, as `tidal optimize` leaves it; the fp32 one
    (the default file, which auto-complete reads) a real ONNX graph INPUT [batch, 4] -> OUTPUT, the int8 one
    real Q/DQ with an asymmetric activation, as tidal's static int8 makes it."""
    model_dir = tmp_path / "repo" / "mlp"
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config)
    hw = Hardware("cpu", 2, ("avx2",))
    profile = LatencyProfile((1,), (0.1,), (0.2,), (1e4,), 1, 2, False, "2026-01-01T00:00:00+00:00", hw)
    variants = {}
    for kind, on in (("fp32", "cpu"), ("int8", "cpu"), ("int8-dynamic", "cpu"), ("fp16", "gpu")):
        file = "model.onnx" if kind == "fp32" else f"model.{kind}.onnx"
        if kind == "fp32":
            models.scale(version_dir / file, 2.0)
        elif kind == "int8":
            _qdq_scale(version_dir / file, -41)
        else:
            (version_dir / file).write_bytes(f"onnx {kind}".encode())
        backends = ("tensorrt",) if kind == "fp16" else ("onnxruntime",)
        variants[kind] = Variant(kind, file, kind, backends, (on,), 10, 10, None, None, {"onnxruntime": profile})
    save_manifest(version_dir, VariantManifest("mlp", "fp32", hw, variants))
    return model_dir


def test_optimize_builds_the_engines_a_load_then_finds(fakes, tmp_path: Path, monkeypatch) -> None:
    _, rec, _ = fakes
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where a load would write an engine it built
    config = 'name: "mlp"\nbackend: "onnxruntime"\nmax_batch_size: 32\ndynamic_batching { preferred_batch_size: [8] }\n'
    model_dir = _repository(tmp_path, config)
    version_dir = model_dir / "1"
    manifest = engines.build_engines(model_dir, 1, lambda line: None)
    assert len(rec.builds) == 2  # fp32, fp16; not int8 (asymmetric Q/DQ) nor int8-dynamic
    assert all(b["profiles"] == [{"INPUT": [(1, 4), (8, 4), (32, 4)]}] for b in rec.builds)  # the config's
    assert manifest.variants["fp32"].backends == ("tensorrt", "onnxruntime")
    assert manifest.variants["fp32"].runnable_on == ("cpu", "gpu")
    assert manifest.variants["int8"].backends == ("onnxruntime",)
    assert manifest.variants["int8-dynamic"].backends == ("onnxruntime",)
    assert load_manifest(version_dir) == manifest
    _load_and_close(model_dir)
    assert len(rec.builds) == 2 and not (tmp_path / "cache").exists()  # the load found every engine ahead of time
    engines.build_engines(model_dir, 1, lambda line: None)
    assert len(rec.builds) == 2  # already built
    # Another kind of GPU is another engine.
    monkeypatch.setattr(hardware, "gpus", lambda: (replace(GPU, name="NVIDIA L4", compute_capability="8.9"),))
    engines.build_engines(model_dir, 1, lambda line: None)
    assert len(rec.builds) == 4 and len(list((version_dir / "engines").iterdir())) == 4


def test_optimize_skips_what_tensorrt_refuses_and_keeps_going_past_a_failed_build(fakes, tmp_path: Path) -> None:
    """The asymmetric int8 is skipped before building, the fp32 build fails: each is logged and keeps its
    backends, fp16 is still built, and the manifest is written. Nothing built at all is an error."""
    _, rec, _ = fakes
    config = ('name: "mlp"\nbackend: "onnxruntime"\nmax_batch_size: 32\n'
              'parameters { key: "tensorrt_max_workspace_size_bytes" value: { string_value: "4096" } }\n')
    model_dir = _repository(tmp_path, config)
    version_dir = model_dir / "1"
    before = load_manifest(version_dir)
    rec.unbuildable.add((version_dir / "model.onnx").read_bytes())
    lines: list[str] = []
    manifest = engines.build_engines(model_dir, 1, lines.append)
    assert [b["pools"] for b in rec.builds] == [{"workspace": 4096}] * 2  # fp32 tried, fp16 built
    assert manifest.variants["fp32"] == before.variants["fp32"]
    assert manifest.variants["int8"] == before.variants["int8"]
    assert manifest.variants["fp16"].backends == ("tensorrt",) and load_manifest(version_dir) == manifest
    assert any(line.startswith("int8: not built for TensorRT, it stays on onnxruntime: TensorRT only supports "
                               "symmetric quantization") for line in lines)
    assert any(line.startswith("fp32 on NVIDIA H100 80GB HBM3: no TensorRT engine") and "could not build" in line
               for line in lines)
    assert [p.name for p in (version_dir / "engines").iterdir()] == [
        engines._tensorrt().engine_key(b"onnx fp16", BackendOptions(max_batch_size=32)).filename()]
    rec.unbuildable.add(b"onnx fp16")
    (version_dir / "engines" / next((version_dir / "engines").iterdir()).name).unlink()
    with pytest.raises(ConfigError, match=r"TensorRT built no engine \(int8: TensorRT only supports symmetric.*; "
                                          r"fp32: .*could not build.*; fp16: "):
        engines.build_engines(model_dir, 1, lines.append)


def _load_and_close(model_dir: Path) -> None:
    """The repository's own load of `model_dir` on the (fake) GPU, every instance on TensorRT."""

    async def scenario() -> None:
        manager = ModelManager(model_dir.parent)
        await manager.load(model_dir.name)
        try:
            assert set(manager.get(model_dir.name).engines.values()) == {profile_key("tensorrt", "gpu")}
        finally:
            await manager.close()

    asyncio.run(scenario())


def test_a_load_finds_engines_built_for_a_config_auto_complete_fills_in(fakes, tmp_path: Path, monkeypatch) -> None:
    """No max_batch_size in config.pbtxt: auto-complete sets it at load, and the engines built ahead carry the
    same batch profile, so the load builds nothing."""
    _, rec, _ = fakes
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model_dir = _repository(tmp_path, 'name: "mlp"\nbackend: "onnxruntime"\n')
    engines.build_engines(model_dir, 1, lambda line: None)
    batch = DEFAULT_MAX_BATCH_SIZE
    assert [b["profiles"] for b in rec.builds] == [[{"INPUT": [(1, 4), (batch, 4), (batch, 4)]}]] * 2
    _load_and_close(model_dir)
    assert len(rec.builds) == 2 and not (tmp_path / "cache").exists()


def test_optimize_refuses_early_without_tensorrt_or_a_gpu(fakes, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(hardware, "gpus", lambda: ())
    with pytest.raises(ConfigError, match="--backend tensorrt: no GPU is visible to this process"):
        engines.check_available()
    monkeypatch.setattr(cuda, "unavailable_reason", lambda: "no CUDA driver (libcuda.so.1 not found)")
    with pytest.raises(ConfigError, match="--backend tensorrt: no CUDA driver"):
        engines.check_available()
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.delitem(sys.modules, "tidal.backends.tensorrt")
    with pytest.raises(ConfigError, match=r"needs TensorRT 10 or later.*tensorrt extra: pip install 'tensorrt>=10'"):
        engines.check_available()
    # Through the CLI: refused before any variant is built (the model file does not even exist).
    argv = ["optimize", str(tmp_path / "absent.onnx"), "--repository", str(tmp_path / "r"), "--name", "m",
            "--calibration", str(tmp_path / "absent.npz"), "--backend", "tensorrt"]
    assert main(argv) == 2
    assert "needs TensorRT 10 or later" in capsys.readouterr().err and not (tmp_path / "r").exists()
