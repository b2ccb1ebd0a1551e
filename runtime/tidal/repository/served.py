"""One ready model version as everything outside the repository sees it: methods, never its fields.

The data plane, the control loop and the control RPC ask a ServedVersion what they need (its signature,
levels, knobs, statistics, the controller's view of its variants); only the repository builds one and
reaches into its spec, backends and scheduler.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

from tidal.backends.base import Backend
from tidal.backends.placement import Placement
from tidal.control.api import ModelInfo, Pool, Setpoint, Slo, VariantInfo
from tidal.proto import model_config_pb2 as mc
from tidal.repository.config import ModelSpec
from tidal.repository.validation import Signature
from tidal.repository.variants import Variant, VariantManifest, split_profile_key
from tidal.scheduling.engine import ModelScheduler
from tidal.scheduling.knobs import Knobs
from tidal.scheduling.stats import ModelStats
from tidal.types import InferRequest, InferResponse, Observation, TensorSpec


def close_runners(runners: dict[str, list[Backend]]) -> None:
    for instances in runners.values():
        for backend in instances:
            backend.close()


def _setpoint(knobs: Knobs) -> Setpoint:
    return Setpoint(
        knobs.active_variant, knobs.max_batch_size, knobs.max_queue_delay_us, knobs.admission_limits,
        knobs.route,
    )


def _device_profiles(entry: Variant) -> dict[str, tuple[tuple[int, ...], tuple[float, ...]]]:
    """cpu | gpu -> the profile measured there, of the backend the variant prefers among those profiled."""
    found: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] = {}
    rank = {name: i for i, name in enumerate(entry.backends)}
    for key in sorted(entry.profiles, key=lambda k: rank.get(split_profile_key(k)[0], len(rank))):
        profile = entry.profiles[key]
        found.setdefault(split_profile_key(key)[1], (profile.batch_sizes, profile.p50_ms))
    return found


@dataclass
class ServedVersion:
    """One ready version: its spec, its backends (per variant) and its scheduler."""

    name: str
    version: int
    spec: ModelSpec
    runners: dict[str, list[Backend]]
    scheduler: ModelScheduler
    engines: dict[str, str] = field(default_factory=dict)  # variant -> the backend that loaded it
    manifest: VariantManifest | None = None  # accuracies and latency profiles, when the model has variants
    placement: Placement | None = None  # where each instance runs, and from which instance_group

    @functools.cached_property
    def output_specs(self) -> dict[str, TensorSpec]:
        return {s.name: s for s in self.spec.outputs}

    # What the data plane and the control surfaces need, so none of them reaches into spec or scheduler.
    @property
    def batched(self) -> bool:
        """Dim 0 of every input and output is the batch."""
        return self.spec.batching

    @property
    def priority_levels(self) -> int:
        return self.spec.scheduler.priority_levels

    def level_of(self, priority: int) -> int:
        """The priority level a request's `priority` parameter selects (0 or out of range: the default)."""
        return self.spec.scheduler.level_of(priority)

    @property
    def slo_p99_ms(self) -> float:
        """The p99 target as configured (0: none); the controller may hold a live one."""
        return self.spec.slo_p99_ms

    @property
    def config(self) -> mc.ModelConfig:
        """The complete (auto-completed) model configuration."""
        return self.spec.config

    @property
    def platform(self) -> str:
        return self.spec.config.platform or self.spec.config.backend

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(self.spec.inputs)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(self.spec.outputs)

    async def infer(self, request: InferRequest) -> InferResponse:
        return await self.scheduler.infer(request)

    def stats(self) -> ModelStats:
        return self.scheduler.stats()

    def pending(self) -> int:
        return self.scheduler.pending()

    def queue_depth(self) -> dict[int, int]:
        return self.scheduler.queue_depth()

    @property
    def knobs(self) -> Knobs:
        """The live knob set (the configured one until something changes it)."""
        return self.scheduler.knobs

    def apply(self, knobs: Knobs) -> None:
        """Swap the live knobs atomically; InvalidArgument (and no change) if they do not fit this model."""
        self.scheduler.apply(knobs)

    def setpoint(self) -> Setpoint:
        """The live knobs as the controller speaks of them: the one Knobs -> Setpoint conversion."""
        return _setpoint(self.scheduler.knobs)

    def apply_setpoint(self, setpoint: Setpoint) -> None:
        """A controller decision onto the live knobs; what the controller does not steer stays as it is."""
        self.scheduler.apply(replace(
            self.scheduler.knobs,
            active_variant=setpoint.variant,
            max_batch_size=setpoint.max_batch_size,
            max_queue_delay_us=setpoint.max_queue_delay_us,
            admission_limits=setpoint.admission_limits,
            route=setpoint.route,
        ))

    def observe(self) -> Observation:
        """The scheduler's observation for the controller; consumes its samples (the control loop's alone)."""
        return self.scheduler.observe()

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(sorted(self.runners))

    @property
    def instances(self) -> int:
        return len(next(iter(self.runners.values())))

    def configured_slo(self) -> Slo:
        return self.spec.slo()

    def model_info(self, key: str) -> ModelInfo:
        """What the controller needs to know of this version: limits, levels, variants with their profiles."""
        variants = []
        for name in self.runners:
            entry = self.manifest.variants.get(name) if self.manifest else None
            if entry is None:
                variants.append(VariantInfo(name, None))
                continue
            # The profile of the backend that really runs it; another backend's is better than none.
            profile = entry.profiles.get(self.engines.get(name, "")) or next(iter(entry.profiles.values()), None)
            accuracy = entry.accuracy
            variants.append(VariantInfo(
                name,
                None if accuracy is None else accuracy.value,
                1.0 if accuracy is None else accuracy.top1_agreement,
                profile.batch_sizes if profile else (),
                profile.p50_ms if profile else (),
                _device_profiles(entry),
            ))
        pools = tuple(Pool(device, members) for device, members in self.placement.pools()) if self.placement else ()
        return ModelInfo(key, self.spec.max_batch_size, self.instances, self.priority_levels, tuple(variants),
                         _setpoint(self.spec.knobs), pools)

    @functools.cached_property
    def signature(self) -> Signature:
        return Signature(self.spec)

    async def close(self) -> None:
        """Drain the scheduler, then release every backend instance."""
        await self.scheduler.stop(drain=True)
        close_runners(self.runners)
