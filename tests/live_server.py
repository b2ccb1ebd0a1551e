"""A real `tidal serve` child process on free loopback ports, and a reader of its /metrics."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServerProcess:
    """A `tidal serve` child process on a free loopback port."""

    proc: subprocess.Popen
    port: int
    lines: list[str] = field(default_factory=list)
    metrics_url: str = ""
    http_url: str = ""  # host:port of the HTTP/REST endpoint
    unix_url: str = ""  # unix:///path when serving on a Unix socket

    @property
    def url(self) -> str:
        return self.unix_url or f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


FRONTENDS = ("grpcio", "native")


def frontend_flags(frontend: str) -> tuple[str, ...]:
    """`tidal serve` flags for a gRPC front end. A build without the native one skips its tests, except in CI,
    which installs gRPC C++ (`make test`) and so must have it: there they fail."""
    import pytest

    if frontend == "grpcio":
        return ()
    from tidal.transport.native import available

    why = available()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return ("--frontend", frontend)


def start_server(repository: Path, *extra: str, timeout: float = 120.0) -> ServerProcess:
    """`extra` may hold --grpc-address unix:///path: then `url` is that address."""
    cmd = [
        sys.executable, "-m", "tidal", "serve", "--model-repository", str(repository),
        "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0", *extra,
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
            http = re.search(r"serving HTTP on (\S+)$", line.strip())
            if http:
                server.http_url = http.group(1)
            match = re.search(r"serving gRPC on (unix:\S+|.*:(\d+))$", line.strip())
            if match:
                server.port = int(match.group(2) or 0)
                server.unix_url = match.group(1) if match.group(2) is None else ""
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"tidal did not start in {timeout}s:\n{server.log()}")
    if not server.port and not server.unix_url:
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


def tidal_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`tidal ARGS` as a user runs it against a live server (control, health, bench)."""
    return subprocess.run([sys.executable, "-m", "tidal", *args], capture_output=True, text=True, timeout=120, env=env)
