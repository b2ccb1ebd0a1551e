"""SLO attainment is judged against the SLO in force: the configured one until SetSlo replaces it."""

from __future__ import annotations

from tidal.metrics import ModelSnapshot, ServerMetrics


def judged_and_met(metrics: ServerMetrics) -> tuple[float, float]:
    snap = ModelSnapshot("m", "1", None, 0, {}, None, (), 1, slo_p99_ms=1.0)
    families = {f.name: f for f in metrics.slo_gauges([snap])}
    return families["tidal_slo_requests"].samples[0].value, families["tidal_slo_met"].samples[0].value


def test_requests_are_judged_against_the_live_slo():
    metrics = ServerMetrics(lambda: [])
    metrics.observe("m", "1", 1, 0.050, 100.0, ok=True)  # configured 100 ms: met
    assert judged_and_met(metrics) == (1, 1)
    metrics.set_slo("m", "1", 10.0)
    metrics.observe("m", "1", 1, 0.050, 100.0, ok=True)  # live 10 ms: missed, whatever the config says
    metrics.observe("m", "1", 1, 0.005, 100.0, ok=False)  # a failure never meets the SLO
    assert judged_and_met(metrics) == (3, 1)
    metrics.set_slo("m", "1", 0.0)  # SLO removed: no longer judged
    metrics.observe("m", "1", 1, 0.005, 100.0, ok=True)
    assert judged_and_met(metrics) == (3, 1)
    labels = {"model": "m", "version": "1", "priority": "1"}
    assert metrics.registry.get_sample_value("tidal_request_duration_seconds_count", labels) == 3  # successes only
