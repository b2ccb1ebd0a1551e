"""The loop that runs the controller: observe every plant, step, apply what changed.

It knows models only as `Plant`s, which the composition root builds from
the schedulers it owns, so this package never imports the scheduler.
Runs on the event loop as one task; every call into a plant happens there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from tidal.clock import Clock
from tidal.control.api import DEFAULT_PERIOD_S, Decision, ModelInfo, Setpoint, Slo
from tidal.control.slo import SloController
from tidal.types import Observation

log = logging.getLogger(__name__)


class Plant(Protocol):
    """One served model version under control."""

    key: str  # stable across periods; a reload brings a new plant with the same key
    generation: object  # changes when the model is reloaded, so its memory starts afresh

    def info(self) -> ModelInfo: ...

    def configured_slo(self) -> Slo: ...

    def observe(self) -> Observation: ...

    def setpoint(self) -> Setpoint: ...

    def apply(self, setpoint: Setpoint) -> None:
        """Put the setpoint in force; may raise TidalError, which the loop logs and survives."""
        ...


class ControlLoop:
    """Steps each plant once per its own control period."""

    def __init__(
        self,
        controller: SloController,
        plants: Callable[[], Iterable[Plant]],
        clock: Clock,
        on_decision: Callable[[Plant, Decision], None] = lambda plant, decision: None,
    ) -> None:
        self.controller = controller
        self._plants = plants
        self._clock = clock
        self._on_decision = on_decision
        self._generations: dict[str, object] = {}
        self._due: dict[str, float] = {}
        self._failing: set[str] = set()

    def tick(self) -> float:
        """Step every plant whose period is up; returns the seconds until the next one is due."""
        now = self._clock.now()
        seen = set()
        wait = DEFAULT_PERIOD_S
        for plant in self._plants():
            seen.add(plant.key)
            try:
                wait = min(wait, self._tick_plant(plant, now))
                self._failing.discard(plant.key)
            except Exception:  # one model's failure must not stop the others' control, nor the loop
                if plant.key not in self._failing:  # once per run of failures, not every period
                    self._failing.add(plant.key)
                    log.exception("controller %s: step failed; its knobs stay as they are", plant.key)
        for key in set(self._generations) - seen:
            self.controller.forget(key)
            del self._generations[key], self._due[key]
            self._failing.discard(key)
        return max(wait, 0.001)

    def adopt(self) -> None:
        """Track every plant new since the last tick (a load, a reload) at once, not at the next tick. Until
        then a SetSlo answered after a reload went to the old generation's memory, and that tick replaced it
        with the configured SLO: an OK, then lost. A plant that fails here is left to the tick, which logs it."""
        now = self._clock.now()
        for plant in self._plants():
            with contextlib.suppress(Exception):
                self._adopt(plant, now)

    def _adopt(self, plant: Plant, now: float) -> None:
        key = plant.key
        if self._generations.get(key) is not plant.generation:
            self.controller.track(key, plant.info(), plant.configured_slo())
            self._generations[key] = plant.generation
            self._due[key] = now

    def _tick_plant(self, plant: Plant, now: float) -> float:
        """Step `plant` if its period is up; the seconds until it is due again."""
        key = plant.key
        self._adopt(plant, now)
        if now >= self._due[key]:
            self._due[key] = max(self._due[key] + self.controller.slo(key).period_s, now)
            self._step(plant)
        return self._due[key] - now

    def _step(self, plant: Plant) -> None:
        active = plant.setpoint()
        decision = self.controller.step(plant.key, plant.observe(), active)
        if decision.changed:
            log.info(
                "controller %s: %s: %s", plant.key, decision.reason.value, decision.detail,
                extra={"model": plant.key, "reason": decision.reason.value},
            )
            plant.apply(decision.setpoint)
        self._on_decision(plant, decision)

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            await asyncio.sleep(self.tick())
