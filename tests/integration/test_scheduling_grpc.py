"""Scheduler behaviour seen from a tritonclient over gRPC: priorities, request timeouts, gRPC deadlines,
cancellation, bounded queues, and live knob changes under load.

The `spin` model makes execution time a request's choice: its input value is the number of 256x256
MatMul iterations it runs. A long request holds the single instance busy (the blocker) while the
test queues others; TidalControl.Status shows the queue, so the tests wait on state, never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

import onnx_models as models
from live_server import ServerProcess, start_server
from tidal.proto import control_pb2 as cpb
from tidal.proto import control_pb2_grpc as cpb_grpc
from tidal.repository.variants import Variant, VariantManifest, save_manifest

SPIN_SIZE = 256
BLOCK_S = 3.0  # how long the blocker holds the instance: ample time to queue the rest
WORK = 20  # iterations of each queued request: finishing times a few ms apart keep the order visible

SPIN_CONFIG = """
max_batch_size: {max_batch_size}
input [ {{ name: "INPUT" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [ {{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
dynamic_batching {{ {batching} }}
"""
SPIN_MODELS = {
    "spin_priority": (1, "priority_levels: 2 default_priority_level: 2"),
    "spin_bounded": (1, "default_queue_policy { max_queue_size: 2 }"),
    "spin_timeout": (4, "default_queue_policy { timeout_action: REJECT allow_timeout_override: true }"),
    "spin_deadline": (4, ""),
    "spin_cancel": (4, ""),
}
LIVE_CONFIG = """
max_batch_size: 8
instance_group [ { count: 2 kind: KIND_CPU } ]
dynamic_batching { max_queue_delay_microseconds: 500 }
"""


def _variant(name: str) -> Variant:
    return Variant(name, f"{name}.onnx", "fp32", ("onnxruntime",), ("cpu",), 0, 4, None, None)


def build_repository(root: Path) -> Path:
    for name, (max_batch_size, batching) in SPIN_MODELS.items():
        models.write_config(root / name, SPIN_CONFIG.format(max_batch_size=max_batch_size, batching=batching))
        models.spin(root / name / "1" / "model.onnx", SPIN_SIZE)
    # Two equivalent variants (OUTPUT = 2 * INPUT); the response names the one that answered.
    version = root / "live" / "1"
    models.write_config(root / "live", LIVE_CONFIG)
    for file in ("model", "fp32", "alt"):
        models.scale(version / f"{file}.onnx", 2.0)
    save_manifest(version, VariantManifest("live", "fp32", None, {"fp32": _variant("fp32"), "alt": _variant("alt")}))
    return root


@pytest.fixture(scope="module")
def sched_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("sched_repo"))


@pytest.fixture(scope="module")
def server(sched_repo: Path) -> Iterator[ServerProcess]:
    srv = start_server(sched_repo)
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def blocker(sched_repo: Path) -> int:
    """Iterations that hold one instance for about BLOCK_S on this machine, with the server's thread setting."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(sched_repo / "spin_cancel" / "1" / "model.onnx"), options)
    probe = np.full((1, 1), 50, np.float32)
    best_s = math.inf
    for _ in range(3):
        start = time.perf_counter()
        session.run(None, {"INPUT": probe})
        best_s = min(best_s, time.perf_counter() - start)
    return max(100, round(BLOCK_S * 50 / best_s))


def spin(iterations: int) -> list[tc.InferInput]:
    tensor = tc.InferInput("INPUT", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1), iterations, np.float32))
    return [tensor]


def queued(status: cpb.ModelStatus) -> int:
    return sum(status.queue_depth.values())


class Probe:
    """The server's scheduler state through TidalControl.Status and ModelStatistics."""

    def __init__(self, url: str) -> None:
        self.channel = grpc.aio.insecure_channel(url)
        self.control = cpb_grpc.TidalControlStub(self.channel)
        self.client = tc_aio.InferenceServerClient(url)

    async def status(self, model: str) -> cpb.ModelStatus:
        return (await self.control.Status(cpb.StatusRequest(model=model))).models[0]

    async def until(
        self, model: str, predicate: Callable[[cpb.ModelStatus], bool], what: str, timeout_s: float = 30.0
    ) -> cpb.ModelStatus:
        deadline = time.monotonic() + timeout_s
        while not predicate(status := await self.status(model)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{model}: waited {timeout_s}s for {what}; status now: {status}")
            await asyncio.sleep(0.005)
        return status

    async def stats(self, model: str):
        return (await self.client.get_inference_statistics(model)).model_stats[0]

    async def start_blocker(self, client: tc_aio.InferenceServerClient, model: str, iterations: int) -> asyncio.Task:
        task = asyncio.create_task(client.infer(model, spin(iterations)))
        await self.until(model, lambda s: s.pending == 1 and not queued(s), "the blocker to run")
        return task

    async def enqueue(self, model: str, call: Coroutine[Any, Any, Any], depth: int) -> asyncio.Task:
        """Start `call` and wait until the queue holds `depth` requests: arrival order is then certain."""
        task = asyncio.create_task(call)
        await self.until(model, lambda s: queued(s) == depth, f"{depth} queued requests")
        return task


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[tuple[Probe, tc_aio.InferenceServerClient]]:
    probe, client = Probe(url), tc_aio.InferenceServerClient(url)
    try:
        yield probe, client
    finally:
        await client.close()
        await probe.client.close()
        await probe.channel.close()


def failures(server: ServerProcess, model: str) -> dict[str, float]:
    """Failed requests of `model` by reason, from /metrics (ModelStatistics has only the total)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "nv_inference_request_failure" and sample.labels["model"] == model and sample.value
    }


def batch_sizes(stats) -> dict[int, int]:
    """Executions per batch size, from ModelStatistics."""
    return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}


async def expect_error(call: Awaitable[Any], status: str, fragment: str = "") -> None:
    with pytest.raises(InferenceServerException) as err:
        await call
    assert err.value.status() == status, err.value
    assert fragment in (err.value.message() or ""), err.value.message()


def test_high_priority_requests_overtake_earlier_low_priority_ones(server: ServerProcess, blocker: int) -> None:
    model, order = "spin_priority", []

    async def main() -> None:
        async with connected(server.url) as (probe, client):

            async def call(tag: str, priority: int) -> None:
                await client.infer(model, spin(WORK), priority=priority)
                order.append(tag)

            block = await probe.start_blocker(client, model, blocker)
            tasks = [await probe.enqueue(model, call(f"low{i}", 2), i + 1) for i in range(3)]
            tasks += [await probe.enqueue(model, call(f"high{i}", 1), i + 4) for i in range(3)]
            status = await probe.status(model)
            assert dict(status.queue_depth) == {1: 3, 2: 3} and not block.done()
            await asyncio.gather(block, *tasks)

    asyncio.run(main())
    assert order == ["high0", "high1", "high2", "low0", "low1", "low2"]


def test_full_queue_answers_resource_exhausted_at_once(server: ServerProcess, blocker: int) -> None:
    model = "spin_bounded"  # max_queue_size: 2

    async def main() -> None:
        async with connected(server.url) as (probe, client):
            block = await probe.start_blocker(client, model, blocker)
            waiting = [await probe.enqueue(model, client.infer(model, spin(WORK)), depth) for depth in (1, 2)]
            await expect_error(client.infer(model, spin(WORK)), "StatusCode.RESOURCE_EXHAUSTED", "full")
            status = await probe.status(model)
            assert queued(status) == 2 and status.pending == 3 and not block.done()  # refused while the instance ran
            await asyncio.gather(block, *waiting)
            stats = await probe.stats(model)
            assert (stats.inference_stats.success.count, stats.inference_stats.fail.count) == (3, 1)
            assert stats.execution_count == 3

    asyncio.run(main())


async def _expires_in_queue(server: ServerProcess, model: str, blocker: int, **doomed_kwargs: Any) -> None:
    """Blocker runs, a patient request queues, then one that must expire; the patient then runs alone.

    max_batch_size is 4, so had the expired request stayed queued it would have shared the patient's batch.
    """
    async with connected(server.url) as (probe, client):
        block = await probe.start_blocker(client, model, blocker)
        patient = await probe.enqueue(model, client.infer(model, spin(WORK)), 1)
        doomed = await probe.enqueue(model, client.infer(model, spin(WORK), **doomed_kwargs), 2)
        await expect_error(doomed, "StatusCode.DEADLINE_EXCEEDED")
        await probe.until(model, lambda s: queued(s) == 1, "the expired request to leave the queue")
        assert not block.done(), "the request must expire while queued, with the instance still busy"
        await asyncio.gather(block, patient)
        stats = await probe.stats(model)
        assert (stats.inference_stats.success.count, stats.inference_stats.fail.count) == (2, 1)
        assert stats.inference_count == 2 and batch_sizes(stats) == {1: 2}


def test_timeout_parameter_expires_a_queued_request(server: ServerProcess, blocker: int) -> None:
    asyncio.run(_expires_in_queue(server, "spin_timeout", blocker, timeout=500_000))
    assert failures(server, "spin_timeout") == {"REJECTED": 1}


def test_grpc_deadline_expires_a_queued_request(server: ServerProcess, blocker: int) -> None:
    asyncio.run(_expires_in_queue(server, "spin_deadline", blocker, client_timeout=0.5))


def test_cancelled_request_leaves_the_queue_and_never_runs(server: ServerProcess, blocker: int) -> None:
    model = "spin_cancel"

    async def main() -> None:
        async with connected(server.url) as (probe, client):
            block = await probe.start_blocker(client, model, blocker)
            patient = await probe.enqueue(model, client.infer(model, spin(WORK)), 1)
            # Ten blockers long: if it ever ran, the execution counts below would show it.
            victim = await probe.enqueue(model, client.infer(model, spin(10 * blocker)), 2)
            victim.cancel()
            with pytest.raises(asyncio.CancelledError):
                await victim
            await probe.until(model, lambda s: queued(s) == 1 and s.pending == 2, "the cancelled request to leave")
            assert not block.done()
            await asyncio.gather(block, patient)
            stats = await probe.stats(model)
            assert (stats.inference_stats.success.count, stats.inference_stats.fail.count) == (2, 1)
            assert stats.inference_count == 2 and batch_sizes(stats) == {1: 2}
            assert (await probe.status(model)).pending == 0

    asyncio.run(main())
    assert failures(server, model) == {"CANCELED": 1}


KNOB_CHANGES = [
    cpb.KnobsUpdate(max_batch_size=1),
    cpb.KnobsUpdate(max_batch_size=8, max_queue_delay_us=2000),
    cpb.KnobsUpdate(instance_count=1),
    cpb.KnobsUpdate(active_variant="alt"),
    cpb.KnobsUpdate(preferred_batch_sizes=[4], set_preferred_batch_sizes=True, max_queue_delay_us=0),
    cpb.KnobsUpdate(instance_count=2, set_preferred_batch_sizes=True),
    cpb.KnobsUpdate(active_variant="fp32", max_batch_size=4, max_queue_delay_us=500),
]


def _applied(update: cpb.KnobsUpdate, knobs: cpb.Knobs) -> bool:
    """Whether `knobs` carry every field `update` sets."""
    for field, value in update.ListFields():
        if (
            field.name not in ("preferred_batch_sizes", "set_preferred_batch_sizes")
            and getattr(knobs, field.name) != value
        ):
            return False
    return not update.set_preferred_batch_sizes or knobs.preferred_batch_sizes == update.preferred_batch_sizes


def test_live_knob_changes_under_load_fail_no_request(server: ServerProcess) -> None:
    model, clients = "live", 16
    answered: Counter[str] = Counter()

    async def main() -> None:
        async with connected(server.url) as (probe, client):
            stop = asyncio.Event()

            async def load(index: int) -> None:
                n = 0
                while not stop.is_set():
                    rows = 1 + n % 2
                    x = (index * 100_000 + n * 10 + np.arange(rows * 4)).reshape(rows, 4).astype(np.float32)
                    tensor = tc.InferInput("INPUT", [rows, 4], "FP32")
                    tensor.set_data_from_numpy(x)
                    result = await client.infer(model, [tensor])  # any error fails the test
                    np.testing.assert_array_equal(result.as_numpy("OUTPUT"), 2 * x)
                    answered[result.get_response().parameters["tidal_variant"].string_param] += 1
                    n += 1

            tasks = [asyncio.create_task(load(i)) for i in range(clients)]
            for update in KNOB_CHANGES * 3:
                reply = await probe.control.SetKnobs(cpb.SetKnobsRequest(model=model, knobs=update))
                assert _applied(update, reply.models[0].knobs), reply
                await asyncio.sleep(0.08)
            stop.set()
            await asyncio.gather(*tasks)
            stats = await probe.stats(model)
            assert stats.inference_stats.fail.count == 0
            assert stats.inference_stats.success.count == sum(answered.values())
            assert max(batch_sizes(stats)) > 1  # the load did form batches between the changes

    asyncio.run(main())
    assert set(answered) == {"fp32", "alt"}
