"""Variants made by `tidal optimize` are served under one name and switched live without failing a request."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from live_server import ServerProcess, metric, scrape, start_server
from tidal.optimize.reference import synthetic_classification, train_classifier
from tidal.optimize.train import TrainConfig
from tidal.proto import control_pb2 as cpb
from tidal.proto import control_pb2_grpc as cpb_grpc

FAST = ["--max-batch-size", "8", "--profile-seconds", "0.01", "--no-progress", "--distill-epochs", "15"]


@pytest.fixture(scope="module")
def variant_server(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("variants")
    x, y = synthetic_classification(1600, 16, 4, seed=7, spread=1.5)
    model = train_classifier(x[:1000], y[:1000], (96, 64), TrainConfig(epochs=12, seed=7), "features", "scores")
    onnx.save(model, str(folder / "model.onnx"))
    np.savez(folder / "cal.npz", features=x[:1000])
    np.savez(folder / "val.npz", features=x[1000:], labels=y[1000:])
    repo = folder / "repo"
    cmd = [sys.executable, "-m", "tidal", "optimize", str(folder / "model.onnx"), "--repository", str(repo),
           "--name", "clf", "--calibration", str(folder / "cal.npz"), "--validation", str(folder / "val.npz"), *FAST]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    srv = start_server(repo)
    yield srv, x[1000:1064].astype(np.float32)
    assert srv.stop() == 0


def _infer(client: tc.InferenceServerClient, rows: np.ndarray) -> tuple[np.ndarray, str]:
    tensor = tc.InferInput("features", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    result = client.infer("clf", [tensor])
    return result.as_numpy("scores"), result.get_response().parameters["tidal_variant"].string_param


def _set_variant(srv: ServerProcess, variant: str) -> cpb.ModelStatus:
    stub = cpb_grpc.TidalControlStub(grpc.insecure_channel(srv.url))
    update = cpb.KnobsUpdate(active_variant=variant)
    return stub.SetKnobs(cpb.SetKnobsRequest(model="clf", knobs=update)).models[0]


def test_each_variant_answers_under_the_one_name(variant_server) -> None:
    srv, rows = variant_server
    client = tc.InferenceServerClient(srv.url)
    reference, variant = _infer(client, rows[:8])
    assert variant == "fp32"
    status = _set_variant(srv, "fp32")
    assert {"fp32", "int8", "pruned-50", "distilled"} <= set(status.variants)
    assert "fp16" not in status.variants  # GPU-only: never loaded on the CPU
    for name in ("int8", "int8-dynamic", "pruned-50", "distilled"):
        if name not in status.variants:
            continue
        assert _set_variant(srv, name).knobs.active_variant == name
        scores, answered = _infer(client, rows[:8])
        assert answered == name
        agreement = np.mean(scores.argmax(1) == reference.argmax(1))
        assert agreement >= 0.75, (name, agreement)
        assert metric(scrape(srv), "tidal_active_variant", model="clf", variant=name) == 1
    _set_variant(srv, "fp32")


def test_switching_under_load_fails_nothing(variant_server) -> None:
    srv, rows = variant_server
    failures: list[str] = []
    seen: set[str] = set()
    stop = threading.Event()

    def worker() -> None:
        client = tc.InferenceServerClient(srv.url)
        while not stop.is_set():
            try:
                seen.add(_infer(client, rows[:2])[1])
            except InferenceServerException as exc:
                failures.append(str(exc))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for name in ["int8", "distilled", "pruned-50", "fp32"] * 3:
            _set_variant(srv, name)
            threading.Event().wait(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    assert {"int8", "distilled", "fp32"} <= seen


def test_unknown_variant_is_refused(variant_server) -> None:
    srv, _ = variant_server
    with pytest.raises(grpc.RpcError) as err:
        _set_variant(srv, "fp64")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fp64" in err.value.details()


def test_the_serving_log_names_each_variants_backend_choice(variant_server) -> None:
    srv, _ = variant_server
    log = srv.log()
    assert re.search(r"variant int8: backend (int8|onnxruntime) is the fastest exact backend \(", log), log[-3000:]
    assert "variant pruned-50: backend onnxruntime: the only backend that runs it here" in log
