"""Still pictures of clips for the page: one small JPEG per clip (its command built with ffmpeg-python)."""

from __future__ import annotations

from pathlib import Path

import ffmpeg

from clipchat.media.commands import apply, command
from clipchat.media.ffmpeg import FfmpegRunner
from clipchat.media.probe import probe

THUMBNAIL_WIDTH = 320
# The very first frame is often a fade from black; a moment in shows what the clip is about.
_THUMBNAIL_AT_SECONDS = 1.0


def thumbnail_command(video: Path, at: float, dest: Path) -> list[str]:
    """Write one ``THUMBNAIL_WIDTH`` px wide JPEG of ``video`` at ``at`` seconds to ``dest``."""
    picture = ffmpeg.input(str(video), ss=f"{at:.3f}")["v:0"]
    picture = apply(picture, "scale", THUMBNAIL_WIDTH, -2)  # -2: the height that keeps the aspect, even
    picture = apply(picture, "format", "yuvj420p")
    return command(ffmpeg.output(picture, str(dest), format="image2", update=1, **{"frames:v": 1, "q:v": 4}))


async def render_thumbnail(ffmpeg: FfmpegRunner, video: Path, dest: Path) -> None:
    """Write a 320 px wide JPEG of ``video`` at one second in (or its middle, if shorter) to ``dest``.

    Raises ``MediaError`` when ``video`` cannot be read and ``FfmpegError`` when encoding fails.
    """
    info = await probe(video, label="video")
    at = min(_THUMBNAIL_AT_SECONDS, info.duration / 2)
    await ffmpeg.run(thumbnail_command(video, at, dest), makes="thumbnail")
