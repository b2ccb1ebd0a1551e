"""TidalControl: read and steer the live knobs over gRPC (used by `tidal control`, tests and operators)."""

from __future__ import annotations

import dataclasses
import time

import grpc

from tidal.access import PLAINTEXT, Access
from tidal.control.api import Decision, Mode, model_key
from tidal.control.slo import SloController
from tidal.dataplane.edge import EdgeMeter
from tidal.errors import InvalidArgument, NotFound, TidalError, Unavailable
from tidal.proto import control_pb2 as cpb
from tidal.proto import control_pb2_grpc as cpb_grpc
from tidal.repository.manager import ModelManager, ServedVersion
from tidal.scheduling.knobs import Knobs
from tidal.transport.status import GRPC_STATUS


def knobs_message(knobs: Knobs) -> cpb.Knobs:
    return cpb.Knobs(
        max_batch_size=knobs.max_batch_size,
        max_queue_delay_us=knobs.max_queue_delay_us,
        preferred_batch_sizes=list(knobs.preferred_batch_sizes),
        instance_count=knobs.instance_count,
        active_variant=knobs.active_variant,
        admission_limits=[cpb.AdmissionLimit(level=lv, limit=n) for lv, n in knobs.admission_limits],
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


def _decision_message(decision: Decision, now_s: float) -> cpb.Decision:
    setpoint = decision.setpoint
    return cpb.Decision(
        at_unix_s=time.time() - (now_s - decision.at_s),
        knobs=cpb.Knobs(
            max_batch_size=setpoint.max_batch_size,
            max_queue_delay_us=setpoint.max_queue_delay_us,
            active_variant=setpoint.variant,
            admission_limits=[cpb.AdmissionLimit(level=lv, limit=n) for lv, n in setpoint.admission_limits],
        ),
        reason=decision.reason.value,
        detail=decision.detail,
        observed_p99_ms=decision.observed_p99_ms or 0.0,
        predicted_p99_ms=decision.predicted_p99_ms or 0.0,
        arrival_rps=decision.arrival_rps,
    )


def edge_status(edge: EdgeMeter, model: str, utilisation: float) -> cpb.EdgeStatus:
    seen = edge.observe(model)
    received, admitted = edge.rates(model)
    return cpb.EdgeStatus(
        received_rps=received, admitted_rps=admitted, inflight=seen.inflight, inflight_limit=seen.limit,
        refused=seen.refused, loop_lag_ms=seen.lag_ms, loop_busy=seen.busy,
        saturation=edge.saturation(model, utilisation),
    )


def model_status(served: ServedVersion, controller: SloController, edge: EdgeMeter, now_s: float) -> cpb.ModelStatus:
    """What the server runs with and, once the control loop has seen the model, what the controller sees."""
    configured = served.configured_slo()
    status = cpb.ModelStatus(
        model=served.name,
        version=str(served.version),
        slo_p99_ms=configured.p99_ms,
        controller_mode=configured.mode.value,
        min_accuracy=configured.min_accuracy,
        priority_p99_ms=dict(configured.priority_p99_ms),
        period_ms=round(configured.period_s * 1e3),
        knobs=knobs_message(served.knobs),
        variants=served.variants,
        queue_depth=served.queue_depth(),
        pending=served.pending(),
    )
    key = model_key(served.name, served.version)
    if not controller.tracks(key):
        status.edge.CopyFrom(edge_status(edge, served.name, 0.0))
        return status
    slo, last = controller.slo(key), controller.last(key)
    status.edge.CopyFrom(edge_status(edge, served.name, last.utilisation if last is not None else 0.0))
    status.slo_p99_ms, status.controller_mode, status.min_accuracy = slo.p99_ms, slo.mode.value, slo.min_accuracy
    status.period_ms = round(slo.period_s * 1e3)
    status.priority_p99_ms.clear()
    status.priority_p99_ms.update(slo.priority_p99_ms)
    if last is not None:
        status.observed_p50_ms = last.observed_p50_ms or 0.0
        status.observed_p99_ms = last.observed_p99_ms or 0.0
        status.predicted_p99_ms = last.predicted_p99_ms or 0.0
        status.arrival_rps = last.arrival_rps
    status.decisions.extend(_decision_message(d, now_s) for d in controller.history(key))
    return status


def updated_slo(controller: SloController, served: ServedVersion, request: cpb.SetSloRequest):
    """The controller's SLO for `served` with the fields the request sets; InvalidArgument when they do not fit."""
    key = model_key(served.name, served.version)
    if not controller.tracks(key):
        raise Unavailable(f"the controller has not picked up model '{key}' yet; retry in a moment")
    changes: dict[str, object] = {}
    for name in ("p99_ms", "min_accuracy"):
        if request.HasField(name):
            changes[name] = getattr(request, name)
    if request.HasField("mode"):
        try:
            changes["mode"] = Mode(request.mode.lower())
        except ValueError:
            raise InvalidArgument(f"mode must be off, batch or full, not '{request.mode}'") from None
    if request.HasField("period_ms"):
        changes["period_s"] = request.period_ms / 1e3
    if request.set_priority_p99_ms:
        levels = served.priority_levels
        if any(not 1 <= level <= levels for level in request.priority_p99_ms):
            raise InvalidArgument(f"priority_p99_ms names a level outside 1..{levels}")
        changes["priority_p99_ms"] = dict(request.priority_p99_ms)
    return key, dataclasses.replace(controller.slo(key), **changes)


class ControlServicer(cpb_grpc.TidalControlServicer):
    def __init__(self, manager: ModelManager, controller: SloController, clock_now, edge: EdgeMeter) -> None:
        self._manager = manager
        self._controller = controller
        self._now = clock_now
        self._edge = edge

    def snapshot(self) -> cpb.StatusResponse:
        """Every served model's status, as the Status RPC answers it (the HTTP status page shows it too)."""
        return self._response(self._manager.served())

    def _response(self, served: list[ServedVersion]) -> cpb.StatusResponse:
        now_s = self._now()
        return cpb.StatusResponse(models=[model_status(s, self._controller, self._edge, now_s) for s in served])

    async def Status(self, request, context):
        try:
            served = self._manager.select(request.model)
        except TidalError as exc:
            return await context.abort(GRPC_STATUS[exc.code], str(exc))
        return self._response(served)

    async def SetKnobs(self, request, context):
        try:
            if not request.model:
                raise InvalidArgument("SetKnobs needs a model name")
            served = self._manager.select(request.model, request.version)
            planned = [(s, updated_knobs(s.knobs, request.knobs)) for s in served]
            for s, knobs in planned:
                s.apply(knobs)
        except TidalError as exc:
            return await context.abort(GRPC_STATUS[exc.code], str(exc))
        return self._response(served)

    async def SetSlo(self, request, context):
        """All versions are checked before any changes, so a bad request changes nothing."""
        try:
            if not request.model:
                raise InvalidArgument("SetSlo needs a model name")
            served = self._manager.select(request.model, request.version)
            planned = [updated_slo(self._controller, s, request) for s in served]
            for key, slo in planned:
                self._controller.set_slo(key, slo)
        except TidalError as exc:
            return await context.abort(GRPC_STATUS[exc.code], str(exc))
        return self._response(served)


# -- client side, for `tidal control` ------------------------------------------------------
_CLIENT_ERRORS = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def _call(url: str, method: str, request, timeout_s: float, access: Access) -> list[cpb.ModelStatus]:
    """One TidalControl RPC against a running server; failures come back as TidalError."""
    with access.channel(url) as channel:
        try:
            stub = cpb_grpc.TidalControlStub(channel)
            reply = getattr(stub, method)(request, timeout=timeout_s, metadata=access.metadata())
        except grpc.RpcError as exc:
            error = _CLIENT_ERRORS.get(exc.code(), TidalError)
            raise error(f"{url}: {exc.code().name}: {exc.details()}") from None
    return list(reply.models)


def _given(message, **fields):
    """`message` with the optional fields that are not None set: the others stay unset, which the server reads
    as "keep"."""
    for name, value in fields.items():
        if value is not None:
            setattr(message, name, value)
    return message


def control_status(
    url: str, model: str = "", timeout_s: float = 10.0, access: Access = PLAINTEXT
) -> list[cpb.ModelStatus]:
    return _call(url, "Status", cpb.StatusRequest(model=model), timeout_s, access)


def control_set_slo(
    url: str,
    model: str,
    version: str = "",
    p99_ms: float | None = None,
    min_accuracy: float | None = None,
    mode: str | None = None,
    period_ms: int | None = None,
    priority_p99_ms: dict[int, float] | None = None,
    timeout_s: float = 10.0,
    access: Access = PLAINTEXT,
) -> list[cpb.ModelStatus]:
    """Fields left None keep their value; `priority_p99_ms={}` clears the per-priority targets."""
    request = _given(cpb.SetSloRequest(model=model, version=version), p99_ms=p99_ms, min_accuracy=min_accuracy,
                     mode=mode, period_ms=period_ms)
    if priority_p99_ms is not None:
        request.set_priority_p99_ms = True
        request.priority_p99_ms.update(priority_p99_ms)
    return _call(url, "SetSlo", request, timeout_s, access)


def control_set_knobs(
    url: str,
    model: str,
    version: str = "",
    max_batch_size: int | None = None,
    max_queue_delay_us: int | None = None,
    preferred_batch_sizes: list[int] | None = None,
    instance_count: int | None = None,
    active_variant: str | None = None,
    timeout_s: float = 10.0,
    access: Access = PLAINTEXT,
) -> list[cpb.ModelStatus]:
    """Fields left None keep their value; `preferred_batch_sizes=[]` clears them."""
    update = _given(cpb.KnobsUpdate(), max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                    instance_count=instance_count, active_variant=active_variant)
    if preferred_batch_sizes is not None:
        update.set_preferred_batch_sizes = True
        update.preferred_batch_sizes.extend(preferred_batch_sizes)
    return _call(url, "SetKnobs", cpb.SetKnobsRequest(model=model, version=version, knobs=update), timeout_s, access)


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value > 0 else "-"


def _edge_line(e: cpb.EdgeStatus) -> str:
    limit = f"limit {e.inflight_limit}" if e.inflight_limit else "admit all"
    refused = ", ".join(f"p{lv} {n}" for lv, n in sorted(e.refused.items()) if n) or "none"
    return (
        f"  edge: received {e.received_rps:.0f} rps, admitted {e.admitted_rps:.0f} rps  in flight {e.inflight} "
        f"({limit})  refused {refused}  loop lag {e.loop_lag_ms:.1f} ms, busy {e.loop_busy:.2f}  "
        f"saturation {e.saturation:.2f}"
    )


def format_status(models: list[cpb.ModelStatus], decisions: int = 8) -> str:
    """`tidal control status`: per model, the SLO, what is observed, the knobs and the latest decisions."""
    lines = []
    for m in models:
        slo = f"p99 {m.slo_p99_ms:g} ms" if m.slo_p99_ms > 0 else "none"
        extras = [f"min accuracy {m.min_accuracy:g}"] if m.min_accuracy else []
        extras += [f"p{lv} {ms:g} ms" for lv, ms in sorted(m.priority_p99_ms.items())]
        if extras:
            slo += f" ({', '.join(extras)})"
        k = m.knobs
        limits = ", ".join(f"p{a.level}<={a.limit}" for a in k.admission_limits) or "admit all"
        lines += [
            f"{m.model}:{m.version}  controller {m.controller_mode or 'off'}  SLO {slo}  period {m.period_ms} ms",
            f"  observed p50 {_ms(m.observed_p50_ms)}  p99 {_ms(m.observed_p99_ms)}  "
            f"predicted p99 {_ms(m.predicted_p99_ms)}  arrivals {m.arrival_rps:.0f} rps  "
            f"queued {sum(m.queue_depth.values())}  pending {m.pending}",
            f"  variant {k.active_variant or 'default'} (of {', '.join(v or 'default' for v in m.variants)})  "
            f"max batch {k.max_batch_size}  delay {k.max_queue_delay_us} us  "
            f"preferred {list(k.preferred_batch_sizes) or '-'}  instances {k.instance_count}  {limits}",
            _edge_line(m.edge),
        ]
        for d in list(m.decisions)[-decisions:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(d.at_unix_s)) + f".{int(d.at_unix_s * 1e3) % 1000:03d}"
            lines.append(f"    {stamp} {d.reason}: {d.detail}")
    return "\n".join(lines) if lines else "no model is served"
