"""Dynamic batching and priority scheduling in front of the backends.

Pure policy: queue.py (admission, cancel, expiry per priority level),
batcher.py (which entries form the next batch), ordering.py (in-order
release), inline.py (which batches run on the loop thread). Machinery:
engine.py (futures, the scheduling step) and threads.py (instance workers,
the precise timer). knobs.py is the live knob set.
"""

from tidal.scheduling.engine import ModelScheduler
from tidal.scheduling.knobs import Knobs
from tidal.scheduling.queue import QueuePolicy, SchedulerConfig, TimeoutAction
from tidal.scheduling.stats import Duration, ModelStats, Observation

__all__ = [
    "Duration",
    "Knobs",
    "ModelScheduler",
    "ModelStats",
    "Observation",
    "QueuePolicy",
    "SchedulerConfig",
    "TimeoutAction",
]
