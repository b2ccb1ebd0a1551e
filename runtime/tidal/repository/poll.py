"""Poll mode: watch the repository folder and load, reload or unload what changed on disk.

A reload builds the new versions beside the old ones and swaps them in when
ready (ModelManager.load), so polling never drops or fails a request. A model
whose files are half-copied fails that load, keeps serving what it had, and
is retried when its files change again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from tidal.errors import TidalError
from tidal.repository import layout
from tidal.repository.manager import ModelManager

log = logging.getLogger(__name__)

Fingerprint = frozenset[tuple[str, int, int]]


def fingerprint(model_dir: Path) -> Fingerprint:
    """Every file under the model folder with its size and modification time."""
    entries = set()
    for dirpath, _, files in os.walk(model_dir):
        for name in files:
            path = Path(dirpath) / name
            with contextlib.suppress(OSError):  # a file removed while walking
                st = path.stat()
                entries.add((str(path.relative_to(model_dir)), st.st_size, st.st_mtime_ns))
    return frozenset(entries)


class RepositoryPoller:
    """Compares the repository with what was last loaded, every `interval_s`."""

    def __init__(self, manager: ModelManager, interval_s: float) -> None:
        self._manager = manager
        self._interval_s = interval_s
        self._known: dict[str, Fingerprint] = {}
        self._task: asyncio.Task | None = None
        self._work: set[asyncio.Task] = set()  # loads and unloads started by the loop and not yet done

    def snapshot(self) -> None:
        """Record the state the start-up load saw, so only later changes trigger reloads."""
        self._known = self._scan()

    def _scan(self) -> dict[str, Fingerprint]:
        """Blocking: walks every file of the repository."""
        root = self._manager.root
        return {name: fingerprint(root / name) for name in layout.list_models(root)}

    async def poll_once(self) -> None:
        """Load or unload every model that changed, and return once they are done."""
        await asyncio.gather(*await self._start_changes())

    async def _start_changes(self) -> list[asyncio.Task]:
        """Start the load or unload of every model that changed. The background loop does not wait for them:
        awaited one after another, a slow or stalled load held back every other model's changes. The manager
        orders the work on one model."""
        current = await asyncio.to_thread(self._scan)  # a large or slow repository must not stall requests
        started = []
        for name in sorted(set(self._known) - set(current)):
            log.info("poll: model %s removed from the repository, unloading", name)
            started.append(self._begin(self._manager.unload(name)))
        for name, print_ in sorted(current.items()):
            if self._known.get(name) == print_:
                continue
            log.info("poll: model %s changed on disk, loading", name)
            started.append(self._begin(self._manager.load(name)))
        self._known = current
        return started

    def _begin(self, work: Coroutine[Any, Any, None]) -> asyncio.Task:
        async def run() -> None:
            try:
                await work
            except TidalError:  # the manager recorded and logged the reason
                pass
            except Exception:
                log.exception("poll: a load or unload failed unexpectedly")

        task = asyncio.create_task(run())
        self._work.add(task)
        task.add_done_callback(self._work.discard)
        return task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self._start_changes()
            except OSError as exc:
                log.error("poll: cannot read the repository: %s", exc)
            except Exception:  # a poll task that dies would silently stop every later reload
                log.exception("poll: failed; trying again in %gs", self._interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="repository-poll")

    async def stop(self) -> None:
        """Stops polling; a load under way goes on in the manager (see ModelManager.close)."""
        for task in [self._task, *self._work]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
