"""Composition root: builds the repository, engine, metrics and transport; owns start-up and shutdown order."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import gc
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from tidal.clock import SystemClock
from tidal.control.api import Decision, ModelInfo, Setpoint, Slo, model_key
from tidal.control.loop import ControlLoop
from tidal.control.slo import SloController
from tidal.dataplane import DataPlane
from tidal.dataplane.edge import EdgeMeter
from tidal.errors import TidalError
from tidal.metrics import ModelSnapshot, ServerMetrics
from tidal.repository import layout
from tidal.repository.manager import ModelManager, ModelState, ServedVersion
from tidal.repository.pbtxt import parse_model_config
from tidal.repository.poll import RepositoryPoller
from tidal.transport.control import ControlServicer
from tidal.transport.http import HttpFrontEnd, HttpServer
from tidal.transport.security import CertificateStore, TlsFiles, TokenAuth, TokenFile
from tidal.transport.server import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_PENDING_RPCS,
    GrpcServer,
    unix_socket_path,
)
from tidal.transport.servicer import InferenceServicer
from tidal.types import Observation

log = logging.getLogger(__name__)


# A worker thread whose backend call returned waits for the GIL while the event loop holds it, up to
# Python's switch interval (5 ms by default): a quarter of a 20 ms batch, measured with perf_analyzer on the
# wide 1024-4096-4096-1024 MLP at concurrency 64. 0.5 ms: +13-24% throughput there, +5% on the small MLP at
# 128, no change at concurrency 1 (0.2-1 ms all did about as well).
GIL_SWITCH_INTERVAL_S = 0.0005
# After the last accepted request is answered, how long its answer gets to leave before the process ends.
EXIT_LINGER_S = 0.2


class ModelControlMode(enum.Enum):
    """As Triton's --model-control-mode, except that `explicit` loads every model at start-up unless
    --load-model names some."""

    NONE = "none"  # load everything at start-up; the load/unload RPCs are refused
    EXPLICIT = "explicit"  # load/unload RPCs allowed
    POLL = "poll"  # watch the repository and reload what changes; load/unload RPCs refused


@dataclass(frozen=True)
class ServeOptions:
    """What `tidal serve` was asked to do."""

    model_repository: Path
    grpc_address: str = "127.0.0.1"  # loopback by default: safe as a sidecar
    grpc_port: int = 8001
    load_models: tuple[str, ...] = ()  # empty: every model in the repository
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_pending_rpcs: int | None = None  # per method, in gRPC core, before the event loop takes them; None: auto
    drain_grace_s: float = 30.0  # how long queued and running requests get on shutdown
    drain_delay_s: float = 0.0  # on shutdown, not ready but still serving this long (endpoint removal)
    socket_mode: int = 0o660  # permissions of a Unix socket file (grpc_address unix:///path)
    strict_readiness: tuple[str, ...] = ()  # models that must be ready for ServerReady
    model_control_mode: ModelControlMode = ModelControlMode.EXPLICIT
    repository_poll_s: float = 15.0  # poll period in poll mode
    metrics_port: int | None = 8002  # None: no /metrics endpoint
    metrics_address: str | None = None  # None: grpc_address, or 127.0.0.1 beside a Unix socket
    http_port: int | None = 8000  # KServe v2 REST and the status page; None: none
    http_address: str | None = None  # None: grpc_address, or 127.0.0.1 beside a Unix socket
    tls: TlsFiles | None = None  # None: plaintext gRPC
    auth_tokens: Path | None = None  # file of bearer tokens; None: no token is asked for
    native_frontend: bool = False  # gRPC C++ takes the calls (transport/native.py); plaintext only


def _tokens(options: ServeOptions) -> TokenFile | None:
    return TokenFile(options.auth_tokens) if options.auth_tokens else None


# The share of the tightest SLO a call may spend in the backlog before the event loop takes it, and the rate
# at which one event loop takes calls: under grpcio, a bare grpc.aio echo answers 1,400-2,800 1-row calls/s on
# 2-core hosts, AVX2-only and AVX-512 alike, and tidal's 1-row capacity within a 50 ms SLO measured
# 1,164-2,842/s. The native front end hands calls over in bulk: 4,441/s within the demo's SLO on one core
# (perf/RELIABILITY.md, run 11), 4,907-5,266/s on the small MLP at concurrency 128 (RESULTS, "Request path").
BACKLOG_SLO_SHARE = 0.5
LOOP_ACCEPTS_PER_MS = 2.0
NATIVE_LOOP_ACCEPTS_PER_MS = 5.0
MIN_PENDING_RPCS = 32  # bursts of arrivals below this are not overload


def pending_rpcs_for(options: ServeOptions) -> int:
    """The backlog the front end may hold when --max-pending-rpcs is not given: sized from the tightest SLO
    configured on disk so that what waits there can still meet it; without any SLO, gRPC's own ceiling
    (queue policies and deadlines answer overload then).

    Calls beyond it are dropped (grpcio: by gRPC core, CANCELLED) or refused (native: RESOURCE_EXHAUSTED)
    before Python sees them, which is what keeps a server whose loop is saturated answering anything in time
    (README, "Overload")."""
    targets = []
    for name in options.load_models or layout.list_models(options.model_repository):
        path = options.model_repository / name / "config.pbtxt"
        with contextlib.suppress(TidalError, OSError):  # the model's own load reports what is wrong
            slo = parse_model_config(path).config.slo if path.is_file() else None
            if slo is not None:
                targets += [t for t in (slo.p99_ms, *slo.priority_p99_ms.values()) if t > 0]
    if not targets:
        return DEFAULT_MAX_PENDING_RPCS
    rate = NATIVE_LOOP_ACCEPTS_PER_MS if options.native_frontend else LOOP_ACCEPTS_PER_MS
    backlog = min(targets) * BACKLOG_SLO_SHARE * rate
    return max(MIN_PENDING_RPCS, 1 << math.ceil(math.log2(max(backlog, 1.0))))


class _Plant:
    """A served model version as the control loop sees it: knobs <-> setpoints, variants <-> manifest."""

    def __init__(self, served: ServedVersion, edge: EdgeMeter) -> None:
        self.served = served
        self.edge = edge
        self.key = model_key(served.name, served.version)
        self.generation = served

    def info(self) -> ModelInfo:
        return self.served.model_info(self.key)

    def configured_slo(self) -> Slo:
        return self.served.configured_slo()

    def observe(self) -> Observation:
        return dataclasses.replace(self.served.observe(), edge=self.edge.observe(self.served.name))

    def setpoint(self) -> Setpoint:
        return self.served.setpoint()

    def apply(self, setpoint: Setpoint) -> None:
        self.served.apply_setpoint(setpoint)


class App:
    """One server process. start() -> wait_for_shutdown() -> stop(), in that order."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.clock = SystemClock()
        self.manager = ModelManager(options.model_repository, self.clock, on_change=self._model_changed)
        self.metrics = ServerMetrics(self._snapshots)
        self.poller = (
            RepositoryPoller(self.manager, options.repository_poll_s)
            if options.model_control_mode is ModelControlMode.POLL
            else None
        )
        self._accepting = False
        self._draining = False
        self._stopping = asyncio.Event()
        self.edge = EdgeMeter(self.clock.now)
        self.plane = DataPlane(
            self.manager,
            self.clock,
            self.ready,
            lambda: self._accepting,
            self.metrics,
            model_control=options.model_control_mode is ModelControlMode.EXPLICIT,
            edge=self.edge,
        )
        self.controller = SloController()
        self.control_loop = ControlLoop(
            self.controller,
            lambda: [_Plant(s, self.edge) for s in self.manager.served()],
            self.clock,
            self._decided,
        )
        self._control_task: asyncio.Task | None = None
        control = ControlServicer(self.manager, self.controller, self.clock.now, self.edge)
        # TLS when certificate files are given; they are checked here, so a bad file stops start-up.
        certificates = None if options.tls is None else CertificateStore(options.tls)
        tokens = _tokens(options)  # read once for every port
        self.server = GrpcServer(
            InferenceServicer(self.plane), control, options.grpc_address, options.grpc_port, options.max_message_bytes,
            options.socket_mode,
            credentials=None if certificates is None else certificates.credentials(),
            interceptors=[TokenAuth(tokens)] if tokens else [],
            max_pending_rpcs=options.max_pending_rpcs or pending_rpcs_for(options),
            native=options.native_frontend,
            tokens=tokens,
        )
        self.metrics_port: int | None = None
        self.http = None if options.http_port is None else HttpServer(
            HttpFrontEnd(self.plane, options.max_message_bytes, control.snapshot, tokens),
            self._side_address(options.http_address), options.http_port,
            None if certificates is None else certificates.ssl_context(), options.socket_mode,
        )

    def _side_address(self, given: str | None) -> str:
        """Where an HTTP listener binds: as told, else the gRPC address, or loopback TCP beside a Unix socket
        (Prometheus and browsers speak TCP)."""
        if given:
            return given
        return "127.0.0.1" if unix_socket_path(self.options.grpc_address) is not None else self.options.grpc_address

    def ready(self) -> bool:
        if not self._accepting or self._draining:
            return False
        return all(self.manager.ready(name) for name in self.options.strict_readiness)

    async def _model_changed(self, name: str, state: ModelState, reason: str, failed: bool) -> None:
        """Health follows every model state change; failed loads are counted, a reload that keeps the old
        version READY included."""
        if state is ModelState.READY:
            self.control_loop.adopt()  # before the load answers: a SetSlo right after it is for the new versions
        await self.server.set_serving(name, state is ModelState.READY)
        if failed:
            self.metrics.load_failures.labels(name).inc()

    def _decided(self, plant: _Plant, decision: Decision) -> None:
        served = plant.served
        slo = self.controller.slo(plant.key)
        target = min([slo.p99_ms, *slo.priority_p99_ms.values()]) if slo.engaged else 0.0
        self.edge.gate(served.name, served.priority_levels).configure(target, decision.inflight_limit)
        self.metrics.set_saturation(served.name, self.edge.saturation(served.name, decision.utilisation))
        self.metrics.set_slo(served.name, str(served.version), self._slo_ms(served))
        self.metrics.controller_decision(
            served.name, str(served.version), decision.reason.value, decision.observed_p99_ms,
            decision.predicted_p99_ms, decision.arrival_rps, bool(decision.setpoint.admission_limits),
        )

    def _slo_ms(self, served: ServedVersion) -> float:
        key = model_key(served.name, served.version)
        return self.controller.slo(key).p99_ms if self.controller.tracks(key) else served.slo_p99_ms

    def _snapshots(self) -> list[ModelSnapshot]:
        return [
            ModelSnapshot(
                model=s.name,
                version=str(s.version),
                stats=s.stats(),
                pending=s.pending(),
                queue_depth=s.queue_depth(),
                knobs=s.knobs,
                variants=s.variants,
                instances=s.instances,
                slo_p99_ms=self._slo_ms(s),
                edge=self.edge.observe(s.name),
                received_rps=self.edge.rates(s.name)[0],
            )
            for s in self.manager.served()
        ]

    async def start(self) -> int:
        self.metrics.bind(asyncio.get_running_loop())
        await self.server.set_serving("", False)
        port = await self.server.start()
        if self.options.metrics_port is not None:
            host = self._side_address(self.options.metrics_address)
            self.metrics_port = self.metrics.serve_http(host, self.options.metrics_port)
            url = f"http://{host}:{self.metrics_port}/metrics"
            print(f"tidal: serving metrics on {url}", flush=True)
        if self.http is not None:
            http_port = await self.http.start()
            where = self._side_address(self.options.http_address)
            print(f"tidal: serving HTTP on {where if self.http.unix_path else f'{where}:{http_port}'}", flush=True)
        await self.manager.load_all(self.options.load_models or None)
        if self.poller is not None:
            self.poller.snapshot()
            self.poller.start()
        self._control_task = asyncio.create_task(self.control_loop.run(), name="tidal-control")
        self.edge.start()
        # What start-up built (modules, models, sessions) lives as long as the process: out of the cycle
        # collector's sight, its full collections stop walking it, and their pauses, which hold every arriving
        # call in gRPC's backlog, shrink to what serving allocates.
        gc.freeze()
        self._accepting = True
        await self.server.set_serving("", True)
        # A machine-readable line: tests and wrappers read the bound port (or socket) from it.
        where = self.options.grpc_address if self.server.unix_path else f"{self.options.grpc_address}:{port}"
        print(f"tidal: serving gRPC on {where}", flush=True)
        return port

    def request_shutdown(self) -> None:
        self._stopping.set()

    async def wait_for_shutdown(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """Not ready at once; serve on for the drain delay; then refuse new work UNAVAILABLE, answer all that
        was accepted, and close the transport without cancelling a call (README, "Stopping without loss")."""
        self._draining = True
        await self.server.set_draining()
        if self.options.drain_delay_s > 0:
            log.info("shutting down: not ready; serving %.1fs more while endpoints go", self.options.drain_delay_s)
            await asyncio.sleep(self.options.drain_delay_s)
        log.info("shutting down: draining requests (grace %.1fs)", self.options.drain_grace_s)
        self._accepting = False
        if self.poller is not None:
            await self.poller.stop()
        if self._control_task is not None:
            self._control_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._control_task
        await self.edge.stop()
        try:
            # Schedulers keep running until every accepted request has its answer.
            await asyncio.wait_for(self.plane.drained(), self.options.drain_grace_s)
        except TimeoutError:
            log.error("drain did not finish within %.1fs; remaining requests are cancelled", self.options.drain_grace_s)
        for served in self.manager.served():
            stats = served.stats()
            log.info(
                "model %s version %s: %d requests succeeded, %d failed since start",
                served.name,
                served.version,
                stats.success.count,
                stats.fail.count,
            )
        await self.manager.close()
        await self.server.prepare_exit(EXIT_LINGER_S)
        if self.http is not None:
            self.http.remove_socket()
        log.info("stopped")


async def serve(options: ServeOptions) -> int:
    app = App(options)
    loop = asyncio.get_running_loop()
    # From the first moment: a signal during start-up stops the server gracefully once it is up.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.request_shutdown)
    try:
        await app.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        app.server.remove_relay()
        return 1
    await app.wait_for_shutdown()
    await app.stop()
    _end_process()


def _end_process() -> NoReturn:
    """End at once, from inside the running loop. Both a return through asyncio.run (which cancels the
    handler tasks of calls being refused) and the interpreter's exit (which shuts gRPC down) would answer
    calls CANCELLED; GrpcServer.prepare_exit says why that must not happen. All tidal owns is closed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(options: ServeOptions) -> int:
    """Run the server on uvloop where available (libuv's loop is markedly faster for gRPC)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(options))
    if sys.version_info >= (3, 12):
        return uvloop.run(serve(options))
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(serve(options))
