"""Load processes: the coordinator drives N `LoadWorker`s through one interface.

With one worker it runs on the coordinator's own event loop (no IPC); with
more, each is a spawned process with its own event loop and channel, driven
over a pipe with the same four verbs (start, window, stop, close). Spawn,
not fork: gRPC's core does not survive a fork of a process that used it.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import uvloop

from tidal.bench.client import Target
from tidal.bench.load import Load, LoadWorker, WorkerWindow, split_load
from tidal.bench.spec import TrafficClass
from tidal.errors import Unavailable


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """Everything a load process needs, built once by the coordinator; picklable."""

    target: Target
    classes: list[TrafficClass]
    payloads: dict[tuple[int, int], bytes]
    request_timeout_s: float
    max_inflight: int
    seed: int

    def worker(self, index: int) -> LoadWorker:
        return LoadWorker(self.target, self.classes, self.payloads, self.request_timeout_s,
                          self.max_inflight, self.seed + index)


async def _serve(conn: Connection, setup: WorkerSetup, index: int) -> None:
    loop = asyncio.get_running_loop()
    worker = setup.worker(index)
    reply: Any = None
    try:
        await worker.open()
    except Exception as exc:  # reported to the coordinator, which raises it there
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    while True:
        verb, arg = await loop.run_in_executor(None, conn.recv)
        if verb == "start":
            worker.start(arg)
        elif verb == "window":
            reply = worker.window()
        elif verb == "stop":
            reply = await worker.stop(arg)
        elif verb == "close":
            await worker.close()
            conn.send(("ok", None))
            return
        conn.send(("ok", reply))
        reply = None


def _process_main(conn: Connection, setup: WorkerSetup, index: int) -> None:
    uvloop.run(_serve(conn, setup, index))


class _Remote:
    def __init__(self, setup: WorkerSetup, index: int) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_process_main, args=(child, setup, index), daemon=True)
        self._proc.start()
        child.close()

    async def call(self, verb: str | None, arg: Any = None) -> Any:
        """Sends a verb (None: only awaits the next reply) and returns the worker's answer."""
        loop = asyncio.get_running_loop()
        if verb is not None:
            await loop.run_in_executor(None, self._conn.send, (verb, arg))
        try:
            status, value = await loop.run_in_executor(None, self._conn.recv)
        except EOFError:
            raise Unavailable(f"load process {self._proc.pid} died (exit code {self._proc.exitcode})") from None
        if status == "error":
            raise Unavailable(f"load process failed: {value}")
        return value

    def join(self) -> None:
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()


class WorkerPool:
    """The load processes of one run; each verb fans out to all and gathers the answers."""

    def __init__(self, setup: WorkerSetup, count: int) -> None:
        self._count = count
        self._local = setup.worker(0) if count == 1 else None
        self._remotes = [_Remote(setup, i) for i in range(count)] if count > 1 else []

    async def open(self) -> None:
        if self._local is not None:
            await self._local.open()
        else:
            await asyncio.gather(*(r.call(None) for r in self._remotes))

    async def start(self, load: Load) -> None:
        if self._local is not None:
            self._local.start(load)
        else:
            shares = split_load(load, self._count)
            await asyncio.gather(*(r.call("start", s) for r, s in zip(self._remotes, shares, strict=True)))

    async def window(self) -> list[WorkerWindow]:
        if self._local is not None:
            return [self._local.window()]
        return list(await asyncio.gather(*(r.call("window") for r in self._remotes)))

    async def stop(self, drain_timeout_s: float) -> list[WorkerWindow]:
        if self._local is not None:
            return [await self._local.stop(drain_timeout_s)]
        return list(await asyncio.gather(*(r.call("stop", drain_timeout_s) for r in self._remotes)))

    async def close(self) -> None:
        if self._local is not None:
            await self._local.close()
            return
        try:
            await asyncio.gather(*(r.call("close") for r in self._remotes), return_exceptions=True)
        finally:
            for r in self._remotes:
                r.join()
