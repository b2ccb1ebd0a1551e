"""The KServe v2 gRPC protocol, driven by unmodified tritonclient against a real tidal server."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from tritonclient.utils import InferenceServerException

from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc


def _inputs(a: np.ndarray, b: np.ndarray) -> list[tc.InferInput]:
    inputs = [tc.InferInput("INPUT0", list(a.shape), "FP32"), tc.InferInput("INPUT1", list(b.shape), "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def _status(exc: InferenceServerException) -> str:
    return exc.status()


def test_server_health_and_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "tidal"
    assert {"model_repository", "statistics", "model_configuration"} <= set(meta.extensions)
    assert "system_shared_memory" not in meta.extensions


def test_versions_are_plain_decimal_numbers(client: tc.InferenceServerClient) -> None:
    assert client.is_model_ready("simple", "1")
    for version in (" 1", "+1", "1.0", "01_", "abc"):
        assert not client.is_model_ready("simple", version), version


def test_model_metadata_and_config(client: tc.InferenceServerClient) -> None:
    assert client.is_model_ready("simple")
    meta = client.get_model_metadata("simple")
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("INPUT0", "FP32", [-1, 16]),
        ("INPUT1", "FP32", [-1, 16]),
    ]
    config = client.get_model_config("simple").config
    assert config.max_batch_size == 8
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.instance_group[0].count == 2


def test_autocomplete_from_onnx(client: tc.InferenceServerClient) -> None:
    config = client.get_model_config("identity").config
    assert config.max_batch_size == 4  # dim 0 is dynamic in the graph
    assert config.HasField("dynamic_batching")
    by_name = {i.name: i for i in config.input}
    assert set(by_name) == {
        f"IN_{dt}"
        for dt in (
            "BOOL",
            "UINT8",
            "UINT16",
            "UINT32",
            "UINT64",
            "INT8",
            "INT16",
            "INT32",
            "INT64",
            "FP16",
            "FP32",
            "FP64",
            "BYTES",
        )
    }
    assert list(by_name["IN_FP32"].dims) == [-1]


def test_infer_sync_outputs_and_subset(client: tc.InferenceServerClient) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 16), dtype=np.float32), rng.standard_normal((3, 16), dtype=np.float32)
    result = client.infer("simple", _inputs(a, b), request_id="req-7")
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    assert result.get_response().id == "req-7"
    only = client.infer("simple", _inputs(a, b), outputs=[tc.InferRequestedOutput("OUTPUT1")])
    assert only.as_numpy("OUTPUT0") is None
    np.testing.assert_allclose(only.as_numpy("OUTPUT1"), a - b, rtol=1e-6)


def test_classification_returns_the_top_classes_as_triton_does(client: tc.InferenceServerClient) -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 16), dtype=np.float32), rng.standard_normal((2, 16), dtype=np.float32)
    outputs = [tc.InferRequestedOutput("OUTPUT0", class_count=3), tc.InferRequestedOutput("OUTPUT1")]
    result = client.infer("simple", _inputs(a, b), outputs=outputs)
    top = result.as_numpy("OUTPUT0")
    assert top.shape == (2, 3) and result.get_output("OUTPUT0").datatype == "BYTES"
    for row, want in zip(top, a + b, strict=True):
        pairs = [entry.decode().split(":") for entry in row]
        assert [int(index) for _, index in pairs] == list(np.argsort(-want, kind="stable")[:3])
        np.testing.assert_allclose([float(value) for value, _ in pairs], np.sort(want)[::-1][:3], atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)  # unclassified: the tensor
    assert "classification" in client.get_server_metadata().extensions


def test_infer_aio_concurrent(server) -> None:
    async def run() -> None:
        async with tc_aio.InferenceServerClient(server.url) as aclient:
            arrays = [np.full((1, 16), i, dtype=np.float32) for i in range(32)]
            results = await asyncio.gather(*(aclient.infer("simple", _inputs(x, x)) for x in arrays))
            for x, res in zip(arrays, results, strict=True):
                np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), 2 * x)
            assert await aclient.is_model_ready("simple")

    asyncio.run(run())


SAMPLES = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 7, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([[-32768, 0, 32767]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([[0.5, -2.0, 65504.0]], dtype=np.float16),
    "FP32": np.array([[1.5, -2.25, 3e38]], dtype=np.float32),
    "FP64": np.array([[1.5, -2.25, 1e300]], dtype=np.float64),
    "BYTES": np.array([[b"", b"tidal", "\u00e9t\u00e9".encode()]], dtype=object),
}


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_every_datatype_raw(client: tc.InferenceServerClient, datatype: str) -> None:
    data = SAMPLES[datatype]
    tensor = tc.InferInput(f"IN_{datatype}", list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    others = []
    for other, sample in SAMPLES.items():
        if other != datatype:
            extra = tc.InferInput(f"IN_{other}", list(sample.shape), other)
            extra.set_data_from_numpy(sample)
            others.append(extra)
    result = client.infer("identity", [tensor, *others], outputs=[tc.InferRequestedOutput(f"OUT_{datatype}")])
    out = result.as_numpy(f"OUT_{datatype}")
    assert out.shape == data.shape
    np.testing.assert_array_equal(out, data)


_TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def test_typed_contents_every_field(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    msg = pb.ModelInferRequest(model_name="identity_typed")
    for datatype, field in _TYPED_FIELD.items():
        sample = SAMPLES[datatype]
        tensor = msg.inputs.add(name=f"IN_{datatype}", datatype=datatype, shape=list(sample.shape))
        getattr(tensor.contents, field).extend(sample.reshape(-1).tolist())
    response = stub.ModelInfer(msg)
    assert len(response.raw_output_contents) == len(response.outputs) == len(_TYPED_FIELD)
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        datatype = tensor.datatype
        assert not tensor.HasField("contents")
        if datatype == "BYTES":
            decoded = tc.deserialize_bytes_tensor(raw).reshape(list(tensor.shape))
        else:
            decoded = np.frombuffer(raw, dtype=SAMPLES[datatype].dtype).reshape(list(tensor.shape))
        np.testing.assert_array_equal(decoded, SAMPLES[datatype])


def test_fp16_has_no_typed_field(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    msg = pb.ModelInferRequest(model_name="identity")
    for datatype, sample in SAMPLES.items():
        tensor = msg.inputs.add(name=f"IN_{datatype}", datatype=datatype, shape=list(sample.shape))
        if datatype in _TYPED_FIELD:
            getattr(tensor.contents, _TYPED_FIELD[datatype]).extend(sample.reshape(-1).tolist())
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(msg)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "IN_FP16" in err.value.details()


def test_a_shape_numpy_cannot_hold_is_invalid_argument(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    msg = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        msg.inputs.add(name=name, datatype="FP32", shape=[0, 2**62, 2**62])
    msg.raw_input_contents.extend([b"", b""])
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(msg)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in err.value.details() and "4611686018427387904" in err.value.details()


def test_typed_and_raw_cannot_mix(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    msg = pb.ModelInferRequest(model_name="simple")
    a = msg.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    a.contents.fp32_contents.extend([1.0] * 16)
    msg.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 16])
    msg.raw_input_contents.extend([np.ones((1, 16), np.float32).tobytes()] * 2)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(msg)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in err.value.details() and "mixed" in err.value.details()
