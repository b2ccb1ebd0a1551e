"""The native gRPC front end (tidal._frontend) driven directly, then `tidal serve --frontend native` side by side
with grpcio.

Driven directly, nothing drains the queue but the test, so the backlog, cancellation and the relay are
checked call by call on real gRPC connections over loopback and a Unix socket."""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2

from live_server import ServerProcess, frontend_flags, start_server
from onnx_models import add_sub, spin, write_config
from tidal.errors import MAX_PUSHBACK_MS
from tidal.proto import grpc_service_pb2 as pb

INFER = "/inference.GRPCInferenceService/ModelInfer"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
ECHO = "/test.Relay/Echo"
CHAT = "/test.Relay/Chat"


@pytest.fixture
def native_module():
    frontend_flags("native")  # skips (fails in CI) where the build has no native front end
    from tidal import _frontend

    return _frontend


class _Relayed(grpc.GenericRpcHandler):
    """What the relay forwards to: an echo that shows the headers and deadline it received, and a stream."""

    def service(self, details: grpc.HandlerCallDetails):
        if details.method == ECHO:
            return grpc.unary_unary_rpc_method_handler(self._echo)
        if details.method == CHAT:
            return grpc.stream_stream_rpc_method_handler(self._chat)
        return None

    @staticmethod
    def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        headers = dict(context.invocation_metadata())
        if request == b"fail":
            context.set_trailing_metadata((("grpc-retry-pushback-ms", "7"), ("why", "asked")))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "failed as asked")
        remaining = context.time_remaining()
        return b"%s|%s|%d" % (request, headers.get("x-who", "").encode(), remaining is not None and remaining < 60)

    @staticmethod
    def _chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            yield request.upper()


@pytest.fixture
def native(native_module, tmp_path: Path) -> Iterator[tuple[object, grpc.Channel]]:
    relay_path = tmp_path / "relay.sock"
    relayed = grpc.server(futures.ThreadPoolExecutor(4))
    relayed.add_generic_rpc_handlers((_Relayed(),))
    relayed.add_insecure_port(f"unix:{relay_path}")
    relayed.start()
    frontend = native_module.Frontend("127.0.0.1:0", f"unix:{relay_path}", INFER, 0.5, 1 << 20, 2, MAX_PUSHBACK_MS)
    port = frontend.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield frontend, channel
    channel.close()
    relayed.stop(0)


def _drain(frontend, want: int, timeout_s: float = 10.0) -> tuple[list, list]:
    """What the front end queued, once at least `want` calls and cancellations are there."""
    calls, gone = [], []
    deadline = time.monotonic() + timeout_s
    while len(calls) + len(gone) < want:
        select.select([frontend.fileno()], [], [], max(deadline - time.monotonic(), 0))
        more, more_gone = frontend.drain()
        calls += more
        gone += more_gone
        assert time.monotonic() < deadline, f"only {len(calls)} calls and {len(gone)} cancellations arrived"
    return calls, gone


def test_model_infer_is_queued_with_its_deadline_and_token_and_answered(native) -> None:
    frontend, channel = native
    infer = channel.unary_unary(INFER)
    call = infer.future(b"payload", timeout=30, metadata=(("authorization", "Bearer abc"),))
    plain = infer.future(b"")
    calls, _ = _drain(frontend, 2)
    by_payload = {payload: (call_id, deadline, token) for call_id, payload, deadline, token in calls}
    call_id, deadline, token = by_payload[b"payload"]
    assert 29 < deadline - time.monotonic() <= 30 and token == b"Bearer abc"  # on time.monotonic()'s clock
    assert by_payload[b""][1:] == (None, None)  # no deadline, no token
    assert frontend.answer(call_id, b"answer") and not frontend.answer(call_id, b"twice")
    assert call.result(10) == b"answer"
    assert frontend.refuse(by_payload[b""][0], grpc.StatusCode.NOT_FOUND.value[0], "no such model", "25")
    with pytest.raises(grpc.RpcError) as err:
        plain.result(10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and err.value.details() == "no such model"
    assert dict(err.value.trailing_metadata())["grpc-retry-pushback-ms"] == "25"


@pytest.mark.parametrize(("max_pending", "max_pushback_ms"), [(0, MAX_PUSHBACK_MS), (2, 0)])
def test_limits_below_one_are_refused(native_module, max_pending: int, max_pushback_ms: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        native_module.Frontend("127.0.0.1:0", "unix:/nowhere", INFER, 0.5, 1 << 20, max_pending, max_pushback_ms)


def test_beyond_the_backlog_calls_are_refused_at_once(native) -> None:
    frontend, channel = native  # a backlog of 2, and nothing drains it until the refusal has come back
    infer = channel.unary_unary(INFER)
    calls = [infer.future(b"%d" % i, timeout=30) for i in range(3)]
    deadline = time.monotonic() + 30
    while not any(f.done() for f in calls):
        assert time.monotonic() < deadline, "no call was refused"
        time.sleep(0.01)
    time.sleep(0.2)  # a second refusal, were there one, would show here
    [refused] = [f for f in calls if f.done()]
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "backlog is full: 2 calls wait" in refused.details() and "--max-pending-rpcs" in refused.details()
    pushback = int(dict(refused.trailing_metadata())["grpc-retry-pushback-ms"])  # the oldest call's wait so far
    assert 1 <= pushback <= MAX_PUSHBACK_MS and f"retry after {pushback} ms" in refused.details()
    queued, _ = _drain(frontend, 2)
    for call_id, payload, _, _ in queued:
        frontend.answer(call_id, payload)
    assert [f.result(10) for f in calls if f is not refused] == [p for _, p, _, _ in sorted(queued, key=lambda q: q[1])]


def test_a_cancelled_call_is_reported_and_still_ends_once(native) -> None:
    frontend, channel = native
    call = channel.unary_unary(INFER).future(b"x")
    [(call_id, *_)], _ = _drain(frontend, 1)
    call.cancel()
    _, gone = _drain(frontend, 1)
    assert gone == [call_id]
    assert frontend.refuse(call_id, grpc.StatusCode.CANCELLED.value[0], "cancelled by the client", "")
    assert not frontend.answer(call_id, b"late")


def test_other_methods_are_relayed_with_headers_deadline_status_and_trailers(native) -> None:
    _, channel = native
    echo = channel.unary_unary(ECHO)
    assert echo(b"hi", metadata=(("x-who", "me"),), timeout=30) == b"hi|me|1"
    assert echo(b"hi") == b"hi||0"  # no deadline on the client: none relayed
    with pytest.raises(grpc.RpcError) as err:
        echo(b"fail")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and err.value.details() == "failed as asked"
    trailers = dict(err.value.trailing_metadata())
    assert trailers["why"] == "asked" and trailers["grpc-retry-pushback-ms"] == "7"
    chat = channel.stream_stream(CHAT)
    assert list(chat(iter([b"a", b"b", b"c"]))) == [b"A", b"B", b"C"]
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/test.Relay/Missing")(b"")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_checks_are_answered_natively_while_the_loop_ticks(native) -> None:
    frontend, channel = native
    check = channel.unary_unary(HEALTH_CHECK)
    frontend.set_health("", health_pb2.HealthCheckResponse.SERVING)
    frontend.set_health("m", health_pb2.HealthCheckResponse.NOT_SERVING)
    for service, status in (("", "SERVING"), ("m", "NOT_SERVING")):
        frontend.tick()  # before each check: a slow host must not turn the loop "stalled" (0.5 s here) meanwhile
        answer = health_pb2.HealthCheckResponse.FromString(check(_health_request(service)))
        assert health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status) == status
    refusals = {"unknown": _health_request("nope"), "malformed": b"\x0a\x05ab", "not UTF-8": b"\x0a\x01\xff"}
    codes = {what: frontend.tick() or _refusal(check, body) for what, body in refusals.items()}
    assert codes["unknown"] == (grpc.StatusCode.NOT_FOUND, "")
    for what in ("malformed", "not UTF-8"):
        assert codes[what][0] == grpc.StatusCode.INVALID_ARGUMENT, what
        assert "does not parse as grpc.health.v1.HealthCheckRequest" in codes[what][1], what
    time.sleep(0.6)  # no tick for longer than loop_stall_s: the check goes to Python (here: no health service)
    assert _refusal(check, _health_request(""))[0] == grpc.StatusCode.UNIMPLEMENTED
    frontend.tick()
    assert health_pb2.HealthCheckResponse.FromString(check(_health_request(""))).status == 1


def _health_request(service: str) -> bytes:
    return health_pb2.HealthCheckRequest(service=service).SerializeToString()


def _refusal(method, body: bytes) -> tuple:
    with pytest.raises(grpc.RpcError) as err:
        method(body, timeout=10)
    return err.value.code(), err.value.details()


def test_a_relayed_stream_cancelled_by_its_client_ends(native) -> None:
    _, channel = native
    stop = threading.Event()

    def forever() -> Iterator[bytes]:
        while not stop.is_set():
            yield b"x"
            time.sleep(0.01)

    responses = channel.stream_stream(CHAT)(forever())
    assert next(responses) == b"X"
    responses.cancel()
    stop.set()
    with pytest.raises(grpc.RpcError) as err:
        list(responses)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert channel.unary_unary(ECHO)(b"after") == b"after||0"  # the front end serves on


# -- tidal serve --frontend native beside grpcio -----------------------------------------------------------

SIMPLE = "max_batch_size: 8\ndynamic_batching { }\n"
SLOW = "max_batch_size: 1\n"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    root = tmp_path_factory.mktemp("native-pair")
    write_config(root / "simple", SIMPLE)
    add_sub(root / "simple" / "1" / "model.onnx")
    write_config(root / "slow", SLOW)
    spin(root / "slow" / "1" / "model.onnx")
    servers = {}
    try:
        for frontend in ("grpcio", "native"):
            servers[frontend] = start_server(root, "--no-http", "--no-metrics", *frontend_flags(frontend))
        yield servers
    finally:
        codes = {name: server.stop() for name, server in servers.items()}
        assert set(codes.values()) <= {0}, {name: servers[name].log() for name, code in codes.items() if code}


def _tensor(name: str, datatype: str, shape: list[int], raw: bytes) -> tuple:
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape), raw


def _request(model: str, *tensors, **fields) -> bytes:
    msg = pb.ModelInferRequest(model_name=model, **fields)
    for spec, raw in tensors:
        msg.inputs.append(spec)
        msg.raw_input_contents.append(raw)
    return msg.SerializeToString()


ONES = np.ones((1, 16), np.float32).tobytes()
REQUESTS = {
    "ok": _request("simple", _tensor("INPUT0", "FP32", [1, 16], ONES), _tensor("INPUT1", "FP32", [1, 16], ONES)),
    "ok with id": _request("simple", _tensor("INPUT0", "FP32", [1, 16], ONES),
                           _tensor("INPUT1", "FP32", [1, 16], ONES), id="r-7"),
    "unknown model": _request("nope"),
    "unknown version": _request("simple", model_version="9"),
    "missing input": _request("simple", _tensor("INPUT0", "FP32", [1, 16], ONES)),
    "wrong datatype": _request("simple", _tensor("INPUT0", "INT32", [1, 16], ONES),
                               _tensor("INPUT1", "FP32", [1, 16], ONES)),
    "wrong size": _request("simple", _tensor("INPUT0", "FP32", [1, 16], ONES[:8]),
                           _tensor("INPUT1", "FP32", [1, 16], ONES)),
    "too many rows": _request("simple", _tensor("INPUT0", "FP32", [9, 16], ONES * 9),
                              _tensor("INPUT1", "FP32", [9, 16], ONES * 9)),
    "garbage": b"\xff\x01\x02",
}


def _outcome(channel: grpc.Channel, payload: bytes) -> tuple:
    try:
        return ("OK", pb.ModelInferResponse.FromString(channel.unary_unary(INFER)(payload, timeout=30)))
    except grpc.RpcError as exc:
        return (exc.code(), exc.details())


def test_every_request_gets_the_same_answer_from_both_front_ends(pair: dict[str, ServerProcess]) -> None:
    channels = {name: grpc.insecure_channel(server.url) for name, server in pair.items()}
    for what, payload in REQUESTS.items():
        grpcio, native = (_outcome(channels[name], payload) for name in ("grpcio", "native"))
        assert native == grpcio, what
    assert _outcome(channels["native"], REQUESTS["ok"])[0] == "OK"


def test_health_answers_alike_on_both_front_ends(pair: dict[str, ServerProcess]) -> None:
    channels = {name: grpc.insecure_channel(server.url) for name, server in pair.items()}
    bodies = [_health_request(s) for s in ("", "liveness", "simple", "nope")] + [b"\x0a\x05ab", b"\x0a\x01\xff"]
    for body in bodies:
        grpcio, native = (_check(channels[name], body) for name in ("grpcio", "native"))
        assert native == grpcio, body


def _check(channel: grpc.Channel, body: bytes) -> tuple:
    try:
        return ("OK", channel.unary_unary(HEALTH_CHECK)(body, timeout=10))
    except grpc.RpcError as exc:
        return (exc.code(), exc.details())


def _spin(trips: int) -> bytes:
    return _request("slow", _tensor("INPUT", "FP32", [1, 1], np.full((1, 1), trips, np.float32).tobytes()))


@pytest.mark.parametrize("frontend", ["grpcio", "native"])
def test_a_passed_deadline_and_a_cancelled_call_leave_the_queue(pair: dict[str, ServerProcess], frontend: str) -> None:
    """Behind a call that holds the one instance, a call whose deadline passes ends DEADLINE_EXCEEDED and one
    whose client cancels leaves the queue: the server counts both as failed, then serves on."""
    infer = grpc.insecure_channel(pair[frontend].url).unary_unary(INFER)
    client = tc.InferenceServerClient(pair[frontend].url)
    before = client.get_inference_statistics("slow").model_stats[0].inference_stats.fail.count
    blocker = infer.future(_spin(6000))  # seconds of work on the one instance, ahead of the two below
    time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as err:
        infer(_spin(1), timeout=0.5)  # long enough to reach the server's queue on a slow host
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    cancelled = infer.future(_spin(1))
    time.sleep(0.5)
    cancelled.cancel()
    blocker.result(60)
    deadline = time.monotonic() + 30
    while (failed := client.get_inference_statistics("slow").model_stats[0].inference_stats.fail.count) < before + 2:
        assert time.monotonic() < deadline, f"{failed - before} failures counted"
        time.sleep(0.1)
    assert pb.ModelInferResponse.FromString(infer(_spin(1), timeout=30)).raw_output_contents


def test_the_native_front_end_is_named_at_start_up(pair: dict[str, ServerProcess]) -> None:
    assert "the native front end holds up to" in pair["native"].log()
    assert "gRPC core holds up to" in pair["grpcio"].log()
