"""The request path, transport-neutral: admit -> look up -> validate -> schedule -> count -> respond.

Both protocol adapters (gRPC in transport/servicer.py, HTTP in transport/http/) read what they need to find
and admit a request (`Head`), hand the data plane a `Decode` that converts their wire form once the model is
known, and convert the answer back. Everything else — readiness, the model lookup, the edge's admission and
counting, the signature check, scheduling, statistics, metrics, classification — happens here, once, so
the two protocols cannot drift apart. Wire types never enter this package.

Failures are returned as `TidalError`, never raised to the adapter: a raised error's traceback would hold
the adapter's frame, and with it the request, in a reference cycle (see failures.detached).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

import tidal
from tidal.clock import Clock
from tidal.dataplane.edge import EdgeMeter
from tidal.dataplane.failures import detached, failure, log
from tidal.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    TidalError,
    Unavailable,
    Unimplemented,
)
from tidal.logs import FailureDigest
from tidal.metrics import ServerMetrics
from tidal.repository.manager import ModelManager, ServedVersion
from tidal.scheduling.stats import ModelStats
from tidal.types import DataType, InferRequest, InferResponse, TensorSpec

EXTENSIONS = (
    "classification", "model_repository", "model_configuration", "statistics", "schedule_policy", "parameters",
    "binary_tensor_data",
)
FINAL_RESPONSE_PARAM = "triton_enable_empty_final_response"
_NO_MODEL_CONTROL = "explicit model load/unload is disabled in this --model-control-mode (use 'explicit')"


@dataclass(frozen=True, slots=True)
class Head:
    """What an adapter reads of a request before decoding it: enough to find the model and admit it."""

    model: str
    version: str = ""
    priority: Any = None  # the `priority` parameter as sent (None: absent); checked here
    id: str = ""
    remaining_s: float | None = None  # the client's deadline, where its protocol carries one


class Decode(Protocol):
    """The adapter's converter, called once the request is admitted: the model's signature is known, so a
    request it cannot take is refused from its declarations before any tensor is converted. Returns the
    request and the outputs asked for as Triton classifications (name -> top N)."""

    def __call__(
        self, served: ServedVersion, arrival_s: float, deadline_s: float | None
    ) -> tuple[InferRequest, dict[str, int]]: ...


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batched: bool  # shapes gain a leading -1


@dataclass(frozen=True, slots=True)
class VersionStats:
    name: str
    version: str
    stats: ModelStats


def priority_of(value: Any) -> int:
    """The priority parameter as an integer; 0 when absent. tritonclient sends uint64, others int64."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"parameter 'priority' must be an integer, got {value!r}")
    if value < 0:
        raise InvalidArgument(f"parameter 'priority' must not be negative, got {value}")
    return value


def check_classification(name: str, spec: TensorSpec | None) -> None:
    if spec is not None and spec.datatype is DataType.BYTES:
        raise InvalidArgument(f"output '{name}': classification needs a numeric output, not BYTES")


def classify(arr: np.ndarray, count: int, batched: bool) -> np.ndarray:
    """The `count` largest values of each batch row as b"value:index", largest first, in Triton's format."""
    rows = arr.reshape(arr.shape[0] if batched else 1, -1)
    values = rows.astype(np.float64)
    top = np.argsort(-values, axis=1, kind="stable")[:, :count]
    as_text = "{:f}:{}" if arr.dtype.kind in "fc" else "{:.0f}:{}"
    out = np.empty(top.shape, dtype=object)
    for r, indices in enumerate(top):
        out[r] = [as_text.format(values[r, i], i).encode() for i in indices]
    return out if batched else out[0]


class DataPlane:
    """One per server; both adapters await the same instance. Event-loop only."""

    def __init__(
        self,
        manager: ModelManager,
        clock: Clock,
        is_ready: Callable[[], bool],
        is_accepting: Callable[[], bool],
        metrics: ServerMetrics | None = None,
        model_control: bool = True,
        edge: EdgeMeter | None = None,
    ) -> None:
        self._manager = manager
        self._clock = clock
        self._is_ready = is_ready
        self._is_accepting = is_accepting
        self._metrics = metrics
        self._model_control = model_control
        self.edge = edge or EdgeMeter(clock.now)
        self.digest = FailureDigest(log)
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def drained(self) -> None:
        """Returns once no inference is running; shutdown waits on it before closing anything."""
        await self._idle.wait()

    # -- inference ----------------------------------------------------------------------
    async def infer(self, head: Head, decode: Decode) -> InferResponse | TidalError:
        """The one request path. Never raises: a failure comes back as the error to answer with, logged."""
        self._inflight += 1
        self._idle.clear()
        try:
            return await self._admit(head, decode)
        except Exception as exc:
            error: BaseException = exc
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
        return self.failed(head.model, head.id, error)

    def failed(self, model: str, request_id: str, exc: BaseException) -> TidalError:
        """What a request that failed before or outside `infer` (an unreadable message) is answered with."""
        answer = failure(model, request_id, exc, self.digest)  # logs the traceback of a bug first
        exc.__traceback__ = None
        return detached(answer)

    async def _admit(self, head: Head, decode: Decode) -> InferResponse:
        """Admission reads only the head: a refusal decodes nothing."""
        now = self._clock.now()
        if not self._is_accepting():
            raise Unavailable("server is not accepting requests (starting or shutting down)")
        served = self._manager.get(head.model, head.version)
        self.edge.received(served.name)
        level = served.level_of(priority_of(head.priority))
        remaining = head.remaining_s
        if remaining is not None and remaining <= 0:
            self._observe(served, level, now, ok=False)
            raise DeadlineExceeded("the request deadline passed before the server could start on it")
        gate = self.edge.gate(served.name, served.priority_levels)
        refusal = gate.admit(level, now)
        if refusal is not None:
            self._observe(served, level, now, ok=False)
            raise ResourceExhausted(
                f"shed at arrival to hold the latency SLO of model '{served.name}': priority {level} is at its "
                f"in-flight limit ({refusal.inflight} in flight, {refusal.limit} allowed); retry after "
                f"{refusal.pushback_ms} ms, on another replica, or with a higher priority",
                pushback_ms=refusal.pushback_ms,
            )
        try:
            return await self._run(served, level, now, remaining, decode)
        finally:
            gate.release(level, self._clock.now() - now)

    async def _run(
        self, served: ServedVersion, level: int, now: float, remaining: float | None, decode: Decode
    ) -> InferResponse:
        request, classes = decode(served, now, None if remaining is None else now + remaining)
        served.signature.check(request)  # what only the decoded arrays show (BYTES must be UTF-8)
        for name in classes:
            check_classification(name, served.output_specs.get(name))
        request.model_name, request.model_version = served.name, str(served.version)
        try:
            response = await served.infer(request)
        except TidalError:
            self._observe(served, level, now, ok=False)
            raise
        self._observe(served, level, now, ok=True)
        self._declared(response, served, classes)
        if request.parameters.get(FINAL_RESPONSE_PARAM):
            response.parameters["triton_final_response"] = True
        return response

    @staticmethod
    def _declared(response: InferResponse, served: ServedVersion, classes: dict[str, int]) -> None:
        """Outputs in their declared datatype, or as their classification: adapters encode what they get."""
        outputs, specs = response.outputs, served.output_specs
        for name, arr in outputs.items():
            if name in classes:
                outputs[name] = classify(arr, classes[name], served.batched)
                continue
            spec = specs.get(name)
            if spec is not None and spec.datatype is not DataType.BYTES and arr.dtype != spec.datatype.np_dtype:
                outputs[name] = arr.astype(spec.datatype.np_dtype)

    def _observe(self, served: ServedVersion, level: int, arrival_s: float, ok: bool) -> None:
        if self._metrics is not None:
            latency = self._clock.now() - arrival_s
            self._metrics.observe(served.name, str(served.version), level, latency, served.slo_p99_ms, ok)

    # -- health, metadata, statistics ----------------------------------------------------
    def ready(self) -> bool:
        return self._is_ready()

    def model_ready(self, name: str, version: str = "") -> bool:
        return self._manager.ready(name, version)

    @staticmethod
    def server_metadata() -> tuple[str, str, Sequence[str]]:
        return "tidal", tidal.__version__, EXTENSIONS

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        served = self._manager.get(name, version)
        versions = self._manager.ready_versions(served.name)
        return ModelMetadata(served.name, versions, served.platform, served.inputs, served.outputs, served.batched)

    def model_config(self, name: str, version: str = ""):
        """The complete model configuration (the model_config protobuf message, which is the schema)."""
        return self._manager.get(name, version).config

    def statistics(self, name: str = "", version: str = "") -> list[VersionStats]:
        return [VersionStats(s.name, str(s.version), s.stats()) for s in self._manager.select(name, version)]

    # -- repository ---------------------------------------------------------------------
    async def repository_index(self, ready_only: bool = False) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) rows."""
        rows = await self._manager.index()
        return [r for r in rows if r[2] == "READY"] if ready_only else rows

    async def load(self, name: str, parameters: Sequence[str] = ()) -> None:
        if not self._model_control:
            raise FailedPrecondition(_NO_MODEL_CONTROL)
        if parameters:
            raise Unimplemented(f"load parameters are not supported by tidal: {', '.join(sorted(parameters))}")
        await self._manager.load(name)

    async def unload(self, name: str) -> None:
        if not self._model_control:
            raise FailedPrecondition(_NO_MODEL_CONTROL)
        await self._manager.unload(name)
