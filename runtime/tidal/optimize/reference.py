"""Reference workloads: trained MLP classifiers on data that needs no download.

The benchmarks, the tests and the demo measure variants on these, so their
accuracies mean something: a classifier trained on overlapping Gaussian
classes (the reference MLP, 256 -> 1024 -> 1024 -> 10) or on scikit-learn's
bundled digits (the demo).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto

from tidal.optimize.graph import IoSpec, build_mlp
from tidal.optimize.train import MlpTrainer, TrainConfig

REFERENCE_DIMS = (256, 1024, 1024, 10)


def synthetic_classification(
    rows: int, features: int, classes: int, seed: int = 0, spread: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Rows drawn around one random centre per class; `spread` > ~1 makes the classes overlap."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, features)).astype(np.float32)
    labels = rng.integers(0, classes, size=rows)
    noise = rng.standard_normal((rows, features)).astype(np.float32) * np.float32(spread)
    return centres[labels] + noise, labels.astype(np.int64)


def train_classifier(
    x: np.ndarray,
    y: np.ndarray,
    hidden: Sequence[int],
    config: TrainConfig,
    input_name: str = "input",
    output_name: str = "logits",
    name: str = "mlp",
    progress: bool = False,
) -> onnx.ModelProto:
    """An ONNX MLP trained with cross-entropy on (x, y); input [N, features], output logits [N, classes]."""
    from tqdm import tqdm

    classes = int(y.max()) + 1
    trainer = MlpTrainer(x.shape[1], hidden, classes, config)
    trainer.fit_scaler(x)
    with tqdm(range(config.epochs), desc=f"training {name}", disable=not progress, leave=False) as epochs:
        for _ in epochs:
            epochs.set_postfix(loss=f"{trainer.epoch(x, y, soft=False):.4f}")
    inp = IoSpec(input_name, TensorProto.FLOAT, (None, x.shape[1]))
    out = IoSpec(output_name, TensorProto.FLOAT, (None, classes))
    return build_mlp(trainer.export(), inp, out, name=name)


def reference_mlp(
    rows: int = 4096, epochs: int = 4, seed: int = 0, dims: Sequence[int] = REFERENCE_DIMS
) -> tuple[onnx.ModelProto, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The reference MLP trained on synthetic classes; returns (model, (x, y) train, (x, y) held out)."""
    x, y = synthetic_classification(rows + rows // 4, dims[0], dims[-1], seed=seed, spread=5.0)
    train, held = slice(0, rows), slice(rows, None)
    model = train_classifier(x[train], y[train], dims[1:-1], TrainConfig(epochs=epochs, seed=seed), name="reference")
    return model, (x[train], y[train]), (x[held], y[held])
