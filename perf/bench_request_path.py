"""tidal's request path without the transport: what each request costs in tidal's own code.

    .venv/bin/python perf/bench_request_path.py [--model mlp] [--concurrency 1 4 32 128] [--seconds 3]

Two measurements in one process, on a reference model of perf/models.py with batching on (no window):
1. The codec, per call (best of 3 rounds): parsing the serialized ModelInferRequest (what grpc.aio does before
   tidal runs), converting and checking it against the model's signature, building and serializing the response.
2. The whole path a gRPC call takes once grpc.aio hands it over (servicer -> data plane -> scheduler -> instance
   thread -> back, metrics and the control loop running), driven by `--concurrency` closed-loop callers on the
   event loop itself: requests/s, CPU per request on the loop thread and in the process, and the batch formed.

perf/bench_scheduler.py measures the served total against the echo, the floor and PyTriton; this splits tidal's
share of it. Nothing here is timed against a goal: it is a profile to design the native request path from.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np
import uvloop

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import environment
from models import MODELS, model_config, write_model_dir

from tidal.app import GIL_SWITCH_INTERVAL_S, App, ServeOptions
from tidal.proto import grpc_service_pb2 as pb
from tidal.transport import convert
from tidal.transport.servicer import InferenceServicer
from tidal.types import InferResponse

CALLS = 20_000


class _Context:
    """What the servicer reads of grpc.aio's context on a call that succeeds: no deadline."""

    def time_remaining(self) -> None:
        return None


def request_bytes(model: str, dims: tuple[int, ...]) -> bytes:
    msg = pb.ModelInferRequest(model_name=model)
    tensor = msg.inputs.add(name="INPUT", datatype="FP32")
    tensor.shape.extend([1, *dims])
    msg.raw_input_contents.append(np.random.default_rng(0).random((1, *dims), dtype=np.float32).tobytes())
    return msg.SerializeToString()


def _us(call) -> float:
    return min(timeit.repeat(call, number=CALLS, repeat=3)) / CALLS * 1e6


async def codec(app: App, model: str, data: bytes) -> dict[str, float]:
    served = app.manager.get(model, "")
    msg = pb.ModelInferRequest.FromString(data)
    servicer = InferenceServicer(app.plane)
    response = await servicer.ModelInfer(msg, _Context())
    answer = convert.decode_request(msg, 0.0, None, served.signature)
    out = {
        "parse (grpc.aio)": _us(lambda: pb.ModelInferRequest.FromString(data)),
        "decode + limits + signature": _us(lambda: convert.decode_request(msg, 0.0, None, served.signature)),
        "signature check of arrays": _us(lambda: served.signature.check(answer)),
        "serialize response (grpc.aio)": _us(response.SerializeToString),
    }
    outputs = {name: np.zeros((1, 10), np.float32) for name in served.output_specs}
    reply = InferResponse(model, "1", outputs, "", {"tidal_variant": "fp32"})
    out["encode response"] = _us(lambda: convert.encode_response(reply))
    return out


async def path(app: App, data: bytes, concurrency: int, seconds: float, model: str) -> dict[str, float]:
    servicer, context = InferenceServicer(app.plane), _Context()
    done, running = 0, True

    async def caller() -> None:
        nonlocal done
        while running:
            reply = await servicer.ModelInfer(pb.ModelInferRequest.FromString(data), context)
            reply.SerializeToString()
            done += 1

    callers = [asyncio.create_task(caller()) for _ in range(concurrency)]
    await asyncio.sleep(0.5)
    served = app.manager.get(model, "")
    before = served.stats()
    count0, loop0, cpu0, wall0 = done, time.thread_time(), time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    count, wall = done - count0, time.perf_counter() - wall0
    loop, cpu = time.thread_time() - loop0, time.process_time() - cpu0
    after = served.stats()
    running = False
    await asyncio.gather(*callers)
    executions = after.execution_count - before.execution_count
    return {
        "rps": count / wall,
        "loop_us": loop / count * 1e6,
        "process_us": cpu / count * 1e6,
        "batch": (after.inference_count - before.inference_count) / max(executions, 1),
    }


async def run(args: argparse.Namespace, repo: Path) -> str:
    options = ServeOptions(repo, grpc_port=0, metrics_port=None, http_port=None)
    app = App(options)
    await app.start()
    try:
        name = f"{args.model}_batched"
        data = request_bytes(name, MODELS[args.model].input_dims)
        costs = await codec(app, name, data)
        rows = [await path(app, data, c, args.seconds, name) for c in args.concurrency]
    finally:
        await app.stop()
    env = environment()
    lines = [
        f"Command: `python perf/bench_request_path.py {' '.join(sys.argv[1:])}`; {env['cpu']}; "
        f"load average at the end {env['load_average']}.",
        "",
        "| codec step (1-row request) | us per call |",
        "|---|---:|",
        *(f"| {step} | {us:.1f} |" for step, us in costs.items()),
        "",
        f"| {args.model}, callers | requests/s | loop CPU per request, us | process CPU per request, us | batch |",
        "|---:|---:|---:|---:|---:|",
        *(
            f"| {c} | {r['rps']:,.0f} | {r['loop_us']:.0f} | {r['process_us']:.0f} | {r['batch']:.1f} |"
            for c, r in zip(args.concurrency, rows, strict=True)
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="mlp")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 32, 128])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as `tidal serve` sets it
    with tempfile.TemporaryDirectory(prefix="tidal-bench-path-") as tmp:
        repo = Path(tmp)
        model = MODELS[args.model]
        name = f"{args.model}_batched"
        write_model_dir(repo, name, model, model_config(name, model, 128, 0))
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            print(runner.run(run(args, repo)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
