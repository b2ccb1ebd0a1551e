"""Overload at the edge: does tidal hold its SLO where the transport can carry the load, and fail fast and
visibly where it cannot?

    .venv/bin/python perf/bench_overload.py [--slo-ms 50] [--stage-s 20] [--out perf/out/overload]
        [--results perf/RESULTS.md]

One run, `tidal bench` as the load, the demo's `digits` model (1-row requests unless said otherwise):
1. E: the bare echo's capacity within the SLO (perf/echo_server.py, same request shape, same generator);
2. C: tidal's, with the controller off;
3. the smallest rows-per-request k (1, 2, 4, ...) for which 3 C_k <= 0.6 E, i.e. a 3x overload the transport
   itself carries; then 0.5C -> 3C -> 0.5C (`--stage-s` each) with the controller off and on, and a two-class
   run (priority 1 at 0.3C, priority 2 at 2.7C) with it on;
4. 1-row requests at 1.5 E, beyond the transport, against tidal (controller on) and against the echo: goodput
   side by side, and for tidal the saturation gauge, gRPC health latency (probed every 50 ms) and the log.
Tables go to --results between markers, with E, C, k and the host's CPU; raw JSON to --out.
Run it on a quiet machine: the load generator shares the cores with the server.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from loadgen import Watch, cpu_description, echo_server, find_capacity, log, run_bench, write_section

from tidal import demo
from tidal.transport.control import control_set_slo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from live_server import ServerProcess, start_server

MODEL, DIMS = demo.DEMO_MODEL, 64
BEGIN, END = "<!-- bench_overload: generated, do not edit -->", "<!-- bench_overload: end -->"
SECTION = "## Overload at the edge (issue 14)"
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d{3} \w+ tidal\.dataplane: "
                      r"infer (\S+?):? (?:id=\S* )?(?:failed: )?(?:\d+ more requests failed )?([A-Z_]+)")


def _stage(root: Path, slo_ms: float, rows: int) -> Path:
    """A copy of the demo's digits with the SLO and room for `rows`-row requests."""
    source = demo.ensure_demo_repository() / MODEL
    target = root / MODEL
    shutil.copytree(source, target)
    config = (target / "config.pbtxt").read_text()
    config = re.sub(r"max_batch_size:\s*\d+", f"max_batch_size: {max(128, rows * 16)}", config)
    config = re.sub(r"p99_ms:\s*[\d.]+", f"p99_ms: {slo_ms:g}", config)
    (target / "config.pbtxt").write_text(config)
    return root


def _capacity(server: ServerProcess, rows: int, args: argparse.Namespace) -> float:
    return find_capacity(server.url, MODEL, rows, args.slo_ms, args.out / f"tidal-k{rows}", args.sweep_s,
                         args.workers, server.metrics_url)


def _phases(result: dict[str, Any], bounds: list[float], skip_s: float = 0.0) -> list[float | None]:
    """Attainment per phase from the per-second series; `skip_s` leaves out the first seconds of each phase."""
    out = []
    for lo, hi in itertools.pairwise(bounds):
        rows = [t for t in result["timeseries"] if lo + skip_s < t["t_s"] <= hi]
        judged = sum(t.get("slo_judged", 0) for t in rows)
        out.append(sum(t.get("slo_met", 0) for t in rows) / judged if judged else None)
    return out


def _summary(stats: dict[str, Any]) -> dict[str, Any]:
    return {"sent": stats["sent"], "ok": stats["ok"], "errors": stats["errors"],
            "attainment": stats["slo_attainment"], "goodput_rps": stats["goodput_rps"],
            "p99_ms": stats["latency_ms"]["p99"]}


def step(server: ServerProcess, c: float, k: int, args: argparse.Namespace) -> dict[str, Any]:
    s = args.stage_s
    profile = f"{s:g}s@{0.5 * c:.0f}rps,{s:g}s@{3 * c:.0f}rps,{s:g}s@{0.5 * c:.0f}rps"
    out: dict[str, Any] = {"profile": profile}
    for mode in ("off", "full"):
        control_set_slo(server.url, MODEL, mode=mode)
        time.sleep(1.0)
        result = run_bench(server.url, args.out / f"step-{mode}", [MODEL], k, args.slo_ms, ["--profile", profile],
                           server.metrics_url, workers=args.workers)
        bounds = [0.0, s, 2 * s, 3 * s + 5]
        out[mode] = {**_summary(result["points"][0]["measurement"]["all"]),
                     "phases": _phases(result, bounds), "after_step_down_2s": _phases(result, bounds[2:], 2.0)[0]}
        log(f"step, controller {mode}: {out[mode]}")
    return out


def two_class(server: ServerProcess, c: float, k: int, args: argparse.Namespace) -> dict[str, Any]:
    control_set_slo(server.url, MODEL, mode="full")
    time.sleep(1.0)
    classes = [f"{MODEL}:priority=1,weight=1", f"{MODEL}:priority=2,weight=9"]
    result = run_bench(server.url, args.out / "two-class", classes, k, args.slo_ms,
                       ["--rate", f"{3 * c:.0f}", "--duration-s", f"{args.stage_s:g}", "--warmup-s", "2"],
                       server.metrics_url, workers=args.workers)
    out = {key: {**_summary(stats), "error_details": stats["error_details"]}
           for key, stats in result["points"][0]["measurement"]["classes"].items()}
    log(f"two classes: {json.dumps(out)}")
    return out


def _log_rate(server: ServerProcess, since: float) -> dict[str, Any]:
    """Request-failure lines the server logged per second, per model and status, since `since` (wall time)."""
    per_second: Counter[tuple[str, str, str]] = Counter()
    for line in server.lines:
        m = LOG_LINE.match(line)
        if m and time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) >= since - 1:
            per_second[m.groups()] += 1
    return {"lines": sum(per_second.values()), "max_per_second_per_key": max(per_second.values(), default=0)}


def beyond(server: ServerProcess, echo_url: str, e: float, args: argparse.Namespace) -> dict[str, Any]:
    control_set_slo(server.url, MODEL, mode="full")
    time.sleep(2.0)
    load = ["--rate", f"{1.5 * e:.0f}", "--duration-s", f"{args.stage_s:g}", "--warmup-s", "0"]
    started = time.time()
    with Watch(server.url, server.metrics_url, server.proc.pid) as watch:
        tidal = run_bench(server.url, args.out / "beyond-tidal", [MODEL], 1, args.slo_ms, load,
                          server.metrics_url, workers=args.workers)
    echo = run_bench(echo_url, args.out / "beyond-echo", [MODEL], 1, args.slo_ms, load, workers=args.workers)
    # From the load's arrival at the server, sampled every 250 ms; the load's own per-second series says it too.
    per_second = next((t["t_s"] for t in tidal["timeseries"] if (t.get("saturation") or 0.0) >= 0.9), None)
    out = {
        "rate_rps": 1.5 * e,
        "tidal": {**_summary(tidal["points"][0]["measurement"]["all"]),
                  "error_details": tidal["points"][0]["measurement"]["all"]["error_details"]},
        "echo": _summary(echo["points"][0]["measurement"]["all"]),
        "saturation_0.9_after_s": watch.reached(0.9),
        "saturation_0.9_after_s_per_second": per_second,
        "saturation_max": round(max((v for _, v in watch.saturation), default=float("nan")), 2),
        "health": watch.health(),
        "rss_mib_max": max((v for _, v in watch.rss_mib), default=None),
        "log": _log_rate(server, started),
    }
    echo_goodput = out["echo"]["goodput_rps"]
    out["goodput_ratio"] = out["tidal"]["goodput_rps"] / echo_goodput if echo_goodput else None
    log(f"beyond the transport: {json.dumps(out)}")
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def render(r: dict[str, Any], command: str) -> str:
    k, s = r["k"], r["step"]
    lines = [
        BEGIN,
        f"`{command}` on {r['cpu']}; load generator on the same cores ({r['workers']} process(es)); "
        f"SLO p99 {r['slo_ms']:g} ms inside the client's view; {r['stage_s']:g} s stages; tidal's gRPC front end: "
        f"{r.get('frontend', 'grpcio')}.", "",
        f"- E (bare echo, 1-row) = {r['E']:.0f} requests/s within the SLO; C (tidal, controller off, 1-row) = "
        f"{r['C1']:.0f}/s; k = {k} rows per request, C_k = {r['Ck']:.0f} requests/s (3 C_k = "
        f"{3 * r['Ck']:.0f} <= 0.6 E = {0.6 * r['E']:.0f}).", "",
        f"Step {s['profile']} with {k}-row requests:", "",
        "| controller | 0.5C | 3C | 0.5C after | from 2 s after the step down | goodput /s | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("off", "full"):
        m = s[mode]
        lines.append(f"| {mode} | {' | '.join(_pct(p) for p in m['phases'])} | {_pct(m['after_step_down_2s'])} | "
                     f"{m['goodput_rps']:.0f} | {m['errors'] or '-'} |")
    lines += ["", f"Two classes at 3C ({k}-row), controller on:", "",
              "| class | sent | within SLO | errors |", "|---|---|---|---|"]
    for key, c in r["two_class"].items():
        lines.append(f"| {key} | {c['sent']} | {_pct(c['attainment'])} | {c['errors'] or '-'} |")
    b = r["beyond"]
    lines += [
        "", f"1-row requests at 1.5 E = {b['rate_rps']:.0f}/s, beyond the transport:", "",
        "| server | OK | within SLO | goodput /s | errors |", "|---|---|---|---|---|",
        f"| tidal | {b['tidal']['ok']} | {_pct(b['tidal']['attainment'])} | {b['tidal']['goodput_rps']:.0f} | "
        f"{b['tidal']['errors'] or '-'} |",
        f"| echo | {b['echo']['ok']} | {_pct(b['echo']['attainment'])} | {b['echo']['goodput_rps']:.0f} | "
        f"{b['echo']['errors'] or '-'} |", "",
        f"Goodput tidal / echo: {b['goodput_ratio']:.2f}. Saturation gauge >= 0.9 after "
        f"{b['saturation_0.9_after_s']} s of the load reaching the server (sampled every 250 ms; in the load's "
        f"per-second series: {b['saturation_0.9_after_s_per_second']} s; max {b['saturation_max']}). "
        f"Health: {b['health']}. Log: "
        f"{b['log']['lines']} request-failure lines, at most {b['log']['max_per_second_per_key']} per second per "
        "model and status.", END,
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slo-ms", type=float, default=demo.DEMO_SLO_P99_MS)
    parser.add_argument("--stage-s", type=float, default=20.0)
    parser.add_argument("--sweep-s", type=float, default=4.0, help="seconds per capacity point")
    parser.add_argument("--workers", type=int, default=1, help="load processes")
    parser.add_argument("--out", type=Path, default=Path("perf/out/overload"))
    parser.add_argument("--results", type=Path, default=Path("perf/RESULTS.md"))
    parser.add_argument("--frontend", choices=["grpcio", "native"], default="grpcio", help="tidal's gRPC front end")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    r: dict[str, Any] = {"slo_ms": args.slo_ms, "stage_s": args.stage_s, "workers": args.workers,
                         "cpu": cpu_description(), "frontend": args.frontend}
    with echo_server(MODEL, DIMS) as echo_url:
        r["E"] = find_capacity(echo_url, MODEL, 1, args.slo_ms, args.out / "echo", args.sweep_s, args.workers)
        log(f"E = {r['E']:.0f} requests/s")
        with tempfile.TemporaryDirectory(prefix="tidal-bench-overload-") as tmp:
            flags = ("--frontend", args.frontend) if args.frontend != "grpcio" else ()
            server = start_server(_stage(Path(tmp), args.slo_ms, 64), "--load-model", MODEL, *flags)
            try:
                control_set_slo(server.url, MODEL, mode="off")
                k, ck = 1, _capacity(server, 1, args)
                r["C1"] = ck
                while 3 * ck > 0.6 * r["E"] and k < 1024:
                    k *= 2
                    ck = _capacity(server, k, args)
                r["k"], r["Ck"] = k, ck
                log(f"C = {r['C1']:.0f}/s; k = {k}, C_k = {ck:.0f}/s")
                r["step"] = step(server, ck, k, args)
                r["two_class"] = two_class(server, ck, k, args)
                r["beyond"] = beyond(server, echo_url, r["E"], args)
            finally:
                server.stop()
                (args.out / "server.log").write_text(server.log())
    (args.out / "summary.json").write_text(json.dumps(r, indent=2))
    command = "python perf/bench_overload.py " + " ".join(sys.argv[1:])
    write_section(args.results, render(r, command.strip()), BEGIN, END, SECTION)
    print(render(r, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
