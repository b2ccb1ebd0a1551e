"""The native gRPC front end: gRPC C++ (tidal._frontend) owns the port, Python keeps every decision.

With grpcio, every call costs the event loop its share of grpc.aio's machinery (accepting the call, its
handler task, its completion); at a few thousand 1-row calls a second that machinery, not the model, is what
saturates the loop. Here gRPC C++ accepts calls on its own threads. ModelInfer calls wait in one queue and
the loop takes all that arrived at once, when an eventfd says there are some: one wake-up and one GIL
acquisition for a burst of calls. Each then runs the same servicer and data plane code as under grpcio
(admission, decoding, limits, scheduling, statistics, metrics, errors and their messages), and its answer
goes back as bytes. Health checks are answered natively from the statuses the server sets, while the loop
ticks: a probe never waits behind a saturated loop, and still fails when the loop hangs (its checks then go
to Python). Every other method is relayed by the native side, byte for byte, to the grpcio server on a
private Unix socket, so metadata, reflection, control and streaming keep their behaviour.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import grpc

from tidal.errors import MAX_PUSHBACK_MS, TidalError
from tidal.transport.security import TokenFile, token_refusal
from tidal.transport.servicer import InferenceServicer, status_of

log = logging.getLogger(__name__)

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
TICK_S = 0.1  # how often the loop shows the native side it is alive
LOOP_STALL_S = 1.0  # a loop silent this long answers health checks itself (or, hung, does not)


def available() -> str | None:
    """None when this build has the native front end, else why not."""
    try:
        from tidal import _frontend  # noqa: F401
    except ImportError as exc:
        return (f"this build of tidal has no native gRPC front end ({exc}); install gRPC C++ "
                "(Debian: apt-get install libgrpc++-dev libprotobuf-dev protobuf-compiler-grpc) and reinstall tidal")
    return None


def _code(status: grpc.StatusCode) -> int:
    return status.value[0]


class NativeFrontend:
    """Serves ModelInfer through `servicer` from a native front end that relays the rest. Event-loop only."""

    def __init__(self, servicer: InferenceServicer, native: Any, tokens: TokenFile | None) -> None:
        """`native`: a tidal._frontend.Frontend, not started (see `binding`)."""
        self._servicer = servicer
        self._tokens = tokens
        self._native = native
        self._calls: dict[int, asyncio.Task] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def binding(
        cls,
        servicer: InferenceServicer,
        target: str,
        relay_target: str,
        max_message_bytes: int,
        max_pending_rpcs: int,
        tokens: TokenFile | None,
    ) -> NativeFrontend:
        """A front end for `target` that relays all but ModelInfer to `relay_target`."""
        from tidal import _frontend

        native = _frontend.Frontend(target, relay_target, INFER_METHOD, LOOP_STALL_S, max_message_bytes,
                                    max_pending_rpcs, MAX_PUSHBACK_MS)
        return cls(servicer, native, tokens)

    def start(self) -> int:
        """Bind and start taking calls; the bound port (0 for a Unix socket). OSError when it cannot bind."""
        try:
            port = self._native.start()
        except RuntimeError as exc:
            raise OSError(str(exc)) from None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._native.fileno(), self._drain)
        self._tick()
        return port

    def set_health(self, service: str, status: int) -> None:
        """A grpc.health.v1 status, as set on the grpcio server's health servicer."""
        self._native.set_health(service, status)

    def _tick(self) -> None:
        self._native.tick()
        assert self._loop is not None
        self._loop.call_later(TICK_S, self._tick)

    def _drain(self) -> None:
        arrived, gone = self._native.drain()
        loop = self._loop
        assert loop is not None
        calls = self._calls
        for call_id, payload, deadline_s, authorization in arrived:
            task = loop.create_task(self._serve(call_id, payload, deadline_s, authorization))
            task.add_done_callback(functools.partial(self._ended, call_id))
            calls[call_id] = task
        for call_id in gone:
            task = calls.get(call_id)
            if task is not None:
                task.cancel()

    async def _serve(
        self, call_id: int, payload: bytes, deadline_s: float | None, authorization: bytes | None
    ) -> None:
        """`deadline_s` on time.monotonic()'s clock: the time the call waited to be taken counts against it, as
        under grpcio, where the handler reads what is left when it starts."""
        native = self._native
        if self._tokens is not None:
            refused = token_refusal(self._tokens, INFER_METHOD, (("authorization", authorization or b""),))
            if refused is not None:
                native.refuse(call_id, _code(refused[0]), refused[1], "")
                return
        remaining_s = None if deadline_s is None else deadline_s - time.monotonic()
        answer = await self._servicer.infer_payload(payload, remaining_s)
        if isinstance(answer, TidalError):
            code, message, pushback = status_of(answer)
            native.refuse(call_id, _code(code), message, pushback or "")
        else:
            native.answer(call_id, answer)

    def _ended(self, call_id: int, task: asyncio.Task) -> None:
        """Every call ends exactly once, whatever ended its task: cancelled by its client (perhaps before the
        task ran at all: then the task never entered `_serve`), or failed by a bug."""
        del self._calls[call_id]
        if task.cancelled():  # nobody reads this answer, but the native call must end
            self._native.refuse(call_id, _code(grpc.StatusCode.CANCELLED), "cancelled by the client", "")
        elif (exc := task.exception()) is not None:  # UNKNOWN, as grpcio answers a handler's exception
            log.error("native ModelInfer call failed outside the data plane", exc_info=exc)
            self._native.refuse(call_id, _code(grpc.StatusCode.UNKNOWN), "internal error (see the server's log)", "")
