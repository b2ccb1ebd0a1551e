"""Backend choice per variant: the fastest backend whose outputs are exact, never a faster inexact one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tidal.backends.base import BackendOptions
from tidal.errors import ConfigError
from tidal.optimize import choose, quantize
from tidal.optimize.build import BuildSettings
from tidal.optimize.data import Dataset
from tidal.optimize.profile import current_hardware
from tidal.optimize.reference import synthetic_classification, train_classifier
from tidal.optimize.train import TrainConfig
from tidal.repository.variants import LatencyProfile


@pytest.fixture(scope="module")
def qdq(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    x, y = synthetic_classification(600, 16, 4, seed=2)
    folder = tmp_path_factory.mktemp("choose")
    onnx.save(train_classifier(x, y, (48,), TrainConfig(epochs=3, seed=2)), str(folder / "source.onnx"))
    quantize.optimize_fp32(folder / "source.onnx", folder / "model.onnx")
    # As `tidal optimize` makes it on this host: 7-bit weights without VNNI, where MLAS's AVX2 kernel would
    # saturate full 8-bit ones (tests/kernels/test_avx2_host.py), so ONNX Runtime is exact on every ISA.
    quantize.quantize_int8_static(folder / "model.onnx", folder / "int8.onnx", Dataset({"input": x}, y, "cal"),
                                  reduce_range=BuildSettings().seven_bit_weights())
    return folder / "int8.onnx", {"input": x[:128] * 3}  # beyond the calibrated range: saturated activations


def _profile(p50_ms: float) -> LatencyProfile:
    return LatencyProfile((1, 4), (p50_ms, p50_ms * 3), (p50_ms * 2, p50_ms * 6), (1.0, 1.0), 1, 1, False,
                          "2026-01-01T00:00:00+00:00", current_hardware())  # fmt: skip


def _off_by(monkeypatch: pytest.MonkeyPatch, steps: dict[str, float]) -> None:
    """Backends whose result is `steps` output steps from the exact one, as MLAS's saturating AVX2 path is."""
    real = choose.run_first_output

    def shifted(path: Path, backend: str, feeds: dict, options: BackendOptions) -> np.ndarray:
        out = real(path, backend, feeds, options)
        return out if options is choose.EXACT else out + steps.get(backend, 0.0) * choose.output_step(path)

    monkeypatch.setattr(choose, "run_first_output", shifted)


def test_the_fastest_exact_backend_serves(qdq: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, feeds = qdq
    order, choice = choose.choose(path, {"int8": _profile(0.3), "onnxruntime": _profile(0.1)}, feeds)
    assert order == ("onnxruntime", "int8") and choice.chosen == "onnxruntime"
    assert all(m.agrees and m.max_error_steps <= 1 for m in choice.measured.values())
    assert choice.measured["int8"].mean_p50_ms == pytest.approx(0.3 * 3**0.5, rel=1e-3)  # geometric mean
    assert choice.hardware == current_hardware()


def test_a_faster_backend_that_is_not_exact_is_never_chosen(
    qdq: tuple[Path, dict[str, np.ndarray]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, feeds = qdq
    _off_by(monkeypatch, {"onnxruntime": 3.0})
    order, choice = choose.choose(path, {"int8": _profile(0.3), "onnxruntime": _profile(0.1)}, feeds)
    assert order == ("int8",) and choice.chosen == "int8"
    assert not choice.measured["onnxruntime"].agrees
    assert choice.measured["onnxruntime"].max_error_steps == pytest.approx(3.0, abs=1.01)
    assert "not exact here: onnxruntime" in choice.reason


def test_no_exact_backend_is_refused(qdq: tuple[Path, dict[str, np.ndarray]], monkeypatch: pytest.MonkeyPatch) -> None:
    path, feeds = qdq
    _off_by(monkeypatch, {"onnxruntime": 3.0, "int8": 2.5})
    with pytest.raises(ConfigError, match="no backend agrees with the exact reference"):
        choose.choose(path, {"int8": _profile(0.3), "onnxruntime": _profile(0.1)}, feeds)


def test_a_single_backend_is_kept_unchecked(qdq: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, feeds = qdq
    order, choice = choose.choose(path, {"onnxruntime": _profile(0.1)}, feeds)
    assert order == ("onnxruntime",) and choice.measured["onnxruntime"].max_error_steps is None
    assert "only backend" in choice.reason


def test_output_step_is_the_last_dequantize_scale(qdq: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = qdq
    step = choose.output_step(path)
    assert step is not None and 0 < step < 1
    assert choose.output_step(path.with_name("model.onnx")) is None  # float output: no quantizer
