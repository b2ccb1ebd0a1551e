"""The gRPC side of the harness: channels, the raw infer call and the server's own views.

ModelInfer goes through a method registered with no serializers: requests
are serialized once per traffic class before the run and responses are
never parsed, so per-request client work is just the call itself. Every
other RPC uses the generated stub. Any KServe v2 gRPC server will do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc

from tidal.access import PLAINTEXT, Access
from tidal.errors import InvalidArgument, Unavailable
from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


@dataclass(frozen=True, slots=True)
class Target:
    """Where to send load and how to reach it; picklable for load processes."""

    url: str = "127.0.0.1:8001"
    access: Access = field(default=PLAINTEXT)

    def channel(self) -> grpc.aio.Channel:
        # Without a token no interceptor runs: the load's calls cost what they cost before.
        interceptors = [_Token(self.access.metadata())] if self.access.token else None
        credentials = self.access.credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(self.url, options=_OPTIONS, interceptors=interceptors)
        return grpc.aio.secure_channel(self.url, credentials, options=_OPTIONS, interceptors=interceptors)


class _Token(grpc.aio.UnaryUnaryClientInterceptor):
    """The bearer token on every call; the harness makes unary calls only."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(self, continuation, details: grpc.aio.ClientCallDetails, request):
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        return await continuation(
            grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                       details.wait_for_ready),
            request,
        )


def raw_infer(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    """ModelInfer taking serialized request bytes and returning raw response bytes."""
    return channel.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    metadata: pb.ModelMetadataResponse
    max_batch_size: int | None  # None: the server has no ModelConfig RPC


class ServerView:
    """The coordinator's read-only view of the server: metadata, config, statistics."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float = 10.0) -> None:
        self._stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self._timeout_s = timeout_s
        self._has_stats = True

    async def server_metadata(self) -> dict[str, Any]:
        try:
            meta = await self._stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"server metadata: {exc.code().name}: {exc.details()}") from None
        return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}

    async def model(self, name: str) -> ModelInfo:
        try:
            meta = await self._stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise InvalidArgument(f"model '{name}': {exc.code().name}: {exc.details()}") from None
        try:
            config = await self._stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=self._timeout_s)
            max_batch: int | None = config.config.max_batch_size
        except grpc.aio.AioRpcError:
            max_batch = None
        return ModelInfo(meta, max_batch)

    async def statistics(self, models: list[str]) -> dict[str, ServerCounters] | None:
        """Cumulative per-model counters, or None when the server keeps none."""
        if not self._has_stats:
            return None
        out = {}
        try:
            for name in models:
                resp = await self._stub.ModelStatistics(pb.ModelStatisticsRequest(name=name), timeout=self._timeout_s)
                out[name] = ServerCounters.from_pb(resp.model_stats)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
                self._has_stats = False
            return None
        return out


@dataclass(frozen=True, slots=True)
class ServerCounters:
    """ModelStatistics summed over versions; subtract two to get a window's view."""

    requests: int = 0
    inferences: int = 0
    executions: int = 0
    success_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    failures: int = 0

    @classmethod
    def from_pb(cls, stats: Any) -> ServerCounters:
        total = cls()
        for s in stats:
            i = s.inference_stats
            total = total + cls(
                requests=i.success.count,
                inferences=s.inference_count,
                executions=s.execution_count,
                success_ns=i.success.ns,
                queue_ns=i.queue.ns,
                compute_ns=i.compute_input.ns + i.compute_infer.ns + i.compute_output.ns,
                failures=i.fail.count,
            )
        return total

    def __add__(self, o: ServerCounters) -> ServerCounters:
        return ServerCounters(*(a + b for a, b in zip(self._values(), o._values(), strict=True)))

    def __sub__(self, o: ServerCounters) -> ServerCounters:
        return ServerCounters(*(a - b for a, b in zip(self._values(), o._values(), strict=True)))

    def _values(self) -> tuple[int, ...]:
        return (self.requests, self.inferences, self.executions, self.success_ns, self.queue_ns,
                self.compute_ns, self.failures)

    def summary(self) -> dict[str, float | int | None]:
        """Per-request server-side averages in microseconds, as the server reports them."""
        per_req = (lambda ns: ns / self.requests / 1000.0) if self.requests else (lambda ns: None)
        return {
            "requests": self.requests,
            "failures": self.failures,
            "avg_request_us": per_req(self.success_ns),
            "avg_queue_us": per_req(self.queue_ns),
            "avg_compute_us": per_req(self.compute_ns),
            "avg_batch_size": self.inferences / self.executions if self.executions else None,
        }
