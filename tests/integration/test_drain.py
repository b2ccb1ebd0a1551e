"""Stopping under load loses nothing: SIGTERM -> not ready -> drain delay -> refuse UNAVAILABLE -> exit 0."""

from __future__ import annotations

import collections
import re
import signal
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

import onnx_models as models
from live_server import FRONTENDS, ServerProcess, frontend_flags, start_server

CALLERS = 32


@pytest.fixture
def mlp_repo(tmp_path: Path) -> Path:
    models.write_config(tmp_path / "mlp", "max_batch_size: 8\ndynamic_batching { }\n")
    models.mlp(tmp_path / "mlp" / "1" / "model.onnx", (64, 256, 8))
    return tmp_path


def _health(url: str, service: str) -> int:
    with grpc.insecure_channel(url) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status


class ClosedLoop:
    """CALLERS threads, each sending its next request as soon as the previous one is answered, until stopped.

    `ok_after_unready` counts successes that started after the server was seen not ready (the drain delay)."""

    def __init__(self, server: ServerProcess) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.ok_after_unready = 0
        self.unready = threading.Event()
        self.first_answers = threading.Barrier(CALLERS + 1)
        self._server = server
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._caller) for _ in range(CALLERS)]

    def __enter__(self) -> ClosedLoop:
        for thread in self._threads:
            thread.start()
        self.first_answers.wait(60)  # every caller has had an answer: the load is on
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _caller(self) -> None:
        client = tc.InferenceServerClient(self._server.url)
        data = tc.InferInput("INPUT", [1, 64], "FP32")
        data.set_data_from_numpy(np.ones((1, 64), np.float32))
        first = True
        while not self._stop.is_set():
            unready = self.unready.is_set()
            try:
                client.infer("mlp", [data], client_timeout=30)
                result = "ok"
            except InferenceServerException as exc:
                result = exc.status() or exc.message()
            with self._lock:
                self.outcomes[result] += 1
                self.ok_after_unready += result == "ok" and unready
            if first:
                first = False
                self.first_answers.wait(60)


def _served(server: ServerProcess) -> int:
    found = re.search(r"model mlp version 1: (\d+) requests succeeded, (\d+) failed", server.log())
    assert found is not None, server.log()
    assert int(found.group(2)) == 0
    return int(found.group(1))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_sigterm_under_load_answers_every_accepted_request_and_cancels_none(mlp_repo: Path, frontend: str) -> None:
    srv = start_server(mlp_repo, "--drain-delay-s", "1", "--drain-grace-s", "30", *frontend_flags(frontend))
    client = tc.InferenceServerClient(srv.url)
    with ClosedLoop(srv) as load:
        srv.proc.send_signal(signal.SIGTERM)
        # Readiness goes at once; liveness stays; requests keep being served through the delay.
        assert any(not client.is_server_ready() for _ in range(10_000)), "still ready after SIGTERM"
        load.unready.set()
        assert _health(srv.url, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(srv.url, "liveness") == health_pb2.HealthCheckResponse.SERVING
        code = srv.proc.wait(60)
    assert code == 0, srv.log()
    failures = {status: n for status, n in load.outcomes.items() if status != "ok"}
    assert set(failures) <= {"StatusCode.UNAVAILABLE"}, load.outcomes  # not one CANCELLED
    assert load.ok_after_unready > 0, load.outcomes
    # Not one lost: every request the server counted as answered reached its caller as an answer.
    assert _served(srv) == load.outcomes["ok"]


def test_sigterm_logs_the_drain_sequence(mlp_repo: Path) -> None:
    srv = start_server(mlp_repo, "--drain-delay-s", "0.2")
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(60) == 0
    log = srv.log()
    assert "not ready; serving 0.2s more" in log and "stopped" in log, log
