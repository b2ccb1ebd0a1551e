"""The controller's choice among variants *and* placements, on the fake clock with fake profiles.

A GPU pool runs big batches cheaply per row but pays a large fixed cost per batch; a CPU pool answers one row
fast but cannot carry the bulk. With a tight priority-1 target and a loose one for the rest, sharing every
instance caps the GPU's batch at what priority 1 can wait for; reserving the CPU pool for priority 1 lets the
GPU batch at the bulk's target.
"""

from __future__ import annotations

from tidal.control.api import Mode, ModelInfo, Pool, Reason, Setpoint, Slo, VariantInfo
from tidal.control.plan import Line, Load
from tidal.control.route import best_split
from tidal.control.slo import SloController
from tidal.types import LevelRoute, Observation

SIZES = (1, 8, 64, 512)
PERIOD = 0.1
GPU = {"fp32": (2.0, 0.01), "int8": (1.5, 0.005)}  # ms per batch, ms per row
CPU = {"fp32": (0.2, 0.2), "int8": (0.1, 0.05)}
ACCURACY = {"fp32": 0.98, "int8": 0.97}
POOLS = (Pool("gpu", (0,)), Pool("cpu", (1,)))


def _profile(line: tuple[float, float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    a, c = line
    return SIZES, tuple(a + c * b for b in SIZES)


def _variant(name: str) -> VariantInfo:
    sizes, p50 = _profile(GPU[name])  # the instances' main device is the GPU
    devices = {"gpu": _profile(GPU[name]), "cpu": _profile(CPU[name])}
    return VariantInfo(name, ACCURACY[name], 1.0, sizes, p50, devices)


class Sim:
    """One model under the controller, fed synthetic arrivals per level; decisions are applied."""

    def __init__(self, targets: dict[int, float], pools: tuple[Pool, ...] = POOLS) -> None:
        self.controller = SloController()
        self.active = Setpoint("fp32", 512, 20_000)
        info = ModelInfo("m:1", 512, 2, 2, (_variant("fp32"), _variant("int8")), self.active, pools)
        self.controller.track("m:1", info, Slo(max(targets.values()), priority_p99_ms=targets, mode=Mode.FULL))
        self.now = 0.0
        self.arrived = {1: 0, 2: 0}

    def run(self, rps: dict[int, float], seconds: float, queued: int = 0) -> list:
        changed = []
        for _ in range(round(seconds / PERIOD)):
            self.now += PERIOD
            for level, rate in rps.items():
                self.arrived[level] += round(rate * PERIOD)
            obs = Observation(self.now, {1: 0, 2: queued}, 0, dict(self.arrived), 0, 0, (), ())
            decision = self.controller.step("m:1", obs, self.active)
            if decision.changed:
                self.active = decision.setpoint
                changed.append(decision)
        return changed


def test_a_tight_priority_1_gets_the_cpu_pool_and_the_bulk_keeps_big_gpu_batches() -> None:
    sim = Sim({1: 4.0, 2: 50.0})
    sim.run({1: 200, 2: 20_000}, 1.0)
    route = sim.active.route
    assert route == LevelRoute(1, (1,), "fp32", route.max_batch_size, route.max_queue_delay_us)
    assert sim.active.variant == "fp32" and sim.active.max_batch_size >= 256  # the GPU batches at 50 ms
    assert 1 <= sim.active.route.max_batch_size <= 8  # priority 1 in small CPU batches, within 4 ms
    last = sim.controller.last("m:1")
    assert last.reason is Reason.ROUTE and "priority 1 on instances 1 with fp32" in last.detail


def test_a_split_drains_the_queue_at_the_bulk_s_pace() -> None:
    """The unrouted first period saw no queue; the split then sees 2,000 rows queued, all on the bulk side (the
    GPU at batch 256..512: 56..72 rows a ms), so the window restarts once they have drained, not at once."""
    sim = Sim({1: 4.0, 2: 50.0})
    assert [d.reason for d in sim.run({1: 200, 2: 20_000}, PERIOD)] != [Reason.ROUTE]
    assert [d.reason for d in sim.run({1: 200, 2: 20_000}, 1.0, queued=2_000)] == [Reason.ROUTE]
    assert 2_000 / 72 / 1e3 < sim.controller._model("m:1").drain_s < 2_000 / 56 / 1e3


def test_without_the_split_the_same_load_is_out_of_reach() -> None:
    sim = Sim({1: 4.0, 2: 50.0}, pools=(Pool("gpu", (0, 1)),))
    sim.run({1: 200, 2: 20_000}, 1.0)
    assert sim.active.route is None
    assert sim.controller.last("m:1").reason is Reason.UNATTAINABLE  # a GPU batch alone takes 2 ms x tail


def test_priority_1_gets_the_faster_cpu_variant_when_the_accurate_one_cannot_keep_up_there() -> None:
    sim = Sim({1: 4.0, 2: 50.0})
    sim.run({1: 4_000, 2: 20_000}, 1.0)
    assert sim.active.route is not None and sim.active.route.variant == "int8"
    assert sim.active.variant == "fp32"  # the bulk stays on the most accurate variant


def test_one_shared_queue_when_priority_1_can_wait_for_a_gpu_batch() -> None:
    sim = Sim({1: 40.0, 2: 50.0})
    sim.run({1: 200, 2: 20_000}, 1.0)
    assert sim.active.route is None and sim.active.variant == "fp32"


def test_the_route_ends_when_priority_1_stops() -> None:
    sim = Sim({1: 4.0, 2: 50.0})
    sim.run({1: 200, 2: 20_000}, 1.0)
    assert sim.active.route is not None
    changed = sim.run({2: 20_000}, 3.0)
    assert sim.active.route is None and changed[-1].reason is not Reason.ROUTE


def test_a_steady_split_is_not_reapplied_every_period() -> None:
    sim = Sim({1: 4.0, 2: 50.0})
    sim.run({1: 200, 2: 20_000}, 1.0)
    assert sim.run({1: 200, 2: 20_000}, 2.0) == []


def _load(rate: float = 0.0) -> Load:
    return Load(rate, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0)


def test_best_split_never_plans_one_side_across_two_kinds_of_device() -> None:
    lines = {"gpu": Line(2.0, 0.01), "cpu": Line(0.2, 0.2)}

    def line(variant: str, device: str) -> Line | None:
        return lines.get(device)

    rates, targets = {1: 0.2, 2: 20.0}, {1: 3.4, 2: 42.5}
    split = best_split(POOLS, ["fp32"], line, _load(), rates, targets, 512, 0.7, 20.0, 0.25)
    assert split is not None and split.route.instances == (1,)  # reserving the GPU leaves the CPU too slow
    assert split.bulk.capacity > 20.0 and split.reserved.predicted_p99_ms <= 3.4
    assert split.bulk_delay_ms == 42.5 * 0.25  # each side's window follows its own target
    assert split.route.max_queue_delay_us == round(3.4 * 0.25 * 1e3)
    capped = best_split(POOLS, ["fp32"], line, _load(), rates, targets, 512, 0.7, 0.5, 0.25)
    assert capped is not None and capped.route.max_queue_delay_us == 500  # never above the configured window
    # Reserving either CPU pool leaves a GPU and a CPU for the bulk: no single line plans that, so nothing.
    three = (Pool("cpu", (0, 1)), Pool("gpu", (2,)), Pool("cpu", (3,)))
    assert best_split(three, ["fp32"], line, _load(), rates, targets, 512, 0.7, 20.0, 0.25) is None
    assert best_split(POOLS, ["fp32"], line, _load(), {2: 20.0}, targets, 512, 0.7, 20.0, 0.25) is None
