"""Accuracy of a variant: top-1 against labels, and agreement with fp32.

Variants run through the same backend code that serves them, so a recorded
accuracy is the accuracy clients get.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tidal import backends
from tidal.backends.base import BackendOptions
from tidal.optimize.data import Dataset
from tidal.repository.variants import Accuracy

_BATCH = 256


def predict(path: Path, data: Dataset, backend: str = "onnxruntime") -> np.ndarray:
    """The first output of the model at `path` for every row of `data`."""
    runner = backends.factory(backend)(Path(path), BackendOptions())
    try:
        output = runner.outputs()[0].name
        parts = [
            runner.run({k: v[start : start + _BATCH] for k, v in data.feeds.items()}, [output])[output]
            for start in range(0, data.rows, _BATCH)
        ]
    finally:
        runner.close()
    return np.concatenate(parts).astype(np.float32)


def score(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> Accuracy:
    """Accuracy block of a variant's `outputs` given fp32's `reference` outputs on the same rows."""
    top1 = outputs.reshape(len(outputs), -1).argmax(axis=1)
    agreement = float(np.mean(top1 == reference.reshape(len(reference), -1).argmax(axis=1)))
    max_abs_err = float(np.max(np.abs(outputs - reference))) if outputs.size else 0.0
    if labels is None:
        return Accuracy("top1_agreement", agreement, len(outputs), agreement, max_abs_err)
    return Accuracy("top1_accuracy", float(np.mean(top1 == labels)), len(outputs), agreement, max_abs_err)
