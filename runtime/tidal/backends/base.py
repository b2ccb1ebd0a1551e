"""The Backend protocol every execution engine implements.

Ownership and threading contract:
- A backend object is one *instance* of one model file (Triton's instance
  group count N means N backend objects). The scheduler owns it.
- `run` is called from the instance's worker thread, or on the event loop's
  thread for batches measured to take under a millisecond while requests
  arrive one at a time (scheduling/inline.py); never concurrently on the same
  instance. It must release the GIL while computing where the engine allows
  (ONNX Runtime and the int8 kernels do).
- `run` receives whole batches: every input has the batch along dim 0 when
  the model batches. It returns exactly the outputs named, as numpy arrays
  whose dim 0 equals the batch's.
- `close` is called once, after the last `run` has returned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from tidal.types import TensorSpec


@dataclass(frozen=True, slots=True)
class Accelerator:
    """An optimization.execution_accelerators entry (Triton's way to ask ONNX Runtime for TensorRT)."""

    name: str  # e.g. tensorrt
    parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BackendOptions:
    """Per-instance settings taken from the model config and the instance's placement."""

    instance_index: int = 0
    device: str = "cpu"  # cpu | gpu
    device_id: int = 0  # the CUDA device number when device is gpu
    max_batch_size: int = 0  # 0: the model does not batch; GPU engines size their shapes from it
    opt_batch_size: int = 0  # the batch size engines tune for (the largest preferred one); 0: max_batch_size
    gpu_accelerators: tuple[Accelerator, ...] = ()
    cache_dirs: tuple[Path, ...] = ()  # where built engines are looked for, in order; the last one is written
    intra_op_threads: int = 0  # 0: let the engine decide
    inter_op_threads: int = 0
    graph_optimization_level: str = "all"  # disable | basic | extended | all
    allow_spinning: bool = False  # spinning threads steal cores from the gRPC server
    parameters: Mapping[str, str] = field(default_factory=dict)

    @property
    def opt_batch(self) -> int:
        return min(self.opt_batch_size or self.max_batch_size, self.max_batch_size) or 1


class Backend(Protocol):
    def inputs(self) -> list[TensorSpec]:
        """Inputs as the model file declares them (dim 0 included)."""
        ...

    def outputs(self) -> list[TensorSpec]:
        ...

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        """Execute one batch; raise tidal.errors.BackendError on failure."""
        ...

    def close(self) -> None:
        ...


BackendFactory = Callable[[Path, BackendOptions], Backend]
