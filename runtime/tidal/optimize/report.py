"""The variant table printed at the end of `tidal optimize` and `tidal profile`."""

from __future__ import annotations

from tidal.repository.variants import LatencyProfile, Variant, VariantManifest

_HEADER = ("variant", "accuracy", "size", "params", "MFLOP/row", "backend", "p50@1 ms", "p99@1 ms", "best rows/s")


def best_profile(variant: Variant) -> tuple[str, LatencyProfile] | None:
    """The backend with the highest throughput for this variant, if any was measured."""
    if not variant.profiles:
        return None
    return max(variant.profiles.items(), key=lambda item: item[1].best_throughput()[1])


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


def _row(v: Variant) -> tuple[str, ...]:
    acc = "-" if v.accuracy is None else f"{v.accuracy.value * 100:.2f}%"
    if v.accuracy is not None and v.accuracy.metric == "top1_agreement":
        acc += " agree"
    flops = "-" if v.flops_per_row is None else f"{v.flops_per_row / 1e6:.2f}"
    best = best_profile(v)
    if best is None:
        timing = ("/".join(v.backends) + " (" + "/".join(v.runnable_on) + ")", "-", "-", "-")
    else:
        backend, profile = best
        size, rps = profile.best_throughput()
        timing = (
            backend,
            f"{profile.latency_ms(1):.3f}",
            f"{profile.latency_ms(1, 'p99'):.3f}",
            f"{rps:,.0f} @{size}",
        )
    return (v.name, acc, _size(v.size_bytes), f"{v.parameters:,}", flops, *timing)


def format_table(manifest: VariantManifest) -> str:
    """Plain-text table, one row per variant, measured on the backend where it is fastest."""
    rows = [_HEADER, *(_row(v) for v in manifest.variants.values())]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    hw = manifest.hardware
    if hw is not None:
        lines.append(f"measured on {hw.cpu_model}, {hw.cores} cores, {' '.join(hw.isa_flags)}")
    return "\n".join(lines)


def format_markdown(manifest: VariantManifest) -> str:
    """The same table as Markdown, for perf/RESULTS.md."""
    rows = [_row(v) for v in manifest.variants.values()]
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
