"""Scrapes what a tidal server's controller is doing from its Prometheus endpoint.

Reads `tidal_batch_size` (histogram), `tidal_queue_depth{model,priority}`,
`tidal_active_variant{model,variant}` (1 marks the active variant) and the
server's `tidal_saturation{model=""}`.
Only the models under load count. Any metric may be absent (another
server, an older tidal): the sample then lacks that part, and an
unreachable endpoint yields None.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

_BATCH = "tidal_batch_size"
_QUEUE = "tidal_queue_depth"
_VARIANT = "tidal_active_variant"
_SATURATION = "tidal_saturation"


class MetricsScraper:
    """Samples the endpoint once per tick; batch size is the mean over the interval since the last sample."""

    def __init__(self, url: str, models: list[str], timeout_s: float = 1.0) -> None:
        self.url = url
        self._models = set(models)
        self._timeout_s = timeout_s
        self._last_batch: tuple[float, float] | None = None
        self.error: str | None = None
        self.samples = 0

    def _fetch(self) -> str | None:
        try:
            with urllib.request.urlopen(self.url, timeout=self._timeout_s) as resp:
                return resp.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.error = str(getattr(exc, "reason", exc))
            return None

    async def sample(self) -> dict[str, Any] | None:
        text = await asyncio.to_thread(self._fetch)
        if text is None:
            return None
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError as exc:
            self.error = f"unparsable metrics: {exc}"
            return None
        self.samples += 1
        return self.parse(families)

    def parse(self, families: list[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        batch_sum = batch_count = 0.0
        seen_batch = False
        for family in families:
            for s in family.samples:
                model = s.labels.get("model", "")
                if s.name == _SATURATION and model == "":
                    out["saturation"] = s.value  # the server's: what an autoscaler reads
                if model not in self._models:
                    continue
                if s.name == f"{_BATCH}_sum":
                    batch_sum += s.value
                    seen_batch = True
                elif s.name == f"{_BATCH}_count":
                    batch_count += s.value
                elif s.name == _QUEUE:
                    depth = out.setdefault("queue_depth", {})
                    key = f"{model}/p{s.labels.get('priority', '0')}"
                    depth[key] = depth.get(key, 0.0) + s.value
                elif s.name == _VARIANT and s.value >= 1 and s.labels.get("variant"):
                    out.setdefault("active_variant", {})[model] = s.labels.get("variant", "")
        if seen_batch:
            out["batch_size_mean"] = self._interval_mean(batch_sum, batch_count)
        return out

    def _interval_mean(self, total: float, count: float) -> float | None:
        last, self._last_batch = self._last_batch, (total, count)
        if last is None:
            return total / count if count else None
        d_count = count - last[1]
        return (total - last[0]) / d_count if d_count > 0 else None
