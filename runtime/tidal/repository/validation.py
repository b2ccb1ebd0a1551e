"""Checks a decoded request against the model's declared signature.

Done before queueing so a bad request fails alone, with a message naming the
input, and never reaches a batch where it would fail its neighbours.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from tidal.errors import InvalidArgument
from tidal.repository.config import ModelSpec
from tidal.types import DataType, InferRequest

# What a request declares for each input before anything is converted: name -> (datatype, shape).
Declared = Mapping[str, tuple[DataType, tuple[int, ...]]]


class Signature:
    """A model's inputs as exact (dtype, shape) pairs, for a check that costs one comparison per input.

    Built once per loaded version. Requests that match exactly pass here; anything else (a variable dim,
    another batch size, a mistake) goes through `validate_declared`, which also words the error.
    `check_declared` runs on what the wire declares, before any tensor is converted, so a request the
    model cannot take is refused without paying for its data; `check` runs on the decoded arrays.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self._spec = spec
        exact = {s.name: (s.datatype, s.shape) for s in spec.inputs if -1 not in s.shape}
        self._exact = {name: (dt.np_dtype, shape) for name, (dt, shape) in exact.items()}
        self._exact_declared = exact
        self._complete = len(exact) == len(spec.inputs)
        self._outputs = frozenset(s.name for s in spec.outputs)
        self._text = tuple(s.name for s in spec.inputs if s.datatype is DataType.BYTES)

    def check(self, request: InferRequest) -> None:
        inputs = request.inputs
        for name in self._text:
            if name in inputs:
                _require_utf8(name, inputs[name])
        pairs = ((name, arr.dtype, arr.shape) for name, arr in inputs.items())
        if not self._fits(pairs, len(inputs), request.requested_outputs, self._exact):
            validate_request(self._spec, request)

    def check_declared(self, declared: Declared, requested_outputs: Sequence[str]) -> None:
        pairs = ((name, dt, shape) for name, (dt, shape) in declared.items())
        if not self._fits(pairs, len(declared), requested_outputs, self._exact_declared):
            validate_declared(self._spec, declared, requested_outputs)

    def _fits(
        self, inputs: Iterable[tuple[str, Any, tuple[int, ...]]], count: int, outputs: Sequence[str], exact: dict
    ) -> bool:
        """True when every input matches exactly; False sends the request to the full, worded check."""
        if not self._complete or count != len(exact) or not self._outputs.issuperset(outputs):
            return False
        batch = None
        for name, dtype, shape in inputs:
            want = exact.get(name)
            if want is None or dtype != want[0]:
                return False
            if self._spec.batching:
                if batch is None:
                    batch = shape[0] if shape else 0
                if not shape or shape[0] != batch or not 1 <= batch <= self._spec.max_batch_size:
                    return False
                shape = shape[1:]
            if shape != want[1]:
                return False
        return True


def validate_request(spec: ModelSpec, request: InferRequest) -> None:
    declared = {name: (DataType.from_numpy(arr.dtype), arr.shape) for name, arr in request.inputs.items()}
    validate_declared(spec, declared, request.requested_outputs)


def validate_declared(spec: ModelSpec, declared: Declared, requested_outputs: Sequence[str]) -> None:
    wanted = {s.name: s for s in spec.inputs}
    extra = sorted(set(declared) - set(wanted))
    if extra:
        raise InvalidArgument(f"model '{spec.name}' has no input(s) {_names(extra)}")
    missing = sorted(set(wanted) - set(declared))
    if missing:
        raise InvalidArgument(f"model '{spec.name}' is missing input(s) {_names(missing)}")
    batch: int | None = None
    for name, (got, full_shape) in declared.items():
        want = wanted[name]
        if got is not want.datatype:
            raise InvalidArgument(f"input '{name}': datatype {got.wire_name}, model expects {want.datatype.wire_name}")
        shape = full_shape
        if spec.batching:
            if len(shape) != len(want.shape) + 1:
                raise InvalidArgument(
                    f"input '{name}': shape {_shape(shape)}, model expects [-1, {', '.join(map(str, want.shape))}]"
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
                f"input '{name}': shape {_shape(full_shape)}, model expects {prefix}{', '.join(map(str, want.shape))}]"
            )
    outputs = {s.name for s in spec.outputs}
    unknown = [name for name in requested_outputs if name not in outputs]
    if unknown:
        raise InvalidArgument(f"model '{spec.name}' has no output(s) {_names(unknown)}")


_ECHO = 8  # names or dims an error repeats before it says how many more there are


def _names(names: Sequence[str]) -> str:
    """A request may name thousands of inputs: the error shows a few, so it stays within gRPC's metadata."""
    shown = ", ".join(names[:_ECHO])
    return shown if len(names) <= _ECHO else f"{shown} and {len(names) - _ECHO} more"


def _shape(shape: Sequence[int]) -> str:
    if len(shape) <= _ECHO:
        return str(list(shape))
    return f"[{', '.join(map(str, shape[:_ECHO]))}, ... ({len(shape)} dims)]"


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
