"""Request limits and cheap refusal: what a request declares is checked before its data is converted,
and typed contents are converted in bulk."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.errors import InvalidArgument, ResourceExhausted
from tidal.proto import grpc_service_pb2 as pb
from tidal.repository.config import build_spec
from tidal.repository.pbtxt import parse_model_config_text
from tidal.repository.validation import Signature
from tidal.transport import convert
from tidal.transport.limits import DEFAULT_LIMITS, RequestLimits
from tidal.types import DataType

MLP = """
name: "mlp" max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 256 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 10 ] } ]
"""
TYPED = [dt for dt in DataType if dt not in (DataType.FP16, DataType.BYTES)]


def mlp_signature() -> Signature:
    return Signature(build_spec(parse_model_config_text(MLP, "c").config))


def request(datatype: str, shape: list[int], name: str = "x") -> tuple[pb.ModelInferRequest, pb.InferTensorContents]:
    msg = pb.ModelInferRequest(model_name="mlp")
    tensor = msg.inputs.add(name=name, datatype=datatype, shape=shape)
    return msg, tensor.contents


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _values(dt: DataType) -> st.SearchStrategy:
    if dt is DataType.BOOL:
        return st.booleans()
    if dt in (DataType.FP32, DataType.FP64):
        width = 32 if dt is DataType.FP32 else 64
        return st.floats(width=width, allow_nan=False)
    info = np.iinfo(dt.np_dtype)
    # Typed int_contents/uint_contents carry 32 bits on the wire whatever the datatype.
    low = max(int(info.min), -(2**31)) if dt.wire_name.startswith("INT") and info.bits < 64 else int(info.min)
    return st.integers(low, int(info.max))


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(TYPED).flatmap(lambda dt: st.tuples(st.just(dt), st.lists(_values(dt), max_size=40))))
def test_bulk_typed_conversion_equals_the_element_wise_one(case: tuple[DataType, list]) -> None:
    dt, values = case
    msg, contents = request(dt.wire_name, [len(values)])
    getattr(contents, convert._CONTENTS_FIELD[dt]).extend(values)
    got = convert.decode_request(msg, 0.0, None).inputs["x"]
    assert got.dtype == dt.np_dtype and got.shape == (len(values),)
    np.testing.assert_array_equal(got, np.asarray(values, dtype=dt.np_dtype))


@pytest.mark.parametrize(("datatype", "value"), [("INT8", 128), ("INT8", -129), ("UINT8", 256), ("INT16", 2**15)])
def test_typed_values_beyond_the_datatype_are_invalid(datatype: str, value: int) -> None:
    msg, contents = request(datatype, [2])
    field = "int_contents" if datatype.startswith("INT") else "uint_contents"
    getattr(contents, field).extend([1, value])
    with pytest.raises(InvalidArgument, match=f"does not fit {datatype}"):
        convert.decode_request(msg, 0.0, None)


def test_contents_in_another_field_are_invalid() -> None:
    msg, contents = request("FP32", [2])
    contents.fp32_contents.extend([1.0, 2.0])
    contents.int_contents.extend([3])
    with pytest.raises(InvalidArgument, match="FP32 goes in fp32_contents, not int_contents"):
        convert.decode_request(msg, 0.0, None)


def test_typed_contents_cost_about_their_size_once() -> None:
    """Defect 3: 16 MiB of fp32_contents peaked at 13x the request when converted value by value."""
    msg, contents = request("FP32", [4096, 1024])
    contents.fp32_contents.extend(np.ones(4096 * 1024, np.float32))
    size = 4096 * 1024 * 4
    assert peak_bytes(lambda: convert.decode_request(msg, 0.0, None)) < 1.5 * size


def test_a_batch_beyond_the_model_is_refused_before_conversion() -> None:
    """Defect 3: the contents hold 1 value for a declared [65536, 256]: the model's batch limit answers
    first, so nothing was counted or converted."""
    msg, contents = request("FP32", [65536, 256])
    contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidArgument, match=r"batch size 65536 is outside 1\.\.8"):
        convert.decode_request(msg, 0.0, None, mlp_signature())


def test_a_huge_bytes_request_to_a_numeric_model_is_refused_from_its_declaration() -> None:
    """Defect 2: 16M empty BYTES elements to an FP32 model were decoded (11-18 s) before the datatype
    was looked at. Here the buffer is even malformed: only the declaration is read."""
    msg, _ = request("BYTES", [8])
    msg.raw_input_contents.append(b"\x01")
    with pytest.raises(InvalidArgument, match="datatype BYTES, model expects FP32"):
        convert.decode_request(msg, 0.0, None, mlp_signature())


def test_bytes_elements_beyond_the_limit_are_refused_unread() -> None:
    """Defect 2 without a model: 64 MiB of empty BYTES elements is over the BYTES element limit."""
    count = 2**24
    msg, _ = request("BYTES", [count])
    msg.raw_input_contents.append(bytes(4 * count))
    errors: list[Exception] = []

    def decode() -> None:
        try:
            convert.decode_request(msg, 0.0, None)
        except ResourceExhausted as exc:
            errors.append(exc)

    assert peak_bytes(decode) < 2**16  # nothing was allocated for the elements
    assert f"{count} BYTES elements; tidal's limit is 1048576" in str(errors[0])


def test_a_bytes_buffer_too_short_for_its_count_is_refused_unread() -> None:
    with pytest.raises(InvalidArgument, match="10 bytes cannot hold 3 BYTES elements"):
        convert.decode_bytes(bytes(10), 3, "x")
    with pytest.raises(InvalidArgument, match="expected 1 BYTES elements, got more than 1"):
        convert.decode_bytes(bytes(8), 1, "x")


@pytest.mark.parametrize("raw", [True, False])
def test_a_trillion_elements_with_a_few_bytes_are_refused_before_allocation(raw: bool) -> None:
    msg, contents = request("FP32", [10**6, 10**6])
    if raw:
        msg.raw_input_contents.append(bytes(8))
    else:
        contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(ResourceExhausted, match="tensor elements; tidal's limit"):
        convert.decode_request(msg, 0.0, None)


def _many_inputs(msg: pb.ModelInferRequest) -> None:
    for i in range(DEFAULT_LIMITS.max_inputs + 1):
        msg.inputs.add(name=f"i{i}", datatype="FP32", shape=[0])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_many_inputs, "1025 inputs"),
        (lambda m: [m.outputs.add(name="y") for _ in range(1025)], "1025 requested"),
        (lambda m: setattr(m, "id", "i" * 1025), "1025 characters in its id"),
        (lambda m: setattr(m, "model_name", "m" * 257), "model name 'mmm"),
        (lambda m: m.inputs.add(name="n" * 257, datatype="FP32", shape=[1]), "input name 'nnn"),
        (lambda m: [m.parameters[f"k{i}"].CopyFrom(pb.InferParameter(bool_param=True)) for i in range(65)], "65 param"),
        (lambda m: m.parameters["k"].CopyFrom(pb.InferParameter(string_param="v" * 4097)), "parameter 'k'"),
        (lambda m: m.parameters["k" * 4097].CopyFrom(pb.InferParameter(bool_param=True)), "parameter name"),
    ],
)
def test_each_limit_is_a_resource_exhausted_naming_it(mutate, message: str) -> None:
    msg = pb.ModelInferRequest(model_name="m")
    mutate(msg)
    with pytest.raises(ResourceExhausted, match=message) as err:
        convert.decode_request(msg, 0.0, None)
    assert len(str(err.value)) < 200  # the error never repeats what it refuses


def test_limits_can_be_raised() -> None:
    msg, contents = request("BYTES", [3])
    contents.bytes_contents.extend([b"a", b"b", b"c"])
    with pytest.raises(ResourceExhausted):
        convert.decode_request(msg, 0.0, None, limits=RequestLimits(max_bytes_elements=2))
    assert convert.decode_request(msg, 0.0, None, limits=RequestLimits(max_bytes_elements=3)).inputs["x"].size == 3


def test_a_long_shape_is_not_repeated_in_full() -> None:
    msg, _ = request("FP32", [1] * 60)
    msg.raw_input_contents.append(b"")
    with pytest.raises(InvalidArgument, match="of 60 dims") as err:
        convert.decode_request(msg, 0.0, None)
    assert len(str(err.value)) < 200
