"""Fuzzing the request path in process: whatever a ModelInferRequest holds, decoding and validation end in
a designed status (or a valid request), never another exception."""

from __future__ import annotations

from fuzz_strategies import INPUT_ERRORS, near_valid_requests, random_requests, requests
from hypothesis import HealthCheck, given, settings

from onnx_models import SIMPLE_CONFIG
from tidal.dataplane import check_classification
from tidal.errors import TidalError
from tidal.proto import grpc_service_pb2 as pb
from tidal.repository.config import build_spec
from tidal.repository.pbtxt import parse_model_config_text
from tidal.repository.validation import Signature
from tidal.transport import convert

SPEC = build_spec(parse_model_config_text(SIMPLE_CONFIG, "simple/config.pbtxt").config)
SIGNATURE = Signature(SPEC)
OUTPUT_SPECS = {s.name: s for s in SPEC.outputs}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_like_the_servicer(msg: pb.ModelInferRequest) -> None:
    try:
        request = convert.decode_request(msg, 0.0, 1.0, SIGNATURE)
        SIGNATURE.check(request)
        for name in convert.class_counts(msg):
            check_classification(name, OUTPUT_SPECS.get(name))
    except TidalError as exc:
        assert exc.code in INPUT_ERRORS, f"{exc.code}: {exc}"
        assert len(str(exc)) < 2048  # fits a gRPC status header whatever the request repeated


@FUZZ
@given(requests())
def test_any_request_decodes_or_gets_a_designed_status(msg: pb.ModelInferRequest) -> None:
    _decode_like_the_servicer(msg)


@FUZZ
@given(near_valid_requests())
def test_near_valid_requests(msg: pb.ModelInferRequest) -> None:
    _decode_like_the_servicer(msg)


@FUZZ
@given(random_requests())
def test_random_requests(msg: pb.ModelInferRequest) -> None:
    _decode_like_the_servicer(msg)
