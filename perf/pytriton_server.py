"""Triton (through PyTriton) serving ONNX files with ONNX Runtime in a Python callable: the comparison server of
perf/bench_scheduler.py and perf/bench_http.py.

Runs in its own venv, `.venv-pytriton`, made from Debian's python3
(`/usr/bin/python3 -m venv .venv-pytriton && .venv-pytriton/bin/pip install nvidia-pytriton onnxruntime`), as
Triton's Python backend stub loads the system's shared libpython, which must match the venv's stdlib. Nothing of
tidal is imported here.

    .venv-pytriton/bin/python perf/pytriton_server.py HTTP_PORT GRPC_PORT METRICS_PORT NAME=model.onnx ...

Each model gets dynamic batching (max_batch_size 128, `--window-us` of queue delay) and one ONNX Runtime
session with tidal's benchmark settings (one intra-op thread, no spinning), so both servers run the same
model the same way. Prints the gRPC port once every model is bound.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

MAX_BATCH = 128


def session_for(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def bind(triton: Triton, name: str, path: str, window_us: int) -> None:
    session = session_for(path)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {out.name: session.run([out.name], {inp.name: inputs[inp.name]})[0]}

    config = ModelConfig(max_batch_size=MAX_BATCH, batcher=DynamicBatcher(max_queue_delay_microseconds=window_us))
    triton.bind(
        name,
        infer,
        inputs=[Tensor(name=inp.name, dtype=np.float32, shape=tuple(inp.shape[1:]))],
        outputs=[Tensor(name=out.name, dtype=np.float32, shape=tuple(out.shape[1:]))],
        config=config,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("http_port", type=int)
    parser.add_argument("grpc_port", type=int)
    parser.add_argument("metrics_port", type=int)
    parser.add_argument("models", nargs="+", help="NAME=path/to/model.onnx")
    parser.add_argument("--window-us", type=int, default=100, help="max_queue_delay_microseconds")
    args = parser.parse_args()
    config = TritonConfig(http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port)
    # Loopback only: no access token, so perf_analyzer may read the statistics endpoint as it does from tidal.
    with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
        for spec in args.models:
            name, path = spec.split("=", 1)
            bind(triton, name, path, args.window_us)
        print(args.grpc_port, flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
