"""KServe v2 REST bodies <-> tidal types: JSON tensors and Triton's binary tensor data extension.

A request body is a JSON header, optionally followed by the raw bytes of some inputs
(`Inference-Header-Content-Length` says where the JSON ends; each such input names its size in
`parameters.binary_data_size`, in input order). Responses mirror it: outputs asked for as `binary_data`
(or all of them with the request parameter `binary_data_output`) follow the JSON header raw.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tidal.dataplane import Head
from tidal.errors import InvalidArgument
from tidal.repository.validation import Signature
from tidal.transport.convert import decode_bytes, encode_bytes, int_param, requested_outputs
from tidal.transport.limits import DEFAULT_LIMITS, RequestLimits, check_head, check_parameters, declare
from tidal.types import DataType, InferRequest, InferResponse

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _list(value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise InvalidArgument(f"{what} must be a JSON array")
    return value


class Body:
    """A parsed request body: its JSON header, checked for shape and limits, and the binary part after it."""

    def __init__(self, data: bytes, header_length: str | None, limits: RequestLimits = DEFAULT_LIMITS) -> None:
        if header_length is None:
            split = len(data)
        else:
            try:
                split = int(header_length)
            except ValueError:
                raise InvalidArgument(f"{HEADER_LENGTH} '{header_length[:32]}' is not a number") from None
            if not 0 <= split <= len(data):
                raise InvalidArgument(f"{HEADER_LENGTH} {split} is beyond the body's {len(data)} bytes")
        try:
            header = json.loads(memoryview(data)[:split].tobytes() if split < len(data) else data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgument(f"failed to parse the request JSON: {exc}") from None
        self.json = _object(header, "the request")
        self.binary = memoryview(data)[split:]
        self.inputs = [_object(i, "each input") for i in _list(self.json.get("inputs", []), "'inputs'")]
        self.outputs = [_object(o, "each output") for o in _list(self.json.get("outputs", []), "'outputs'")]
        self.parameters = _object(self.json.get("parameters", {}), "'parameters'")
        request_id = self.json.get("id", "")
        if not isinstance(request_id, str):
            raise InvalidArgument("'id' must be a string")
        self.id = request_id
        self.limits = limits

    def head(self, model: str, version: str) -> Head:
        check_head(model, version, self.id, len(self.inputs), len(self.outputs), self.limits)
        check_parameters(self.parameters, "", self.limits)
        return Head(model, version, self.parameters.get("priority"), self.id)

    def decode(self, signature: Signature, arrival_s: float, deadline_s: float | None) -> InferRequest:
        tensors = []
        for tensor in self.inputs:
            name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
            if not isinstance(name, str) or not isinstance(datatype, str):
                raise InvalidArgument("each input needs a string 'name' and 'datatype'")
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
                raise InvalidArgument(f"input '{name}': 'shape' must be an array of integers")
            tensors.append((name, datatype, tuple(shape)))
        declared = declare(tensors, self.limits)
        requested = requested_outputs(self._output_names())
        signature.check_declared({n: (dt, shape) for n, (dt, shape, _) in declared.items()}, requested)
        inputs, offset = {}, 0
        for tensor, (name, (dtype, shape, count)) in zip(self.inputs, declared.items(), strict=True):
            inputs[name], offset = self._tensor(tensor, name, dtype, shape, count, offset)
        if offset != len(self.binary):
            raise InvalidArgument(f"the binary data is {len(self.binary)} bytes; the inputs declare {offset}")
        params = self.parameters
        return InferRequest(
            model_name="", model_version="", inputs=inputs, requested_outputs=requested, id=self.id,
            priority=int_param(params, "priority") or 0, timeout_us=int_param(params, "timeout"),
            arrival_s=arrival_s, deadline_s=deadline_s, parameters=params,
        )

    def _output_names(self) -> list[str]:
        names = []
        for out in self.outputs:
            name = out.get("name")
            if not isinstance(name, str):
                raise InvalidArgument("each requested output needs a string 'name'")
            check_parameters(_object(out.get("parameters", {}), f"output '{name}' parameters"), "", self.limits)
            names.append(name)
        return names

    def _tensor(
        self, tensor: dict, name: str, dtype: DataType, shape: tuple[int, ...], count: int, offset: int
    ) -> tuple[np.ndarray, int]:
        params = _object(tensor.get("parameters", {}), f"input '{name}' parameters")
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in tensor:
                raise InvalidArgument(f"input '{name}': both 'data' and binary_data_size are given")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgument(f"input '{name}': binary_data_size must be a non-negative integer")
            end = offset + size
            if end > len(self.binary):
                raise InvalidArgument(f"input '{name}': binary_data_size {size} runs past the end of the body")
            raw = self.binary[offset:end]
            if dtype is DataType.BYTES:
                return decode_bytes(raw.tobytes(), count, name).reshape(shape), end
            if size != count * dtype.itemsize:
                raise InvalidArgument(
                    f"input '{name}': expected {count * dtype.itemsize} bytes for {list(shape)} {dtype.wire_name}, "
                    f"got {size}"
                )
            return np.frombuffer(raw, dtype=dtype.np_dtype.newbyteorder("<")).reshape(shape), end
        if "data" not in tensor:
            raise InvalidArgument(f"input '{name}' has neither 'data' nor binary_data_size")
        return _json_tensor(tensor["data"], name, dtype, shape, count), offset

    def classes(self) -> dict[str, int]:
        counts = {}
        for out in self.outputs:
            count = int_param(out.get("parameters", {}), "classification")
            if count:
                counts[out["name"]] = count
        return counts

    def binary_outputs(self) -> set[str] | bool:
        """Outputs to send raw: True for all of them."""
        if self.parameters.get("binary_data_output"):
            return True
        return {o["name"] for o in self.outputs if o.get("parameters", {}).get("binary_data")}


def _json_tensor(data: Any, name: str, dtype: DataType, shape: tuple[int, ...], count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise InvalidArgument(f"input '{name}': 'data' must be a JSON array")
    try:
        flat = np.asarray(data, dtype=object if dtype is DataType.BYTES else dtype.np_dtype).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgument(f"input '{name}': 'data' is not {dtype.wire_name} values: {exc}") from None
    if flat.size != count:
        raise InvalidArgument(f"input '{name}': expected {count} elements for shape {list(shape)}, got {flat.size}")
    if dtype is DataType.BYTES:
        if not all(isinstance(v, str) for v in flat):
            raise InvalidArgument(f"input '{name}': BYTES elements must be JSON strings")
        flat = np.array([v.encode() for v in flat] or [], dtype=object)
    return flat.reshape(shape)


def _json_values(arr: np.ndarray, dtype: DataType) -> list:
    if dtype is DataType.BYTES:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.reshape(-1)]
    return arr.reshape(-1).tolist()


def encode_response(response: InferResponse, binary: set[str] | bool) -> tuple[bytes, int | None]:
    """The body and, when some outputs are raw, the length of its JSON header."""
    outputs, chunks = [], []
    for name, arr in response.outputs.items():
        dtype = DataType.from_numpy(arr.dtype)
        out: dict[str, Any] = {"name": name, "datatype": dtype.wire_name, "shape": list(arr.shape)}
        if binary is True or name in binary:
            raw = encode_bytes(arr) if dtype is DataType.BYTES else np.ascontiguousarray(
                arr, dtype=dtype.np_dtype.newbyteorder("<")).tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = _json_values(arr, dtype)
        outputs.append(out)
    body: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        body["id"] = response.id
    if response.parameters:
        body["parameters"] = response.parameters
    body["outputs"] = outputs
    header = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)

