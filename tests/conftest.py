"""Shared fixtures: a Triton-style repository of real ONNX models and a real tidal server on loopback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import onnx_models as models

SIMPLE_CONFIG = """
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] }
]
dynamic_batching { max_queue_delay_microseconds: 500 }
instance_group [ { count: 2 kind: KIND_CPU } ]
# Triton fields tidal accepts without acting on them:
optimization { input_pinned_memory { enable: true } }
model_warmup [ { name: "w" batch_size: 1
  inputs { key: "INPUT0" value { data_type: TYPE_FP32 dims: [ 16 ] zero_data: true } } } ]
"""


def build_repository(root: Path) -> Path:
    """The repository every integration test serves; each model exercises one repository feature."""
    models.write_config(root / "simple", SIMPLE_CONFIG)
    models.add_sub(root / "simple" / "1" / "model.onnx")
    # No config.pbtxt: auto-completed from the graph.
    models.identity_all(root / "identity" / "1" / "model.onnx")
    # FP16 has no typed-contents field in the protocol; this one takes every other type typed.
    models.identity_all(root / "identity_typed" / "1" / "model.onnx", exclude=("FP16",))
    models.write_config(root / "scale", "version_policy { latest { num_versions: 2 } }\nmax_batch_size: 4\n")
    for version in (1, 2, 3):
        models.scale(root / "scale" / str(version) / "model.onnx", float(version))
    models.write_config(root / "scale_specific", "version_policy { specific { versions: [1, 3] } }\n")
    for version in (1, 2, 3):
        models.scale(root / "scale_specific" / str(version) / "model.onnx", float(version))
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
    # Runs fine unless the rows do not split into threes: a real backend failure at run time.
    models.write_config(root / "fragile", "max_batch_size: 0\n")
    models.reshape3(root / "fragile" / "1" / "model.onnx")
    models.write_config(root / "misconfigured", "max_batch_size: 4\nbogus_field: 3\n")
    models.add_sub(root / "misconfigured" / "1" / "model.onnx")
    return root


@dataclass
class ServerProcess:
    """A `tidal serve` child process on a free loopback port."""

    proc: subprocess.Popen
    port: int
    lines: list[str] = field(default_factory=list)
    metrics_url: str = ""

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def start_server(repository: Path, *extra: str, timeout: float = 120.0) -> ServerProcess:
    cmd = [
        sys.executable, "-m", "tidal", "serve", "--model-repository", str(repository),
        "--grpc-port", "0", "--metrics-port", "0", *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    server = ServerProcess(proc, 0)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            server.lines.append(line.rstrip())
            metrics = re.search(r"serving metrics on (http://\S+)$", line.strip())
            if metrics:
                server.metrics_url = metrics.group(1)
            match = re.search(r"serving gRPC on .*:(\d+)$", line.strip())
            if match:
                server.port = int(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"tidal did not start in {timeout}s:\n{server.log()}")
    if not server.port:
        raise RuntimeError(f"tidal exited with {proc.wait()}:\n{server.log()}")
    return server


def scrape(server: ServerProcess) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    want = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base == name and want <= set(re.findall(r'\w+="[^"]*"', rest)):
            total += value
    return total


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="session")
def server(repository: Path) -> Iterator[ServerProcess]:
    srv = start_server(repository)
    yield srv
    code = srv.stop()
    assert code == 0, f"tidal exited with {code} on SIGTERM:\n{srv.log()}"
