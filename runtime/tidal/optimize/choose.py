"""Which backend serves a variant on this machine: the fastest whose outputs are exact.

Speed alone is not enough: ONNX Runtime's fused int8 kernels saturate u8 x s8
pair sums on CPUs without VNNI, so the fastest backend may be wrong there. Every
profiled backend is run on the same rows and compared with the exact execution
of the file (ONNX Runtime with graph optimizations off: each DequantizeLinear ->
float op -> QuantizeLinear as written); those within one output quantization
step agree, and the one with the lowest geometric-mean p50 over the profile's
batch sizes serves. A variant with one backend keeps it unchecked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from tidal import backends
from tidal.backends.base import BackendOptions
from tidal.errors import ConfigError
from tidal.optimize.profile import current_hardware, synthetic_batch
from tidal.repository.variants import BackendChoice, LatencyProfile, Measured

EXACT = BackendOptions(graph_optimization_level="disable")
_RELATIVE_TOLERANCE = 1e-3  # without an output quantizer: 0.1% of the reference's largest magnitude


def output_step(path: Path) -> float | None:
    """Scale of the DequantizeLinear that produces the first output: one step of the model's resolution."""
    graph = onnx.load(str(path)).graph
    dq = next((n for n in graph.node if graph.output[0].name in n.output), None)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    scale = next((i for i in graph.initializer if i.name == dq.input[1]), None)
    return None if scale is None else float(np.max(numpy_helper.to_array(scale)))


def run_first_output(path: Path, backend: str, feeds: Mapping[str, np.ndarray], options: BackendOptions) -> np.ndarray:
    runner = backends.factory(backend)(Path(path), options)
    try:
        name = runner.outputs()[0].name
        return np.asarray(runner.run(feeds, [name])[name], np.float64)
    finally:
        runner.close()


def synthetic_feeds(path: Path, rows: int) -> dict[str, np.ndarray]:
    """Rows for the exactness check where no data set is at hand (`tidal profile`): any inputs that reach the
    ends of the quantized ranges show a saturating kernel."""
    runner = backends.factory("onnxruntime")(Path(path), EXACT)
    try:
        return synthetic_batch(runner.inputs(), rows)
    finally:
        runner.close()


def error_steps(path: Path, backend: str, feeds: Mapping[str, np.ndarray], reference: np.ndarray) -> float:
    """Largest distance of `backend`'s first output from `reference`, in output quantization steps."""
    got = run_first_output(path, backend, feeds, BackendOptions())
    step = output_step(path) or _RELATIVE_TOLERANCE * max(float(np.max(np.abs(reference))), 1e-30)
    return round(float(np.max(np.abs(got - reference))) / step, 3) if got.size else 0.0


def geomean_p50(profile: LatencyProfile) -> float:
    return round(math.exp(sum(math.log(max(v, 1e-9)) for v in profile.p50_ms) / len(profile.p50_ms)), 5)


def choose(
    path: Path, profiles: Mapping[str, LatencyProfile], feeds: Mapping[str, np.ndarray]
) -> tuple[tuple[str, ...], BackendChoice]:
    """Backends that agree with the exact reference, fastest first, and the record of why."""
    names = list(profiles)
    errors: dict[str, float | None] = dict.fromkeys(names)
    if len(names) > 1:
        reference = run_first_output(path, "onnxruntime", feeds, EXACT)
        errors = {name: error_steps(path, name, feeds, reference) for name in names}
    measured = {
        name: Measured(geomean_p50(profiles[name]), errors[name], errors[name] is None or errors[name] <= 1.0)
        for name in names
    }
    correct = sorted((n for n in names if measured[n].agrees), key=lambda n: measured[n].mean_p50_ms)
    if not correct:
        detail = ", ".join(f"{n} {measured[n].max_error_steps} steps" for n in names)
        raise ConfigError(f"{path.name}: no backend agrees with the exact reference within one step ({detail})")
    return tuple(correct), BackendChoice(correct[0], _reason(correct, measured), current_hardware(), measured)


def _reason(correct: list[str], measured: Mapping[str, Measured]) -> str:
    best = correct[0]
    if len(measured) == 1:
        return f"{best}: the only backend that runs it here"
    parts = [f"{best} is the fastest exact backend ({measured[best].mean_p50_ms:.4g} ms geomean p50"]
    parts += [f"{n} {measured[n].mean_p50_ms:.4g} ms" for n in correct[1:]]
    wrong = [n for n in measured if not measured[n].agrees]
    text = ", ".join(parts) + ")"
    if wrong:
        text += "; not exact here: " + ", ".join(f"{n} off by {measured[n].max_error_steps} steps" for n in wrong)
    return text
