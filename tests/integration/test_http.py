"""KServe v2 HTTP/REST, driven by unmodified tritonclient.http (sync and aio) and by raw requests that no
client would send; the answers must equal the gRPC port's."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as tc_http
import tritonclient.http.aio as tc_http_aio

from live_server import ServerProcess


@pytest.fixture(scope="module")
def http_client(server: ServerProcess) -> tc_http.InferenceServerClient:
    return tc_http.InferenceServerClient(server.http_url)


def _pair(module, a: np.ndarray, b: np.ndarray, binary: bool = True) -> list:
    inputs = [module.InferInput("INPUT0", list(a.shape), "FP32"), module.InferInput("INPUT1", list(b.shape), "FP32")]
    for tensor, data in zip(inputs, (a, b), strict=True):
        if module is tc_http:
            tensor.set_data_from_numpy(data, binary_data=binary)
        else:
            tensor.set_data_from_numpy(data)
    return inputs


def _raw(server: ServerProcess, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    host, port = server.http_url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


@pytest.mark.parametrize("binary", [True, False])
def test_infer_binary_and_json_tensors_match_grpc(
    http_client: tc_http.InferenceServerClient, client: tc.InferenceServerClient, binary: bool
) -> None:
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.ones((2, 16), np.float32)
    outputs = [tc_http.InferRequestedOutput("OUTPUT1", binary_data=binary)]
    result = http_client.infer("simple", _pair(tc_http, a, b, binary), outputs=outputs, request_id="r7")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.get_response()["id"] == "r7" and result.as_numpy("OUTPUT0") is None
    full = http_client.infer("simple", _pair(tc_http, a, b, binary))
    via_grpc = client.infer("simple", _pair(tc, a, b))
    for name in ("OUTPUT0", "OUTPUT1"):
        np.testing.assert_array_equal(full.as_numpy(name), via_grpc.as_numpy(name))


def test_metadata_config_statistics_and_index_match_grpc(
    http_client: tc_http.InferenceServerClient, client: tc.InferenceServerClient
) -> None:
    assert http_client.is_server_live() and http_client.is_server_ready() and http_client.is_model_ready("simple")
    assert not http_client.is_model_ready("nope")
    assert http_client.get_server_metadata() == client.get_server_metadata(as_json=True)
    meta = http_client.get_model_metadata("simple")
    want = client.get_model_metadata("simple", as_json=True)
    for tensors in ("inputs", "outputs"):
        want[tensors] = [{**t, "shape": [int(d) for d in t["shape"]]} for t in want[tensors]]
    assert meta == want
    assert http_client.get_model_config("simple") == client.get_model_config("simple", as_json=True)["config"]
    index = http_client.get_model_repository_index()
    assert index == client.get_model_repository_index(as_json=True)["models"]
    stats = http_client.get_inference_statistics("simple")["model_stats"][0]
    assert stats["name"] == "simple" and stats["inference_stats"]["success"]["count"] > 0


def test_classification_matches_grpc(http_client: tc_http.InferenceServerClient, client) -> None:
    a, b = np.arange(16, dtype=np.float32).reshape(1, 16), np.zeros((1, 16), np.float32)
    over_http = http_client.infer("simple", _pair(tc_http, a, b),
                                  outputs=[tc_http.InferRequestedOutput("OUTPUT0", class_count=3)])
    over_grpc = client.infer("simple", _pair(tc, a, b), outputs=[tc.InferRequestedOutput("OUTPUT0", class_count=3)])
    assert over_http.as_numpy("OUTPUT0").tolist() == over_grpc.as_numpy("OUTPUT0").tolist()


def test_aio_client_concurrent(server: ServerProcess) -> None:
    async def main() -> None:
        async with tc_http_aio.InferenceServerClient(server.http_url) as aio:
            rows = [np.full((1, 16), float(i), np.float32) for i in range(24)]
            results = await asyncio.gather(*(aio.infer("simple", _pair(tc_http, r, r)) for r in rows))
            for row, result in zip(rows, results, strict=True):
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), row * 2)
            assert await aio.is_server_ready()

    asyncio.run(main())


def _body(header: dict, binary: bytes = b"") -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(text))}
    return text + binary, headers


def _error(status: int, data: bytes, expected: int, *fragments: str) -> None:
    assert status == expected, data
    message = json.loads(data)["error"]
    for fragment in fragments:
        assert fragment in message, message


def test_bad_http_input_gets_tritons_status_and_a_message(server: ServerProcess, http_client) -> None:
    infer = "/v2/models/simple/infer"
    _error(*_raw(server, "POST", infer, b"{not json"), 400, "JSON")
    _error(*_raw(server, "POST", infer, b"[1, 2]"), 400, "object")
    too_few = {"inputs": [{"name": f"INPUT{i}", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 15}
                          for i in (0, 1)]}
    _error(*_raw(server, "POST", infer, json.dumps(too_few).encode()), 400, "INPUT0", "16", "15")
    declared = {"inputs": [{"name": f"INPUT{i}", "shape": [1, 16], "datatype": "FP32",
                            "parameters": {"binary_data_size": 64}} for i in (0, 1)]}
    _error(*_raw(server, "POST", infer, *_body(declared, b"\0" * 100)), 400, "INPUT1", "past the end")
    _error(*_raw(server, "POST", infer, *_body(declared, b"\0" * 130)), 400, "130", "128")
    body, headers = _body(declared, b"\0" * 128)
    _error(*_raw(server, "POST", infer, body, {**headers, "Inference-Header-Content-Length": "999999"}), 400,
           "beyond the body")
    _error(*_raw(server, "POST", infer, body, {**headers, "Inference-Header-Content-Length": "x"}), 400, "number")
    _error(*_raw(server, "GET", "/v2/nothing/here"), 404, "/v2/nothing/here")
    _error(*_raw(server, "DELETE", "/v2/models/simple"), 405, "DELETE")
    _error(*_raw(server, "POST", "/v2/models/nope/infer", json.dumps(too_few).encode()), 404, "nope")
    _error(*_raw(server, "POST", "/v2/models/simple/versions/abc/infer", json.dumps(too_few).encode()), 400, "abc")
    ok = http_client.infer("simple", _pair(tc_http, np.ones((1, 16), np.float32), np.ones((1, 16), np.float32)))
    np.testing.assert_array_equal(ok.as_numpy("OUTPUT0"), np.full((1, 16), 2, np.float32))


def test_a_2_gib_body_is_refused_from_its_length_without_reading_it(server: ServerProcess, http_client) -> None:
    host, port = server.http_url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 2147483648\r\n\r\n" + b"{" * 4096)
        reply = sock.recv(65536).decode("latin-1")
    assert reply.startswith("HTTP/1.1 413") and "over the limit" in reply
    assert http_client.is_server_ready()


def test_load_parameters_are_refused_as_over_grpc(http_client: tc_http.InferenceServerClient, client) -> None:
    from tritonclient.utils import InferenceServerException

    for caller, status in ((http_client, "501"), (client, "StatusCode.UNIMPLEMENTED")):
        with pytest.raises(InferenceServerException) as err:
            caller.load_model("simple", config='{"max_batch_size": 4}')
        assert err.value.status() == status and "config" in err.value.message(), err.value
