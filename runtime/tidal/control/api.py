"""The controller's inputs and outputs as plain values.

tidal.control may import only types, config and clock, so it speaks in
these; the composition root (app.py) turns the scheduler's knobs and the
repository's variant manifest into them, and a `Setpoint` back into knobs.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from tidal.errors import InvalidArgument
from tidal.types import LevelRoute

DEFAULT_PERIOD_S = 0.1


class Mode(enum.Enum):
    OFF = "off"  # observe and report only
    BATCH = "batch"  # retune batch size, window and admission; the variant stays
    FULL = "full"  # also switch variants


@dataclass(frozen=True)
class Slo:
    """One model's objective and how the controller may pursue it; every field may change live."""

    p99_ms: float = 0.0  # end-to-end p99 target inside the server; 0 = none (the controller stays off)
    min_accuracy: float = 0.0  # variants below it are never served; 0 = any
    priority_p99_ms: Mapping[int, float] = field(default_factory=dict)  # level -> target, overriding p99_ms
    mode: Mode = Mode.OFF
    period_s: float = DEFAULT_PERIOD_S

    def __post_init__(self) -> None:
        levels = self.priority_p99_ms.values()
        if not all(map(math.isfinite, (self.p99_ms, *levels))) or self.p99_ms < 0 or any(v <= 0 for v in levels):
            raise InvalidArgument("SLO targets must be finite and positive (p99_ms 0 means none)")
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise InvalidArgument(f"min_accuracy must be within 0..1, got {self.min_accuracy}")
        if not 0.01 <= self.period_s <= 10.0:
            raise InvalidArgument(f"the control period must be within 10 ms..10 s, got {self.period_s * 1e3:g} ms")

    @property
    def engaged(self) -> bool:
        """Whether the controller acts on this model."""
        return self.mode is not Mode.OFF and self.p99_ms > 0

    def target_ms(self, level: int) -> float:
        return self.priority_p99_ms.get(level, self.p99_ms)


@dataclass(frozen=True)
class VariantInfo:
    """One servable variant as the controller weighs it."""

    name: str
    accuracy: float | None  # None: never measured; ranked below every measured one
    agreement: float = 1.0  # top-1 agreement with the reference variant: breaks accuracy ties
    batch_sizes: tuple[int, ...] = ()  # the offline profile (p50 per batch size); empty: learn online
    p50_ms: tuple[float, ...] = ()
    # cpu | gpu -> (batch sizes, p50 ms) measured there: what a variant would cost on a pool of the other kind
    device_profiles: Mapping[str, tuple[tuple[int, ...], tuple[float, ...]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Pool:
    """The instances of one instance_group: the unit a priority level may be routed to on its own."""

    device: str  # cpu | gpu: which of a variant's device profiles applies
    instances: tuple[int, ...]  # indices into the model's instances


@dataclass(frozen=True)
class Setpoint:
    """The part of the scheduler's knobs the controller sets."""

    variant: str
    max_batch_size: int
    max_queue_delay_us: int
    admission_limits: tuple[tuple[int, int], ...] = ()  # (level, max queued at or above it); () admits all
    route: LevelRoute | None = None  # None: every level shares every instance


@dataclass(frozen=True)
class ModelInfo:
    """What stays fixed while a model version is loaded."""

    name: str
    max_batch_size: int  # the config's limit; 0 = no batching
    instances: int
    priority_levels: int
    variants: tuple[VariantInfo, ...]
    configured: Setpoint  # restored when the controller is turned off
    pools: tuple[Pool, ...] = ()  # one per instance_group, as placed on this host


class Reason(enum.Enum):
    HOLD = "hold"  # nothing to change
    OFF = "off"  # controller off (or no SLO); with a change: configured knobs restored
    WARMUP = "warmup"  # nothing to predict from yet
    RETUNE = "retune"  # same variant, other batch limit or window
    DOWN_PREDICTED = "down_predicted"  # the queueing estimate says the active variant cannot hold the SLO
    DOWN_OBSERVED = "down_observed"  # the measured p99 broke the SLO
    UP = "up"  # load fell: a more accurate variant holds the SLO with margin
    SHED = "shed"  # no variant holds the SLO: refusing, lowest priority first
    UNATTAINABLE = "unattainable"  # not even an unloaded batch meets the SLO; nothing to shed for
    ROUTE = "route"  # priority 1 on instances of its own: the rest batches at its looser target on the others


@dataclass(frozen=True)
class Decision:
    """One control period's outcome for one model; `changed` ones are applied, logged and kept."""

    model: str
    at_s: float
    setpoint: Setpoint
    changed: bool
    reason: Reason
    detail: str
    observed_p50_ms: float | None
    observed_p99_ms: float | None
    predicted_p99_ms: float | None
    arrival_rps: float  # offered requests per second (shed ones included)
    utilisation: float = 0.0  # offered load / what the model serves within its SLO (busy share without an SLO)
    inflight_limit: int = 0  # requests that fit inside the server within the SLO, predicted; 0: no prediction


def model_key(name: str, version: int | str) -> str:
    """How the controller, the control loop and the control RPC name one served model version."""
    return f"{name}:{version}"
