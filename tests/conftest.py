"""Shared fixtures: a Triton-style repository of real ONNX models and a real tidal server on loopback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Helper modules beside this file (onnx_models, live_server) are imported by name from every test folder.
sys.path.insert(0, str(Path(__file__).parent))

from live_server import ServerProcess, start_server
from onnx_models import build_repository


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="session")
def server(repository: Path) -> Iterator[ServerProcess]:
    srv = start_server(repository)
    yield srv
    code = srv.stop()
    assert code == 0, f"tidal exited with {code} on SIGTERM:\n{srv.log()}"
