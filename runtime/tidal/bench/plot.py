"""`--plot`: latency percentiles, throughput and tidal's batch size and variant over time.

matplotlib is an optional extra (`plot`); it is only imported here, and a missing install is reported
before any load is sent.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

from tidal.errors import InvalidArgument


def require_matplotlib() -> None:
    """Names the install command for the environment tidal runs in.

    tidal is installed from its checkout, not from PyPI, so `pip install 'tidal[plot]'` would look for another
    project's package; and a bare `pip` is often not the one of tidal's virtualenv.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InvalidArgument(
            f"--plot needs matplotlib (tidal's `plot` extra): {sys.executable} -m pip install matplotlib"
        ) from None


def _series(ts: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pairs = [(e["t_s"], e[key]) for e in ts if e.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = result["timeseries"]
    has_batch = any(e.get("batch_size_mean") is not None for e in ts)
    has_variant = any(e.get("active_variant") for e in ts)
    rows = 2 + has_batch + has_variant
    fig, axes = plt.subplots(rows, 1, figsize=(10, 2.6 * rows), sharex=True, squeeze=False)
    ax_lat, ax_rps = axes[0][0], axes[1][0]
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        ax_lat.plot(*_series(ts, key), label=label)
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_yscale("log")
    ax_lat.legend(loc="upper left")
    ax_rps.plot(*_series(ts, "offered_rps"), color="tab:grey", linestyle="--", label="sent")
    ax_rps.plot(*_series(ts, "throughput_rps"), color="tab:green", label="ok")
    ax_rps.set_ylabel("requests/s")
    ax_rps.legend(loc="upper left")
    row = 2
    if has_batch:
        axes[row][0].plot(*_series(ts, "batch_size_mean"), color="tab:purple")
        axes[row][0].set_ylabel("mean batch size")
        row += 1
    if has_variant:
        _plot_variants(axes[row][0], ts)
    _mark_points(ax_lat, ts)
    axes[-1][0].set_xlabel("time (s)")
    fig.suptitle(f"tidal bench: {result['mode']} against {result['server'].get('name') or result['target']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_variants(ax: Any, ts: list[dict[str, Any]]) -> None:
    """The active variant of each model as a step line over the variant names."""
    names = sorted({v for e in ts for v in (e.get("active_variant") or {}).values()})
    models = sorted({m for e in ts for m in (e.get("active_variant") or {})})
    for model in models:
        pts = [(e["t_s"], names.index(e["active_variant"][model]))
               for e in ts if model in (e.get("active_variant") or {})]
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", label=model)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylabel("active variant")
    ax.legend(loc="upper left")


def _mark_points(ax: Any, ts: list[dict[str, Any]]) -> None:
    """Vertical lines where a sweep moves to its next point."""
    for prev, cur in itertools.pairwise(ts):
        if cur["point"] != prev["point"]:
            ax.axvline(cur["t_s"], color="grey", linewidth=0.5, linestyle=":")
