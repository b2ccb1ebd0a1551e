"""tidal bench: HDR recording across windows and processes, stability, metrics parsing, request bodies."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tidal.bench.client import ModelInfo, ServerCounters
from tidal.bench.inputs import InputSource, build_request, request_shapes
from tidal.bench.metrics import MetricsScraper
from tidal.bench.runner import _Tick, _Window, stable
from tidal.bench.spec import TrafficClass
from tidal.bench.stats import OK, ClassRecorder, ClassStats, merge, new_histogram
from tidal.errors import InvalidArgument
from tidal.proto import grpc_service_pb2 as pb

MS = 1_000_000


def _recorded(latencies_ms: list[float], slo_ms: float | None = None, code: str = OK) -> ClassRecorder:
    rec = ClassRecorder()
    for lat in latencies_ms:
        rec.sent += 1
        rec.record(code, int(lat * MS), int(lat * MS) // 2, 1000, int(slo_ms * MS) if slo_ms else None)
    return rec


def test_windows_from_several_processes_add_up_with_hdr_precision() -> None:
    rng = np.random.default_rng(0)
    samples = rng.lognormal(mean=1.0, sigma=0.8, size=6000)
    stats = ClassStats()
    for part in np.array_split(samples, 3):  # three processes, one window each
        stats.add_window(_recorded(list(part)).window())
    summary = stats.summary(duration_s=2.0)
    assert summary["sent"] == summary["ok"] == 6000
    assert summary["throughput_rps"] == 3000
    lat = summary["latency_ms"]
    for p in (50, 90, 99, 99.9):
        assert lat[f"p{p:g}"] == pytest.approx(np.percentile(samples, p), rel=0.01)
    assert lat["max"] == pytest.approx(samples.max(), rel=0.001)
    assert lat["mean"] == pytest.approx(samples.mean(), rel=0.001)
    assert summary["service_latency_ms"]["p50"] == pytest.approx(np.percentile(samples, 50) / 2, rel=0.01)
    assert summary["send_lag_ms"]["max"] == pytest.approx(0.001)


def test_errors_slo_and_goodput() -> None:
    stats = ClassStats()
    stats.add_window(_recorded([1, 2, 3, 40], slo_ms=10).window())
    stats.add_window(_recorded([5, 5], slo_ms=10, code="UNAVAILABLE").window())
    s = stats.summary(duration_s=1.0)
    assert (s["sent"], s["completed"], s["ok"], s["errors"]) == (6, 6, 4, {"UNAVAILABLE": 2})
    assert s["slo_attainment"] == pytest.approx(3 / 6)  # failures count as misses
    assert s["goodput_rps"] == 3
    assert s["latency_ms"]["max"] == pytest.approx(40, rel=0.001)  # failed requests have no latency


def test_no_slo_no_attainment_and_empty_latency() -> None:
    s = ClassStats().summary(duration_s=0.0)
    assert s["slo_attainment"] is None and s["goodput_rps"] is None and s["throughput_rps"] == 0.0
    assert set(s["latency_ms"].values()) == {None}


def test_merge_keeps_classes_apart() -> None:
    a, b = ClassStats(), ClassStats()
    a.add_window(_recorded([1, 2]).window())
    b.add_window(_recorded([3]).window())
    total = merge([{"x": a}, {"x": b, "y": b}])
    assert (total["x"].ok, total["y"].ok) == (3, 1)
    assert a.ok == 2  # inputs untouched


def _window(rps: float, mean_ms: float) -> _Window:
    stats = ClassStats()
    stats.add_window(_recorded([mean_ms] * int(rps)).window())
    return _Window([_Tick(1.0, {"c": stats}, new_histogram(), 0, False)])


def test_stability_needs_three_agreeing_windows() -> None:
    assert not stable([_window(100, 1.0)] * 2, 10)
    assert stable([_window(100, 1.0), _window(105, 1.05), _window(96, 0.98)], 10)
    assert not stable([_window(100, 1.0), _window(100, 1.0), _window(130, 1.0)], 10)  # throughput drifts
    assert not stable([_window(100, 1.0), _window(100, 1.0), _window(100, 1.5)], 10)  # latency drifts
    assert stable([_window(50, 9.0), _window(100, 1.0), _window(100, 1.0), _window(101, 1.01)], 5)  # last three only


def test_server_counters_subtract_into_window_averages() -> None:
    stats = pb.ModelStatistics(inference_count=40, execution_count=10)
    i = stats.inference_stats
    i.success.count, i.success.ns = 20, 20_000_000
    i.queue.count, i.queue.ns = 20, 4_000_000
    i.compute_infer.count, i.compute_infer.ns = 20, 10_000_000
    before = ServerCounters(requests=10, inferences=20, executions=5, success_ns=10_000_000, queue_ns=2_000_000,
                            compute_ns=5_000_000)
    delta = ServerCounters.from_pb([stats]) - before
    assert delta.summary() == {"requests": 10, "failures": 0, "avg_request_us": 1000.0, "avg_queue_us": 200.0,
                               "avg_compute_us": 500.0, "avg_batch_size": 4.0}


def _exposition(batches: list[int], depth: float, variant: str) -> list:
    registry = CollectorRegistry()
    hist = Histogram("tidal_batch_size", "rows", ["model"], buckets=(1, 2, 4, 8, 16), registry=registry)
    gauge = Gauge("tidal_queue_depth", "waiting", ["model", "priority"], registry=registry)
    active = Gauge("tidal_active_variant", "active", ["model", "variant"], registry=registry)
    for b in batches:
        hist.labels("mlp").observe(b)
    hist.labels("other").observe(100)
    gauge.labels("mlp", "1").set(depth)
    gauge.labels("other", "1").set(99)
    active.labels("mlp", "fp32").set(1 if variant == "fp32" else 0)
    active.labels("mlp", "int8").set(1 if variant == "int8" else 0)
    return list(text_string_to_metric_families(generate_latest(registry).decode()))


def test_metrics_sample_the_models_under_load_only() -> None:
    scraper = MetricsScraper("http://unused", ["mlp"])
    first = scraper.parse(_exposition([2, 4], depth=3, variant="fp32"))
    assert first == {"batch_size_mean": 3.0, "queue_depth": {"mlp/p1": 3.0}, "active_variant": {"mlp": "fp32"}}
    # The batch size is the mean of the batches executed since the previous sample.
    second = scraper.parse(_exposition([2, 4, 8, 8], depth=0, variant="int8"))
    assert second["batch_size_mean"] == 8.0 and second["active_variant"] == {"mlp": "int8"}
    assert scraper.parse([]) == {}


def test_metrics_sample_the_servers_saturation() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("tidal_saturation", "saturation", ["model"], registry=registry)
    gauge.labels("").set(1.25)
    gauge.labels("other").set(3.0)
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    assert MetricsScraper("http://unused", ["mlp"]).parse(families) == {"saturation": 1.25}


def _info(shape: list[int], max_batch: int | None, datatype: str = "FP32") -> ModelInfo:
    meta = pb.ModelMetadataResponse(name="m")
    meta.inputs.add(name="x", datatype=datatype, shape=shape)
    return ModelInfo(meta, max_batch)


def test_request_bodies_carry_batch_priority_and_deadline() -> None:
    body = build_request(_info([-1, 4], 8), TrafficClass("m", priority=2, batch_size=3), InputSource("zeros"), {},
                         deadline_us=2500)
    req = pb.ModelInferRequest.FromString(body)
    assert req.model_name == "m" and list(req.inputs[0].shape) == [3, 4]
    assert req.raw_input_contents[0] == bytes(3 * 4 * 4)
    assert req.parameters["priority"].uint64_param == 2 and req.parameters["timeout"].int64_param == 2500
    body = build_request(_info([-1, 4], None), TrafficClass("m"), InputSource("random"), {})
    plain = pb.ModelInferRequest.FromString(body)
    assert "priority" not in plain.parameters and list(plain.inputs[0].shape) == [1, 4]
    values = np.frombuffer(plain.raw_input_contents[0], dtype="<f4")
    assert values.shape == (4,) and ((values >= 0) & (values < 1)).all() and values.any()


def test_shapes_from_config_metadata_and_overrides() -> None:
    assert request_shapes(_info([3, 2], 0), 1, {}) == {"x": ([3, 2], [3, 2])}
    assert request_shapes(_info([-1, -1], 4), 2, {"x": [7]}) == {"x": ([2, 7], [7])}
    with pytest.raises(InvalidArgument, match="--shape"):
        request_shapes(_info([-1, -1], 4), 2, {})
    with pytest.raises(InvalidArgument, match="does not batch"):
        request_shapes(_info([3, 2], 0), 2, {})


def test_bytes_inputs_are_length_prefixed() -> None:
    body = build_request(_info([-1, 2], 4, "BYTES"), TrafficClass("m"), InputSource("random", seed=1), {})
    raw = pb.ModelInferRequest.FromString(body).raw_input_contents[0]
    assert raw[:4] == (8).to_bytes(4, "little") and len(raw) == 2 * (4 + 8)


def test_input_files_fit_the_batch(tmp_path) -> None:
    np.save(tmp_path / "one.npy", np.arange(4, dtype=np.float32))
    np.savez(tmp_path / "many.npz", x=np.arange(40, dtype=np.int64).reshape(10, 4))
    tiled = pb.ModelInferRequest.FromString(
        build_request(_info([-1, 4], 8), TrafficClass("m", batch_size=2), InputSource(str(tmp_path / "one.npy")), {}))
    assert np.frombuffer(tiled.raw_input_contents[0], "<f4").tolist() == [0, 1, 2, 3] * 2
    rows = pb.ModelInferRequest.FromString(build_request(
        _info([-1, 4], 8, "INT64"), TrafficClass("m", batch_size=3), InputSource(str(tmp_path / "many.npz")), {}))
    assert np.frombuffer(rows.raw_input_contents[0], "<i8").tolist() == list(range(12))
    with pytest.raises(InvalidArgument, match="does not fit"):
        build_request(_info([-1, 5], 8), TrafficClass("m"), InputSource(str(tmp_path / "one.npy")), {})
    with pytest.raises(InvalidArgument, match="model wants INT32"):
        build_request(_info([-1, 4], 8, "INT32"), TrafficClass("m"), InputSource(str(tmp_path / "one.npy")), {})
    with pytest.raises(InvalidArgument, match="cannot read input data"):
        InputSource(str(tmp_path / "missing.npy"))


def test_unreadable_input_files_are_user_errors(tmp_path) -> None:
    np.savez(tmp_path / "good.npz", x=np.arange(1000, dtype=np.float32))
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:40])
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04garbage")
    np.savez(tmp_path / "objects.npz", x=np.array([b"a", None], dtype=object))
    np.savez_compressed(tmp_path / "corrupt.npz", x=np.arange(1000, dtype=np.float32))
    data = bytearray((tmp_path / "corrupt.npz").read_bytes())
    data[200:260] = bytes(60)  # inside the compressed member; its CRC or inflate fails on reading
    (tmp_path / "corrupt.npz").write_bytes(data)
    for name in ("truncated.npz", "garbage.npz", "objects.npz", "corrupt.npz"):
        with pytest.raises(InvalidArgument, match="cannot read input data"):
            InputSource(str(tmp_path / name))
