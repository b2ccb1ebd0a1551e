"""The SLO controller in a real server: a deliberately slowed model whose load steps up and down over gRPC.

`slowed` has two variants with the same inputs and outputs: `accurate` runs
many iterations of a 512x512 MatMul per row (calibrated here to cost tens of
milliseconds a row on this machine, so its capacity is a few dozen requests
a second), `quick` runs a sixtieth of them. Their profiles in variants.json
are measured here, as `tidal optimize` would. The load goes low -> three
times `accurate`'s capacity -> low; the controller must move to `quick`
during the peak and back to `accurate` afterwards, and every request must
succeed unless it was shed by design.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as tc_aio
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

import onnx_models as models
from live_server import metric, scrape, start_server
from tidal.optimize.graph import save_graph
from tidal.proto import control_pb2 as cpb
from tidal.proto import control_pb2_grpc as cpb_grpc
from tidal.repository.variants import Accuracy, Hardware, LatencyProfile, Variant, VariantManifest, save_manifest

WIDTH = 512
ROW_MS = 30.0  # what one row of `accurate` should cost
QUICK_SHARE = 60  # `quick` runs this many times fewer iterations
SLO_ROWS = 100  # the SLO is this many rows of `accurate`: room for batches, and for a machine that slows down
SIZES = (1, 4, 8)
CONFIG = """
max_batch_size: 8
input [ {{ name: "INPUT" data_type: TYPE_FP32 dims: [ {width} ] }} ]
output [ {{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ {width} ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
dynamic_batching {{ }}
slo {{ p99_ms: {slo_ms:.0f} }}
controller {{ mode: FULL period_ms: 100 }}
"""
HARDWARE = Hardware("test", 1, ())


def iterated_model(path: Path, iterations: int) -> Path:
    """OUTPUT = `iterations` x (state = tanh(state @ W)) from INPUT: the cost grows with rows and iterations."""
    row = ["batch", WIDTH]
    body = models.tanh_matmul_body(row, WIDTH, seed=1)
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "INPUT"], ["OUTPUT"], body=body)],
        "iterated",
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, row)],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, row)],
        [numpy_helper.from_array(np.array(iterations, np.int64), "trips")],
    )
    return save_graph(graph, path)


def timed_ms(path: Path, rows: int, runs: int = 3) -> float:
    """Median time of one batch, with the server's threading."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((rows, WIDTH)).astype(np.float32)
    session.run(None, {"INPUT": x})
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, {"INPUT": x})
        times.append((time.perf_counter() - started) * 1e3)
    return float(np.median(times))


def profiled(name: str, file: Path, accuracy: float) -> Variant:
    p50 = tuple(timed_ms(file, rows) for rows in SIZES)
    profile = LatencyProfile(SIZES, p50, p50, tuple(1e3 * b / ms for b, ms in zip(SIZES, p50, strict=True)), 1, 1,
                             False, "now", HARDWARE)
    return Variant(name, file.name, "fp32", ("onnxruntime",), ("cpu",), file.stat().st_size, WIDTH * WIDTH, None,
                   Accuracy("top1_accuracy", accuracy, 100, accuracy, 0.0), {"onnxruntime": profile})


@pytest.fixture(scope="module")
def slowed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The repository and `accurate`'s capacity in requests (of one row) per second."""
    root = tmp_path_factory.mktemp("controller_repo")
    version = root / "slowed" / "1"
    probe = iterated_model(version / "probe.onnx", 20)
    iterations = int(np.clip(round(20 * ROW_MS / (timed_ms(probe, 4) / 4)), 20, 5000))
    probe.unlink()
    accurate = iterated_model(version / "accurate.onnx", iterations)
    quick = iterated_model(version / "quick.onnx", max(iterations // QUICK_SHARE, 1))
    iterated_model(version / "model.onnx", max(iterations // QUICK_SHARE, 1))
    variants = {"accurate": profiled("accurate", accurate, 0.99), "quick": profiled("quick", quick, 0.9)}
    save_manifest(version, VariantManifest("slowed", "accurate", HARDWARE, variants))
    row_ms = variants["accurate"].profiles["onnxruntime"].p50_ms[-1] / SIZES[-1]
    models.write_config(root / "slowed", CONFIG.format(width=WIDTH, slo_ms=SLO_ROWS * row_ms))
    return root, 1e3 / row_ms


async def _offer(url: str, phases: list[tuple[float, float]], outcomes: list[tuple[float, str, str]]) -> int:
    """Open loop: each phase is (requests per second, seconds); records (send time, outcome, detail)."""
    client = tc_aio.InferenceServerClient(url)
    row = np.random.default_rng(2).standard_normal((1, WIDTH)).astype(np.float32)

    async def one(at: float) -> None:
        tensor = tc_aio.InferInput("INPUT", [1, WIDTH], "FP32")
        tensor.set_data_from_numpy(row)
        try:
            result = await client.infer("slowed", [tensor])
            outcomes.append((at, "ok", result.get_response().parameters["tidal_variant"].string_param))
        except InferenceServerException as exc:
            outcomes.append((at, exc.status() or "", exc.message() or ""))

    tasks, start, at = [], time.monotonic(), 0.0
    for rate, seconds in phases:
        end = at + seconds
        while at < end:
            await asyncio.sleep(max(start + at - time.monotonic(), 0.0))
            tasks.append(asyncio.create_task(one(at)))
            at += 1.0 / rate
    await asyncio.gather(*tasks)
    await client.close()
    return len(tasks)


async def _watch(url: str, seen: list[tuple[float, str]], stop: asyncio.Event) -> None:
    async with grpc.aio.insecure_channel(url) as channel:
        stub, start = cpb_grpc.TidalControlStub(channel), time.monotonic()
        while not stop.is_set():
            status = (await stub.Status(cpb.StatusRequest(model="slowed"))).models[0]
            seen.append((time.monotonic() - start, status.knobs.active_variant))
            await asyncio.sleep(0.1)


async def _step_load(url: str, phases: list[tuple[float, float]]):
    outcomes: list[tuple[float, str, str]] = []
    seen: list[tuple[float, str]] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch(url, seen, stop))
    sent = await _offer(url, phases, outcomes)
    stop.set()
    await watcher
    return sent, outcomes, seen


@pytest.mark.slow
def test_load_steps_switch_the_variant_down_and_back_without_failing_requests(slowed) -> None:
    repository, capacity = slowed
    server = start_server(repository)
    try:
        low, high = 0.1 * capacity, 3.5 * capacity
        phases = [(low, 4.0), (high, 6.0), (low, 10.0)]
        sent, outcomes, seen = asyncio.run(_step_load(server.url, phases))
        channel = grpc.insecure_channel(server.url)
        status = cpb_grpc.TidalControlStub(channel).Status(cpb.StatusRequest(model="slowed")).models[0]
        channel.close()
    finally:
        assert server.stop() == 0
    context = f"capacity {capacity:.0f} rps; decisions:\n" + "\n".join(
        line for line in server.lines if "tidal.control" in line
    ) + f"\nlast: observed p99 {status.observed_p99_ms:.0f} ms, predicted {status.predicted_p99_ms:.0f} ms"
    peak = [variant for t, variant in seen if 5.5 <= t <= 10.0]
    assert "quick" in peak, context
    assert seen[-1][1] == "accurate", context
    reasons = [d.reason for d in status.decisions]
    assert any(r.startswith("down_") for r in reasons) and "up" in reasons, context
    failed = [(status_code, detail) for _, status_code, detail in outcomes if status_code != "ok"]
    assert all(code == "StatusCode.RESOURCE_EXHAUSTED" and "shed" in detail for code, detail in failed), failed[:5]
    served = {detail for _, code, detail in outcomes if code == "ok"}
    assert served == {"accurate", "quick"}
    assert len(outcomes) == sent


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tidal", "control", *args], capture_output=True, text=True,
                          timeout=60)


def test_control_cli_and_rpc_set_and_show_the_slo_live(slowed) -> None:
    repository, _ = slowed
    server = start_server(repository)
    try:
        shown = _cli("-u", server.url, "status", "slowed")
        assert shown.returncode == 0, shown.stderr
        assert "slowed:1  controller full" in shown.stdout and "variant accurate" in shown.stdout
        changed = _cli("-u", server.url, "set", "slowed", "--p99-ms", "123", "--mode", "batch", "--period-ms", "50")
        assert changed.returncode == 0, changed.stderr
        assert "controller batch  SLO p99 123 ms  period 50 ms" in changed.stdout
        refused = _cli("-u", server.url, "set", "slowed", "--priority-p99-ms", "2=10")
        assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr and "outside 1..1" in refused.stderr
        missing = _cli("-u", server.url, "set", "nothing", "--p99-ms", "5")
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
        stub = cpb_grpc.TidalControlStub(grpc.insecure_channel(server.url))
        with pytest.raises(grpc.RpcError) as bad:
            stub.SetSlo(cpb.SetSloRequest(model="slowed", mode="sideways"))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        off = stub.SetSlo(cpb.SetSloRequest(model="slowed", mode="off")).models[0]
        assert off.controller_mode == "off" and off.slo_p99_ms == 123
        metrics = scrape(server)
        assert metric(metrics, "tidal_slo_target_ms", model="slowed", version="1") == 123
        assert metric(metrics, "tidal_controller_decisions_total", model="slowed", version="1", reason="hold") > 0
    finally:
        assert server.stop() == 0
