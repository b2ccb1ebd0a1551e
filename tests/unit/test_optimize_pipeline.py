"""`tidal optimize` / `tidal profile` end to end on a small trained classifier, through the CLI too."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tidal.optimize.cli import add_optimize_parser, add_profile_parser
from tidal.optimize.data import load_dataset
from tidal.optimize.evaluate import predict, score
from tidal.optimize.graph import graph_inputs, save_graph, save_model
from tidal.optimize.reference import synthetic_classification, train_classifier
from tidal.optimize.train import TrainConfig
from tidal.repository.manager import ModelManager
from tidal.repository.pbtxt import parse_model_config
from tidal.repository.variants import load_manifest
from tidal.types import DataType

FAST = ["--max-batch-size", "4", "--profile-seconds", "0.01", "--no-progress", "--distill-epochs", "15"]


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tidal")
    sub = parser.add_subparsers(dest="command")
    add_optimize_parser(sub)
    add_profile_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("optimize")
    x, y = synthetic_classification(1600, 16, 4, seed=5, spread=1.5)
    model = train_classifier(x[:1000], y[:1000], (96, 64), TrainConfig(epochs=12, seed=5), "features", "scores")
    onnx.save(model, str(folder / "model.onnx"))
    np.savez(folder / "cal.npz", features=x[:1000])
    np.savez(folder / "val.npz", features=x[1000:], labels=y[1000:])
    return folder


@pytest.fixture(scope="module")
def repo(files: Path) -> Path:
    repository = files / "repo"
    argv = ["optimize", str(files / "model.onnx"), "--repository", str(repository), "--name", "clf"]
    argv += ["--calibration", str(files / "cal.npz"), "--validation", str(files / "val.npz"), *FAST]
    assert _cli(argv) == 0
    return repository


def test_every_kind_is_written_and_recorded(repo: Path) -> None:
    manifest = load_manifest(repo / "clf" / "1")
    assert manifest is not None and manifest.default == "fp32"
    assert list(manifest.variants) == ["fp32", "int8", "int8-dynamic", "pruned-50", "pruned-75", "distilled", "fp16"]
    for v in manifest.variants.values():
        assert (repo / "clf" / "1" / v.file).stat().st_size == v.size_bytes
    assert manifest.variants["fp32"].file == "model.onnx"
    assert manifest.variants["fp16"].runnable_on == ("gpu",) and not manifest.variants["fp16"].profiles
    assert all(v.runnable_on == ("cpu", "gpu") for v in manifest.variants.values() if v.kind != "fp16")
    for name in ("fp32", "int8", "pruned-50", "distilled"):
        profile = manifest.variants[name].profiles["onnxruntime"]
        assert profile.batch_sizes == (1, 2, 4) and profile.allow_spinning is False
        assert all(p99 >= p50 > 0 for p50, p99 in zip(profile.p50_ms, profile.p99_ms, strict=True))
        assert profile.hardware == manifest.hardware
    assert manifest.variants["int8"].size_bytes < manifest.variants["fp32"].size_bytes / 2
    losses = manifest.variants["distilled"].details["losses"]
    assert len(losses) == 15 and losses[-1] < losses[0]


def test_every_file_is_written_for_older_onnx_runtimes_too(repo: Path) -> None:
    """At the lowest IR version its opsets allow, not the newest this onnx knows (the source model has that):
    onnxruntime-gpu, a release behind the CPU wheel, refuses a newer IR; and no opset import that no node uses."""
    files = sorted((repo / "clf" / "1").glob("*.onnx"))
    assert len(files) == 7
    for path in files:
        model = onnx.load(str(path), load_external_data=False)
        assert model.ir_version == helper.find_min_ir_version_for(model.opset_import, ignore_unknown=True), path.name
        assert {o.domain for o in model.opset_import} <= {n.domain for n in model.graph.node} | {""}, path.name


def test_the_int8_variant_for_tensorrt_is_symmetric_with_float_biases(files: Path, tmp_path: Path) -> None:
    argv = ["optimize", str(files / "model.onnx"), "--repository", str(tmp_path), "--name", "clf", "--calibration",
            str(files / "cal.npz"), "--variants", "fp32,int8-symmetric", *FAST]
    assert _cli(argv) == 0
    variant = load_manifest(tmp_path / "clf" / "1").variants["int8-symmetric"]
    assert variant.backends == ("onnxruntime",) and variant.runnable_on == ("cpu", "gpu")
    assert variant.accuracy is not None and variant.accuracy.top1_agreement > 0.9
    graph = onnx.load(str(tmp_path / "clf" / "1" / variant.file)).graph
    zero_points = {n.input[2] for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert zero_points and all(not numpy_helper.to_array(i).any() for i in graph.initializer if i.name in zero_points)
    assert not [i.name for i in graph.initializer if i.data_type == TensorProto.INT32]  # biases stay float


def test_opset_imports_used_only_in_subgraphs_or_functions_are_kept(tmp_path: Path) -> None:
    then = helper.make_graph([helper.make_node("Custom", ["x"], ["y"], domain="com.then")], "then", [],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["c"], ["out"], then_branch=then, else_branch=then)
    graph = helper.make_graph([node, helper.make_node("Fn", ["x"], ["z"], domain="com.fn")], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("c", "x")],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("out", "z")])
    function = helper.make_function("com.fn", "Fn", ["x"], ["z"],
                                    [helper.make_node("Inner", ["x"], ["z"], domain="com.inner")],
                                    [helper.make_opsetid("com.inner", 1)])
    opsets = [helper.make_opsetid(d, 1) for d in ("com.then", "com.fn", "com.inner", "com.unused")]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *opsets], functions=[function])
    save_model(model, tmp_path / "m.onnx")
    kept = {o.domain for o in onnx.load(str(tmp_path / "m.onnx")).opset_import}
    assert kept == {"", "com.then", "com.fn", "com.inner"}


def test_config_is_written_for_batching(repo: Path) -> None:
    config = parse_model_config(repo / "clf" / "config.pbtxt").config
    assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in config.input] == [("features", [16])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("scores", [4])]


def test_recorded_accuracies_match_a_fresh_measurement(repo: Path, files: Path) -> None:
    manifest = load_manifest(repo / "clf" / "1")
    assert manifest is not None
    folder = repo / "clf" / "1"
    val = load_dataset(files / "val.npz", graph_inputs(onnx.load(str(folder / "model.onnx"))), "validation")
    reference = predict(folder / "model.onnx", val)
    for v in manifest.variants.values():
        assert v.accuracy is not None and v.accuracy.metric == "top1_accuracy" and v.accuracy.samples == 600
        served_on = v.backends[0] if v.choice else "onnxruntime"  # fp16: no CPU choice, ORT measures it
        fresh = score(predict(folder / v.file, val, served_on), reference, val.labels)
        assert fresh.value == pytest.approx(v.accuracy.value, abs=1.01 / 600), v.name  # at most one row flips
        assert fresh.top1_agreement == pytest.approx(v.accuracy.top1_agreement, abs=1.01 / 600), v.name
    fp32 = manifest.variants["fp32"].accuracy
    assert fp32 is not None and fp32.value > 0.7
    assert manifest.variants["int8"].accuracy.value >= fp32.value - 0.02


def test_int8_serves_on_the_fastest_exact_backend(repo: Path) -> None:
    manifest = load_manifest(repo / "clf" / "1")
    assert manifest is not None
    int8 = manifest.variants["int8"]
    choice = int8.choice
    assert choice is not None and choice.hardware == manifest.hardware
    assert set(choice.measured) == set(int8.profiles) == {"int8", "onnxruntime"}
    exact = [name for name, m in choice.measured.items() if m.agrees]
    assert all(m.max_error_steps is not None and m.agrees == (m.max_error_steps <= 1) for m in choice.measured.values())
    assert int8.backends == tuple(sorted(exact, key=lambda n: choice.measured[n].mean_p50_ms))
    assert choice.chosen == int8.backends[0] and choice.chosen in choice.reason
    assert choice.measured["int8"].agrees  # tidal's kernels are exact on every ISA
    fp32 = manifest.variants["fp32"]
    assert fp32.choice is not None and fp32.choice.measured["onnxruntime"].max_error_steps is None


def test_pruned_and_distilled_variants_do_less_work(repo: Path) -> None:
    manifest = load_manifest(repo / "clf" / "1")
    assert manifest is not None
    fp32 = manifest.variants["fp32"]
    p50, p75, student = (manifest.variants[n] for n in ("pruned-50", "pruned-75", "distilled"))
    assert fp32.flops_per_row == 2 * (16 * 96 + 96 * 64 + 64 * 4)
    assert p50.flops_per_row == 2 * (16 * 48 + 48 * 32 + 32 * 4)
    assert p75.flops_per_row < p50.flops_per_row < fp32.flops_per_row
    assert p50.parameters < fp32.parameters / 2 and p50.size_bytes < fp32.size_bytes / 2
    assert student.details["hidden"] == [24] and student.parameters < fp32.parameters / 4


def test_the_repository_loader_serves_every_cpu_variant(repo: Path) -> None:
    async def load() -> dict[str, tuple[int, ...]]:
        manager = ModelManager(repo)
        await manager.load("clf")
        served = manager.get("clf")
        x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
        shapes = {name: run[0].run({"features": x}, ["scores"])["scores"].shape for name, run in served.runners.items()}
        assert served.spec.knobs.active_variant == "fp32"
        assert served.spec.inputs[0].datatype is DataType.FP32
        await manager.close()
        return shapes

    shapes = asyncio.run(load())
    assert set(shapes) == {"fp32", "int8", "int8-dynamic", "pruned-50", "pruned-75", "distilled"}
    assert set(shapes.values()) == {(3, 4)}


def test_profile_re_measures_only_the_profiles(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest_file = repo / "clf" / "1" / "variants.json"
    before = json.loads(manifest_file.read_text())
    argv = ["profile", str(repo), "clf", "--profile-seconds", "0.01", "--no-progress", "--max-batch-size", "2"]
    assert _cli(argv) == 0
    after = json.loads(manifest_file.read_text())
    assert "pruned-50" in capsys.readouterr().out
    for name, variant in after["variants"].items():
        assert variant["accuracy"] == before["variants"][name]["accuracy"]
        for profile in variant["profiles"].values():
            assert profile["batch_sizes"] == [1, 2]


def test_min_accuracy_leaves_variants_out(files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["optimize", str(files / "model.onnx"), "--repository", str(tmp_path), "--name", "clf"]
    argv += ["--calibration", str(files / "cal.npz"), "--variants", "fp32,pruned", "--prune-ratios", "0.1,0.97"]
    assert _cli([*argv, "--min-accuracy", "0.6", *FAST]) == 0
    err = capsys.readouterr().err
    assert "left out pruned-97" in err and "below --min-accuracy 0.6" in err
    manifest = load_manifest(tmp_path / "clf" / "1")
    assert manifest is not None and list(manifest.variants) == ["fp32", "pruned-10"]
    assert manifest.variants["pruned-10"].accuracy.metric == "top1_agreement"  # no validation labels given
    assert sorted(p.name for p in (tmp_path / "clf" / "1").glob("*.onnx")) == ["model.onnx", "model.pruned-10.onnx"]


def _bad_run(tmp_path: Path, capsys: pytest.CaptureFixture[str], model: Path, cal: Path) -> str:
    argv = ["optimize", str(model), "--repository", str(tmp_path / "r"), "--name", "m", "--calibration", str(cal)]
    assert _cli([*argv, *FAST]) == 2
    return capsys.readouterr().err


def test_missing_files_are_clear(files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "model file" in _bad_run(tmp_path, capsys, tmp_path / "nope.onnx", files / "cal.npz")
    assert "does not exist" in _bad_run(tmp_path, capsys, files / "model.onnx", tmp_path / "nope.npz")


def test_model_without_batch_dim_is_refused(files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fixed = onnx.load(str(files / "model.onnx"))
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(fixed, str(tmp_path / "fixed.onnx"))
    assert "variable batch dimension" in _bad_run(tmp_path, capsys, tmp_path / "fixed.onnx", files / "cal.npz")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])],
    )  # fmt: skip
    onnx.save(helper.make_model(graph), str(tmp_path / "flat.onnx"))
    assert "variable batch dimension" in _bad_run(tmp_path, capsys, tmp_path / "flat.onnx", files / "cal.npz")


def test_calibration_of_the_wrong_shape_is_refused(files: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = files / "model.onnx"
    np.savez(tmp_path / "cal.npz", features=np.zeros((10, 15), np.float32))
    message = _bad_run(tmp_path, capsys, model, tmp_path / "cal.npz")
    assert "[10, 15]" in message and "needs [rows, 16]" in message
    np.savez(tmp_path / "cal2.npz", a=np.zeros((10, 16), np.float32), b=np.zeros((10, 16), np.float32))
    assert "no array for model input 'features'" in _bad_run(tmp_path, capsys, model, tmp_path / "cal2.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert "cannot read calibration data" in _bad_run(tmp_path, capsys, model, tmp_path / "junk.npz")


def test_profile_of_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["profile", str(tmp_path), "ghost", "--no-progress"]) == 2
    assert "not in repository" in capsys.readouterr().err


def test_non_classifier_output_is_refused(files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["features", "axes"], ["total"], keepdims=0)], "g",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "sum.onnx"))
    assert "must be [N, classes]" in _bad_run(tmp_path, capsys, tmp_path / "sum.onnx", files / "cal.npz")
    one_class = onnx.load(str(files / "model.onnx"))
    one_class.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    onnx.save(one_class, str(tmp_path / "one.onnx"))
    message = _bad_run(tmp_path, capsys, tmp_path / "one.onnx", files / "cal.npz")
    assert "2 or more classes; 'scores' is [N, 1]" in message


def test_data_must_be_npz_and_finite(files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = files / "model.onnx"
    x = np.load(files / "cal.npz")["features"][:50]
    np.save(tmp_path / "cal.npy", x)
    assert "must be an .npz (numpy.savez)" in _bad_run(tmp_path, capsys, model, tmp_path / "cal.npy")
    x[3, 1], x[7, 0] = np.inf, np.nan
    np.savez(tmp_path / "bad.npz", features=x)
    message = _bad_run(tmp_path, capsys, model, tmp_path / "bad.npz")
    assert message.count("\n") == 1
    assert f"{tmp_path / 'bad.npz'}: calibration array 'features' has 2 non-finite values" in message
    argv = ["optimize", str(model), "--repository", str(tmp_path / "r"), "--name", "m"]
    argv += ["--calibration", str(files / "cal.npz"), "--validation", str(tmp_path / "bad.npz"), *FAST]
    assert _cli(argv) == 2
    assert "validation array 'features' has 2 non-finite values" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before any variant is built


def _fp64_model(files: Path, tmp_path: Path) -> Path:
    model = onnx.load(str(files / "model.onnx"))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.DOUBLE
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    onnx.save(model, str(tmp_path / "fp64.onnx"))
    return tmp_path / "fp64.onnx"


def test_kinds_an_fp64_model_cannot_have(files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["optimize", str(_fp64_model(files, tmp_path)), "--calibration", str(files / "cal.npz"), "--name", "m"]
    assert _cli([*argv, "--repository", str(tmp_path / "asked"), "--variants", "fp32,int8", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot build the int8 variant asked for" in err and "DOUBLE" in err
    assert not (tmp_path / "asked").exists()
    assert _cli([*argv, "--repository", str(tmp_path / "default"), *FAST]) == 0
    err = capsys.readouterr().err
    for kind in ("int8", "int8-dynamic", "distilled", "fp16"):
        assert f"skipped {kind}: {kind} is built from fp32 tensors" in err
    manifest = load_manifest(tmp_path / "default" / "m" / "1")
    assert manifest is not None and list(manifest.variants) == ["fp32", "pruned-50", "pruned-75"]


def test_int8_without_quantized_ops_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])], "neg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )  # fmt: skip
    model = save_graph(graph, tmp_path / "neg.onnx")
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32))
    argv = ["optimize", str(model), "--repository", str(tmp_path / "r"), "--name", "m"]
    assert _cli([*argv, "--calibration", str(tmp_path / "cal.npz"), "--variants", "fp32,int8", *FAST]) == 2
    assert "int8 variant asked for: the quantizer found nothing to quantize" in capsys.readouterr().err
    assert not (tmp_path / "r" / "m" / "1" / "model.int8.onnx").exists()
