"""`tidal bench`: load-test any KServe v2 gRPC server (tidal, Triton, MLServer).

Closed loop (`--concurrency 1:128:x2`), open loop (`--rate 100:800:+100`,
Poisson or constant arrivals), rate profiles (`--profile 60s@200rps,30s@800rps`)
and trace replay (`--trace FILE.csv`); several models and priorities in one
run with `-m` repeated. Prints a table and writes JSON/CSV with `--out`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvloop

from tidal.access import access_from, add_access_arguments
from tidal.argtypes import NON_NEGATIVE, POSITIVE
from tidal.bench.client import Target
from tidal.bench.load import ClosedLoad, OpenLoad
from tidal.bench.output import DEFAULT_STEM, Progress, check_writable, output_paths, render_table, write_files
from tidal.bench.runner import Point, Timing
from tidal.bench.session import BenchConfig, run_bench, trace_plan
from tidal.bench.spec import Stage, parse_class, parse_profile, parse_sweep, read_trace
from tidal.errors import InvalidArgument, TidalError


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the `bench` sub-command; its `func(args) -> int` runs it."""
    p = subparsers.add_parser("bench", help="load-test a KServe v2 gRPC server", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-u", "--url", default="127.0.0.1:8001", help="server host:port (default %(default)s)")
    p.add_argument("-m", "--model", action="append", default=[], metavar="NAME[:k=v,...]",
                   help="traffic class, repeatable; keys priority, batch, weight, slo_ms")
    load = p.add_argument_group("load shape (one of)").add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", metavar="SPEC", help="closed loop: N, N,M,.. or START:END:xF / :+STEP")
    load.add_argument("--rate", metavar="SPEC", help="open loop, requests/s: same forms as --concurrency")
    load.add_argument("--profile", metavar="STAGES", help="open loop stages, e.g. 60s@200rps,30s@200-800rps")
    load.add_argument("--trace", type=Path, metavar="CSV", help="replay send_s,model,priority,batch_size[,deadline_ms]")
    p.add_argument("--arrival", choices=("poisson", "constant"), default="poisson", help="open-loop arrivals")
    p.add_argument("-b", "--batch-size", type=int, default=1, help="per request, unless a class sets batch=")
    p.add_argument("--input-data", default="random", help="random, zeros, or a .npy/.npz file (arrays by input name)")
    p.add_argument("--shape", action="append", default=[], metavar="INPUT:D1,D2",
                   help="per-sample dims of an input with variable dims")
    p.add_argument("--slo-ms", type=POSITIVE, help="latency objective: report SLO attainment and goodput")
    measure = p.add_argument_group("measurement")
    measure.add_argument("--window-s", type=POSITIVE, default=2.0, help="stable-window length (default 2)")
    measure.add_argument("--stability-pct", type=POSITIVE, default=10.0, help="last 3 windows agree within this")
    measure.add_argument("--max-windows", type=int, default=10, help="give up on stability after this many")
    measure.add_argument("--duration-s", type=POSITIVE, help="one fixed measurement per point, not stable windows")
    measure.add_argument("--warmup-s", type=NON_NEGATIVE, default=0.5, help="unmeasured time before each sweep point")
    client = p.add_argument_group("client")
    client.add_argument("--workers", type=int, default=1, help="load processes (default 1)")
    client.add_argument("--max-inflight", type=int, default=4096, help="open-loop cap per process")
    client.add_argument("--request-timeout-s", type=POSITIVE, default=60.0, help="gRPC deadline per request")
    client.add_argument("--drain-timeout-s", type=NON_NEGATIVE, default=10.0, help="wait for stragglers, then cancel")
    client.add_argument("--lag-threshold-ms", type=POSITIVE, default=5.0,
                        help="p99 send or event-loop lag above this flags the client as the bottleneck")
    client.add_argument("--seed", type=int, default=0, help="for arrivals, class mix and random inputs")
    add_access_arguments(p)
    out = p.add_argument_group("output")
    out.add_argument("--metrics-url", help="tidal Prometheus endpoint (default: port 8002 when the server is tidal "
                     "on gRPC port 8001 or a Unix socket; elsewhere none is read without this flag)")
    out.add_argument("-o", "--out", metavar="PREFIX",
                     help="write PREFIX.json, .csv, -timeseries.csv; a directory (or a path ending in /) gets "
                          f"{DEFAULT_STEM}.json and so on inside it")
    out.add_argument("--plot", type=Path, metavar="PNG", help="latency, throughput, batch size and variant over time")
    out.add_argument("--no-progress", action="store_true", help="no live status line")
    p.set_defaults(func=run)
    return p


def _shapes(items: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, _, dims = item.partition(":")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise InvalidArgument(f"--shape '{item}': expected INPUT:D1,D2,...") from None
    return shapes


def _points(args: argparse.Namespace) -> tuple[str, list[Point]]:
    poisson = args.arrival == "poisson"
    if args.concurrency:
        levels = [int(v) for v in parse_sweep(args.concurrency, "--concurrency")]
        return "closed", [Point(f"concurrency={c}", ClosedLoad(c), finite=False) for c in dict.fromkeys(levels)]
    if args.rate:
        rates = parse_sweep(args.rate, "--rate")
        return "open", [Point(f"rate={r:g}", OpenLoad((Stage(float("inf"), r, r),), poisson), finite=False)
                        for r in rates]
    stages = tuple(parse_profile(args.profile))
    return "profile", [Point(f"profile={args.profile}", OpenLoad(stages, poisson), finite=True)]


def build_config(args: argparse.Namespace) -> BenchConfig:
    """Turns parsed flags into a run description; raises InvalidArgument on bad input."""
    if args.workers < 1 or args.max_windows < 3:  # --window-s and the other durations are checked when parsed
        raise InvalidArgument("--workers must be >= 1 and --max-windows >= 3")
    if args.trace:
        if args.model:
            raise InvalidArgument("--trace names its models itself; drop -m")
        classes, trace = trace_plan(read_trace(args.trace), args.slo_ms)
        mode, points = "trace", [Point(f"trace={args.trace.name}", trace, finite=True)]
    else:
        if not args.model:
            raise InvalidArgument("name at least one model with -m")
        classes = [parse_class(m, args.batch_size, args.slo_ms) for m in args.model]
        if len({c.key for c in classes}) != len(classes):
            raise InvalidArgument("two -m classes share model, priority and batch size")
        mode, points = _points(args)
    timing = Timing(args.window_s, args.stability_pct, args.max_windows, args.duration_s, args.warmup_s,
                    args.drain_timeout_s, args.lag_threshold_ms)
    target = Target(args.url, access_from(args))
    return BenchConfig(target, classes, points, mode, timing, args.input_data, _shapes(args.shape), args.workers,
                       args.request_timeout_s, args.max_inflight, args.metrics_url, args.seed)


def run(args: argparse.Namespace) -> int:
    progress = Progress(enabled=False if args.no_progress else None)
    try:
        config = build_config(args)
        out_paths = output_paths(args.out) if args.out else []
        if args.plot:
            from tidal.bench.plot import require_matplotlib

            require_matplotlib()
        check_writable(out_paths + ([args.plot] if args.plot else []))
        try:
            result = uvloop.run(run_bench(config, progress))
        finally:
            progress.close()
    except TidalError as exc:
        print(f"tidal bench: {exc}", file=sys.stderr)
        return 2
    print(render_table(result))
    if out_paths:
        write_files(result, out_paths)
        for path in out_paths:
            print(f"wrote {path}")
    if args.plot:
        from tidal.bench.plot import plot

        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0
