"""What the SLO controller remembers about each model between periods, and the constants it runs by.

Plain data: the decisions are made in slo.py.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from tidal.control.api import Decision, ModelInfo, Slo
from tidal.control.latency import BatchLatency
from tidal.control.plan import Line, Load
from tidal.control.window import Ewma, LatencyWindow, RateMeter

HISTORY = 32  # changed decisions kept per model for `tidal control status`
MAX_DRIFT = 4.0  # a machine-wide slowdown beyond this is more likely a bad profile than a slow machine


@dataclass(frozen=True)
class Tuning:
    """The controller's constants; the defaults are what the perf runs in perf/RESULTS.md used."""

    window_s: float = 2.0  # latency percentiles and the long rate span
    fast_rate_s: float = 0.3  # short rate span: a step up shows within a few periods
    breach_rate_s: float = 0.1  # while the SLO is measured broken, or arrivals surge, this span's rate counts too
    surge_sigmas: float = 4.0  # a surge: this many Poisson standard deviations above the long span's rate
    tail_factor: float = 2.0  # p99 ~ window + tail * L(batch) + offset
    latency_margin: float = 0.85  # plans aim at this fraction of the SLO
    max_delay_share: float = 0.25  # the batching window keeps at most this share of the target
    up_utilisation: float = 0.6  # a more accurate variant must run at most this loaded ...
    up_hold_s: float = 2.0  # ... for this long before the controller moves up
    settle_utilisation: float = 0.7  # where a move down lands
    leave_utilisation: float = 0.85  # above this the active variant is left at once
    min_samples: int = 100  # latencies needed before a measured p99 is judged
    half_life_s: float = 5.0  # of measured batch times in the latency models
    batch_hysteresis: float = 0.25  # the batch limit moves up by more than this fraction, down by half of it
    offset_utilisation: float = 0.7  # the model's offset is learned only below this load
    accuracy_resolution: float = 0.005  # accuracies closer than this are ties
    breach_memory_s: float = 30.0  # how long the load at which a variant broke the SLO caps its capacity
    breach_utilisation: float = 0.5  # below this (and without a backlog) a measured breach is not the load's doing
    rate_min_events: int = 20  # fewer arrivals in a rate window count as spread over all of it
    drift_min_ms: float = 5.0  # batches profiled shorter than this say little about the machine (fixed costs rule)


@dataclass
class ModelMemory:
    """Everything the controller remembers about one model version."""

    info: ModelInfo
    slo: Slo
    tuning: Tuning
    window: LatencyWindow = field(init=False)
    offered: RateMeter = field(init=False)
    latency: dict[str, BatchLatency] = field(init=False)
    device_latency: dict[tuple[str, str], BatchLatency] = field(init=False)  # (variant, cpu|gpu): from profiles
    drift: Ewma = field(default_factory=lambda: Ewma(0.3))
    offsets: dict[str, Ewma] = field(default_factory=dict)  # per variant: measured p99 beyond the estimate
    ceilings: dict[str, tuple[float, float]] = field(default_factory=dict)  # variant -> (rows/ms it broke at, when)
    rows: Ewma = field(default_factory=lambda: Ewma(0.2))
    last_at: float | None = None
    since_s: float = -math.inf  # latencies of requests that arrived before this belong to an older setting
    drain_s: float = 0.0  # how long the queue seen last period takes to drain under the chosen plan
    fit_since: float | None = None  # when a better variant (or the way out of shedding) started to fit
    shedding: bool = False
    scale: float = 1.0  # the share of the estimated capacity that admission limits assume
    engaged: bool = False  # the controller changed knobs since it last restored the configured ones
    busy: float = 0.0  # share of the instances' time spent executing in the last period
    history: deque[Decision] = field(default_factory=lambda: deque(maxlen=HISTORY))
    last: Decision | None = None

    def __post_init__(self) -> None:
        self.window = LatencyWindow(self.tuning.window_s)
        self.offered = RateMeter(self.tuning.window_s)
        self.latency = {v.name: BatchLatency(v.batch_sizes, v.p50_ms) for v in self.info.variants}
        self.device_latency = {
            (v.name, device): BatchLatency(*profile)
            for v in self.info.variants
            for device, profile in v.device_profiles.items()
        }

    def line(self, variant: str, device: str, drift: float) -> Line | None:
        """A variant's batch latency on `device`: the line learned online where every pool is the same kind of
        device, else its profile there, scaled by the machine-wide drift; None when neither is known."""
        if len({pool.device for pool in self.info.pools}) == 1:
            latency = self.latency.get(variant)
        else:
            latency = self.device_latency.get((variant, device))
        return Line(*latency.line(drift)) if latency is not None and latency.known() else None


@dataclass(frozen=True)
class Period:
    """What one period's decision is based on."""

    load: Load
    rates: dict[int, float]  # offered rows per ms, per level
    request_rps: float
    slo_ms: float  # the tightest target of the levels with traffic
    breach: str  # why the measurements say the SLO is broken; "" when they do not
    strained: str  # the same against the margin the plans aim at
    p50: float | None
    p99: float | None
    busy: float = 0.0  # share of the instances' time spent executing since the last period
