"""How a failed inference is answered: the client's mistakes keep their status, tidal's own bugs become INTERNAL."""

from __future__ import annotations

import logging

import pytest

from tidal.errors import Code, InvalidArgument
from tidal.transport._gen import grpc_service_pb2 as pb
from tidal.transport.servicer import _failure


def test_a_tidal_error_is_answered_as_it_is() -> None:
    exc = InvalidArgument("input 'x' has the wrong shape")
    assert _failure(pb.ModelInferRequest(model_name="m", id="r1"), exc) is exc


def test_an_unexpected_exception_is_internal_and_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise ValueError("array is too big")
    except ValueError as exc:
        answer = _failure(pb.ModelInferRequest(model_name="m", id="r1"), exc)
    assert answer.code is Code.INTERNAL and "ValueError: array is too big" in str(answer)
    record = next(r for r in caplog.records if "failed unexpectedly" in r.getMessage())
    assert record.levelno == logging.ERROR and record.exc_info is not None and "r1" in record.getMessage()
