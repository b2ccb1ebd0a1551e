"""Transport-neutral request and tensor types shared by every layer.

Nothing here knows protobuf or gRPC: transport converts to and from these,
the scheduler queues them, backends consume plain numpy arrays.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tidal.errors import InvalidArgument


class DataType(enum.Enum):
    """KServe v2 tensor datatypes with their numpy equivalents."""

    BOOL = ("BOOL", np.dtype(np.bool_))
    UINT8 = ("UINT8", np.dtype(np.uint8))
    UINT16 = ("UINT16", np.dtype(np.uint16))
    UINT32 = ("UINT32", np.dtype(np.uint32))
    UINT64 = ("UINT64", np.dtype(np.uint64))
    INT8 = ("INT8", np.dtype(np.int8))
    INT16 = ("INT16", np.dtype(np.int16))
    INT32 = ("INT32", np.dtype(np.int32))
    INT64 = ("INT64", np.dtype(np.int64))
    FP16 = ("FP16", np.dtype(np.float16))
    FP32 = ("FP32", np.dtype(np.float32))
    FP64 = ("FP64", np.dtype(np.float64))
    BYTES = ("BYTES", np.dtype(np.object_))

    def __init__(self, wire_name: str, np_dtype: np.dtype) -> None:
        self.wire_name = wire_name
        self.np_dtype = np_dtype

    @property
    def itemsize(self) -> int:
        """Bytes per element on the wire; 0 for variable-length BYTES."""
        return 0 if self is DataType.BYTES else self.np_dtype.itemsize

    @classmethod
    def from_wire(cls, name: str) -> DataType:
        try:
            return _BY_WIRE[name]
        except KeyError:
            raise InvalidArgument(f"unsupported datatype '{name}'") from None

    @classmethod
    def from_numpy(cls, dtype: np.dtype) -> DataType:
        """On the request path for every input: one dict lookup."""
        dtype = np.dtype(dtype)
        found = _BY_NUMPY.get(dtype)
        if found is not None:
            return found
        if dtype.kind in ("O", "S", "U"):
            return DataType.BYTES
        raise InvalidArgument(f"numpy dtype {dtype} has no KServe datatype")


_BY_WIRE = {m.wire_name: m for m in DataType}
_BY_NUMPY = {m.np_dtype: m for m in DataType}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output as declared by the model config; -1 marks a variable dim."""

    name: str
    datatype: DataType
    shape: tuple[int, ...]


class Priority(int):
    """1 is the highest level; the scheduler maps 0 (unset) to the model's default."""


@dataclass(slots=True)
class InferRequest:
    """One client request after decoding, before scheduling.

    `deadline_s` is on the scheduler's monotonic clock and already includes
    the time since arrival, so queue time counts against it.
    """

    model_name: str
    model_version: str
    inputs: dict[str, np.ndarray]
    requested_outputs: tuple[str, ...] = ()
    id: str = ""
    priority: int = 0
    timeout_us: int | None = None
    arrival_s: float = 0.0
    deadline_s: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """Rows along dim 0; every input of a batching model shares it."""
        first = next(iter(self.inputs.values()), None)
        return 1 if first is None or first.ndim == 0 else int(first.shape[0])


@dataclass(slots=True)
class InferResponse:
    """Outputs for one request, in the order the client asked for them."""

    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BatchSample:
    """One executed batch, as the scheduler measured it."""

    rows: int
    compute_s: float  # input + infer + output
    variant: str


@dataclass(frozen=True, slots=True)
class LatencySample:
    """One successful request, timed inside the server."""

    level: int
    total_s: float  # arrival -> answer
    queue_s: float  # arrival -> batch start


@dataclass(frozen=True, slots=True)
class EdgeObservation:
    """What the transport saw of one model: requests reaching the server before any queue the scheduler owns."""

    received: int  # inference RPCs whose handler started (cumulative), admitted or not
    refused: dict[int, int]  # priority level -> refused by the edge gate before decoding (cumulative)
    inflight: int  # admitted and not yet answered
    limit: int  # the gate's current in-flight limit; 0 while the gate admits all
    lag_ms: float  # the event loop's recent worst lag: what an arriving RPC waits before its handler runs
    busy: float  # share of the event loop's time spent working (1 when lag says it is starved)


@dataclass(frozen=True)
class Observation:
    """What the scheduler shows the SLO controller each period.

    Lives here, not in scheduling, because the controller may import only
    types, config and clock. Samples cover the time since the previous
    observation; counters are cumulative since the scheduler started.
    """

    at_s: float  # on the scheduler's clock
    queue_depth: dict[int, int]  # priority level -> queued now
    running: int  # requests in batches executing now
    arrivals: dict[int, int]  # priority level -> admitted since start (cumulative)
    completed: int  # successful requests since start
    failed: int  # failed requests since start
    batches: tuple[BatchSample, ...]
    latencies: tuple[LatencySample, ...]
    shed: dict[int, int] = field(default_factory=dict)  # priority level -> refused by admission limits (cumulative)
    edge: EdgeObservation | None = None  # the transport's view of the same model, where a transport feeds one


@dataclass(frozen=True)
class LevelRoute:
    """Levels 1..`levels` run only on the instances `instances`, with `variant`, in batches of at most
    `max_batch_size` rows that wait at most `max_queue_delay_us` for company (their own window: they were
    planned at their own target); every other level runs on the remaining instances under the model's own
    variant, batch limit and window. The controller plans it, the scheduler runs it."""

    levels: int
    instances: tuple[int, ...]
    variant: str
    max_batch_size: int
    max_queue_delay_us: int
