"""Hypothesis strategies for what clients and operators feed tidal: ModelInferRequest messages (valid,
near-valid and random) and config.pbtxt texts (mutations of valid ones). Shared by the suite's bounded
fuzz tests and by the atheris targets of `make fuzz`."""

from __future__ import annotations

from functools import cache

import numpy as np
from hypothesis import strategies as st

from onnx_models import SIMPLE_CONFIG
from tidal.dataplane import check_classification
from tidal.errors import Code, ConfigError, TidalError
from tidal.proto import grpc_service_pb2 as pb
from tidal.repository.config import build_spec
from tidal.repository.pbtxt import parse_model_config_text
from tidal.repository.validation import Signature
from tidal.transport import convert

# The statuses bad input may get; anything else (INTERNAL, UNKNOWN, an exception) is a bug.
INPUT_ERRORS = frozenset({Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE})

# The "simple" model of tests/onnx_models.py: two FP32 [-1, 16] inputs, max_batch_size 8.
MODEL = "simple"
INPUTS = ("INPUT0", "INPUT1")
OUTPUTS = ("OUTPUT0", "OUTPUT1")
WIDTH = 16
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES"]
PARAM_KEYS = ["priority", "timeout", "classification", "sequence_id", "triton_enable_empty_final_response", "x"]


def valid_request(rows: int, typed: bool) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name=MODEL)
    for name in INPUTS:
        tensor = msg.inputs.add(name=name, datatype="FP32", shape=[rows, WIDTH])
        data = np.arange(rows * WIDTH, dtype=np.float32)
        if typed:
            tensor.contents.fp32_contents.extend(data)
        else:
            msg.raw_input_contents.append(data.tobytes())
    return msg


@cache
def _simple() -> tuple[Signature, dict]:
    spec = build_spec(parse_model_config_text(SIMPLE_CONFIG, "simple/config.pbtxt").config)
    return Signature(spec), {s.name: s for s in spec.outputs}


def decode_like_the_servicer(msg: pb.ModelInferRequest) -> None:
    """Decodes and validates `msg` for the "simple" model as the servicer does. The only outcomes allowed: a
    valid request, or a designed status whose message fits a gRPC status header whatever the request repeated.
    Anything else fails an assertion or escapes: the fuzzers' sign of a bug."""
    signature, outputs = _simple()
    try:
        request = convert.decode_request(msg, 0.0, 1.0, signature)
        signature.check(request)
        for name in convert.class_counts(msg):
            check_classification(name, outputs.get(name))
    except TidalError as exc:
        assert exc.code in INPUT_ERRORS, f"{exc.code}: {exc}"
        assert len(str(exc)) < 2048, f"a message of {len(str(exc))} characters"


@st.composite
def _parameter(draw: st.DrawFn) -> pb.InferParameter:
    kind = draw(st.sampled_from(["bool", "int", "uint", "string", "double", "none"]))
    if kind == "bool":
        return pb.InferParameter(bool_param=draw(st.booleans()))
    if kind == "int":
        return pb.InferParameter(int64_param=draw(st.integers(-(2**63), 2**63 - 1)))
    if kind == "uint":
        return pb.InferParameter(uint64_param=draw(st.integers(0, 2**64 - 1)))
    if kind == "string":
        return pb.InferParameter(string_param=draw(st.text(max_size=20)))
    if kind == "double":
        return pb.InferParameter(double_param=draw(st.floats()))
    return pb.InferParameter()


@st.composite
def _mutate(draw: st.DrawFn, msg: pb.ModelInferRequest) -> pb.ModelInferRequest:
    """One to three small changes to a valid request: what a buggy client sends."""
    for _ in range(draw(st.integers(1, 3))):
        change = draw(st.integers(0, 11))
        tensor = msg.inputs[draw(st.integers(0, len(msg.inputs) - 1))] if msg.inputs else None
        if change == 0 and tensor is not None:
            tensor.datatype = draw(st.sampled_from([*DATATYPES, "FP8", ""]))
        elif change == 1 and tensor is not None:
            tensor.shape[:] = draw(st.lists(st.integers(-2, 2**40), max_size=6))
        elif change == 2 and msg.raw_input_contents:
            i = draw(st.integers(0, len(msg.raw_input_contents) - 1))
            cut = draw(st.integers(0, len(msg.raw_input_contents[i])))
            msg.raw_input_contents[i] = msg.raw_input_contents[i][:cut] + draw(st.binary(max_size=8))
        elif change == 3:
            msg.inputs.add(name=draw(st.sampled_from([*INPUTS, "z", ""])), datatype="FP32", shape=[1, WIDTH])
        elif change == 4 and tensor is not None:
            tensor.name = draw(st.sampled_from([*INPUTS, "", "INPUT2", "x" * 300]))
        elif change == 5:
            msg.parameters[draw(st.sampled_from(PARAM_KEYS))].CopyFrom(draw(_parameter()))
        elif change == 6:
            out = msg.outputs.add(name=draw(st.sampled_from([*OUTPUTS, "nope", ""])))
            if draw(st.booleans()):
                out.parameters["classification"].CopyFrom(draw(_parameter()))
        elif change == 7:
            msg.model_version = draw(st.sampled_from(["", "1", "2", "abc", "-1", " 1", "1a", "99999999999999999999"]))
        elif change == 8 and tensor is not None:
            tensor.contents.int_contents.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4)))
        elif change == 9 and tensor is not None:
            tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=4), max_size=4)))
        elif change == 10:
            msg.raw_input_contents.append(draw(st.binary(max_size=16)))
        elif change == 11:
            msg.model_name = draw(st.sampled_from([MODEL, "", "nope", "../simple", "s" * 300]))
    return msg


def near_valid_requests() -> st.SearchStrategy[pb.ModelInferRequest]:
    base = st.builds(valid_request, st.integers(0, 10), st.booleans())
    return base.flatmap(lambda msg: _mutate(msg))


def random_requests() -> st.SearchStrategy[pb.ModelInferRequest]:
    """Arbitrary bytes that happen to parse as a ModelInferRequest, and arbitrary field values."""

    def parse(data: bytes) -> pb.ModelInferRequest | None:
        msg = pb.ModelInferRequest()
        try:
            msg.ParseFromString(data)
        except Exception:  # protobuf's DecodeError; gRPC answers those itself before tidal sees them
            return None
        return msg

    from_bytes = st.binary(max_size=200).map(parse).filter(lambda m: m is not None)
    tensor = st.builds(
        pb.ModelInferRequest.InferInputTensor,
        name=st.text(max_size=8),
        datatype=st.sampled_from([*DATATYPES, "x"]),
        shape=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
    )
    fields = st.builds(
        pb.ModelInferRequest,
        model_name=st.sampled_from([MODEL, ""]) | st.text(max_size=8),
        model_version=st.text(max_size=4),
        id=st.text(max_size=8),
        inputs=st.lists(tensor, max_size=3),
        raw_input_contents=st.lists(st.binary(max_size=64), max_size=3),
    )
    return from_bytes | fields


def requests() -> st.SearchStrategy[pb.ModelInferRequest]:
    valid = st.builds(valid_request, st.integers(1, 8), st.booleans())
    return st.one_of(valid, near_valid_requests(), random_requests())


# -- config.pbtxt ---------------------------------------------------------------------------------------
VALID_CONFIGS = (
    'name: "simple"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
    'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] }, { name: "INPUT1" data_type: TYPE_FP32 '
    'dims: [ 16 ] } ]\noutput [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
    "dynamic_batching { max_queue_delay_microseconds: 500 preferred_batch_size: [ 4, 8 ] priority_levels: 2\n"
    "  default_priority_level: 2 default_queue_policy { max_queue_size: 64 timeout_action: REJECT } }\n"
    "instance_group [ { count: 2 kind: KIND_CPU } ]\n",
    "max_batch_size: 4\nversion_policy { specific { versions: [1, 3] } }\n"
    'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n',
    'max_batch_size: 0\nmodel_warmup [ { name: "w" batch_size: 1 inputs { key: "x" value { data_type: TYPE_FP32 '
    "dims: [ 16 ] zero_data: true } } } ]\noptimization { graph { level: 1 } }\n",
    "max_batch_size: 8\ndynamic_batching { priority_levels: 2 }\n"
    "slo { p99_ms: 50 min_accuracy: 0.9 priority_p99_ms { key: 2 value: 200 } }\ncontroller { mode: FULL }\n",
)
_TOKENS = ["[", "]", "{", "}", "<", ">", ":", ",", ";", '"', "'", "#", "\n", "-1", "0", "1e400", "TYPE_FP32",
           "dims", "input", "name", "max_batch_size", "bogus", "\\", "\x00", "é"]


@st.composite
def mutated_configs(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(VALID_CONFIGS))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        change = draw(st.integers(0, 3))
        if change == 0:  # cut a span
            text = text[:pos] + text[pos + draw(st.integers(1, 20)) :]
        elif change == 1:  # insert a token
            text = text[:pos] + draw(st.sampled_from(_TOKENS)) + text[pos:]
        elif change == 2:  # truncate: the end of the file arrives anywhere
            text = text[:pos]
        else:  # repeat a span
            end = min(len(text), pos + draw(st.integers(1, 40)))
            text = text[:end] + text[pos:end] + text[end:]
    return text


def parse_like_the_repository(text: str) -> None:
    """Parses a config.pbtxt text and checks its settings as the repository does. The only outcomes allowed: a
    valid spec, a short ConfigError naming the file, or INVALID_ARGUMENT from the settings' own checks (the
    manager adds the file's name to these). Anything else fails an assertion or escapes."""
    path = "repo/m/config.pbtxt"
    try:
        config = parse_model_config_text(text, path).config
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}: ") and len(str(exc)) < 1024, str(exc)[:200]
        return
    try:
        build_spec(config)
    except TidalError as exc:
        assert exc.code is Code.INVALID_ARGUMENT, f"{exc.code}: {exc}"
