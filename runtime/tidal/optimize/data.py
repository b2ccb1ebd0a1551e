"""Calibration and validation data: .npz files with one array per model input.

Format: an ``.npz`` (numpy.savez) holding, for each model input, an array
named like the input with shape ``[rows, *input dims]``; a model with a single
input also accepts that array under any name. Validation files may add
``labels``: integer class ids, shape ``[rows]``, compared with the arg-max of
the model's first output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tidal.errors import ConfigError, NotFound
from tidal.optimize.graph import IoSpec

LABELS = "labels"


@dataclass(frozen=True, slots=True)
class Dataset:
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    @property
    def rows(self) -> int:
        return len(next(iter(self.feeds.values())))

    def take(self, rows: int) -> Dataset:
        """The first `rows` rows (calibration rarely needs them all)."""
        labels = None if self.labels is None else self.labels[:rows]
        return Dataset({k: v[:rows] for k, v in self.feeds.items()}, labels, self.source)


def load_dataset(path: Path, inputs: list[IoSpec], role: str) -> Dataset:
    """Read and check `path` against the model's inputs; `role` names it in errors."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{role} file {path} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy holds one bare array, not named inputs
            raise ConfigError(
                f"{path}: {role} data must be an .npz (numpy.savez) with one array per model input, "
                f"not a single .npy array; e.g. np.savez('{role}.npz', {inputs[0].name}=array)"
            )
        with loaded as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ConfigError:
        raise
    except Exception as exc:  # numpy raises ValueError, OSError, BadZipFile...
        raise ConfigError(f"{path}: cannot read {role} data as .npz: {exc}") from exc
    labels = arrays.pop(LABELS, None)
    if len(inputs) == 1 and inputs[0].name not in arrays and len(arrays) == 1:
        arrays = {inputs[0].name: next(iter(arrays.values()))}
    feeds = {spec.name: _checked(path, role, spec, arrays) for spec in inputs}
    rows = {len(v) for v in feeds.values()}
    if len(rows) != 1 or 0 in rows:
        raise ConfigError(f"{path}: {role} arrays must share a non-zero row count, got {sorted(rows)}")
    if labels is not None:
        labels = _checked_labels(path, labels, rows.pop())
    return Dataset(feeds, labels, path.name)


def _checked(path: Path, role: str, spec: IoSpec, arrays: dict[str, np.ndarray]) -> np.ndarray:
    if spec.name not in arrays:
        raise ConfigError(f"{path}: {role} data has no array for model input '{spec.name}' (has {sorted(arrays)})")
    array = arrays[spec.name]
    if array.ndim != len(spec.shape) or array.shape[1:] != spec.row_shape:
        want = "[rows, " + ", ".join(map(str, spec.row_shape)) + "]"
        raise ConfigError(
            f"{path}: {role} array '{spec.name}' has shape {list(array.shape)}; model input '{spec.name}' needs {want}"
        )
    if not np.can_cast(array.dtype, spec.np_dtype, casting="same_kind"):
        raise ConfigError(f"{path}: {role} array '{spec.name}' is {array.dtype}; the model takes {spec.np_dtype}")
    array = np.ascontiguousarray(array, dtype=spec.np_dtype)
    # Checked after the cast, which can overflow to inf: one inf or nan turns INT8 scales, the distilled
    # student's training and every accuracy figure into NaN without an error of their own.
    bad = int(np.count_nonzero(~np.isfinite(array))) if array.dtype.kind == "f" else 0
    if bad:
        raise ConfigError(f"{path}: {role} array '{spec.name}' has {bad} non-finite values (inf or nan)")
    return array


def _checked_labels(path: Path, labels: np.ndarray, rows: int) -> np.ndarray:
    if labels.ndim != 1 or len(labels) != rows or labels.dtype.kind not in "iu":
        raise ConfigError(
            f"{path}: '{LABELS}' must be {rows} integer class ids, got {labels.dtype} shape {list(labels.shape)}"
        )
    return labels.astype(np.int64)
