"""Bad input gets a clear error with the right status, and the server keeps serving.

The tritonclient cases run over both protocols (one parametrized suite): the same request must get the
same answer from the gRPC servicer and the HTTP front end, its status mapped through Triton's HTTP table.
Raw-message cases (what tritonclient never sends) stay gRPC-only; HTTP's own are in test_http.py.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as tc_http
from tritonclient.utils import InferenceServerException

from onnx_models import DTYPES
from tidal.errors import Code
from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc
from tidal.transport.status import HTTP_STATUS
from tidal.types import DataType

# The client of the protocol the current test runs over: both share tritonclient's API.
_protocol = tc


@pytest.fixture(scope="module", params=["grpc", "http"])
def client(request: pytest.FixtureRequest, server) -> tc.InferenceServerClient:
    global _protocol
    _protocol = tc if request.param == "grpc" else tc_http
    return tc.InferenceServerClient(server.url) if request.param == "grpc" else tc_http.InferenceServerClient(
        server.http_url)


def _tensor(name: str, data: np.ndarray, datatype: str) -> tc.InferInput:
    tensor = _protocol.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor


def _pair(shape=(1, 16), dtype=np.float32, datatype="FP32") -> list[tc.InferInput]:
    data = np.ones(shape, dtype=dtype)
    return [_tensor("INPUT0", data, datatype), _tensor("INPUT1", data, datatype)]


def _expect(call, status: str, *fragments: str, http: str | None = None) -> None:
    """`status` as gRPC names it; over HTTP, Triton's HTTP code for it unless `http` says otherwise."""
    with pytest.raises(InferenceServerException) as err:
        call()
    if _protocol is tc_http:
        status = http or str(HTTP_STATUS[Code[status.removeprefix("StatusCode.")]])
    assert err.value.status() == status, err.value
    for fragment in fragments:
        assert fragment in err.value.message(), err.value.message()


def _still_serving(client: tc.InferenceServerClient) -> None:
    out = client.infer("simple", _pair()).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(out, np.full((1, 16), 2, np.float32))


def test_unknown_model_and_version(client: tc.InferenceServerClient) -> None:
    _expect(lambda: client.infer("nope", _pair()), "StatusCode.NOT_FOUND", "nope")
    _expect(lambda: client.infer("simple", _pair(), model_version="9"), "StatusCode.NOT_FOUND", "'9'")
    _expect(lambda: client.get_model_metadata("nope"), "StatusCode.NOT_FOUND")


def test_wrong_datatype_names_the_input(client: tc.InferenceServerClient) -> None:
    _expect(
        lambda: client.infer("simple", _pair(dtype=np.int32, datatype="INT32")),
        "StatusCode.INVALID_ARGUMENT",
        "INPUT0",
        "INT32",
        "FP32",
    )
    _still_serving(client)


def test_wrong_shape(client: tc.InferenceServerClient) -> None:
    _expect(lambda: client.infer("simple", _pair(shape=(1, 15))), "StatusCode.INVALID_ARGUMENT", "INPUT0", "[1, 15]")
    _expect(lambda: client.infer("simple", _pair(shape=(16,))), "StatusCode.INVALID_ARGUMENT", "INPUT0")


def test_batch_larger_than_max_batch_size(client: tc.InferenceServerClient) -> None:
    _expect(lambda: client.infer("simple", _pair(shape=(9, 16))), "StatusCode.INVALID_ARGUMENT", "max_batch_size")


def test_missing_and_extra_inputs(client: tc.InferenceServerClient) -> None:
    one = _pair()[:1]
    _expect(lambda: client.infer("simple", one), "StatusCode.INVALID_ARGUMENT", "missing", "INPUT1")
    extra = [*_pair(), _tensor("INPUT9", np.ones((1, 16), np.float32), "FP32")]
    _expect(lambda: client.infer("simple", extra), "StatusCode.INVALID_ARGUMENT", "INPUT9")


def test_unknown_requested_output(client: tc.InferenceServerClient) -> None:
    _expect(
        lambda: client.infer("simple", _pair(), outputs=[_protocol.InferRequestedOutput("NOPE")]),
        "StatusCode.INVALID_ARGUMENT",
        "NOPE",
    )


def test_byte_size_mismatch(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    msg = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        msg.inputs.add(name=name, datatype="FP32", shape=[1, 16])
    msg.raw_input_contents.extend([b"\0" * 64, b"\0" * 60])
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(msg)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT1" in err.value.details() and "64" in err.value.details()


def test_unknown_datatype_and_bad_bytes_encoding(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    msg = pb.ModelInferRequest(model_name="simple")
    msg.inputs.add(name="INPUT0", datatype="FP8", shape=[1, 16])
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(msg)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "FP8" in err.value.details()
    msg = pb.ModelInferRequest(model_name="identity")
    for datatype in DTYPES:  # every input the model takes, all well formed but one
        msg.inputs.add(name=f"IN_{datatype}", datatype=datatype, shape=[1, 1])
        msg.raw_input_contents.append(b"\x00" * DataType.from_wire(datatype).itemsize)
    msg.raw_input_contents[list(DTYPES).index("BYTES")] = b"\x09\x00\x00\x00abc"  # says 9 bytes, carries 3
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(msg)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "IN_BYTES" in err.value.details()


def test_model_not_ready_is_unavailable(client: tc.InferenceServerClient) -> None:
    data = np.ones((3,), np.float32)
    _expect(lambda: client.infer("broken", [_tensor("INPUT", data, "FP32")]), "StatusCode.UNAVAILABLE", "broken")
    assert not client.is_model_ready("broken")


def test_backend_failure_is_internal_and_harmless(client: tc.InferenceServerClient) -> None:
    good = np.arange(6, dtype=np.float32)
    out = client.infer("fragile", [_tensor("INPUT", good, "FP32")]).as_numpy("OUTPUT")
    np.testing.assert_array_equal(out, good.reshape(2, 3))
    bad = np.arange(4, dtype=np.float32)
    _expect(lambda: client.infer("fragile", [_tensor("INPUT", bad, "FP32")]), "StatusCode.INTERNAL", "onnxruntime")
    out = client.infer("fragile", [_tensor("INPUT", good, "FP32")]).as_numpy("OUTPUT")
    np.testing.assert_array_equal(out, good.reshape(2, 3))
    _still_serving(client)


def test_unimplemented_rpcs_say_so(client: tc.InferenceServerClient) -> None:
    _expect(lambda: client.get_system_shared_memory_status(), "StatusCode.UNIMPLEMENTED", "shared memory")
    _expect(lambda: client.get_cuda_shared_memory_status(), "StatusCode.UNIMPLEMENTED", "shared memory")
    _expect(lambda: client.get_trace_settings(), "StatusCode.UNIMPLEMENTED", "trace")


def test_priority_parameter_must_be_an_integer(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    msg = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        msg.inputs.add(name=name, datatype="FP32", shape=[1, 16])
    msg.raw_input_contents.extend([np.ones((1, 16), np.float32).tobytes()] * 2)
    msg.parameters["priority"].string_param = "high"
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(msg)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority" in err.value.details()


def test_message_over_the_limit_is_resource_exhausted(repository, client) -> None:
    from live_server import start_server

    small = start_server(repository, "--max-message-bytes", "600", "--load-model", "simple")
    try:
        client = (tc.InferenceServerClient(small.url) if _protocol is tc
                  else tc_http.InferenceServerClient(small.http_url))
        _expect(lambda: client.infer("simple", _pair(shape=(8, 16))), "StatusCode.RESOURCE_EXHAUSTED", http="413")
        _still_serving(client)  # a (1, 16) pair fits
    finally:
        assert small.stop() == 0
