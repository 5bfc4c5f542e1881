"""The local video generator renders real clips that follow the prompt, from fixed tables only."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import av
import pytest

from clipchat.errors import InvalidInput
from clipchat.media.ffmpeg import FfmpegProgressFn, FfmpegRunner
from services.regenerator.generator import VideoGenerator
from services.regenerator.local_generator import LocalVideoGenerator, look_for_prompt, render_thumbnail

SIZE = {"width": 320, "height": 180, "fps": 24}
HOSTILE = "neon city'; drawtext=text=pwned:fontfile=/etc/passwd [out]; movie=/etc/passwd,"


class RecordingRunner(FfmpegRunner):
    """The real runner, remembering every argument list it was given."""

    def __init__(self, ffmpeg_path: str) -> None:
        super().__init__(ffmpeg_path)
        self.calls: list[list[str]] = []

    async def run(self, args: Sequence[str], *, expected_duration: float | None = None,
                  on_progress: FfmpegProgressFn | None = None, quiet: bool = False, makes: str = "") -> None:
        self.calls.append(list(args))
        await super().run(args, expected_duration=expected_duration, on_progress=on_progress, quiet=quiet,
                          makes=makes)


@pytest.fixture
def runner(ffmpeg_exe: str) -> RecordingRunner:
    return RecordingRunner(ffmpeg_exe)


@pytest.fixture
def generator(runner: RecordingRunner) -> LocalVideoGenerator:
    return LocalVideoGenerator(runner, **SIZE)


def seconds(stream: av.stream.Stream) -> float:
    """A stream's duration in seconds, from its own header."""
    assert stream.duration is not None and stream.time_base is not None
    return float(stream.duration * stream.time_base)


def mean_luma(path: Path) -> float:
    """Average brightness (0..255) of every frame, at a small size."""
    total = count = 0
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            plane = bytes(frame.reformat(width=64, height=36, format="gray").planes[0])
            total += sum(plane)
            count += len(plane)
    return total / count


def frame_bytes(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [b"".join(bytes(p) for p in frame.planes) for frame in container.decode(video=0)]


def test_is_a_free_video_generator(generator: LocalVideoGenerator) -> None:
    typed: VideoGenerator = generator
    assert typed.name == "local"
    assert generator.estimate_cost(12.5) == Decimal("0")


@pytest.mark.parametrize("duration", [2.0, 1.5])
async def test_renders_h264_of_the_exact_duration(generator: LocalVideoGenerator, tmp_path: Path,
                                                  duration: float) -> None:
    fractions: list[float] = []

    async def on_progress(fraction: float) -> None:
        fractions.append(fraction)

    clip = await generator.generate("a quiet harbour", duration, tmp_path / "clip.mp4",
                                    on_progress=on_progress)

    assert clip.cost == Decimal("0")
    assert clip.duration == pytest.approx(duration, abs=1e-6)
    with av.open(str(clip.path)) as container:
        video = container.streams.video[0]
        assert video.codec_context.name == "h264"
        assert (video.codec_context.width, video.codec_context.height) == (320, 180)
        assert video.frames == round(duration * 24)
        assert seconds(video) == pytest.approx(duration, abs=1e-6)
    assert fractions and fractions[-1] == 1.0


async def test_night_is_clearly_darker_than_day(generator: LocalVideoGenerator, tmp_path: Path) -> None:
    night = await generator.generate("a city street at night under the stars", 1.0, tmp_path / "night.mp4")
    day = await generator.generate("a city street on a bright sunny day", 1.0, tmp_path / "day.mp4")

    night_luma, day_luma = mean_luma(night.path), mean_luma(day.path)
    assert night_luma < 60
    assert day_luma > 150
    assert day_luma - night_luma > 100


async def test_same_prompt_renders_the_same_clip(generator: LocalVideoGenerator, tmp_path: Path) -> None:
    first = await generator.generate("snowy forest, slow motion", 1.0, tmp_path / "a.mp4")
    again = await generator.generate("snowy forest, slow motion", 1.0, tmp_path / "b.mp4")
    other = await generator.generate("stormy sea", 1.0, tmp_path / "c.mp4")

    assert frame_bytes(first.path) == frame_bytes(again.path)
    assert frame_bytes(first.path) != frame_bytes(other.path)
    # It moves: the first and last pictures differ.
    frames = frame_bytes(first.path)
    assert frames[0] != frames[-1]


async def test_prompt_text_never_reaches_ffmpeg(generator: LocalVideoGenerator, runner: RecordingRunner,
                                                tmp_path: Path) -> None:
    clip = await generator.generate(HOSTILE, 1.0, tmp_path / "clip.mp4")

    assert clip.duration == pytest.approx(1.0)
    arguments = " ".join(arg for call in runner.calls for arg in call)
    for fragment in ("drawtext", "pwned", "passwd", "movie", "neon city"):
        assert fragment not in arguments
    # The keyword still chose the look: neon colours.
    assert look_for_prompt(HOSTILE) == look_for_prompt("neon")


def test_keywords_choose_the_look() -> None:
    assert look_for_prompt("a beach at midnight").particles == "stars"
    assert look_for_prompt("a sunny day, then make it nighttime").particles == "stars"  # last one wins
    assert look_for_prompt("rainy night in the city").particles == "rain"
    assert look_for_prompt("a snowy village").particles == "snow"
    assert look_for_prompt("film noir alley").saturation == 0
    assert look_for_prompt("Black and White portrait").saturation == 0
    assert look_for_prompt("waves in slow motion").speed < 1
    assert look_for_prompt("golden hour fields").colors != look_for_prompt("forest").colors
    assert look_for_prompt("anything at all") == look_for_prompt("anything at all")


async def test_rejects_impossible_durations(generator: LocalVideoGenerator, tmp_path: Path) -> None:
    for duration in (0.0, -1.0, float("nan"), 3600.0):
        with pytest.raises(InvalidInput):
            await generator.generate("sea", duration, tmp_path / "clip.mp4")


async def test_thumbnail_is_a_320_wide_jpeg(generator: LocalVideoGenerator, runner: RecordingRunner,
                                            tmp_path: Path) -> None:
    clip = await generator.generate("golden sunset", 1.5, tmp_path / "clip.mp4")
    thumb = tmp_path / "thumb.jpg"

    await render_thumbnail(runner, clip.path, thumb)

    assert thumb.read_bytes()[:3] == b"\xff\xd8\xff"
    with av.open(str(thumb)) as container:
        frame = next(container.decode(video=0))
        assert (frame.width, frame.height) == (320, 180)
