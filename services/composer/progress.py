"""Progress of one composition: a stage, the fraction of the whole done, and an ETA.

Work runs concurrently (several segments encode at once), so progress is kept as work done per
stage, each stage weighted by a rough cost estimate. The reported stage is the first one not yet
finished, so stages are reported in order, each at least once, however the work interleaves.
Reports are throttled (a step of 1 %, or a change of stage) and never go backwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Literal

Stage = Literal["downloading", "normalizing", "transitions", "encoding", "muxing", "uploading"]
STAGES: tuple[Stage, ...] = ("downloading", "normalizing", "transitions", "encoding", "muxing", "uploading")

# Called with (stage, fraction of the whole composition 0..1, estimated seconds left or None).
ProgressFn = Callable[[str, float, float | None], Awaitable[None]]
# Called with the fraction (0..1) of one piece of work done.
FractionFn = Callable[[float], Awaitable[None]]

_MIN_STEP = 0.01
# The ETA is a guess until this much is done.
_ETA_FROM = 0.05


class ProgressTracker:
    """Turns pieces of work done into throttled ``(stage, fraction, eta)`` reports."""

    def __init__(self, on_progress: ProgressFn | None, *, started: float) -> None:
        self._on_progress = on_progress
        self._started = started
        self._total: dict[Stage, float] = dict.fromkeys(STAGES, 0.0)
        self._done: dict[Stage, float] = dict.fromkeys(STAGES, 0.0)
        self._reported_stage = -1
        self._reported_fraction = 0.0
        self._lock = asyncio.Lock()

    def plan(self, stage: Stage, cost: float) -> None:
        """Add ``cost`` (any unit, the same for every stage) of work to ``stage``."""
        self._total[stage] += cost

    def piece(self, stage: Stage, cost: float) -> FractionFn:
        """A callback for one planned piece of ``stage`` costing ``cost``; it takes the fraction done."""
        reached = 0.0

        async def update(fraction: float) -> None:
            nonlocal reached
            fraction = min(1.0, max(0.0, fraction))
            if fraction > reached:
                self._done[stage] += cost * (fraction - reached)
                reached = fraction
                await self.report()

        return update

    async def finish(self, stage: Stage) -> None:
        """Mark all of ``stage`` done (work that turned out not to be needed counts as done)."""
        self._done[stage] = self._total[stage]
        await self.report()

    async def report(self) -> None:
        if self._on_progress is None:
            return
        async with self._lock:
            current = self._current_stage()
            fraction = max(self._reported_fraction, self._fraction())
            if current == self._reported_stage and fraction < min(1.0, self._reported_fraction + _MIN_STEP):
                return
            elapsed = time.monotonic() - self._started
            eta = elapsed * (1 - fraction) / fraction if fraction >= _ETA_FROM else None
            # Every stage is reported, in order, even one with nothing to do.
            for index in range(self._reported_stage + 1, current + 1):
                await self._on_progress(STAGES[index], fraction, eta)
            if current == self._reported_stage:
                await self._on_progress(STAGES[current], fraction, eta)
            self._reported_stage = current
            self._reported_fraction = fraction

    def _fraction(self) -> float:
        total = sum(self._total.values())
        return sum(self._done.values()) / total if total else 0.0

    def _current_stage(self) -> int:
        for index, stage in enumerate(STAGES):
            if self._done[stage] < self._total[stage] - 1e-9:
                return index
        return len(STAGES) - 1
