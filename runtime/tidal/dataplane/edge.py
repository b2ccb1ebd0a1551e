"""The edge: what reaches the server's front door, how long the event loop makes it wait, and who gets in.

Under many small requests the event loop saturates before any model does, and a request that waits
there is invisible to the scheduler's queues. The edge makes it visible and acts on it:

- a probe on the event loop measures its lag (how long a ready callback waits for its turn, which is what
  an arriving RPC waits before its handler runs) and the share of time the loop's thread is busy: running,
  or ready to run and waiting for a CPU (Linux schedstat), so a loop kept off its core by other work reads
  busy, not idle;
- every inference RPC is counted when its handler starts, before decoding, per model and priority level;
- one `AdmissionGate` per model decides, before decoding, whether the request may enter; the probe
  drives the gates' adaptation with the measured lag;
- `saturation()` folds edge and backend into one number for autoscalers (see README, "Overload").

Everything runs on the event loop; no locks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Callable

from tidal.control.admission import AdmissionGate, saturation
from tidal.types import EdgeObservation

PROBE_S = 0.01  # how often the loop is probed
WINDOW_S = 1.0  # rates, busy share and lag are reported over this window
RATE_STEP_S = 0.1  # resolution of the request rates
LAG_FULL_MS = 10.0  # a loop that keeps ready callbacks waiting this long counts as fully busy
SCHEDSTAT = "/proc/thread-self/schedstat"


class EdgeMeter:
    """Counts and gates inference RPCs at the transport; probes the event loop it runs on."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._gates: dict[str, AdmissionGate] = {}
        self._received: collections.Counter[str] = collections.Counter()
        # (at_s, thread_demand_s, lag_ms) per probe, over WINDOW_S
        self._probes: collections.deque[tuple[float, float, float]] = collections.deque()
        # (at_s, {model: (received, admitted)}) every RATE_STEP_S, over WINDOW_S
        self._counts: collections.deque[tuple[float, dict[str, tuple[int, int]]]] = collections.deque()
        self._task: asyncio.Task | None = None

    # -- per request -------------------------------------------------------------------------
    def gate(self, model: str, levels: int) -> AdmissionGate:
        gate = self._gates.get(model)
        if gate is None:
            gate = self._gates[model] = AdmissionGate(levels)
        else:
            gate.widen(levels)  # a reload may have added priority levels
        return gate

    def received(self, model: str) -> None:
        self._received[model] += 1

    # -- the probe ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._probe(), name="tidal-edge-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _probe(self) -> None:
        with _ThreadDemand() as demand:
            while True:
                await asyncio.sleep(PROBE_S)
                # The time a task made ready now waits for its turn: the loop's queueing delay. (A bare yield,
                # not a future set by a callback, which a cancellation in between would leave to fail.)
                queued = self._clock()
                await asyncio.sleep(0)
                now = self._clock()
                self.record(now, demand.seconds(), (now - queued) * 1e3)

    def record(self, now: float, thread_demand_s: float, lag_ms: float) -> None:
        """One probe's reading (`thread_demand_s`: the loop thread's time running or waiting to run so far);
        drives the gates' adaptation."""
        probes = self._probes
        probes.append((now, thread_demand_s, lag_ms))
        while len(probes) > 2 and probes[1][0] <= now - WINDOW_S:
            probes.popleft()
        delay = self.lag_ms()
        for gate in self._gates.values():
            gate.adapt(now, delay)
        counts = self._counts
        if not counts or now - counts[-1][0] >= RATE_STEP_S:
            admitted = {name: gate.state().admitted for name, gate in self._gates.items()}
            counts.append((now, {m: (n, admitted.get(m, n)) for m, n in self._received.items()}))
            while len(counts) > 2 and counts[1][0] <= now - WINDOW_S:
                counts.popleft()

    # -- what it shows -----------------------------------------------------------------------
    def lag_ms(self) -> float:
        """The worst loop lag over the recent window (ms); 0 before any probe."""
        return max((lag for _, _, lag in self._probes), default=0.0)

    def busy(self) -> float:
        """Share of wall time the loop's thread ran or waited for a CPU over the window, raised by lag."""
        probes = self._probes
        if len(probes) < 2:
            return 0.0
        (t0, cpu0, _), (t1, cpu1, _) = probes[0], probes[-1]
        share = (cpu1 - cpu0) / (t1 - t0) if t1 > t0 else 0.0
        return max(min(share, 1.0), min(self.lag_ms() / LAG_FULL_MS, 1.0))

    def observe(self, model: str) -> EdgeObservation:
        gate = self._gates.get(model)
        state = gate.state() if gate is not None else None
        return EdgeObservation(
            received=self._received[model],
            refused=dict(state.refused) if state else {},
            inflight=state.inflight if state else 0,
            limit=state.limit if state and gate is not None and gate.active else 0,
            lag_ms=self.lag_ms(),
            busy=self.busy(),
        )

    def rates(self, model: str) -> tuple[float, float]:
        """(received, admitted) requests per second over the recent window."""
        counts = self._counts
        if len(counts) < 2 or counts[-1][0] <= counts[0][0]:
            return 0.0, 0.0
        (t0, first), (t1, last) = counts[0], counts[-1]
        r0, a0 = first.get(model, (0, 0))
        r1, a1 = last.get(model, (0, 0))
        return (r1 - r0) / (t1 - t0), (a1 - a0) / (t1 - t0)

    def saturation(self, model: str, utilisation: float) -> float:
        """The model's saturation gauge, given its backend utilisation (see control.admission.saturation)."""
        return saturation(self.busy(), *self.rates(model), utilisation)


class _ThreadDemand:
    """The calling thread's time running plus waiting in the run queue, from Linux's schedstat.

    CPU time alone reads a starved loop as idle: measured under overload with the load generator on the same
    two cores, the loop's CPU share swung between 0.5 and 0.9 while every call waited (perf/RESULTS.md, issue
    14). Where schedstat is missing (not Linux, or a kernel without it) CPU time is the fallback."""

    def __enter__(self) -> _ThreadDemand:
        self._fd: int | None = None
        try:
            fd = os.open(SCHEDSTAT, os.O_RDONLY)
        except OSError:
            return self
        try:
            if _schedstat_s(fd) > 0:  # zeros: a kernel that does not keep the counters
                self._fd = fd
                return self
        except (OSError, ValueError):
            pass
        os.close(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)

    def seconds(self) -> float:
        if self._fd is not None:
            try:
                return _schedstat_s(self._fd)
            except (OSError, ValueError):  # counters gone: CPU time from here on (one window reads off)
                os.close(self._fd)
                self._fd = None
        return time.thread_time()


def _schedstat_s(fd: int) -> float:
    """Run plus run-queue wait, in seconds, from a schedstat file ("run_ns wait_ns slices")."""
    fields = os.pread(fd, 64, 0).split()
    if len(fields) < 2:
        raise ValueError(f"unexpected schedstat line {fields!r}")
    return (int(fields[0]) + int(fields[1])) / 1e9
