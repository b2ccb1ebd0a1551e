"""The tables from tidal error codes to gRPC status codes and to HTTP status codes."""

from __future__ import annotations

import grpc

from tidal.errors import Code

GRPC_STATUS: dict[Code, grpc.StatusCode] = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.CANCELLED: grpc.StatusCode.CANCELLED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
    Code.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
}

# The same codes as Triton's HTTP front end (HttpCodeFromError): invalid arguments, cancellations and
# conflicts are 400, unsupported operations 501, a request that timed out in the queue is UNAVAILABLE there
# (503). Overload (the edge gate, a full queue, a request over tidal's limits) is 429, with Retry-After on
# every refusal for load: the HTTP convention that clients and proxies back off on (Triton says 503 for a
# full queue; it has no edge gate).
HTTP_STATUS: dict[Code, int] = {
    Code.INVALID_ARGUMENT: 400,
    Code.NOT_FOUND: 404,
    Code.UNAVAILABLE: 503,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.DEADLINE_EXCEEDED: 503,
    Code.CANCELLED: 400,
    Code.INTERNAL: 500,
    Code.UNIMPLEMENTED: 501,
    Code.ALREADY_EXISTS: 400,
    Code.FAILED_PRECONDITION: 400,
}
