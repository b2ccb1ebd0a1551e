"""Operating tidal: /metrics moves exactly with traffic, health follows models, drain and poll lose nothing."""

from __future__ import annotations

import asyncio
import collections
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

import onnx_models as models
from live_server import ServerProcess, metric, scrape, start_server, tidal_command
from onnx_models import SIMPLE_CONFIG
from tidal.proto import control_pb2 as cpb
from tidal.proto import control_pb2_grpc as cpb_grpc
from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc


def _scale_input(value: float = 1.0) -> list[tc.InferInput]:
    tensor = tc.InferInput("INPUT", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.full((1, 4), value, np.float32))
    return [tensor]


def _health(server: ServerProcess, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.url))
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture
def small_repo(tmp_path: Path) -> Path:
    policy = "default_queue_policy { allow_timeout_override: true }"
    batching = f"dynamic_batching {{ max_queue_delay_microseconds: 200 {policy} }}"
    models.write_config(tmp_path / "scale", f"max_batch_size: 4\n{batching}\nslo {{ p99_ms: 1000 }}\n")
    models.scale(tmp_path / "scale" / "1" / "model.onnx", 2.0)
    models.write_config(tmp_path / "simple", SIMPLE_CONFIG)
    models.add_sub(tmp_path / "simple" / "1" / "model.onnx")
    return tmp_path


def test_metrics_count_exactly_and_match_statistics(small_repo: Path) -> None:
    srv = start_server(small_repo)
    try:
        client = tc.InferenceServerClient(srv.url)
        for _ in range(7):
            client.infer("scale", _scale_input())
        with pytest.raises(InferenceServerException):  # not a model error: never counted per model
            client.infer("scale", [tc.InferInput("WRONG", [1, 4], "FP32")])
        with pytest.raises(InferenceServerException) as err:  # expires in the queue: a REJECTED failure
            client.infer("scale", _scale_input(), timeout=1, client_timeout=5)
        assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        values = scrape(srv)
        labels = {"model": "scale", "version": "1"}
        assert metric(values, "nv_inference_request_success", **labels) == 7
        assert metric(values, "nv_inference_request_failure", **labels) == 1
        assert metric(values, "nv_inference_request_failure", reason="REJECTED", **labels) == 1
        assert metric(values, "nv_inference_count", **labels) == 7
        stats = client.get_inference_statistics("scale", "1").model_stats[0]
        assert stats.inference_stats.success.count == 7 and stats.inference_stats.fail.count == 1
        assert metric(values, "nv_inference_exec_count", **labels) == stats.execution_count
        queue_us = metric(values, "nv_inference_queue_duration_us", **labels)
        assert queue_us == pytest.approx(stats.inference_stats.queue.ns / 1e3, rel=1e-6)
        assert metric(values, "tidal_request_duration_seconds_count", **labels) == 7
        assert metric(values, "tidal_batch_size_count", **labels) == stats.execution_count
        assert metric(values, "tidal_slo_requests_total", **labels) == 8
        assert metric(values, "tidal_slo_met_total", **labels) == 7
        assert metric(values, "tidal_slo_attainment", **labels) == pytest.approx(7 / 8)
        assert metric(values, "tidal_slo_target_ms", **labels) == 1000
        assert metric(values, "tidal_knob", knob="max_batch_size", **labels) == 4
        assert metric(values, "nv_inference_pending_request_count", **labels) == 0
    finally:
        assert srv.stop() == 0


def test_health_follows_load_unload_and_drain(small_repo: Path) -> None:
    srv = start_server(small_repo)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        client = tc.InferenceServerClient(srv.url)
        assert _health(srv, "") == serving and _health(srv, "scale") == serving
        client.unload_model("scale")
        assert _health(srv, "scale") == not_serving and _health(srv, "") == serving
        client.load_model("scale")
        assert _health(srv, "scale") == serving
    finally:
        assert srv.stop() == 0


def test_poll_mode_swaps_versions_under_load_without_failures(small_repo: Path) -> None:
    srv = start_server(small_repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.3")
    failures: list[str] = []
    answers: set[float] = set()
    stop = threading.Event()

    def worker() -> None:
        client = tc.InferenceServerClient(srv.url)
        while not stop.is_set():
            try:
                answers.add(float(client.infer("scale", _scale_input()).as_numpy("OUTPUT")[0, 0]))
            except InferenceServerException as exc:
                failures.append(str(exc))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        staging = small_repo / ".staging"
        models.scale(staging / "model.onnx", 5.0)
        (small_repo / "scale" / "2").mkdir()
        shutil.move(staging / "model.onnx", small_repo / "scale" / "2" / "model.onnx")
        deadline = time.monotonic() + 20
        while 5.0 not in answers and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        code = srv.stop()
    assert answers == {2.0, 5.0}, answers
    assert failures == []
    assert code == 0


@pytest.mark.parametrize("mode", ["poll", "none"])
def test_load_rpcs_refused_outside_explicit_mode(small_repo: Path, mode: str) -> None:
    srv = start_server(small_repo, "--model-control-mode", mode)
    try:
        with pytest.raises(InferenceServerException) as err:
            tc.InferenceServerClient(srv.url).unload_model("scale")
        assert err.value.status() == "StatusCode.FAILED_PRECONDITION" and "explicit" in err.value.message()
    finally:
        assert srv.stop() == 0


def test_json_logs_carry_request_id_and_status(small_repo: Path) -> None:
    cmd = [sys.executable, "-m", "tidal", "--log-format", "json", "serve", "--model-repository", str(small_repo),
           "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    srv = ServerProcess(proc, 0)
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"serving gRPC on .*:(\d+)$", line.strip())
        if found:
            srv.port = int(found.group(1))
            break
    client = tc.InferenceServerClient(srv.url)
    with pytest.raises(InferenceServerException):
        client.infer("scale", [tc.InferInput("WRONG", [1, 4], "FP32")], request_id="req-42")
    assert srv.stop() == 0
    events = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    failed = [e for e in events if e.get("request_id") == "req-42"]
    assert len(failed) == 1 and failed[0]["status"] == "INVALID_ARGUMENT" and failed[0]["model"] == "scale"
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in events)


def test_control_rpc_reads_and_sets_knobs(small_repo: Path) -> None:
    srv = start_server(small_repo)
    try:
        stub = cpb_grpc.TidalControlStub(grpc.insecure_channel(srv.url))
        status = stub.Status(cpb.StatusRequest(model="simple")).models[0]
        assert status.knobs.max_batch_size == 8 and status.knobs.instance_count == 2
        update = cpb.KnobsUpdate(max_batch_size=2, instance_count=1, max_queue_delay_us=0)
        status = stub.SetKnobs(cpb.SetKnobsRequest(model="simple", knobs=update)).models[0]
        assert (status.knobs.max_batch_size, status.knobs.instance_count, status.knobs.max_queue_delay_us) == (2, 1, 0)
        with pytest.raises(grpc.RpcError) as err:
            stub.SetKnobs(cpb.SetKnobsRequest(model="simple", knobs=cpb.KnobsUpdate(max_batch_size=64)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "64" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Status(cpb.StatusRequest(model="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # The same from the command line: `tidal control knobs`
        done = tidal_command("control", "-u", srv.url, "knobs", "simple", "--max-batch-size", "4",
                             "--instances", "2", "--preferred-batch-sizes", "2,4")
        assert done.returncode == 0, done.stderr
        assert "max batch 4" in done.stdout and "preferred [2, 4]" in done.stdout and "instances 2" in done.stdout
        knobs = stub.Status(cpb.StatusRequest(model="simple")).models[0].knobs
        assert (knobs.max_batch_size, list(knobs.preferred_batch_sizes), knobs.instance_count) == (4, [2, 4], 2)
        cleared = tidal_command("control", "-u", srv.url, "knobs", "simple", "--preferred-batch-sizes", "")
        assert cleared.returncode == 0 and "preferred -" in cleared.stdout, cleared.stderr
        refused = tidal_command("control", "-u", srv.url, "knobs", "simple", "--max-batch-size", "64")
        assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr and "64" in refused.stderr
    finally:
        assert srv.stop() == 0


def test_strict_readiness_and_load_failure_metric(small_repo: Path) -> None:
    (small_repo / "broken" / "1").mkdir(parents=True)
    (small_repo / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    srv = start_server(small_repo, "--strict-readiness", "scale", "--strict-readiness", "broken")
    try:
        client = tc.InferenceServerClient(srv.url)
        assert client.is_server_live() and not client.is_server_ready()  # a required model failed to load
        assert client.is_model_ready("scale")  # the others serve anyway
        assert metric(scrape(srv), "tidal_model_load_failures_total", model="broken") == 1
        with pytest.raises(InferenceServerException):
            client.load_model("broken")
        assert metric(scrape(srv), "tidal_model_load_failures_total", model="broken") == 2
    finally:
        assert srv.stop() == 0


def test_draining_server_is_not_ready_and_not_serving(tmp_path: Path) -> None:
    """SIGTERM while a long request runs and others queue: refuse new work at once, finish the accepted."""
    models.write_config(tmp_path / "spin", "max_batch_size: 1\n")
    models.spin(tmp_path / "spin" / "1" / "model.onnx")
    srv = start_server(tmp_path, "--drain-grace-s", "60")
    client = tc.InferenceServerClient(srv.url)

    def request(trips: float) -> list[tc.InferInput]:
        tensor = tc.InferInput("INPUT", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.full((1, 1), trips, np.float32))
        return [tensor]

    started = time.monotonic()
    client.infer("spin", request(500))
    per_trip_s = (time.monotonic() - started) / 500
    long_trips = float(min(500_000, 2.0 / per_trip_s))  # a request of about 2 s
    results: list[str] = []
    client.async_infer("spin", request(long_trips), lambda result, error: results.append("error" if error else "ok"))
    for _ in range(5):
        client.async_infer("spin", request(1), lambda result, error: results.append("error" if error else "ok"))
    time.sleep(0.3)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:
        assert srv.proc.poll() is None, "drained too fast for the checks below"
        assert not client.is_server_ready()
        assert _health(srv, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(InferenceServerException) as err:
            client.infer("spin", request(1))
        assert err.value.status() == "StatusCode.UNAVAILABLE"
    finally:
        assert srv.proc.wait(120) == 0
    assert results.count("ok") == 6


def test_a_burst_beyond_grpc_pending_limit_is_all_answered(tmp_path: Path) -> None:
    """gRPC core alone would cancel calls past ~1,000 waiting for the application; tidal takes them all."""
    models.write_config(tmp_path / "mlp", "max_batch_size: 8\ndynamic_batching { }\n")
    models.mlp(tmp_path / "mlp" / "1" / "model.onnx", (256, 1024, 1024, 8))
    srv = start_server(tmp_path)
    msg = pb.ModelInferRequest(model_name="mlp")
    msg.inputs.add(name="INPUT", datatype="FP32", shape=[1, 256])
    msg.raw_input_contents.append(np.ones((1, 256), np.float32).tobytes())

    async def burst() -> list[str]:
        async with grpc.aio.insecure_channel(srv.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def one() -> str:
                try:
                    await stub.ModelInfer(msg, timeout=120)
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name

            return await asyncio.gather(*(one() for _ in range(3000)))

    try:
        outcomes = asyncio.run(burst())
    finally:
        assert srv.stop() == 0
    assert outcomes.count("OK") == 3000, collections.Counter(outcomes)


def test_a_port_in_use_is_a_clear_start_error(small_repo: Path) -> None:
    first = start_server(small_repo)
    try:
        cmd = [sys.executable, "-m", "tidal", "serve", "--model-repository", str(small_repo), "--grpc-address",
               "127.0.0.1", "--grpc-port", str(first.port), "--metrics-port", "0", "--http-port", "0"]
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        assert first.stop() == 0
    assert second.returncode == 1
    assert f"cannot bind gRPC to 127.0.0.1:{first.port}" in second.stderr and "Traceback" not in second.stderr
