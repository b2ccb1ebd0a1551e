"""Protobuf <-> tidal types, in one place. Nothing else touches the wire format."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import numpy as np

from tidal.errors import InvalidArgument
from tidal.proto import grpc_service_pb2 as pb
from tidal.repository.validation import Signature
from tidal.transport.limits import DEFAULT_LIMITS, RequestLimits, check_request
from tidal.types import DataType, InferRequest, InferResponse, TensorSpec

# Which InferTensorContents field carries each datatype (FP16 travels raw only).
_CONTENTS_FIELD = {
    DataType.BOOL: "bool_contents",
    DataType.INT8: "int_contents",
    DataType.INT16: "int_contents",
    DataType.INT32: "int_contents",
    DataType.INT64: "int64_contents",
    DataType.UINT8: "uint_contents",
    DataType.UINT16: "uint_contents",
    DataType.UINT32: "uint_contents",
    DataType.UINT64: "uint64_contents",
    DataType.FP32: "fp32_contents",
    DataType.FP64: "fp64_contents",
    DataType.BYTES: "bytes_contents",
}
_LEN = struct.Struct("<I")
CLASSIFICATION = "classification"  # output parameter of Triton's classification extension


def param_value(param: pb.InferParameter) -> Any:
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def int_param(params: dict[str, Any], key: str) -> int | None:
    """An integer request parameter; tritonclient sends uint64, others int64. One sent without a value is
    refused, as Triton refuses it, rather than read as absent."""
    if key not in params:
        return None
    value = params[key]
    if value is None:
        raise InvalidArgument(f"parameter '{key}' has no value; it must be an integer")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"parameter '{key}' must be an integer, got {value!r}")
    if value < 0:
        raise InvalidArgument(f"parameter '{key}' must not be negative, got {value}")
    return value


def requested_outputs(names: list[str]) -> tuple[str, ...]:
    """An output named twice is refused, as Triton refuses it, rather than answered once."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InvalidArgument(f"output '{name[:64]}' is requested twice")
        seen.add(name)
    return tuple(names)


def decode_bytes(buf: bytes, count: int, name: str) -> np.ndarray:
    """Split KServe's length-prefixed BYTES encoding into `count` elements."""
    if count * _LEN.size > len(buf):  # each element has its 4-byte length: refused before any is read
        raise InvalidArgument(f"input '{name}': {len(buf)} bytes cannot hold {count} BYTES elements")
    out: list[bytes] = []
    pos, end = 0, len(buf)
    while pos < end and len(out) < count:
        if pos + 4 > end:
            raise InvalidArgument(f"input '{name}': truncated BYTES element length")
        (length,) = _LEN.unpack_from(buf, pos)
        pos += 4
        if pos + length > end:
            raise InvalidArgument(f"input '{name}': BYTES element overruns the buffer")
        out.append(buf[pos : pos + length])
        pos += length
    if len(out) != count or pos != end:
        got = f"{len(out)}" if pos == end else f"more than {count}"
        raise InvalidArgument(f"input '{name}': expected {count} BYTES elements, got {got}")
    arr = np.empty(count, dtype=object)
    arr[:] = out
    return arr


def encode_bytes(arr: np.ndarray) -> bytes:
    parts = []
    for value in arr.reshape(-1):
        data = value if isinstance(value, bytes) else str(value).encode("utf-8")
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _decode_raw(raw: bytes, dtype: DataType, shape: tuple[int, ...], count: int, name: str) -> np.ndarray:
    if dtype is DataType.BYTES:
        return decode_bytes(raw, count, name).reshape(shape)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"input '{name}': expected {expected} bytes for shape {_shown(shape)} {dtype.wire_name}, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype.np_dtype).reshape(shape)


def _packed_payload(contents: pb.InferTensorContents) -> memoryview:
    """The packed bytes of one repeated scalar field, taken from the message's serialization in one copy.

    Converting a repeated field element by element costs a Python object per value (13x the request's size
    at peak, seconds for 64 MiB); its wire form is already the little-endian array (fixed-width types) or
    a run of varints, so it is read from there."""
    wire = memoryview(contents.SerializeToString())  # the one field set (the caller checked), packed
    pos, shift, length = 1, 0, 0  # one tag byte: the field numbers are 1-7
    while True:
        byte = wire[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if byte < 0x80:
            break
    return wire[pos : pos + length]


def _varint_array(contents: pb.InferTensorContents, field: str, count: int, wide: np.dtype) -> np.ndarray:
    """Varint-encoded values: one byte each when all are below 128 (booleans, small ints), a copy through
    numpy's iterator (no intermediate list) otherwise."""
    payload = _packed_payload(contents)
    if len(payload) == count:
        return np.frombuffer(payload, dtype=np.uint8)
    return np.fromiter(getattr(contents, field), dtype=wide, count=count)


def _decode_contents(
    tensor: pb.ModelInferRequest.InferInputTensor, dtype: DataType, shape: tuple[int, ...], count: int
) -> np.ndarray:
    field = _CONTENTS_FIELD.get(dtype)
    if field is None:
        raise InvalidArgument(f"input '{tensor.name}': {dtype.wire_name} must be sent in raw_input_contents")
    contents = tensor.contents
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"input '{tensor.name}': expected {count} elements for shape {_shown(shape)}, got {len(values)}"
        )
    others = [fd.name for fd, _ in contents.ListFields() if fd.name != field]
    if others:
        raise InvalidArgument(f"input '{tensor.name}': {dtype.wire_name} goes in {field}, not {', '.join(others)}")
    if count == 0:
        return np.empty(shape, dtype=dtype.np_dtype)
    if dtype is DataType.BYTES:
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    if dtype in (DataType.FP32, DataType.FP64):
        return np.frombuffer(_packed_payload(contents), dtype=dtype.np_dtype).reshape(shape)
    wide = np.dtype(np.uint64 if dtype is DataType.UINT64 else np.int64)
    arr = _varint_array(contents, field, count, wide)
    info = np.iinfo(dtype.np_dtype) if dtype is not DataType.BOOL else np.iinfo(np.uint8)
    low, high = arr.min(), arr.max()
    if low < info.min or high > info.max or (dtype is DataType.BOOL and high > 1):
        raise InvalidArgument(f"input '{tensor.name}': a value does not fit {dtype.wire_name}")
    return arr.astype(dtype.np_dtype, copy=False).reshape(shape)


def _shown(shape: tuple[int, ...]) -> str:
    return str(list(shape)) if len(shape) <= 8 else f"of {len(shape)} dims"


def decode_request(
    msg: pb.ModelInferRequest,
    arrival_s: float,
    deadline_s: float | None,
    signature: Signature | None = None,
    limits: RequestLimits = DEFAULT_LIMITS,
) -> InferRequest:
    """`signature`: the model's, when it is known before decoding: a request it cannot take is then refused
    from its declarations alone, before any tensor is converted. `limits` are checked before that."""
    declared = check_request(msg, limits)
    raw, tensors = msg.raw_input_contents, msg.inputs
    if raw and len(raw) != len(tensors):
        raise InvalidArgument(f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs")
    requested = requested_outputs([out.name for out in msg.outputs]) if msg.outputs else ()
    if signature is not None:
        signature.check_declared({name: (dt, shape) for name, (dt, shape, _) in declared.items()}, requested)
    inputs: dict[str, np.ndarray] = {}
    for i, (name, (dtype, shape, count)) in enumerate(declared.items()):
        try:
            if raw:
                if tensors[i].HasField("contents"):
                    raise InvalidArgument(f"input '{name}': typed contents and raw_input_contents cannot be mixed")
                inputs[name] = _decode_raw(raw[i], dtype, shape, count, name)
            else:
                inputs[name] = _decode_contents(tensors[i], dtype, shape, count)
        except ValueError as exc:  # numpy refuses the shape: too many elements to address
            raise InvalidArgument(f"input '{name}': shape {_shown(shape)} is not a valid tensor: {exc}") from None
    # Most clients send neither parameters nor an output list: skip the map and list walks then.
    params = {key: param_value(value) for key, value in msg.parameters.items()} if msg.parameters else {}
    return InferRequest(
        model_name=msg.model_name,
        model_version=msg.model_version,
        inputs=inputs,
        requested_outputs=requested,
        id=msg.id,
        priority=int_param(params, "priority") or 0 if params else 0,
        timeout_us=int_param(params, "timeout") if params else None,
        arrival_s=arrival_s,
        deadline_s=deadline_s,
        parameters=params,
    )


def class_counts(msg: pb.ModelInferRequest) -> dict[str, int]:
    """Outputs asked for with Triton's classification extension (tritonclient's `class_count`): name -> top N."""
    counts: dict[str, int] = {}
    for out in msg.outputs:
        params = {key: param_value(value) for key, value in out.parameters.items()} if out.parameters else {}
        count = int_param(params, CLASSIFICATION)
        if count:  # absent or 0: the tensor itself
            counts[out.name] = count
    return counts


def _set_param(target: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = str(value)


def encode_response(response: InferResponse) -> pb.ModelInferResponse:
    """The data plane hands over outputs in their declared datatypes (classifications as BYTES)."""
    msg = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version, id=response.id)
    for key, value in response.parameters.items():
        _set_param(msg.parameters[key], value)
    raw = msg.raw_output_contents
    for name, arr in response.outputs.items():
        dtype = DataType.from_numpy(arr.dtype)
        out = msg.outputs.add(name=name, datatype=dtype.wire_name)
        out.shape.extend(arr.shape)
        if dtype is DataType.BYTES:
            raw.append(encode_bytes(arr))
        else:
            raw.append(np.ascontiguousarray(arr, dtype=dtype.np_dtype.newbyteorder("<")).tobytes())
    return msg


def tensor_metadata(specs: Iterable[TensorSpec], batch_dim: bool) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    prefix = (-1,) if batch_dim else ()
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype.wire_name, shape=[*prefix, *s.shape])
        for s in specs
    ]
