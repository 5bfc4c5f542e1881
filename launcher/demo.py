"""The demo job: six generated clips and a music track with a steady beat, uploaded through the API."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import httpx

from clipchat.media.ffmpeg import FfmpegRunner
from services.regenerator.local_generator import LocalVideoGenerator

DEMO_TITLE = "Rooftop Dreams (demo)"
DEMO_PROMPTS = [
    "a dancer spinning on a city rooftop on a sunny afternoon",
    "wide shot of the city skyline at sunset, golden light",
    "close-up of the dancer's shoes tapping on wet concrete",
    "the dancer leaping between rooftops on a sunny afternoon",
    "neon signs flickering in a quiet street, slow pan",
    "the dancer bowing as the sun sets over the ocean",
]
CLIP_SECONDS = 4.0
BPM = 120


async def render_demo_media(folder: Path, ffmpeg: FfmpegRunner) -> tuple[list[Path], Path, list[float]]:
    """Render the demo's clips and its music (a kick on every beat, a tone under it)."""
    generator = LocalVideoGenerator(ffmpeg)
    clips = []
    for index, prompt in enumerate(DEMO_PROMPTS):
        clip = await generator.generate(prompt, CLIP_SECONDS, folder / f"clip{index}.mp4")
        clips.append(clip.path)
    total = CLIP_SECONDS * len(DEMO_PROMPTS)
    beat = 60.0 / BPM
    music = folder / "music.m4a"
    # A kick drum (decaying 55 Hz sine) on each beat over a soft chord; numbers only, no text.
    expression = (f"0.6*sin(2*PI*55*t)*exp(-18*mod(t,{beat}))"
                  f"+0.08*sin(2*PI*220*t)+0.06*sin(2*PI*277.18*t)+0.05*sin(2*PI*329.63*t)")
    await ffmpeg.run(["-f", "lavfi", "-i", f"aevalsrc=exprs='{expression}':s=48000:c=stereo:d={total}",
                      "-c:a", "aac", "-b:a", "160k", str(music)], expected_duration=total)
    beats = [round(i * beat, 3) for i in range(int(total / beat))]
    return clips, music, beats


async def create_demo_job(client: httpx.AsyncClient, ffmpeg: FfmpegRunner) -> dict[str, Any]:
    """Upload the demo job through ``POST /api/v1/jobs``; returns the job JSON (202)."""
    with tempfile.TemporaryDirectory(prefix="clipchat-demo-") as tmp:
        clips, music, beats = await render_demo_media(Path(tmp), ffmpeg)
        manifest = {
            "title": DEMO_TITLE,
            "clips": [{"prompt": p, "duration": CLIP_SECONDS} for p in DEMO_PROMPTS],
            "transitions": [{"kind": "cut", "duration": 0} for _ in DEMO_PROMPTS[1:]],
            "beat_timestamps": beats,
            "aspect_ratio": "16:9",
        }
        files: list[tuple[str, tuple[str, bytes, str]]] = [
            ("clips", (path.name, path.read_bytes(), "video/mp4")) for path in clips]
        files.append(("audio", (music.name, music.read_bytes(), "audio/mp4")))
        response = await client.post("/api/v1/jobs", data={"manifest": json.dumps(manifest)}, files=files,
                                     timeout=120)
        if response.status_code != 202:
            raise RuntimeError(error_line(response))
        return dict(response.json())


def error_line(response: httpx.Response) -> str:
    """The API's error as one readable line."""
    try:
        error = response.json()["error"]
        return f"{error['message']} ({response.status_code} {error['code']})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"
