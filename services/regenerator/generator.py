"""Video generation: one interface, a local ffmpeg renderer and an HTTP prediction API behind it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Protocol

# Called with the fraction done (0..1) while a clip is generated.
ProgressFn = Callable[[float], Awaitable[None]]


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
    """

    name: str

    async def generate(self, prompt: str, duration: float, dest: Path, *,
                       on_progress: ProgressFn | None = None) -> GeneratedClip: ...

    def estimate_cost(self, duration: float) -> Decimal:
        """What generating ``duration`` seconds is expected to cost, before anything is spent."""
        ...
