"""ModelStreamInfer: tritonclient's bidirectional stream, errors in-band, ids matched."""

from __future__ import annotations

import queue

import numpy as np
import tritonclient.grpc as tc

from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc

UNADDRESSABLE = [0, 2**62, 2**62]  # no bytes, yet more elements than numpy can index


def _pair(value: float) -> list[tc.InferInput]:
    data = np.full((1, 16), value, np.float32)
    inputs = [tc.InferInput("INPUT0", [1, 16], "FP32"), tc.InferInput("INPUT1", [1, 16], "FP32")]
    for tensor in inputs:
        tensor.set_data_from_numpy(data)
    return inputs


def test_stream_many_requests_and_an_error(server) -> None:
    client = tc.InferenceServerClient(server.url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i in range(20):
            client.async_stream_infer("simple", _pair(float(i)), request_id=str(i))
        client.async_stream_infer("nope", _pair(0.0), request_id="bad")
        client.async_stream_infer(
            "simple", _pair(7.0), request_id="final", enable_empty_final_response=True
        )
        seen, errors, final = {}, [], None
        for _ in range(22):
            result, error = results.get(timeout=30)
            if error is not None:
                errors.append(error)
                continue
            response = result.get_response()
            if response.id == "final":
                final = response
            seen[response.id] = result.as_numpy("OUTPUT0")
    finally:
        client.stop_stream()
    for i in range(20):
        np.testing.assert_array_equal(seen[str(i)], np.full((1, 16), 2.0 * i, np.float32))
    assert len(errors) == 1 and "nope" in str(errors[0])
    assert final is not None and final.parameters["triton_final_response"].bool_param


def _message(request_id: str, value: float, shape: list[int] | None = None) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="simple", id=request_id)
    for name in ("INPUT0", "INPUT1"):
        msg.inputs.add(name=name, datatype="FP32", shape=shape or [1, 16])
        msg.raw_input_contents.append(b"" if shape else np.full((1, 16), value, np.float32).tobytes())
    return msg


def test_a_malformed_message_mid_stream_is_answered_and_harms_no_other(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    good = [_message(str(i), float(i)) for i in range(40)]
    sent = [*good[:20], _message("bad", 0.0, UNADDRESSABLE), *good[20:]]
    answers = {a.infer_response.id: a for a in stub.ModelStreamInfer(iter(sent), timeout=30)}
    assert len(answers) == 41
    assert "INPUT0" in answers["bad"].error_message and "4611686018427387904" in answers["bad"].error_message
    for i in range(40):
        response = answers[str(i)].infer_response
        assert not answers[str(i)].error_message
        index = [o.name for o in response.outputs].index("OUTPUT0")
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[index], np.float32), [2.0 * i] * 16)
