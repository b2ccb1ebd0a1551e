"""The least a batching server can do on tidal's transport and threading: the floor of tidal's request path.

perf/echo_server.py's gRPC server (grpc.aio on uvloop, the same metadata, config and statistics RPCs), whose
ModelInfer runs the model as tidal does, with nothing else: the raw input becomes an array, a future waits on
the loop, one worker thread runs everything queued as one ONNX Runtime batch (one intra-op thread, no spinning,
tidal's settings) and hands the outputs back with one `call_soon_threadsafe`. No validation, admission, priority,
deadline, statistics beyond counts, metrics or error handling (a failing run stops the worker and every later
request waits; requests must be one row each): a measuring stick, not a server. Next to the echo
(no model work) and tidal in one run, it splits tidal's distance from the echo into what the model and the
thread hand-offs cost (echo -> floor) and what tidal's own request path costs (floor -> tidal).

    python perf/floor_server.py --port 0 --model mlp --dims 256 --onnx path/to/model.onnx
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
import echo_server
from echo_server import EchoServicer

from tidal.proto import grpc_service_pb2 as pb


class FloorServicer(EchoServicer):
    """One model input and output; every request is one row, so the batch is the queue's length."""

    def __init__(self, session: ort.InferenceSession, *args) -> None:
        super().__init__(*args)
        self._session = session
        self._input = session.get_inputs()[0].name
        self._output = session.get_outputs()[0].name
        self._queued: list[tuple[np.ndarray, asyncio.Future]] = []
        self._running = False
        self._job: list[tuple[np.ndarray, asyncio.Future]] | None = None
        self._ready = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        threading.Thread(target=self._work, daemon=True, name="floor-worker").start()

    def _work(self) -> None:
        while True:
            with self._ready:
                while self._job is None:
                    self._ready.wait()
                job, self._job = self._job, None
            batch = np.concatenate([row for row, _ in job])
            out = self._session.run([self._output], {self._input: batch})[0]
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._done, job, out)

    def _done(self, job: list[tuple[np.ndarray, asyncio.Future]], out: np.ndarray) -> None:
        self._running = False
        for i, (_, waiter) in enumerate(job):
            if not waiter.done():
                waiter.set_result(out[i : i + 1])
        self._start()

    def _start(self) -> None:
        if self._running or not self._queued:
            return
        most = max(self._max_batch_size, 1)  # --max-batch-size, as the echo declares it
        job, self._queued = self._queued[:most], self._queued[most:]
        self._running = True
        state = next(iter(self._models.values()))
        state.success_count += 1  # reported as executions: perf_analyzer and the bench read the batch size
        state.inference_count += len(job)
        with self._ready:
            self._job = job
            self._ready.notify()

    async def ModelInfer(self, request, context):
        self._loop = self._loop or asyncio.get_running_loop()
        tensor = request.inputs[0]
        row = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(tuple(tensor.shape))
        waiter = self._loop.create_future()
        self._queued.append((row, waiter))
        self._start()
        out = await waiter
        return pb.ModelInferResponse(
            model_name=request.model_name,
            model_version="1",
            id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name=self._output, datatype="FP32", shape=out.shape)],
            raw_output_contents=[out.tobytes()],
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--onnx", required=True, help="the model: one input, one output, FP32, batch dim first")
    known, rest = parser.parse_known_args(argv)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(known.onnx, options, providers=["CPUExecutionProvider"])
    return echo_server.main(rest, lambda *args: FloorServicer(session, *args))


if __name__ == "__main__":
    sys.exit(main())
