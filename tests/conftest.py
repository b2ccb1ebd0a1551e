"""Shared fixtures: a Triton-style repository of real ONNX models and a real tidal server on loopback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as tc

# Helper modules beside this file (onnx_models, live_server) are imported by name from every test folder.
sys.path.insert(0, str(Path(__file__).parent))

from live_server import FRONTENDS, ServerProcess, frontend_flags, start_server
from onnx_models import build_repository
from tidal.proto import grpc_service_pb2_grpc as pb_grpc


@pytest.fixture(autouse=True)
def _cuda_device_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """`tidal.cli.main` sets CUDA_DEVICE_ORDER for its process; in a test that calls it, for that test alone."""
    before = os.environ.get("CUDA_DEVICE_ORDER")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", before or "")  # recorded, so restored (or removed) after the test
    if before is None:
        monkeypatch.delenv("CUDA_DEVICE_ORDER")


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="session")
def shared_servers(repository: Path) -> Iterator[Callable[[str], ServerProcess]]:
    """One server per gRPC front end for the whole session, each started when first asked for."""
    started: dict[str, ServerProcess] = {}

    def get(frontend: str) -> ServerProcess:
        if frontend not in started:
            started[frontend] = start_server(repository, *frontend_flags(frontend))
        return started[frontend]

    yield get
    codes = {frontend: srv.stop() for frontend, srv in started.items()}
    failed = {frontend: started[frontend].log() for frontend, code in codes.items() if code}
    assert not failed, f"tidal exited non-zero on SIGTERM: {codes}\n{failed}"


@pytest.fixture(scope="module", params=FRONTENDS)
def server(shared_servers: Callable[[str], ServerProcess], request: pytest.FixtureRequest) -> ServerProcess:
    """The shared server, on each gRPC front end: every test on it holds for both. Module-scoped, so pytest
    keeps the modules in their order (a session-scoped parameter regroups the whole suite by front end)."""
    return shared_servers(request.param)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> tc.InferenceServerClient:
    """tritonclient's sync client on the shared server."""
    return tc.InferenceServerClient(server.url)


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> pb_grpc.GRPCInferenceServiceStub:
    """A raw stub, for messages tritonclient never sends (typed contents, malformed input)."""
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.url))
