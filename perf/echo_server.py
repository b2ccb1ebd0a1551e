"""A bare KServe v2 gRPC server that does no work: the ceiling reference.

It answers ModelInfer by echoing each input back as an output, plus the
metadata, config and statistics RPCs that load generators ask for, so the
cost it shows is the transport's alone (grpc.aio on uvloop). With
`--service-ms` every model becomes a single-server queue that holds each
request that long, which gives tests and demos a server that can be
overloaded at a known capacity; the default 0 keeps it a pure echo.

    python perf/echo_server.py --port 0          # prints the bound port
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import uvloop

from tidal.proto import grpc_service_pb2 as pb
from tidal.proto import grpc_service_pb2_grpc as pb_grpc
from tidal.proto import model_config_pb2 as mc
from tidal.transport.server import INFERENCE_METHODS
from tidal.transport.unreadable import Registrar

SERVER_NAME = "echo"


@dataclass
class _ModelState:
    """Counters served by ModelStatistics; mutated only on the event loop."""

    success_count: int = 0
    success_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    inference_count: int = 0
    last_inference_ms: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class EchoServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves every name in `models` with the same one-input, one-output signature."""

    def __init__(self, models: list[str], datatype: str, dims: list[int], max_batch_size: int, service_s: float):
        self._models = {name: _ModelState() for name in models}
        self._datatype = datatype
        self._dims = dims
        self._max_batch_size = max_batch_size
        self._service_s = service_s

    def _shape(self) -> list[int]:
        return ([-1] if self._max_batch_size > 0 else []) + self._dims

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version="0", extensions=["statistics"])

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name in self._models)

    async def ModelMetadata(self, request, context):
        if request.name not in self._models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.name}'")
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=["1"],
            platform="echo",
            inputs=[meta(name="INPUT0", datatype=self._datatype, shape=self._shape())],
            outputs=[meta(name="OUTPUT0", datatype=self._datatype, shape=self._shape())],
        )

    async def ModelConfig(self, request, context):
        if request.name not in self._models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.name}'")
        dtype = mc.DataType.Value("TYPE_" + ("STRING" if self._datatype == "BYTES" else self._datatype))
        config = mc.ModelConfig(
            name=request.name,
            platform="echo",
            max_batch_size=self._max_batch_size,
            input=[mc.ModelInput(name="INPUT0", data_type=dtype, dims=self._dims)],
            output=[mc.ModelOutput(name="OUTPUT0", data_type=dtype, dims=self._dims)],
        )
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        names = [request.name] if request.name else list(self._models)
        if request.name and request.name not in self._models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.name}'")
        return pb.ModelStatisticsResponse(model_stats=[self._stats(name) for name in names])

    def _stats(self, name: str) -> pb.ModelStatistics:
        s = self._models[name]
        dur = pb.StatisticDuration
        return pb.ModelStatistics(
            name=name,
            version="1",
            last_inference=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.success_count,
            inference_stats=pb.InferStatistics(
                success=dur(count=s.success_count, ns=s.success_ns),
                queue=dur(count=s.success_count, ns=s.queue_ns),
                compute_input=dur(count=s.success_count, ns=0),
                compute_infer=dur(count=s.success_count, ns=s.compute_ns),
                compute_output=dur(count=s.success_count, ns=0),
            ),
        )

    async def ModelInfer(self, request, context):
        start = time.perf_counter_ns()
        state = self._models.get(request.model_name)
        if state is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.model_name}'")
        if len(request.inputs) != 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected exactly one input 'INPUT0'")
        queued = start
        if self._service_s > 0:
            async with state.lock:
                queued = time.perf_counter_ns()
                await asyncio.sleep(self._service_s)
        done = time.perf_counter_ns()
        tensor = request.inputs[0]
        out = pb.ModelInferResponse.InferOutputTensor(
            name="OUTPUT0", datatype=tensor.datatype, shape=tensor.shape, contents=tensor.contents
        )
        state.success_count += 1
        state.success_ns += done - start
        state.queue_ns += queued - start
        state.compute_ns += done - queued
        state.inference_count += tensor.shape[0] if self._max_batch_size > 0 and tensor.shape else 1
        state.last_inference_ms = time.time_ns() // 1_000_000
        return pb.ModelInferResponse(
            model_name=request.model_name,
            model_version="1",
            id=request.id,
            outputs=[out],
            raw_output_contents=request.raw_input_contents,
        )


async def serve(args: argparse.Namespace, servicer_type: Callable[..., EchoServicer]) -> None:
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    )
    servicer = servicer_type(
        args.model or ["echo"], args.datatype, args.dims, args.max_batch_size, args.service_ms / 1e3
    )
    # The cheapest dispatch grpc.aio offers, as tidal's (one backlog of its own for inference, see Registrar).
    inference = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, Registrar(server, inference, INFERENCE_METHODS))
    address = f"{args.host}:{args.port}"
    if args.tls_cert:
        with open(args.tls_key, "rb") as key, open(args.tls_cert, "rb") as cert:
            creds = grpc.ssl_server_credentials([(key.read(), cert.read())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    await server.start()
    print(port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: list[str] | None = None, servicer_type: Callable[..., EchoServicer] = EchoServicer) -> int:
    """`servicer_type` builds the servicer from (models, datatype, dims, max batch size, service seconds)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port; the bound port is printed")
    parser.add_argument("--model", action="append", help="model name to serve (repeatable; default 'echo')")
    parser.add_argument("--datatype", default="FP32", help="KServe datatype of INPUT0/OUTPUT0")
    parser.add_argument("--dims", type=lambda s: [int(d) for d in s.split(",")], default=[16],
                        help="per-sample dims, comma separated (default 16)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="0 = the model takes no batch dimension")
    parser.add_argument("--service-ms", type=float, default=0.0,
                        help="hold each request this long, one at a time per model (default 0: pure echo)")
    parser.add_argument("--tls-cert", help="PEM certificate: serve TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    uvloop.run(serve(args, servicer_type))
    return 0


if __name__ == "__main__":
    sys.exit(main())
