"""Progress: stages in order, each at least once, fractions that never go back, an ETA."""

from __future__ import annotations

import time

from services.composer.progress import STAGES, ProgressTracker


async def test_stages_are_reported_in_order_even_when_work_interleaves() -> None:
    events: list[tuple[str, float, float | None]] = []

    async def on_progress(stage: str, fraction: float, eta: float | None) -> None:
        events.append((stage, fraction, eta))

    tracker = ProgressTracker(on_progress, started=time.monotonic())
    tracker.plan("downloading", 1)
    tracker.plan("normalizing", 10)
    tracker.plan("transitions", 5)
    tracker.plan("muxing", 1)
    tracker.plan("uploading", 1)
    await tracker.report()
    await tracker.piece("downloading", 1)(1.0)
    body, transition = tracker.piece("normalizing", 10), tracker.piece("transitions", 5)
    await transition(0.5)  # a transition runs beside a clip body
    await body(0.5)
    await transition(1.0)
    await body(0.4)  # late or repeated reports never move it back
    await body(1.0)
    for stage in ("encoding", "muxing", "uploading"):
        await tracker.finish(stage)  # type: ignore[arg-type]

    stages = [stage for stage, _, _ in events]
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == list(STAGES)
    fractions = [fraction for _, fraction, _ in events]
    assert fractions == sorted(fractions)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert events[-1][2] is not None and events[-1][2] == 0.0


async def test_small_steps_are_not_reported() -> None:
    events: list[float] = []

    async def on_progress(stage: str, fraction: float, eta: float | None) -> None:
        events.append(fraction)

    tracker = ProgressTracker(on_progress, started=time.monotonic())
    tracker.plan("normalizing", 1000)
    piece = tracker.piece("normalizing", 1000)
    for step in range(1, 1001):
        await piece(step / 1000)

    assert 90 <= len(events) <= 110  # about one a percent, not a thousand


async def test_without_a_callback_nothing_happens() -> None:
    tracker = ProgressTracker(None, started=time.monotonic())
    tracker.plan("muxing", 1)
    await tracker.piece("muxing", 1)(1.0)
