"""TidalControl: read and steer the live knobs over gRPC (used by `tidal control`, tests and operators)."""

from __future__ import annotations

import dataclasses

from tidal.errors import InvalidArgument, TidalError
from tidal.repository.manager import ModelManager, ServedVersion
from tidal.scheduling.knobs import Knobs
from tidal.transport._gen import control_pb2 as cpb
from tidal.transport._gen import control_pb2_grpc as cpb_grpc
from tidal.transport.status import GRPC_STATUS


def knobs_message(knobs: Knobs) -> cpb.Knobs:
    return cpb.Knobs(
        max_batch_size=knobs.max_batch_size,
        max_queue_delay_us=knobs.max_queue_delay_us,
        preferred_batch_sizes=list(knobs.preferred_batch_sizes),
        instance_count=knobs.instance_count,
        active_variant=knobs.active_variant,
    )


def updated_knobs(current: Knobs, update: cpb.KnobsUpdate) -> Knobs:
    """`current` with the fields the update sets; Knobs validates the result (InvalidArgument)."""
    changes: dict[str, object] = {}
    for name in ("max_batch_size", "max_queue_delay_us", "instance_count", "active_variant"):
        if update.HasField(name):
            changes[name] = getattr(update, name)
    if update.set_preferred_batch_sizes:
        changes["preferred_batch_sizes"] = tuple(update.preferred_batch_sizes)
    return dataclasses.replace(current, **changes)


def model_status(served: ServedVersion) -> cpb.ModelStatus:
    scheduler = served.scheduler
    return cpb.ModelStatus(
        model=served.name,
        version=str(served.version),
        slo_p99_ms=served.spec.slo_p99_ms,
        knobs=knobs_message(scheduler.knobs),
        variants=sorted(served.runners),
        queue_depth=scheduler.queue_depth(),
        pending=scheduler.pending(),
    )


class ControlServicer(cpb_grpc.TidalControlServicer):
    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def _select(self, model: str, version: str = "") -> list[ServedVersion]:
        if not model:
            return self._manager.served()
        if version:
            return [self._manager.get(model, version)]
        self._manager.get(model)  # NOT_FOUND / UNAVAILABLE with the usual messages
        return [s for s in self._manager.served() if s.name == model]

    async def Status(self, request, context):
        try:
            served = self._select(request.model)
        except TidalError as exc:
            return await context.abort(GRPC_STATUS[exc.code], str(exc))
        return cpb.StatusResponse(models=[model_status(s) for s in served])

    async def SetKnobs(self, request, context):
        try:
            if not request.model:
                raise InvalidArgument("SetKnobs needs a model name")
            served = self._select(request.model, request.version)
            planned = [(s, updated_knobs(s.scheduler.knobs, request.knobs)) for s in served]
            for s, knobs in planned:
                s.scheduler.apply(knobs)
        except TidalError as exc:
            return await context.abort(GRPC_STATUS[exc.code], str(exc))
        return cpb.StatusResponse(models=[model_status(s) for s in served])
