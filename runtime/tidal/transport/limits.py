"""What one inference request may declare, checked on the message before anything is converted.

gRPC's message size limit bounds the bytes a client sends, not what they turn into: a shape can declare
10^12 elements, typed integer contents grow up to 8x when widened, BYTES elements become one Python
object each, and every name or id may be repeated in an error or a log line. These limits bound each of
those from the declarations alone, in time proportional to the number of inputs, so an oversized request
is refused before it costs memory or event-loop time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tidal.errors import InvalidArgument, ResourceExhausted
from tidal.proto import grpc_service_pb2 as pb
from tidal.types import DataType

MAX_DIMS = 64  # numpy's own limit on a tensor's rank


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Per-request bounds; the defaults leave room for any request a model of this server could take."""

    max_inputs: int = 1024
    max_outputs: int = 1024  # requested outputs
    max_elements: int = 2**28  # all inputs together, once decoded
    max_tensor_bytes: int = 2**31 - 1  # all inputs together, once decoded (Triton's message limit)
    max_bytes_elements: int = 2**20  # BYTES elements, each one Python object once decoded
    max_name_chars: int = 256  # model, version, input and output names: errors and logs repeat them
    max_id_chars: int = 1024
    max_parameters: int = 64  # per request, and per requested output
    max_parameter_chars: int = 4096  # each key, and each string value
    # The JSON of an HTTP body, parsed before anything else is known: on the event loop (about 60 ms per
    # MiB of numbers, no other request runs meanwhile) into Python objects of up to 16x its size. Large
    # tensors travel in the binary tensor data extension, which costs neither.
    max_json_bytes: int = 2**24


DEFAULT_LIMITS = RequestLimits()


def _over(what: str, count: int, limit: int) -> ResourceExhausted:
    return ResourceExhausted(f"request has {count} {what}; tidal's limit is {limit}")


def _check_name(kind: str, name: str, limits: RequestLimits) -> None:
    if len(name) > limits.max_name_chars:
        raise ResourceExhausted(
            f"{kind} name '{name[:32]}...' has {len(name)} characters; tidal's limit is {limits.max_name_chars}"
        )


def check_parameters(params: Mapping[str, object], where: str, limits: RequestLimits) -> None:
    """`params`: name -> value, a str where the value is a string (other values are bounded by their type)."""
    if len(params) > limits.max_parameters:
        raise _over(f"parameters{where}", len(params), limits.max_parameters)
    for key, value in params.items():
        if len(key) > limits.max_parameter_chars:
            raise _over(f"characters in a parameter name{where}", len(key), limits.max_parameter_chars)
        if isinstance(value, str) and len(value) > limits.max_parameter_chars:
            raise _over(f"characters in parameter '{key[:32]}'{where}", len(value), limits.max_parameter_chars)


def _strings(params) -> dict[str, object]:
    """A protobuf parameter map as check_parameters reads it."""
    return {k: v.string_param if v.WhichOneof("parameter_choice") == "string_param" else None
            for k, v in params.items()}


def input_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The declared shape, refused when numpy could not hold it (negative dims, rank over 64)."""
    if not shape:
        return shape
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(f"input '{name}': shape of {len(shape)} dims is not a valid tensor (at most {MAX_DIMS})")
    if min(shape) < 0:
        shown = list(shape) if len(shape) <= 8 else f"of {len(shape)} dims"
        raise InvalidArgument(f"input '{name}': shape {shown} has a negative dim")
    return shape


# What decoding needs of each input: its datatype, declared shape and element count.
Declared = dict[str, tuple[DataType, tuple[int, ...], int]]


def check_request(msg: pb.ModelInferRequest, limits: RequestLimits) -> Declared:
    """Every limit, from the message's declarations only. On the path of every request: the common case
    (short names, no parameters) costs a few comparisons per input."""
    inputs, outputs = msg.inputs, msg.outputs  # each attribute read builds a wrapper: read once
    if len(inputs) > limits.max_inputs:
        raise _over("inputs", len(inputs), limits.max_inputs)
    if len(outputs) > limits.max_outputs:
        raise _over("requested outputs", len(outputs), limits.max_outputs)
    longest = limits.max_name_chars
    if len(msg.model_name) > longest or len(msg.model_version) > longest:
        _check_name("model", msg.model_name, limits)
        _check_name("version", msg.model_version, limits)
    if len(msg.id) > limits.max_id_chars:
        raise _over("characters in its id", len(msg.id), limits.max_id_chars)
    if msg.parameters:
        check_parameters(_strings(msg.parameters), "", limits)
    for out in outputs:
        params = out.parameters
        check_output(out.name, _strings(params) if params else None, limits)
    return declare(((t.name, t.datatype, tuple(t.shape)) for t in inputs), limits)


def check_output(name: str, params: Mapping[str, object] | None, limits: RequestLimits) -> None:
    """A requested output's name and parameters (`params` as check_parameters reads them)."""
    _check_name("output", name, limits)
    if params:
        check_parameters(params, f" on output '{name}'", limits)


def check_head(model: str, version: str, request_id: str, inputs: int, outputs: int, limits: RequestLimits) -> None:
    """The limits on what a request names, for protocols that carry it outside a protobuf message."""
    if inputs > limits.max_inputs:
        raise _over("inputs", inputs, limits.max_inputs)
    if outputs > limits.max_outputs:
        raise _over("requested outputs", outputs, limits.max_outputs)
    _check_name("model", model, limits)
    _check_name("version", version, limits)
    if len(request_id) > limits.max_id_chars:
        raise _over("characters in its id", len(request_id), limits.max_id_chars)


def declare(inputs: Iterable[tuple[str, str, tuple[int, ...]]], limits: RequestLimits) -> Declared:
    """(name, datatype, shape) of each input, checked against the limits on names, elements and bytes."""
    longest = limits.max_name_chars
    declared: Declared = {}
    elements = nbytes = strings = 0
    for name, datatype, declared_shape in inputs:
        if len(name) > longest:
            _check_name("input", name, limits)
        if name in declared:
            raise InvalidArgument(f"input '{name}' is given twice")
        dtype = DataType.from_wire(datatype)
        shape = input_shape(name, declared_shape)
        count = math.prod(shape)  # np.prod costs half of a small request's decoding
        elements += count
        nbytes += count * dtype.np_dtype.itemsize  # BYTES: a pointer each, before the objects
        if dtype is DataType.BYTES:
            strings += count
        declared[name] = (dtype, shape, count)
    if elements > limits.max_elements:
        raise _over("tensor elements", elements, limits.max_elements)
    if nbytes > limits.max_tensor_bytes:
        raise _over("bytes of tensor data once decoded", nbytes, limits.max_tensor_bytes)
    if strings > limits.max_bytes_elements:
        raise _over("BYTES elements", strings, limits.max_bytes_elements)
    return declared
