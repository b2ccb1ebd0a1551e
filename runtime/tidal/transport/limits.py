"""What one inference request may declare, checked on the message before anything is converted.

gRPC's message size limit bounds the bytes a client sends, not what they turn into: a shape can declare
10^12 elements, typed integer contents grow up to 8x when widened, BYTES elements become one Python
object each, and every name or id may be repeated in an error or a log line. These limits bound each of
those from the declarations alone, in time proportional to the number of inputs, so an oversized request
is refused before it costs memory or event-loop time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tidal.errors import InvalidArgument, ResourceExhausted
from tidal.transport._gen import grpc_service_pb2 as pb
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


DEFAULT_LIMITS = RequestLimits()


def _over(what: str, count: int, limit: int) -> ResourceExhausted:
    return ResourceExhausted(f"request has {count} {what}; tidal's limit is {limit}")


def _check_name(kind: str, name: str, limits: RequestLimits) -> None:
    if len(name) > limits.max_name_chars:
        raise ResourceExhausted(
            f"{kind} name '{name[:32]}...' has {len(name)} characters; tidal's limit is {limits.max_name_chars}"
        )


def _check_parameters(params, where: str, limits: RequestLimits) -> None:
    if len(params) > limits.max_parameters:
        raise _over(f"parameters{where}", len(params), limits.max_parameters)
    for key, value in params.items():
        if len(key) > limits.max_parameter_chars:
            raise _over(f"characters in a parameter name{where}", len(key), limits.max_parameter_chars)
        if value.WhichOneof("parameter_choice") == "string_param":
            size = len(value.string_param)
            if size > limits.max_parameter_chars:
                raise _over(f"characters in parameter '{key[:32]}'{where}", size, limits.max_parameter_chars)


def input_shape(tensor: pb.ModelInferRequest.InferInputTensor) -> tuple[int, ...]:
    """The declared shape, refused when numpy could not hold it (negative dims, rank over 64)."""
    shape = tuple(tensor.shape)  # already Python ints
    if not shape:
        return shape
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(
            f"input '{tensor.name}': shape of {len(shape)} dims is not a valid tensor (at most {MAX_DIMS})"
        )
    if min(shape) < 0:
        shown = list(shape) if len(shape) <= 8 else f"of {len(shape)} dims"
        raise InvalidArgument(f"input '{tensor.name}': shape {shown} has a negative dim")
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
        _check_parameters(msg.parameters, "", limits)
    for out in outputs:
        _check_name("output", out.name, limits)
        if out.parameters:
            _check_parameters(out.parameters, f" on output '{out.name}'", limits)
    declared: Declared = {}
    elements = nbytes = strings = 0
    for tensor in inputs:
        name = tensor.name
        if len(name) > longest:
            _check_name("input", name, limits)
        if name in declared:
            raise InvalidArgument(f"input '{name}' is given twice")
        dtype = DataType.from_wire(tensor.datatype)
        shape = input_shape(tensor)
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
