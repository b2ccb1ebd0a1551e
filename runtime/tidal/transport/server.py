"""The gRPC server: binding, health, reflection, and an orderly stop."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tidal.transport._gen import POOL
from tidal.transport._gen import control_pb2 as cpb
from tidal.transport._gen import control_pb2_grpc as cpb_grpc
from tidal.transport._gen import grpc_service_pb2 as pb
from tidal.transport._gen import grpc_service_pb2_grpc as pb_grpc
from tidal.transport.control import ControlServicer
from tidal.transport.servicer import InferenceServicer

log = logging.getLogger(__name__)

# Triton accepts messages up to INT32_MAX bytes; so does tidal unless told otherwise.
DEFAULT_MAX_MESSAGE_BYTES = 2**31 - 1


@functools.cache
def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """tidal's descriptors live in a private pool; reflection serves health's from it too."""
    POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
    return POOL


class GrpcServer:
    """Owns the grpc.aio server and the standard health service."""

    def __init__(
        self,
        servicer: InferenceServicer,
        control: ControlServicer,
        address: str,
        port: int,
        max_message_bytes: int,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            # gRPC core cancels calls beyond ~1,000 not yet handed to the application; let overload reach
            # tidal's queues instead, where queue policies and shedding answer it with a proper status.
            ("grpc.server.max_pending_requests", 20_000),
            ("grpc.server.max_pending_requests_hard_limit", 40_000),
        ]
        self._server = grpc.aio.server(options=options, interceptors=list(interceptors) or None)
        self._credentials = credentials  # None: plaintext
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        cpb_grpc.add_TidalControlServicer_to_server(control, self._server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = (
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            cpb.DESCRIPTOR.services_by_name["TidalControl"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, self._server, pool=_reflection_pool())
        self._target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        self.port = 0

    async def start(self) -> int:
        """Bind and start; returns the bound port (useful with port 0)."""
        try:
            if self._credentials is not None:
                self.port = self._server.add_secure_port(self._target, self._credentials)
            else:
                self.port = self._server.add_insecure_port(self._target)
        except RuntimeError:  # newer grpcio raises where older ones returned port 0
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {self._target} (address in use or not available)")
        await self._server.start()
        return self.port

    async def set_serving(self, service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(service, status)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting RPCs; those in flight get `grace_s` to finish."""
        await self._server.stop(grace_s)
