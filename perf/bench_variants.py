"""Variant benchmark: the variant table of the reference MLP and of the demo model, in one run.

    .venv/bin/python perf/bench_variants.py [--seconds 1.0] [--json out.json]

For each model: accuracy, size, batch-1 latency and best throughput per
variant (on the backend where it is fastest), then the INT8/fp32 throughput
ratio at the best batch size and the accuracy drop, against the target
(INT8 >= 2.5x fp32 with <= 1 point lost on the demo): once from the profiles,
once from alternating bursts of both (robust to a busy machine). Also times
the demo's first build. Every other number is a wall-clock timing: run it on a
quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from tidal import backends, demo
from tidal.backends.base import BackendOptions
from tidal.optimize.pipeline import OptimizeOptions, optimize, profile_repository
from tidal.optimize.profile import synthetic_batch
from tidal.optimize.reference import REFERENCE_DIMS, reference_mlp
from tidal.optimize.report import best_profile, format_markdown
from tidal.repository.variants import VariantManifest, manifest_to_json


def _log(message: str) -> None:
    print(f"  {message}", file=sys.stderr)


def _reference(work: Path, seconds: float, max_batch: int) -> VariantManifest:
    model, (x, _), (xv, yv) = reference_mlp()
    onnx.save(model, str(work / "reference.onnx"))
    np.savez(work / "cal.npz", input=x[:1024])
    np.savez(work / "val.npz", input=xv, labels=yv)
    options = OptimizeOptions(
        model=work / "reference.onnx",
        repository=work / "repo",
        name="reference",
        calibration=work / "cal.npz",
        validation=work / "val.npz",
        max_batch_size=max_batch,
        profile_seconds=seconds,
    )
    return optimize(options, _log)


def _paired_speedup(version_dir: Path, manifest: VariantManifest, rounds: int = 30) -> dict[str, float]:
    """int8/fp32 throughput at each one's best batch, alternating short bursts of both.

    A neighbour's load then hits both sides alike, so the ratio holds on a busy
    machine where two profiles taken a minute apart would not be comparable.
    """
    sides = {}
    for name in ("fp32", "int8"):
        backend, profile = best_profile(manifest.variants[name])
        options = BackendOptions(intra_op_threads=profile.intra_op_threads)
        runner = backends.factory(backend)(version_dir / manifest.variants[name].file, options)
        size = profile.best_throughput()[0]
        feeds = synthetic_batch(runner.inputs(), size)
        sides[name] = (runner, feeds, [s.name for s in runner.outputs()], size, [])
    for _ in range(rounds):
        for runner, feeds, outputs, _size, times in sides.values():
            for _ in range(5):
                start = time.perf_counter()
                runner.run(feeds, outputs)
                times.append(time.perf_counter() - start)
    rps = {name: size / float(np.median(times)) for name, (_r, _f, _o, size, times) in sides.items()}
    for runner, *_ in sides.values():
        runner.close()
    speedup = rps["int8"] / rps["fp32"]
    return {"paired_fp32_rps": rps["fp32"], "paired_int8_rps": rps["int8"], "paired_int8_speedup": speedup}


def _summary(manifest: VariantManifest) -> dict[str, float]:
    fp32, int8 = manifest.variants["fp32"], manifest.variants.get("int8")
    out = {"fp32_best_rps": best_profile(fp32)[1].best_throughput()[1]}
    if int8 is not None and best_profile(int8) is not None:
        out["int8_best_rps"] = best_profile(int8)[1].best_throughput()[1]
        out["int8_speedup"] = out["int8_best_rps"] / out["fp32_best_rps"]
        out["int8_accuracy_drop_points"] = (fp32.accuracy.value - int8.accuracy.value) * 100
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum measured time per batch size")
    parser.add_argument("--reference-max-batch", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write both manifests and the summaries here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="tidal-bench-variants-") as tmp:
        work = Path(tmp)
        print(f"reference MLP {'->'.join(map(str, REFERENCE_DIMS))}: building and profiling variants", file=sys.stderr)
        reference = _reference(work, args.seconds, args.reference_max_batch)
        print("demo: first build (cold cache)", file=sys.stderr)
        started = time.perf_counter()
        repository = demo.ensure_demo_repository(work / "demo-cache", progress=True)
        build_s = time.perf_counter() - started
        print("demo: re-profiling with the benchmark's measuring time", file=sys.stderr)
        digits = profile_repository(repository, demo.DEMO_MODEL, profile_seconds=args.seconds, log=_log)
        paired = {
            "reference MLP": _paired_speedup(work / "repo" / "reference" / "1", reference),
            f"demo ({demo.DEMO_MODEL})": _paired_speedup(repository / demo.DEMO_MODEL / "1", digits),
        }
    for title, manifest in (("reference MLP", reference), (f"demo ({demo.DEMO_MODEL})", digits)):
        summary = _summary(manifest) | paired[title]
        results[title] = {"summary": summary, "manifest": manifest_to_json(manifest)}
        print(f"\n### {title}\n\n{format_markdown(manifest)}\n")
        print(", ".join(f"{k} = {v:,.2f}" for k, v in summary.items()))
    print(f"\ndemo first build: {build_s:.1f} s")
    hw = reference.hardware
    if hw is not None:
        print(f"hardware: {hw.cpu_model}, {hw.cores} cores, {' '.join(hw.isa_flags)}")
    if args.json is not None:
        results["demo_first_build_s"] = build_s
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
