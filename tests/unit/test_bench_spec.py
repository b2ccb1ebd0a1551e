"""tidal bench: parsing load shapes, and the arrival schedules and shares built from them."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest

from tidal.bench.load import ClosedLoad, OpenLoad, TraceLoad, TraceRequest, arrival_offsets, split_load
from tidal.bench.session import trace_plan
from tidal.bench.spec import Stage, TrafficClass, parse_class, parse_profile, parse_sweep, read_trace
from tidal.errors import InvalidArgument


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8", [8]),
        ("1,8,32", [1, 8, 32]),
        ("1:128:x2", [1, 2, 4, 8, 16, 32, 64, 128]),
        ("1:100:x2", [1, 2, 4, 8, 16, 32, 64]),
        ("100:400:+100", [100, 200, 300, 400]),
        ("100:400:150", [100, 250, 400]),
        ("3:5", [3, 4, 5]),
        ("0.5:1.5:0.5", [0.5, 1.0, 1.5]),
    ],
)
def test_sweeps(text: str, expected: list[float]) -> None:
    assert parse_sweep(text, "--rate") == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    ["", "a", "0", "-1", "1:8:x1", "1:8:x0.5", "1:8:0", "1:2:3:4", "1::x2", "nan", "inf", "1:inf:x2", "1:5000:+1"],
)
def test_bad_sweeps_name_the_flag(text: str) -> None:
    with pytest.raises(InvalidArgument, match="--concurrency"):
        parse_sweep(text, "--concurrency")


def test_profile_steps_and_ramps() -> None:
    stages = parse_profile("60s@200rps, 30s@200-800rps,1.5s@0-10rps")
    assert stages == [Stage(60, 200, 200), Stage(30, 200, 800), Stage(1.5, 0, 10)]
    assert stages[1].rate_at(15) == pytest.approx(500)
    assert stages[1].rate_at(99) == pytest.approx(800)


@pytest.mark.parametrize("text", ["60s@200", "60@200rps", "0s@10rps", "5s@0rps", "5s@rps", "1m@5rps"])
def test_bad_profiles(text: str) -> None:
    with pytest.raises(InvalidArgument, match="profile stage"):
        parse_profile(text)


def test_classes_take_defaults_and_overrides() -> None:
    assert parse_class("mlp", batch_size=4, slo_ms=20.0) == TrafficClass("mlp", 0, 4, 1.0, 20.0)
    cls = parse_class("mlp:priority=2,batch=8,weight=0.5,slo_ms=5", batch_size=1, slo_ms=None)
    assert cls == TrafficClass("mlp", 2, 8, 0.5, 5.0)
    assert cls.key == "mlp/p2/b8"


def test_class_priority_spans_the_wire_uint64() -> None:
    assert parse_class(f"m:priority={2**64 - 1}", 1, None).priority == 2**64 - 1


@pytest.mark.parametrize(
    "text",
    [":priority=1", "m:prio=1", "m:batch=0", "m:weight=0", "m:priority=x", "m:batch", "m:weight=nan", "m:weight=inf",
     "m:slo_ms=nan", "m:slo_ms=inf", "m:slo_ms=-5", "m:slo_ms=0", "m:priority=-1", f"m:priority={2**64}"],
)
def test_bad_classes(text: str) -> None:
    with pytest.raises(InvalidArgument, match="model spec"):
        parse_class(text, 1, None)


def test_trace_reads_header_comments_and_optional_deadline(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("send_s,model,priority,batch_size,deadline_ms\n# warm\n0.5,b,2,4,\n0.0,a,1,1,25\n\n1.0,a,1,1\n")
    rows = read_trace(path)
    assert [(r.send_s, r.model, r.priority, r.batch_size, r.deadline_ms) for r in rows] == [
        (0.0, "a", 1, 1, 25.0), (0.5, "b", 2, 4, None), (1.0, "a", 1, 1, None)
    ]
    classes, load = trace_plan(rows, slo_ms=10.0)
    assert [c.key for c in classes] == ["a/p1/b1", "b/p2/b4"]
    assert all(c.slo_ms == 10.0 for c in classes)
    assert load.requests == (TraceRequest(0.0, 0, 25_000), TraceRequest(0.5, 1, 0), TraceRequest(1.0, 0, 0))


@pytest.mark.parametrize(
    "body",
    ["0.0,a,1,1\nlater,a,1,1\n", "0.0,a,1,0\n", "-1,a,1,1\n", "", "header,only,x,y\n",
     "0.0,a,1.5,1\n0.1,a,0,1\n"],  # the last: a bad first request is not a header
)
def test_bad_traces_name_the_line(tmp_path: Path, body: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(body)
    with pytest.raises(InvalidArgument, match=r"t\.csv"):
        read_trace(path)


@pytest.mark.parametrize(
    "body",
    [
        b"0.0,a,0,1\n0.1,a,0,1,nan\n",
        b"0.0,a,0,1\n0.1,a,0,1,inf\n",
        b"0.0,a,0,1\n0.1,a,0,1,-5\n",
        b"0.0,a,0,1\n0.1,a,0,1,1e300\n",
        b"0.0,a,0,1\nnan,a,0,1\n",
        b"0.0,a,0,1\ninf,a,0,1\n",
        b"0.0,a,0,1\n0.1,a,18446744073709551616,1\n",
        b"0.0,a,0,1\n0.1,a\n",
        b"0.0,a,0,1\n0.1," + b"a" * 200_000 + b",0,1\n",  # over csv's field size limit
    ],
)
def test_bad_trace_rows_name_their_line(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(body)
    with pytest.raises(InvalidArgument, match=r"t\.csv:2: expected send_s"):
        read_trace(path)


def test_trace_priority_spans_the_wire_uint64(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(f"0.0,a,{2**64 - 1},1,0.001\n")
    assert read_trace(path)[0].priority == 2**64 - 1


def test_trace_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(b"0.0,a,0,1\n\xff\xfe\x00\x01,a,0,1\n")
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        read_trace(path)


def test_missing_trace() -> None:
    with pytest.raises(InvalidArgument, match="cannot read trace"):
        read_trace(Path("/nonexistent/trace.csv"))


def _count(offsets, end: float) -> int:
    return sum(1 for t in offsets if t < end)


def test_constant_arrivals_are_evenly_spaced() -> None:
    load = OpenLoad((Stage(2.0, 100, 100),), poisson=False)
    offsets = list(arrival_offsets(load, random.Random(0)))
    assert len(offsets) == 200
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(offsets)}
    assert gaps == {0.01}


def test_ramp_arrivals_follow_the_integral_of_the_rate() -> None:
    # 0 -> 1000 rps over 2 s: 1000 requests, the k-th at t = sqrt(k / 250).
    load = OpenLoad((Stage(2.0, 0, 1000),), poisson=False)
    offsets = list(arrival_offsets(load, random.Random(0)))
    assert len(offsets) == 1000
    assert offsets[99] == pytest.approx(math.sqrt(99 / 250))
    assert _count(offsets, 1.0) == 250  # a quarter of the requests in the first half


def test_steps_chain_stages_end_to_end() -> None:
    load = OpenLoad((Stage(1.0, 100, 100), Stage(1.0, 300, 300), Stage(0.5, 100, 100)), poisson=False)
    offsets = list(arrival_offsets(load, random.Random(0)))
    assert len(offsets) == 450
    assert _count(offsets, 1.0) == 100 and _count(offsets, 2.0) == 400
    assert offsets == sorted(offsets) and offsets[-1] < 2.5


def test_poisson_arrivals_have_the_rate_and_exponential_gaps() -> None:
    load = OpenLoad((Stage(100.0, 200, 200),), poisson=True)
    offsets = list(arrival_offsets(load, random.Random(7)))
    assert len(offsets) == pytest.approx(20_000, rel=0.03)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert mean == pytest.approx(1 / 200, rel=0.03)
    assert cv == pytest.approx(1.0, abs=0.05)  # exponential: standard deviation equals the mean


def test_an_endless_stage_keeps_going() -> None:
    offsets = arrival_offsets(OpenLoad((Stage(math.inf, 1000, 1000),), poisson=False), random.Random(0))
    assert [next(offsets) for _ in range(3000)][-1] == pytest.approx(2.999)


def test_shares_add_up_to_the_whole() -> None:
    assert split_load(ClosedLoad(10), 3) == [ClosedLoad(4), ClosedLoad(3), ClosedLoad(3)]
    shares = split_load(OpenLoad((Stage(2.0, 300, 600),), poisson=False), 3)
    assert [s.stages[0].rate_start for s in shares] == pytest.approx([100] * 3)
    merged = sorted(t for s in shares for t in arrival_offsets(s, random.Random(0)))
    alone = list(arrival_offsets(OpenLoad((Stage(2.0, 300, 600),), poisson=False), random.Random(0)))
    assert len(merged) == len(alone)
    trace = TraceLoad(tuple(TraceRequest(i / 10, 0) for i in range(7)))
    parts = split_load(trace, 2)
    assert sorted(r.send_s for p in parts for r in p.requests) == [r.send_s for r in trace.requests]
