"""Shared fixtures: a Triton-style repository of real ONNX models and a real tidal server on loopback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as tc

# Helper modules beside this file (onnx_models, live_server) are imported by name from every test folder.
sys.path.insert(0, str(Path(__file__).parent))

from live_server import FRONTENDS, ServerProcess, frontend_flags, start_server
from onnx_models import build_repository
from tidal.proto import grpc_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="session", params=FRONTENDS)
def server(repository: Path, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """The shared server, once per gRPC front end: every test on it holds for both."""
    srv = start_server(repository, *frontend_flags(request.param))
    yield srv
    code = srv.stop()
    assert code == 0, f"tidal exited with {code} on SIGTERM:\n{srv.log()}"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> tc.InferenceServerClient:
    """tritonclient's sync client on the shared server."""
    return tc.InferenceServerClient(server.url)


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> pb_grpc.GRPCInferenceServiceStub:
    """A raw stub, for messages tritonclient never sends (typed contents, malformed input)."""
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.url))
