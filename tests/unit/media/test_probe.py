"""probe() on real files: what it reads, and what it refuses to open."""

from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

import pytest

from clipchat.errors import MediaError
from clipchat.media.probe import moov_before_mdat, probe


def render(ffmpeg: str, args: list[str], dest: Path) -> Path:
    subprocess.run([ffmpeg, "-nostdin", "-loglevel", "error", "-y", *args, str(dest)], check=True)
    return dest


@pytest.fixture(scope="module")
def clip(ffmpeg_exe: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(ffmpeg_exe, ["-f", "lavfi", "-i", "testsrc=size=320x240:rate=25:duration=1", "-f", "lavfi",
                               "-i", "sine=duration=1", "-c:v", "libx264", "-preset", "veryfast",
                               "-profile:v", "high", "-pix_fmt", "yuv420p", "-colorspace", "bt709",
                               "-c:a", "aac", "-movflags", "+faststart"],
                  tmp_path_factory.mktemp("probe") / "clip.mp4")


async def test_reads_streams_profile_colour_and_start_times(clip: Path) -> None:
    info = await probe(clip, label="clip 1")

    assert (info.width, info.height, info.fps) == (320, 240, 25.0)
    assert info.video_profile == "High"
    assert info.color_matrix == 1  # BT.709
    assert info.sample_aspect_ratio == Fraction(1)
    assert info.video_start == pytest.approx(0.0, abs=0.05)
    assert info.audio_start == pytest.approx(0.0, abs=0.05)
    assert info.format_name.startswith("mov,mp4")
    assert await moov_before_mdat(clip)


async def test_reads_rotation_metadata(ffmpeg_exe: str, clip: Path, tmp_path: Path) -> None:
    rotated = render(ffmpeg_exe, ["-display_rotation", "90", "-i", str(clip), "-c", "copy"], tmp_path / "r.mp4")
    info = await probe(rotated)
    assert abs(info.rotation) == 90


async def test_a_file_without_faststart_has_its_index_last(ffmpeg_exe: str, clip: Path, tmp_path: Path) -> None:
    plain = render(ffmpeg_exe, ["-i", str(clip), "-c", "copy"], tmp_path / "plain.mp4")
    assert not await moov_before_mdat(plain)


async def test_a_concat_script_posing_as_a_clip_is_refused(clip: Path, tmp_path: Path) -> None:
    # ffmpeg would happily follow this to another file; only real media containers are opened.
    fake = tmp_path / "clip.mp4"
    fake.write_text(f"ffconcat version 1.0\nfile {clip}\n")

    with pytest.raises(MediaError, match=r"^Clip 2 could not be read"):
        await probe(fake, label="clip 2")


async def test_a_playlist_posing_as_a_clip_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "clip.mp4"
    fake.write_text("#EXTM3U\n#EXTINF:1,\nhttp://127.0.0.1:9/x.ts\n#EXT-X-ENDLIST\n")

    with pytest.raises(MediaError):
        await probe(fake, label="clip 1")
