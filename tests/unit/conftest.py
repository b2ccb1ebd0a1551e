"""Fixtures for the scheduler tests: a real Backend implementation on numpy, and an event-loop runner
that fails the test when a task or a scheduler thread outlives it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import uvloop

from tidal.errors import BackendError
from tidal.types import DataType, InferRequest, TensorSpec


class RowBackend:
    """Implements the Backend protocol with a row-wise numpy function, so a batched run equals the
    concatenation of the unbatched runs. Optional controls: `gate` holds every run until set,
    `fail_on` fails the runs whose input contains that value, `drop_row` returns one row too few."""

    OUTPUTS = ("y", "s")

    def __init__(self, gate: threading.Event | None = None, fail_on: float | None = None, drop_row: bool = False):
        self.gate = gate
        self.fail_on = fail_on
        self.drop_row = drop_row
        self.runs: list[np.ndarray] = []  # the "x" of every run, in run order
        self.started = threading.Semaphore(0)  # released when a run starts
        self._busy = threading.Lock()

    @property
    def batches(self) -> list[int]:
        """Rows of every run, in run order."""
        return [len(x) for x in self.runs]

    def firsts(self) -> list[list[float]]:
        """x[:, 0] of every run: tests fill each request with its own value to see who shared a batch."""
        return [x[:, 0].tolist() for x in self.runs]

    @staticmethod
    def reference(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"y": x * 2 + 1, "s": x.sum(axis=-1, keepdims=True)}

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("x", DataType.FP32, (-1, -1))]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("y", DataType.FP32, (-1, -1)), TensorSpec("s", DataType.FP32, (-1, 1))]

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        if not self._busy.acquire(blocking=False):
            raise AssertionError("run() called concurrently on one instance")
        try:
            x = inputs["x"]
            self.runs.append(x.copy())
            self.started.release()
            if self.gate is not None and not self.gate.wait(30):
                raise AssertionError("the test never opened the gate")
            if self.fail_on is not None and bool((x == self.fail_on).any()):
                raise BackendError(f"input contains {self.fail_on}")
            out = self.reference(x)
            cut = slice(0, -1) if self.drop_row else slice(None)
            return {name: out[name][cut] for name in output_names}
        finally:
            self._busy.release()

    def close(self) -> None:
        pass


@pytest.fixture
def row_backend() -> type[RowBackend]:
    return RowBackend


def _make_request(
    rows: int = 1,
    width: int = 3,
    value: float = 0.0,
    priority: int = 0,
    arrival_s: float = 0.0,
    timeout_us: int | None = None,
    deadline_s: float | None = None,
    outputs: tuple[str, ...] = (),
    id: str = "",
) -> InferRequest:
    """A request for RowBackend's model: input "x" of shape (rows, width) filled with `value`."""
    x = np.full((rows, width), value, dtype=np.float32)
    return InferRequest("m", "1", {"x": x}, outputs, id, priority, timeout_us, arrival_s, deadline_s)


@pytest.fixture
def make_request() -> Callable[..., InferRequest]:
    return _make_request


def _scheduler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tidal-")]


@pytest.fixture
def run_async() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Runs a coroutine on a fresh loop; fails if it leaves tasks or scheduler threads behind."""

    async def checked(coro: Coroutine[Any, Any, Any]) -> Any:
        result = await coro
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not leftover, f"tasks left running: {leftover}"
        return result

    def run(coro: Coroutine[Any, Any, Any], use_uvloop: bool = False) -> Any:
        before = set(_scheduler_threads())
        result = (uvloop.run if use_uvloop else asyncio.run)(checked(coro))
        left = [t for t in _scheduler_threads() if t not in before]
        assert not left, f"threads left running: {left}"
        return result

    return run
