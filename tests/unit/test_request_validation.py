"""Signature.check: exact matches pass on the fast path; everything else gets validate_request's verdict."""

from __future__ import annotations

import numpy as np
import pytest

from tidal.errors import InvalidArgument
from tidal.repository.config import build_spec
from tidal.repository.pbtxt import parse_model_config_text
from tidal.repository.validation import Signature, validate_request
from tidal.types import InferRequest

CONFIG = """
name: "m"
max_batch_size: 8
input [ { name: "a" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "b" data_type: TYPE_INT64 dims: [ 2, 3 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]
"""
VARIABLE = CONFIG.replace("dims: [ 2, 3 ]", "dims: [ -1, 3 ]")


def spec(text: str = CONFIG):
    return build_spec(parse_model_config_text(text, "config.pbtxt").config)


def request(rows: int = 2, a_dims=(4,), b_dims=(2, 3), a_dtype=np.float32, b_rows=None, outputs=(), extra=False):
    inputs = {
        "a": np.zeros((rows, *a_dims), a_dtype),
        "b": np.zeros((rows if b_rows is None else b_rows, *b_dims), np.int64),
    }
    if extra:
        inputs["c"] = np.zeros((rows, 1), np.float32)
    return InferRequest("m", "", inputs, requested_outputs=outputs)


@pytest.mark.parametrize("text", [CONFIG, VARIABLE])
def test_valid_requests_pass(text):
    check = Signature(spec(text)).check
    check(request())
    check(request(rows=8, outputs=("y",)))
    if text is VARIABLE:
        check(request(b_dims=(7, 3)))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (dict(a_dims=(5,)), "input 'a': shape \\[2, 5\\]"),
        (dict(a_dtype=np.float64), "datatype FP64, model expects FP32"),
        (dict(rows=9), r"outside 1\.\.8"),
        (dict(b_rows=3), "batch size 3 differs"),
        (dict(b_dims=(3, 2)), "input 'b': shape"),
        (dict(outputs=("z",)), "no output\\(s\\) z"),
        (dict(extra=True), "no input\\(s\\) c"),
    ],
)
def test_mismatches_get_the_full_checks_error(bad, message):
    s = spec()
    with pytest.raises(InvalidArgument, match=message):
        validate_request(s, request(**bad))
    with pytest.raises(InvalidArgument, match=message):
        Signature(s).check(request(**bad))


def test_missing_input_and_zero_rows_are_refused():
    s = spec()
    lone = InferRequest("m", "", {"a": np.zeros((1, 4), np.float32)})
    with pytest.raises(InvalidArgument, match="missing input"):
        Signature(s).check(lone)
    with pytest.raises(InvalidArgument, match=r"outside 1\.\.8"):
        Signature(s).check(request(rows=0))


def test_bytes_inputs_must_be_utf8_text():
    text = spec(
        'name: "t" max_batch_size: 4 input [ { name: "s" data_type: TYPE_STRING dims: [ 2 ] } ] '
        'output [ { name: "y" data_type: TYPE_STRING dims: [ 2 ] } ]'
    )
    check = Signature(text).check
    good = np.array([["héllo".encode(), b""]], dtype=object)
    check(InferRequest("t", "", {"s": good}))
    bad = np.array([[b"ok", b"\x00\xff"]], dtype=object)
    with pytest.raises(InvalidArgument, match=r"input 's': element 1 is not UTF-8"):
        check(InferRequest("t", "", {"s": bad}))
