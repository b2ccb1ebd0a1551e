"""Property test: the pure policy (queue + batcher + run_batch) driven by a discrete-event simulation.

Random arrivals, sizes, shapes, priorities, timeouts, deadlines, cancellations and knobs; the
simulated instances take whole batches for a row-dependent time. Checked: every request gets
exactly one answer, batched outputs equal the unbatched reference, no request runs twice or after
its deadline, no batch is over the limit or mixes shapes, and every batch is a prefix of the
service order (strict priority, FIFO within a level).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidal.clock import FakeClock
from tidal.errors import TidalError
from tidal.scheduling.batcher import BatchLimits, Dispatch, form_batch
from tidal.scheduling.execute import run_batch
from tidal.scheduling.knobs import Knobs
from tidal.scheduling.queue import Entry, QueuePolicy, RequestQueue, SchedulerConfig, TimeoutAction
from tidal.types import InferRequest

OUTPUTS = ("y", "s")


@dataclass
class Spec:
    at_us: int
    rows: int
    width: int
    priority: int
    timeout_us: int | None
    deadline_us: int | None
    cancel_us: int | None
    outputs: tuple[str, ...]


@dataclass
class Sim:
    queue: RequestQueue
    limits: BatchLimits
    instances: int
    backend: Any  # the row_backend fixture's class
    free_at: list[float] = field(default_factory=lambda: [0.0] * 3)
    answers: dict[int, list[str]] = field(default_factory=dict)
    entries: dict[int, Entry] = field(default_factory=dict)
    running: set[int] = field(default_factory=set)
    ran: list[int] = field(default_factory=list)  # every dispatched request, in dispatch order
    done: list[tuple[float, int, list[Entry]]] = field(default_factory=list)  # heap of (end, head id, entries)


policies = st.builds(
    QueuePolicy,
    timeout_action=st.sampled_from(TimeoutAction),
    default_timeout_us=st.sampled_from([0, 300, 1500]),
    allow_timeout_override=st.booleans(),
    max_queue_size=st.sampled_from([0, 0, 2, 6]),
)


@st.composite
def scenarios(draw):
    max_batch = draw(st.integers(1, 8))
    levels = draw(st.integers(1, 3))
    config = SchedulerConfig(
        batching=True,
        max_batch_size=max_batch,
        priority_levels=levels,
        default_priority_level=draw(st.integers(1, levels)),
        default_policy=draw(policies),
        level_policies=draw(st.dictionaries(st.integers(1, levels), policies, max_size=levels)),
    )
    knobs = Knobs(
        max_batch_size=draw(st.integers(0, max_batch)),
        max_queue_delay_us=draw(st.sampled_from([0, 100, 700])),
        preferred_batch_sizes=tuple(draw(st.sets(st.integers(1, max_batch), max_size=3))),
        instance_count=draw(st.integers(1, 3)),
    )
    spec = st.builds(
        Spec,
        at_us=st.integers(0, 4000),
        rows=st.integers(1, max_batch),
        width=st.sampled_from([2, 2, 3]),
        priority=st.integers(0, levels),
        timeout_us=st.none() | st.integers(1, 2000),
        deadline_us=st.none() | st.integers(0, 3000),
        cancel_us=st.none() | st.integers(0, 2000),
        outputs=st.sampled_from([(), ("y",), ("s", "y")]),
    )
    return config, knobs, draw(st.lists(spec, min_size=1, max_size=40))


def make_request(i: int, spec: Spec) -> InferRequest:
    x = np.random.default_rng(i).standard_normal((spec.rows, spec.width)).astype(np.float32)
    at = spec.at_us * 1e-6
    deadline = None if spec.deadline_us is None else at + spec.deadline_us * 1e-6
    return InferRequest("m", "1", {"x": x}, spec.outputs, str(i), spec.priority, spec.timeout_us, at, deadline)


def dispatch(sim: Sim, now: float) -> float | None:
    """One scheduling step, as the engine runs it: expire, then fill free instances; returns a window end."""
    for entry in sim.queue.expire(now):
        sim.answers[int(entry.request.id)].append("DEADLINE_EXCEEDED")
    for index in range(sim.instances):
        if sim.free_at[index] > now or not len(sim.queue):
            continue
        decision = form_batch(sim.queue, sim.limits, now)
        if not isinstance(decision, Dispatch):
            assert decision is not None and decision.until_s > now
            return decision.until_s
        check_batch(sim, decision, now)
        sim.queue.take(decision.entries)
        end = now + (50 + 20 * decision.rows) * 1e-6
        sim.free_at[index] = end
        heapq.heappush(sim.done, (end, int(decision.entries[0].request.id), decision.entries))
        sim.running.update(int(entry.request.id) for entry in decision.entries)
        sim.ran.extend(int(entry.request.id) for entry in decision.entries)
    return None


def check_batch(sim: Sim, batch: Dispatch, now: float) -> None:
    entries = batch.entries
    assert batch.rows <= sim.limits.max_rows or len(entries) == 1
    assert len({entry.key for entry in entries}) == 1
    for entry in entries:
        assert int(entry.request.id) not in sim.ran, "dispatched twice"
        assert entry.deadline_s > now, "ran after its deadline"
        assert entry.timeout_s > now or entry.delayed, "ran after a REJECT timeout"
    # Service order is strict by level, in-time before delayed, FIFO among in-time; a batch is its prefix.
    order = list(sim.queue.in_order())
    assert order[: len(entries)] == entries
    ranks = [(e.level, e.delayed, 0 if e.delayed else e.seq) for e in order]
    assert ranks == sorted(ranks)


def finish(sim: Sim, entries: list[Entry]) -> None:
    outcome = run_batch(sim.backend, entries, OUTPUTS, True, FakeClock())
    assert outcome.error is None
    for entry, outputs in zip(entries, outcome.outputs, strict=True):
        rid = int(entry.request.id)
        sim.running.discard(rid)
        if sim.answers[rid] == ["CANCELLED"]:
            continue  # the client left while its batch ran: the result is dropped
        want = sim.backend.reference(entry.request.inputs["x"])
        assert list(outputs) == list(entry.request.requested_outputs or OUTPUTS)
        for name, array in outputs.items():
            assert np.array_equal(array, want[name]), name
        sim.answers[rid].append("OK")


def arrive_or_cancel(sim: Sim, kind: str, i: int, spec: Spec, now: float) -> None:
    if kind == "arrive":
        try:
            sim.entries[i] = sim.queue.admit(make_request(i, spec), now)
        except TidalError as exc:
            sim.answers[i].append(exc.code.value)
    elif i in sim.entries and not sim.answers[i] and (sim.queue.cancel(sim.entries[i]) or i in sim.running):
        sim.answers[i].append("CANCELLED")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios())
def test_every_request_answered_exactly_once_and_batching_is_invisible(scenario, row_backend):
    config, knobs, specs = scenario
    sim = Sim(RequestQueue(config), BatchLimits.of(config, knobs), knobs.instance_count, row_backend())
    events: list[tuple[float, int, str, int]] = []  # (time, arrivals before cancels, kind, request)
    for i, spec in enumerate(specs):
        sim.answers[i] = []
        events.append((spec.at_us * 1e-6, 0, "arrive", i))
        if spec.cancel_us is not None:
            events.append(((spec.at_us + spec.cancel_us) * 1e-6, 1, "cancel", i))
    heapq.heapify(events)
    now = 0.0
    while True:
        while sim.done and sim.done[0][0] <= now:
            finish(sim, heapq.heappop(sim.done)[2])
        while events and events[0][0] <= now:
            _, _, kind, i = heapq.heappop(events)
            arrive_or_cancel(sim, kind, i, specs[i], now)
        window_end = dispatch(sim, now)
        # The next moment anything can change: an arrival or cancel, a batch end, a timeout, a window end.
        candidates = [t for t in (window_end, sim.queue.next_event_s()) if t is not None]
        candidates += [events[0][0]] if events else []
        candidates += [sim.done[0][0]] if sim.done else []
        if not candidates:
            break
        assert min(candidates) > now, "the simulation stopped making progress"
        now = min(candidates)
    assert not sim.running and not len(sim.queue)
    for i, answers in sim.answers.items():
        assert len(answers) == 1, (i, answers)
    ran = set(sim.ran)
    assert len(ran) == len(sim.ran)
    assert all(
        answers == ["OK"] if i in ran and answers != ["CANCELLED"] else answers != ["OK"]
        for i, answers in sim.answers.items()
    )
    assert sum(sim.backend.batches) == sum(specs[i].rows for i in ran)
