"""Edge cases answered as Triton answers them (its behaviour read from its source), or documented where not
(README, "Where tidal answers differently from Triton")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as tc_http
from tritonclient.utils import InferenceServerException

from live_server import ServerProcess, start_server
from onnx_models import SIMPLE_CONFIG, add_sub, write_config
from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc


def _inputs(rows: int = 1, protocol=tc) -> list[tc.InferInput]:
    inputs = [protocol.InferInput("INPUT0", [rows, 16], "FP32"), protocol.InferInput("INPUT1", [rows, 16], "FP32")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.ones((rows, 16), np.float32))
    return inputs


def _refused(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as err:
        call()
    return err.value


# Triton parses the version with std::stol and refuses what fails or is negative INVALID_ARGUMENT, before it
# looks the model up; " 2" and "2a" it would take as 2 (stol reads a prefix): tidal refuses them as well.
@pytest.mark.parametrize("version", ["abc", "-1", " 2", "2a", "+1"])
@pytest.mark.parametrize("model", ["simple", "no_such_model"])
def test_a_version_that_is_not_a_number_is_invalid_argument(client: tc.InferenceServerClient, version, model) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, _inputs(), model_version=version)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "is not an integer" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata(model, model_version=version)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_a_numeric_version_that_is_not_served_is_not_found(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple", _inputs(), model_version="9")
    assert err.value.status() == "StatusCode.NOT_FOUND"


# Triton's gRPC front end accepts 'priority' as int64_param or uint64_param, 'timeout' and 'classification'
# as int64_param, and refuses any other case, an empty oneof included, INVALID_ARGUMENT. tritonclient always
# sets a value, so this one message is built by hand.
@pytest.mark.parametrize("key", ["priority", "timeout", "classification"])
def test_a_parameter_without_a_value_is_invalid_argument(server: ServerProcess, key: str) -> None:
    msg = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        msg.inputs.add(name=name, datatype="FP32", shape=[1, 16])
    msg.raw_input_contents.extend([np.ones((1, 16), np.float32).tobytes()] * 2)
    if key == "classification":
        msg.outputs.add(name="OUTPUT0").parameters[key].SetInParent()
    else:
        msg.parameters[key].SetInParent()
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(msg)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"parameter '{key}' has no value" in err.value.details()
        msg.ClearField("parameters")
        msg.ClearField("outputs")
        assert stub.ModelInfer(msg).outputs  # the same request with no parameter is served


# Triton's core keeps the requested outputs in a set and refuses a second insert: "output 'X' already exists
# in request", INVALID_ARGUMENT (HTTP 400), rather than answering the output once.
@pytest.mark.parametrize("protocol", [tc, tc_http])
def test_the_same_output_requested_twice_is_invalid_argument(server: ServerProcess, protocol) -> None:
    client = protocol.InferenceServerClient(server.url if protocol is tc else server.http_url)
    twice = [protocol.InferRequestedOutput("OUTPUT0"), protocol.InferRequestedOutput("OUTPUT0")]
    err = _refused(lambda: client.infer("simple", _inputs(protocol=protocol), outputs=twice))
    assert err.status() in ("StatusCode.INVALID_ARGUMENT", "400"), err
    assert "output 'OUTPUT0' is requested twice" in err.message()
    once = [protocol.InferRequestedOutput("OUTPUT0"), protocol.InferRequestedOutput("OUTPUT1")]
    result = client.infer("simple", _inputs(protocol=protocol), outputs=once)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 2, np.float32))


# Triton unloads whatever its global map holds under the name, nothing for a name it does not know, and
# answers success: unloading is idempotent. tidal still refuses a name no repository could hold (its own
# rule for load and unload alike; Triton checks names on load only).
def test_unloading_a_model_that_is_not_loaded_succeeds(server: ServerProcess, client: tc.InferenceServerClient) -> None:
    client.unload_model("no_such_model")
    tc_http.InferenceServerClient(server.http_url).unload_model("no_such_model")
    assert not client.is_model_ready("no_such_model")
    err = _refused(lambda: client.unload_model("../simple"))
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "invalid model name" in err.message()
    assert client.is_model_ready("simple")


# Triton's core lets a request of batch size 0 through its checks (only a batch above max_batch_size is
# refused) and leaves it to the backend. tidal refuses it: there is nothing to compute, and a batcher that
# counts rows has no place for a request of none. Documented in the README.
@pytest.mark.parametrize("protocol", [tc, tc_http])
def test_a_batch_of_zero_rows_is_invalid_argument(server: ServerProcess, protocol) -> None:
    client = protocol.InferenceServerClient(server.url if protocol is tc else server.http_url)
    err = _refused(lambda: client.infer("simple", _inputs(rows=0, protocol=protocol)))
    assert err.status() in ("StatusCode.INVALID_ARGUMENT", "400"), err
    assert "batch size 0 is outside 1..8" in err.message()


@pytest.fixture(scope="module")
def ranked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root: Path = tmp_path_factory.mktemp("ranked")
    config = SIMPLE_CONFIG.replace('name: "simple"', 'name: "ranked"').replace(
        "dynamic_batching { max_queue_delay_microseconds: 500 }",
        "dynamic_batching { priority_levels: 2 default_priority_level: 2 }",
    )
    assert "priority_levels: 2" in config
    write_config(root / "ranked", config)
    add_sub(root / "ranked" / "1" / "model.onnx")
    server = start_server(root)
    yield server
    assert server.stop() == 0, server.log()


# Triton's SetPriority: 0, or a priority above the model's levels, selects default_priority_level.
@pytest.mark.parametrize("priority", [0, 1, 2, 3, 2**63])
def test_a_priority_beyond_the_levels_is_served_at_the_default_level(ranked: ServerProcess, priority: int) -> None:
    client = tc.InferenceServerClient(ranked.url)
    result = client.infer("ranked", _inputs(), priority=priority)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 2, np.float32))


# Triton serves a graph input that has an initializer as an input where the config declares it; where the
# config leaves it out, ONNX Runtime takes the initializer.
def test_a_declared_input_overrides_its_initializer(tmp_path: Path) -> None:
    from onnx import numpy_helper

    from tidal.optimize.graph import save_graph
    from tidal.repository.config import read_graph

    graph = read_graph(add_sub(tmp_path / "add_sub.onnx"))
    graph.initializer.append(numpy_helper.from_array(np.full((1, 16), 5, np.float32), "INPUT1"))
    for name, inputs in (("declared", "INPUT0, INPUT1"), ("default", "INPUT0")):
        declared = ", ".join(f'{{ name: "{i}" data_type: TYPE_FP32 dims: [ -1, 16 ] }}' for i in inputs.split(", "))
        write_config(tmp_path / "repo" / name, f'name: "{name}" input [ {declared} ]')
        save_graph(graph, tmp_path / "repo" / name / "1" / "model.onnx")
    server = start_server(tmp_path / "repo")
    try:
        client = tc.InferenceServerClient(server.url)
        result = client.infer("declared", _inputs())  # INPUT1 = ones from the request
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 2, np.float32))
        only = tc.InferInput("INPUT0", [1, 16], "FP32")
        only.set_data_from_numpy(np.ones((1, 16), np.float32))
        result = client.infer("default", [only])  # INPUT1 = the initializer's fives
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 6, np.float32))
    finally:
        assert server.stop() == 0, server.log()
