"""Messages that do not parse get INVALID_ARGUMENT, not UNKNOWN with a traceback in the log.

grpc.aio parses each request with the generated `FromString` before any tidal code runs; bytes that are not
the declared message raise there, and gRPC answers UNKNOWN and logs about a kilobyte of traceback per call, so a
fuzzer or a confused client floods the log and learns nothing. Registration goes through `Registrar`, which
gives every method a parser that returns an `Unreadable` marker instead of raising, and a behaviour that
answers the marker INVALID_ARGUMENT (in a stream: the reader sees an `InvalidArgument` where the message
would be, and the servicer reports it after answering what came before).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from tidal.errors import InvalidArgument


class Unreadable:
    """Stands where a message that failed to parse would be."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def parser(parse: Callable[[bytes], Any], what: str) -> Callable[[bytes], Any]:
    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Unreadable(f"the message ({len(data)} bytes) does not parse as {what}: {exc}")

    return parse_or_mark


def _unary(behaviour: Callable) -> Callable:
    async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Unreadable):
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(request.reason)
            return None
        return await behaviour(request, context)

    return answer


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Unreadable):
            raise InvalidArgument(request.reason)
        yield request


def _streaming(behaviour: Callable) -> Callable:
    async def answer(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in behaviour(_checked(requests), context):
            yield response

    return answer


def tolerant(handlers: Mapping[str, grpc.RpcMethodHandler], what: Mapping[str, str]) -> dict[str, Any]:
    """The same handlers with parsers that mark unreadable messages; `what` names each method's request type."""
    out = {}
    for name, handler in handlers.items():
        parse = parser(handler.request_deserializer, what.get(name, "request"))
        if handler.unary_unary is not None:
            out[name] = handler._replace(request_deserializer=parse, unary_unary=_unary(handler.unary_unary))
        elif handler.stream_stream is not None:
            out[name] = handler._replace(request_deserializer=parse, stream_stream=_streaming(handler.stream_stream))
        else:  # no such method in tidal's services; left as gRPC made it
            out[name] = handler
    return out


class Registrar:
    """Stands in for the server when a generated `add_*Servicer_to_server` registers a service.

    The generated function builds its method handlers, then calls `add_generic_rpc_handlers` and
    `add_registered_method_handlers`; the second carries the handlers themselves, so the registration is made
    here from their tolerant versions and the generic handler it built is not used.

    Methods are served through a generic handler (one dictionary lookup per call); only those named in
    `own_backlog` are registered with gRPC core as well. A registered method gets a backlog of its own in core
    (`grpc.server.max_pending_requests` counts per method), so inference under overload does not push health
    checks, probes and control calls out of a shared one. But grpc.aio's server (grpcio 1.85) keeps one pending
    request-call per registered method and waits on all of them with `asyncio.wait` for every call it accepts:
    each registered method costs every RPC a callback added and removed on the event loop (measured with uvloop
    on this project's host: 16.7 us of the loop per call with 27 pending, 6.8 us with 2). Hence: the inference
    methods registered, everything else generic."""

    def __init__(
        self, server: grpc.aio.Server, service: ServiceDescriptor, own_backlog: frozenset[str] = frozenset()
    ) -> None:
        self._server = server
        self._types = {method.name: method.input_type.full_name for method in service.methods}
        self._own_backlog = own_backlog

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Replaced by the registration below, which builds the generic handler from the tolerant methods."""

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        methods = tolerant(handlers, self._types)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
        registered = {name: handler for name, handler in methods.items() if name in self._own_backlog}
        if registered:
            self._server.add_registered_method_handlers(service, registered)
