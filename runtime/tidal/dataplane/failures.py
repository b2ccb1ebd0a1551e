"""How a failed request is answered and logged, the same for every protocol."""

from __future__ import annotations

import logging

from tidal.errors import Code, TidalError
from tidal.logs import FailureDigest

log = logging.getLogger("tidal.dataplane")

# Client mistakes and overload are routine; failures on tidal's side deserve a warning.
ROUTINE_CODES = frozenset({
    Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.CANCELLED, Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED,
})
# gRPC carries the status message in a header, 8 KiB at most by default: an error that echoes a huge model
# name or shape would turn into RESOURCE_EXHAUSTED ("metadata size exceeds limit") on the client. HTTP
# clients get the same text, so both protocols answer alike.
MAX_MESSAGE_CHARS = 1000


def clip(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return f"{text[: MAX_MESSAGE_CHARS - 40]}... ({len(text) - MAX_MESSAGE_CHARS + 40} more characters)"


def detached(exc: TidalError) -> TidalError:
    """`exc` without its traceback and chain: kept, they hold the failed request's frames, and the frame that
    holds `exc` closes a reference cycle that pins the request (possibly many MiB) until the cycle collector
    runs. The traceback has been logged where it mattered (`failure`)."""
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    return exc


def failure(model: str, request_id: str, exc: BaseException, digest: FailureDigest) -> TidalError:
    """The error a failed request is answered with, logged without flooding the log.

    Anything that is not a TidalError is a bug in tidal, not the client's mistake: it is logged with its
    traceback and answered INTERNAL, so the request still gets an answer and no other request is touched.
    Routine failures (client mistakes, overload) are summed up per model, status and kind each second."""
    model, request_id = clip(model), clip(request_id)
    if not isinstance(exc, TidalError):
        log.error("infer %s id=%r failed unexpectedly", model, request_id, exc_info=exc,
                  extra={"request_id": request_id, "model": model})
        return TidalError(f"internal error: {type(exc).__name__}: {exc}")
    status = exc.code.value
    text = clip(str(exc))
    if log.isEnabledFor(logging.DEBUG):
        log.debug("infer %s id=%r failed: %s %s", model, request_id, status, text,
                  extra={"request_id": request_id, "model": model, "status": status})
    level = logging.INFO if exc.code in ROUTINE_CODES else logging.WARNING
    digest.record(level, model, status, type(exc).__name__, text, request_id)
    return exc
