"""One batch on one backend instance: concatenate, run, check, split.

Runs on the instance's worker thread (numpy copies and the backend release
the GIL), or inline on the loop for cheap batches at low load (inline.py).
Never raises an `Exception`: any
failure, the backend's or a malformed result, becomes the batch's error and
every request of the batch receives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tidal.backends.base import Backend
from tidal.clock import Clock
from tidal.errors import BackendError
from tidal.scheduling.queue import Entry


@dataclass(slots=True)
class BatchOutcome:
    """Per-entry outputs in batch order, or the error; phase times in seconds on the clock."""

    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    error: BackendError | None = None
    input_s: float = 0.0
    infer_s: float = 0.0
    output_s: float = 0.0


def output_names_for(entries: Sequence[Entry], declared: Sequence[str]) -> list[str]:
    """What the backend must produce: the union of what the batch asked for, in declared order."""
    asked: set[str] = set()
    for entry in entries:
        wanted = entry.request.requested_outputs
        if not wanted:
            return list(declared)
        asked.update(wanted)
    return [name for name in declared if name in asked]


def run_batch(
    backend: Backend,
    entries: Sequence[Entry],
    declared: Sequence[str],
    batched: bool,
    clock: Clock,
    coupled: bool = False,
) -> BatchOutcome:
    """Execute `entries` as one backend call; `batched` means inputs and outputs carry the batch in dim 0.

    `coupled`: the backend's rows share statistics across the batch (a per-batch quantization range), so a
    request with a NaN or inf would corrupt every other request of its batch; such requests run alone."""
    outcome = BatchOutcome()
    groups = _isolate_non_finite(entries) if coupled and len(entries) > 1 else [entries]
    try:
        by_entry: dict[int, dict[str, np.ndarray]] = {}
        for group in groups:
            t0 = clock.now()
            inputs = _concatenate(group)
            names = output_names_for(group, declared)
            t1 = clock.now()
            results = backend.run(inputs, names)
            t2 = clock.now()
            rows = sum(entry.rows for entry in group)
            _check(results, names, rows if batched else None)
            by_entry.update(zip(map(id, group), _split(results, group, declared), strict=True))
            outcome.input_s += t1 - t0
            outcome.infer_s += t2 - t1
            outcome.output_s += clock.now() - t2
        outcome.outputs = [by_entry[id(entry)] for entry in entries]
    except BackendError as exc:
        outcome.error = exc
    except Exception as exc:
        outcome.error = BackendError(f"{type(exc).__name__}: {exc}")
    if outcome.error is not None:
        outcome.input_s = outcome.infer_s = outcome.output_s = 0.0
    return outcome


def _isolate_non_finite(entries: Sequence[Entry]) -> list[Sequence[Entry]]:
    """The entries whose float inputs are all finite as one group, every other entry as a group of its own."""
    clean, alone = [], []
    for entry in entries:
        finite = all(
            np.isfinite(array).all() for array in entry.request.inputs.values() if array.dtype.kind in "fc"
        )
        (clean if finite else alone).append(entry)
    return ([clean] if clean else []) + [[entry] for entry in alone]


def _concatenate(entries: Sequence[Entry]) -> dict[str, np.ndarray]:
    first = entries[0].request.inputs
    if len(entries) == 1:
        return first  # the common case at low load: no copy
    return {name: np.concatenate([entry.request.inputs[name] for entry in entries]) for name in first}


def _check(results: object, names: Sequence[str], rows: int | None) -> None:
    if not isinstance(results, dict):
        raise BackendError(f"backend returned {type(results).__name__}, expected a dict of arrays")
    for name in names:
        array = results.get(name)
        if not isinstance(array, np.ndarray):
            raise BackendError(f"backend returned no array for output '{name}'")
        if rows is not None and (array.ndim == 0 or array.shape[0] != rows):
            got = array.shape[0] if array.ndim else "no batch dim"
            raise BackendError(f"backend returned {got} rows for output '{name}', the batch has {rows}")


def _split(results: dict[str, np.ndarray], entries: Sequence[Entry], declared: Sequence[str]) -> list[dict]:
    if len(entries) == 1:
        return [{name: results[name] for name in entries[0].request.requested_outputs or declared}]
    split, start = [], 0
    for entry in entries:
        stop = start + entry.rows
        split.append({name: results[name][start:stop] for name in entry.request.requested_outputs or declared})
        start = stop
    return split
