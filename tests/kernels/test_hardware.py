"""backends.hardware reads this machine the way the kernels' own CPUID dispatch does."""

from __future__ import annotations

from tidal import _kernels
from tidal.backends import hardware
from tidal.backends.hardware import CpuInfo, _parse_cpuinfo

SAMPLE = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Example CPU @ 2.00GHz
flags\t\t: fpu sse2 avx avx2 avx_vnni
processor\t: 1
model name\t: Example CPU @ 2.00GHz
flags\t\t: fpu sse2 avx avx2 avx_vnni
"""


def test_parse_first_processor_block() -> None:
    model, flags = _parse_cpuinfo(SAMPLE)
    assert model == "Example CPU @ 2.00GHz"
    assert flags == frozenset({"fpu", "sse2", "avx", "avx2", "avx_vnni"})


def test_best_isa_follows_flags() -> None:
    def cpu(*flags: str) -> CpuInfo:
        return CpuInfo(model="m", cores=1, flags=frozenset(flags))

    assert cpu("avx2", "avx_vnni").best_int8_isa() == "avx_vnni"
    assert cpu("avx2", "avx512f", "avx512bw", "avx512_vnni").best_int8_isa() == "avx512_vnni"
    assert cpu("avx2", "avx512_vnni").best_int8_isa() == "avx2"  # VNNI without F/BW is unusable
    assert cpu("sse2").best_int8_isa() is None


def test_agrees_with_the_kernels_dispatch() -> None:
    cpu = hardware.cpu_info()
    assert cpu.cores == _kernels.usable_cores() >= 1
    assert cpu.model
    assert (cpu.best_int8_isa() or "scalar") == _kernels.best_isa()
    assert cpu.has_avx512_vnni == ("avx512_vnni" in _kernels.isas())
    assert cpu.has_avx_vnni == ("avx_vnni" in _kernels.isas())
    assert cpu.has_avx2 == ("avx2" in _kernels.isas())


def test_hardware_bundles_cpu_and_gpus() -> None:
    found = hardware.hardware()
    assert found.cpu is hardware.cpu_info()
    assert all(g.memory_mib >= 0 and g.name for g in found.gpus)
