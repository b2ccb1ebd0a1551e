"""Release answers in admission order (`preserve_ordering`).

Pure bookkeeping: with several backend instances a later batch may finish
first; its answers wait here until every earlier admitted request has been
answered or has left. Requests that never ran (cancelled, expired, drained)
leave at once and never hold the others back.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

T = TypeVar("T")

_PENDING = object()


class InOrder(Generic[T]):
    def __init__(self) -> None:
        self._slots: OrderedDict[int, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self._slots)

    def add(self, seq: int) -> None:
        """Reserve a place; seqs must be added in increasing order."""
        self._slots[seq] = _PENDING

    def resolve(self, seq: int, item: T) -> list[T]:
        """Record `seq`'s answer; returns every answer now releasable, in order."""
        self._slots[seq] = item
        return self._release()

    def drop(self, seq: int) -> list[T]:
        """`seq` leaves without an ordered answer; returns what its leaving releases."""
        if seq not in self._slots:
            return []
        del self._slots[seq]
        return self._release()

    def _release(self) -> list[T]:
        ready: list[T] = []
        slots = self._slots
        while slots:
            seq, item = next(iter(slots.items()))
            if item is _PENDING:
                break
            del slots[seq]
            ready.append(item)  # type: ignore[arg-type]
        return ready
