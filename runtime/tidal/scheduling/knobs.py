"""The live knob set: everything the SLO controller may change at run time.

The engine holds one `Knobs` object and reads it at every scheduling step; the
controller never mutates it, it hands a new one to `ModelScheduler.apply`,
which swaps a single reference. A step therefore sees either the old set or
the new one, never a mix, and nothing queued is dropped by the swap.
"""

from __future__ import annotations

from dataclasses import dataclass

from tidal.errors import InvalidArgument
from tidal.types import LevelRoute


@dataclass(frozen=True)
class Knobs:
    """Every field may change live.

    `max_batch_size` may only lower the model's configured limit; 0 or 1 turns
    batching off (one request per execution). `preferred_batch_sizes` above the
    current `max_batch_size` are ignored, which lets the controller lower the
    batch limit without rewriting them.

    `admission_limits` holds (level, limit) pairs: a new request of `level` is
    refused at arrival (RESOURCE_EXHAUSTED) while `limit` or more requests of
    that level or a higher priority are queued; 0 refuses the level entirely,
    and unlisted levels are never refused. The SLO controller sets them to
    shed, lowest priority first, what could not be served in time anyway.
    """

    max_batch_size: int  # rows per execution; 0 or 1 = no batching
    max_queue_delay_us: int  # how long a non-full batch may wait for more rows
    preferred_batch_sizes: tuple[int, ...] = ()
    instance_count: int = 1  # backend instances that may run at once (<= instances loaded)
    active_variant: str = ""  # key into the engine's runners; "" = the first (default) one
    admission_limits: tuple[tuple[int, int], ...] = ()  # (priority level, max queued at or above it)
    route: LevelRoute | None = None  # None: every level shares every instance

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise InvalidArgument(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise InvalidArgument(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.instance_count < 1:
            raise InvalidArgument(f"instance_count must be >= 1, got {self.instance_count}")
        if any(size < 1 for size in self.preferred_batch_sizes):
            raise InvalidArgument(f"preferred batch sizes must be >= 1, got {self.preferred_batch_sizes}")
        levels = [level for level, _ in self.admission_limits]
        if len(set(levels)) != len(levels) or any(lv < 1 or limit < 0 for lv, limit in self.admission_limits):
            raise InvalidArgument(
                f"admission limits need distinct levels >= 1 and limits >= 0, got {self.admission_limits}"
            )
        # Sorted and unique, so the batcher can take the largest with [-1].
        object.__setattr__(self, "preferred_batch_sizes", tuple(sorted(set(self.preferred_batch_sizes))))
