"""Model repository over gRPC: index, load/unload, version policies, broken models, statistics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

import onnx_models as models
from live_server import start_server
from tidal.app import App, ModelControlMode, ServeOptions
from tidal.errors import Code, TidalError
from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc
from tidal.repository import config as config_module
from tidal.repository.manager import ModelManager
from tidal.repository.poll import RepositoryPoller


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


async def _states(manager: ModelManager) -> dict[str, tuple[str, str]]:
    return {name: (state, reason) for name, _, state, reason in await manager.index()}


def _broken_repository(root: Path) -> Path:
    """One good model beside models whose config the parser once let through, or that cannot be read."""
    for name, text in {
        "good": "max_batch_size: 4",
        "enum": "max_batch_size: 4 controller { mode: 7 }",
        "preferred": "max_batch_size: 4 dynamic_batching { preferred_batch_size: [ 8 ] }",
        "priority": "max_batch_size: 4 dynamic_batching { priority_levels: 2 default_priority_level: 5 }",
        "slo": "max_batch_size: 4 slo { p99_ms: nan }",
        "dims": 'max_batch_size: 4 input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ 7 ] } ]',
        "explodes": "max_batch_size: 4",
    }.items():
        models.write_config(root / name, text)
        models.scale(root / name / "1" / "model.onnx", 2.0)
    models.write_config(root / "partial", 'max_batch_size: 4 input [ { name: "INPUT0" data_type: TYPE_FP32 } ]')
    models.add_sub(root / "partial" / "1" / "model.onnx")  # also needs INPUT1
    (root / "binary").mkdir()
    (root / "binary" / "config.pbtxt").write_bytes(b"\xf2\xff\x00 max_batch_size")
    models.scale(root / "binary" / "1" / "model.onnx", 2.0)
    return root


@pytest.fixture
def explosive_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug nobody has found yet: building the spec of any model named 'explodes*' raises a plain exception."""
    real = config_module.build_spec

    def build_spec(config):
        if config.name.startswith("explodes"):
            raise KeyError("a bug")
        return real(config)

    monkeypatch.setattr(config_module, "build_spec", build_spec)  # what every load builds its spec with


def test_start_up_load_survives_any_one_model_failing(tmp_path: Path, explosive_build: None) -> None:
    async def scenario() -> None:
        manager = ModelManager(_broken_repository(tmp_path))
        await manager.load_all()
        try:
            states = await _states(manager)
            assert states["good"] == ("READY", "")
            for name, named in {
                "enum": "controller.mode",
                "binary": "UTF-8",
                "preferred": "preferred_batch_size",
                "priority": "default_priority_level",
                "slo": "slo",
                "dims": "dims [7]",
                "partial": "INPUT1 missing",
            }.items():
                state, reason = states[name]
                assert state == "UNAVAILABLE" and "config.pbtxt" in reason and named in reason, (name, reason)
            state, reason = states["explodes"]
            assert state == "UNAVAILABLE" and reason.startswith("internal error") and "a bug" in reason
            with pytest.raises(TidalError) as err:  # RepositoryModelLoad answers INTERNAL, not UNKNOWN
                await manager.load("explodes")
            assert err.value.code is Code.INTERNAL
            assert manager.ready("good")
        finally:
            await manager.close()

    asyncio.run(scenario())


def test_poll_keeps_going_after_a_model_fails_unexpectedly(tmp_path: Path, explosive_build: None) -> None:
    async def scenario() -> None:
        root = tmp_path / "repo"
        models.scale(root / "good" / "1" / "model.onnx", 2.0)
        manager = ModelManager(root)
        await manager.load_all()
        poller = RepositoryPoller(manager, interval_s=3600)
        poller.snapshot()
        try:
            models.scale(root / "explodes" / "1" / "model.onnx", 2.0)
            await poller.poll_once()
            assert (await _states(manager))["explodes"][0] == "UNAVAILABLE"
            models.scale(root / "later" / "1" / "model.onnx", 3.0)
            await poller.poll_once()
            assert manager.ready("later") and manager.ready("good")
        finally:
            await manager.close()

    asyncio.run(scenario())


def test_every_failed_load_is_counted_a_failed_reload_too(tmp_path: Path) -> None:
    """A failed reload keeps the old version READY; counting only UNAVAILABLE models missed it."""

    async def scenario() -> None:
        models.write_config(tmp_path / "good", "max_batch_size: 4")
        models.scale(tmp_path / "good" / "1" / "model.onnx", 2.0)
        (tmp_path / "broken" / "1").mkdir(parents=True)
        (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
        options = ServeOptions(
            tmp_path, grpc_port=0, metrics_port=None, http_port=None, model_control_mode=ModelControlMode.POLL
        )
        app = App(options)
        assert app.poller is not None

        def failures(model: str) -> float | None:
            return app.metrics.registry.get_sample_value("tidal_model_load_failures_total", {"model": model})

        await app.manager.load_all()
        app.poller.snapshot()
        try:
            assert (failures("good"), failures("broken")) == (None, 1)
            with (tmp_path / "good" / "config.pbtxt").open("a") as config:
                config.write("\nbogus_field: 3\n")
            await app.poller.poll_once()
            good = (await _states(app.manager))["good"]
            assert good[0] == "READY" and "bogus_field" in good[1]
            assert failures("good") == 1
            models.write_config(tmp_path / "good", "max_batch_size: 2")
            await app.poller.poll_once()
            assert (await _states(app.manager))["good"] == ("READY", "") and failures("good") == 1
        finally:
            await app.manager.close()

    asyncio.run(scenario())


def test_poll_loop_outlives_a_failed_poll(tmp_path: Path) -> None:
    async def scenario() -> None:
        poller = RepositoryPoller(ModelManager(tmp_path), interval_s=0.01)
        polls: list[int] = []

        async def start_changes() -> list[asyncio.Task]:
            polls.append(1)
            if len(polls) == 1:
                raise KeyError("a bug")
            return []

        poller._start_changes = start_changes  # type: ignore[method-assign]  # what each turn of the loop runs
        poller.start()
        try:
            async with asyncio.timeout(10):
                while len(polls) < 3:
                    await asyncio.sleep(0.01)
        finally:
            await poller.stop()

    asyncio.run(scenario())


def test_listing_the_repository_leaves_the_loop_free_and_metadata_never_lists_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RepositoryIndex listed the folder on the event loop (a slow volume stalled every request meanwhile), and
    every ModelMetadata call listed it to find one model's ready versions."""
    import threading

    from tidal.repository import layout

    models.write_config(tmp_path / "good", "max_batch_size: 4")
    models.scale(tmp_path / "good" / "1" / "model.onnx", 2.0)
    real, release, listing = layout.list_models, threading.Event(), threading.Event()

    def slow_disk(root: Path) -> list[str]:
        listing.set()
        release.wait(5.0)
        return real(root)

    async def scenario() -> None:
        manager = ModelManager(tmp_path)
        await manager.load("good")
        monkeypatch.setattr(layout, "list_models", slow_disk)
        try:
            assert manager.ready_versions("good") == ("1",) and not listing.is_set()
            index = asyncio.create_task(manager.index())
            while not listing.is_set():
                await asyncio.sleep(0.001)  # the loop turns while the listing waits on its disk
            assert not index.done()
            release.set()
            assert [row[:3] for row in await index] == [("good", "1", "READY")]
        finally:
            release.set()
            await manager.close()

    asyncio.run(scenario())
