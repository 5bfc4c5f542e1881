"""A frame's pixels do not depend on which run read it (``render.seek_frame``).

The composer groups the work into runs as suits it: in a full composition each clip is decoded
once and its transitions blend raw windows; after a change, a transition reads its windows from
the clips itself. Both must give the same bytes, or a cached segment and a fresh one would not
match. Checked on real ffmpeg with sources whose frame times do not fall on the 30 fps grid,
where a careless seek picks a neighbouring frame.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from clipchat.media.encoder import LIBX264, video_encoder_args
from clipchat.media.ffmpeg import FfmpegRunner
from clipchat.media.probe import probe
from services.composer.render import (
    Canvas,
    ClipOutput,
    SourceClip,
    clip_command,
    clip_transition_command,
    kept_windows_command,
    seek_frame,
    transition_command,
)
from services.composer.timeline import TRANSITIONS, ClipWindow

CANVAS = Canvas(320, 180, "pad")
SOURCES = {
    "24fps": "testsrc2=size=320x180:rate=24:duration=4",
    "25fps": "testsrc2=size=320x180:rate=25:duration=4",
    "60fps": "testsrc2=size=320x180:rate=60:duration=4",
    "vfr": "testsrc2=size=320x180:rate=30:duration=4,setpts='N/30/TB+0.013*sin(N)/TB'",
}


def render(ffmpeg_exe: str, lavfi: str, dest: Path, seconds: float = 4.0) -> Path:
    """Encoded as video generators do (one keyframe at the start), kept at its own frame times."""
    subprocess.run([ffmpeg_exe, "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", lavfi,
                    "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                    "-fps_mode", "vfr", str(dest)], check=True)
    return dest


@pytest.fixture(scope="module", params=sorted(SOURCES))
def source(request: pytest.FixtureRequest, ffmpeg_exe: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(ffmpeg_exe, SOURCES[request.param], tmp_path_factory.mktemp("runs") / f"{request.param}.mp4")


async def read(ffmpeg: FfmpegRunner, clip: SourceClip, windows: list[ClipWindow], folder: Path) -> list[bytes]:
    outputs = [ClipOutput(window, folder / f"w{window.start_frame}.yuv", encoded=False) for window in windows]
    await ffmpeg.run(clip_command(clip, CANVAS, outputs, []))
    return [output.dest.read_bytes() for output in outputs]


@pytest.mark.parametrize(("start", "frames"), [(100, 15), (61, 9), (110, 20)])  # the last runs past the end
async def test_a_window_read_alone_equals_the_same_window_read_from_the_start(
        source: Path, ffmpeg_exe: str, tmp_path: Path, start: int, frames: int) -> None:
    clip = SourceClip(source, await probe(source))
    window = ClipWindow(0, start, frames)
    assert seek_frame(clip, start) > 0  # the run alone really seeks

    ffmpeg = FfmpegRunner(ffmpeg_exe)
    (tmp_path / "whole").mkdir()
    (tmp_path / "alone").mkdir()
    _, whole = await read(ffmpeg, clip, [ClipWindow(0, 0, start), window], tmp_path / "whole")
    [alone] = await read(ffmpeg, clip, [window], tmp_path / "alone")

    assert len(alone) == frames * CANVAS.width * CANVAS.height * 3 // 2
    assert alone == whole


@pytest.mark.parametrize("xfade", sorted(set(TRANSITIONS.values())))
async def test_a_transition_read_from_the_clips_equals_one_blended_from_raw_windows(
        ffmpeg_exe: str, two_sources: tuple[Path, Path], tmp_path: Path, xfade: str) -> None:
    ffmpeg = FfmpegRunner(ffmpeg_exe)
    first, second = [SourceClip(path, await probe(path)) for path in two_sources]
    before, after = ClipWindow(0, 70, 9), ClipWindow(1, 0, 9)
    encoder = video_encoder_args(LIBX264, x264_preset="superfast")
    # As a full composition makes it: raw windows written by clip runs, then blended.
    raw = [ClipOutput(before, tmp_path / "before.yuv", encoded=False), ClipOutput(after, tmp_path / "after.yuv",
                                                                                    encoded=False)]
    await ffmpeg.run(clip_command(first, CANVAS, raw[:1], []))
    await ffmpeg.run(clip_command(second, CANVAS, raw[1:], []))
    await ffmpeg.run(transition_command(xfade, 9, raw[0].dest, raw[1].dest, CANVAS, encoder, tmp_path / "a.mp4"))
    # As a recomposition makes it: one run reading both clips.
    await ffmpeg.run(clip_transition_command(xfade, 9, (first, before), (second, after), CANVAS, encoder,
                                             tmp_path / "b.mp4"))

    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


@pytest.fixture(scope="module")
def two_sources(ffmpeg_exe: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pair")
    return (render(ffmpeg_exe, SOURCES["24fps"], folder / "first.mp4", 3.0),
            render(ffmpeg_exe, "mandelbrot=size=180x320:rate=25", folder / "second.mp4", 3.0))


@pytest.mark.parametrize("xfade", sorted(set(TRANSITIONS.values())))
async def test_a_transition_from_windows_kept_losslessly_equals_one_from_raw_windows(
        ffmpeg_exe: str, two_sources: tuple[Path, Path], tmp_path: Path, xfade: str) -> None:
    ffmpeg = FfmpegRunner(ffmpeg_exe)
    first, second = [SourceClip(path, await probe(path)) for path in two_sources]
    before, after = ClipWindow(0, 70, 9), ClipWindow(1, 0, 9)
    encoder = video_encoder_args(LIBX264, x264_preset="superfast")
    # A full composition's clip runs write each window raw; a run of its own keeps them losslessly.
    for clip, window, name in ((first, before, "before"), (second, after, "after")):
        await ffmpeg.run(clip_command(clip, CANVAS, [ClipOutput(window, tmp_path / f"{name}.yuv", encoded=False)], []))
    kept = (tmp_path / "before.mp4", tmp_path / "after.mp4")
    await ffmpeg.run(kept_windows_command([(tmp_path / "before.yuv", kept[0]), (tmp_path / "after.yuv", kept[1])],
                                          CANVAS))
    await ffmpeg.run(transition_command(xfade, 9, tmp_path / "before.yuv", tmp_path / "after.yuv", CANVAS, encoder,
                                        tmp_path / "raw.mp4"))
    # A recomposition reads both kept windows, or one kept and one from its clip.
    await ffmpeg.run(clip_transition_command(xfade, 9, kept[0], kept[1], CANVAS, encoder, tmp_path / "kept.mp4"))
    await ffmpeg.run(clip_transition_command(xfade, 9, kept[0], (second, after), CANVAS, encoder,
                                             tmp_path / "mixed.mp4"))
    await ffmpeg.run(clip_transition_command(xfade, 9, (first, before), kept[1], CANVAS, encoder,
                                             tmp_path / "mixed-other-way.mp4"))

    assert (tmp_path / "kept.mp4").stat().st_size > 0
    for made in ("kept.mp4", "mixed.mp4", "mixed-other-way.mp4"):
        assert (tmp_path / made).read_bytes() == (tmp_path / "raw.mp4").read_bytes(), made
