"""variants.json: round trip, validation that names file and field, latency estimates."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tidal.errors import ConfigError
from tidal.repository.variants import (
    MANIFEST_FILE,
    Accuracy,
    BackendChoice,
    Hardware,
    LatencyProfile,
    Measured,
    Variant,
    VariantManifest,
    load_manifest,
    save_manifest,
)

HW = Hardware("Test CPU", 2, ("avx2", "avx512_vnni"))
CHOICE = BackendChoice(
    "int8", "int8 is the fastest exact backend", HW,
    {"int8": Measured(0.67, 0.0, True), "onnxruntime": Measured(1.65, 26.0, False)},
)  # fmt: skip


def _profile(p50: tuple[float, ...] = (1.0, 1.5, 3.0), sizes: tuple[int, ...] = (1, 2, 8)) -> LatencyProfile:
    return LatencyProfile(
        batch_sizes=sizes,
        p50_ms=p50,
        p99_ms=tuple(v * 2 for v in p50),
        throughput_rps=tuple(s / v * 1e3 for s, v in zip(sizes, p50, strict=True)),
        instances=1,
        intra_op_threads=2,
        allow_spinning=False,
        measured_at="2026-01-01T00:00:00+00:00",
        hardware=HW,
    )


def _manifest(folder: Path) -> VariantManifest:
    for file in ("model.onnx", "model.int8.onnx", "model.fp16.onnx"):
        (folder / file).write_bytes(b"x")
    acc = Accuracy("top1_accuracy", 0.97, 100, 0.99, 0.25)
    variants = {
        "fp32": Variant(
            "fp32", "model.onnx", "fp32", ("onnxruntime",), ("cpu",), 10, 5, 10, acc, {"onnxruntime": _profile()}
        ),
        "int8": Variant(
            "int8", "model.int8.onnx", "int8", ("int8", "onnxruntime"), ("cpu",), 4, 5, None, acc,
            {"onnxruntime": _profile(), "int8": _profile((0.5, 0.6, 1.0))}, {"calibration_rows": 64}, CHOICE,
        ),
        "fp16": Variant("fp16", "model.fp16.onnx", "fp16", ("tensorrt",), ("gpu",), 6, 5, 10, None),
    }  # fmt: skip
    return VariantManifest("m", "fp32", HW, variants)


def test_round_trip(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    save_manifest(tmp_path, manifest)
    assert load_manifest(tmp_path) == manifest
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["format"] == 1


def test_no_manifest_is_a_plain_model(tmp_path: Path) -> None:
    assert load_manifest(tmp_path) is None


def _broken(tmp_path: Path, edit: Callable[[dict], object]) -> str:
    save_manifest(tmp_path, _manifest(tmp_path))
    raw = json.loads((tmp_path / MANIFEST_FILE).read_text())
    edit(raw)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as info:
        load_manifest(tmp_path)
    message = str(info.value)
    assert str(tmp_path / MANIFEST_FILE) in message
    return message


def _ort(raw: dict) -> dict:
    return raw["variants"]["fp32"]["profiles"]["onnxruntime"]


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda r: r["variants"]["int8"].pop("kind"), "variants.int8.kind"),
        (lambda r: r["variants"]["int8"].update(kind="int4"), "variants.int8.kind"),
        (lambda r: r["variants"]["int8"].update(size_bytes="big"), "variants.int8.size_bytes"),
        (lambda r: r["variants"]["int8"].update(size_bytes=True), "variants.int8.size_bytes"),
        (lambda r: r["variants"]["int8"].update(runnable_on=["tpu"]), "variants.int8.runnable_on"),
        (lambda r: _ort(r)["p99_ms"].pop(), "variants.fp32.profiles.onnxruntime.p99_ms"),
        (lambda r: _ort(r).update(batch_sizes=[2, 1, 8]), "variants.fp32.profiles.onnxruntime.batch_sizes"),
        (lambda r: r["variants"]["fp32"]["accuracy"].update(metric="f1"), "variants.fp32.accuracy.metric"),
        (lambda r: r.update(default="int4"), "default"),
        (lambda r: r.update(format=2), "format"),
        (lambda r: r.update(variants={}), "variants"),
        (lambda r: r["variants"]["int8"].update(file="model.missing.onnx"), "variants.int8.file"),
    ],
)
def test_validation_names_file_and_field(tmp_path: Path, edit: Callable[[dict], object], field: str) -> None:
    assert f"'{field}'" in _broken(tmp_path, edit)


def test_unreadable_json(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_manifest(tmp_path)


def test_save_refuses_unknown_default(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    with pytest.raises(ConfigError, match="default"):
        save_manifest(tmp_path, VariantManifest("m", "nope", None, manifest.variants))


def test_latency_estimates() -> None:
    p = _profile()
    assert p.latency_ms(1) == 1.0 and p.latency_ms(2) == 1.5 and p.latency_ms(8) == 3.0
    assert p.latency_ms(5) == pytest.approx(1.5 + 1.5 * 3 / 6)  # between 2 and 8
    assert p.latency_ms(14) == pytest.approx(3.0 + 1.5 * 6 / 6)  # along the last segment
    assert p.latency_ms(0) == 1.0
    assert p.latency_ms(5, "p99") == pytest.approx(2 * p.latency_ms(5))
    with pytest.raises(ValueError):
        p.latency_ms(1, "p90")
    assert _profile((2.0,), (4,)).latency_ms(64) == 2.0


def test_best_throughput() -> None:
    size, rps = _profile().best_throughput()
    assert size == 8 and rps == pytest.approx(8 / 3.0 * 1e3)


def test_select(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    assert [v.name for v in manifest.select([])] == ["fp32", "int8", "fp16"]
    assert [v.name for v in manifest.select(["int8", "fp32"])] == ["fp32", "int8"]
    with pytest.raises(ConfigError, match="pruned-50"):
        manifest.select(["pruned-50"])


def test_choice_is_trusted_only_on_the_cpu_it_was_measured_on(tmp_path: Path) -> None:
    int8 = _manifest(tmp_path).variants["int8"]
    assert int8.serving_order("Test CPU", ["avx512_vnni", "avx2"]) == (("int8", "onnxruntime"), None)
    order, why = int8.serving_order("Test CPU", ["avx2"])
    assert order == int8.backends and why is not None and "avx512_vnni" in why and "Test CPU" in why
    _, why = int8.serving_order("Other CPU", ["avx2", "avx512_vnni"])
    assert why is not None and "'Other CPU'" in why
    fp16 = _manifest(tmp_path).variants["fp16"]  # nothing measured: nothing to distrust
    assert fp16.serving_order("Other CPU", []) == (("tensorrt",), None)


def test_choice_fields_are_checked(tmp_path: Path) -> None:
    message = _broken(tmp_path, lambda r: r["variants"]["int8"]["choice"]["measured"]["int8"].update(agrees="yes"))
    assert "variants.int8.choice.measured.int8.agrees" in message
