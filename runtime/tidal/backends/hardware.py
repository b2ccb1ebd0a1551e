"""What this machine can execute: CPU model, cores, ISA flags, GPUs.

Backends use it to pick kernels (the int8 backend refuses to load without
AVX2), placement uses the GPUs to put instances on devices, and the optimizer
stamps it into latency profiles, so a profile taken on one machine is never
mistaken for another's. Everything is read from the OS once and cached; GPUs
come from NVML (nvidia-ml-py) when it is installed and answers, else from
nvidia-smi. Nothing here imports an engine.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_CPUINFO = Path("/proc/cpuinfo")

# /proc/cpuinfo flag names for the ISA extensions tidal's kernels dispatch on.
_AVX512_VNNI = "avx512_vnni"
_AVX_VNNI = "avx_vnni"
_AVX2 = "avx2"

# ISA extensions that decide which kernels a model gets (tidal's and ONNX Runtime's MLAS); the rest of
# /proc/cpuinfo is noise for that. Two hosts that agree on these and the model name run the same code.
ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16", "neon", "asimddp",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class CpuInfo:
    """The host CPU as the OS reports it; `cores` counts the cores this process may use."""

    model: str
    cores: int
    flags: frozenset[str]

    @property
    def has_avx512_vnni(self) -> bool:
        # The 512-bit kernels also need F and BW for loads, masks and byte shuffles.
        return {_AVX512_VNNI, "avx512f", "avx512bw"} <= self.flags

    @property
    def has_avx_vnni(self) -> bool:
        return _AVX_VNNI in self.flags and _AVX2 in self.flags

    @property
    def has_avx2(self) -> bool:
        return _AVX2 in self.flags

    @property
    def has_vnni(self) -> bool:
        """Whether int8 dot products run without int16 intermediates (no pair-sum saturation anywhere)."""
        return self.has_avx512_vnni or self.has_avx_vnni

    @property
    def isa_flags(self) -> tuple[str, ...]:
        return tuple(f for f in ISA_FLAGS if f in self.flags)

    def best_int8_isa(self) -> str | None:
        """The widest int8 dot-product extension present, by tidal's kernel names."""
        if self.has_avx512_vnni:
            return "avx512_vnni"
        if self.has_avx_vnni:
            return "avx_vnni"
        if self.has_avx2:
            return "avx2"
        return None


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU as CUDA numbers it in this process (`index` honours CUDA_VISIBLE_DEVICES)."""

    index: int
    name: str
    memory_mib: int
    compute_capability: str = ""  # "9.0"; "" when the driver does not say
    uuid: str = ""
    source: str = ""  # nvml | nvidia-smi


@dataclass(frozen=True, slots=True)
class Hardware:
    cpu: CpuInfo
    gpus: tuple[GpuInfo, ...]


def _parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """Model name and flags of the first processor block (all cores of a host agree)."""
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return model, flags


def _usable_cores() -> int:
    # The affinity mask, not the host's count: containers and taskset limit it.
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@functools.cache
def cpu_info() -> CpuInfo:
    """The host CPU; flags are empty where /proc/cpuinfo does not exist (non-Linux)."""
    try:
        model, flags = _parse_cpuinfo(_CPUINFO.read_text())
    except OSError:
        model, flags = "", frozenset()
    return CpuInfo(model=model or platform.processor() or platform.machine(), cores=_usable_cores(), flags=flags)


def _nvml_gpus(nvml: Any) -> list[GpuInfo]:
    """Every GPU the driver sees, through NVML (nvidia-ml-py's `pynvml`), physical order."""
    nvml.nvmlInit()
    try:
        found = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            name, uuid = nvml.nvmlDeviceGetName(handle), nvml.nvmlDeviceGetUUID(handle)
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle).total // (1 << 20)
            found.append(GpuInfo(i, _text(name), int(memory), f"{major}.{minor}", _text(uuid), "nvml"))
        return found
    finally:
        nvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older pynvml returns bytes


_SMI_QUERY = "--query-gpu=index,name,memory.total,compute_cap,uuid"


def _parse_smi(out: str) -> list[GpuInfo]:
    found = []
    for line in out.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 5 or not parts[0].isdigit():
            continue
        memory = int(parts[2]) if parts[2].isdigit() else 0  # "[N/A]" on some virtual GPUs
        cc = parts[3] if parts[3].replace(".", "").isdigit() else ""
        found.append(GpuInfo(int(parts[0]), parts[1], memory, cc, parts[4], "nvidia-smi"))
    return found


def _smi_gpus() -> list[GpuInfo]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, _SMI_QUERY, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return _parse_smi(out)


def visible(found: list[GpuInfo], env: str | None) -> tuple[GpuInfo, ...]:
    """The GPUs CUDA will number 0, 1, ... under CUDA_VISIBLE_DEVICES=`env` (None: unset, all of them).

    NVML and nvidia-smi list every GPU on the host, but `instance_group { gpus: [1] }` means CUDA device 1
    of this process; entries are indices or UUID prefixes, and CUDA stops at the first one it cannot match.
    """
    if env is None:
        return tuple(found)
    chosen: list[GpuInfo] = []
    for entry in (e.strip() for e in env.split(",")):
        match = [g for g in found if (entry.isdigit() and g.index == int(entry)) or (
            entry.startswith(("GPU-", "MIG-")) and g.uuid.startswith(entry))]
        if len(match) != 1 or match[0] in chosen:
            break
        chosen.append(match[0])
    return tuple(replace(g, index=i) for i, g in enumerate(chosen))


def discover_gpus(nvml: Any | None, smi: Callable[[], list[GpuInfo]], env: str | None) -> tuple[GpuInfo, ...]:
    """NVML when `nvml` is given and answers, else nvidia-smi; both fail to an empty tuple (a CPU host)."""
    found: list[GpuInfo] = []
    if nvml is not None:
        try:
            found = _nvml_gpus(nvml)
        except Exception as exc:  # pynvml raises NVMLError_* subclasses for no driver, no library, ...
            log.debug("NVML unusable (%s); asking nvidia-smi", exc)
    if not found:
        found = smi()
    if len({g.name for g in found}) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        log.warning("GPUs of different kinds, numbered here in PCI order as NVML and nvidia-smi list them, while "
                    "CUDA numbers the fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID (tidal's command sets it when "
                    "unset): instance_group gpus may name other devices than meant")
    return visible(found, env)


def _import_nvml() -> Any | None:
    try:
        import pynvml  # nvidia-ml-py, from the gpu extra
    except ImportError:
        return None
    return pynvml


@functools.cache
def gpus() -> tuple[GpuInfo, ...]:
    """NVIDIA GPUs this process may use; empty without a driver, so CPU-only hosts cost an import and a PATH lookup."""
    return discover_gpus(_import_nvml(), _smi_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))


def hardware() -> Hardware:
    return Hardware(cpu=cpu_info(), gpus=gpus())


__all__ = ["ISA_FLAGS", "CpuInfo", "GpuInfo", "Hardware", "cpu_info", "discover_gpus", "gpus", "hardware", "visible"]
