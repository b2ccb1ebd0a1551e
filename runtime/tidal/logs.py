"""One line per event, as text or JSON; request ids and gRPC statuses travel as extra fields."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

# Fields that callers attach with `extra=` and that JSON output keeps as keys.
EXTRA_FIELDS = ("request_id", "model", "version", "status")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in EXTRA_FIELDS:
            value = getattr(record, key, None)
            if value not in (None, ""):
                event[key] = value
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return json.dumps(event, separators=(",", ":"))


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))



class FailureDigest:
    """Routine request failures as at most one line per (model, status, kind) and interval, with counts.

    Under overload thousands of requests a second are refused or time out; a line each would bury every
    other event and cost the event loop that is already saturated. The first failure of a key is logged at
    once, so a lone failure stays visible as it happens; later ones within the interval are counted and
    summed up in one line when it ends. Per-request detail goes to DEBUG. Event-loop only.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 1.0) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._open: dict[tuple[str, str, str], list] = {}  # key -> [count since the line, level, example]

    def record(self, level: int, model: str, status: str, kind: str, message: str, request_id: str = "") -> None:
        key = (model, status, kind)
        entry = self._open.get(key)
        if entry is not None:
            entry[0] += 1
            return
        self._log.log(level, "infer %s id=%r failed: %s %s", model, request_id, status, message,
                      extra={"model": model, "status": status, "request_id": request_id})
        self._start(key, level, message)

    def _start(self, key: tuple[str, str, str], level: int, example: str) -> None:
        self._open[key] = [0, level, example]
        asyncio.get_running_loop().call_later(self._interval_s, self._close, key)

    def _close(self, key: tuple[str, str, str]) -> None:
        count, level, example = self._open.pop(key)
        if not count:
            return
        model, status, kind = key
        self._log.log(
            level, "infer %s: %d more requests failed %s (%s) in the last %.0f s, e.g. %s",
            model, count, status, kind, self._interval_s, example, extra={"model": model, "status": status},
        )
        self._start(key, level, example)
