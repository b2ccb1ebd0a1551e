"""What a hostile or broken client cannot do to the server: lose stream answers, blow up error headers,
or pin rejected requests in memory."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest

from live_server import ServerProcess, metric, scrape
from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def _simple(request_id: str, value: float) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="simple", id=request_id)
    for name in ("INPUT0", "INPUT1"):
        msg.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        msg.raw_input_contents.append(np.full((1, 16), value, np.float32).tobytes())
    return msg


def test_an_unreadable_stream_message_loses_no_accepted_request(server: ServerProcess) -> None:
    """20 requests, then bytes that are not a ModelInferRequest: all 20 are answered, then the stream ends
    INVALID_ARGUMENT naming the message (it used to end OK after one answer, the rest cancelled)."""
    with grpc.insecure_channel(server.url) as channel:
        call = channel.stream_stream(STREAM, request_serializer=None,
                                     response_deserializer=pb.ModelStreamInferResponse.FromString)
        sent = [_simple(str(i), float(i)).SerializeToString() for i in range(20)]
        answers = call(iter([*sent, b"\xff\xff\xff\xff not protobuf"]), timeout=30)
        seen = {}
        with pytest.raises(grpc.RpcError) as err:
            for answer in answers:
                seen[answer.infer_response.id] = answer
    assert sorted(seen, key=int) == [str(i) for i in range(20)]
    assert all(not a.error_message for a in seen.values())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stream message 21" in err.value.details()


def test_errors_that_echo_huge_input_keep_their_status(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """A 1 MiB model name or a 10,000-dim shape once made the status message exceed gRPC's header limit, so the
    client saw RESOURCE_EXHAUSTED instead of the real answer."""
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(pb.ModelInferRequest(model_name="m" * (1 << 20)), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and len(err.value.details()) <= 1000
    msg = _simple("wide", 1.0)
    del msg.inputs[0].shape[:]
    msg.inputs[0].shape.extend([1] * 10_000)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(msg, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "INPUT0" in err.value.details()


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_rejected_requests_are_freed_at_once(server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """Ten rejected 32 MiB requests: the server's memory must not keep them (a reference cycle through the
    abort exception holds each one until a collection, which used to wait for the collector's full round)."""
    payload = b"\0" * (32 << 20)
    msg = pb.ModelInferRequest(model_name="simple")
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    msg.raw_input_contents.append(payload)  # the wrong size: refused INVALID_ARGUMENT
    stub.ModelInfer(_simple("warm", 0.0), timeout=30)
    before = _rss_mib(server.proc.pid)
    for _ in range(10):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(msg, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Freed within moments (the sweep, 50 ms after a refusal), not whenever a full collection happens to run;
    # a loaded host may run the sweep late, so the figure is read until it settles, for at most 2 s.
    deadline = time.monotonic() + 2.0
    while (growth := _rss_mib(server.proc.pid) - before) >= 4 * 32 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert growth < 4 * 32, f"RSS grew {growth:.0f} MiB over 10 rejected 32 MiB requests"


def test_bytes_that_are_no_message_are_invalid_argument_and_log_no_traceback(server: ServerProcess) -> None:
    """gRPC answered UNKNOWN and logged a traceback of ~1 KB for each; a fuzzer filled the log with them."""
    tracebacks = sum("Traceback" in line for line in server.lines)
    with grpc.insecure_channel(server.url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None,
                                    response_deserializer=None)
        for payload in (b"\xff\xff\xff\xff not protobuf", b"\x0a\x05sim"):
            with pytest.raises(grpc.RpcError) as err:
                infer(payload, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not parse as inference.ModelInferRequest" in err.value.details()
        status = channel.unary_unary("/tidal.control.TidalControl/Status", request_serializer=None,
                                     response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            status(b"\xff\xff", timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sum("Traceback" in line for line in server.lines) == tracebacks


def test_refusals_can_be_retried_by_a_client_retry_policy(server: ServerProcess) -> None:
    """A status sent after response headers commits the call and retry policies give up; refusals go out as
    trailers only, so a policy that retries this status does (here, three attempts reach the server)."""
    config = {"methodConfig": [{"name": [{"service": "inference.GRPCInferenceService"}], "retryPolicy": {
        "maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.05s", "backoffMultiplier": 2,
        "retryableStatusCodes": ["INVALID_ARGUMENT"]}}]}
    wrong = _simple("retried", 1.0)
    wrong.raw_input_contents[0] = b"\0" * 12  # not 64 bytes: INVALID_ARGUMENT
    before = metric(scrape(server), "tidal_edge_received_total", model="simple")
    options = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]
    with grpc.insecure_channel(server.url, options=options) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(wrong, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert metric(scrape(server), "tidal_edge_received_total", model="simple") - before == 3
