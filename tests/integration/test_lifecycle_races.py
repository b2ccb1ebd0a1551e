"""Model lifecycle under concurrency, against a real server: loads and unloads whose callers give up, reloads
that change a model's shape of service, SIGTERM during a load, and load/unload churn under inference.

A load is held in progress deterministically by a config.pbtxt that is a FIFO: the load's read waits until
the test writes the config and closes its end (`_Gate`), the way a slow or stalled disk holds it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

import onnx_models as models
from live_server import ServerProcess, start_server
from tidal.proto import control_pb2 as cpb
from tidal.proto import control_pb2_grpc as cpb_grpc
from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)

WAIT_S = 15.0  # the most any state is waited for; a busy 2-core host needs far less


def _until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {WAIT_S}s for {what}")
        time.sleep(0.02)


class _Gate:
    """A model's config.pbtxt as a FIFO. `arm` before a load; the load then reads until `release`."""

    def __init__(self, model_dir: Path) -> None:
        self.path = model_dir / "config.pbtxt"
        self.path.unlink(missing_ok=True)
        os.mkfifo(self.path)
        self._fd: int | None = None

    def arm(self) -> None:
        # Read-write: opening never blocks, and the reader sees no end of file until this end closes.
        self._fd = os.open(self.path, os.O_RDWR)

    def wait_reader(self, pid: int) -> None:
        """Until the server has the config open: its load is under way."""

        def reading() -> bool:
            fds = Path(f"/proc/{pid}/fd")
            return any(_link(fd) == str(self.path) for fd in fds.iterdir())

        _until(f"the server to read {self.path}", reading)

    def release(self, text: str = "max_batch_size: 4\n") -> None:
        assert self._fd is not None
        os.write(self._fd, text.encode())
        os.close(self._fd)
        self._fd = None


def _link(fd: Path) -> str:
    try:
        return os.readlink(fd)
    except OSError:  # closed meanwhile
        return ""


def _index(client: tc.InferenceServerClient) -> dict[str, tuple[str, str]]:
    """name -> (state, reason) of the model's first row."""
    rows: dict[str, tuple[str, str]] = {}
    for m in client.get_model_repository_index().models:
        rows.setdefault(m.name, (m.state, m.reason))
    return rows


def _health(url: str, service: str) -> str:
    with grpc.insecure_channel(url) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _scale(client: tc.InferenceServerClient, model: str, priority: int = 0) -> float:
    tensor = tc.InferInput("INPUT", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    return float(client.infer(model, [tensor], priority=priority, client_timeout=10).as_numpy("OUTPUT")[0, 0])


def _add(client: tc.InferenceServerClient, model: str) -> None:
    """One add_sub request; raises AssertionError on a wrong answer."""
    x, y = np.random.rand(1, 16).astype(np.float32), np.random.rand(1, 16).astype(np.float32)
    inputs = [tc.InferInput("INPUT0", [1, 16], "FP32"), tc.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(y)
    result = client.infer(model, inputs, client_timeout=10)
    assert np.array_equal(result.as_numpy("OUTPUT0"), x + y)


def _threads(server: ServerProcess) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/task"))


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("lifecycle")
    models.write_config(root / "other", "max_batch_size: 8\n")
    models.add_sub(root / "other" / "1" / "model.onnx")
    models.write_config(root / "churn", "max_batch_size: 8\ninstance_group [ { count: 2 } ]\n")
    models.add_sub(root / "churn" / "1" / "model.onnx")
    models.write_config(root / "spin", "max_batch_size: 1\n")
    models.spin(root / "spin" / "1" / "model.onnx")
    for name in ("prio", "tuned"):
        models.write_config(root / name, "max_batch_size: 4\n")
        models.scale(root / name / "1" / "model.onnx", 2.0)
    for name in ("gated", "moving"):  # their configs become FIFOs: not loaded at start-up
        models.scale(root / name / "1" / "model.onnx", 2.0)
    server = start_server(
        root, "--model-control-mode", "explicit", "--no-metrics",
        *(a for m in ("other", "churn", "spin", "prio", "tuned") for a in ("--load-model", m)),
    )
    server.root = root  # type: ignore[attr-defined]
    yield server
    assert server.stop() == 0, server.log()


def test_a_load_whose_caller_gives_up_still_finishes(srv: ServerProcess) -> None:
    """The RPC's cancellation used to cut the load short: the model stayed LOADING for good."""
    client = tc.InferenceServerClient(srv.url)
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(srv.url))
    gate = _Gate(srv.root / "gated")  # type: ignore[attr-defined]
    gate.arm()
    first = stub.RepositoryModelLoad.future(pb.RepositoryModelLoadRequest(model_name="gated"), timeout=30)
    gate.wait_reader(srv.proc.pid)
    gate.release()
    first.result()
    client.unload_model("gated")
    assert _index(client)["gated"] == ("UNAVAILABLE", "unloaded")

    gate.arm()
    call = stub.RepositoryModelLoad.future(pb.RepositoryModelLoadRequest(model_name="gated"), timeout=30)
    gate.wait_reader(srv.proc.pid)
    # A load under way says so, without the reason of the unload before it.
    assert _index(client)["gated"] == ("LOADING", "")
    call.cancel()  # what a client deadline does too
    gate.release()
    _until("gated to be ready", lambda: client.is_model_ready("gated"))
    assert _index(client)["gated"] == ("READY", "")
    assert _health(srv.url, "gated") == "SERVING"
    assert _scale(client, "gated") == 2.0


def test_an_unload_whose_caller_gives_up_still_releases_the_model(srv: ServerProcess) -> None:
    """Cut short while draining, the unload left the model UNLOADING and its scheduler's threads running."""
    client = tc.InferenceServerClient(srv.url)
    channel = grpc.insecure_channel(srv.url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    control = cpb_grpc.TidalControlStub(channel)
    answers: list[object] = []

    def long_batch() -> None:  # seconds of work
        tensor = tc.InferInput("INPUT", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.full((1, 1), 6000, np.float32))
        try:
            answers.append(float(client.infer("spin", [tensor], client_timeout=30).as_numpy("OUTPUT")[0, 0]))
        except InferenceServerException as exc:
            answers.append(exc.status())

    caller = threading.Thread(target=long_batch)
    caller.start()
    _until("the batch to run", lambda: control.Status(cpb.StatusRequest(model="spin"), timeout=10).models[0].pending)
    call = stub.RepositoryModelUnload.future(pb.RepositoryModelUnloadRequest(model_name="spin"), timeout=30)
    _until("spin to be unloading", lambda: _index(client)["spin"][0] == "UNLOADING")
    call.cancel()
    caller.join(30)
    assert answers == [6000.0]  # the request in flight is answered
    _until("spin to be unloaded", lambda: _index(client)["spin"] == ("UNAVAILABLE", "unloaded"))
    # Logged once its scheduler's threads are joined and its sessions closed.
    _until("the unload to finish", lambda: "model spin: unloaded" in srv.log())
    assert _health(srv.url, "spin") == "NOT_SERVING"
    client.load_model("spin")
    assert client.is_model_ready("spin")


def test_a_reload_that_adds_priority_levels_serves_them(srv: ServerProcess) -> None:
    """The admission gate outlives a reload; sized for the old levels, it failed the new ones INTERNAL."""
    client = tc.InferenceServerClient(srv.url)
    assert _scale(client, "prio") == 2.0
    root: Path = srv.root  # type: ignore[attr-defined]
    models.write_config(
        root / "prio", "max_batch_size: 4\ndynamic_batching { priority_levels: 3 default_priority_level: 2 }\n"
    )
    client.load_model("prio")
    assert [_scale(client, "prio", priority) for priority in (0, 1, 2, 3)] == [2.0] * 4


def test_an_slo_set_right_after_a_reload_holds(srv: ServerProcess) -> None:
    """The control loop took up a reloaded version at its next tick: a SetSlo answered before that went to the
    old version's memory, and the tick replaced it with the configured SLO. OK, then lost, every time."""
    client = tc.InferenceServerClient(srv.url)
    control = cpb_grpc.TidalControlStub(grpc.insecure_channel(srv.url))

    def status() -> cpb.ModelStatus:
        return control.Status(cpb.StatusRequest(model="tuned"), timeout=10).models[0]

    for target in (41.0, 42.0, 43.0):
        client.load_model("tuned")
        control.SetSlo(cpb.SetSloRequest(model="tuned", p99_ms=target, mode="off"), timeout=10)
        # Requests keep coming until a control step has seen some: that step came after the SetSlo.
        _until("a control step after the SetSlo", lambda: _scale(client, "tuned") == 2.0 and status().observed_p99_ms)
        assert status().slo_p99_ms == target


def test_a_model_folder_removed_during_its_load_is_not_found(srv: ServerProcess) -> None:
    """Not INTERNAL with a traceback logged as a bug: the repository changed, and the answer says so."""
    root: Path = srv.root  # type: ignore[attr-defined]
    gate = _Gate(root / "moving")
    gate.arm()
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(srv.url))
    call = stub.RepositoryModelLoad.future(pb.RepositoryModelLoadRequest(model_name="moving"), timeout=30)
    gate.wait_reader(srv.proc.pid)
    (root / "moving").rename(root / "moved")
    gate.release()
    with pytest.raises(grpc.RpcError) as err:
        call.result()
    assert err.value.code() is grpc.StatusCode.NOT_FOUND, err.value.details()
    assert "went away during the load" in err.value.details()
    client = tc.InferenceServerClient(srv.url)
    assert _scale(client, "prio") == 2.0


def _churn(server: ServerProcess, seconds: float) -> None:
    """Loads and unloads of `churn`, some given up at once, beside inference on it and on `other`; then one
    unload and one load, after which every state must agree."""
    client = tc.InferenceServerClient(server.url)
    stop = threading.Event()
    outcomes: Counter[tuple[str, str]] = Counter()
    wrong: list[str] = []

    def infer(model: str) -> None:
        own = tc.InferenceServerClient(server.url)
        while not stop.is_set():
            try:
                _add(own, model)
                outcomes[(model, "OK")] += 1
            except InferenceServerException as exc:
                outcomes[(model, exc.status())] += 1
                if exc.status() != "StatusCode.UNAVAILABLE" or "not ready" not in exc.message():
                    wrong.append(f"{model}: {exc.status()} {exc.message()}")
            except AssertionError:
                wrong.append(f"{model}: a wrong answer")

    def churn(seed: int) -> None:
        own, rng = tc.InferenceServerClient(server.url), np.random.default_rng(seed)
        while not stop.is_set():
            op = own.load_model if rng.random() < 0.5 else own.unload_model
            try:
                op("churn", client_timeout=float(rng.choice([0.01, 0.05, 30.0])))
            except InferenceServerException as exc:
                if exc.status() != "StatusCode.DEADLINE_EXCEEDED":
                    wrong.append(f"{op.__name__}: {exc.status()} {exc.message()}")

    workers = [threading.Thread(target=infer, args=(m,)) for m in ("churn", "churn", "churn", "other")]
    workers += [threading.Thread(target=churn, args=(seed,)) for seed in range(3)]
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join(30)
        assert not worker.is_alive(), "a call hung"
    assert not wrong, wrong[:5]
    assert outcomes[("other", "OK")] > 0 and outcomes[("churn", "OK")] > 0, outcomes

    client.unload_model("churn")  # waits behind whatever the given-up calls left under way
    assert _index(client)["churn"] == ("UNAVAILABLE", "unloaded")
    assert not client.is_model_ready("churn") and _health(server.url, "churn") == "NOT_SERVING"
    client.load_model("churn")
    assert _index(client)["churn"] == ("READY", "")
    assert client.is_model_ready("churn") and _health(server.url, "churn") == "SERVING"
    _add(client, "churn")


def test_load_unload_churn_answers_every_request_and_ends_consistent(srv: ServerProcess) -> None:
    _churn(srv, 1.5)  # also grows the load thread pool to what churn needs: it keeps its threads
    threads_before = _threads(srv)
    _churn(srv, 3.0)
    # Every unloaded version released its instance and timer threads (and ORT's): leaking those of the
    # versions whose unload was given up came to a dozen threads here.
    assert _threads(srv) <= threads_before + 2


def test_sigterm_during_a_reload_exits_within_the_grace(tmp_path: Path) -> None:
    """Shutdown waited for the load under way: with a stalled disk, a SIGTERM never ended the process."""
    models.write_config(tmp_path / "slow", "max_batch_size: 4\n")
    models.scale(tmp_path / "slow" / "1" / "model.onnx", 2.0)
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--no-metrics", "--drain-grace-s", "5")
    gate = _Gate(tmp_path / "slow")
    gate.arm()
    try:
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.url))
        call = stub.RepositoryModelLoad.future(pb.RepositoryModelLoadRequest(model_name="slow"), timeout=30)
        gate.wait_reader(server.proc.pid)
        assert _scale(tc.InferenceServerClient(server.url), "slow") == 2.0  # the old version serves meanwhile
        started = time.monotonic()
        assert server.stop(timeout=WAIT_S) == 0, server.log()
        assert time.monotonic() - started < 5
        with pytest.raises(grpc.RpcError) as err:
            call.result()
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE  # retried safely, never CANCELLED
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        gate.release()


def test_poll_mode_a_stalled_load_holds_back_no_other_model(tmp_path: Path) -> None:
    """Polling awaited each model's load in turn: one load stalled on its disk kept every other model's new
    version (and removal) from being picked up."""
    root = tmp_path / "repo"
    models.write_config(root / "quick", "max_batch_size: 4\n")
    models.scale(root / "quick" / "1" / "model.onnx", 1.0)
    server = start_server(root, "--model-control-mode", "poll", "--repository-poll-secs", "0.1", "--no-metrics")
    staging = tmp_path / "stalled"  # built outside, then moved in whole: the first poll sees its FIFO config
    models.scale(staging / "1" / "model.onnx", 5.0)
    gate = _Gate(staging)
    gate.arm()
    try:
        client = tc.InferenceServerClient(server.url)
        staging.rename(root / "stalled")
        gate.path = root / "stalled" / "config.pbtxt"
        gate.wait_reader(server.proc.pid)  # the poll's load of the new model is under way
        models.scale(root / "quick" / "2" / "model.onnx", 2.0)
        _until("quick's version 2", lambda: client.is_model_ready("quick", "2"))
        assert _scale(client, "quick") == 2.0
        assert _index(client)["stalled"] == ("LOADING", "")
        gate.release()
        _until("stalled to be ready", lambda: client.is_model_ready("stalled"))
        assert _scale(client, "stalled") == 5.0
    finally:
        if gate._fd is not None:
            gate.release()
        assert server.stop() == 0, server.log()
