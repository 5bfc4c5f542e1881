"""How each generator adapter turns (prompt, duration, aspect ratio) into its model's ``input``.

One row per adapter. Video models take the clip length in whole seconds (Replicate's Kling models
an integer, fal's a string such as ``"5"``), often only some lengths (Kling: 5 or 10 s), so the
length is rounded up to the shortest allowed one that is not shorter than the clip (or the
longest): the composer trims a clip to its slot, it cannot stretch one. A model that takes frames
instead names ``frames`` and its ``fps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class InputMapping:
    """The input field names of one adapter and the form its duration takes."""

    prompt: str = "prompt"
    duration: str | None = "duration"
    duration_as: Literal["seconds", "whole_seconds", "whole_seconds_text"] = "seconds"
    durations: tuple[int, ...] = ()  # the whole-second lengths the model takes; () = any
    frames: str | None = None
    fps: int = 24
    aspect_ratio: str | None = None

    def build(self, prompt: str, duration: float, aspect_ratio: str) -> dict[str, Any]:
        """The model input for ``prompt`` and a clip of ``duration`` seconds."""
        data: dict[str, Any] = {self.prompt: prompt}
        if self.duration is not None:
            whole = math.ceil(duration - 1e-9)
            if self.durations:
                whole = min((d for d in self.durations if d >= whole), default=max(self.durations))
            data[self.duration] = {"seconds": duration, "whole_seconds": whole,
                                   "whole_seconds_text": str(whole)}[self.duration_as]
        if self.frames is not None:
            data[self.frames] = math.ceil(duration * self.fps - 1e-9)
        if self.aspect_ratio is not None and aspect_ratio:
            data[self.aspect_ratio] = aspect_ratio
        return data


INPUT_MAPPINGS: dict[str, InputMapping] = {
    # ClipChat's generic prediction protocol: the duration as given.
    "http": InputMapping(),
    # e.g. kwaivgi/kling-v2.1: {"prompt", "duration": 5 | 10, "aspect_ratio"}.
    "replicate": InputMapping(duration_as="whole_seconds", durations=(5, 10), aspect_ratio="aspect_ratio"),
    # e.g. fal-ai/kling-video/v2.1/standard/text-to-video: {"prompt", "duration": "5" | "10", "aspect_ratio"}.
    "fal": InputMapping(duration_as="whole_seconds_text", durations=(5, 10), aspect_ratio="aspect_ratio"),
}
