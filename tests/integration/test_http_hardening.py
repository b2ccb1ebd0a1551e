"""What a hostile or broken HTTP client cannot do: get a 500 or a traceback in the log for its own mistake, have
a wrong JSON type read as a value, get back what it sent unbounded, reach a handler without a token, or stall
and bloat the server with JSON. Each answer matches the gRPC port's where the protocols overlap."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.http as tc_http

from live_server import ServerProcess, start_server
from onnx_models import DTYPES, SIMPLE_CONFIG, add_sub, write_config
from tidal.dataplane.failures import MAX_MESSAGE_CHARS
from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc

INFER = "/v2/models/simple/infer"


def _call(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict, bytes]:
    host, port = url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _error(answer: tuple[int, dict, bytes], status: int, *fragments: str) -> str:
    """The answer is `status` with Triton's JSON error body, whose message names each fragment."""
    code, headers, data = answer
    assert code == status, data[:500]
    assert headers["Content-Type"].startswith("application/json"), headers
    message = json.loads(data)["error"]
    for fragment in fragments:
        assert fragment in message, message
    return message


def _pair(**extra) -> dict:
    tensors = [{"name": f"INPUT{i}", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16} for i in (0, 1)]
    return {"inputs": tensors, **extra}


def _new_lines(server: ServerProcess, before: int) -> list[str]:
    time.sleep(1.5)  # the failure digest's one-second summary, and the pipe
    return server.lines[before:]


@pytest.fixture(scope="module")
def url(server: ServerProcess) -> str:
    return server.http_url


def test_json_that_python_cannot_read_is_400_not_500(server: ServerProcess, url: str) -> None:
    """An integer of over 4,300 digits, nesting past the recursion limit and a body whose Content-Encoding does not
    decode were 500 "internal error" with a traceback logged each time (the repository endpoints: aiohttp's
    text/plain 500)."""
    before = len(server.lines)
    big_int = b'{"inputs": [], "id": ' + b"9" * 5000 + b"}"
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in (INFER, "/v2/repository/index"):
        _error(_call(url, "POST", path, big_int), 400, "JSON", "4300 digits")
        _error(_call(url, "POST", path, deep), 400, "JSON", "nested too deeply")
        _error(_call(url, "POST", path, b"{}", {"Content-Encoding": "gzip"}), 400, "could not be read", "gzip")
    ok = _call(url, "POST", INFER, gzip.compress(json.dumps(_pair()).encode()), {"Content-Encoding": "gzip"})
    assert ok[0] == 200 and json.loads(ok[2])["outputs"][0]["data"] == [2.0] * 16
    assert not [line for line in _new_lines(server, before) if "ERROR" in line or "Traceback" in line]


def test_duplicate_keys_are_refused(url: str) -> None:
    """Python's json keeps the last of two keys and rapidjson (Triton) the first: the second "inputs" used to
    be served silently."""
    body = json.dumps(_pair()).encode().replace(b'{"inputs"', b'{"inputs": [], "inputs"', 1)
    _error(_call(url, "POST", INFER, body), 400, "duplicate key 'inputs'")


@pytest.mark.parametrize(("datatype", "bad"), [
    ("FP32", "1.5"), ("FP32", None), ("FP32", True), ("INT32", 1.5), ("INT32", "7"), ("BOOL", "false"),
    ("BOOL", 1), ("BYTES", 5), ("UINT8", [1, [2]]),
])
def test_data_elements_must_have_their_datatypes_json_type(url: str, datatype: str, bad) -> None:
    """numpy read "1.5" and true as FP32 1.5 and 1.0, null as NaN, 1.5 as the INT32 1 and "false" as the BOOL
    True; gRPC's typed contents cannot carry any of them."""
    _error(_identity(url, datatype, bad), 400, f"IN_{datatype}", f"{datatype} 'data' must hold JSON")


def _identity(url: str, datatype: str, value) -> tuple[int, dict, bytes]:
    """Every input of `identity` as JSON, `value` first in the one of `datatype`."""
    inputs = []
    for name in DTYPES:
        good = {"BOOL": [True, False], "BYTES": ["a", "b"]}.get(name, [1, 2])
        data = [value, good[1]] if name == datatype else good
        inputs.append({"name": f"IN_{name}", "shape": [1, 2], "datatype": name, "data": data})
    return _call(url, "POST", "/v2/models/identity/infer", json.dumps({"inputs": inputs}).encode())


def test_every_datatype_still_travels_as_json(url: str) -> None:
    """The element checks take what tritonclient sends with binary_data=False, and values at their types' ends."""
    client = tc_http.InferenceServerClient(url)
    arrays = {}
    for name in DTYPES:
        if name == "BYTES":
            arrays[name] = np.array([[b"a", b"\xc3\xa9"]], dtype=np.object_)
        elif name == "BOOL":
            arrays[name] = np.array([[True, False]])
        else:
            dtype = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.get(name) or getattr(np, name.lower())
            info = np.finfo(dtype) if name.startswith("FP") else np.iinfo(dtype)
            arrays[name] = np.array([[info.min, info.max]], dtype=dtype)
    inputs = []
    for name, arr in arrays.items():
        tensor = tc_http.InferInput(f"IN_{name}", list(arr.shape), name)
        tensor.set_data_from_numpy(arr, binary_data=False)
        inputs.append(tensor)
    outputs = [tc_http.InferRequestedOutput(f"OUT_{name}", binary_data=False) for name in arrays]
    result = client.infer("identity", inputs, outputs=outputs)
    for name, arr in arrays.items():
        want = np.vectorize(bytes.decode)(arr) if name == "BYTES" else arr  # JSON BYTES come back as text
        np.testing.assert_array_equal(result.as_numpy(f"OUT_{name}"), want)
    _error(_identity(url, "UINT8", 256), 400, "does not fit UINT8")
    _error(_identity(url, "INT64", 2**63), 400, "does not fit INT64")


def test_parameters_hold_what_grpc_parameters_can(url: str) -> None:
    """Nested parameter values, integers past 64 bits and a string `binary_data` were taken (the string read as
    true); gRPC's InferParameter holds a bool, an int64/uint64, a double or a string."""
    _error(_call(url, "POST", INFER, json.dumps(_pair(parameters={"x": {"a": [1] * 100}})).encode()), 400,
           "'x' must be a string, boolean or number")
    _error(_call(url, "POST", INFER, json.dumps(_pair(parameters={"priority": 10**30})).encode()), 400,
           "'priority' is out of the 64-bit integer range")
    _error(_call(url, "POST", INFER, json.dumps(_pair(parameters={"binary_data_output": "false"})).encode()), 400,
           "'binary_data_output' must be true or false")
    outputs = [{"name": "OUTPUT0", "parameters": {"binary_data": "no"}}]
    _error(_call(url, "POST", INFER, json.dumps(_pair(outputs=outputs)).encode()), 400,
           "'binary_data' must be true or false")


def test_errors_cut_what_they_echo_as_grpc_does(url: str, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """A 100,000-character output name came back whole in a 400 (gRPC refuses it by the name limit), and a long
    model name or path whole in a 404."""
    long_output = json.dumps(_pair(outputs=[{"name": "O" * 100_000}])).encode()
    code, _, data = _call(url, "POST", INFER, long_output)
    assert code == 429 and len(data) < 300 and "output name" in json.loads(data)["error"], data[:300]
    msg = pb.ModelInferRequest(model_name="simple")
    msg.outputs.add(name="O" * 100_000)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(msg, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "output name" in err.value.details()
    for method, path in (("GET", "/v2/models/" + "m" * 6000), ("GET", "/v2/" + "x" * 6000),
                         ("DELETE", "/v2/models/" + "m" * 6000)):
        code, _, data = _call(url, method, path)
        assert code in (404, 405) and len(json.loads(data)["error"]) <= MAX_MESSAGE_CHARS, (code, len(data))


def test_long_names_and_versions_get_grpcs_answer(url: str, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """A long unknown model name was 429 over HTTP (the name limit, checked before the lookup) and NOT_FOUND over
    gRPC; a version of 5,000 digits was 500 on HTTP and UNKNOWN on gRPC (int() refuses 4,300 digits)."""
    name = "m" * 600  # over the 256 of the name limit; the answer's text stays under the cut
    _error(_call(url, "POST", f"/v2/models/{name}/infer", json.dumps(_pair()).encode()), 404, "not in the repository")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(pb.ModelInferRequest(model_name=name), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    version = "9" * 5000
    for method, path in (("POST", f"/v2/models/simple/versions/{version}/infer"),
                         ("GET", f"/v2/models/simple/versions/{version}")):
        _error(_call(url, method, path, json.dumps(_pair()).encode() if method == "POST" else b""), 400,
               "out of range")
    assert _call(url, "GET", f"/v2/models/simple/versions/{version}/ready")[0] == 400
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(pb.ModelInferRequest(model_name="simple", model_version=version), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in err.value.details()


def test_a_name_no_folder_can_have_is_refused_on_load(url: str, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """300 characters is past the file system's limit: load answered 500 text/plain over HTTP and UNKNOWN over
    gRPC (ENAMETOOLONG escaped as an OSError)."""
    name = "x" * 300
    for action in ("load", "unload"):
        _error(_call(url, "POST", f"/v2/repository/models/{name}/{action}"), 400, "invalid model name", "300")
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_header_length_must_be_plain_digits(url: str) -> None:
    """int() took "+N" and "N_M" as numbers."""
    header = json.dumps({"inputs": [{"name": f"INPUT{i}", "shape": [1, 16], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 64}} for i in (0, 1)]}).encode()
    body = header + b"\0" * 128
    for length in (f"+{len(header)}", f"{len(header) // 10}_{len(header) % 10}", "-1", " "):
        _error(_call(url, "POST", INFER, body, {"Inference-Header-Content-Length": length}), 400, "not a number")
    assert _call(url, "POST", INFER, body, {"Inference-Header-Content-Length": str(len(header))})[0] == 200


def test_large_json_is_refused_before_it_is_parsed(url: str) -> None:
    """40 MiB of JSON numbers took seconds of the event loop to parse (health waited that long) into ~1 GiB of
    Python objects, before any limit could look at the shapes; the binary extension carries large tensors."""
    body = b'{"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [' + b"1.5," * (10 << 20)
    started = time.monotonic()
    _error(_call(url, "POST", INFER, body + b"1]}]}"), 429, "bytes of JSON", "binary")
    assert time.monotonic() - started < 5
    assert _call(url, "GET", "/v2/health/ready")[0] == 200


def test_malformed_http_and_bad_requests_log_no_storm(server: ServerProcess, url: str) -> None:
    """aiohttp logged every malformed request (here a request line over 8 KiB) at ERROR with a traceback."""
    before = len(server.lines)
    host, port = url.rsplit(":", 1)
    for _ in range(20):
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"GET /v2/models/" + b"x" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(1024).split(b"\r\n")[0].endswith(b" 400 Bad Request")
    for i in range(100):
        _call(url, "POST", INFER, b"{" if i % 2 else json.dumps(_pair(id="x" * 5000)).encode())
    lines = _new_lines(server, before)
    assert len(lines) <= 6 and not any("ERROR" in line or "Traceback" in line for line in lines), lines


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server with tokens and a model named "ready"."""
    root = tmp_path_factory.mktemp("http-auth")
    for name in ("simple", "ready"):
        write_config(root / name, SIMPLE_CONFIG.replace('name: "simple"', f'name: "{name}"'))
        add_sub(root / name / "1" / "model.onnx")
    tokens = root.parent / "tokens"
    tokens.write_text("infer reader-77\nadmin admin-77\n")
    tokens.chmod(0o600)
    srv = start_server(root, "--auth-tokens", str(tokens))
    yield srv.http_url
    assert srv.stop() == 0, srv.log()


def test_tokens_are_checked_by_route_not_by_path_text(guarded: str) -> None:
    """The probe exemption was "the path ends in /ready": the metadata of a model named "ready" was served
    without a token."""
    _error(_call(guarded, "GET", "/v2/models/ready"), 401, "missing bearer token")
    assert _call(guarded, "GET", "/v2/models/ready", headers={"Authorization": "Bearer reader-77"})[0] == 200
    for path in ("/v2/health/ready", "/v2/health/live", "/v2/models/ready/ready", "/v2/models/simple/versions/1/ready"):
        assert _call(guarded, "GET", path)[0] == 200, path
    _error(_call(guarded, "POST", INFER, json.dumps(_pair()).encode(), {"Authorization": "Bearer nope"}), 401,
           "invalid bearer token")
    for action in ("load", "unload"):
        _error(_call(guarded, "POST", f"/v2/repository/models/simple/{action}", headers={
            "Authorization": "Bearer reader-77"}), 403, "'admin' token")
    assert _call(guarded, "POST", "/v2/repository/models/simple/load", headers={
        "Authorization": "Bearer admin-77"})[0] == 200
