"""fleet.py: sizing from profiles through the controller's queueing estimate, and the choice among variants."""

from __future__ import annotations

import math

import pytest

from tidal.control.memory import Tuning
from tidal.fleet import Ask, Candidate, choose, size

SIZES = (1, 8, 64)


def linear(name: str, intercept: float, per_row: float, accuracy: float | None = 0.95, agreement: float = 1.0):
    return Candidate(name, accuracy, agreement, SIZES, tuple(intercept + per_row * b for b in SIZES))


def test_a_cheap_model_is_bound_by_the_request_path() -> None:
    tuning = Tuning()
    sizing = size(linear("fast", 0.05, 0.001), Ask(10_000, 50, 64, 1_000, 2), tuning)
    assert sizing.bound_by == "request path" and sizing.capacity_rps == 1_000 and sizing.instances == 1
    assert sizing.replicas == math.ceil(10_000 / (1_000 * tuning.settle_utilisation))
    assert sizing.utilisation <= tuning.settle_utilisation and sizing.meets_slo
    assert sizing.headroom == pytest.approx(sizing.replicas * 1_000 / 10_000 - 1)


def test_an_expensive_model_gets_instances_up_to_the_cores_then_more_replicas() -> None:
    slow = linear("slow", 1.0, 0.5)  # 64 rows: 33 ms, about 1,940 rows/s an instance at most
    two = size(slow, Ask(4_000, 200, 64, 5_000, 3))
    assert two.bound_by == "model" and two.instances == 2  # 3 cores: one for the request path
    one = size(slow, Ask(4_000, 200, 64, 5_000, 2))
    assert one.instances == 1 and one.replicas > two.replicas
    assert one.capacity_rps == pytest.approx(two.capacity_rps / 2)


def test_the_slo_caps_the_batch_and_an_unreachable_one_is_said() -> None:
    slow = linear("slow", 1.0, 0.5)
    loose, tight = size(slow, Ask(10_000, 400, 64, 5_000, 2)), size(slow, Ask(10_000, 20, 64, 5_000, 2))
    assert tight.batch_limit < loose.batch_limit and tight.replicas > loose.replicas
    never = size(slow, Ask(1_000, 1, 64, 5_000, 2))
    assert never.batch_limit == 0 and not never.meets_slo


def test_cost_per_million_follows_replicas_cores_and_price() -> None:
    sizing = size(linear("fast", 0.05, 0.001), Ask(10_000, 50, 64, 1_000, 2, cost_per_core_hour=0.1))
    per_hour = sizing.replicas * 2 * 0.1
    assert sizing.cost_per_million == pytest.approx(per_hour / (10_000 * 3600 / 1e6))


def test_choice_fewest_replicas_then_accuracy_and_the_floor_holds() -> None:
    variants = [
        linear("big", 1.0, 0.5, accuracy=0.98),
        linear("small", 0.05, 0.001, accuracy=0.9702),
        linear("tiny", 0.01, 0.0005, accuracy=0.90),
        linear("twin", 0.05, 0.001, accuracy=0.9705, agreement=0.9),
    ]
    ask = Ask(20_000, 50, 64, 2_000, 2)
    sized = choose(variants, ask, min_accuracy=0.95)
    assert [s.variant for s in sized][:2] == ["small", "twin"]  # same replicas; accuracy a tie, agreement decides
    assert "tiny" not in {s.variant for s in sized}
    assert sized[-1].variant == "big" and sized[-1].replicas > sized[0].replicas
    assert choose(variants, ask, min_accuracy=0.99) == []


def test_a_replica_short_of_cores_pays_the_models_time_out_of_the_paths() -> None:
    mid = linear("mid", 0.2, 0.05)  # a request's share of its batch: about 0.25 ms beside the path's 0.5 ms
    one = size(mid, Ask(1_000, 50, 64, 2_000, 1))
    assert one.bound_by == "cores" and one.capacity_rps == pytest.approx(1e3 / (0.5 + 0.25), rel=0.02)
    two = size(mid, Ask(1_000, 50, 64, 2_000, 2))
    assert two.bound_by == "request path" and two.capacity_rps == 2_000
    # Profiled on two intra-op threads: each batch took two cores' time.
    threaded = size(Candidate("mid", 0.95, 1.0, mid.batch_sizes, mid.p50_ms, threads=2), Ask(1_000, 50, 64, 2_000, 1))
    assert threaded.capacity_rps == pytest.approx(1e3 / (0.5 + 2 * 0.25), rel=0.02)


def test_the_report_leaves_the_price_out_without_a_core_price() -> None:
    from tidal.plan_cli import _report

    price_column = {}
    for price in (0.0, 0.1):
        ask = Ask(10_000, 50, 64, 1_000, 2, cost_per_core_hour=price)
        price_column[price] = _report("m", ask, 0.0, "given", [size(linear("fast", 0.05, 0.001), ask)]).splitlines()[2]
    assert price_column[0.0].split()[-1] == "-" and float(price_column[0.1].split()[-1]) > 0


def test_replicas_are_sized_from_cpu_profiles_never_gpu_ones() -> None:
    from tidal.plan_cli import _profile
    from tidal.repository.variants import Hardware, LatencyProfile, Variant

    hw = Hardware("cpu", 2, ("avx2",))

    def timing(p50: float) -> LatencyProfile:
        return LatencyProfile((1, 8), (p50, p50 * 4), (p50, p50 * 4), (1.0, 1.0), 1, 2, False, "2026-01-01", hw)

    both = Variant("fp32", "model.onnx", "fp32", ("tensorrt", "onnxruntime"), ("cpu", "gpu"), 1, 1, None, None,
                   {"tensorrt@gpu": timing(0.01), "onnxruntime@gpu": timing(0.02), "onnxruntime": timing(0.5)})
    assert _profile(both).p50_ms == (0.5, 2.0)
    gpu_only = Variant("fp16", "model.fp16.onnx", "fp16", ("tensorrt",), ("gpu",), 1, 1, None, None,
                       {"tensorrt@gpu": timing(0.01)})
    assert _profile(gpu_only).batch_sizes == ()  # no CPU profile: not a candidate for CPU replicas
