"""The demo repository: a real classifier with real variants, built once and cached.

`digits` is an MLP (64 -> 1024 -> 1024 -> 10) trained here on scikit-learn's
bundled 8x8 handwritten digits (no download), exported to ONNX and turned into
variants by the same code as `tidal optimize`, with accuracies measured on
held-out digits. `add_sub` is a two-input, two-output model for trying the
protocol by hand. The build takes well under two minutes on two cores; later
calls return the cached folder at once. The cache lives in
$TIDAL_CACHE_DIR/demo (default ~/.cache/tidal/demo) under a recipe version,
so a tidal with a different recipe builds its own instead of reusing a stale one.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from tidal.errors import TidalError

DEMO_VERSION = "5"  # bump whenever what the build produces changes
DEMO_MODEL = "digits"
ADD_SUB_MODEL = "add_sub"
HIDDEN = (1024, 1024)  # wide enough that INT8 GEMMs, not per-call overhead, decide the speed
MAX_BATCH_SIZE = 128
SEED = 0
DEMO_SLO_P99_MS = 50.0  # every demo model holds this p99 with the controller on, two priority levels
_COMPLETE = "COMPLETE"


def cache_root() -> Path:
    return Path(os.environ.get("TIDAL_CACHE_DIR") or Path.home() / ".cache" / "tidal")


def ensure_demo_repository(cache_dir: Path | None = None, progress: bool = True, rebuild: bool = False) -> Path:
    """The demo model repository, built on first use; `cache_dir` replaces the cache root."""
    base = Path(cache_dir) if cache_dir is not None else cache_root() / "demo"
    home = base / f"v{DEMO_VERSION}"
    if (home / _COMPLETE).is_file() and not rebuild:
        return home / "repository"
    staging = base / f".build-{os.getpid()}"
    try:
        base.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        _build(staging, progress)
        (staging / _COMPLETE).write_text(DEMO_VERSION + "\n")
        if home.exists():
            if (home / _COMPLETE).is_file() and not rebuild:
                return home / "repository"  # another process finished first
            shutil.rmtree(home)
        # A rename is atomic, so another process never sees a half-built repository.
        os.replace(staging, home)
    except OSError as exc:  # a full disk or a read-only cache: one line, and nothing half-built is left
        raise TidalError(
            f"cannot build the demo repository in {base}: {exc.strerror or exc} (free space, or set TIDAL_CACHE_DIR)"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for stale in base.glob("v*"):
        if stale != home and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return home / "repository"


def _log(message: str) -> None:
    print(f"tidal demo: {message}", file=sys.stderr)


def _build(home: Path, progress: bool) -> None:
    import numpy as np
    from sklearn.datasets import load_digits

    from tidal.optimize.graph import save_model
    from tidal.optimize.pipeline import OptimizeOptions, optimize
    from tidal.optimize.reference import train_classifier
    from tidal.optimize.train import TrainConfig

    data = home / "data"
    data.mkdir(parents=True)
    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(x))
    train, held_out = order[: int(0.7 * len(x))], order[int(0.7 * len(x)) :]
    np.savez(data / "calibration.npz", pixels=x[train])
    np.savez(data / "validation.npz", pixels=x[held_out], labels=y[held_out])
    config = TrainConfig(epochs=30, seed=SEED)
    model = train_classifier(x[train], y[train], HIDDEN, config, "pixels", "logits", DEMO_MODEL, progress)
    source = save_model(model, data / "digits-fp32.onnx")

    repository = home / "repository"
    options = OptimizeOptions(
        model=source,
        repository=repository,
        name=DEMO_MODEL,
        calibration=data / "calibration.npz",
        validation=data / "validation.npz",
        max_batch_size=MAX_BATCH_SIZE,
        profile_seconds=0.2,  # enough for the controller's first estimates; `tidal profile` refines them
        progress=progress,
    )
    optimize(options, _log)
    _write_add_sub(repository / ADD_SUB_MODEL)
    for name in (DEMO_MODEL, ADD_SUB_MODEL):
        _hold_slo(repository / name / "config.pbtxt")


def _hold_slo(path: Path) -> None:
    """The demo shows overload control out of the box: an SLO, the controller on, and priority 1 ahead of 2."""
    from google.protobuf import text_format

    from tidal.proto import model_config_pb2 as mc

    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    config.slo.p99_ms = DEMO_SLO_P99_MS
    config.controller.mode = mc.ModelController.FULL
    config.dynamic_batching.priority_levels = 2
    config.dynamic_batching.default_priority_level = 2
    path.write_text(text_format.MessageToString(config))


def _write_add_sub(folder: Path) -> None:
    """OUTPUT0 = INPUT0 + INPUT1 and OUTPUT1 = INPUT0 - INPUT1 on [N, 16] fp32."""
    import onnx
    from onnx import TensorProto, helper

    from tidal.optimize.graph import OPSET, save_model
    from tidal.optimize.modelconfig import write_config

    def tensor(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 16])

    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        ADD_SUB_MODEL,
        [tensor("INPUT0"), tensor("INPUT1")],
        [tensor("OUTPUT0"), tensor("OUTPUT1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tidal")
    (folder / "1").mkdir(parents=True)
    save_model(model, folder / "1" / "model.onnx")
    write_config(folder, ADD_SUB_MODEL, folder / "1" / "model.onnx", max_batch_size=8)
