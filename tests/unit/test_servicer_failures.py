"""How a failed inference is answered and logged: the client's mistakes keep their status, tidal's own bugs
become INTERNAL, routine failures under overload are summed up instead of logged one by one."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tidal.dataplane.failures import MAX_MESSAGE_CHARS, clip, failure
from tidal.errors import Code, InvalidArgument, ResourceExhausted
from tidal.logs import FailureDigest

log = logging.getLogger("test.digest")


def test_a_tidal_error_is_answered_as_it_is() -> None:
    async def run() -> None:
        exc = InvalidArgument("input 'x' has the wrong shape")
        assert failure("m", "r1", exc, FailureDigest(log)) is exc

    asyncio.run(run())


def test_an_unexpected_exception_is_internal_and_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise ValueError("array is too big")
    except ValueError as exc:
        answer = failure("m", "r1", exc, FailureDigest(log))
    assert answer.code is Code.INTERNAL and "ValueError: array is too big" in str(answer)
    record = next(r for r in caplog.records if "failed unexpectedly" in r.getMessage())
    assert record.levelno == logging.ERROR and record.exc_info is not None and "r1" in record.getMessage()


def test_thousands_of_refusals_make_one_line_per_interval_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test.digest")

    async def run() -> None:
        digest = FailureDigest(log, interval_s=0.05)
        for _ in range(5000):
            failure("m", "", ResourceExhausted("shed"), digest)
        await asyncio.sleep(0.08)  # the window closes: one summary line
        await asyncio.sleep(0.08)  # nothing new arrived: the window closes without a line

    asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if r.name == "test.digest"]
    assert lines[0] == "infer m id='' failed: RESOURCE_EXHAUSTED shed"
    assert lines[1].startswith("infer m: 4999 more requests failed RESOURCE_EXHAUSTED (ResourceExhausted)")
    assert len(lines) == 2


def test_each_model_status_and_kind_has_its_own_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test.digest")

    async def run() -> None:
        digest = FailureDigest(log, interval_s=10)
        for name in ("a", "b"):
            for exc in (ResourceExhausted("full"), InvalidArgument("bad")):
                failure(name, "", exc, digest)
                failure(name, "", exc, digest)

    asyncio.run(run())
    assert len([r for r in caplog.records if r.name == "test.digest"]) == 4


def test_echoed_text_is_cut_to_fit_a_grpc_header() -> None:
    huge = "m" * (1 << 20)
    clipped = clip(f"model '{huge}' is not in the repository")
    assert len(clipped) <= MAX_MESSAGE_CHARS and clipped.startswith("model 'mmm") and "more characters" in clipped
    assert clip("short") == "short"
