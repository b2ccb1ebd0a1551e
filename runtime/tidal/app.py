"""Composition root: builds the repository, engine and transport; owns start-up and shutdown order."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tidal.clock import SystemClock
from tidal.repository.manager import ModelManager
from tidal.transport.server import DEFAULT_MAX_MESSAGE_BYTES, GrpcServer
from tidal.transport.servicer import InferenceServicer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """What `tidal serve` was asked to do."""

    model_repository: Path
    grpc_address: str = "127.0.0.1"  # loopback by default: safe as a sidecar
    grpc_port: int = 8001
    load_models: tuple[str, ...] = ()  # empty: every model in the repository
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    drain_grace_s: float = 30.0  # how long queued and running requests get on shutdown
    strict_readiness: tuple[str, ...] = field(default=())  # models that must be ready for ServerReady


class App:
    """One server process. start() -> wait_for_shutdown() -> stop(), in that order."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.clock = SystemClock()
        self.manager = ModelManager(options.model_repository, self.clock)
        self._accepting = False
        self._stopping = asyncio.Event()
        servicer = InferenceServicer(self.manager, self.clock, self.ready, lambda: self._accepting)
        self.server = GrpcServer(servicer, options.grpc_address, options.grpc_port, options.max_message_bytes)

    def ready(self) -> bool:
        if not self._accepting:
            return False
        return all(self.manager.ready(name) for name in self.options.strict_readiness)

    async def start(self) -> int:
        await self.server.set_serving("", False)
        port = await self.server.start()
        await self.manager.load_all(self.options.load_models or None)
        for served in self.manager.served():
            await self.server.set_serving(served.name, True)
        self._accepting = True
        await self.server.set_serving("", True)
        # A machine-readable line: tests and wrappers read the bound port from it.
        print(f"tidal: serving gRPC on {self.options.grpc_address}:{port}", flush=True)
        return port

    def request_shutdown(self) -> None:
        self._stopping.set()

    async def wait_for_shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_shutdown)
        await self._stopping.wait()

    async def stop(self) -> None:
        """Refuse new work, finish what was accepted, then close the transport."""
        log.info("shutting down: draining requests (grace %.1fs)", self.options.drain_grace_s)
        self._accepting = False
        await self.server.health.enter_graceful_shutdown()
        try:
            await asyncio.wait_for(self.manager.close(), self.options.drain_grace_s)
        except TimeoutError:
            log.error("drain did not finish within %.1fs; remaining requests are cancelled", self.options.drain_grace_s)
        await self.server.stop(grace_s=1.0)
        log.info("stopped")


async def serve(options: ServeOptions) -> int:
    app = App(options)
    try:
        await app.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    await app.wait_for_shutdown()
    await app.stop()
    return 0


def run(options: ServeOptions) -> int:
    """Run the server on uvloop where available (libuv's loop is markedly faster for gRPC)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(options))
    if sys.version_info >= (3, 12):
        return uvloop.run(serve(options))
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(serve(options))
