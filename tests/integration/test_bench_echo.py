"""`tidal bench` edge cases against perf/echo_server.py: errors, stragglers, SLOs, TLS, plots, bad flags."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_bench import FAST, check_result, run_bench  # pytest puts this folder on sys.path

from tidal.cli import main as tidal_main

ROOT = Path(__file__).resolve().parents[2]


def start_echo(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "perf" / "echo_server.py"), "--port", "0", *args],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.isdigit():
        proc.kill()
        raise RuntimeError(f"echo server did not start: {line!r}")
    return proc, line


@pytest.fixture
def echo_slow() -> Iterator[str]:
    """Two models, each a single server holding every request 20 ms: capacity 50 rps per model."""
    proc, port = start_echo("--model", "a", "--model", "b", "--service-ms", "20")
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def test_errors_by_status_and_cancelled_stragglers(echo_slow: str, tmp_path: Path) -> None:
    out = tmp_path / "overload"
    # 200 rps into 50 rps of capacity with a 150 ms deadline: most requests time out, and the
    # in-flight cap of 20 holds sends back; at the end a drain of 20 ms leaves the rest in
    # flight, to be cancelled and counted.
    result, stdout = run_bench(out, "-u", echo_slow, "-m", "a", "--rate", "200", "--duration-s", "1",
                               "--request-timeout-s", "0.15", "--drain-timeout-s", "0.02", "--max-inflight", "20",
                               *FAST)
    check_result(result, out, points=1, classes=1)
    totals = result["points"][0]["totals"]
    assert totals["errors"]["DEADLINE_EXCEEDED"] > 0 and totals["ok"] > 0
    assert totals["stragglers"] > 0 and totals["errors"]["CANCELLED"] == totals["stragglers"]
    assert totals["error_details"]["CANCELLED"].startswith("cancelled by tidal bench")
    assert "DEADLINE_EXCEEDED" in stdout and "were cancelled" in stdout
    client = result["points"][0]["client"]
    assert client["capped_sends"] > 0 and client["bottleneck"] and "in-flight cap" in stdout


def test_slo_attainment_goodput_and_server_times(echo_slow: str, tmp_path: Path) -> None:
    out = tmp_path / "slo"
    result, stdout = run_bench(out, "-u", echo_slow, "-m", "a:slo_ms=5", "-m", "b:slo_ms=10000",
                               "--concurrency", "2", "--duration-s", "1", *FAST)
    check_result(result, out, points=1, classes=2)
    point = result["points"][0]
    classes = point["measurement"]["classes"]
    # Every request is held at least 20 ms: none can meet 5 ms, all meet 10 s.
    assert classes["a/p0/b1"]["slo_attainment"] == 0.0 and classes["a/p0/b1"]["goodput_rps"] == 0.0
    assert classes["b/p0/b1"]["slo_attainment"] == 1.0
    assert classes["b/p0/b1"]["goodput_rps"] == pytest.approx(classes["b/p0/b1"]["throughput_rps"])
    assert classes["a/p0/b1"]["latency_ms"]["p50"] >= 20
    for model in ("a", "b"):
        assert point["server"][model]["avg_compute_us"] >= 20_000
    assert "0.0%" in stdout and "100.0%" in stdout


def test_tls(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    proc, port = start_echo("--tls-cert", str(cert), "--tls-key", str(key))
    try:
        out = tmp_path / "tls"
        result, _ = run_bench(out, "-u", f"localhost:{port}", "--tls-ca", str(cert), "-m", "echo",
                              "--concurrency", "2", "--duration-s", "0.5", *FAST)
        check_result(result, out, points=1, classes=1)
        assert result["points"][0]["totals"]["errors"] == {}
        # The same server refuses a plain-text client: the harness says so and exits non-zero.
        plain = subprocess.run([sys.executable, "-m", "tidal", "bench", "-u", f"localhost:{port}", "-m", "echo",
                                "--concurrency", "1", "--no-progress"], capture_output=True, text=True, timeout=60)
        assert plain.returncode == 2 and "UNAVAILABLE" in plain.stderr
    finally:
        proc.terminate()
        proc.wait(10)


def test_plot_and_client_bottleneck_report(echo_slow: str, tmp_path: Path) -> None:
    png = tmp_path / "run.png"
    out = tmp_path / "plot"
    result, stdout = run_bench(out, "-u", echo_slow, "-m", "a", "--profile", "1s@20rps,1s@20-40rps",
                               "--plot", str(png), "--lag-threshold-ms", "0.0001", "--no-progress")
    check_result(result, out, points=1, classes=1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert result["points"][0]["client"]["bottleneck"] is True
    assert "the CLIENT is the bottleneck" in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concurrency", "4"], "name at least one model"),
        (["-m", "a", "--concurrency", "1:8:x1"], "--concurrency"),
        (["-m", "a", "--profile", "5s@fast"], "profile stage"),
        (["-m", "a:color=red", "--rate", "5"], "model spec"),
        (["-m", "a", "-m", "a", "--rate", "5"], "share model"),
        (["-m", "a", "--trace", "/nonexistent.csv"], "--trace names its models"),
        (["--trace", "/nonexistent.csv"], "cannot read trace"),
        (["-m", "a", "--rate", "5", "--workers", "0"], "--workers"),
        (["-m", "a", "--rate", "5", "--shape", "x:1,y"], "--shape"),
    ],
)
def test_bad_flags_exit_2_with_a_reason(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert tidal_main(["bench", *args, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_unknown_model_is_reported_before_any_load(echo_slow: str, capsys: pytest.CaptureFixture) -> None:
    assert tidal_main(["bench", "-u", echo_slow, "-m", "nope", "--rate", "5", "--no-progress"]) == 2
    assert "model 'nope': NOT_FOUND" in capsys.readouterr().err
