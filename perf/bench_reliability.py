"""Reliability: overload at 5x capacity, a soak at 70%, SIGTERM under load, and 20,000 fuzzed messages.

    .venv/bin/python perf/bench_reliability.py [--soak-s 600] [--overload-s 30] [--fuzz 20000] [--pin]
        [--out perf/out/reliability] [--results perf/RELIABILITY.md]

One run against a real `tidal serve` of the demo's `digits` (its SLO and controller on), `tidal bench` as the
load, 1-row requests:
1. C: the capacity within the SLO, the lowest of --capacity-tries searches that
   found one (a search that finds none is left out; one search on a shared host may
   land in a quiet minute: 1,164/s and 1,819/s in two runs of the same code);
2. overload at 5 C for --overload-s: gRPC health latency (probed every 50 ms), the server's RSS, and every
   status clients saw (designed: OK, RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED, and CANCELLED for
   calls gRPC core drops from its backlog before they start);
3. a soak at 0.7 C for --soak-s: errors, RSS growth from its first minute to its end, and how long the
   server's event-loop thread waited for a CPU (the host's share of any drops);
4. SIGTERM during a closed loop of 32 callers: what each call got (no CANCELLED, no call lost);
5. --fuzz messages: valid requests with random byte mutations, truncations and random bytes, sent raw to
   ModelInfer: the statuses, and whether the server still serves.
Figures go to --results between markers, with the command and the host's CPU. With --pin the server runs on
a core of its own and the load generator on the rest, so what a stalled loop costs is the server's own doing,
not the generator's competition for its core.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from loadgen import Watch, cpu_description, find_capacity, log, rss_mib, run_bench, write_section

from tidal import demo
from tidal.proto import grpc_service_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from live_server import ServerProcess, start_server

MODEL = demo.DEMO_MODEL
BEGIN, END = "<!-- bench_reliability: generated, do not edit -->", "<!-- bench_reliability: end -->"
SECTION = "# Reliability"
INFER = "/inference.GRPCInferenceService/ModelInfer"


class LoopWait:
    """Time the server's event-loop thread spent runnable but off the CPU (Linux schedstat), per 100 ms.
    Calls arriving meanwhile pile up in gRPC core's backlog, which drops them beyond its size: on a host
    shared with other work this, not the offered load, is what bunches arrivals up."""

    def __init__(self, pid: int) -> None:
        self._path = Path(f"/proc/{pid}/task/{pid}/schedstat")  # the main thread runs the event loop
        self._waits: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> LoopWait:
        self.load_start = os.getloadavg()[0]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.load_end = os.getloadavg()[0]

    def _sample(self) -> None:
        last = int(self._path.read_text().split()[1])
        while not self._stop.wait(0.1):
            try:
                now = int(self._path.read_text().split()[1])
            except OSError:  # the server is gone
                return
            self._waits.append((now - last) / 1e6)
            last = now

    def summary(self) -> dict[str, Any]:
        waits = sorted(self._waits) or [0.0]
        return {"waiting_share": sum(waits) / (100.0 * len(waits)), "p99_ms": waits[int(0.99 * (len(waits) - 1))],
                "windows_over_20ms": sum(w >= 20.0 for w in waits), "windows": len(waits),
                "host_load_start": self.load_start, "host_load_end": self.load_end}


def _statuses(result: dict[str, Any]) -> dict[str, int]:
    stats = result["points"][0]["measurement"]["all"]
    return {"OK": stats["ok"], **stats["errors"]}


def overload(server: ServerProcess, c: float, args: argparse.Namespace) -> dict[str, Any]:
    load = ["--rate", f"{5 * c:.0f}", "--duration-s", f"{args.overload_s:g}", "--warmup-s", "0"]
    with Watch(server.url, server.metrics_url, server.proc.pid) as watch:
        result = run_bench(server.url, args.out / "overload", [MODEL], 1, args.slo_ms, load, server.metrics_url,
                           workers=args.workers)
    rss = [v for _, v in watch.rss_mib]
    return {"rate_rps": 5 * c, "statuses": _statuses(result), "health": watch.health(),
            "rss_mib": {"start": rss[0], "max": max(rss), "end": rss[-1]} if rss else None}


def soak(server: ServerProcess, c: float, args: argparse.Namespace) -> dict[str, Any]:
    load = ["--rate", f"{0.7 * c:.0f}", "--duration-s", f"{args.soak_s:g}", "--warmup-s", "0"]
    with Watch(server.url, "", server.proc.pid) as watch, LoopWait(server.proc.pid) as wait:
        result = run_bench(server.url, args.out / "soak", [MODEL], 1, args.slo_ms, load, workers=args.workers)
    first_minute = [v for t, v in watch.rss_mib if t <= 60] or [v for _, v in watch.rss_mib]
    end = watch.rss_mib[-1][1]
    stats = result["points"][0]["measurement"]["all"]
    return {"rate_rps": 0.7 * c, "seconds": args.soak_s, "statuses": _statuses(result),
            "attainment": stats["slo_attainment"], "health": watch.health(), "loop_wait": wait.summary(),
            "rss_mib": {"first_minute_max": max(first_minute), "end": end,
                        "growth": end / max(first_minute) - 1.0}}


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """Processes started inside run on `cpus` (children inherit this process's affinity); None: as they are."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def sigterm(repository: Path, args: argparse.Namespace) -> dict[str, Any]:
    """32 closed-loop callers; SIGTERM after 3 s; the bench runs on until the server is gone."""
    with pinned(args.server_cpus):
        server = start_server(repository, "--load-model", MODEL, "--drain-grace-s", "20", *args.frontend_flags)
    out = args.out / "sigterm"
    cmd = [sys.executable, "-m", "tidal", "bench", "-u", server.url, "-m", MODEL, "--concurrency", "32",
           "--duration-s", "8", "--warmup-s", "0", "--no-progress", "--request-timeout-s", "10", "-o", str(out)]
    bench = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3.0)
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(60)
    _, errors = bench.communicate(timeout=120)
    if not out.with_suffix(".json").is_file():
        raise RuntimeError(f"tidal bench left no result (exit {bench.returncode}):\n{errors[-2000:]}")
    result = json.loads(out.with_suffix(".json").read_text())
    stats = result["points"][0]["measurement"]["all"]
    served = re.findall(r"(\d+) requests succeeded", server.log())
    return {"statuses": _statuses(result), "sent": stats["sent"], "answered": stats["completed"],
            "server_exit": code, "server_succeeded": sum(map(int, served))}


def _valid() -> bytes:
    msg = pb.ModelInferRequest(model_name=MODEL)
    msg.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    msg.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
    return msg.SerializeToString()


def _mutations(count: int, seed: int) -> list[bytes]:
    """A valid 1-row request with byte flips, truncations, insertions, and plain random bytes, in turn."""
    rng = random.Random(seed)
    valid = _valid()
    out = []
    for i in range(count):
        data = bytearray(valid)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:
            data = data[: rng.randrange(len(data))]
        elif kind == 2:
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 64))
        else:
            data = bytearray(rng.randbytes(rng.randint(0, 512)))
        out.append(bytes(data))
    return out


async def _fuzz(url: str, payloads: list[bytes]) -> collections.Counter:
    tally: collections.Counter = collections.Counter()
    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        slots = asyncio.Semaphore(16)

        async def one(payload: bytes) -> None:
            async with slots:
                try:
                    await call(payload, timeout=10)
                    tally["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    tally[err.code().name] += 1

        await asyncio.gather(*[one(p) for p in payloads])
    return tally


def fuzz(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    tally = asyncio.run(_fuzz(server.url, _mutations(args.fuzz, seed=0)))
    seconds = time.monotonic() - started
    alive = server.proc.poll() is None
    after = asyncio.run(_fuzz(server.url, [_valid()])) if alive else {}
    return {"messages": args.fuzz, "seconds": round(seconds, 1), "statuses": dict(tally), "alive": alive,
            "valid_request_after": dict(after), "rss_mib": rss_mib(server.proc.pid) if alive else None}


def render(r: dict[str, Any], command: str) -> str:
    o, s, t, f = r["overload"], r["soak"], r["sigterm"], r["fuzz"]
    w = s["loop_wait"]
    return "\n".join([
        BEGIN,
        f"`{command}` on {r['cpu']}; {r['placement']}; tidal's gRPC front end: {r.get('frontend', 'grpcio')}. "
        f"Capacity C = {r['C']:.0f} 1-row "
        f"requests/s within the {r['slo_ms']:g} ms SLO (demo `digits`, controller on): the lowest non-zero of "
        f"{', '.join(f'{c:.0f}' for c in r['C_tries'])}.", "",
        "| run | load | statuses | health (50 ms probe) | RSS MiB |", "|---|---|---|---|---|",
        f"| overload, {r['overload_s']:g} s | 5 C = {o['rate_rps']:.0f}/s | {o['statuses']} | "
        f"{o['health']} | {o['rss_mib']} |",
        f"| soak, {s['seconds']:g} s | 0.7 C = {s['rate_rps']:.0f}/s | {s['statuses']}, within SLO "
        f"{100 * (s['attainment'] or 0):.2f}% | {s['health']} | first minute {s['rss_mib']['first_minute_max']:.0f}, "
        f"end {s['rss_mib']['end']:.0f} ({100 * s['rss_mib']['growth']:+.1f}%) |",
        f"| SIGTERM under 32 closed-loop callers | - | {t['statuses']}; {t['answered']} of {t['sent']} sent "
        f"answered; server succeeded {t['server_succeeded']}, exit {t['server_exit']} | - | - |",
        f"| {f['messages']} fuzzed messages ({f['seconds']} s) | 16 in flight | {f['statuses']}; server alive: "
        f"{f['alive']} | - | {f['rss_mib']} |", "",
        f"During the soak the server's event-loop thread waited for a CPU {100 * w['waiting_share']:.1f}% of the "
        f"time (p99 {w['p99_ms']:.0f} ms per 100 ms; {w['windows_over_20ms']} of {w['windows']} 100-ms windows "
        f"with 20 ms or more); host load average {w['host_load_start']:.1f} at its start, {w['host_load_end']:.1f} "
        f"at its end.",
        END,
    ]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slo-ms", type=float, default=demo.DEMO_SLO_P99_MS)
    parser.add_argument("--overload-s", type=float, default=30.0)
    parser.add_argument("--soak-s", type=float, default=600.0)
    parser.add_argument("--fuzz", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2, help="load processes")
    parser.add_argument("--capacity-tries", type=int, default=3, help="capacity searches; C is the lowest non-zero")
    parser.add_argument("--out", type=Path, default=Path("perf/out/reliability"))
    parser.add_argument("--results", type=Path, default=Path("perf/RELIABILITY.md"))
    parser.add_argument("--pin", action="store_true",
                        help="the server on the first CPU, the load generator on the others, as a server with a core "
                             "of its own runs (by default they share every core)")
    parser.add_argument("--frontend", choices=["grpcio", "native"], default="grpcio", help="tidal's gRPC front end")
    args = parser.parse_args()
    args.frontend_flags = ("--frontend", args.frontend) if args.frontend != "grpcio" else ()
    args.out.mkdir(parents=True, exist_ok=True)
    repository = demo.ensure_demo_repository()
    cores = sorted(os.sched_getaffinity(0))
    args.server_cpus = {cores[0]} if args.pin and len(cores) > 1 else None
    placement = "load generator on the same cores"
    if args.server_cpus is not None:
        placement = f"server pinned to CPU {cores[0]}, load generator to CPU(s) {', '.join(map(str, cores[1:]))}"
    r: dict[str, Any] = {"cpu": cpu_description(), "slo_ms": args.slo_ms, "overload_s": args.overload_s,
                         "placement": placement, "frontend": args.frontend}
    with pinned(args.server_cpus):
        server = start_server(repository, "--load-model", MODEL, *args.frontend_flags)
    if args.server_cpus is not None:
        os.sched_setaffinity(0, set(cores[1:]))  # every load process started from here on
    try:
        r["C_tries"] = [
            find_capacity(server.url, MODEL, 1, args.slo_ms, args.out / f"capacity{i}", workers=args.workers,
                          metrics_url=server.metrics_url)
            for i in range(args.capacity_tries)
        ]
        found = [c for c in r["C_tries"] if c > 0]
        if not found:
            sys.exit(f"no capacity found in {args.capacity_tries} searches: is the host busy with other work?")
        r["C"] = min(found)
        log(f"C = {r['C']:.0f}/s of {r['C_tries']}")
        r["overload"] = overload(server, r["C"], args)
        log(f"overload: {r['overload']}")
        r["soak"] = soak(server, r["C"], args)
        log(f"soak: {r['soak']}")
        r["fuzz"] = fuzz(server, args)
        log(f"fuzz: {r['fuzz']}")
    finally:
        server.stop()
        (args.out / "server.log").write_text(server.log())
    r["sigterm"] = sigterm(repository, args)
    log(f"sigterm: {r['sigterm']}")
    (args.out / "summary.json").write_text(json.dumps(r, indent=2))
    command = ("python perf/bench_reliability.py " + " ".join(sys.argv[1:])).strip()
    write_section(args.results, render(r, command), BEGIN, END, SECTION)
    print(render(r, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
