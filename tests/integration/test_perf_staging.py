"""The benchmarks under perf/ stage copies of the demo's models with an SLO of their own; a staged config that
tidal refuses stops every run of them (perf/bench_controller.py did once, when the demo began shipping its own
`slo` block). Staging is checked here, where the suite runs; the runs themselves are too long for it."""

from __future__ import annotations

import sys
from pathlib import Path

from tidal.demo import DEMO_MODEL, ensure_demo_repository
from tidal.repository.config import ModelSpec, load_config, version_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))
import bench_controller
import bench_overload


def _served(root: Path) -> ModelSpec:
    """The spec a load of the staged model serves (what `tidal serve` refuses, this raises)."""
    return version_spec(load_config(root / DEMO_MODEL, DEMO_MODEL), root / DEMO_MODEL / "1").spec


def test_bench_controller_stages_the_demo_with_its_own_slo(tmp_path: Path) -> None:
    source = ensure_demo_repository(progress=False) / DEMO_MODEL
    bench_controller._stage(source, DEMO_MODEL, tmp_path, 100.0, 1, 256)
    spec = _served(tmp_path)
    assert spec.slo_p99_ms == 100.0
    assert spec.max_batch_size == 256
    assert spec.scheduler.priority_levels == 2


def test_bench_overload_stages_the_demo_with_its_own_slo(tmp_path: Path) -> None:
    bench_overload._stage(tmp_path, 40.0, 64)
    spec = _served(tmp_path)
    assert spec.slo_p99_ms == 40.0
    assert spec.max_batch_size == 64 * 16
