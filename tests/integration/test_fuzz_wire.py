"""Fuzzing a live server over gRPC: every message gets an answer with a designed status, and the server
stays up and keeps answering valid requests."""

from __future__ import annotations

import grpc
from fuzz_strategies import requests, valid_request
from hypothesis import HealthCheck, given, settings

from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc

# DEADLINE_EXCEEDED is designed too: a fuzzed `timeout` parameter of a few microseconds expires in the queue.
DESIGNED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msg=requests())
def test_every_fuzzed_message_gets_a_designed_status(stub: pb_grpc.GRPCInferenceServiceStub, msg) -> None:
    try:
        stub.ModelInfer(msg, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in DESIGNED, f"{exc.code()}: {exc.details()}"
        assert len(exc.details() or "") < 4096


def test_the_server_still_serves_after_the_fuzzing(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    answer = stub.ModelInfer(valid_request(2, typed=False), timeout=30)
    assert [o.shape for o in answer.outputs] == [[2, 16], [2, 16]]
