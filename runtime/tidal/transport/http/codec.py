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
from tidal.errors import InvalidArgument, ResourceExhausted
from tidal.repository.validation import Signature
from tidal.transport.convert import decode_bytes, encode_bytes, int_param, requested_outputs
from tidal.transport.limits import (
    DEFAULT_LIMITS,
    RequestLimits,
    check_head,
    check_output,
    check_parameters,
    declare,
)
from tidal.types import DataType, InferRequest, InferResponse

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


# InferParameter's widest integers: a JSON integer beyond them has no gRPC equivalent.
_INT_RANGE = (-(2**63), 2**64 - 1)
# The JSON types each datatype's `data` elements may have (exact types: a bool is not a number).
_ELEMENT_TYPES: dict[str, tuple[frozenset[type], str]] = {
    "b": (frozenset({bool}), "true/false"),
    "i": (frozenset({int}), "integers"),
    "u": (frozenset({int}), "integers"),
    "f": (frozenset({int, float}), "numbers"),
    "O": (frozenset({str}), "strings"),
}


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Python keeps the last of duplicate keys, rapidjson (Triton) the first: a body the two read differently
    (or that a proxy checked one way) is refused rather than guessed at."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key '{duplicate[:64]}'")
    return obj


def parse_json(data: bytes | memoryview, limits: RequestLimits = DEFAULT_LIMITS) -> Any:
    """A request body's JSON; anything json.loads refuses is the client's mistake (INVALID_ARGUMENT),
    including nesting past the recursion limit and integers of over 4,300 digits."""
    if len(data) > limits.max_json_bytes:
        raise ResourceExhausted(
            f"request has {len(data)} bytes of JSON; tidal's limit is {limits.max_json_bytes} (send large "
            "tensors with the binary tensor data extension: tritonclient's binary_data=True)"
        )
    try:
        return json.loads(bytes(data), object_pairs_hook=_unique_keys)
    except RecursionError:
        raise InvalidArgument("failed to parse the request JSON: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidArgument(f"failed to parse the request JSON: {str(exc)[:200]}") from None


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _list(value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise InvalidArgument(f"{what} must be a JSON array")
    return value


def _parameters(value: Any, what: str) -> dict[str, Any]:
    """A parameter map holds what gRPC's InferParameter can: a string, a bool, an int64/uint64 or a double."""
    params = _object(value, what)
    for key, item in params.items():
        if isinstance(item, int) and not isinstance(item, bool):
            if not _INT_RANGE[0] <= item <= _INT_RANGE[1]:
                raise InvalidArgument(f"{what}: '{key[:64]}' is out of the 64-bit integer range")
        elif not isinstance(item, str | bool | float):
            raise InvalidArgument(f"{what}: '{key[:64]}' must be a string, boolean or number")
    return params


def _flag(params: dict[str, Any], key: str, what: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{what}: '{key}' must be true or false")
    return value


class Body:
    """A parsed request body: its JSON header, checked for shape and limits, and the binary part after it."""

    def __init__(self, data: bytes, header_length: str | None, limits: RequestLimits = DEFAULT_LIMITS) -> None:
        if header_length is None:
            split = len(data)
        else:
            # Digits only: int() would also take "+12", "1_2" and "١٢".
            if not (header_length.isascii() and header_length.isdigit()) or len(header_length) > 19:
                raise InvalidArgument(f"{HEADER_LENGTH} '{header_length[:32]}' is not a number of bytes")
            split = int(header_length)
            if split > len(data):
                raise InvalidArgument(f"{HEADER_LENGTH} {split} is beyond the body's {len(data)} bytes")
        header = data if split == len(data) else memoryview(data)[:split]
        self.json = _object(parse_json(header, limits), "the request")
        self.binary = memoryview(data)[split:]
        self.inputs = [_object(i, "each input") for i in _list(self.json.get("inputs", []), "'inputs'")]
        self.outputs = [_object(o, "each output") for o in _list(self.json.get("outputs", []), "'outputs'")]
        self.parameters = _parameters(self.json.get("parameters", {}), "'parameters'")
        self.all_binary = _flag(self.parameters, "binary_data_output", "'parameters'")  # checked before inference
        request_id = self.json.get("id", "")
        if not isinstance(request_id, str):
            raise InvalidArgument("'id' must be a string")
        self.id = request_id
        self.limits = limits

    def head(self, model: str, version: str) -> Head:
        """The limits are checked in `decode`, after the model lookup, where gRPC checks them: a long unknown
        name is NOT_FOUND on both ports."""
        return Head(model, version, self.parameters.get("priority"), self.id)

    def decode(
        self, model: str, version: str, signature: Signature, arrival_s: float, deadline_s: float | None
    ) -> InferRequest:
        check_head(model, version, self.id, len(self.inputs), len(self.outputs), self.limits)
        check_parameters(self.parameters, "", self.limits)
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
            params = _parameters(out.get("parameters", {}), f"output '{name[:64]}' parameters")
            check_output(name, params, self.limits)
            _flag(params, "binary_data", f"output '{name}' parameters")
            names.append(name)
        return names

    def _tensor(
        self, tensor: dict, name: str, dtype: DataType, shape: tuple[int, ...], count: int, offset: int
    ) -> tuple[np.ndarray, int]:
        params = _parameters(tensor.get("parameters", {}), f"input '{name}' parameters")
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
        if self.all_binary:
            return True
        return {o["name"] for o in self.outputs if o.get("parameters", {}).get("binary_data")}


def _json_tensor(data: Any, name: str, dtype: DataType, shape: tuple[int, ...], count: int) -> np.ndarray:
    """`data` flat or nested as the shape. Each element must be of its datatype's JSON type, as Triton reads
    them: numpy alone would turn "1" and true into 1.0, null into NaN, 1.5 into the INT32 1 and "false" into
    the BOOL True."""
    if not isinstance(data, list):
        raise InvalidArgument(f"input '{name}': 'data' must be a JSON array")
    values, types = data, set(map(type, data))
    if list in types:  # nested as the shape: flattened first; a ragged or too deep array leaves lists in it
        try:
            values = np.asarray(data, dtype=object).reshape(-1).tolist()
        except ValueError as exc:
            raise InvalidArgument(f"input '{name}': 'data' is not an array: {str(exc)[:200]}") from None
        types = set(map(type, values))
    if len(values) != count:
        raise InvalidArgument(f"input '{name}': expected {count} elements for shape {list(shape)}, got {len(values)}")
    allowed, what = _ELEMENT_TYPES[dtype.np_dtype.kind]
    if not types <= allowed:
        got = ", ".join(sorted("null" if t is type(None) else t.__name__ for t in types - allowed))
        raise InvalidArgument(f"input '{name}': {dtype.wire_name} 'data' must hold JSON {what}, got {got}")
    if dtype is DataType.BYTES:
        out = np.empty(count, dtype=object)
        out[:] = [v.encode() for v in values]
        return out.reshape(shape)
    try:
        with np.errstate(over="ignore"):  # a double beyond FP16/FP32 becomes inf, as a C cast makes it
            return np.asarray(values, dtype=dtype.np_dtype).reshape(shape)
    except OverflowError:
        raise InvalidArgument(f"input '{name}': a value does not fit {dtype.wire_name}") from None


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

