"""Still pictures of clips for the page: one small JPEG per clip."""

from __future__ import annotations

from pathlib import Path

from clipchat.media.ffmpeg import FfmpegRunner
from clipchat.media.probe import probe

THUMBNAIL_WIDTH = 320
# The very first frame is often a fade from black; a moment in shows what the clip is about.
_THUMBNAIL_AT_SECONDS = 1.0


async def render_thumbnail(ffmpeg: FfmpegRunner, video: Path, dest: Path) -> None:
    """Write a 320 px wide JPEG of ``video`` at one second in (or its middle, if shorter) to ``dest``.

    Raises ``MediaError`` when ``video`` cannot be read and ``FfmpegError`` when encoding fails.
    """
    info = await probe(video, label="video")
    at = min(_THUMBNAIL_AT_SECONDS, info.duration / 2)
    await ffmpeg.run(["-ss", f"{at:.3f}", "-i", str(video), "-map", "0:v:0", "-frames:v", "1",
                      "-vf", f"scale={THUMBNAIL_WIDTH}:-2,format=yuvj420p", "-q:v", "4",
                      "-f", "image2", "-update", "1", str(dest)], makes="thumbnail")
