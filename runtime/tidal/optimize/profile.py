"""Latency profiles: how long one batch takes, per batch size, per backend.

Each point loads the variant through the serving backend with the settings
recorded next to the numbers (instances, intra-op threads, spinning off as
when serving next to the gRPC server on shared cores), warms it up, then runs
batches until both a minimum count and a minimum time are reached. With
several instances, each runs in its own thread at once, like instance_group
count N, and throughput counts the rows of all of them (at the median batch time).
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tidal import backends
from tidal.backends import hardware as host
from tidal.backends.base import Backend, BackendOptions
from tidal.errors import ConfigError
from tidal.repository.variants import Hardware, LatencyProfile
from tidal.types import DataType, TensorSpec


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    max_batch_size: int
    instances: int = 1
    intra_op_threads: int = 0  # 0: every core this process may use, split across instances
    seconds_per_point: float = 0.3
    min_runs: int = 20
    warmup_runs: int = 3

    def batch_sizes(self) -> tuple[int, ...]:
        """1, 2, 4, ... up to max_batch_size, which is always included."""
        sizes, b = [], 1
        while b < self.max_batch_size:
            sizes.append(b)
            b *= 2
        return (*sizes, max(self.max_batch_size, 1))

    def threads(self) -> int:
        cores = host.cpu_info().cores
        return self.intra_op_threads or max(1, cores // max(self.instances, 1))


def current_hardware() -> Hardware:
    cpu = host.cpu_info()
    return Hardware(
        cpu_model=cpu.model,
        cores=cpu.cores,
        isa_flags=cpu.isa_flags,
        gpus=tuple(g.name for g in host.gpus()),
    )


def synthetic_batch(specs: list[TensorSpec], rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the declared shapes: dense kernels take the same time whatever the values."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = (rows, *(d if d > 0 else 1 for d in spec.shape[1:]))
        if spec.datatype is DataType.BYTES:
            raise ConfigError(f"cannot profile string input '{spec.name}' with synthetic data")
        if spec.datatype.np_dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.datatype.np_dtype)
        else:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(spec.datatype.np_dtype)
    return feeds


def measure(
    path: Path,
    backend: str,
    settings: ProfileSettings,
    on_point: Callable[[int], None] | None = None,
    device: str = "cpu",
) -> LatencyProfile:
    """Profile the model at `path` on `backend` on this host's CPU or its first GPU (CUDA device 0), as a
    served instance there runs it; ConfigError if that backend cannot load it there."""
    threads = settings.threads()
    options = [
        BackendOptions(instance_index=i, device=device, intra_op_threads=threads, allow_spinning=False,
                       max_batch_size=settings.max_batch_size)
        for i in range(settings.instances)
    ]
    load = backends.factory(backend, device)
    runners = []
    try:
        for opt in options:
            runners.append(load(Path(path), opt))
        sizes = settings.batch_sizes()
        points = []
        for size in sizes:
            points.append(_point(runners, size, settings))
            if on_point is not None:
                on_point(size)
    finally:
        for runner in runners:
            runner.close()
    return LatencyProfile(
        batch_sizes=sizes,
        p50_ms=tuple(p[0] for p in points),
        p99_ms=tuple(p[1] for p in points),
        throughput_rps=tuple(p[2] for p in points),
        instances=settings.instances,
        intra_op_threads=threads,
        allow_spinning=False,
        measured_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        hardware=current_hardware(),
    )


def _point(runners: list[Backend], size: int, settings: ProfileSettings) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, rows/s) of batches of `size` rows on all instances at once."""
    feeds = synthetic_batch(runners[0].inputs(), size)
    outputs = [s.name for s in runners[0].outputs()]
    samples: list[list[float]] = [[] for _ in runners]

    def loop(runner: Backend, out: list[float]) -> None:
        for _ in range(settings.warmup_runs):
            runner.run(feeds, outputs)
        start = time.perf_counter()
        while len(out) < settings.min_runs or time.perf_counter() - start < settings.seconds_per_point:
            t0 = time.perf_counter()
            runner.run(feeds, outputs)
            out.append(time.perf_counter() - t0)

    if len(runners) == 1:
        loop(runners[0], samples[0])
    else:
        workers = [threading.Thread(target=loop, args=(r, s)) for r, s in zip(runners, samples, strict=True)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    latencies = np.concatenate([np.asarray(s) for s in samples])
    p50 = float(np.percentile(latencies, 50))
    # From the median, with the instances side by side: a neighbour's burst on shared cores
    # moves the mean of a short window far more than the typical batch time clients see.
    rows_per_s = size * len(runners) / p50
    return round(p50 * 1e3, 5), round(float(np.percentile(latencies, 99)) * 1e3, 5), round(rows_per_s, 1)
