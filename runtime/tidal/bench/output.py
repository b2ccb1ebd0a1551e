"""Presenting a result: the terminal table, the live progress line, JSON and CSV files."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from tidal.errors import InvalidArgument

_PCTS = ("p50", "p90", "p95", "p99", "p99.9", "max")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _rows(result: dict[str, Any]) -> list[tuple[dict[str, Any], str, dict[str, Any]]]:
    """(point, class key or 'all', summary) for every point, classes listed only when there are several."""
    rows = []
    for point in result["points"]:
        m = point["measurement"]
        rows.append((point, "all", m["all"]))
        if len(m["classes"]) > 1:
            rows.extend((point, key, s) for key, s in m["classes"].items())
    return rows


def render_table(result: dict[str, Any]) -> str:
    head = ["point", "class", "stable", "rps", "mean", *_PCTS, "ok", "errors", "slo", "goodput", "srv queue/compute us"]
    table = [head]
    for point, key, s in _rows(result):
        lat = s["latency_ms"]
        server = (point.get("server") or {}) if key == "all" else {}
        srv = ", ".join(f"{_us(v['avg_queue_us'])}/{_us(v['avg_compute_us'])}" for v in server.values()) or "-"
        table.append([
            point["label"] if key == "all" else "",
            key,
            {True: "yes", False: "NO", None: "-"}[point["stable"]] if key == "all" else "",
            f"{s['throughput_rps']:.1f}",
            *(_ms(lat[p]) for p in ("mean", *_PCTS)),
            str(s["ok"]),
            str(sum(s["errors"].values())),
            _pct(s["slo_attainment"]),
            "-" if s["goodput_rps"] is None else f"{s['goodput_rps']:.1f}",
            srv,
        ])
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in table]
    lines.insert(1, "-" * len(lines[0]))
    open_loop = result["mode"] != "closed"
    lines.append("latencies in ms" + (" from the scheduled send time (open loop)" if open_loop else ""))
    lines.extend(_notes(result))
    return "\n".join(lines)


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _notes(result: dict[str, Any]) -> list[str]:
    notes = []
    for point in result["points"]:
        t = point["totals"]
        details = t["error_details"]
        # The details only where they say more than the status's own name.
        errors = ", ".join(f"{k} {v}" + (f" ({details[k]})" if details.get(k, k) != k else "")
                           for k, v in t["errors"].items())
        if errors:
            notes.append(f"{point['label']}: errors over the whole point, warm-up and drain included: {errors}")
        if t["stragglers"]:
            notes.append(f"{point['label']}: {t['stragglers']} requests still in flight at the end were cancelled")
        if t["errors"].get("CANCELLED", 0) > t["stragglers"] and (result.get("server") or {}).get("name") == "tidal":
            # A bare CANCELLED reads like the client's doing; against tidal it is the server's backlog, and the
            # README's first sweep (concurrency up to 128 against the demo's 64) meets it.
            notes.append(f"{point['label']}: CANCELLED from tidal: calls its gRPC core dropped unstarted, its backlog "
                         "per method (--max-pending-rpcs, 64 on the demo) being full; safe to retry. Closed loops "
                         "deeper than that need the server started with a larger --max-pending-rpcs")
        if point["client"]["bottleneck"]:
            notes.append(f"{point['label']}: the CLIENT is the bottleneck ({'; '.join(point['client']['reasons'])});"
                         " try --workers")
    metrics = result.get("metrics")
    if metrics and not metrics["samples"]:
        where = f"unavailable at {metrics['url']}" if metrics["url"] else "not read"
        notes.append(f"server metrics {where}: {metrics['error']}")
    return notes


class Progress:
    """One carriage-return status line, redrawn every tick; silent when the stream is not a terminal."""

    def __init__(self, stream: TextIO = sys.stderr, enabled: bool | None = None) -> None:
        self._stream = stream
        self._enabled = stream.isatty() if enabled is None else enabled
        self._width = 0

    def __call__(self, entry: dict[str, Any]) -> None:
        if not self._enabled:
            return
        line = (f"[{entry['point']}] t={entry['t_s']:.0f}s {entry['throughput_rps']:.0f} rps "
                f"p50 {_ms(entry['p50_ms'])} p99 {_ms(entry['p99_ms'])} ms  in flight {entry['inflight']}  "
                f"errors {entry['errors']}")
        if entry.get("batch_size_mean") is not None:
            line += f"  batch {entry['batch_size_mean']:.1f}"
        self._width = max(self._width, len(line))
        self._stream.write("\r" + line.ljust(self._width))
        self._stream.flush()

    def close(self) -> None:
        if self._enabled and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=1) + "\n")


SUMMARY_COLUMNS = [
    "point", "class", "stable", "duration_s", "sent", "completed", "ok", "errors", "error_codes", "throughput_rps",
    "mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "p99.9_ms", "max_ms", "service_p50_ms", "service_p99_ms",
    "send_lag_p99_ms", "slo_attainment", "goodput_rps", "server_queue_us", "server_compute_us", "server_batch_size",
    "client_bottleneck",
]


def write_summary_csv(result: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, SUMMARY_COLUMNS)
        writer.writeheader()
        for point, key, s in _rows(result):
            lat, service = s["latency_ms"], s["service_latency_ms"]
            server = point["server"] or {}
            model = key.split("/")[0] if key != "all" else (next(iter(server)) if len(server) == 1 else None)
            srv = server.get(model, {}) if model else {}
            writer.writerow({
                "point": point["label"], "class": key, "stable": point["stable"],
                "duration_s": point["measurement"]["duration_s"], "sent": s["sent"], "completed": s["completed"],
                "ok": s["ok"], "errors": sum(s["errors"].values()),
                "error_codes": ";".join(f"{k}={v}" for k, v in s["errors"].items()),
                "throughput_rps": s["throughput_rps"], "mean_ms": lat["mean"],
                **{f"{p}_ms": lat[p] for p in _PCTS},
                "service_p50_ms": service["p50"], "service_p99_ms": service["p99"],
                "send_lag_p99_ms": s["send_lag_ms"]["p99"], "slo_attainment": s["slo_attainment"],
                "goodput_rps": s["goodput_rps"], "server_queue_us": srv.get("avg_queue_us"),
                "server_compute_us": srv.get("avg_compute_us"), "server_batch_size": srv.get("avg_batch_size"),
                "client_bottleneck": point["client"]["bottleneck"],
            })


TIMESERIES_COLUMNS = [
    "t_s", "point", "sent", "ok", "errors", "offered_rps", "throughput_rps", "p50_ms", "p99_ms", "slo_met",
    "slo_judged", "inflight",
    "send_lag_p99_ms", "loop_lag_p99_ms", "batch_size_mean", "queue_depth", "active_variant", "saturation",
]


def write_timeseries_csv(result: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, TIMESERIES_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for entry in result["timeseries"]:
            row = dict(entry)
            for key in ("queue_depth", "active_variant"):
                if key in row:
                    row[key] = ";".join(f"{k}={v}" for k, v in sorted(row[key].items()))
            writer.writerow(row)


DEFAULT_STEM = "bench"


def output_paths(prefix: str) -> list[Path]:
    """PREFIX.json (everything), PREFIX.csv (one row per point and class), PREFIX-timeseries.csv.

    A prefix ending in a slash, or naming an existing directory, means files inside it: taken as a
    plain prefix it would put `dir.json` beside the directory the user pointed at.
    """
    base = Path(prefix)
    if prefix.endswith(("/", os.sep)) or base.is_dir():
        base /= DEFAULT_STEM
    return [base.with_name(base.name + suffix) for suffix in (".json", ".csv", "-timeseries.csv")]


def check_writable(paths: list[Path]) -> None:
    """Creates the folders and proves each file can be opened for writing, before a run whose results
    would otherwise be lost to a bad path at the very end. Existing files are left as they are."""
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            existed = path.exists()
            with path.open("ab"):
                pass
            if not existed:
                path.unlink()
        except OSError as exc:
            culprit = f"{exc.filename}: " if exc.filename and exc.filename != str(path) else ""  # e.g. a parent
            raise InvalidArgument(f"cannot write {path}: {culprit}{exc.strerror or exc}") from None


def write_files(result: dict[str, Any], paths: list[Path]) -> None:
    """Writes the `output_paths` files."""
    write_json(result, paths[0])
    write_summary_csv(result, paths[1])
    write_timeseries_csv(result, paths[2])
