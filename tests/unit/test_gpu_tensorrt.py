"""The native TensorRT backend without a GPU: a fake `tensorrt` module (the calls tidal makes, recording
them; its engine computes OUTPUT = 2 * INPUT through the device addresses it is given) over the fake CUDA
runtime. Checks the strongly typed network, the one profile, the engine cache and its key, CUDA graphs per
batch size, the refusals, that close releases everything, and `tidal optimize --backend tensorrt`."""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import json
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gpu_fakes import FakeCudaRuntime

import onnx_models as models
from tidal.backends import cuda, hardware
from tidal.backends.base import BackendOptions
from tidal.backends.hardware import GpuInfo
from tidal.cli import main
from tidal.errors import ConfigError, InvalidArgument
from tidal.optimize import engines
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
            self.flags, self.num_inputs = flags, 1

        def get_input(self, i: int):
            return types.SimpleNamespace(name="INPUT", shape=(-1, 4))

    class Parser:
        def __init__(self, network, logger) -> None:
            self.num_errors = 0 if rec.parse_ok else 1

        def parse(self, model: bytes, path: str) -> bool:
            return rec.parse_ok

        def get_error(self, i: int) -> str:
            return "Unsupported ONNX op: NonMaxSuppression"

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
            rec.builds.append({"flags": network.flags, "profiles": config.profiles, "pools": config.pools,
                               "precision_flags": config.flags})
            return json.dumps(config.profiles).encode()

    class Context:
        def __init__(self) -> None:
            self.shapes, self.addresses, self.enqueues = {}, {}, 0

        def set_input_shape(self, name, shape) -> bool:
            ok = json.loads(self_engine.blob)[0]["INPUT"][2][0] >= shape[0]
            self.shapes[name] = tuple(shape)
            return ok

        def get_tensor_shape(self, name):
            return self.shapes["INPUT"]

        def set_tensor_address(self, name, ptr) -> None:
            self.addresses[name] = ptr

        def execute_async_v3(self, stream: int) -> bool:
            self.enqueues += 1
            n, src, dst = int(np.prod(self.shapes["INPUT"])), self.addresses["INPUT"], self.addresses["OUTPUT"]

            def kernel() -> None:
                x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(src))
                np.ctypeslib.as_array((ctypes.c_float * n).from_address(dst))[:] = 2 * x

            rt._enqueue(stream, kernel)
            return True

    class Engine:
        num_io_tensors = 2

        def __init__(self, blob: bytes) -> None:
            self.blob = blob
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
            self.contexts.append(Context())
            return self.contexts[-1]

    self_engine = None

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, blob: bytes) -> Engine:
            nonlocal self_engine
            self_engine = Engine(blob)
            rec.engine = self_engine
            return self_engine

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


def _repository(tmp_path: Path, config: str) -> Path:
    """A model with fp32, int8, int8-dynamic and fp16 variants, as `tidal optimize` leaves it; the fp32 one
    (the default file, which auto-complete reads) a real ONNX graph INPUT [batch, 4] -> OUTPUT."""
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
    assert len(rec.builds) == 3  # fp32, int8 (explicit Q/DQ), fp16; not int8-dynamic
    assert all(b["profiles"] == [{"INPUT": [(1, 4), (8, 4), (32, 4)]}] for b in rec.builds)  # the config's
    assert manifest.variants["int8"].backends == ("tensorrt", "onnxruntime")
    assert manifest.variants["int8"].runnable_on == ("cpu", "gpu")
    assert manifest.variants["int8-dynamic"].backends == ("onnxruntime",)
    assert load_manifest(version_dir) == manifest
    _load_and_close(model_dir)
    assert len(rec.builds) == 3 and not (tmp_path / "cache").exists()  # the load found every engine ahead of time
    engines.build_engines(model_dir, 1, lambda line: None)
    assert len(rec.builds) == 3  # already built
    # Another kind of GPU is another engine.
    monkeypatch.setattr(hardware, "gpus", lambda: (replace(GPU, name="NVIDIA L4", compute_capability="8.9"),))
    engines.build_engines(model_dir, 1, lambda line: None)
    assert len(rec.builds) == 6 and len(list((version_dir / "engines").iterdir())) == 6


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
    assert [b["profiles"] for b in rec.builds] == [[{"INPUT": [(1, 4), (batch, 4), (batch, 4)]}]] * 3
    _load_and_close(model_dir)
    assert len(rec.builds) == 3 and not (tmp_path / "cache").exists()


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
