"""The backlog gRPC core may hold for the event loop, sized from the SLOs configured on disk."""

from __future__ import annotations

from pathlib import Path

from tidal.app import DEFAULT_MAX_PENDING_RPCS, MIN_PENDING_RPCS, ServeOptions, pending_rpcs_for


def _model(root: Path, name: str, config: str) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(config)


def test_without_an_slo_gRPC_keeps_its_ceiling(tmp_path: Path) -> None:
    _model(tmp_path, "plain", "max_batch_size: 4\n")
    assert pending_rpcs_for(ServeOptions(tmp_path)) == DEFAULT_MAX_PENDING_RPCS


def test_the_tightest_target_sets_the_backlog(tmp_path: Path) -> None:
    _model(tmp_path, "slow", "slo { p99_ms: 400 }\n")
    assert pending_rpcs_for(ServeOptions(tmp_path)) == 512  # 400 ms x 0.5 x 2 calls/ms -> 400 -> 512
    _model(tmp_path, "fast", "slo { p99_ms: 200 priority_p99_ms { key: 1 value: 50 } }\n")
    assert pending_rpcs_for(ServeOptions(tmp_path)) == 64  # priority 1's 50 ms binds
    assert pending_rpcs_for(ServeOptions(tmp_path, load_models=("slow",))) == 512  # only what is loaded counts
    # The native front end hands calls to the loop faster: 50 ms x 0.5 x 5 calls/ms -> 125 -> 128.
    assert pending_rpcs_for(ServeOptions(tmp_path, native_frontend=True)) == 128


def test_a_tiny_target_keeps_a_floor_and_a_broken_config_is_left_to_its_load(tmp_path: Path) -> None:
    _model(tmp_path, "tiny", "slo { p99_ms: 2 }\n")
    _model(tmp_path, "broken", "slo { p99_ms: [ \n")
    assert pending_rpcs_for(ServeOptions(tmp_path)) == MIN_PENDING_RPCS
