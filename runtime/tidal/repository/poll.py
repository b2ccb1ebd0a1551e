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
from pathlib import Path

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

    def snapshot(self) -> None:
        """Record the state the start-up load saw, so only later changes trigger reloads."""
        self._known = self._scan()

    def _scan(self) -> dict[str, Fingerprint]:
        """Blocking: walks every file of the repository."""
        root = self._manager.root
        return {name: fingerprint(root / name) for name in layout.list_models(root)}

    async def poll_once(self) -> None:
        current = await asyncio.to_thread(self._scan)  # a large or slow repository must not stall requests
        for name in sorted(set(self._known) - set(current)):
            log.info("poll: model %s removed from the repository, unloading", name)
            with contextlib.suppress(TidalError):
                await self._manager.unload(name)
        for name, print_ in sorted(current.items()):
            if self._known.get(name) == print_:
                continue
            log.info("poll: model %s changed on disk, loading", name)
            with contextlib.suppress(TidalError):  # the manager recorded and logged the reason
                await self._manager.load(name)
        self._known = current

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.poll_once()
            except OSError as exc:
                log.error("poll: cannot read the repository: %s", exc)
            except Exception:  # a poll task that dies would silently stop every later reload
                log.exception("poll: failed; trying again in %gs", self._interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="repository-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
