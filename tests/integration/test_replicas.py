"""Three replicas on one host behind a round_robin client; SIGTERM one under load: nothing lost, the rest take over."""

from __future__ import annotations

import collections
import json
import re
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

import onnx_models as models
from live_server import ServerProcess, start_server
from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc

CALLERS = 8
# How a client of a fleet is set up (README, "Replicas"): spread calls over the replicas whose gRPC health is
# SERVING (a draining one turns NOT_SERVING at once and stops being picked), retry what was refused UNAVAILABLE.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
    "methodConfig": [{
        "name": [{"service": "inference.GRPCInferenceService"}],
        "retryPolicy": {
            "maxAttempts": 5, "initialBackoff": "0.01s", "maxBackoff": "0.2s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
}


@pytest.fixture
def replicas(tmp_path: Path):
    models.write_config(tmp_path / "scale", "max_batch_size: 8\ndynamic_batching { }\n")
    models.scale(tmp_path / "scale" / "1" / "model.onnx", 2.0)
    servers = [start_server(tmp_path, "--no-metrics", "--drain-delay-s", "0.5") for _ in range(3)]
    yield servers
    for server in servers:
        server.stop()


def _succeeded(stub: pb_grpc.GRPCInferenceServiceStub) -> int:
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="scale"), timeout=10)
    return sum(s.inference_stats.success.count for s in stats.model_stats)


def _request() -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="scale")
    msg.inputs.add(name="INPUT", datatype="FP32", shape=[1, 4])
    msg.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    return msg


def test_sigterm_one_replica_under_load_loses_nothing(replicas: list[ServerProcess]) -> None:
    target = "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in replicas)
    options = [("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1)]
    direct = [pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(s.url)) for s in replicas]
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()
    with grpc.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        msg = _request()

        def caller() -> None:
            while not stop.is_set():
                try:
                    stub.ModelInfer(msg, timeout=30)
                    result = "ok"
                except grpc.RpcError as exc:
                    result = f"{exc.code().name}: {exc.details()}"
                with lock:
                    outcomes[result] += 1

        threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
        for thread in threads:
            thread.start()
        try:
            # The load reaches every replica before one is stopped...
            assert any(all(_succeeded(d) >= 50 for d in direct) for _ in range(10_000))
            stopped, survivors = replicas[0], direct[1:]
            at_stop = [_succeeded(d) for d in survivors]
            assert stopped.stop() == 0
            # ...and the others go on answering all of it once it is gone.
            assert any(all(_succeeded(d) >= n + 200 for d, n in zip(survivors, at_stop, strict=True))
                       for _ in range(10_000))
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
    assert set(outcomes) == {"ok"}, outcomes  # refusals were retried on the others; no call failed
    served = re.search(r"model scale version 1: (\d+) requests succeeded, 0 failed", stopped.log())
    assert served is not None, stopped.log()
    # Every success the client saw ran exactly once somewhere: nothing lost, nothing run twice.
    assert int(served.group(1)) + sum(_succeeded(d) for d in survivors) == outcomes["ok"]
