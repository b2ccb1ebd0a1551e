"""Fault injection with real models and a real server: each fault fails only its own requests, with its
reason, and the server keeps serving everyone else. (A backend that raises: test_errors.py, `fragile`.)"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from live_server import ServerProcess, start_server
from onnx_models import add_sub, spin, write_config
from tidal.optimize.graph import save_graph


def _unary(path: Path, op: str, constants: dict[str, np.ndarray] | None = None, **attrs: object) -> None:
    """OUTPUT = op(INPUT, *constants) on FP32 [batch, 4]."""
    constants = constants or {}
    node = helper.make_node(op, ["INPUT", *constants], ["OUTPUT"], **attrs)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("INPUT", "OUTPUT")]
    init = [numpy_helper.from_array(value, name) for name, value in constants.items()]
    save_graph(helper.make_graph([node], op.lower(), io[:1], io[1:], init), path)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("faults")
    # Sums over the batch: answers one row whatever the batch holds, a wrong shape for every batch of 2+.
    write_config(root / "collapse", "max_batch_size: 8\n")
    _unary(root / "collapse" / "1" / "model.onnx", "ReduceSum", {"axes": np.array([0])}, keepdims=1)
    write_config(root / "log", "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 20000 }\n")
    _unary(root / "log" / "1" / "model.onnx", "Log")  # NaN for negative inputs
    write_config(root / "spin", "max_batch_size: 1\ninstance_group [ { count: 2 } ]\n")
    spin(root / "spin" / "1" / "model.onnx")
    write_config(root / "victim", "max_batch_size: 8\n")
    add_sub(root / "victim" / "1" / "model.onnx")
    server = start_server(root, "--no-metrics")
    server.root = root  # type: ignore[attr-defined]
    yield server
    assert server.stop() == 0, server.log()


def _input(values: np.ndarray, name: str = "INPUT") -> list[tc.InferInput]:
    tensor = tc.InferInput(name, list(values.shape), "FP32")
    tensor.set_data_from_numpy(values.astype(np.float32))
    return [tensor]


def test_a_wrong_output_shape_fails_its_batch_with_the_reason(srv: ServerProcess) -> None:
    client = tc.InferenceServerClient(srv.url)
    with pytest.raises(InferenceServerException) as err:
        client.infer("collapse", _input(np.ones((3, 4))))
    assert err.value.status() == "StatusCode.INTERNAL" and "row" in err.value.message()
    assert client.infer("collapse", _input(np.ones((1, 4)))).as_numpy("OUTPUT").shape == (1, 4)


def test_nan_from_one_request_stays_in_its_own_answer(srv: ServerProcess) -> None:
    """Requests that share a batch: those with negative inputs get NaN (the model's answer), the others not."""
    client = tc.InferenceServerClient(srv.url)
    results: dict[int, np.ndarray] = {}
    done = threading.Semaphore(0)

    def keep(index: int):
        def callback(result, error) -> None:
            results[index] = error if error is not None else result.as_numpy("OUTPUT")
            done.release()

        return callback

    for i in range(8):
        sign = -1.0 if i % 2 else 1.0
        client.async_infer("log", _input(np.full((1, 4), sign * (i + 1))), keep(i))
    for _ in range(8):
        assert done.acquire(timeout=60)
    for i, out in results.items():
        assert isinstance(out, np.ndarray), out
        assert np.isnan(out).all() if i % 2 else np.isfinite(out).all()


def test_a_run_past_the_deadline_fails_alone(srv: ServerProcess) -> None:
    client = tc.InferenceServerClient(srv.url)
    statuses: list[str] = []

    def slow() -> None:  # about 2 s of work, with a deadline of 0.5 s
        try:
            client.infer("spin", _input(np.full((1, 1), 10_000)), client_timeout=0.5)
        except InferenceServerException as exc:
            statuses.append(exc.status())

    caller = threading.Thread(target=slow)
    caller.start()
    # The other instance answers meanwhile: the hung run holds one instance, not the model.
    assert client.infer("spin", _input(np.ones((1, 1)))).as_numpy("OUTPUT").shape == (1, 1)
    caller.join()
    assert statuses == ["StatusCode.DEADLINE_EXCEEDED"]


def test_a_model_file_that_disappears_before_a_reload_keeps_the_old_version(srv: ServerProcess) -> None:
    client = tc.InferenceServerClient(srv.url)
    x = np.ones((1, 16), np.float32)
    inputs = _input(x, "INPUT0") + _input(x, "INPUT1")
    model = srv.root / "victim" / "1" / "model.onnx"  # type: ignore[attr-defined]
    model.rename(model.with_suffix(".gone"))
    try:
        with pytest.raises(InferenceServerException) as err:
            client.load_model("victim")
        assert "model.onnx does not exist" in err.value.message()
        np.testing.assert_array_equal(client.infer("victim", inputs).as_numpy("OUTPUT0"), x * 2)
        row = next(m for m in client.get_model_repository_index(as_json=True)["models"] if m["name"] == "victim")
        assert row["state"] == "READY" and "does not exist" in row["reason"]
    finally:
        model.with_suffix(".gone").rename(model)
    client.load_model("victim")
    assert client.is_model_ready("victim")


# `tidal` in a process whose writes beyond 20 KB fail (EFBIG), as they would on a full disk (the signal would
# kill instead). The child limits itself: a preexec_fn would fork this process, which runs gRPC, and gRPC's fork
# handlers can leave a poller in the child whose descriptors the child then closes before exec (seen: SIGABRT).
_ON_A_FULL_DISK = (
    "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)); sys.argv[0] = 'tidal'; "
    "runpy.run_module('tidal', run_name='__main__')"
)


def test_a_full_disk_for_the_demo_cache_is_one_line_and_leaves_nothing_half_built(tmp_path: Path) -> None:
    # No .pyc writes: under the size limit they would be cut short and break every later import of tidal.
    env = {**os.environ, "TIDAL_CACHE_DIR": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _ON_A_FULL_DISK, "serve", "--grpc-port", "0", "--no-metrics", "--no-http"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "tidal: cannot build the demo repository in" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in (tmp_path / "demo").iterdir()] == []
