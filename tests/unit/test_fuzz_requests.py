"""Fuzzing the request path in process: whatever a ModelInferRequest holds, decoding and validation end in
a designed status (or a valid request), never another exception."""

from __future__ import annotations

from fuzz_strategies import decode_like_the_servicer, near_valid_requests, random_requests, requests
from hypothesis import HealthCheck, given, settings

from tidal.proto import grpc_service_pb2 as pb

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(requests())
def test_any_request_decodes_or_gets_a_designed_status(msg: pb.ModelInferRequest) -> None:
    decode_like_the_servicer(msg)


@FUZZ
@given(near_valid_requests())
def test_near_valid_requests(msg: pb.ModelInferRequest) -> None:
    decode_like_the_servicer(msg)


@FUZZ
@given(random_requests())
def test_random_requests(msg: pb.ModelInferRequest) -> None:
    decode_like_the_servicer(msg)
