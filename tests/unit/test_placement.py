"""Placement of instances on devices (Triton's instance_group rules), GPU discovery through fakes of NVML and
nvidia-smi, and the repository loading each instance on the device it was placed on, with a fake GPU engine."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import onnx_models as models
from tidal import backends
from tidal.backends import hardware
from tidal.backends import onnxruntime as ort_backend
from tidal.backends.base import BackendOptions
from tidal.backends.hardware import GpuInfo, discover_gpus, visible
from tidal.backends.placement import CPU, Device, InstanceGroup, PlacementError, place
from tidal.control.api import Pool
from tidal.errors import ConfigError, Unavailable
from tidal.optimize.build import RUNNABLE_ON
from tidal.repository.manager import ModelManager
from tidal.repository.variants import Hardware, Variant, VariantManifest, save_manifest
from tidal.types import InferRequest, LevelRoute

H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 81559, "9.0", "GPU-aaaa")
L4 = GpuInfo(1, "NVIDIA L4", 23034, "8.9", "GPU-bbbb")


def _devices(*names: str) -> tuple[Device, ...]:
    return tuple(CPU if n == "cpu" else Device("gpu", int(n[4:])) for n in names)


def test_kind_gpu_puts_count_on_each_listed_gpu() -> None:
    placed = place([InstanceGroup("gpu", 2, (1,))], [H100, L4], None, 256)
    assert placed.devices == _devices("gpu:1", "gpu:1")
    assert "1 (NVIDIA L4)" in placed.reason and "listed" in placed.reason


def test_kind_gpu_without_gpus_means_every_visible_gpu() -> None:
    placed = place([InstanceGroup("gpu", 2)], [H100, L4], None, 256)
    assert placed.devices == _devices("gpu:0", "gpu:0", "gpu:1", "gpu:1")
    assert placed.summary() == "2 x gpu:0, 2 x gpu:1"


def test_no_instance_group_is_one_auto_instance_per_gpu_or_one_on_the_cpu() -> None:
    assert place([], [H100, L4], None, 256).devices == _devices("gpu:0", "gpu:1")
    on_cpu = place([], [], None, 256)
    assert on_cpu.devices == (CPU,) and "no GPU on this host" in on_cpu.reason


def test_kind_auto_falls_back_to_the_cpu_with_the_reason() -> None:
    placed = place([InstanceGroup("auto", 3)], [H100], "onnxruntime has no CUDAExecutionProvider", 256)
    assert placed.devices == (CPU,) * 3
    assert "onnxruntime has no CUDAExecutionProvider" in placed.reason


def test_kind_gpu_without_a_usable_gpu_is_refused_with_the_reason() -> None:
    with pytest.raises(PlacementError, match=r"instance_group\[0\] \(KIND_GPU\) needs a GPU: no GPU on this host"):
        place([InstanceGroup("gpu", 1)], [], None, 256)
    with pytest.raises(PlacementError, match="tensorrt: No module named 'tensorrt'"):
        place([InstanceGroup("gpu", 1)], [H100], "tensorrt: No module named 'tensorrt'", 256)


def test_a_listed_gpu_this_host_lacks_is_refused() -> None:
    with pytest.raises(PlacementError, match=r"lists GPU 3 but this host has GPU 0, 1"):
        place([InstanceGroup("gpu", 1, (0, 3))], [H100, L4], None, 256)


def test_mixed_groups_keep_instance_order_and_the_limit() -> None:
    placed = place([InstanceGroup("cpu", 1), InstanceGroup("gpu", 1, (0,))], [H100], None, 256)
    assert placed.devices == _devices("cpu", "gpu:0") and placed.kinds == {"cpu", "gpu"}
    two = place([InstanceGroup("gpu", 2), InstanceGroup("cpu", 1)], [H100, L4], None, 256)
    assert two.pools() == [("gpu", (0, 1, 2, 3)), ("cpu", (4,))]  # one pool per group, across its GPUs
    with pytest.raises(PlacementError, match="5 instances on this host, at most 4"):
        place([InstanceGroup("gpu", 5)], [H100], None, 4)


class FakeNvml:
    """pynvml's calls, answering for two GPUs; `fail` makes nvmlInit raise as it does without a driver."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.shutdown = fail, False
        self.gpus = [("NVIDIA H100 80GB HBM3", "GPU-aaaa", (9, 0), 81559), ("NVIDIA L4", "GPU-bbbb", (8, 9), 23034)]

    def nvmlInit(self) -> None:
        if self.fail:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self.gpus[h][0].encode()  # old pynvml answers bytes

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self.gpus[h][1]

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return self.gpus[h][2]

    def nvmlDeviceGetMemoryInfo(self, h: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(total=self.gpus[h][3] << 20)


def test_nvml_is_asked_first() -> None:
    nvml = FakeNvml()
    found = discover_gpus(nvml, lambda: pytest.fail("nvidia-smi asked although NVML answered"), None)
    assert found == (replace(H100, source="nvml"), replace(L4, source="nvml"))
    assert nvml.shutdown


def test_nvidia_smi_when_nvml_fails() -> None:
    smi = hardware._parse_smi("0, NVIDIA H100 80GB HBM3, 81559, 9.0, GPU-aaaa\n1, NVIDIA L4, [N/A], [N/A], GPU-bbbb\n")
    assert smi[0] == replace(H100, source="nvidia-smi")
    assert (smi[1].memory_mib, smi[1].compute_capability) == (0, "")
    assert discover_gpus(FakeNvml(fail=True), lambda: smi, None) == tuple(smi)
    assert discover_gpus(None, list, None) == ()


def test_cuda_visible_devices_renumbers_like_cuda() -> None:
    both = [H100, L4]
    assert visible(both, "1") == (replace(L4, index=0),)
    assert visible(both, "GPU-bbbb,0") == (replace(L4, index=0), replace(H100, index=1))
    assert visible(both, "1,7,0") == (replace(L4, index=0),)  # CUDA stops at the first invalid entry
    assert visible(both, "") == () and visible(both, "-1") == ()
    assert visible(both, None) == tuple(both)


# --- the repository puts each instance where placement says, through a fake GPU engine -------------------

def _fake_gpu_onnxruntime(loaded: list[BackendOptions]) -> types.ModuleType:
    """A GPU 'onnxruntime' that records each instance's options and computes on the CPU."""
    module = types.ModuleType("fake_gpu_ort")

    def load(path: Path, options: BackendOptions) -> ort_backend.OnnxRuntimeBackend:
        loaded.append(options)
        return ort_backend.OnnxRuntimeBackend(path, replace(options, device="cpu"))

    module.load = load
    module.gpu_unavailable = lambda: None
    return module


@pytest.fixture
def gpu_host(monkeypatch: pytest.MonkeyPatch) -> list[BackendOptions]:
    loaded: list[BackendOptions] = []
    monkeypatch.setitem(sys.modules, "fake_gpu_ort", _fake_gpu_onnxruntime(loaded))
    monkeypatch.setitem(backends._MODULES, ("onnxruntime", "gpu"), "fake_gpu_ort")
    monkeypatch.setattr(hardware, "gpus", lambda: (H100, L4))
    return loaded


def _repo(tmp_path: Path, groups: str) -> Path:
    models.add_sub(tmp_path / "m" / "1" / "model.onnx", width=4)
    models.write_config(tmp_path / "m", f"max_batch_size: 8 dynamic_batching {{ }} {groups}")
    return tmp_path


async def _load(root: Path) -> ModelManager:
    manager = ModelManager(root)
    await manager.load_all()
    return manager


def test_instances_land_on_the_configured_gpus(gpu_host: list[BackendOptions], tmp_path: Path, caplog) -> None:
    root = _repo(tmp_path, "instance_group [ { kind: KIND_GPU count: 2 gpus: [ 1 ] }, { kind: KIND_CPU } ]")

    async def scenario() -> None:
        manager = await _load(root)
        served = manager.get("m")
        assert len(served.runners[""]) == 3 and served.spec.knobs.instance_count == 3
        assert served.engines[""] == "onnxruntime@gpu"
        x = np.ones((2, 4), np.float32)
        for backend in served.runners[""]:
            assert backend.run({"INPUT0": x, "INPUT1": x}, ["OUTPUT0"])["OUTPUT0"].tolist() == [[2.0] * 4] * 2
        await manager.close()

    with caplog.at_level(logging.INFO, logger="tidal.repository.manager"):
        asyncio.run(scenario())
    assert [(o.device, o.device_id, o.instance_index) for o in gpu_host] == [("gpu", 1, 0), ("gpu", 1, 1)]
    assert any("instances 1 x cpu, 2 x gpu:1" in r.getMessage() for r in caplog.records)


def test_variants_from_tidal_optimize_serve_on_gpu_instances(gpu_host: list[BackendOptions], tmp_path: Path,
                                                             monkeypatch, caplog) -> None:
    """Every ONNX variant `tidal optimize` records runs on a GPU instance, through ONNX Runtime's CUDA provider at
    least, saying so when the backend it prefers cannot load; one recorded as CPU-only is left out, with why."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # whatever an earlier test left: no TensorRT here
    monkeypatch.delitem(sys.modules, "tidal.backends.tensorrt", raising=False)
    root = _repo(tmp_path, "instance_group [ { kind: KIND_GPU gpus: [ 0 ] } ]")
    variants = {
        "fp32": Variant("fp32", "model.onnx", "fp32", ("onnxruntime",), RUNNABLE_ON["fp32"], 1, 1, None, None),
        "int8": Variant("int8", "model.onnx", "int8", ("tensorrt", "onnxruntime"), RUNNABLE_ON["int8"], 1, 1, None,
                        None),
        "old": Variant("old", "model.onnx", "pruned", ("onnxruntime",), ("cpu",), 1, 1, None, None),
    }
    save_manifest(root / "m" / "1", VariantManifest("m", "fp32", Hardware("cpu", 2, ("avx2",)), variants))

    async def scenario() -> None:
        manager = await _load(root)
        served = manager.get("m")
        assert served.engines == {"fp32": "onnxruntime@gpu", "int8": "onnxruntime@gpu"}
        await manager.close()

    with caplog.at_level(logging.INFO, logger="tidal.repository.manager"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("serving on onnxruntime (gpu) because tensorrt: backend 'tensorrt' is not available" in w
               for w in warnings), warnings
    assert any("variant old left out: it runs on cpu (variants.json), the instances are on gpu" in w
               for w in warnings), warnings
    assert [(o.device, o.device_id) for o in gpu_host] == [("gpu", 0), ("gpu", 0)]


def test_the_controller_sees_each_group_as_a_pool_and_may_route_priority_1_to_one(
    gpu_host: list[BackendOptions], tmp_path: Path
) -> None:
    groups = "instance_group [ { kind: KIND_GPU count: 2 gpus: [ 1 ] }, { kind: KIND_CPU } ]"
    models.add_sub(tmp_path / "m" / "1" / "model.onnx", width=4)
    models.write_config(tmp_path / "m", "max_batch_size: 8 dynamic_batching { priority_levels: 2 "
                        f"default_priority_level: 2 }} {groups}")

    async def scenario() -> None:
        manager = await _load(tmp_path)
        served = manager.get("m")
        info = served.model_info("m:1")
        assert info.pools == (Pool("gpu", (0, 1)), Pool("cpu", (2,))) and info.priority_levels == 2
        route = LevelRoute(1, (2,), "", 1, 200)
        served.apply_setpoint(replace(served.setpoint(), route=route))
        assert served.setpoint().route == route and served.knobs.route.instances == (2,)
        assert served.knobs.route.max_queue_delay_us == 200  # the route travels whole, both ways
        x = np.ones((1, 4), np.float32)
        request = InferRequest("m", "1", {"INPUT0": x, "INPUT1": x}, (), "", 1, None, 0.0, None)
        assert (await served.infer(request)).outputs["OUTPUT0"].tolist() == [[2.0] * 4]
        await manager.close()

    asyncio.run(scenario())


def test_a_gpu_model_on_a_host_without_gpus_is_unavailable(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(hardware, "gpus", tuple)
    root = _repo(tmp_path, "instance_group [ { kind: KIND_GPU } ]")

    async def scenario() -> None:
        manager = await _load(root)
        with pytest.raises(Unavailable, match="needs a GPU: no GPU on this host"):
            manager.get("m")

    asyncio.run(scenario())


def test_auto_stays_on_the_cpu_when_no_backend_can_use_the_gpu(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(hardware, "gpus", lambda: (H100,))
    monkeypatch.setattr(backends, "gpu_unavailable", lambda name: f"{name}: no CUDA here")
    root = _repo(tmp_path, "instance_group [ { kind: KIND_AUTO count: 2 } ]")

    async def scenario() -> None:
        manager = await _load(root)
        assert len(manager.get("m").runners[""]) == 2 and manager.get("m").engines[""] == "onnxruntime"
        await manager.close()

    asyncio.run(scenario())


def test_registry_refuses_a_backend_on_a_device_it_does_not_run_on() -> None:
    with pytest.raises(ConfigError, match="does not run on a CPU"):
        backends.factory("tensorrt", "cpu")
    assert backends.runs_on("int8", "gpu") and not backends.runs_on("tensorrt", "cpu")
    assert backends.gpu_blocker([]) == "no backend named"


def test_tidal_hardware_reports_gpus_and_why_each_gpu_backend_cannot_run(monkeypatch, capsys) -> None:
    from tidal import cli

    monkeypatch.setattr(hardware, "gpus", lambda: (H100,))
    monkeypatch.setattr(backends, "gpu_unavailable", lambda name: None if name == "onnxruntime" else f"{name}: absent")
    assert cli.main(["hardware"]) == 0
    text = capsys.readouterr().out
    assert "GPU 0: NVIDIA H100 80GB HBM3, 81559 MiB, compute capability 9.0" in text
    assert "backend onnxruntime on GPU: usable" in text
    assert "backend tensorrt on GPU: not usable: tensorrt: absent" in text
    monkeypatch.setattr(hardware, "gpus", tuple)
    assert cli.main(["hardware"]) == 0
    assert "backend onnxruntime on GPU: installed, but no GPU here to run on" in capsys.readouterr().out


def test_mixed_gpus_warn_unless_cuda_numbers_them_in_pci_order(monkeypatch, caplog) -> None:
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    with caplog.at_level(logging.WARNING, logger="tidal.backends.hardware"):
        discover_gpus(None, lambda: [H100, L4], None)
        assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in caplog.text
        caplog.clear()
        discover_gpus(None, lambda: [H100, replace(H100, index=1, uuid="GPU-cccc")], None)  # one kind: same order
        monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        discover_gpus(None, lambda: [H100, L4], None)
    assert not caplog.records


def test_the_command_has_cuda_number_gpus_in_pci_order(monkeypatch) -> None:
    from tidal import cli

    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)  # conftest restores it after the test
    monkeypatch.setattr(hardware, "gpus", tuple)
    assert cli.main(["hardware"]) == 0
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


@pytest.mark.parametrize(
    ("kernels", "why"),
    [
        (None, "tidal._kernels is not built"),
        (types.SimpleNamespace(HAS_CUDA=False), "built without a CUDA toolkit"),
        (types.SimpleNamespace(HAS_CUDA=True), "predates the CUDA runtime calls"),
        (types.SimpleNamespace(HAS_CUDA=True, cuda_device_count=lambda: 0), "the CUDA runtime sees no device"),
    ],
)
def test_the_cuda_runtime_says_why_it_cannot_run(kernels, why: str, monkeypatch) -> None:
    import tidal
    from tidal.backends import cuda

    monkeypatch.setitem(sys.modules, "tidal._kernels", kernels)
    if kernels is None:
        monkeypatch.delattr(tidal, "_kernels", raising=False)
    else:
        monkeypatch.setattr(tidal, "_kernels", kernels, raising=False)
    with pytest.raises(cuda.GpuUnavailable, match=why):
        cuda.runtime()
