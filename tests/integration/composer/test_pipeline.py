"""The composer against real ffmpeg and a real local store: small inputs, full-size 1080p30 output."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import pytest

from clipchat.errors import Conflict, MediaError
from clipchat.media.encoder import LIBX264, detect_encoder
from clipchat.media.ffmpeg import FfmpegRunner
from clipchat.settings import Settings
from clipchat.storage.local import LocalStorage
from services.composer.pipeline import (
    ClipSpec,
    Composer,
    CompositionSpec,
    TransitionSpec,
)

log = logging.getLogger(__name__)

WIDE = ["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25:duration=2"]  # 25 fps, longer than needed
SHORT = ["-f", "lavfi", "-i", "testsrc=size=320x180:rate=24:duration=1"]  # shorter than its 1.5 s slot
TALL = ["-f", "lavfi", "-i", "mandelbrot=size=180x320:rate=30", "-t", "1"]  # portrait, letterboxed
RED = ["-f", "lavfi", "-i", "color=c=red:size=320x180:rate=30:duration=1.5"]  # replaces SHORT
LONG = ["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30:duration=8"]
MUSIC = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=3", "-ac", "1"]  # mono, short

SLOTS = (1.5, 1.5, 1.0)  # seconds of the three clips: 45 + 45 + 30 frames
TOTAL_FRAMES = 120


@dataclass(frozen=True)
class Sources:
    wide: Path
    short: Path
    tall: Path
    red: Path
    long: Path
    music: Path
    corrupt: Path


def render(ffmpeg: str, args: list[str], dest: Path) -> Path:
    encode = ["-c:a", "aac"] if dest.suffix == ".m4a" else ["-c:v", "libx264", "-preset", "ultrafast",
                                                             "-pix_fmt", "yuv420p"]
    subprocess.run([ffmpeg, "-nostdin", "-loglevel", "error", "-y", *args, *encode, str(dest)], check=True)
    return dest


@pytest.fixture(scope="module")
def sources(ffmpeg_exe: str, tmp_path_factory: pytest.TempPathFactory) -> Sources:
    folder = tmp_path_factory.mktemp("sources")
    wide = render(ffmpeg_exe, WIDE, folder / "wide.mp4")
    corrupt = folder / "corrupt.mp4"
    # A real MP4 header with the picture data cut off: it opens, but it does not decode.
    corrupt.write_bytes(wide.read_bytes()[:4096])
    return Sources(wide=wide, short=render(ffmpeg_exe, SHORT, folder / "short.mp4"),
                   tall=render(ffmpeg_exe, TALL, folder / "tall.mp4"),
                   red=render(ffmpeg_exe, RED, folder / "red.mp4"),
                   long=render(ffmpeg_exe, LONG, folder / "long.mp4"),
                   music=render(ffmpeg_exe, MUSIC, folder / "music.m4a"), corrupt=corrupt)


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


@pytest.fixture
def work_root(tmp_path: Path) -> Path:
    root = tmp_path / "work"
    root.mkdir()
    return root


@pytest.fixture
def composer(storage: LocalStorage, ffmpeg_exe: str, work_root: Path, tmp_path: Path) -> Composer:
    settings = Settings(encoder=LIBX264, x264_preset="veryfast", data_dir=tmp_path)
    return Composer(storage, FfmpegRunner(ffmpeg_exe), settings, work_root=work_root)


async def upload(storage: LocalStorage, path: Path) -> str:
    key = f"jobs/test/clips/{uuid.uuid4().hex}{path.suffix}"
    await storage.put_file(key, path)
    return key


async def make_spec(storage: LocalStorage, clips: list[Path], music: Path,
                    durations: tuple[float, ...] = SLOTS) -> CompositionSpec:
    keys = [await upload(storage, clip) for clip in clips]
    return CompositionSpec(
        job_id=str(uuid.uuid4()),
        clips=[ClipSpec(key, duration) for key, duration in zip(keys, durations, strict=True)],
        audio_key=await upload(storage, music),
        # Anything other than a cut is composed as a cut for now.
        transitions=[TransitionSpec("crossfade", 0.5), TransitionSpec()][:len(clips) - 1],
        beat_timestamps=[0.5, 1.0, 1.5])


def seconds(stream: av.stream.Stream) -> float:
    """A stream's duration in seconds, from its own header."""
    assert stream.duration is not None and stream.time_base is not None
    return float(stream.duration * stream.time_base)


def frame_hashes(path: Path) -> list[str]:
    """A hash of every decoded picture, to compare frames across files."""
    with av.open(str(path)) as container:
        return [hashlib.sha256(b"".join(bytes(plane) for plane in frame.planes)).hexdigest()
                for frame in container.decode(video=0)]


def small_gray_frames(path: Path) -> list[bytes]:
    """Every picture shrunk to 64x36 grey levels: cheap to compare with a tolerance."""
    with av.open(str(path)) as container:
        return [bytes(frame.reformat(width=64, height=36, format="gray").planes[0])
                for frame in container.decode(video=0)]


def difference(a: bytes, b: bytes) -> int:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def leftovers(folder: Path) -> list[Path]:
    return list(folder.iterdir())


def child_pids() -> list[int]:
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                found.append(int(entry.name))
    return found


async def test_composes_1080p30_h264_aac_of_exact_length(composer: Composer, storage: LocalStorage,
                                                          sources: Sources, work_root: Path) -> None:
    spec = await make_spec(storage, [sources.wide, sources.short, sources.tall], sources.music)
    events: list[tuple[str, float, float | None]] = []

    async def on_progress(stage: str, fraction: float, eta: float | None) -> None:
        events.append((stage, fraction, eta))

    started = time.monotonic()
    result = await composer.compose(spec, "jobs/test/videos/v1.mp4", on_progress=on_progress)
    log.info("composed 3 clips (120 frames) in %.2f s", time.monotonic() - started)

    assert (result.segments_encoded, result.segments_reused) == (3, 0)
    assert result.encoder == LIBX264
    assert result.duration == pytest.approx(TOTAL_FRAMES / 30, abs=1 / 30)
    path = storage.local_path(result.video_key)
    assert path is not None
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.width, video.codec_context.height) == (1920, 1080)
        assert video.average_rate == Fraction(30)
        assert video.codec_context.name == "h264"
        assert video.codec_context.pix_fmt == "yuv420p"
        assert video.frames == TOTAL_FRAMES
        assert seconds(video) == pytest.approx(TOTAL_FRAMES / 30, abs=1 / 30)
        assert (container.duration or 0) / av.time_base == pytest.approx(TOTAL_FRAMES / 30, abs=1 / 30)
        assert audio.codec_context.name == "aac"
        assert audio.codec_context.sample_rate == 48_000
        assert audio.codec_context.channels == 2
        assert seconds(audio) == pytest.approx(TOTAL_FRAMES / 30, abs=1 / 30)

    stages = [stage for stage, _, _ in events]
    assert stages[0] == "downloading" and stages[-1] == "uploading"
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == [
        "downloading", "normalizing", "transitions", "encoding", "muxing", "uploading"]
    fractions = [fraction for _, fraction, _ in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert any(eta is not None and eta >= 0 for _, _, eta in events)
    assert leftovers(work_root) == []


async def test_replacing_one_clip_reencodes_only_its_segment(composer: Composer, storage: LocalStorage,
                                                             sources: Sources) -> None:
    spec = await make_spec(storage, [sources.wide, sources.short, sources.tall], sources.music)
    first = await composer.compose(spec, "jobs/test/videos/v1.mp4")
    replaced = CompositionSpec(spec.job_id, [spec.clips[0], ClipSpec(await upload(storage, sources.red), 1.5),
                                             spec.clips[2]], spec.audio_key, spec.transitions,
                               spec.beat_timestamps)

    started = time.monotonic()
    second = await composer.compose(replaced, "jobs/test/videos/v2.mp4")
    log.info("recomposed with one clip replaced in %.2f s", time.monotonic() - started)

    assert (second.segments_encoded, second.segments_reused) == (1, 2)
    before = frame_hashes(storage.root / first.video_key)
    after = frame_hashes(storage.root / second.video_key)
    assert len(before) == len(after) == TOTAL_FRAMES
    assert before[:45] == after[:45]  # clip 1, unchanged
    assert before[90:] == after[90:]  # clip 3, unchanged
    assert all(b != a for b, a in zip(before[45:90], after[45:90], strict=True))  # clip 2, new


async def test_short_clip_holds_its_last_frame(composer: Composer, storage: LocalStorage,
                                               sources: Sources) -> None:
    spec = await make_spec(storage, [sources.short], sources.music, durations=(1.5,))
    result = await composer.compose(spec, "jobs/test/videos/v1.mp4")

    thumbs = small_gray_frames(storage.root / result.video_key)
    assert len(thumbs) == 45
    # The source has 24 frames a second for 1 s: 30 frames at 30 fps, then the last one is held
    # (equal up to the encoder's loss), while the source's own frames move.
    assert all(difference(thumbs[29], held) <= 6 for held in thumbs[30:])
    assert difference(thumbs[0], thumbs[29]) > 40


async def test_portrait_crop_fills_a_1080x1920_frame(composer: Composer, storage: LocalStorage,
                                                     sources: Sources) -> None:
    spec = await make_spec(storage, [sources.wide], sources.music, durations=(1.0,))
    portrait = CompositionSpec(spec.job_id, spec.clips, spec.audio_key, [], [], aspect_ratio="9:16",
                               fit="crop")

    result = await composer.compose(portrait, "jobs/test/videos/v1.mp4")

    with av.open(str(storage.root / result.video_key)) as container:
        frame = next(container.decode(video=0))
        assert (frame.width, frame.height) == (1080, 1920)
        # Cropped, not letterboxed: the top rows show the picture, not black bars.
        top = bytes(frame.reformat(width=54, height=96, format="gray").planes[0])[:54 * 4]
        assert max(top) > 60


async def test_corrupt_clip_raises_media_error_naming_it(composer: Composer, storage: LocalStorage,
                                                         sources: Sources, work_root: Path) -> None:
    spec = await make_spec(storage, [sources.wide, sources.corrupt, sources.tall], sources.music)

    with pytest.raises(MediaError, match=r"^Clip 2 could not be read"):
        await composer.compose(spec, "jobs/test/videos/v1.mp4")

    assert not await storage.exists("jobs/test/videos/v1.mp4")
    assert leftovers(work_root) == []


async def test_existing_output_is_never_overwritten(composer: Composer, storage: LocalStorage,
                                                    sources: Sources) -> None:
    spec = await make_spec(storage, [sources.tall], sources.music, durations=(1.0,))
    await storage.put_bytes("jobs/test/videos/v1.mp4", b"the current version")

    with pytest.raises(Conflict):
        await composer.compose(spec, "jobs/test/videos/v1.mp4")
    assert await storage.get_bytes("jobs/test/videos/v1.mp4") == b"the current version"


async def test_cancel_while_encoding_leaves_no_process_or_work_folder(
        composer: Composer, storage: LocalStorage, sources: Sources, work_root: Path) -> None:
    spec = await make_spec(storage, [sources.long], sources.music, durations=(8.0,))
    stages: list[str] = []

    async def on_progress(stage: str, fraction: float, eta: float | None) -> None:
        stages.append(stage)

    task = asyncio.create_task(composer.compose(spec, "jobs/test/videos/v1.mp4", on_progress=on_progress))
    deadline = time.monotonic() + 20
    while not child_pids():
        assert time.monotonic() < deadline and not task.done(), "no ffmpeg started"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)  # well into the segment encode
    assert stages[-1] == "normalizing"

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert child_pids() == []
    assert leftovers(work_root) == []
    assert not await storage.exists("jobs/test/videos/v1.mp4")
    assert await storage.list("cache/segments/") == []


async def test_encoder_detection_falls_back_to_libx264(ffmpeg_exe: str) -> None:
    ffmpeg = FfmpegRunner(ffmpeg_exe)
    assert (await detect_encoder(ffmpeg, "libx264")).name == LIBX264

    choice = await detect_encoder(ffmpeg, "auto")
    # NVENC is used only where a real encode works; elsewhere (no GPU, or an H100) the reason says why.
    assert choice.name in ("h264_nvenc", LIBX264)
    if choice.name == LIBX264:
        assert "h264_nvenc" in choice.reason
    with pytest.raises(ValueError):
        await detect_encoder(ffmpeg, "'; rm -rf /")
