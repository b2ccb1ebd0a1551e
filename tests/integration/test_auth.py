"""Bearer tokens: `infer` tokens read and infer, `admin` tokens also change the server; probes need none."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from live_server import FRONTENDS, ServerProcess, frontend_flags, start_server, tidal_command
from onnx_models import SIMPLE_CONFIG, add_sub, write_config
from tidal.proto import control_pb2 as cpb
from tidal.proto import control_pb2_grpc as cpb_grpc
from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc

INFER = {"authorization": "Bearer reader-5f2c9a"}
ADMIN = {"authorization": "Bearer admin-81d0e4"}


@pytest.fixture(scope="module", params=FRONTENDS)
def frontend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory, frontend: str) -> Path:
    """A file per front end: a test rotates the tokens in it."""
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text("# scope token\ninfer reader-5f2c9a\n\nadmin admin-81d0e4\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, tokens: Path, frontend: str) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("auth-repo")
    write_config(root / "simple", SIMPLE_CONFIG)
    add_sub(root / "simple" / "1" / "model.onnx")
    server = start_server(root, "--no-metrics", "--auth-tokens", str(tokens), *frontend_flags(frontend))
    yield server
    assert server.stop() == 0, server.log()


def _inputs() -> list[tc.InferInput]:
    inputs = [tc.InferInput("INPUT0", [1, 16], "FP32"), tc.InferInput("INPUT1", [1, 16], "FP32")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
    return inputs


def _status(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as err:
        call()
    return str(err.value.status()), err.value.message()


def test_probes_need_no_token(srv: ServerProcess) -> None:
    client = tc.InferenceServerClient(srv.url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("simple")
    with grpc.insecure_channel(srv.url) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("headers", "message"),
    [({}, "missing bearer token"), ({"authorization": "Bearer nope"}, "invalid bearer token"),
     ({"authorization": "Basic cmVhZGVy"}, "missing bearer token")],
)
def test_inference_without_a_valid_token_is_unauthenticated(srv: ServerProcess, headers: dict, message: str) -> None:
    client = tc.InferenceServerClient(srv.url)
    status, text = _status(lambda: client.infer("simple", _inputs(), headers=headers))
    assert status == "StatusCode.UNAUTHENTICATED" and message in text
    status, _ = _status(lambda: client.get_model_metadata("simple", headers=headers))
    assert status == "StatusCode.UNAUTHENTICATED"


def test_an_infer_token_infers_and_reads_but_cannot_change_the_server(srv: ServerProcess) -> None:
    client = tc.InferenceServerClient(srv.url)
    result = client.infer("simple", _inputs(), headers=INFER)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 2, np.float32))
    assert client.get_model_repository_index(headers=INFER).models
    for change in (client.load_model, client.unload_model):
        status, text = _status(lambda change=change: change("simple", headers=INFER))
        assert status == "StatusCode.PERMISSION_DENIED" and "needs an 'admin' token" in text
    with grpc.insecure_channel(srv.url) as channel:
        control = cpb_grpc.TidalControlStub(channel)
        assert control.Status(cpb.StatusRequest(), metadata=tuple(INFER.items()), timeout=10).models
        with pytest.raises(grpc.RpcError) as err:
            control.SetSlo(cpb.SetSloRequest(model="simple"), metadata=tuple(INFER.items()), timeout=10)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert client.is_model_ready("simple")


def test_an_admin_token_loads_models(srv: ServerProcess) -> None:
    client = tc.InferenceServerClient(srv.url)
    client.load_model("simple", headers=ADMIN)
    assert client.infer("simple", _inputs(), headers=ADMIN).as_numpy("OUTPUT0").shape == (1, 16)


def test_a_stream_without_a_token_ends_unauthenticated(srv: ServerProcess) -> None:
    msg = pb.ModelInferRequest(model_name="simple")
    with grpc.insecure_channel(srv.url) as channel:
        stream = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([msg]), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_http_takes_the_same_tokens_and_scopes(srv: ServerProcess) -> None:
    """Before the reload test below, which rotates the infer token. tritonclient.http adds its own headers to
    the dict it is given, so each call gets a copy."""
    import tritonclient.http as tc_http

    client = tc_http.InferenceServerClient(srv.http_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("simple")  # open
    inputs = [tc_http.InferInput(f"INPUT{i}", [1, 16], "FP32") for i in (0, 1)]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
    assert _status(lambda: client.infer("simple", inputs))[0] == "401"
    assert _status(lambda: client.infer("simple", inputs, headers={"authorization": "Bearer nope"}))[0] == "401"
    assert _status(lambda: client.get_model_metadata("simple"))[0] == "401"
    result = client.infer("simple", inputs, headers=dict(INFER))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 2, np.float32))
    status, message = _status(lambda: client.unload_model("simple", headers=dict(INFER)))
    assert status == "403" and "admin" in message
    client.load_model("simple", headers=dict(ADMIN))  # already loaded: reloaded, allowed for an admin token


def test_the_token_file_is_reloaded_when_it_changes(srv: ServerProcess, tokens: Path) -> None:
    client = tc.InferenceServerClient(srv.url)
    fresh = {"authorization": "Bearer rotated-0c77"}
    replacement = tokens.with_name("tokens.new")
    replacement.write_text("infer rotated-0c77\nadmin admin-81d0e4\n")
    replacement.chmod(0o600)
    os.replace(replacement, tokens)
    deadline = time.monotonic() + 30
    while True:  # reloads are looked for once a second
        try:
            client.infer("simple", _inputs(), headers=fresh)
            break
        except InferenceServerException as exc:
            assert exc.status() == "StatusCode.UNAUTHENTICATED" and time.monotonic() < deadline
            time.sleep(0.2)
    status, _ = _status(lambda: client.infer("simple", _inputs(), headers=INFER))  # the old token is gone
    assert status == "StatusCode.UNAUTHENTICATED"


def test_a_bad_token_file_stops_start_up(tmp_path: Path) -> None:
    bad = tmp_path / "tokens"
    bad.write_text("reader 1234\n")
    (tmp_path / "m").mkdir()
    with pytest.raises(RuntimeError, match="tidal exited with 2") as err:
        start_server(tmp_path, "--no-metrics", "--auth-tokens", str(bad))
    assert "expected 'infer TOKEN' or 'admin TOKEN'" in str(err.value)



def _reader(tokens: Path, folder: Path) -> Path:
    """A client's token file holding the infer token in force (another test rotates it)."""
    reader = folder / "reader"
    reader.write_text(next(line.split()[1] for line in tokens.read_text().splitlines() if line.startswith("infer ")))
    return reader


def test_tidal_control_sends_the_token_it_is_given(srv: ServerProcess, tokens: Path, tmp_path: Path) -> None:
    reader = _reader(tokens, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TIDAL_TOKEN"}
    none = tidal_command("control", "-u", srv.url, "status", env=env)
    assert none.returncode == 1 and "UNAUTHENTICATED" in none.stderr
    status = tidal_command("control", "-u", srv.url, "--token-file", str(reader), "status", env=env)
    assert status.returncode == 0 and "simple:1" in status.stdout, status.stderr
    denied = tidal_command("control", "-u", srv.url, "--token-file", str(reader), "set", "simple", "--mode", "off",
                           env=env)
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    changed = tidal_command("control", "-u", srv.url, "set", "simple", "--mode", "off",
                            env={**env, "TIDAL_TOKEN": "admin-81d0e4"})
    assert changed.returncode == 0, changed.stderr


def test_tidal_bench_sends_the_token_it_is_given(srv: ServerProcess, tokens: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = tidal_command("bench", "-u", srv.url, "-m", "simple", "--concurrency", "2", "--duration-s", "1",
                         "--no-progress", "--token-file", str(_reader(tokens, tmp_path)), "-o", str(out))
    assert done.returncode == 0, done.stderr
    measured = json.loads(out.with_suffix(".json").read_text())["points"][0]["measurement"]["all"]
    assert measured["ok"] > 0 and not measured["errors"]
