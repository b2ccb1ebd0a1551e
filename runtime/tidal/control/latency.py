"""What one batch costs: an affine latency model per variant, kept honest by measurements.

A batch of `b` rows takes about `a + c*b` ms: a fixed cost per execution
(dispatch, thread hand-off, kernel launch) plus a cost per row. A profiled
variant starts from the least-squares line through its offline profile (p50
per batch size). Measurements then scale that line: `scale` is the ratio of
measured to profiled time over the batches the scheduler really ran,
weighted so that it halves its memory every `half_life_s` of running. A
profile measured on a quieter machine, or a machine that slowed down since,
is corrected within seconds.

Why a scale and not a fresh fit: under steady load the batches cluster
around one size (one request's rows, or the steady-state batch), where an
intercept and a slope cannot be told apart; a scale is identified by any
single size and keeps the profile's shape, which the offline sweep over
many sizes measured better than traffic can. Only a variant without a
profile is fitted from its batches alone, through the origin until sizes
spread out.

A variant that is not running keeps its last scale; one that never ran uses
the machine-wide `drift` the caller passes (measured / profiled over every
batch), so that a loaded host slows every candidate's prediction.

Pure: no clock, no threads; time enters as the `dt_s` of `decay`.
"""

from __future__ import annotations

from collections.abc import Sequence

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

    def fit(self) -> tuple[float, float]:
        """(intercept, slope) in ms; through the origin when the sizes seen do not spread enough to tell them apart."""
        s0, s1, s2, t1, t2 = self.s0, self.s1, self.s2, self.t1, self.t2
        det = s0 * s2 - s1 * s1
        if s0 > 0 and det > 1e-6 * s0 * s2:
            slope = (s0 * t2 - s1 * t1) / det
            intercept = (t1 - slope * s1) / s0
            if slope >= MIN_SLOPE_MS and intercept >= 0:
                return intercept, slope
            if slope < MIN_SLOPE_MS:  # flat or falling: all fixed cost
                return max(t1 / s0, 0.0), MIN_SLOPE_MS
        slope = t2 / s2 if s2 > 0 else MIN_SLOPE_MS
        return 0.0, max(slope, MIN_SLOPE_MS)


class BatchLatency:
    """Affine batch latency of one variant, in milliseconds."""

    def __init__(self, batch_sizes: Sequence[int] = (), p50_ms: Sequence[float] = ()) -> None:
        self.profiled = bool(batch_sizes)
        self._profile: tuple[float, float] | None = None
        if self.profiled:
            sums = _Sums()
            for size, ms in zip(batch_sizes, p50_ms, strict=True):
                sums.add(float(size), float(ms))
            self._profile = sums.fit()
        self._measured = 0.0  # decayed sum of measured ms (profiled: of batches whose profiled time is known)
        self._expected = 0.0  # decayed sum of the profile's ms for the same batches
        self._online = _Sums()  # for variants without a profile

    @property
    def measured_weight(self) -> float:
        """How many (decayed) measured batches back the model."""
        return self._online.s0

    def known(self) -> bool:
        """Whether there is anything to predict from: a profile or a measured batch."""
        return self.profiled or self._online.s0 > 0

    def profiled_ms(self, rows: float) -> float | None:
        """The profile's own line at `rows`, before any measurement; None without a profile."""
        if self._profile is None:
            return None
        return self._profile[0] + self._profile[1] * rows

    def scale(self, drift: float = 1.0) -> float:
        """Measured / profiled time: this variant's own once it has run, else `drift`."""
        return self._measured / self._expected if self._expected > 0 else drift

    def line(self, drift: float = 1.0) -> tuple[float, float]:
        """(fixed ms per batch, ms per row)."""
        if self._profile is None:
            return self._online.fit()
        factor = self.scale(drift)
        return self._profile[0] * factor, self._profile[1] * factor

    def ms(self, rows: float, drift: float = 1.0) -> float:
        intercept, slope = self.line(drift)
        return intercept + slope * rows

    def add(self, rows: int, seconds: float, drift: float = 1.0) -> None:
        measured = seconds * 1e3
        if self.known():
            measured = min(measured, OUTLIER_FACTOR * self.ms(rows, drift))
        self._online.add(float(rows), measured)
        profiled = self.profiled_ms(rows)
        if profiled is not None and profiled > 0:
            self._measured += measured
            self._expected += profiled

    def decay(self, dt_s: float, half_life_s: float) -> None:
        factor = 0.5 ** (dt_s / half_life_s)
        self._online.scale(factor)
        self._measured *= factor
        self._expected *= factor
