"""GRPCInferenceService: each RPC converts the message, calls the data plane, converts back."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator

import grpc

from tidal.dataplane import DataPlane, Head, VersionStats
from tidal.dataplane.failures import clip
from tidal.errors import InvalidArgument, TidalError
from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc
from tidal.repository.manager import ServedVersion
from tidal.scheduling.stats import Duration
from tidal.transport import convert
from tidal.transport.status import GRPC_STATUS
from tidal.transport.unreadable import Unreadable, parser

_read_infer_request = parser(pb.ModelInferRequest.FromString, pb.ModelInferRequest.DESCRIPTOR.full_name)

log = logging.getLogger(__name__)


def _head(msg: pb.ModelInferRequest, remaining_s: float | None) -> Head:
    """Read without decoding the rest of the request."""
    params = msg.parameters
    priority = convert.param_value(params["priority"]) if params and "priority" in params else None
    return Head(msg.model_name, msg.model_version, priority, msg.id, remaining_s)


def _decoder(msg: pb.ModelInferRequest):
    def decode(served: ServedVersion, arrival_s: float, deadline_s: float | None):
        request = convert.decode_request(msg, arrival_s, deadline_s, served.signature)
        return request, convert.class_counts(msg) if msg.outputs else {}

    return decode


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _statistics(row: VersionStats) -> pb.ModelStatistics:
    stats = row.stats
    msg = pb.ModelStatistics(
        name=row.name,
        version=row.version,
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


# A refused request at least this large is freed by a prompt collection, not whenever the collector runs.
LARGE_REQUEST_BYTES = 1 << 20
SWEEP_DELAY_S = 0.05  # one collection covers every large refusal in this window


def status_of(exc: TidalError) -> tuple[grpc.StatusCode, str, str | None]:
    """The status, message and `grpc-retry-pushback-ms` trailer (None: none) that answer `exc` on every gRPC
    front end."""
    pushback = getattr(exc, "pushback_ms", None)
    return GRPC_STATUS[exc.code], clip(str(exc)), None if pushback is None else str(pushback)


async def _abort(context: grpc.aio.ServicerContext, exc: TidalError) -> None:
    """Answer with `exc`'s status, as trailers only: that is what gRPC clients' retry policies can retry (a
    status sent after response headers commits the call), and where they read `grpc-retry-pushback-ms`."""
    code, message, pushback = status_of(exc)
    await context.abort(code, message, (("grpc-retry-pushback-ms", pushback),) if pushback is not None else ())


class _Sweeper:
    """grpc.aio keeps an aborted call's exception on the call's state, and its traceback holds the handler
    frames that hold the request: a reference cycle. For small requests the collector's usual rounds are
    soon enough; a large one (many MiB) would stay in memory until a full collection, so refusing one
    schedules a collection shortly after, once per window however many there are."""

    def __init__(self) -> None:
        self._due = False

    def refused(self, request_bytes: int) -> None:
        if request_bytes >= LARGE_REQUEST_BYTES and not self._due:
            self._due = True
            asyncio.get_running_loop().call_later(SWEEP_DELAY_S, self._collect)

    def _collect(self) -> None:
        self._due = False
        gc.collect()


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Thin adapter: protobuf never leaves this module and convert.py."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane
        self._sweeper = _Sweeper()

    # -- health and metadata ------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._plane.ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self._plane.model_ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        name, version, extensions = self._plane.server_metadata()
        return pb.ServerMetadataResponse(name=name, version=version, extensions=extensions)

    async def ModelMetadata(self, request, context):
        try:
            meta = self._plane.model_metadata(request.name, request.version)
        except TidalError as exc:
            return await _abort(context, exc)
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=convert.tensor_metadata(meta.inputs, meta.batched),
            outputs=convert.tensor_metadata(meta.outputs, meta.batched),
        )

    async def ModelConfig(self, request, context):
        try:
            return pb.ModelConfigResponse(config=self._plane.model_config(request.name, request.version))
        except TidalError as exc:
            return await _abort(context, exc)

    async def ModelStatistics(self, request, context):
        try:
            rows = self._plane.statistics(request.name, request.version)
        except TidalError as exc:
            return await _abort(context, exc)
        return pb.ModelStatisticsResponse(model_stats=[_statistics(r) for r in rows])

    # -- inference ----------------------------------------------------------------------
    async def _infer(self, msg: pb.ModelInferRequest, remaining_s: float | None) -> pb.ModelInferResponse | TidalError:
        outcome = await self._plane.infer(_head(msg, remaining_s), _decoder(msg))
        return outcome if isinstance(outcome, TidalError) else convert.encode_response(outcome)

    async def ModelInfer(self, request, context):
        answer = await self._infer(request, context.time_remaining())
        if isinstance(answer, TidalError):
            self._sweeper.refused(sum(map(len, request.raw_input_contents)))
            return await _abort(context, answer)
        return answer

    async def infer_payload(self, payload: bytes, remaining_s: float | None) -> bytes | TidalError:
        """ModelInfer for a front end that hands over the message's bytes (transport/native.py). Its refusals
        are returned, never raised, so no aborted call holds the request in a cycle (no _Sweeper here)."""
        msg = _read_infer_request(payload)
        if isinstance(msg, Unreadable):
            return InvalidArgument(msg.reason)
        answer = await self._infer(msg, remaining_s)
        return answer if isinstance(answer, TidalError) else answer.SerializeToString()

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
            answer = await self._infer(msg, context.time_remaining())
            if not isinstance(answer, TidalError):
                results.put_nowait(pb.ModelStreamInferResponse(infer_response=answer))
                return
            failed = pb.ModelInferResponse(model_name=msg.model_name, model_version=msg.model_version, id=msg.id)
            results.put_nowait(pb.ModelStreamInferResponse(error_message=clip(str(answer)), infer_response=failed))

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
            await _abort(context, InvalidArgument(broken[0]))

    # -- repository ---------------------------------------------------------------------
    async def RepositoryIndex(self, request, context):
        rows = await self._plane.repository_index(request.ready)
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(name=n, version=v, state=s, reason=r) for n, v, s, r in rows]
        )

    async def RepositoryModelLoad(self, request, context):
        try:
            await self._plane.load(request.model_name, tuple(request.parameters))
        except TidalError as exc:
            return await _abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        try:
            await self._plane.unload(request.model_name)
        except TidalError as exc:
            return await _abort(context, exc)
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
