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

    def close(self) -> None:
        os.close(self._reader)
        os.close(self.writer)

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
        if payload == b"bug":
            raise RuntimeError("a bug outside the data plane")
        await self.release.wait()
        return b"answer:" + payload


def test_each_call_ends_once_even_when_cancelled_before_its_task_ran() -> None:
    arrived = [(1, b"a", None, None), (2, b"missing", time.monotonic() + 10, None), (3, b"b", None, None),
               (4, b"bug", None, None)]
    native = _Native(arrived, [1])
    try:
        asyncio.run(asyncio.wait_for(_serve_all(native), 10))
    finally:
        native.close()
    cancelled = grpc.StatusCode.CANCELLED.value[0]
    assert native.ended == {
        1: [(cancelled, "cancelled by the client", "")],  # arrived and cancelled in one drain: its task never ran
        2: [(grpc.StatusCode.NOT_FOUND.value[0], "model 'missing' is not in the repository", "")],
        3: [("OK", b"answer:b")],
        4: [(grpc.StatusCode.UNKNOWN.value[0], "internal error (see the server's log)", "")],  # as grpcio answers
    }


async def _serve_all(native: _Native) -> None:
    servicer = _Servicer()
    frontend = NativeFrontend(servicer, native, None)
    assert frontend.start() == 0
    os.write(native.writer, b"x")  # calls are waiting
    while native.ended.keys() != {1, 2, 4}:
        await asyncio.sleep(0.001)
    servicer.release.set()
    while len(native.ended) < 4:
        await asyncio.sleep(0.001)
