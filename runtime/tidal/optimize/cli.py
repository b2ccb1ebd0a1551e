"""Sub-commands `tidal optimize` and `tidal profile` (`tidal demo` lives above, in tidal.demo_cli).

Each `add_*_parser(subparsers)` registers one sub-command whose
`func(args) -> int` runs it; tidal.cli wires them in. User errors print one
line and exit 2; the variant table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from tidal.errors import TidalError
from tidal.optimize import engines
from tidal.optimize.build import DEFAULT_KINDS, KINDS, BuildSettings
from tidal.optimize.pipeline import OptimizeOptions, optimize, profile_repository
from tidal.optimize.report import format_table
from tidal.optimize.train import TrainConfig
from tidal.repository.variants import VariantManifest


def _log(message: str) -> None:
    print(f"tidal: {message}", file=sys.stderr)


def _csv(kind: type, text: str) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None


def _add_profile_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instances", type=int, default=1, help="backend instances run side by side while profiling")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads per instance (0: cores / instances)")
    p.add_argument("--profile-seconds", type=float, default=0.3, help="minimum time measured per batch size")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_optimize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("optimize", help="build INT8, pruned, distilled and fp16 variants of an ONNX model")
    p.add_argument("model", type=Path, help="the fp32 ONNX model (dim 0 must be the batch)")
    p.add_argument("--repository", type=Path, required=True, help="model repository to write into")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--calibration", type=Path, required=True, help=".npz with an array per model input")
    p.add_argument("--validation", type=Path, help=".npz like --calibration, plus optional 'labels'")
    p.add_argument("--version", type=int, default=1, help="version folder to write (default 1)")
    p.add_argument(
        "--variants",
        type=lambda t: _csv(str, t),
        help=f"kinds to build, each one required, of {','.join(KINDS)} (default: every one of "
        f"{','.join(DEFAULT_KINDS)} that applies; with --backend tensorrt also int8-symmetric)",
    )
    p.add_argument("--prune-ratios", type=lambda t: _csv(float, t), default=(0.5, 0.75), help="e.g. 0.5,0.75")
    p.add_argument("--student-hidden", type=lambda t: _csv(int, t), help="distilled student widths, e.g. 128,64")
    p.add_argument("--distill-epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (training, mixing)")
    p.add_argument("--calibration-method", default="minmax", choices=["minmax", "entropy", "percentile"])
    p.add_argument("--calibration-rows", type=int, default=2048, help="rows of --calibration to use at most")
    p.add_argument("--min-accuracy", type=float, default=0.0, help="leave out variants below this (0..1)")
    p.add_argument("--max-batch-size", type=int, help="largest batch profiled and served (default: config's, or 64)")
    p.add_argument("--backend", choices=["tensorrt"], help="also build this GPU backend's engines ahead of time, "
                   "for each kind of GPU here, into VERSION/engines/ (needs TensorRT 10+ and a GPU)")
    _add_profile_flags(p)
    p.set_defaults(func=_optimize)


def _optimize(args: argparse.Namespace) -> int:
    options = OptimizeOptions(
        model=args.model,
        repository=args.repository,
        name=args.name,
        calibration=args.calibration,
        validation=args.validation,
        version=args.version,
        kinds=args.variants,
        for_tensorrt=args.backend == "tensorrt",
        build=BuildSettings(
            prune_ratios=tuple(args.prune_ratios),
            student_hidden=args.student_hidden,
            train=TrainConfig(epochs=args.distill_epochs, seed=args.seed),
            calibration_method=args.calibration_method,
        ),
        calibration_rows=args.calibration_rows,
        min_accuracy=args.min_accuracy,
        max_batch_size=args.max_batch_size,
        instances=args.instances,
        intra_op_threads=args.threads,
        profile_seconds=args.profile_seconds,
        progress=args.progress,
    )

    def build() -> VariantManifest:
        if args.backend == "tensorrt":
            engines.check_available()  # before minutes of building variants, not after
        manifest = optimize(options, _log)
        if args.backend == "tensorrt":
            manifest = engines.build_engines(args.repository / args.name, args.version, _log)
        return manifest

    return _print_table(build)


def _print_table(build: Callable[[], VariantManifest]) -> int:
    """Run `build` and print its variant table, or its error in one line (exit 2)."""
    try:
        manifest = build()
    except TidalError as exc:
        _log(f"error: {exc}")
        return 2
    print(format_table(manifest))
    return 0


def add_profile_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="re-measure the latency profiles of a model's variants on this machine")
    p.add_argument("repository", type=Path)
    p.add_argument("name")
    p.add_argument("--version", type=int, help="version folder (default: the latest)")
    p.add_argument("--max-batch-size", type=int, help="largest batch profiled (default: the config's, or 64)")
    _add_profile_flags(p)
    p.set_defaults(func=_profile)


def _profile(args: argparse.Namespace) -> int:
    return _print_table(
        lambda: profile_repository(
            args.repository,
            args.name,
            version=args.version,
            max_batch_size=args.max_batch_size,
            instances=args.instances,
            intra_op_threads=args.threads,
            profile_seconds=args.profile_seconds,
            progress=args.progress,
            log=_log,
        )
    )

