"""Overload at the edge, live: excess is refused at once with RESOURCE_EXHAUSTED and a pushback hint, lowest
priority first, whichever layer refuses (the edge gate or the scheduler's queue), and the edge shows up in the
control status and in /metrics."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as tc_aio
from tritonclient.utils import InferenceServerException

from live_server import FRONTENDS, ServerProcess, frontend_flags, metric, scrape, start_server
from onnx_models import spin, write_config
from tidal.app import DEFAULT_MAX_PENDING_RPCS
from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc
from tidal.transport.control import control_status

CONFIG = """
max_batch_size: 1
dynamic_batching { priority_levels: 2 default_priority_level: 2 }
slo { p99_ms: 100 }
controller { mode: BATCH period_ms: 50 }
"""
BOUNDED_CONFIG = """
max_batch_size: 1
dynamic_batching { default_queue_policy { max_queue_size: 1 } }
"""
TRIPS = 16.0  # tanh(x @ W) iterations per request: some ms each, so a few hundred requests/s overload it
GATE = "in-flight limit"  # in the edge gate's refusals; the queue's say "full" or "queued requests"


@pytest.fixture(scope="module", params=FRONTENDS)
def overloadable(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("overload")
    for name, config in (("spin", CONFIG), ("bounded", BOUNDED_CONFIG)):
        write_config(root / name, config)
        spin(root / name / "1" / "model.onnx")
    # gRPC's own ceiling on the calls core holds until the event loop takes them, not the backlog sized from the
    # SLO: these tests are about tidal's refusals, and the calls core drops when a busy host stalls the loop
    # (CANCELLED, whatever their priority) never reach them. tests/unit/test_pending_backlog.py sizes the backlog.
    server = start_server(root, "--max-pending-rpcs", str(DEFAULT_MAX_PENDING_RPCS), *frontend_flags(request.param))
    yield server
    assert server.stop() == 0, server.log()


def _request(priority: int) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="spin")
    msg.parameters["priority"].uint64_param = priority
    msg.inputs.add(name="INPUT", datatype="FP32", shape=[1, 1])
    msg.raw_input_contents.append(np.full((1, 1), TRIPS, np.float32).tobytes())
    return msg


async def _call(stub: pb_grpc.GRPCInferenceServiceStub, msg: pb.ModelInferRequest, tally: collections.Counter) -> None:
    try:
        await stub.ModelInfer(msg, timeout=2.0)
        tally["OK"] += 1
    except grpc.aio.AioRpcError as err:
        tally[err.code().name] += 1
        tally["gate"] += GATE in (err.details() or "")
        tally["with pushback"] += "grpc-retry-pushback-ms" in dict(err.trailing_metadata() or ())


async def _capacity(url: str, seconds: float, callers: int = 4) -> float:
    """Requests per second a few callers get back to back: the backend's rate (one instance, one request per
    batch, always busy), without the round trip a single caller would wait out between requests."""
    tally: collections.Counter = collections.Counter()
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        loop = asyncio.get_running_loop()
        stop = loop.time() + seconds

        async def caller() -> None:
            while loop.time() < stop:
                await _call(stub, _request(1), tally)

        await asyncio.gather(*[caller() for _ in range(callers)])
    return tally["OK"] / seconds


async def _open_loop(url: str, seconds: float, rates: dict[int, float]) -> dict[int, collections.Counter]:
    """Requests sent on a fixed schedule per priority, whatever the answers: arrivals do not wait for the server."""
    outcomes: dict[int, collections.Counter] = {p: collections.Counter() for p in rates}
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        loop = asyncio.get_running_loop()
        start, calls = loop.time(), []

        async def sender(priority: int, rate: float) -> None:
            msg = _request(priority)
            for i in range(int(seconds * rate)):
                await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
                calls.append(asyncio.create_task(_call(stub, msg, outcomes[priority])))

        await asyncio.gather(*[sender(p, r) for p, r in rates.items()])
        await asyncio.gather(*calls)
    return outcomes


def _sent(tally: collections.Counter) -> int:
    return sum(n for outcome, n in tally.items() if outcome not in ("gate", "with pushback"))


def test_excess_is_refused_at_once_lowest_priority_first(overloadable: ServerProcess) -> None:
    """Priority 1 at 0.3x the backend's capacity, priority 2 at 2.7x: priority 2 is refused at arrival."""
    capacity = asyncio.run(_capacity(overloadable.url, 2.0))  # also lets the controller learn the batch time
    outcomes = asyncio.run(_open_loop(overloadable.url, 5.0, {1: 0.3 * capacity, 2: 2.7 * capacity}))
    high, low = outcomes[1], outcomes[2]
    assert high["OK"] >= 0.8 * _sent(high) and high["OK"] / _sent(high) >= 3 * low["OK"] / _sent(low), outcomes
    assert low["RESOURCE_EXHAUSTED"] >= 0.5 * _sent(low), outcomes  # the excess is refused at arrival...
    assert low["DEADLINE_EXCEEDED"] <= 0.01 * low["RESOURCE_EXHAUSTED"], outcomes  # ...not left to time out
    assert all(t["with pushback"] == t["RESOURCE_EXHAUSTED"] for t in outcomes.values()), outcomes  # every one
    edge = control_status(overloadable.url, "spin")[0].edge
    assert edge.refused[2] >= low["gate"] and edge.inflight_limit > 0  # the gate's refusals are counted
    metrics = scrape(overloadable)
    total = sum(_sent(tally) for tally in outcomes.values())
    assert metric(metrics, "tidal_edge_received_total", model="spin") >= total
    assert 'tidal_saturation{model=""}' in metrics and "tidal_edge_loop_lag_seconds" in metrics


async def _http_burst(url: str, model: str, count: int) -> collections.Counter:
    import aiohttp

    body = {"parameters": {"priority": 2},
            "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [TRIPS]}]}
    tally: collections.Counter = collections.Counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=count)) as session:

        async def one() -> None:
            async with session.post(f"http://{url}/v2/models/{model}/infer", json=body) as response:
                tally[response.status] += 1
                if response.status == 429:
                    tally["gate"] += GATE in (await response.json())["error"]
                    seconds, ms = response.headers.get("Retry-After"), response.headers.get("Retry-After-Ms")
                    tally["retry-after"] += bool(seconds and ms and int(seconds) >= 1 and int(ms) >= 1)

        await asyncio.gather(*[one() for _ in range(count)])
    return tally


def test_http_overload_is_429_with_retry_after_whoever_refuses(overloadable: ServerProcess) -> None:
    """The edge gate and the scheduler's queue (shedding for the SLO) both refuse here, and under load either
    may be first: every refusal says when to come back."""
    asyncio.run(_capacity(overloadable.url, 2.0))  # the controller learns the batch time and limits the gate
    tally = asyncio.run(_http_burst(overloadable.http_url, "spin", 300))
    assert tally[429] + tally[200] == 300 and tally[429] > 0, tally  # nothing else: no 5xx, nothing lost
    assert tally["retry-after"] == tally[429], tally


async def _grpc_burst(url: str, model: str, count: int) -> collections.Counter:
    """`count` calls at once through tritonclient, whose exception is raised while handling gRPC's error: that
    error, with the trailers, is its context."""
    tally: collections.Counter = collections.Counter()
    async with tc_aio.InferenceServerClient(url) as client:

        async def one() -> None:
            tensor = tc_aio.InferInput("INPUT", [1, 1], "FP32")
            tensor.set_data_from_numpy(np.full((1, 1), TRIPS, np.float32))
            try:
                await client.infer(model, [tensor], client_timeout=10.0)
                tally["OK"] += 1
            except InferenceServerException as exc:
                tally[exc.status()] += 1
                assert isinstance(exc.__context__, grpc.aio.AioRpcError), exc
                trailers = dict(exc.__context__.trailing_metadata() or ())
                tally["full"] += "is full" in (exc.message() or "")
                tally["pushback"] += int(trailers.get("grpc-retry-pushback-ms", "0")) >= 1

        await asyncio.gather(*[one() for _ in range(count)])
    return tally


def test_a_full_queue_pushes_back_on_both_protocols(overloadable: ServerProcess) -> None:
    """No SLO, so no gate: the queue (one place) refuses, with the same pushback as a gRPC trailer and as
    Retry-After."""
    for _ in range(5):  # one burst nearly always overfills the queue; a busy host may need another
        tally = asyncio.run(_grpc_burst(overloadable.url, "bounded", 16))
        if tally["full"]:
            break
    refused = tally["StatusCode.RESOURCE_EXHAUSTED"]
    assert tally["OK"] + refused == 16 and refused == tally["full"] > 0, tally
    assert tally["pushback"] == refused, tally
    for _ in range(5):
        tally = asyncio.run(_http_burst(overloadable.http_url, "bounded", 16))
        if tally[429]:
            break
    assert tally[200] + tally[429] == 16 and tally[429] > 0 and tally["gate"] == 0, tally
    assert tally["retry-after"] == tally[429], tally
