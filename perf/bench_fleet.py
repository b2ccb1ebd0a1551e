"""Sidecar and fleet figures: Unix socket against loopback TCP at concurrency 1, and `tidal plan` against a run.

    .venv/bin/python perf/bench_fleet.py [--rounds 5] [--write perf/RESULTS.md]

Socket vs TCP: two `tidal serve` of the demo's `digits` (one on 127.0.0.1, one on a Unix socket in a temp
folder) run side by side; each round measures both in turn with `tidal bench --concurrency 1`, so a change in
the machine's background load reaches both alike. Cells are medians over the rounds, with min..max.

Plan vs measured: each round measures this host's request path as `tidal plan` does (a no-work model,
CAPACITY_BENCH's closed loop) and then one `digits` replica with the same load; the plan's one-replica
capacity from the median path is set against the median measured capacity.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from loadgen import environment, log, write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from live_server import ServerProcess, start_server  # noqa: E402
from tidal.demo import ensure_demo_repository  # noqa: E402
from tidal.plan_cli import CAPACITY_BENCH, measure_capacity_rps, no_work_repository, serving  # noqa: E402

BEGIN, END = "<!-- bench_fleet: generated, do not edit -->", "<!-- bench_fleet: end -->"
SECTION = "## Sidecar and fleet: Unix socket, `tidal plan`"
PLAN_ARGS = ["--model", "digits", "--rate", "20000", "--slo-ms", "50", "--min-accuracy", "0.97",
             "--cost-per-core-hour", "0.05", "--cores-per-replica", "1"]  # the clients have the other core


def conc1(server: ServerProcess, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "c1"
        subprocess.run(
            [sys.executable, "-m", "tidal", "bench", "-u", server.url, "-m", "digits", "--concurrency", "1",
             "--duration-s", str(seconds), "--warmup-s", "0.5", "--no-progress", "-o", str(out)],
            check=True, capture_output=True, timeout=600,
        )
        point = json.loads(out.with_suffix(".json").read_text())["points"][0]["measurement"]["all"]
    return {"rps": point["throughput_rps"], **{k: point["latency_ms"][k] for k in ("p50", "p99", "mean")}}


def socket_vs_tcp(repository: Path, rounds: int, seconds: float) -> dict[str, list[dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        servers = {
            "loopback TCP": start_server(repository, "--load-model", "digits", "--no-metrics"),
            "Unix socket": start_server(repository, "--load-model", "digits", "--no-metrics",
                                        "--grpc-address", f"unix://{tmp}/tidal.sock"),
        }
        try:
            results: dict[str, list[dict]] = {name: [] for name in servers}
            for i in range(rounds):
                for name, server in servers.items():
                    results[name].append(conc1(server, seconds))
                    log(f"round {i + 1} {name}: {results[name][-1]}")
            return results
        finally:
            for server in servers.values():
                server.stop()


def plan_vs_measured(repository: Path, rounds: int) -> dict:
    paths, measured, plans = [], [], []
    with tempfile.TemporaryDirectory() as tmp, serving(no_work_repository(Path(tmp))) as path_url, \
            serving(repository, "--load-model", "digits") as digits_url:
        for i in range(rounds):
            paths.append(measure_capacity_rps(path_url, "path"))
            cmd = [sys.executable, "-m", "tidal", "plan", *PLAN_ARGS, "--model-repository", str(repository),
                   "--path-rps", f"{paths[-1]:.0f}"]
            plans.append(json.loads(subprocess.run([*cmd, "--json"], capture_output=True, text=True,
                                                   check=True).stdout)["sized"][0]["capacity_rps"])
            measured.append(measure_capacity_rps(digits_url, "digits"))
            log(f"round {i + 1}: request path {paths[-1]:.0f} req/s, planned {plans[-1]:.0f}, "
                f"digits measured {measured[-1]:.0f} req/s")
    cmd[-1] = f"{statistics.median(paths):.0f}"
    text = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout
    return {"paths": paths, "planned": plans, "measured": measured, "plan": text}


def _spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})"


def render(sockets: dict[str, list[dict]], plan: dict, env: dict[str, str], rounds: int) -> str:
    lines = [BEGIN, "", f"`.venv/bin/python perf/bench_fleet.py --rounds {rounds}`; {env['cpu']}; load average "
             f"{env['load_average']} at the end (the cores are shared with the clients and other work).", "",
             "Concurrency 1, `digits` (demo), `tidal bench` closed loop; median (min..max) over the rounds:", "",
             "| transport | req/s | mean ms | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- |"]
    for name, runs in sockets.items():
        cells = [_spread([r[k] for r in runs], ".0f" if k == "rps" else ".3f") for k in ("rps", "mean", "p50", "p99")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    errors = [p / m - 1 for p, m in zip(plan["planned"], plan["measured"], strict=True)]
    lines += ["", f"`tidal plan {' '.join(PLAN_ARGS)}` against a `digits` replica measured with `tidal bench "
              f"{' '.join(CAPACITY_BENCH)}`; the request path (a no-work model) and the replica are served side by "
              "side and measured in turn, each round planning from that round's path:", "",
              f"- request path {_spread(plan['paths'], '.0f')} req/s; planned {_spread(plan['planned'], '.0f')}, "
              f"measured {_spread(plan['measured'], '.0f')} req/s per replica",
              f"- planned / measured - 1, per round: {', '.join(f'{e:+.0%}' for e in errors)}; "
              f"median {statistics.median(errors):+.0%}", "",
              "The plan at the median path:", "", "```", plan["plan"].rstrip(), "```", "", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per concurrency-1 measurement")
    parser.add_argument("--write", type=Path, help="update this RESULTS.md's generated section")
    args = parser.parse_args(argv)
    repository = ensure_demo_repository(progress=False)
    sockets = socket_vs_tcp(repository, args.rounds, args.seconds)
    plan = plan_vs_measured(repository, args.rounds)
    text = render(sockets, plan, environment(), args.rounds)
    print(text)
    if args.write:
        write_section(args.write, text, BEGIN, END, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
