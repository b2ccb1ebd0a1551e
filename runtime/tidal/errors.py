"""One error base with a transport-neutral code.

Transport maps `TidalError.code` to a gRPC status in exactly one table
(transport/status.py); nothing below transport knows gRPC.
"""

from __future__ import annotations

import enum


class Code(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"


class TidalError(Exception):
    """Base of every error a user can meet; carries the code transport reports."""

    code: Code = Code.INTERNAL


class InvalidArgument(TidalError):
    code = Code.INVALID_ARGUMENT


class NotFound(TidalError):
    code = Code.NOT_FOUND


class Unavailable(TidalError):
    code = Code.UNAVAILABLE


# A refused client that waits longer than this is better off on another replica: the hint says so.
MAX_PUSHBACK_MS = 1000


def pushback_ms(wait_s: float) -> int:
    """The pushback every load refusal carries, from the refusing layer's expected wait: at least 1 ms (0 would
    invite an immediate retry into the same overload), at most `MAX_PUSHBACK_MS`."""
    return round(min(max(wait_s * 1e3, 1.0), MAX_PUSHBACK_MS))


class ResourceExhausted(TidalError):
    """`pushback_ms`, given by every refusal for load (see `pushback_ms()`), is sent as gRPC's
    `grpc-retry-pushback-ms` and HTTP's Retry-After: clients with a retry policy wait that long (or try another
    replica) instead of retrying at once into the same overload. None for limits that no wait lifts."""

    code = Code.RESOURCE_EXHAUSTED

    def __init__(self, message: str, pushback_ms: int | None = None) -> None:
        super().__init__(message)
        self.pushback_ms = pushback_ms


class DeadlineExceeded(TidalError):
    code = Code.DEADLINE_EXCEEDED


class Cancelled(TidalError):
    code = Code.CANCELLED


class BackendError(TidalError):
    """The backend failed while executing; the message is the backend's own."""

    code = Code.INTERNAL


class Unimplemented(TidalError):
    code = Code.UNIMPLEMENTED


class ConfigError(TidalError):
    """A model config or repository layout is wrong; names the file and field."""

    code = Code.INVALID_ARGUMENT


class FailedPrecondition(TidalError):
    """The server is not in a mode that allows the call (e.g. load/unload while polling)."""

    code = Code.FAILED_PRECONDITION
