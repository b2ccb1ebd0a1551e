"""Checks a decoded request against the model's declared signature.

Done before queueing so a bad request fails alone, with a message naming the
input, and never reaches a batch where it would fail its neighbours.
"""

from __future__ import annotations

import numpy as np

from tidal.errors import InvalidArgument
from tidal.repository.config import ModelSpec
from tidal.types import DataType, InferRequest


class Signature:
    """A model's inputs as exact (dtype, shape) pairs, for a check that costs one comparison per input.

    Built once per loaded version. Requests that match exactly pass here; anything else (a variable dim,
    another batch size, a mistake) goes through `validate_request`, which also words the error.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self._spec = spec
        self._exact = {s.name: (s.datatype.np_dtype, s.shape) for s in spec.inputs if -1 not in s.shape}
        self._complete = len(self._exact) == len(spec.inputs)
        self._outputs = frozenset(s.name for s in spec.outputs)
        self._text = tuple(s.name for s in spec.inputs if s.datatype is DataType.BYTES)

    def check(self, request: InferRequest) -> None:
        inputs, exact = request.inputs, self._exact
        for name in self._text:
            if name in inputs:
                _require_utf8(name, inputs[name])
        if self._complete and len(inputs) == len(exact) and self._outputs.issuperset(request.requested_outputs):
            batch = None
            for name, arr in inputs.items():
                want = exact.get(name)
                if want is None or arr.dtype != want[0]:
                    break
                shape = arr.shape
                if self._spec.batching:
                    if batch is None:
                        batch = shape[0] if shape else 0
                    if not shape or shape[0] != batch or not 1 <= batch <= self._spec.max_batch_size:
                        break
                    shape = shape[1:]
                if shape != want[1]:
                    break
            else:
                return
        validate_request(self._spec, request)


def validate_request(spec: ModelSpec, request: InferRequest) -> None:
    declared = {s.name: s for s in spec.inputs}
    extra = sorted(set(request.inputs) - set(declared))
    if extra:
        raise InvalidArgument(f"model '{spec.name}' has no input(s) {', '.join(extra)}")
    missing = sorted(set(declared) - set(request.inputs))
    if missing:
        raise InvalidArgument(f"model '{spec.name}' is missing input(s) {', '.join(missing)}")
    batch: int | None = None
    for name, arr in request.inputs.items():
        want = declared[name]
        got = DataType.from_numpy(arr.dtype)
        if got is not want.datatype:
            raise InvalidArgument(f"input '{name}': datatype {got.wire_name}, model expects {want.datatype.wire_name}")
        shape = arr.shape
        if spec.batching:
            if len(shape) != len(want.shape) + 1:
                raise InvalidArgument(
                    f"input '{name}': shape {list(shape)}, model expects [-1, {', '.join(map(str, want.shape))}]"
                )
            if batch is None:
                batch = shape[0]
            elif shape[0] != batch:
                raise InvalidArgument(f"input '{name}': batch size {shape[0]} differs from the other inputs' {batch}")
            if not 1 <= shape[0] <= spec.max_batch_size:
                raise InvalidArgument(
                    f"input '{name}': batch size {shape[0]} is outside 1..{spec.max_batch_size} (max_batch_size)"
                )
            shape = shape[1:]
        if len(shape) != len(want.shape) or any(w not in (-1, g) for w, g in zip(want.shape, shape, strict=True)):
            prefix = "[-1, " if spec.batching else "["
            raise InvalidArgument(
                f"input '{name}': shape {list(arr.shape)}, model expects {prefix}{', '.join(map(str, want.shape))}]"
            )
    outputs = {s.name for s in spec.outputs}
    unknown = [name for name in request.requested_outputs if name not in outputs]
    if unknown:
        raise InvalidArgument(f"model '{spec.name}' has no output(s) {', '.join(unknown)}")


def _require_utf8(name: str, arr: np.ndarray) -> None:
    """ONNX Runtime's string tensors hold text: other bytes would reach the model altered (U+FFFD), not as sent."""
    for index, value in enumerate(arr.reshape(-1)):
        if isinstance(value, bytes):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgument(
                    f"input '{name}': element {index} is not UTF-8 text (byte {exc.start}); BYTES inputs of ONNX "
                    "models are strings"
                ) from None
