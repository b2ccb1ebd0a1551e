"""The demo repository: built once with real measured variants, then served from the cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidal import demo
from tidal.repository.pbtxt import parse_model_config
from tidal.repository.variants import load_manifest


@pytest.mark.slow
def test_demo_builds_once_with_real_variants(tmp_path: Path) -> None:
    stale = tmp_path / "v0-old-recipe"
    stale.mkdir()
    repository = demo.ensure_demo_repository(tmp_path, progress=False)
    assert repository == tmp_path / f"v{demo.DEMO_VERSION}" / "repository"
    assert not stale.exists()
    assert not list(tmp_path.glob(".build-*"))

    manifest = load_manifest(repository / demo.DEMO_MODEL / "1")
    assert manifest is not None
    assert {"fp32", "int8", "pruned-50", "distilled"} <= set(manifest.variants)
    accuracy = {name: v.accuracy.value for name, v in manifest.variants.items() if v.accuracy is not None}
    assert accuracy["fp32"] > 0.95  # held-out digits
    assert accuracy["int8"] >= accuracy["fp32"] - 0.01
    config = parse_model_config(repository / demo.DEMO_MODEL / "config.pbtxt").config
    assert config.max_batch_size == demo.MAX_BATCH_SIZE
    for name in (demo.DEMO_MODEL, demo.ADD_SUB_MODEL):  # the demo holds an SLO out of the box
        config = parse_model_config(repository / name / "config.pbtxt").config
        assert config.slo.p99_ms == demo.DEMO_SLO_P99_MS and config.controller.mode == config.controller.FULL
        assert config.dynamic_batching.priority_levels == 2
    assert (repository / demo.ADD_SUB_MODEL / "1" / "model.onnx").is_file()

    stamp = (repository / demo.DEMO_MODEL / "1" / "variants.json").stat().st_mtime_ns
    assert demo.ensure_demo_repository(tmp_path, progress=False) == repository
    assert (repository / demo.DEMO_MODEL / "1" / "variants.json").stat().st_mtime_ns == stamp  # a cache hit


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIDAL_CACHE_DIR", str(tmp_path))
    assert demo.cache_root() == tmp_path
    monkeypatch.delenv("TIDAL_CACHE_DIR")
    assert demo.cache_root() == Path.home() / ".cache" / "tidal"
