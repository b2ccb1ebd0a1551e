"""Wire conversion: zero-copy raw decoding, BYTES framing, parameters, response encoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidal.dataplane import check_classification, classify
from tidal.errors import InvalidArgument
from tidal.proto import grpc_service_pb2 as pb
from tidal.transport import convert
from tidal.types import DataType, InferResponse, TensorSpec


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_bytes_framing_roundtrip(values: list[bytes]) -> None:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    decoded = convert.decode_bytes(convert.encode_bytes(arr), len(values), "x")
    assert list(decoded) == values


def test_raw_decoding_is_zero_copy_and_checked() -> None:
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    msg.raw_input_contents.append(data.tobytes())
    request = convert.decode_request(msg, 1.0, None)
    arr = request.inputs["x"]
    np.testing.assert_array_equal(arr, data)
    assert not arr.flags.owndata  # a view over the message's bytes
    msg.inputs[0].shape[:] = [3, 3]
    with pytest.raises(InvalidArgument, match="expected 36 bytes"):
        convert.decode_request(msg, 1.0, None)


@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [1] * 70])
@pytest.mark.parametrize("raw", [True, False])
def test_shapes_numpy_cannot_hold_are_invalid_arguments(datatype: str, shape: list[int], raw: bool) -> None:
    msg = pb.ModelInferRequest(model_name="m")
    tensor = msg.inputs.add(name="x", datatype=datatype, shape=shape)
    elements = 0 if 0 in shape else 1
    if raw:
        msg.raw_input_contents.append(b"\x00\x00\x00\x00" * elements)
    elif datatype == "FP32":
        tensor.contents.fp32_contents.extend([0.0] * elements)
    else:
        tensor.contents.bytes_contents.extend([b""] * elements)
    with pytest.raises(InvalidArgument, match=r"input 'x': shape .* is not a valid tensor"):
        convert.decode_request(msg, 0.0, None)


def test_parameters_accept_uint64_and_int64_priority() -> None:
    for field in ("uint64_param", "int64_param"):
        msg = pb.ModelInferRequest(model_name="m")
        setattr(msg.parameters["priority"], field, 2)
        setattr(msg.parameters["timeout"], field, 5000)
        request = convert.decode_request(msg, 0.0, 9.0)
        assert (request.priority, request.timeout_us, request.deadline_s) == (2, 5000, 9.0)
    msg = pb.ModelInferRequest(model_name="m")
    msg.parameters["timeout"].int64_param = -1
    with pytest.raises(InvalidArgument, match="timeout"):
        convert.decode_request(msg, 0.0, None)


def test_response_is_raw_and_keeps_declared_types() -> None:
    strings = np.array([["a", "bc"]], dtype=object)
    response = InferResponse("m", "1", {"s": strings, "f": np.ones((1, 2), np.float64)}, id="r")
    msg = convert.encode_response(response)
    assert [(o.name, o.datatype, list(o.shape)) for o in msg.outputs] == [("s", "BYTES", [1, 2]), ("f", "FP64", [1, 2])]
    assert msg.raw_output_contents[0] == b"\x01\x00\x00\x00a\x02\x00\x00\x00bc"
    assert np.frombuffer(msg.raw_output_contents[1], np.float64).tolist() == [1.0, 1.0]


def test_classification_is_the_top_n_per_row_as_value_colon_index() -> None:
    logits = np.array([[0.1, 2.5, -1.0, 2.5], [3.0, 0.0, 1.0, 2.0]], np.float32)
    top = classify(logits, 2, batched=True)
    assert top.tolist() == [[b"2.500000:1", b"2.500000:3"], [b"3.000000:0", b"2.000000:3"]]  # ties: lower index first
    assert classify(logits[0], 9, batched=False).tolist() == [
        b"2.500000:1", b"2.500000:3", b"0.100000:0", b"-1.000000:2"
    ]
    assert classify(np.array([[7, 9]], np.int32), 1, batched=True).tolist() == [[b"9:1"]]


def test_classification_request_parameters() -> None:
    specs = {"y": TensorSpec("y", DataType.FP32, (4,)), "s": TensorSpec("s", DataType.BYTES, (1,))}
    msg = pb.ModelInferRequest(model_name="m")
    msg.outputs.add(name="y").parameters["classification"].int64_param = 2
    msg.outputs.add(name="z")
    assert convert.class_counts(msg) == {"y": 2}
    msg.outputs.add(name="s").parameters["classification"].int64_param = 1
    with pytest.raises(InvalidArgument, match="output 's': classification needs a numeric output"):
        for name in convert.class_counts(msg):
            check_classification(name, specs.get(name))
    msg = pb.ModelInferRequest(model_name="m")
    msg.outputs.add(name="y").parameters["classification"].string_param = "two"
    with pytest.raises(InvalidArgument, match="classification"):
        convert.class_counts(msg)
