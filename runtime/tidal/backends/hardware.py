"""What this machine can execute: CPU model, cores, ISA flags, GPUs.

Backends use it to pick kernels (the int8 backend refuses to load without
AVX2) and the optimizer stamps it into latency profiles, so a profile taken
on one machine is never mistaken for another's. Everything is read from the
OS once and cached; nothing here imports an engine.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

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
    index: int
    name: str
    memory_mib: int


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


@functools.cache
def gpus() -> tuple[GpuInfo, ...]:
    """NVIDIA GPUs from nvidia-smi; empty when there is no driver, so CPU-only hosts cost one PATH lookup."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    found = []
    for line in out.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 3:
            continue
        memory = int(parts[2]) if parts[2].isdigit() else 0  # "[N/A]" on some virtual GPUs
        found.append(GpuInfo(index=int(parts[0]), name=parts[1], memory_mib=memory))
    return tuple(found)


def hardware() -> Hardware:
    return Hardware(cpu=cpu_info(), gpus=gpus())


__all__ = ["ISA_FLAGS", "CpuInfo", "GpuInfo", "Hardware", "cpu_info", "gpus", "hardware"]
