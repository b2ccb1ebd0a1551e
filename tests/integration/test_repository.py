"""Model repository over gRPC: index, load/unload, version policies, broken models, statistics."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from live_server import start_server
from tidal.transport._gen import grpc_service_pb2 as pb
from tidal.transport._gen import grpc_service_pb2_grpc as pb_grpc


def _scale(client: tc.InferenceServerClient, model: str, version: str = "") -> float:
    data = np.ones((1, 4), np.float32)
    tensor = tc.InferInput("INPUT", [1, 4], "FP32")
    tensor.set_data_from_numpy(data)
    return float(client.infer(model, [tensor], model_version=version).as_numpy("OUTPUT")[0, 0])


def _index(client: tc.InferenceServerClient) -> dict[tuple[str, str], tuple[str, str]]:
    return {(m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models}


def test_index_shows_states_and_reasons(client: tc.InferenceServerClient, server) -> None:
    index = _index(client)
    assert index[("simple", "1")] == ("READY", "")
    state, reason = index[("broken", "")]
    assert state == "UNAVAILABLE" and "model.onnx" in reason
    state, reason = index[("misconfigured", "")]
    assert state == "UNAVAILABLE" and "bogus_field" in reason and "config.pbtxt" in reason
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.url))
    ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
    assert all(m.state == "READY" for m in ready) and {m.name for m in ready} >= {"simple", "identity", "scale"}


def test_version_policy_latest_two(client: tc.InferenceServerClient) -> None:
    assert _scale(client, "scale") == 3.0  # "" means the newest ready version
    assert _scale(client, "scale", "2") == 2.0
    assert not client.is_model_ready("scale", "1")
    with pytest.raises(InferenceServerException) as err:
        _scale(client, "scale", "1")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert client.get_model_metadata("scale").versions == ["2", "3"]


def test_version_policy_specific(client: tc.InferenceServerClient) -> None:
    assert _scale(client, "scale_specific", "1") == 1.0
    assert _scale(client, "scale_specific", "3") == 3.0
    assert not client.is_model_ready("scale_specific", "2")


def test_unload_then_load(client: tc.InferenceServerClient) -> None:
    client.unload_model("scale_specific")
    assert not client.is_model_ready("scale_specific")
    with pytest.raises(InferenceServerException) as err:
        _scale(client, "scale_specific")
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    assert _index(client)[("scale_specific", "")] == ("UNAVAILABLE", "unloaded")
    client.load_model("scale_specific")
    assert _scale(client, "scale_specific") == 3.0


def test_load_of_broken_model_fails_alone(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.load_model("broken")
    assert "broken" in err.value.message() or "model.onnx" in err.value.message()
    assert _scale(client, "scale") == 3.0


def test_model_names_never_leave_the_repository(client: tc.InferenceServerClient) -> None:
    for name in ("../simple", "/etc", "a/b", "..", "simple\\..\\x"):
        with pytest.raises(InferenceServerException) as err:
            client.load_model(name)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT", name
    with pytest.raises(InferenceServerException) as err:
        client.load_model("does_not_exist")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_statistics_count_real_requests(client: tc.InferenceServerClient) -> None:
    def count() -> tuple[int, int, int]:
        stats = client.get_inference_statistics("scale", "3").model_stats[0]
        return stats.inference_stats.success.count, stats.inference_stats.fail.count, stats.inference_count

    before = count()
    for _ in range(5):
        _scale(client, "scale", "3")
    after = count()
    assert after[0] - before[0] == 5
    assert after[2] - before[2] == 5
    stats = client.get_inference_statistics("scale", "3").model_stats[0]
    assert stats.inference_stats.queue.ns > 0 and stats.inference_stats.compute_infer.ns > 0
    assert stats.execution_count >= 1 and stats.last_inference > 0
    assert len(client.get_inference_statistics().model_stats) >= 3
    # A model name without a version: every ready version, as Triton reports them.
    assert [m.version for m in client.get_inference_statistics("scale").model_stats] == ["2", "3"]


def test_load_only_named_models(repository) -> None:
    srv = start_server(repository, "--load-model", "scale")
    try:
        c = tc.InferenceServerClient(srv.url)
        assert c.is_model_ready("scale")
        assert not c.is_model_ready("simple")
        c.load_model("simple")
        assert c.is_model_ready("simple")
    finally:
        assert srv.stop() == 0
