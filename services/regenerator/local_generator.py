"""A video generator that renders a real clip with ffmpeg, for the embedded mode and tests.

The prompt chooses a look from a fixed table (palette, particles, brightness, motion); only the
table's values and numbers computed here reach the filter graph, never the prompt's text. The
same prompt always renders the same clip: every random choice is seeded from the prompt's hash.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

from clipchat.errors import InvalidInput, MediaError
from clipchat.media.ffmpeg import FfmpegRunner
from clipchat.media.probe import probe
from clipchat.media.thumbnail import render_thumbnail
from services.regenerator.generator import GeneratedClip, ProgressFn, StartedFn

__all__ = ["LocalVideoGenerator", "Look", "look_for_prompt", "render_thumbnail"]

log = logging.getLogger("clipchat.regenerator")

MAX_SECONDS = 60.0


@dataclass(frozen=True)
class Look:
    """What a clip looks like: every field is a value from the tables below, never prompt text."""

    colors: tuple[str, str, str]  # 0xRRGGBB stops of the drifting background gradient
    gradient: str  # an ffmpeg gradients type: linear, radial, circular, spiral, square
    orb: str  # 0xRRGGBB of the disc that crosses the frame (sun, moon, lantern…)
    brightness: float = 0.0  # eq brightness, -1..1
    saturation: float = 1.0  # 0 is black and white
    particles: str = ""  # "", "stars", "rain" or "snow"
    speed: float = 1.0  # motion multiplier


_PALETTES: dict[str, Look] = {
    "night": Look(("0x01020a", "0x061233", "0x0b1d4d"), "linear", "0xe8e6c8", brightness=-0.04,
                  particles="stars"),
    "sunset": Look(("0xff7e29", "0xd9485f", "0x4b1d52"), "linear", "0xffd27a"),
    "day": Look(("0x4fa3e0", "0x87ceeb", "0xd0ecff"), "radial", "0xffd54f", brightness=0.02),
    "neon": Look(("0xff00c8", "0x1a0033", "0x00e5ff"), "spiral", "0x39ff14", saturation=1.3),
    "forest": Look(("0x0b3d0b", "0x2e7d32", "0x9ccc65"), "radial", "0xf0f4c3"),
    "ocean": Look(("0x003b5c", "0x00838f", "0x4dd0e1"), "circular", "0xe0f7fa"),
    "storm": Look(("0x1e2329", "0x3b434d", "0x5c6670"), "linear", "0xb0bec5", brightness=-0.05,
                  saturation=0.6, particles="rain"),
    "winter": Look(("0xdfe9f3", "0xa9c1d9", "0xf7fbff"), "radial", "0xffffff", particles="snow"),
}
# Prompts that name no palette get one of these, picked by the prompt's hash.
_NEUTRAL = (
    Look(("0x2b5876", "0x4e4376", "0x8e9eab"), "linear", "0xffcc80"),
    Look(("0x614385", "0x516395", "0xa1c4fd"), "radial", "0xfff59d"),
    Look(("0x134e5e", "0x71b280", "0xd4fc79"), "square", "0xffe0b2"),
)

# Keyword → palette. Words are matched whole after lowercasing; a phrase as consecutive words.
_PALETTE_WORDS: dict[str, tuple[str, ...]] = {
    "night": ("night", "nighttime", "midnight", "dark", "darkness", "moon", "moonlight", "moonlit",
              "starry", "stars", "starlight"),
    "sunset": ("sunset", "sunrise", "golden", "golden hour", "dusk", "dawn", "evening", "twilight"),
    "day": ("day", "daytime", "sunny", "sunshine", "noon", "midday", "morning", "daylight", "blue sky"),
    "neon": ("neon", "cyberpunk", "synthwave", "vaporwave", "futuristic"),
    "forest": ("forest", "green", "jungle", "woods", "trees", "meadow", "nature"),
    "ocean": ("ocean", "sea", "waves", "beach", "underwater", "lake", "coast"),
    "storm": ("rain", "rainy", "raining", "storm", "stormy", "thunderstorm", "drizzle", "thunder"),
    "winter": ("snow", "snowy", "snowing", "winter", "blizzard", "frozen", "icy"),
}
# Weather words add their particles to whatever palette the prompt names ("a rainy night").
_PARTICLE_WORDS: dict[str, tuple[str, ...]] = {
    "rain": _PALETTE_WORDS["storm"],
    "snow": ("snow", "snowy", "snowing", "blizzard", "snowfall"),
}
_NOIR_WORDS = ("black and white", "black & white", "noir", "monochrome", "grayscale", "greyscale")
_SLOW_WORDS = ("slow", "slow motion", "slowly", "slow-motion", "calm", "gentle")
_FAST_WORDS = ("fast", "rapid", "energetic", "hyperlapse", "timelapse")

_WORD_RE = re.compile(r"[a-z]+(?:-[a-z]+)?|&")


def look_for_prompt(prompt: str) -> Look:
    """The look a prompt asks for. When it names several palettes, the last one named wins,
    since an edit is usually appended to the original description ("…, at night")."""
    words = _WORD_RE.findall(prompt.lower())
    seed = _prompt_seed(prompt)
    palette_at = _last_positions(words, _PALETTE_WORDS)
    look = (_PALETTES[max(palette_at, key=palette_at.__getitem__)] if palette_at
            else _NEUTRAL[seed % len(_NEUTRAL)])
    particles_at = _last_positions(words, _PARTICLE_WORDS)
    if particles_at:
        look = replace(look, particles=max(particles_at, key=particles_at.__getitem__))
    if _last_positions(words, {"noir": _NOIR_WORDS}):
        look = replace(look, saturation=0.0)
    if _last_positions(words, {"slow": _SLOW_WORDS}):
        look = replace(look, speed=0.35)
    elif _last_positions(words, {"fast": _FAST_WORDS}):
        look = replace(look, speed=2.0)
    return look


class LocalVideoGenerator:
    """Renders a clip for a prompt with ffmpeg's own sources; free and deterministic."""

    name = "local"

    def __init__(self, ffmpeg: FfmpegRunner, width: int = 1280, height: int = 720, fps: int = 24) -> None:
        if width < 64 or height < 64 or width % 2 or height % 2 or not 1 <= fps <= 120:
            raise ValueError("width and height must be even and at least 64; fps between 1 and 120")
        self._ffmpeg = ffmpeg
        self._width = width
        self._height = height
        self._fps = fps

    def estimate_cost(self, duration: float) -> Decimal:
        return Decimal("0")

    async def generate(self, prompt: str, duration: float, dest: Path, *,
                       on_progress: ProgressFn | None = None, idempotency_key: str = "",
                       resume_id: str = "", on_started: StartedFn | None = None) -> GeneratedClip:
        """Render ``duration`` seconds (rounded to whole frames) for ``prompt`` into ``dest`` (MP4).

        Rendering costs nothing, so ``idempotency_key``, ``resume_id`` and ``on_started`` are
        ignored: a repeat simply renders the same clip again.

        Raises ``InvalidInput`` for a duration outside (0, 60] seconds, ``FfmpegError`` /
        ``FfmpegKilled`` when rendering fails, ``MediaError`` when the result cannot be read.
        """
        if not math.isfinite(duration) or duration <= 0 or duration > MAX_SECONDS:
            raise InvalidInput(f"A clip must last between 0 and {MAX_SECONDS:g} seconds.")
        frames = max(1, round(duration * self._fps))
        look = look_for_prompt(prompt)
        seed = _prompt_seed(prompt)
        graph = self._filter_graph(look, seed, frames)
        await self._ffmpeg.run(
            ["-filter_complex", graph, "-map", "[v]", "-frames:v", str(frames), "-an",
             "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p",
             "-g", str(self._fps * 2), "-color_primaries", "bt709", "-color_trc", "bt709",
             "-colorspace", "bt709", "-movflags", "+faststart", "-f", "mp4", str(dest)],
            expected_duration=frames / self._fps, on_progress=on_progress, makes="clip")
        info = await probe(dest, label="generated clip")
        if info.frame_count is not None and info.frame_count != frames:
            raise MediaError("The generated clip came out with the wrong length.")
        log.info("generator.rendered", extra={"provider": self.name, "frames": frames,
                                               "particles": look.particles, "gradient": look.gradient})
        return GeneratedClip(path=dest, duration=info.video_duration or info.duration, cost=Decimal("0"),
                             provider_id=f"local-{seed:08x}")

    def _filter_graph(self, look: Look, seed: int, frames: int) -> str:
        """The lavfi graph for ``look``: a drifting gradient, optional particles, a crossing orb."""
        w, h, fps = self._width, self._height, self._fps
        seconds = frames / fps
        # Sources run a little past the end so the last frame always exists; -frames:v cuts it.
        length = f"{seconds + 1 / fps:.6f}"
        c0, c1, c2 = look.colors
        drift = min(1.0, 0.015 * look.speed)
        orb = max(16, (min(w, h) // 5) // 2 * 2)
        # The orb drifts right across most of the frame; "slow" and "fast" change how far.
        x_start = seed % max(1, w // 3)
        x_speed = (w - x_start) / seconds * min(1.0, 0.6 * look.speed)
        orb_y = (seed >> 8) % max(1, h // 3) + h // 12
        parts = [
            f"gradients=s={w}x{h}:r={fps}:d={length}:c0={c0}:c1={c1}:c2={c2}:n=3:speed={drift:.4f}:"
            f"seed={seed % 2**31}:type={look.gradient},format=yuv420p[bg]",
            f"color=c={look.orb}:s={orb}x{orb}:r={fps}:d={length},format=yuva420p,"
            f"geq=lum='p(X,Y)':cb='p(X,Y)':cr='p(X,Y)':"
            f"a='255*lt(hypot(X-{orb / 2},Y-{orb / 2}),{orb / 2 - 1})'[orb]",
        ]
        scene = "bg"
        if look.particles:
            parts.append(self._particles(look, seed, length))
            parts.append(f"[{scene}][fx]blend=c0_mode=lighten:c1_mode=normal:c2_mode=normal[lit]")
            scene = "lit"
        parts.append(
            f"[{scene}][orb]overlay=x={x_start}+{x_speed:.4f}*t:y={orb_y}:eval=frame:format=yuv420,"
            f"eq=brightness={look.brightness:.3f}:saturation={look.saturation:.3f},format=yuv420p[v]")
        return ";".join(parts)

    def _particles(self, look: Look, seed: int, length: str) -> str:
        """A black layer with white points (stars), falling flakes (snow) or streaks (rain).

        Drawn at a quarter of the size with a hash of the pixel position (no randomness, so the
        same prompt gives the same clip) and scaled up without smoothing, so points stay crisp.
        """
        w, h = self._width // 4 // 2 * 2, self._height // 4 // 2 * 2
        offset = seed % 1000
        if look.particles == "rain":
            # Cells six rows tall falling fast: streaks.
            density, cell_y = 0.985, f"floor((Y-T*{90 * look.speed:.3f})/6)"
        elif look.particles == "snow":
            density, cell_y = 0.992, f"floor(Y-T*{8 * look.speed:.3f})"
        else:  # stars hold still
            density, cell_y = 0.994, "Y"
        value = f"abs(mod(sin(X*12.9898+{cell_y}*78.233+{offset})*43758.5453,1))"
        brightness = 200 if look.particles == "rain" else 235
        return (f"color=c=black:s={w}x{h}:r={self._fps}:d={length},format=yuv420p,"
                f"geq=lum='if(gt({value},{density}),{brightness},16)':cb=128:cr=128,"
                f"scale={self._width}:{self._height}:flags=neighbor[fx]")


def _last_positions(words: list[str], table: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """For each table entry named in ``words``, the index of its last mention."""
    found: dict[str, int] = {}
    for name, phrases in table.items():
        for phrase in phrases:
            parts = _WORD_RE.findall(phrase)
            for start in range(len(words) - len(parts) + 1):
                if words[start:start + len(parts)] == parts:
                    found[name] = max(found.get(name, -1), start + len(parts) - 1)
    return found


def _prompt_seed(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.strip().lower().encode()).digest()[:4], "big")
