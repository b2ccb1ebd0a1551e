"""NativeFrontend's side of the contract: every drained call ends exactly once, whatever ends its task."""

from __future__ import annotations

import asyncio
import os
import time

import grpc

from tidal.errors import NotFound
from tidal.transport.native import NativeFrontend


class _Native:
    """The part of tidal._frontend.Frontend that NativeFrontend drives, recording how each call ended."""

    def __init__(self, arrived: list, gone: list) -> None:
        self._batches = [(arrived, gone)]
        self.ended: dict[int, list] = {}
        self._reader, self.writer = os.pipe()

    def start(self) -> int:
        return 0

    def fileno(self) -> int:
        return self._reader

    def tick(self) -> None:
        pass

    def drain(self):
        os.read(self._reader, 64)
        return self._batches.pop() if self._batches else ([], [])

    def answer(self, call_id: int, response: bytes) -> bool:
        self.ended.setdefault(call_id, []).append(("OK", response))
        return True

    def refuse(self, call_id: int, code: int, message: str, pushback_ms: str) -> bool:
        self.ended.setdefault(call_id, []).append((code, message, pushback_ms))
        return True


class _Servicer:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def infer_payload(self, payload: bytes, remaining_s: float | None):
        if payload == b"missing":
            return NotFound("model 'missing' is not in the repository")
        await self.release.wait()
        return b"answer:" + payload


def test_each_call_ends_once_even_when_cancelled_before_its_task_ran() -> None:
    native = _Native([(1, b"a", None, None), (2, b"missing", time.monotonic() + 10, None), (3, b"b", None, None)], [1])
    asyncio.run(asyncio.wait_for(_serve_all(native), 10))
    cancelled = grpc.StatusCode.CANCELLED.value[0]
    assert native.ended == {
        1: [(cancelled, "cancelled by the client", "")],  # arrived and cancelled in one drain: its task never ran
        2: [(grpc.StatusCode.NOT_FOUND.value[0], "model 'missing' is not in the repository", "")],
        3: [("OK", b"answer:b")],
    }


async def _serve_all(native: _Native) -> None:
    servicer = _Servicer()
    frontend = NativeFrontend(servicer, native, None)
    assert frontend.start() == 0
    os.write(native.writer, b"x")  # calls are waiting
    while native.ended.keys() != {1, 2}:
        await asyncio.sleep(0.001)
    servicer.release.set()
    while len(native.ended) < 3:
        await asyncio.sleep(0.001)
