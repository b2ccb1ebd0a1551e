"""What one batch costs: an affine latency model per variant, kept honest by measurements.

A batch of `b` rows takes about `a + c*b` ms: a fixed cost per execution
(dispatch, thread hand-off, kernel launch) plus a cost per row. The model
starts from the variant's offline profile (its p50 per batch size, fitted
by least squares) and then follows the batches the scheduler really runs:
their sums enter a weighted least-squares fit whose weights halve every
`half_life_s` of running, so a profile measured on a quieter machine, or a
machine that slowed down since, is corrected within seconds.

Two corrections, because only the active variant runs:
- the active variant's own fit moves to its measurements;
- a machine-wide `drift` (measured / profiled time, over every batch) scales
  the profiles of the variants that are not running, so that a loaded host
  slows every candidate's prediction, not just the active one's.

Pure: no clock, no threads; time enters as the `dt_s` of `decay`.
"""

from __future__ import annotations

from collections.abc import Sequence

PRIOR_WEIGHT = 4.0  # the profile counts as this many measured batches in total
MIN_SLOPE_MS = 1e-6  # rows are never free
OUTLIER_FACTOR = 5.0  # a measurement is capped at this multiple of the prediction (GC pauses, preemption)


class _Sums:
    """Weighted sums for a least-squares line y = a + c*x."""

    __slots__ = ("s0", "s1", "s2", "t1", "t2")

    def __init__(self) -> None:
        self.s0 = self.s1 = self.s2 = self.t1 = self.t2 = 0.0

    def add(self, x: float, y: float, w: float = 1.0) -> None:
        self.s0 += w
        self.s1 += w * x
        self.s2 += w * x * x
        self.t1 += w * y
        self.t2 += w * x * y

    def scale(self, factor: float) -> None:
        self.s0 *= factor
        self.s1 *= factor
        self.s2 *= factor
        self.t1 *= factor
        self.t2 *= factor


def _fit(s0: float, s1: float, s2: float, t1: float, t2: float) -> tuple[float, float]:
    """(intercept, slope) in ms; through the origin when the rows seen do not spread enough to tell them apart."""
    det = s0 * s2 - s1 * s1
    if s0 > 0 and det > 1e-9 * max(s0 * s2, 1e-30):
        slope = (s0 * t2 - s1 * t1) / det
        intercept = (t1 - slope * s1) / s0
        if slope >= MIN_SLOPE_MS and intercept >= 0:
            return intercept, slope
        if slope < MIN_SLOPE_MS and s0 > 0:  # flat or falling: all fixed cost
            return max(t1 / s0, 0.0), MIN_SLOPE_MS
    slope = t2 / s2 if s2 > 0 else MIN_SLOPE_MS
    return 0.0, max(slope, MIN_SLOPE_MS)


class BatchLatency:
    """Affine batch latency of one variant, in milliseconds."""

    def __init__(self, batch_sizes: Sequence[int] = (), p50_ms: Sequence[float] = ()) -> None:
        self._prior = _Sums()
        if batch_sizes:
            weight = PRIOR_WEIGHT / len(batch_sizes)
            for size, ms in zip(batch_sizes, p50_ms, strict=True):
                self._prior.add(float(size), float(ms), weight)
        self._online = _Sums()
        self.profiled = bool(batch_sizes)
        self._prior_line = _fit(*self._sums(1.0, with_online=False)) if self.profiled else None

    def _sums(self, drift: float, with_online: bool = True) -> tuple[float, float, float, float, float]:
        p, o = self._prior, self._online
        if not with_online:
            return p.s0, p.s1, p.s2, drift * p.t1, drift * p.t2
        return p.s0 + o.s0, p.s1 + o.s1, p.s2 + o.s2, drift * p.t1 + o.t1, drift * p.t2 + o.t2

    @property
    def measured_weight(self) -> float:
        """How many (decayed) measured batches back the fit."""
        return self._online.s0

    def known(self) -> bool:
        """Whether there is anything to predict from: a profile or a measured batch."""
        return self.profiled or self._online.s0 > 0

    def profiled_ms(self, rows: float) -> float | None:
        """The profile's own line at `rows`, before any measurement; None without a profile."""
        if self._prior_line is None:
            return None
        return self._prior_line[0] + self._prior_line[1] * rows

    def line(self, drift: float = 1.0) -> tuple[float, float]:
        """(fixed ms per batch, ms per row): the profile scaled by `drift`, pulled toward the measurements."""
        return _fit(*self._sums(drift))

    def ms(self, rows: float, drift: float = 1.0) -> float:
        intercept, slope = self.line(drift)
        return intercept + slope * rows

    def add(self, rows: int, seconds: float, drift: float = 1.0) -> None:
        measured = seconds * 1e3
        if self.known():
            measured = min(measured, OUTLIER_FACTOR * self.ms(rows, drift))
        self._online.add(float(rows), measured)

    def decay(self, dt_s: float, half_life_s: float) -> None:
        self._online.scale(0.5 ** (dt_s / half_life_s))
