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


class ResourceExhausted(TidalError):
    code = Code.RESOURCE_EXHAUSTED


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
