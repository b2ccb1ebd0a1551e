"""Serving on a Unix socket: the sidecar's transport. Mode, clean-up, and the clients that reach it."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

import onnx_models as models
from live_server import FRONTENDS, frontend_flags, start_server


@pytest.fixture
def scale_repo(tmp_path: Path) -> Path:
    models.write_config(tmp_path / "repo" / "scale", "max_batch_size: 8\ndynamic_batching { }\n")
    models.scale(tmp_path / "repo" / "scale" / "1" / "model.onnx", 2.0)
    return tmp_path / "repo"


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_socket_serves_tritonclient_and_bench_then_is_removed(scale_repo: Path, tmp_path: Path, frontend: str) -> None:
    path = tmp_path / "tidal.sock"
    flags = ("--grpc-address", f"unix://{path}", "--socket-mode", "600", *frontend_flags(frontend))
    srv = start_server(scale_repo, *flags)
    try:
        assert srv.url == f"unix://{path}"
        assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
        client = tc.InferenceServerClient(srv.url)
        tensor = tc.InferInput("INPUT", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.full((1, 4), 3.0, np.float32))
        assert client.is_server_ready()
        probe = [sys.executable, "-m", "tidal", "health", "-u", srv.url]
        ok = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING"), ok.stderr
        unknown = subprocess.run([*probe, "--service", "nosuch"], capture_output=True, text=True, timeout=60)
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
        assert client.infer("scale", [tensor]).as_numpy("OUTPUT").tolist() == [[6.0] * 4]
        out = tmp_path / "bench"
        bench = subprocess.run(
            [sys.executable, "-m", "tidal", "bench", "-u", srv.url, "-m", "scale", "--concurrency", "2",
             "--duration-s", "0.5", "--warmup-s", "0", "--no-progress", "-o", str(out),
             "--metrics-url", srv.metrics_url],
            capture_output=True, text=True, timeout=120,
        )
        assert bench.returncode == 0, bench.stdout + bench.stderr
        point = json.loads(out.with_suffix(".json").read_text())["points"][0]
        measured = point["measurement"]["all"]
        assert measured["ok"] > 0 and not measured["errors"], measured
    finally:
        assert srv.stop() == 0
    assert not path.exists()  # removed on exit


def test_a_live_socket_is_not_taken_over_and_a_stale_one_is(scale_repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "tidal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()
        refused = subprocess.run(
            [sys.executable, "-m", "tidal", "serve", "--model-repository", str(scale_repo), "--no-metrics",
             "--grpc-address", f"unix://{path}"],
            capture_output=True, text=True, timeout=120,
        )
    assert refused.returncode == 1 and "another server is listening" in refused.stderr, refused.stderr
    assert path.exists()  # the stale file of a listener that is gone now
    srv = start_server(scale_repo, "--grpc-address", f"unix://{path}")
    try:
        assert tc.InferenceServerClient(srv.url).is_server_ready()
    finally:
        assert srv.stop() == 0


def test_a_path_that_is_not_a_socket_is_refused(scale_repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    refused = subprocess.run(
        [sys.executable, "-m", "tidal", "serve", "--model-repository", str(scale_repo), "--no-metrics",
         "--grpc-address", f"unix:{path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert refused.returncode == 1 and "not a socket" in refused.stderr, refused.stderr
    assert path.read_text() == "keep me"


def test_http_serves_on_its_own_socket(scale_repo: Path, tmp_path: Path) -> None:
    grpc_path, http_path = tmp_path / "grpc.sock", tmp_path / "http.sock"
    srv = start_server(scale_repo, "--grpc-address", f"unix://{grpc_path}", "--http-address", f"unix://{http_path}",
                       "--socket-mode", "640")
    try:
        assert srv.http_url == f"unix://{http_path}"
        assert stat.S_IMODE(http_path.stat().st_mode) == 0o640
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(30)
            conn.connect(str(http_path))
            conn.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: tidal\r\nConnection: close\r\n\r\n")
            reply = b"".join(iter(lambda: conn.recv(65536), b""))
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    finally:
        assert srv.stop() == 0
    assert not grpc_path.exists() and not http_path.exists()
