"""tidal bench: which /metrics it reads, so another server's figures never pass for the target's."""

from __future__ import annotations

import pytest

from tidal.bench.output import render_table
from tidal.bench.session import metrics_url


@pytest.mark.parametrize(("target", "url"), [
    ("127.0.0.1:8001", "http://127.0.0.1:8002/metrics"),
    ("gpu-box:8001", "http://gpu-box:8002/metrics"),
    ("[::1]:8001", "http://[::1]:8002/metrics"),
    ("unix:///run/tidal.sock", "http://127.0.0.1:8002/metrics"),
])
def test_tidals_default_pair_and_sockets_assume_port_8002(target: str, url: str) -> None:
    assert metrics_url(target, "tidal", None) == (url, None)


@pytest.mark.parametrize("target", ["127.0.0.1:9401", "gpu-box", "[::1]:8002"])
def test_other_ports_read_no_metrics_and_say_to_pass_the_url(target: str) -> None:
    url, why = metrics_url(target, "tidal", None)
    assert url is None and why is not None and "--metrics-url" in why and target in why


def test_a_given_url_is_read_whatever_the_port() -> None:
    given = "http://10.0.0.7:9402/metrics"
    assert metrics_url("10.0.0.7:9401", "tidal", given) == (given, None)
    assert metrics_url("10.0.0.7:9401", "triton", given) == (given, None)


def test_other_servers_are_not_scraped_unasked() -> None:
    assert metrics_url("127.0.0.1:8001", "triton", None) == (None, None)


def test_the_table_says_once_why_no_metrics_were_read() -> None:
    why = "127.0.0.1:9401 is not on tidal's default gRPC port 8001; pass --metrics-url"
    result = {"mode": "closed", "points": [], "metrics": {"url": None, "samples": 0, "error": why}}
    table = render_table(result)
    assert table.count("--metrics-url") == 1 and f"server metrics not read: {why}" in table
