"""Builders of each variant kind: model in, files in the version folder out.

Every builder starts from the fp32 variant (model.onnx after the offline graph
optimizations), so all variants share its inputs, outputs and folded
constants. A builder that does not apply to a model raises ConfigError with
the reason; `tidal optimize` stops on it when the kind was asked for by name,
else reports it and goes on with the other kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from tidal.backends import hardware as host
from tidal.errors import ConfigError
from tidal.optimize import distill, prune, quantize
from tidal.optimize.data import Dataset
from tidal.optimize.graph import flops_per_row, non_fp32_floats, parameter_count, save_model
from tidal.optimize.train import TrainConfig
from tidal.repository.variants import KINDS

# int8-symmetric is the int8 variant TensorRT can build: made when named, and for `--backend tensorrt`.
DEFAULT_KINDS = tuple(k for k in KINDS if k != "int8-symmetric")
FP32_FILE = "model.onnx"

# Backends that may run each kind, in order of preference; profiling keeps those that load it here.
CANDIDATE_BACKENDS = {
    "fp32": ("onnxruntime",),
    "int8": ("int8", "onnxruntime"),
    "int8-symmetric": ("onnxruntime",),
    "int8-dynamic": ("onnxruntime",),
    "pruned": ("onnxruntime",),
    "distilled": ("onnxruntime",),
    "fp16": ("tensorrt",),
}
# Every ONNX variant also runs on a GPU instance, through ONNX Runtime's CUDA provider at least (the
# repository falls back to it there); fp16 only there, where half precision pays.
RUNNABLE_ON = {kind: ("gpu",) if kind == "fp16" else ("cpu", "gpu") for kind in CANDIDATE_BACKENDS}

# Kinds built only from fp32 tensors: the quantizers and the fp16 conversion leave other precisions
# as they are (a "quantized" file would be the model unchanged), and the student trains in fp32.
_FP32_ONLY = frozenset({"int8", "int8-symmetric", "int8-dynamic", "distilled", "fp16"})
_SEVEN_BIT = ", 7-bit (reduce_range: |w| <= 64, no int16 pair-sum saturation)"
_QUANTIZED_OPS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"})


@dataclass(frozen=True, slots=True)
class BuildSettings:
    prune_ratios: tuple[float, ...] = (0.5, 0.75)
    student_hidden: tuple[int, ...] | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40))
    calibration_method: str = "minmax"
    # 7-bit weights, so no u8 x s8 pair sum saturates int16; None: exactly when this CPU lacks VNNI, where
    # ONNX Runtime's int8 kernels would saturate and tidal's exact ones would need their slower 8-bit path.
    reduce_range: bool | None = None

    def seven_bit_weights(self) -> bool:
        return not host.cpu_info().has_vnni if self.reduce_range is None else self.reduce_range


@dataclass(frozen=True, slots=True)
class Built:
    """A variant file written to the version folder, not yet measured."""

    name: str
    kind: str
    file: str
    parameters: int
    flops_per_row: int | None
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Context:
    version_dir: Path
    fp32: onnx.ModelProto
    calibration: Dataset
    settings: BuildSettings
    on_epoch: Callable[[int, float], None] | None = None

    @property
    def fp32_path(self) -> Path:
        return self.version_dir / FP32_FILE

    def save(self, name: str, kind: str, model: onnx.ModelProto, details: dict[str, Any]) -> Built:
        file = f"model.{name}.onnx"
        save_model(model, self.version_dir / file)
        return Built(name, kind, file, parameter_count(model), flops_per_row(model), details)

    def like_fp32(self, name: str, kind: str, details: dict[str, Any]) -> Built:
        """Quantized files keep fp32's topology, so they inherit its counts."""
        return Built(name, kind, f"model.{name}.onnx", parameter_count(self.fp32), flops_per_row(self.fp32), details)


def unsupported(kind: str, model: onnx.ModelProto) -> str | None:
    """Why `kind` cannot be built from `model`, known before anything is built; None when it may be."""
    others = non_fp32_floats(model)
    if kind in _FP32_ONLY and others:
        return f"{kind} is built from fp32 tensors; this model has {', '.join(others)} ones"
    return None


def _check_quantized(path: Path) -> None:
    """A file the quantizer left without integer ops must not be recorded as INT8."""
    if not {n.op_type for n in onnx.load(str(path)).graph.node} & _QUANTIZED_OPS:
        path.unlink()
        raise ConfigError("the quantizer found nothing to quantize in this graph")


def build_fp32(source: Path, version_dir: Path) -> tuple[Built, onnx.ModelProto]:
    path = version_dir / FP32_FILE
    quantize.optimize_fp32(source, path)
    model = onnx.load(str(path))
    details = {"graph_optimization": "basic", "source": source.name}
    return Built("fp32", "fp32", FP32_FILE, parameter_count(model), flops_per_row(model), details), model


def build_int8(ctx: Context, kind: str = "int8") -> list[Built]:
    """`int8`: activations asymmetric, biases int32, as tidal's kernels and ONNX Runtime's CPU path take them;
    `int8-symmetric`: every zero point 0 and float biases, as TensorRT's explicit quantization takes them."""
    symmetric = kind == "int8-symmetric"
    path = ctx.version_dir / f"model.{kind}.onnx"
    seven_bit = ctx.settings.seven_bit_weights()
    quantize.quantize_int8_static(
        ctx.fp32_path, path, ctx.calibration, ctx.settings.calibration_method, seven_bit, symmetric
    )
    _check_quantized(path)
    details = {
        "format": "QDQ",
        "activations": f"int8 per-tensor{', symmetric' if symmetric else ''}",
        "weights": f"int8 per-channel, symmetric{_SEVEN_BIT if seven_bit else ''}",
        "bias": "float" if symmetric else "int32",
        "calibration": ctx.calibration.source,
        "calibration_rows": ctx.calibration.rows,
        "calibration_method": ctx.settings.calibration_method,
    }
    return [ctx.like_fp32(kind, kind, details)]


def build_int8_dynamic(ctx: Context) -> list[Built]:
    if not quantize.suits_dynamic(ctx.fp32):
        ops = ", ".join(sorted({n.op_type for n in ctx.fp32.graph.node}))
        raise ConfigError(f"dynamic INT8 suits MatMul/Gemm graphs without convolutions; this graph has {ops}")
    path = ctx.version_dir / "model.int8-dynamic.onnx"
    seven_bit = ctx.settings.seven_bit_weights()
    quantize.quantize_int8_dynamic(ctx.fp32_path, path, seven_bit)
    _check_quantized(path)
    weights = f"int8 per-tensor{_SEVEN_BIT if seven_bit else ''}"
    details = {"activations": "uint8, quantized per batch at run time", "weights": weights}
    return [ctx.like_fp32("int8-dynamic", "int8-dynamic", details)]


def build_pruned(ctx: Context) -> list[Built]:
    built = []
    for ratio in ctx.settings.prune_ratios:
        model = prune.prune(ctx.fp32, ratio)
        name = f"pruned-{round(ratio * 100):02d}"
        details = {"ratio": ratio, "method": "structured: whole neurons/channels by |w_in| x |w_out|"}
        built.append(ctx.save(name, "pruned", model, details))
    return built


def build_distilled(ctx: Context) -> list[Built]:
    result = distill.distill(ctx.fp32, ctx.calibration, ctx.settings.student_hidden, ctx.settings.train, ctx.on_epoch)
    train = ctx.settings.train
    details = {
        "hidden": list(result.hidden),
        "epochs": train.epochs,
        "seed": train.seed,
        "temperature": train.temperature,
        "loss": "KL(teacher || student) at the temperature, x T^2",
        "losses": [round(v, 6) for v in result.losses],
        "trained_on": ctx.calibration.source,
    }
    return [ctx.save("distilled", "distilled", result.model, details)]


def build_fp16(ctx: Context) -> list[Built]:
    details = {"io": "fp32 at the edges (Cast), fp16 inside", "note": "for GPU backends; not profiled on CPU"}
    return [ctx.save("fp16", "fp16", quantize.convert_fp16(ctx.fp32), details)]


BUILDERS: dict[str, Callable[[Context], list[Built]]] = {
    "int8": build_int8,
    "int8-symmetric": lambda ctx: build_int8(ctx, "int8-symmetric"),
    "int8-dynamic": build_int8_dynamic,
    "pruned": build_pruned,
    "distilled": build_distilled,
    "fp16": build_fp16,
}
