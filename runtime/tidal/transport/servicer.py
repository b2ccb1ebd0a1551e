"""GRPCInferenceService: each RPC converts, calls the repository or scheduler, converts back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

import tidal
from tidal.clock import Clock
from tidal.errors import (
    Code,
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
from tidal.scheduling.stats import Duration
from tidal.transport import convert
from tidal.transport._gen import grpc_service_pb2 as pb
from tidal.transport._gen import grpc_service_pb2_grpc as pb_grpc
from tidal.transport.edge import EdgeMeter
from tidal.transport.status import GRPC_STATUS

log = logging.getLogger(__name__)

EXTENSIONS = [
    "classification", "model_repository", "model_configuration", "statistics", "schedule_policy", "parameters"
]
FINAL_RESPONSE_PARAM = "triton_enable_empty_final_response"


_NO_MODEL_CONTROL = FailedPrecondition(
    "explicit model load/unload is disabled in this --model-control-mode (use 'explicit')"
)
# Client mistakes and overload are routine; failures on tidal's side deserve a warning.
_ROUTINE_CODES = frozenset({
    Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.CANCELLED, Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED,
})
# gRPC carries the status message in a header, 8 KiB at most by default: an error that echoes a huge model
# name or shape would turn into RESOURCE_EXHAUSTED ("metadata size exceeds limit") on the client.
MAX_MESSAGE_CHARS = 1000


def _clip(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return f"{text[: MAX_MESSAGE_CHARS - 40]}... ({len(text) - MAX_MESSAGE_CHARS + 40} more characters)"


def _priority(msg: pb.ModelInferRequest) -> int:
    """The priority parameter, read without decoding the rest of the request."""
    if not msg.parameters or "priority" not in msg.parameters:
        return 0
    return convert.int_param({"priority": convert.param_value(msg.parameters["priority"])}, "priority") or 0


def _detached(exc: TidalError) -> TidalError:
    """`exc` without its traceback and chain: kept, they hold the failed request's frames, and the frame that
    holds `exc` closes a reference cycle that pins the request (possibly many MiB) until the cycle collector
    runs. The traceback has been logged where it mattered (`_failure`)."""
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    return exc


def _failure(msg: pb.ModelInferRequest, exc: Exception, digest: FailureDigest) -> TidalError:
    """The error a failed request is answered with, logged without flooding the log.

    Anything that is not a TidalError is a bug in tidal, not the client's mistake: it is logged with its
    traceback and answered INTERNAL, so the request still gets an answer and no other request is touched.
    Routine failures (client mistakes, overload) are summed up per model, status and kind each second."""
    model = _clip(msg.model_name)
    if not isinstance(exc, TidalError):
        log.error("infer %s id=%r failed unexpectedly", model, _clip(msg.id), exc_info=exc,
                  extra={"request_id": _clip(msg.id), "model": model})
        return TidalError(f"internal error: {type(exc).__name__}: {exc}")
    status = GRPC_STATUS[exc.code].name
    text = _clip(str(exc))
    if log.isEnabledFor(logging.DEBUG):
        log.debug("infer %s id=%r failed: %s %s", model, _clip(msg.id), status, text,
                  extra={"request_id": _clip(msg.id), "model": model, "status": status})
    level = logging.INFO if exc.code in _ROUTINE_CODES else logging.WARNING
    digest.record(level, model, status, type(exc).__name__, text)
    return exc


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _statistics(served: ServedVersion) -> pb.ModelStatistics:
    stats = served.scheduler.stats()
    msg = pb.ModelStatistics(
        name=served.name,
        version=str(served.version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
        ),
    )
    for size, (c_in, c_infer, c_out) in sorted(stats.batch_stats.items()):
        msg.batch_stats.add(
            batch_size=size,
            compute_input=_duration(c_in),
            compute_infer=_duration(c_infer),
            compute_output=_duration(c_out),
        )
    return msg


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Thin adapter: protobuf never leaves this module and convert.py."""

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
        self._edge = edge or EdgeMeter(clock.now)
        self._digest = FailureDigest(log)
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def drained(self) -> None:
        """Returns once no inference RPC is running; shutdown waits on it before closing anything."""
        await self._idle.wait()

    async def _abort(self, context: grpc.aio.ServicerContext, exc: TidalError) -> None:
        """Answer with `exc`'s status. Not context.abort(): its exception's traceback would keep the request
        (possibly many MiB) alive in a reference cycle until the cycle collector happens to run."""
        context.set_code(GRPC_STATUS[exc.code])
        context.set_details(_clip(str(exc)))
        pushback = getattr(exc, "pushback_ms", None)
        if pushback is not None:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(pushback)),))

    # -- health and metadata ------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self._manager.ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="tidal", version=tidal.__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        try:
            served = self._manager.get(request.name, request.version)
        except TidalError as exc:
            return await self._abort(context, exc)
        spec = served.spec
        versions = [v for n, v, state, _ in self._manager.index() if n == request.name and state == "READY"]
        return pb.ModelMetadataResponse(
            name=spec.name,
            versions=versions,
            platform=spec.config.platform or spec.config.backend,
            inputs=convert.tensor_metadata(spec.inputs, spec.batching),
            outputs=convert.tensor_metadata(spec.outputs, spec.batching),
        )

    async def ModelConfig(self, request, context):
        try:
            served = self._manager.get(request.name, request.version)
        except TidalError as exc:
            return await self._abort(context, exc)
        return pb.ModelConfigResponse(config=served.spec.config)

    async def ModelStatistics(self, request, context):
        try:
            served = self._manager.select(request.name, request.version)
        except TidalError as exc:
            return await self._abort(context, exc)
        return pb.ModelStatisticsResponse(model_stats=[_statistics(s) for s in served])

    # -- inference ----------------------------------------------------------------------
    async def _infer(self, msg: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        self._inflight += 1
        self._idle.clear()
        try:
            return await self._infer_counted(msg, context)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def _infer_counted(
        self, msg: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """Admission comes first and reads only the model name and priority: a refusal decodes nothing."""
        now = self._clock.now()
        if not self._is_accepting():
            raise Unavailable("server is not accepting requests (starting or shutting down)")
        served = self._manager.get(msg.model_name, msg.model_version)
        self._edge.received(served.name)
        levels = served.spec.scheduler
        level = levels.level_of(_priority(msg))
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            self._observe(served, level, now, ok=False)
            raise DeadlineExceeded("the request deadline passed before the server could start on it")
        gate = self._edge.gate(served.name, levels.priority_levels)
        refusal = gate.admit(level)
        if refusal is not None:
            self._observe(served, level, now, ok=False)
            raise ResourceExhausted(
                f"model '{served.name}' is at its in-flight limit for priority {level} "
                f"({refusal.inflight} in flight, {refusal.limit} allowed) to hold its latency SLO; "
                f"retry after {refusal.pushback_ms} ms, on another replica, or with a higher priority",
                pushback_ms=refusal.pushback_ms,
            )
        try:
            return await self._run(msg, served, level, now, remaining)
        finally:
            gate.release(level, self._clock.now() - now)

    async def _run(
        self, msg: pb.ModelInferRequest, served: ServedVersion, level: int, now: float, remaining: float | None
    ) -> pb.ModelInferResponse:
        deadline = None if remaining is None else now + remaining
        request = convert.decode_request(msg, now, deadline, served.signature)
        served.signature.check(request)  # what only the decoded arrays show (BYTES must be UTF-8)
        classes = convert.class_counts(msg, served.output_specs) if msg.outputs else None
        try:
            response = await served.scheduler.infer(request)
        except TidalError:
            self._observe(served, level, now, ok=False)
            raise
        self._observe(served, level, now, ok=True)
        response.model_name, response.model_version = served.name, str(served.version)
        if request.parameters.get(FINAL_RESPONSE_PARAM):
            response.parameters["triton_final_response"] = True
        return convert.encode_response(response, served.output_specs, classes, served.spec.batching)

    def _observe(self, served: ServedVersion, level: int, arrival_s: float, ok: bool) -> None:
        if self._metrics is not None:
            latency = self._clock.now() - arrival_s
            self._metrics.observe(served.name, str(served.version), level, latency, served.spec.slo_p99_ms, ok)

    async def ModelInfer(self, request, context):
        try:
            return await self._infer(request, context)
        except Exception as exc:
            error = _detached(_failure(request, exc, self._digest))
        await self._abort(context, error)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently; responses return as they finish, matched by id.

        A message that cannot be read ends the reading, never the answering: every request accepted before it
        still gets its response, then the stream closes with INVALID_ARGUMENT naming the message."""
        results: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        broken: list[str] = []

        async def one(msg: pb.ModelInferRequest) -> None:
            try:
                results.put_nowait(pb.ModelStreamInferResponse(infer_response=await self._infer(msg, context)))
            except Exception as exc:
                error = _detached(_failure(msg, exc, self._digest))
                failed = pb.ModelInferResponse(model_name=msg.model_name, model_version=msg.model_version, id=msg.id)
                results.put_nowait(pb.ModelStreamInferResponse(error_message=_clip(str(error)), infer_response=failed))

        async def reader() -> None:
            count = 0
            try:
                async for msg in request_iterator:
                    count += 1
                    task = asyncio.create_task(one(msg))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            except Exception as exc:  # an undecodable message, or the transport failing under the stream
                broken.append(f"stream message {count + 1} could not be read ({type(exc).__name__}); "
                              f"the {count} before it were answered")
                log.info("ModelStreamInfer: %s", broken[0])
            finally:
                while tasks:
                    await asyncio.gather(*list(tasks))
                results.put_nowait(None)

        read_task = asyncio.create_task(reader())
        try:
            while (item := await results.get()) is not None:
                yield item
        finally:
            read_task.cancel()
            for task in list(tasks):
                task.cancel()
        if broken:
            await self._abort(context, InvalidArgument(broken[0]))

    # -- repository ---------------------------------------------------------------------
    async def RepositoryIndex(self, request, context):
        rows = self._manager.index()
        if request.ready:
            rows = [r for r in rows if r[2] == "READY"]
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(name=n, version=v, state=s, reason=r) for n, v, s, r in rows]
        )

    async def RepositoryModelLoad(self, request, context):
        if not self._model_control:
            return await self._abort(context, _NO_MODEL_CONTROL)
        if request.parameters:
            names = ", ".join(sorted(request.parameters))
            return await self._abort(context, Unimplemented(f"load parameters are not supported by tidal: {names}"))
        try:
            await self._manager.load(request.model_name)
        except TidalError as exc:
            return await self._abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        if not self._model_control:
            return await self._abort(context, _NO_MODEL_CONTROL)
        try:
            await self._manager.unload(request.model_name)
        except TidalError as exc:
            return await self._abort(context, exc)
        return pb.RepositoryModelUnloadResponse()

    # -- not implemented ----------------------------------------------------------------
    async def _unimplemented(self, what: str, context) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"tidal does not implement {what}")

    async def SystemSharedMemoryStatus(self, request, context):
        await self._unimplemented("system shared memory", context)

    async def SystemSharedMemoryRegister(self, request, context):
        await self._unimplemented("system shared memory", context)

    async def SystemSharedMemoryUnregister(self, request, context):
        await self._unimplemented("system shared memory", context)

    async def CudaSharedMemoryStatus(self, request, context):
        await self._unimplemented("CUDA shared memory", context)

    async def CudaSharedMemoryRegister(self, request, context):
        await self._unimplemented("CUDA shared memory", context)

    async def CudaSharedMemoryUnregister(self, request, context):
        await self._unimplemented("CUDA shared memory", context)

    async def TraceSetting(self, request, context):
        await self._unimplemented("trace settings", context)

    async def LogSettings(self, request, context):
        await self._unimplemented("log settings", context)
