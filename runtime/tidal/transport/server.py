"""The gRPC server: binding (TCP or a Unix socket), health, reflection, and an end that cancels no call."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import shutil
import socket
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from tidal.errors import ConfigError
from tidal.proto import POOL
from tidal.proto import control_pb2 as cpb
from tidal.proto import control_pb2_grpc as cpb_grpc
from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc
from tidal.transport.control import ControlServicer
from tidal.transport.native import NativeFrontend
from tidal.transport.security import TokenFile
from tidal.transport.servicer import InferenceServicer
from tidal.transport.unreadable import Registrar

log = logging.getLogger(__name__)

# Triton accepts messages up to INT32_MAX bytes; so does tidal unless told otherwise.
DEFAULT_MAX_MESSAGE_BYTES = 2**31 - 1
DEFAULT_MAX_PENDING_RPCS = 20_000
# A health service that stays SERVING while the process can answer, drain included: the liveness probe's.
LIVENESS_SERVICE = "liveness"
INFERENCE_METHODS = frozenset({"ModelInfer", "ModelStreamInfer"})  # registered with core: backlogs of their own


def unix_socket_path(address: str) -> str | None:
    """The file of a `unix:///abs/path` or `unix:path` address; None for an IP address or host name."""
    if address.startswith("unix://"):
        return address.removeprefix("unix://")
    if address.startswith("unix:"):
        return address.removeprefix("unix:")
    return None


@functools.cache
def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """tidal's descriptors live in a private pool; reflection serves health's from it too."""
    POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
    return POOL


def check_socket_path_free(path: str) -> None:
    """gRPC replaces whatever socket file is at the path; refuse a live one (another server) or a non-socket."""
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise OSError(f"cannot bind gRPC to unix:{path}: the path exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return  # a stale file left by a process that is gone
    raise OSError(f"cannot bind gRPC to unix:{path}: another server is listening there")


class GrpcServer:
    """Owns the grpc.aio server and the standard health service."""

    def __init__(
        self,
        servicer: InferenceServicer,
        control: ControlServicer,
        address: str,
        port: int,
        max_message_bytes: int,
        socket_mode: int = 0o660,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        max_pending_rpcs: int = DEFAULT_MAX_PENDING_RPCS,
        native: bool = False,
        tokens: TokenFile | None = None,
    ) -> None:
        """`native`: the port is the native front end's (transport/native.py), which relays all but
        ModelInfer to this grpcio server on a private Unix socket; `tokens` are its ModelInfer's check."""
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            # The backlog below Python: calls gRPC core received but the event loop has not taken yet, per
            # method. Beyond it core drops every new call, in C, before it costs the saturated loop anything
            # (README, "Overload"). Soft limit = hard limit: a burst that a stall of the loop piles up passes
            # whole up to the limit, where core's random drops between the two would start at the soft one.
            ("grpc.server.max_pending_requests", max_pending_rpcs),
            ("grpc.server.max_pending_requests_hard_limit", max_pending_rpcs),
        ]
        self._server = grpc.aio.server(options=options, interceptors=list(interceptors) or None)
        self._backlog = max_pending_rpcs
        self._credentials = credentials  # None: plaintext
        inference = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        tidal_control = cpb.DESCRIPTOR.services_by_name["TidalControl"]
        # Inference has its own backlogs in core; the rest shares the generic one (see Registrar).
        registrar = Registrar(self._server, inference, INFERENCE_METHODS)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, registrar)
        cpb_grpc.add_TidalControlServicer_to_server(control, Registrar(self._server, tidal_control))
        self.health = health.aio.HealthServicer()
        health_service = health_pb2.DESCRIPTOR.services_by_name["Health"]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, Registrar(self._server, health_service))
        names = (inference.full_name, tidal_control.full_name, health_service.full_name, reflection.SERVICE_NAME)
        reflection_service = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(names, pool=_reflection_pool()),
            Registrar(self._server, reflection_service),
        )
        self.unix_path = unix_socket_path(address)
        self._socket_mode = socket_mode
        if self.unix_path is not None:
            self._target = f"unix:{self.unix_path}"
        else:
            self._target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        self._native: NativeFrontend | None = None
        self._relay_dir: Path | None = None
        if native:
            if credentials is not None:
                raise ConfigError("--frontend native serves plaintext only (loopback, a Unix socket, or behind a mesh "
                                  "that terminates TLS); serve TLS with the default --frontend grpcio")
            # Made (0700: only this user reaches the relay) by start(), removed by prepare_exit or remove_relay.
            self._relay_dir = Path(tempfile.gettempdir()) / f"tidal-grpc-{os.getpid()}-{secrets.token_hex(4)}"
            relay = f"unix:{self._relay_dir}/relay.sock"
            self._native = NativeFrontend.binding(servicer, self._target, relay, max_message_bytes, max_pending_rpcs,
                                                  tokens)
            self._grpcio_target = relay
        else:
            self._grpcio_target = self._target
        self.port = 0
        self._health_names: set[str] = {""}
        self._draining = False

    async def start(self) -> int:
        """Bind and start; returns the bound port (useful with port 0; 0 for a Unix socket)."""
        if self.unix_path is not None:
            check_socket_path_free(self.unix_path)
        if self._relay_dir is not None:
            self._relay_dir.mkdir(mode=0o700)
        try:
            if self._credentials is not None:
                bound = self._server.add_secure_port(self._grpcio_target, self._credentials)
            else:
                bound = self._server.add_insecure_port(self._grpcio_target)
        except RuntimeError:  # newer grpcio raises where older ones returned port 0
            bound = 0
        if bound == 0:
            self.remove_relay()
            raise OSError(f"cannot bind gRPC to {self._grpcio_target} (address in use or not available)")
        if self._native is not None:
            await self._server.start()  # the relay first: the native port relays to it from its first call
            bound = self._start_native(self._native)
        if self.unix_path is not None:
            os.chmod(self.unix_path, self._socket_mode)  # under grpcio before start(): no call is served earlier
        else:
            self.port = bound
        if self._native is None:
            await self._server.start()
        await self._set_health(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        # Said at start-up: a closed-loop load test with more calls outstanding than this sees them refused.
        if self._native is not None:
            log.info("the native front end holds up to %d ModelInfer calls that the event loop has not taken, and "
                     "refuses new ones RESOURCE_EXHAUSTED beyond that (--max-pending-rpcs)", self._backlog)
        else:
            log.info("gRPC core holds up to %d calls per method that the event loop has not taken, and drops new "
                     "ones beyond that (--max-pending-rpcs)", self._backlog)
        return self.port

    def _start_native(self, native: NativeFrontend) -> int:
        """The native port's socket file is made owner-only, then given its mode: nobody else connects before."""
        umask = os.umask(0o177) if self.unix_path is not None else None
        try:
            return native.start()
        except OSError:
            self.remove_relay()
            raise
        finally:
            if umask is not None:
                os.umask(umask)

    async def _set_health(self, service: str, status: int) -> None:
        await self.health.set(service, status)
        if self._native is not None:
            self._native.set_health(service, status)

    async def set_serving(self, service: str, serving: bool) -> None:
        if self._draining:
            return  # a model state change while draining must not turn readiness back on
        self._health_names.add(service)
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._set_health(service, status)

    async def set_draining(self) -> None:
        """Readiness off for the server and every model; liveness stays on until the process ends."""
        for name in self._health_names:
            await self._set_health(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._draining = True

    async def prepare_exit(self, linger_s: float) -> None:
        """The last step before the process ends; the server is never shut down through gRPC.

        gRPC core's shutdown cancels (CANCELLED) every call it has received but not handed to tidal yet,
        and every call that arrives before its client reads the GOAWAY; under load there always are some.
        A client cannot tell whether a cancelled call ran, and retry policies do not retry it. When the
        process ends instead, the kernel closes each connection and those calls fail UNAVAILABLE, which
        clients and meshes retry. `linger_s` lets the answers to the last accepted requests leave first;
        calls arriving meanwhile are refused UNAVAILABLE by the servicer.
        """
        await asyncio.sleep(linger_s)
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)
        self.remove_relay()

    def remove_relay(self) -> None:
        """The native front end's private folder goes with the process, whether it started or failed to."""
        if self._relay_dir is not None:
            shutil.rmtree(self._relay_dir, ignore_errors=True)
