"""What load to offer: traffic classes, sweeps, rate profiles and traces.

Everything here is parsed from command-line text into small frozen,
picklable values, so the same plan can be shipped to load processes.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

from tidal.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class TrafficClass:
    """One stream of requests with its own results: a model, a priority and a batch size."""

    model: str
    priority: int = 0
    batch_size: int = 1
    weight: float = 1.0
    slo_ms: float | None = None

    @property
    def key(self) -> str:
        return f"{self.model}/p{self.priority}/b{self.batch_size}"


MAX_SWEEP_POINTS = 1000  # a typo such as 1:100000:+1 should fail, not run for days
MAX_PRIORITY = 2**64 - 1  # the "priority" request parameter is a uint64 on the wire
_CLASS_KEYS = {"priority": int, "batch": int, "weight": float, "slo_ms": float}


def parse_class(text: str, batch_size: int, slo_ms: float | None) -> TrafficClass:
    """`NAME[:priority=P,batch=B,weight=W,slo_ms=S]`; unset fields take the run-wide defaults."""
    name, _, rest = text.partition(":")
    if not name:
        raise InvalidArgument(f"model spec '{text}' has no model name")
    fields: dict[str, float | int] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in _CLASS_KEYS:
            raise InvalidArgument(f"model spec '{text}': expected key=value with key in {sorted(_CLASS_KEYS)}")
        try:
            fields[key] = _CLASS_KEYS[key](value)
        except ValueError:
            raise InvalidArgument(f"model spec '{text}': '{value}' is not a number") from None
    cls = TrafficClass(
        model=name,
        priority=int(fields.get("priority", 0)),
        batch_size=int(fields.get("batch", batch_size)),
        weight=float(fields.get("weight", 1.0)),
        slo_ms=float(fields["slo_ms"]) if "slo_ms" in fields else slo_ms,
    )
    # Written as "valid" tests so that NaN, which compares false with everything, fails them.
    if not (cls.batch_size >= 1 and 0 < cls.weight < math.inf and 0 <= cls.priority <= MAX_PRIORITY
            and (cls.slo_ms is None or 0 < cls.slo_ms < math.inf)):
        raise InvalidArgument(f"model spec '{text}': batch must be >= 1, weight and slo_ms positive and finite, "
                              f"priority 0..{MAX_PRIORITY}")
    return cls


def parse_sweep(text: str, what: str) -> list[float]:
    """`8`, `1,8,32`, `1:128:x2` (geometric) or `100:800:+100` / `100:800:100` (arithmetic)."""
    try:
        if ":" not in text:
            values = [float(v) for v in text.split(",")]
        else:
            parts = text.split(":")
            if len(parts) not in (2, 3):
                raise ValueError(text)
            values = _progression(float(parts[0]), float(parts[1]), parts[2] if len(parts) == 3 else "+1")
    except ValueError:
        raise InvalidArgument(f"{what} '{text}': expected N, N,M,..., START:END:xFACTOR or START:END:STEP") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise InvalidArgument(f"{what} '{text}': values must be positive and finite")
    return values


def _progression(start: float, end: float, step: str) -> list[float]:
    if not (math.isfinite(start) and math.isfinite(end)):
        raise ValueError(f"{start}:{end}")  # an endless sweep
    geometric = step.startswith("x")
    by = float(step[1:] if geometric else step.lstrip("+"))
    if by <= (1 if geometric else 0):
        raise ValueError(step)
    values = []
    value = start
    while value <= (end * (1 + 1e-9) if geometric else end + by * 1e-9):
        if len(values) == MAX_SWEEP_POINTS:
            raise ValueError(f"more than {MAX_SWEEP_POINTS} points")
        values.append(value)
        value = value * by if geometric else value + by
    return values


@dataclass(frozen=True, slots=True)
class Stage:
    """A stretch of open-loop load whose rate goes linearly from `rate_start` to `rate_end`."""

    duration_s: float
    rate_start: float
    rate_end: float

    def rate_at(self, offset_s: float) -> float:
        if self.duration_s <= 0 or math.isinf(self.duration_s):
            return self.rate_start
        return self.rate_start + (self.rate_end - self.rate_start) * min(offset_s / self.duration_s, 1.0)


_STAGE = re.compile(r"^\s*([\d.]+)s@([\d.]+)(?:-([\d.]+))?rps\s*$")


def parse_profile(text: str) -> list[Stage]:
    """`60s@200rps,30s@800rps` steps; `30s@200-800rps` ramps linearly within the stage."""
    stages = []
    for part in text.split(","):
        match = _STAGE.match(part)
        if not match:
            raise InvalidArgument(f"profile stage '{part}': expected DURATIONs@RATErps or DURATIONs@FROM-TOrps")
        duration, start = float(match[1]), float(match[2])
        end = float(match[3]) if match[3] else start
        if duration <= 0 or start < 0 or end < 0 or start + end == 0:
            raise InvalidArgument(f"profile stage '{part}': duration and some rate must be positive")
        stages.append(Stage(duration, start, end))
    return stages


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One request of a replayed trace; `deadline_ms` also becomes that request's SLO."""

    send_s: float
    model: str
    priority: int
    batch_size: int
    deadline_ms: float | None = None


_TRACE_FORMAT = "send_s,model,priority,batch_size[,deadline_ms]"
# "timeout" travels as whole microseconds in an int64: below one it would round to no deadline at all,
# and the top of the range stays clear of 2^63 after float rounding.
_DEADLINE_MS = (0.001, 9e15)


def read_trace(path: Path) -> list[TraceRow]:
    """CSV rows `send_s,model,priority,batch_size[,deadline_ms]`; a header row is allowed."""
    rows = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            try:
                for record in reader:
                    if not record or record[0].strip().startswith("#"):
                        continue
                    # Only a first line that does not start with a number is a header: a mistyped
                    # first request must fail like any other, not vanish.
                    if reader.line_num == 1 and not _is_number(record[0]):
                        continue
                    rows.append(_trace_row(record))
            except UnicodeDecodeError:  # decoded a block at a time, so no line number to give
                raise InvalidArgument(f"trace {path} is not UTF-8 text") from None
            except (ValueError, csv.Error) as exc:
                raise InvalidArgument(f"{path}:{reader.line_num}: expected {_TRACE_FORMAT}: {exc}") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read trace {path}: {exc.strerror}") from None
    if not rows:
        raise InvalidArgument(f"trace {path} has no requests")
    return sorted(rows, key=lambda r: r.send_s)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _trace_row(record: list[str]) -> TraceRow:
    if len(record) < 4:
        raise ValueError(f"{len(record)} fields")
    deadline = record[4].strip() if len(record) > 4 else ""
    row = TraceRow(
        send_s=float(record[0]),
        model=record[1].strip(),
        priority=int(record[2]),
        batch_size=int(record[3]),
        deadline_ms=float(deadline) if deadline else None,
    )
    # Written as "valid" tests so that NaN, which compares false with everything, fails them.
    if not (0 <= row.send_s < math.inf and row.model and row.batch_size >= 1 and 0 <= row.priority <= MAX_PRIORITY
            and (row.deadline_ms is None or _DEADLINE_MS[0] <= row.deadline_ms <= _DEADLINE_MS[1])):
        raise ValueError(f"out of range; want send_s finite and >= 0, a model, priority 0..{MAX_PRIORITY}, "
                         f"batch_size >= 1, deadline_ms {_DEADLINE_MS[0]}..{_DEADLINE_MS[1]:.6g}")
    return row
