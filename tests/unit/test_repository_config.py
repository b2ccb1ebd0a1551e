"""config.pbtxt parsing, field classification, auto-complete and version policy, without a server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

import onnx_models as models
from tidal.errors import ConfigError, InvalidArgument, NotFound
from tidal.optimize.graph import save_graph
from tidal.proto import model_config_pb2 as mc
from tidal.repository import layout
from tidal.repository.config import (
    autocomplete,
    build_spec,
    couples_rows,
    load_config,
    read_graph,
    run_time_follows_shapes,
)
from tidal.repository.pbtxt import parse_model_config, parse_model_config_text
from tidal.scheduling.queue import TimeoutAction
from tidal.types import DataType


def test_triton_fields_not_acted_on_are_accepted_and_named() -> None:
    text = """
    name: "m"
    max_batch_size: 2
    input [ { name: "a" data_type: TYPE_FP32 dims: [ 3 ] reshape { shape: [ 3 ] } } ]
    sequence_batching { control_input [ { name: "START" control [ { kind: CONTROL_SEQUENCE_START } ] } ] }
    instance_group [ { count: 1 gpus: [ 0 ] } ]
    """
    parsed = parse_model_config_text(text, "m/config.pbtxt")
    assert parsed.ignored == ["input.reshape", "sequence_batching"]
    assert parsed.config.max_batch_size == 2 and parsed.config.input[0].name == "a"
    assert "max_batch_size" in parsed.present


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("bogus: 1", "bogus"),
        ('input { name: "a" colour: "red" }', "input.colour"),
        ("dynamic_batching { max_delay: 5 }", "dynamic_batching.max_delay"),
    ],
)
def test_unknown_fields_are_errors_naming_field_and_file(text: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_model_config_text(text, "repo/m/config.pbtxt")
    assert named in str(err.value) and "repo/m/config.pbtxt" in str(err.value)


def test_syntax_errors_name_the_file() -> None:
    with pytest.raises(ConfigError, match=r"x/config\.pbtxt"):
        parse_model_config_text('max_batch_size: "eight"', "x/config.pbtxt")


def test_autocomplete_fills_signature_and_batching(tmp_path: Path) -> None:
    path = models.add_sub(tmp_path / "model.onnx", width=5)
    config = mc.ModelConfig(name="m")
    autocomplete(config, path)
    spec = build_spec(config)
    assert spec.max_batch_size == 4 and spec.batching and spec.scheduler.batching
    assert [(s.name, s.datatype, s.shape) for s in spec.inputs] == [
        ("INPUT0", DataType.FP32, (5,)),
        ("INPUT1", DataType.FP32, (5,)),
    ]


def test_explicit_zero_batch_size_is_kept(tmp_path: Path) -> None:
    path = models.add_sub(tmp_path / "model.onnx")
    parsed = parse_model_config_text("max_batch_size: 0", "c")
    autocomplete(parsed.config, path, parsed.present)
    spec = build_spec(parsed.config)
    assert spec.max_batch_size == 0 and [s.shape for s in spec.inputs] == [(-1, 16), (-1, 16)]


def test_config_disagreeing_with_the_graph_is_an_error(tmp_path: Path) -> None:
    path = models.add_sub(tmp_path / "model.onnx")
    config = parse_model_config_text('input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] } ]', "c").config
    with pytest.raises(ConfigError, match="TYPE_INT32"):
        autocomplete(config, path)
    config = parse_model_config_text('input [ { name: "X" data_type: TYPE_FP32 dims: [ 16 ] } ]', "c").config
    with pytest.raises(ConfigError, match=r"'X' is not in the ONNX graph"):
        autocomplete(config, path)


def test_dynamic_batching_becomes_scheduler_settings() -> None:
    text = """
    max_batch_size: 8
    input [ { name: "a" data_type: TYPE_FP32 dims: [ 3 ] } ]
    output [ { name: "b" data_type: TYPE_FP32 dims: [ 3 ] } ]
    instance_group [ { count: 2 kind: KIND_CPU }, { count: 1 } ]
    dynamic_batching {
      preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 300 priority_levels: 3 default_priority_level: 2
      default_queue_policy { max_queue_size: 10 }
      priority_queue_policy { key: 3 value { timeout_action: DELAY default_timeout_microseconds: 900 } }
    }
    """
    spec = build_spec(parse_model_config_text(text, "c").config)
    assert spec.knobs.max_batch_size == 8 and spec.knobs.max_queue_delay_us == 300
    assert spec.knobs.preferred_batch_sizes == (4,) and spec.instance_count == 3
    assert spec.scheduler.priority_levels == 3 and spec.scheduler.default_priority_level == 2
    assert spec.scheduler.default_policy.max_queue_size == 10
    assert spec.scheduler.level_policies[3].timeout_action is TimeoutAction.DELAY


@pytest.mark.parametrize(
    "text",
    [
        "max_batch_size: 4 dynamic_batching { preferred_batch_size: [ 8 ] }",
        "max_batch_size: 4 dynamic_batching { priority_levels: 2 default_priority_level: 3 }",
        "max_batch_size: 4 dynamic_batching { priority_levels: 2 priority_queue_policy { key: 5 value { } } }",
        "max_batch_size: -1",
        "instance_group [ { kind: KIND_CPU gpus: [ 0 ] } ]",
        "instance_group [ { kind: KIND_MODEL } ]",
        "instance_group [ { kind: KIND_GPU gpus: [ 0, 0 ] } ]",
    ],
)
def test_inconsistent_settings_are_rejected(text: str) -> None:
    with pytest.raises(ConfigError):
        build_spec(parse_model_config_text(text, "c").config)


def test_config_name_must_match_folder(tmp_path: Path) -> None:
    models.write_config(tmp_path / "a", 'name: "b"')
    with pytest.raises(ConfigError, match="does not match"):
        load_config(tmp_path / "a", "a")


def test_version_policies() -> None:
    available = [1, 2, 5]
    assert layout.select_versions(available, mc.ModelVersionPolicy(), "s") == [5]
    latest = mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=2))
    assert layout.select_versions(available, latest, "s") == [2, 5]
    assert layout.select_versions(available, mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All()), "s") == available
    specific = mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[1, 5]))
    assert layout.select_versions(available, specific, "s") == [1, 5]
    missing = mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[3]))
    with pytest.raises(ConfigError, match=r"\[3\]"):
        layout.select_versions(available, missing, "s")


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "/etc", "", ".hidden", "a\\b", "x\0y"])
def test_model_names_are_confined(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgument):
        layout.model_dir(tmp_path, name)


def test_missing_model_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        layout.require_model_dir(tmp_path, "absent")


def test_run_time_follows_shapes_except_for_data_dependent_graphs(tmp_path: Path) -> None:
    assert run_time_follows_shapes(models.mlp(tmp_path / "mlp.onnx", (4, 8, 2)))
    assert not run_time_follows_shapes(models.spin(tmp_path / "spin.onnx"))  # a Loop: work follows the trip count
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    assert not run_time_follows_shapes(tmp_path / "junk.onnx")
    # a graph already read is used instead of the file
    assert not run_time_follows_shapes(tmp_path / "mlp.onnx", read_graph(tmp_path / "spin.onnx"))


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("controller { mode: 7 }", "controller.mode"),
        ("instance_group [ { count: 1 kind: 9 } ]", "instance_group.kind"),
        ('input [ { name: "a" data_type: 99 dims: [ 1 ] } ]', "input.data_type"),
        ("dynamic_batching { default_queue_policy { timeout_action: 4 } }", "default_queue_policy.timeout_action"),
        (
            "dynamic_batching { priority_levels: 2 priority_queue_policy { key: 1 value { timeout_action: 4 } } }",
            "priority_queue_policy.timeout_action",
        ),
    ],
)
def test_numeric_enum_values_outside_the_schema_are_config_errors(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_model_config_text(text, "repo/m/config.pbtxt")
    assert field in str(err.value) and "repo/m/config.pbtxt" in str(err.value)


def test_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.pbtxt"
    path.write_bytes(b"max_batch_size: 8 \xf2\xff\x00")
    with pytest.raises(ConfigError, match=r"config\.pbtxt.*UTF-8"):
        parse_model_config(path)


def test_model_folder_in_a_symlink_loop_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises((ConfigError, NotFound)):  # Python 3.13's resolve() no longer raises on a loop
        layout.require_model_dir(tmp_path, "a")


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("max_batch_size: 4 dynamic_batching { priority_levels: 4294967295 }", "priority_levels"),
        ("max_batch_size: 4 dynamic_batching { priority_levels: 257 }", "priority_levels"),
        ("instance_group [ { count: 2147483647 } ]", "instance_group"),
        ("instance_group [ { count: 200 }, { count: 57 } ]", "instance_group"),
    ],
)
def test_sizes_that_cost_memory_or_threads_are_bounded(text: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        build_spec(parse_model_config_text(text, "c").config)


def test_bounds_themselves_are_accepted() -> None:
    text = "max_batch_size: 4 dynamic_batching { priority_levels: 256 } instance_group [ { count: 256 } ]"
    spec = build_spec(parse_model_config_text(text, "c").config)
    assert spec.scheduler.priority_levels == 256 and spec.instance_count == 256


@pytest.mark.parametrize(
    "slo",
    [
        "slo { p99_ms: nan }",
        "slo { p99_ms: inf }",
        "slo { p99_ms: 10 priority_p99_ms { key: 1 value: nan } }",
        "slo { p99_ms: 10 priority_p99_ms { key: 1 value: inf } }",
    ],
)
def test_non_finite_slo_targets_are_rejected(slo: str) -> None:
    text = f"max_batch_size: 4 dynamic_batching {{ priority_levels: 2 }} {slo}"
    with pytest.raises(ConfigError, match="slo"):
        build_spec(parse_model_config_text(text, "c").config)


def _declared(path: Path, text: str) -> mc.ModelConfig:
    parsed = parse_model_config_text(text, "c")
    autocomplete(parsed.config, path, parsed.present)
    return parsed.config


@pytest.mark.parametrize(
    "text",
    [
        'max_batch_size: 4 input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 7 ] } ]',
        'max_batch_size: 4 output [ { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 7 ] } ]',
        'max_batch_size: 4 input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16, 1 ] } ]',
        'max_batch_size: 0 input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 2, 7 ] } ]',
        'max_batch_size: 0 input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]',
        'max_batch_size: 4 input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -7 ] } ]',
    ],
)
def test_dims_disagreeing_with_the_graph_are_rejected(tmp_path: Path, text: str) -> None:
    path = models.add_sub(tmp_path / "model.onnx")
    with pytest.raises(ConfigError, match=r"(INPUT0|OUTPUT1)'?: dims"):
        _declared(path, text)


def test_negative_dims_are_rejected_even_where_the_graph_has_none(tmp_path: Path) -> None:
    path = models.reshape3(tmp_path / "model.onnx")  # OUTPUT is [rows, 3]: a symbolic dim would match anything
    with pytest.raises(ConfigError, match=r"dims \[-7, 3\]"):
        _declared(path, 'output [ { name: "OUTPUT" data_type: TYPE_FP32 dims: [ -7, 3 ] } ]')


@pytest.mark.parametrize(
    "text",
    [
        'max_batch_size: 4 input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]',
        'max_batch_size: 4 input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]',
        'max_batch_size: 0 input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 3, 16 ] } ]',
        'max_batch_size: 0 input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]',
    ],
)
def test_dims_agreeing_with_the_graph_are_kept(tmp_path: Path, text: str) -> None:
    path = models.add_sub(tmp_path / "model.onnx")
    config = _declared(path, text + ' input [ { name: "INPUT1" data_type: TYPE_FP32 } ]')
    assert list(config.input[0].dims) == list(parse_model_config_text(text, "c").config.input[0].dims)


def test_config_leaving_out_a_required_input_is_an_error(tmp_path: Path) -> None:
    """Triton refuses it at load; served, every request would fail whichever inputs it sends."""
    path = models.add_sub(tmp_path / "model.onnx")
    text = 'name: "simple" max_batch_size: 4 input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]'
    with pytest.raises(ConfigError) as err:
        _declared(path, text)
    assert "model 'simple'" in str(err.value) and "requires INPUT0, INPUT1: INPUT1 missing" in str(err.value)


def test_graph_input_with_an_initializer_may_be_left_out(tmp_path: Path) -> None:
    """ONNX takes an initializer's value for a graph input the feed leaves out."""
    graph = read_graph(models.add_sub(tmp_path / "add_sub.onnx"))
    graph.initializer.append(numpy_helper.from_array(np.zeros((1, 16), np.float32), "INPUT1"))
    path = save_graph(graph, tmp_path / "model.onnx")
    config = _declared(path, 'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, 16 ] } ]')
    assert [entry.name for entry in config.input] == ["INPUT0"]
    assert [entry.name for entry in _declared(path, "").input] == ["INPUT0"]


def test_graph_input_with_an_initializer_may_be_declared_to_override_it(tmp_path: Path) -> None:
    """As Triton serves it: the initializer is then a default every request replaces."""
    graph = read_graph(models.add_sub(tmp_path / "add_sub.onnx"))
    graph.initializer.append(numpy_helper.from_array(np.zeros((1, 16), np.float32), "INPUT1"))
    path = save_graph(graph, tmp_path / "model.onnx")
    config = _declared(path, 'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, 16 ] }, '
                             '{ name: "INPUT1" data_type: TYPE_FP32 } ]')
    assert [(entry.name, list(entry.dims)) for entry in config.input] == [("INPUT0", [-1, 16]), ("INPUT1", [-1, 16])]


def test_dynamic_quantization_couples_the_rows_of_a_batch(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = models.mlp(tmp_path / "mlp.onnx", (64, 64, 8))
    quantize_dynamic(str(fp32), str(tmp_path / "dynamic.onnx"), weight_type=QuantType.QInt8)
    assert couples_rows(read_graph(tmp_path / "dynamic.onnx"))  # one activation range per tensor: per batch
    assert not couples_rows(read_graph(fp32))
