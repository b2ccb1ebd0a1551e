"""The variants manifest: several builds of one served model, and what each costs.

A model repository keeps Triton's layout, ``REPO/NAME/config.pbtxt`` and
``REPO/NAME/<version>/model.onnx``. ``tidal optimize`` adds variants *beside*
``model.onnx`` in the version folder, and lists them in
``REPO/NAME/<version>/variants.json``::

    REPO/NAME/config.pbtxt
    REPO/NAME/1/model.onnx              the fp32 variant (a plain loader still works)
    REPO/NAME/1/model.int8.onnx         static INT8, QDQ, S8S8, per-channel weights
    REPO/NAME/1/model.int8-symmetric.onnx  the same with every zero point 0 and float biases, for TensorRT
    REPO/NAME/1/model.int8-dynamic.onnx weights INT8, activations quantized per batch
    REPO/NAME/1/model.pruned-50.onnx    50% of hidden neurons / channels removed
    REPO/NAME/1/model.distilled.onnx    a smaller student trained on the teacher
    REPO/NAME/1/model.fp16.onnx         half precision, for GPU backends
    REPO/NAME/1/variants.json

Clients call NAME; the server loads the variants the config's ``variants``
field names (empty: all of them) and routes each batch to the active one. Every
variant has the inputs and outputs of ``model.onnx``, so they are
interchangeable per batch.

variants.json, format 1 (all keys required unless marked optional)::

    {
      "format": 1,
      "model": "NAME",
      "default": "fp32",                   the variant served before any retuning
      "hardware": HARDWARE | null,         where the latest profiles were measured
      "variants": {
        "int8": {
          "file": "model.int8.onnx",       relative to the version folder
          "kind": "int8",                  fp32 | int8 | int8-symmetric | int8-dynamic | pruned | distilled | fp16
          "backends": ["onnxruntime"],     backends that can run it, in order of preference
          "runnable_on": ["cpu", "gpu"],   cpu and/or gpu
          "size_bytes": 1234,              size of the file
          "parameters": 5678,              weight elements
          "flops_per_row": 91011 | null,   multiply-adds x2 for one batch row, when known
          "accuracy": ACCURACY | null,     null: not measured (e.g. fp16 on a CPU-only host)
          "profiles": {"onnxruntime": PROFILE, "tensorrt@gpu": PROFILE, ...},
                                           keyed by backend, "@gpu" for a GPU instance's
                                           (profile_key); a CPU profile has no suffix
          "choice": CHOICE | null,         optional: why "backends" is in its order
          "details": {...}                 how it was made (ratio, calibration, training losses)
        }, ...
      }
    }
    ACCURACY = {"metric": "top1_accuracy" | "top1_agreement", "value": 0.97, "samples": 540,
                "top1_agreement": 0.99, "max_abs_err": 0.03}
        top1_accuracy is measured against the validation labels; without labels the
        metric is top1_agreement with the fp32 variant. top1_agreement and max_abs_err
        always compare the variant's outputs with fp32's on the same inputs.
    PROFILE = {"batch_sizes": [1, 2, 4, ...], "p50_ms": [...], "p99_ms": [...],
               "throughput_rps": [...],    rows per second of all instances at the median batch time
               "instances": 1, "intra_op_threads": 2, "allow_spinning": false,
               "measured_at": "2026-01-01T00:00:00+00:00", "hardware": HARDWARE}
    HARDWARE = {"cpu_model": "...", "cores": 2, "isa_flags": ["avx2", "avx512_vnni"], "gpus": []}
    CHOICE = {"chosen": "int8", "reason": "...", "hardware": HARDWARE,
              "measured": {"int8": {"mean_p50_ms": 0.2, "max_error_steps": 0.0, "agrees": true}, ...}}
        Every backend profiled: geometric mean of its p50 over the profile's batch sizes, and its largest
        distance from the exact reference in output quantization steps. "backends" lists those that agree
        (within one step), fastest first; a choice made on other hardware is not trusted (serving_order).

This module only reads, checks and writes that file; it imports nothing above
tidal.errors so every layer may use its types.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidal.errors import ConfigError

FORMAT_VERSION = 1
MANIFEST_FILE = "variants.json"
# In the order `tidal optimize` builds and lists them.
KINDS = ("fp32", "int8", "int8-symmetric", "int8-dynamic", "pruned", "distilled", "fp16")
DEVICES = frozenset({"cpu", "gpu"})
METRICS = frozenset({"top1_accuracy", "top1_agreement"})


def profile_key(backend: str, device: str) -> str:
    """Where a variant's profile on `backend` and `device` is kept: the same variant runs at different speeds
    on each, and the controller chooses among variants and devices from these."""
    return backend if device == "cpu" else f"{backend}@{device}"


def split_profile_key(key: str) -> tuple[str, str]:
    """(backend, device) of a profile key."""
    backend, _, device = key.partition("@")
    return backend, device or "cpu"


def profiles_on(profiles: Mapping[str, LatencyProfile], device: str) -> dict[str, LatencyProfile]:
    """The profiles measured on `device`, under their keys."""
    return {key: p for key, p in profiles.items() if split_profile_key(key)[1] == device}


@dataclass(frozen=True, slots=True)
class Hardware:
    cpu_model: str
    cores: int
    isa_flags: tuple[str, ...]
    gpus: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Accuracy:
    metric: str
    value: float
    samples: int
    top1_agreement: float
    max_abs_err: float


@dataclass(frozen=True, slots=True)
class LatencyProfile:
    """Latency of one variant on one backend, per batch size, on `hardware`."""

    batch_sizes: tuple[int, ...]
    p50_ms: tuple[float, ...]
    p99_ms: tuple[float, ...]
    throughput_rps: tuple[float, ...]
    instances: int
    intra_op_threads: int
    allow_spinning: bool
    measured_at: str
    hardware: Hardware

    def latency_ms(self, batch_size: int, quantile: str = "p50") -> float:
        """Estimated latency of one batch of `batch_size` rows.

        Linear between measured sizes, extrapolated along the last segment above
        the largest: latency grows roughly linearly with rows once the batch is
        large enough to keep the cores busy, which is where estimates matter.
        """
        if quantile not in ("p50", "p99"):
            raise ValueError(f"quantile must be 'p50' or 'p99', not {quantile!r}")
        values = self.p50_ms if quantile == "p50" else self.p99_ms
        sizes = self.batch_sizes
        if len(sizes) == 1 or batch_size <= sizes[0]:
            return values[0]
        i = min(bisect.bisect_left(sizes, batch_size), len(sizes) - 1)
        lo, hi = sizes[i - 1], sizes[i]
        slope = (values[i] - values[i - 1]) / (hi - lo)
        return max(values[i - 1] + slope * (batch_size - lo), 0.0)

    def best_throughput(self) -> tuple[int, float]:
        """(batch size, rows per second) of the fastest measured point."""
        i = max(range(len(self.throughput_rps)), key=self.throughput_rps.__getitem__)
        return self.batch_sizes[i], self.throughput_rps[i]


@dataclass(frozen=True, slots=True)
class Measured:
    mean_p50_ms: float
    max_error_steps: float | None  # None: not checked (the backend is the reference itself)
    agrees: bool


@dataclass(frozen=True, slots=True)
class BackendChoice:
    """Which backend serves a variant and why, as measured on `hardware`."""

    chosen: str
    reason: str
    hardware: Hardware
    measured: Mapping[str, Measured]


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    file: str
    kind: str
    backends: tuple[str, ...]
    runnable_on: tuple[str, ...]
    size_bytes: int
    parameters: int
    flops_per_row: int | None
    accuracy: Accuracy | None
    profiles: Mapping[str, LatencyProfile] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)
    choice: BackendChoice | None = None

    def serving_order(self, cpu_model: str, isa_flags: Iterable[str]) -> tuple[tuple[str, ...], str | None]:
        """Backends to try at load, and why the recorded choice is not trusted here (None when it is).

        A choice measured on another CPU model or ISA set may name a backend that is slower, or not
        exact, on this one (MLAS saturates u8 x s8 pair sums without VNNI): the order stays, flagged.
        """
        hw = self.choice.hardware if self.choice else None
        if hw is None or (hw.cpu_model == cpu_model and set(hw.isa_flags) == set(isa_flags)):
            return self.backends, None
        flags = ", ".join(sorted(set(hw.isa_flags) ^ set(isa_flags))) or "none"
        return self.backends, (
            f"its backend choice ({self.choice.chosen}) was measured on '{hw.cpu_model}', this host is "
            f"'{cpu_model}' (ISA flags that differ: {flags})"
        )


@dataclass(frozen=True, slots=True)
class VariantManifest:
    model: str
    default: str
    hardware: Hardware | None
    variants: Mapping[str, Variant]

    def select(self, names: Iterable[str]) -> list[Variant]:
        """The variants a config asks for (none named: all), in manifest order."""
        wanted = list(names)
        unknown = [n for n in wanted if n not in self.variants]
        if unknown:
            raise ConfigError(
                f"model '{self.model}': config field 'variants' names {', '.join(unknown)}, "
                f"not in {MANIFEST_FILE} (has {', '.join(self.variants)})"
            )
        return [v for n, v in self.variants.items() if not wanted or n in wanted]


def load_manifest(version_dir: Path) -> VariantManifest | None:
    """The manifest of a version folder; None when it has none (a plain model)."""
    path = Path(version_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    manifest = _Reader(path, raw, "").manifest()
    for variant in manifest.variants.values():
        if not (path.parent / variant.file).is_file():
            raise ConfigError(f"{path}: field 'variants.{variant.name}.file': {variant.file} does not exist")
    return manifest


def save_manifest(version_dir: Path, manifest: VariantManifest) -> None:
    """Write atomically, so a server reading the folder never sees half a file."""
    if manifest.default not in manifest.variants:
        raise ConfigError(f"manifest default '{manifest.default}' is not one of its variants")
    path = Path(version_dir) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest_to_json(manifest), indent=2) + "\n")
    os.replace(tmp, path)


def manifest_to_json(manifest: VariantManifest) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "model": manifest.model,
        "default": manifest.default,
        "hardware": hardware_to_json(manifest.hardware) if manifest.hardware else None,
        "variants": {name: _variant_to_json(v) for name, v in manifest.variants.items()},
    }


def hardware_to_json(hw: Hardware) -> dict[str, Any]:
    return {"cpu_model": hw.cpu_model, "cores": hw.cores, "isa_flags": list(hw.isa_flags), "gpus": list(hw.gpus)}


def _variant_to_json(v: Variant) -> dict[str, Any]:
    acc = v.accuracy
    return {
        "file": v.file,
        "kind": v.kind,
        "backends": list(v.backends),
        "runnable_on": list(v.runnable_on),
        "size_bytes": v.size_bytes,
        "parameters": v.parameters,
        "flops_per_row": v.flops_per_row,
        "accuracy": None
        if acc is None
        else {
            "metric": acc.metric,
            "value": acc.value,
            "samples": acc.samples,
            "top1_agreement": acc.top1_agreement,
            "max_abs_err": acc.max_abs_err,
        },
        "profiles": {name: _profile_to_json(p) for name, p in v.profiles.items()},
        "choice": None if v.choice is None else _choice_to_json(v.choice),
        "details": dict(v.details),
    }


def _choice_to_json(c: BackendChoice) -> dict[str, Any]:
    return {
        "chosen": c.chosen,
        "reason": c.reason,
        "hardware": hardware_to_json(c.hardware),
        "measured": {
            name: {"mean_p50_ms": m.mean_p50_ms, "max_error_steps": m.max_error_steps, "agrees": m.agrees}
            for name, m in c.measured.items()
        },
    }


def _profile_to_json(p: LatencyProfile) -> dict[str, Any]:
    return {
        "batch_sizes": list(p.batch_sizes),
        "p50_ms": list(p.p50_ms),
        "p99_ms": list(p.p99_ms),
        "throughput_rps": list(p.throughput_rps),
        "instances": p.instances,
        "intra_op_threads": p.intra_op_threads,
        "allow_spinning": p.allow_spinning,
        "measured_at": p.measured_at,
        "hardware": hardware_to_json(p.hardware),
    }


class _Reader:
    """Walks the JSON with the dotted path of each field, so errors name it."""

    def __init__(self, path: Path, value: Any, where: str) -> None:
        self.path, self.value, self.where = path, value, where

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: field '{self.where or '<top>'}': {message}")

    def child(self, key: str, optional: bool = False) -> _Reader:
        if not isinstance(self.value, dict):
            raise self.fail("expected an object")
        if key not in self.value and not optional:
            raise ConfigError(f"{self.path}: missing field '{self._join(key)}'")
        return _Reader(self.path, self.value.get(key), self._join(key))

    def _join(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
        node = self.child(key, optional)
        if node.value is None and optional:
            return None
        ok = isinstance(node.value, kind) and not (isinstance(node.value, bool) and kind in (int, float, (int, float)))
        if not ok:
            raise node.fail(f"expected {getattr(kind, '__name__', 'a number')}, got {node.value!r}")
        return node.value

    def items(self, key: str) -> list[tuple[str, _Reader]]:
        node = self.child(key)
        if not isinstance(node.value, dict):
            raise node.fail("expected an object")
        return [(k, node.child(k)) for k in node.value]

    def strings(self, key: str, allowed: frozenset[str] | None = None) -> tuple[str, ...]:
        values = tuple(self._list(key, str))
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad:
            raise self.child(key).fail(f"unknown {bad}; allowed: {sorted(allowed or ())}")
        return values

    def numbers(self, key: str) -> tuple[float, ...]:
        return tuple(float(v) for v in self._list(key, (int, float)))

    def _list(self, key: str, kind: type | tuple[type, ...]) -> list[Any]:
        node = self.child(key)
        if not isinstance(node.value, list) or not all(
            isinstance(v, kind) and not isinstance(v, bool) for v in node.value
        ):
            raise node.fail(f"expected a list of {getattr(kind, '__name__', 'numbers')}")
        return node.value

    def manifest(self) -> VariantManifest:
        if self.get("format", int) != FORMAT_VERSION:
            raise self.child("format").fail(f"unsupported format; this tidal reads format {FORMAT_VERSION}")
        hw = self.child("hardware", optional=True)
        variants = {name: node.variant(name) for name, node in self.items("variants")}
        if not variants:
            raise self.child("variants").fail("no variants")
        default = self.get("default", str)
        if default not in variants:
            raise self.child("default").fail(f"'{default}' is not one of the variants")
        return VariantManifest(
            model=self.get("model", str),
            default=default,
            hardware=None if hw.value is None else hw.hardware(),
            variants=variants,
        )

    def variant(self, name: str) -> Variant:
        kind = self.get("kind", str)
        if kind not in KINDS:
            raise self.child("kind").fail(f"unknown kind '{kind}'; allowed: {sorted(KINDS)}")
        acc = self.child("accuracy", optional=True)
        choice = self.child("choice", optional=True)
        return Variant(
            name=name,
            file=self.get("file", str),
            kind=kind,
            backends=self.strings("backends"),
            runnable_on=self.strings("runnable_on", DEVICES),
            size_bytes=self.get("size_bytes", int),
            parameters=self.get("parameters", int),
            flops_per_row=self.get("flops_per_row", int, optional=True),
            accuracy=None if acc.value is None else acc.accuracy(),
            profiles={backend: node.profile() for backend, node in self.items("profiles")},
            details=self.get("details", dict),
            choice=None if choice.value is None else choice.choice(),
        )

    def choice(self) -> BackendChoice:
        measured = {
            name: Measured(
                mean_p50_ms=float(node.get("mean_p50_ms", (int, float))),
                max_error_steps=node.get("max_error_steps", (int, float), optional=True),
                agrees=node.get("agrees", bool),
            )
            for name, node in self.items("measured")
        }
        return BackendChoice(
            chosen=self.get("chosen", str),
            reason=self.get("reason", str),
            hardware=self.child("hardware").hardware(),
            measured=measured,
        )

    def accuracy(self) -> Accuracy:
        metric = self.get("metric", str)
        if metric not in METRICS:
            raise self.child("metric").fail(f"unknown metric '{metric}'; allowed: {sorted(METRICS)}")
        return Accuracy(
            metric=metric,
            value=float(self.get("value", (int, float))),
            samples=self.get("samples", int),
            top1_agreement=float(self.get("top1_agreement", (int, float))),
            max_abs_err=float(self.get("max_abs_err", (int, float))),
        )

    def profile(self) -> LatencyProfile:
        sizes = tuple(int(v) for v in self.numbers("batch_sizes"))
        columns = {key: self.numbers(key) for key in ("p50_ms", "p99_ms", "throughput_rps")}
        if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
            raise self.child("batch_sizes").fail("expected increasing positive batch sizes")
        for key, column in columns.items():
            if len(column) != len(sizes):
                raise self.child(key).fail(f"has {len(column)} values for {len(sizes)} batch sizes")
        return LatencyProfile(
            batch_sizes=sizes,
            p50_ms=columns["p50_ms"],
            p99_ms=columns["p99_ms"],
            throughput_rps=columns["throughput_rps"],
            instances=self.get("instances", int),
            intra_op_threads=self.get("intra_op_threads", int),
            allow_spinning=self.get("allow_spinning", bool),
            measured_at=self.get("measured_at", str),
            hardware=self.child("hardware").hardware(),
        )

    def hardware(self) -> Hardware:
        return Hardware(
            cpu_model=self.get("cpu_model", str),
            cores=self.get("cores", int),
            isa_flags=self.strings("isa_flags"),
            gpus=self.strings("gpus"),
        )
