"""Video generation: one interface, a local ffmpeg renderer and an HTTP prediction API behind it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Protocol

# Called with the fraction done (0..1) while a clip is generated.
ProgressFn = Callable[[float], Awaitable[None]]
# Called with the provider's prediction id once a paid prediction exists, before it is polled.
StartedFn = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class GeneratedClip:
    path: Path  # local MP4 file, written completely
    duration: float  # seconds, as probed
    cost: Decimal  # what the provider charged (0 for the local renderer)
    provider_id: str = ""  # the provider's prediction id, for support


class VideoGenerator(Protocol):
    """Renders one clip for a prompt.

    Raises ``clipchat.errors.TransientError`` for failures a retry may fix (timeouts, 5xx, 429)
    and ``clipchat.errors.InvalidInput`` / ``MediaError`` for permanent ones (content policy,
    invalid prompt). Cancelling the awaiting task cancels the work (and the remote prediction).

    So that paid work is never paid twice, a paid generator
    - sends ``idempotency_key`` with the request that starts the paid work: a repeat with the same
      key (after a lost answer, or by another worker) gets the same prediction, not a new one;
    - awaits ``on_started(provider_id)`` as soon as that prediction exists, so the caller can
      record the id durably; if ``on_started`` raises, the prediction is cancelled and the error
      propagates;
    - given ``resume_id`` (an id an earlier ``on_started`` recorded), follows that prediction
      instead of starting one, without calling ``on_started`` again; a prediction the provider no
      longer knows is started anew (with ``idempotency_key``).
    A free generator accepts and ignores these three arguments.
    """

    name: str

    async def generate(self, prompt: str, duration: float, dest: Path, *,
                       on_progress: ProgressFn | None = None, idempotency_key: str = "",
                       resume_id: str = "", on_started: StartedFn | None = None) -> GeneratedClip: ...

    def estimate_cost(self, duration: float) -> Decimal:
        """What generating ``duration`` seconds is expected to cost, before anything is spent."""
        ...
