"""EdgeMeter's readings from probes fed by hand: the busy share, lag and rates behind the saturation gauge."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tidal.dataplane import edge as edge_module
from tidal.dataplane.edge import LAG_FULL_MS, PROBE_S, WINDOW_S, EdgeMeter, _ThreadDemand


def feed(edge: EdgeMeter, start_s: float, seconds: float, cpu_share: float, cpu_s: float, lag_ms: float = 0.0) -> float:
    """Probes every PROBE_S for `seconds` with the loop's thread busy `cpu_share` of the time; the CPU time
    reached."""
    steps = round(seconds / PROBE_S)
    for i in range(1, steps + 1):
        cpu_s += cpu_share * PROBE_S
        edge.record(start_s + i * PROBE_S, cpu_s, lag_ms)
    return cpu_s


def test_a_loop_that_fills_up_reads_busy_once_the_window_has_passed() -> None:
    edge = EdgeMeter(lambda: 0.0)
    cpu = feed(edge, 0.0, 2.0, 0.1, 0.0)
    assert edge.busy() == pytest.approx(0.1)
    cpu = feed(edge, 2.0, WINDOW_S / 2, 1.0, cpu)
    assert edge.busy() == pytest.approx(0.55, abs=0.02)  # half the window busy
    feed(edge, 2.0 + WINDOW_S / 2, WINDOW_S / 2, 1.0, cpu)
    assert edge.busy() == pytest.approx(1.0, abs=0.02)


def test_a_starved_loop_with_one_recent_probe_measures_from_the_one_before() -> None:
    edge = EdgeMeter(lambda: 0.0)
    cpu = feed(edge, 0.0, 1.0, 0.2, 0.0)
    edge.record(1.0 + 2 * WINDOW_S, cpu + 0.9 * 2 * WINDOW_S, 0.0)  # the probe itself ran late
    assert edge.busy() == pytest.approx(0.9)


def test_lag_alone_marks_the_loop_busy() -> None:
    edge = EdgeMeter(lambda: 0.0)
    feed(edge, 0.0, 0.5, 0.0, 0.0, lag_ms=LAG_FULL_MS / 2)
    assert edge.busy() == pytest.approx(0.5)
    assert edge.lag_ms() == pytest.approx(LAG_FULL_MS / 2)


def test_rates_count_what_arrived_over_the_window() -> None:
    edge = EdgeMeter(lambda: 0.0)
    edge.gate("m", 1)
    cpu = feed(edge, 0.0, 0.2, 0.1, 0.0)
    for step in range(10):
        for _ in range(50):
            edge.received("m")
        cpu = feed(edge, 0.2 + step * 0.1, 0.1, 0.1, cpu)
    received, _ = edge.rates("m")
    assert received == pytest.approx(500.0, rel=0.15)


@pytest.mark.skipif(not Path(edge_module.SCHEDSTAT).exists(), reason="Linux schedstat only")
def test_a_thread_kept_off_its_cpu_reads_busy_not_idle() -> None:
    """A thread that always wants to run, sharing one CPU with a spinning process, gets about half of it:
    CPU time says half idle, running plus waiting says what it is, fully busy (the starved event loop)."""
    cpu = min(os.sched_getaffinity(0))
    spin = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    own = os.sched_getaffinity(0)
    try:
        deadline = time.monotonic() + 10
        while int(Path(f"/proc/{spinner.pid}/schedstat").read_text().split()[0]) < 100_000_000:  # spinning 0.1 s
            assert time.monotonic() < deadline, "the spinner never ran"
            time.sleep(0.02)
        os.sched_setaffinity(0, {cpu})  # this thread only (Linux: pid 0 is the calling thread)
        with _ThreadDemand() as demand:
            wall0, cpu0, demand0 = time.monotonic(), time.thread_time(), demand.seconds()
            while time.monotonic() - wall0 < 0.5:
                pass
            wall, used, wanted = time.monotonic() - wall0, time.thread_time() - cpu0, demand.seconds() - demand0
    finally:
        os.sched_setaffinity(0, own)
        spinner.kill()
        spinner.wait()
    assert used / wall < 0.8
    assert wanted / wall > 0.9


@pytest.mark.parametrize("contents", [None, "0 0 0\n", "not a schedstat line\n"])
def test_without_usable_schedstat_the_demand_is_cpu_time(tmp_path, monkeypatch, contents) -> None:
    """A missing file, a kernel that keeps no counters (zeros) or a format never seen: CPU time instead."""
    path = tmp_path / "schedstat"
    if contents is not None:
        path.write_text(contents)
    monkeypatch.setattr(edge_module, "SCHEDSTAT", str(path))
    with _ThreadDemand() as demand:
        assert demand.seconds() == pytest.approx(time.thread_time(), abs=0.05)


def test_stopping_the_probe_at_any_point_leaves_no_failing_callback(monkeypatch) -> None:
    """Stopped between making its wake-up ready and running it, the probe left a callback that failed on its
    cancelled future (an error in the log at shutdown)."""
    monkeypatch.setattr(edge_module, "PROBE_S", 0)
    errors: list[dict] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
        for turns in range(1, 40):
            meter = EdgeMeter()
            meter.start()
            for _ in range(turns % 5):
                await asyncio.sleep(0)
            await meter.stop()
        for _ in range(5):
            await asyncio.sleep(0)

    asyncio.run(main())
    assert errors == []
