"""The composer against real ffmpeg and a real local store: tiny inputs, full-size output frames.

Most compositions use the 1:1 canvas and x264's superfast preset to stay cheap; the first test
uses the production preset. No test measures time.
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import itertools
import logging
import math
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import grpc
import pytest

from clipchat.errors import Conflict, DependencyUnavailable, InvalidInput, MediaError
from clipchat.media.encoder import LIBX264
from clipchat.media.ffmpeg import FfmpegRunner
from clipchat.media.probe import moov_before_mdat, probe
from clipchat.rpc import create_server
from clipchat.settings import Settings
from clipchat.storage.local import LocalStorage
from clipchat.v1 import common_pb2, composer_pb2, composer_pb2_grpc
from services.composer import server as composer_server
from services.composer.pipeline import ClipSpec, Composer, CompositionSpec, TransitionSpec
from services.composer.timeline import TRANSITIONS, plan_timeline

log = logging.getLogger(__name__)

WIDE = ["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25:duration=2"]  # 25 fps, longer than needed
SHORT = ["-f", "lavfi", "-i", "testsrc=size=320x180:rate=24:duration=1"]  # shorter than its 1.5 s slot
TALL = ["-f", "lavfi", "-i", "mandelbrot=size=180x320:rate=30", "-t", "1"]  # portrait
LONG = ["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30:duration=8"]
VFR = ["-f", "lavfi", "-i", "testsrc=size=320x240:rate=30:duration=2",
       "-vf", "select='lt(n\\,10)+gt(n\\,40)*not(mod(n\\,3))'", "-fps_mode", "vfr"]
TONE = ["-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=44100:duration=2"]

SLOTS = (1.5, 1.5, 1.0)  # seconds of the three clips: 45 + 45 + 30 frames, one 15-frame crossfade
TOTAL_FRAMES = 105


def solid(colour: str, seconds: float = 1.0, size: str = "320x240") -> list[str]:
    return ["-f", "lavfi", "-i", f"color=c={colour}:size={size}:rate=30:duration={seconds}"]


@dataclass(frozen=True)
class Sources:
    wide: Path
    short: Path
    tall: Path
    long: Path
    red: Path
    blue: Path
    vfr: Path
    rotated: Path
    toned: Path  # red picture with a loud 1 kHz tone
    music: Path  # 3 s AAC, mono 44.1 kHz
    music_mp3: Path  # 3 s
    music_wav: Path  # 0.5 s
    silence: Path  # 2 s of silence
    corrupt: Path
    disguised: Path  # an ffconcat script named like a clip


def render(ffmpeg: str, args: list[str], dest: Path, *, video: bool = True) -> Path:
    if dest.suffix in (".m4a", ".mp3", ".wav"):
        codec = {".m4a": ["-c:a", "aac"], ".mp3": ["-c:a", "libmp3lame"], ".wav": []}[dest.suffix]
    else:
        codec = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac"]
    subprocess.run([ffmpeg, "-nostdin", "-loglevel", "error", "-y", *args, *codec, str(dest)], check=True)
    return dest


@pytest.fixture(scope="module")
def sources(ffmpeg_exe: str, tmp_path_factory: pytest.TempPathFactory) -> Sources:
    folder = tmp_path_factory.mktemp("sources")
    wide = render(ffmpeg_exe, [*WIDE, *TONE, "-shortest"], folder / "wide.mp4")
    corrupt = folder / "corrupt.mp4"
    # A real MP4 header with the picture data cut off: it opens, but it does not decode.
    corrupt.write_bytes(wide.read_bytes()[:4096])
    disguised = folder / "disguised.mp4"
    disguised.write_text(f"ffconcat version 1.0\nfile {wide}\n")
    plain = render(ffmpeg_exe, ["-f", "lavfi", "-i", "testsrc2=size=320x180:rate=30:duration=1"],
                   folder / "landscape.mp4")
    rotated = folder / "rotated.mp4"
    subprocess.run([ffmpeg_exe, "-nostdin", "-loglevel", "error", "-y", "-display_rotation", "90", "-i",
                    str(plain), "-c", "copy", str(rotated)], check=True)
    return Sources(
        wide=wide, short=render(ffmpeg_exe, SHORT, folder / "short.mp4"),
        tall=render(ffmpeg_exe, TALL, folder / "tall.mp4"), long=render(ffmpeg_exe, LONG, folder / "long.mp4"),
        red=render(ffmpeg_exe, solid("red"), folder / "red.mp4"),
        blue=render(ffmpeg_exe, solid("blue"), folder / "blue.mp4"),
        vfr=render(ffmpeg_exe, VFR, folder / "vfr.mp4"), rotated=rotated,
        toned=render(ffmpeg_exe, [*solid("red", 2), *TONE, "-shortest"], folder / "toned.mp4"),
        music=render(ffmpeg_exe, ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=3",
                                  "-ac", "1"], folder / "music.m4a"),
        music_mp3=render(ffmpeg_exe, ["-f", "lavfi", "-i", "sine=frequency=330:duration=3", "-ac", "2"],
                         folder / "music.mp3"),
        music_wav=render(ffmpeg_exe, ["-f", "lavfi", "-i", "sine=frequency=550:duration=0.5"],
                         folder / "music.wav"),
        silence=render(ffmpeg_exe, ["-f", "lavfi", "-i", "anullsrc=r=48000:cl=stereo", "-t", "2"],
                       folder / "silence.m4a"),
        corrupt=corrupt, disguised=disguised)


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


@pytest.fixture
def work_root(tmp_path: Path) -> Path:
    root = tmp_path / "work"
    root.mkdir()
    return root


def settings_for(tmp_path: Path, preset: str = "superfast") -> Settings:
    return Settings(encoder=LIBX264, x264_preset=preset, data_dir=tmp_path, retry_base_seconds=0.01,
                    retry_max_seconds=0.05)


@pytest.fixture
def composer(storage: LocalStorage, ffmpeg_exe: str, work_root: Path, tmp_path: Path) -> Composer:
    return Composer(storage, FfmpegRunner(ffmpeg_exe), settings_for(tmp_path), work_root=work_root)


async def upload(storage: LocalStorage, path: Path) -> str:
    key = f"jobs/test/clips/{uuid.uuid4().hex}{path.suffix}"
    await storage.put_file(key, path)
    return key


async def make_spec(storage: LocalStorage, clips: list[Path], music: Path, durations: tuple[float, ...] = SLOTS,
                    transitions: list[TransitionSpec] | None = None, **fields: object) -> CompositionSpec:
    keys = [await upload(storage, clip) for clip in clips]
    if transitions is None:
        transitions = [TransitionSpec("crossfade", 0.5), TransitionSpec()][:len(clips) - 1]
    return CompositionSpec(
        job_id=str(uuid.uuid4()),
        clips=[ClipSpec(key, duration) for key, duration in zip(keys, durations, strict=True)],
        audio_key=await upload(storage, music), transitions=transitions, beat_timestamps=[],
        **fields)  # type: ignore[arg-type]


def output_path(storage: LocalStorage, key: str) -> Path:
    path = storage.local_path(key)
    assert path is not None and path.is_file()
    return path


def seconds(stream: av.stream.Stream) -> float:
    """A stream's duration in seconds, from its own header."""
    assert stream.duration is not None and stream.time_base is not None
    return float(stream.duration * stream.time_base)


def frame_hashes(path: Path) -> list[str]:
    """A hash of every decoded picture, to compare frames across files."""
    with av.open(str(path)) as container:
        return [hashlib.sha256(b"".join(bytes(plane) for plane in frame.planes)).hexdigest()
                for frame in container.decode(video=0)]


def small_frames(path: Path, fmt: str = "gray", size: tuple[int, int] = (64, 36)) -> list[bytes]:
    """Every picture shrunk (grey levels, or RGB triplets): cheap to compare with a tolerance."""
    with av.open(str(path)) as container:
        return [bytes(frame.reformat(width=size[0], height=size[1], format=fmt).planes[0])
                for frame in container.decode(video=0)]


def rgb_pixels(frame: bytes, width: int) -> list[tuple[int, int, int]]:
    """The pixels of a packed rgb24 picture ``width`` pixels wide (no row padding at these sizes)."""
    return [(frame[i], frame[i + 1], frame[i + 2]) for i in range(0, width * (len(frame) // (3 * width)) * 3, 3)]


def difference(a: bytes, b: bytes) -> int:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def audio_levels(path: Path, window: float = 0.05) -> list[float]:
    """RMS level of the first channel over consecutive windows of ``window`` seconds."""
    samples = array.array("f")
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            plane = array.array("f")
            plane.frombytes(bytes(frame.planes[0])[:frame.samples * 4])
            samples.extend(plane)
    per = int(48_000 * window)
    return [math.sqrt(sum(x * x for x in samples[i:i + per]) / per) for i in range(0, len(samples) - per + 1, per)]


def leftovers(folder: Path) -> list[Path]:
    return list(folder.iterdir())


def children() -> dict[int, str]:
    """Processes whose parent is this test process, with their command lines."""
    me = os.getpid()
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if int(fields[1]) == me:
                found[int(entry.name)] = command
    return found


async def wait_for_child(matching: str) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for pid, command in children().items():
            if matching in command:
                return pid
        await asyncio.sleep(0.01)
    raise AssertionError(f"no ffmpeg with {matching!r} started")


async def test_composes_h264_high_aac_of_exact_length(storage: LocalStorage, ffmpeg_exe: str, sources: Sources,
                                                      work_root: Path, tmp_path: Path) -> None:
    composer = Composer(storage, FfmpegRunner(ffmpeg_exe), settings_for(tmp_path, "veryfast"), work_root=work_root)
    spec = await make_spec(storage, [sources.wide, sources.short, sources.tall], sources.music)
    events: list[tuple[str, float, float | None]] = []

    async def on_progress(stage: str, fraction: float, eta: float | None) -> None:
        events.append((stage, fraction, eta))

    result = await composer.compose(spec, "jobs/test/videos/v1.mp4", on_progress=on_progress)

    assert (result.segments_encoded, result.segments_reused) == (4, 0)  # three bodies and a crossfade
    assert result.encoder == LIBX264
    assert result.duration == pytest.approx(TOTAL_FRAMES / 30, abs=1e-3)
    path = output_path(storage, result.video_key)
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.width, video.codec_context.height) == (1920, 1080)
        assert video.average_rate == Fraction(30)
        assert video.codec_context.name == "h264" and video.codec_context.profile == "High"
        assert video.codec_context.pix_fmt == "yuv420p"
        assert video.frames == TOTAL_FRAMES
        assert seconds(video) == pytest.approx(TOTAL_FRAMES / 30, abs=1e-3)
        assert audio.codec_context.name == "aac"
        assert audio.codec_context.sample_rate == 48_000 and audio.codec_context.channels == 2
        # Audio and video are exactly as long as each other, and start together.
        assert seconds(audio) == pytest.approx(TOTAL_FRAMES / 30, abs=1e-3)
        assert float(video.start_time * video.time_base) == pytest.approx(0, abs=1e-3)
        assert float(audio.start_time * audio.time_base) == pytest.approx(0, abs=1e-3)
        first = next(container.decode(video=0))
        assert (first.colorspace, first.color_primaries, first.color_trc, first.color_range) == (1, 1, 1, 1)
    assert await moov_before_mdat(path)

    stages = [stage for stage, _, _ in events]
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == [
        "downloading", "normalizing", "transitions", "encoding", "muxing", "uploading"]
    fractions = [fraction for _, fraction, _ in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert any(eta is not None and eta >= 0 for _, _, eta in events)
    assert leftovers(work_root) == []
    assert leftovers(storage.root / ".tmp") == []


async def test_every_transition_type(composer: Composer, storage: LocalStorage, sources: Sources) -> None:
    kinds = list({xfade: kind for kind, xfade in reversed(TRANSITIONS.items())}.values())  # one per xfade
    clips = [sources.red if i % 2 == 0 else sources.blue for i in range(len(kinds) + 1)]
    durations = tuple([13 / 30] * len(clips))  # room for 6-frame transitions on both sides
    spec = await make_spec(storage, clips, sources.music, durations,
                           [TransitionSpec(kind, 6 / 30) for kind in kinds], aspect_ratio="1:1", fit="crop")

    result = await composer.compose(spec, "jobs/test/videos/v1.mp4")

    timeline = plan_timeline(list(durations), [(kind, 6 / 30) for kind in kinds], [])
    frames = small_frames(output_path(storage, result.video_key), "rgb24", (16, 16))
    assert len(frames) == timeline.total_frames == 18 * 13 - 17 * 6

    def shares(frame: bytes) -> tuple[float, float]:
        pixels = rgb_pixels(frame, 16)
        red = sum(1 for r, g, b in pixels if r > 180 and b < 80) / len(pixels)
        blue = sum(1 for r, g, b in pixels if b > 180 and r < 80) / len(pixels)
        return red, blue

    segments = [s for s in timeline.segments]
    for segment in segments:
        middle = frames[segment.timeline_start + segment.frames // 2]
        if segment.kind == "body":
            colour = shares(middle)[0 if segment.clip_index % 2 == 0 else 1]
            assert colour > 0.95, f"body of clip {segment.clip_index + 1}"
            continue
        red, blue = shares(middle)
        brightness = sum(middle) / len(middle)
        label = f"{kinds[segment.clip_index]} ({segment.xfade})"
        if segment.xfade == "fadeblack":
            assert brightness < 70, label
        elif segment.xfade == "fadewhite":
            assert brightness > 170, label
        else:  # halfway through, the picture is neither clip alone
            assert red < 0.9 and blue < 0.9, label


@pytest.mark.parametrize("aspect_ratio", ["16:9", "9:16", "1:1"])
@pytest.mark.parametrize("fit", ["pad", "crop"])
async def test_every_aspect_ratio_with_fit_and_fill(composer: Composer, storage: LocalStorage, sources: Sources,
                                                    aspect_ratio: str, fit: str) -> None:
    # A 4:3 red picture fits none of the three shapes exactly.
    spec = await make_spec(storage, [sources.red], sources.music, (0.2,), [], aspect_ratio=aspect_ratio, fit=fit)

    result = await composer.compose(spec, "jobs/test/videos/v1.mp4")

    expected = {"16:9": (1920, 1080), "9:16": (1080, 1920), "1:1": (1080, 1080)}[aspect_ratio]
    info = await probe(output_path(storage, result.video_key))
    assert (info.width, info.height) == expected and info.frame_count == 6
    frame = small_frames(output_path(storage, result.video_key), "rgb24", (16, 16))[0]
    pixels = rgb_pixels(frame, 16)
    black = [i for i, (r, g, b) in enumerate(pixels) if r < 40 and g < 40 and b < 40]
    assert pixels[8 * 16 + 8][0] > 180  # the centre is the picture
    if fit == "crop":
        assert black == []
    else:
        rows_or_columns = {i % 16 for i in black} if aspect_ratio == "16:9" else {i // 16 for i in black}
        assert black and (0 in rows_or_columns and 15 in rows_or_columns)  # bars on both sides


async def test_a_rotated_phone_clip_is_shown_upright(composer: Composer, storage: LocalStorage,
                                                     sources: Sources) -> None:
    assert abs((await probe(sources.rotated)).rotation) == 90
    # 320x180 pixels that display as 180x320: upright, they fill a 9:16 frame exactly.
    spec = await make_spec(storage, [sources.rotated], sources.music, (0.5,), [], aspect_ratio="9:16")

    result = await composer.compose(spec, "jobs/test/videos/v1.mp4")

    frame = small_frames(output_path(storage, result.video_key), "gray", (9, 16))[0]
    rows = [frame[row * 9:(row + 1) * 9] for row in range(16)]
    assert max(rows[0]) > 40 and max(rows[-1]) > 40  # no letterbox bars above or below


def frame_gaps(path: Path) -> set[int]:
    """The distinct steps between consecutive frame timestamps (in the stream's time base)."""
    with av.open(str(path)) as container:
        pts = sorted(p.pts for p in container.demux(container.streams.video[0]) if p.pts is not None)
    return {b - a for a, b in itertools.pairwise(pts)}


async def test_a_variable_frame_rate_clip_becomes_30_fps(composer: Composer, storage: LocalStorage,
                                                         sources: Sources) -> None:
    assert len(frame_gaps(sources.vfr)) > 1  # the source really is irregular
    spec = await make_spec(storage, [sources.vfr], sources.music, (1.5,), [], aspect_ratio="1:1")

    result = await composer.compose(spec, "jobs/test/videos/v1.mp4")

    path = output_path(storage, result.video_key)
    assert (await probe(path)).frame_count == 45
    assert frame_gaps(path) == {1600}  # every frame 1/30 s (48 kHz ticks)


async def test_clip_sound_is_dropped_unless_mixed(composer: Composer, storage: LocalStorage,
                                                  sources: Sources) -> None:
    # A loud clip and one without any sound, over silent music.
    spec = await make_spec(storage, [sources.toned, sources.red], sources.silence, (0.5, 0.5), [],
                           aspect_ratio="1:1")

    dropped = await composer.compose(spec, "jobs/test/videos/v1.mp4")
    mixed = await composer.compose(replace(spec, mix_clip_audio=True), "jobs/test/videos/v2.mp4")

    assert max(audio_levels(output_path(storage, dropped.video_key))) < 0.001
    levels = audio_levels(output_path(storage, mixed.video_key))
    assert len(levels) == 20
    assert min(levels[1:9]) > 0.03  # the tone, under the first clip
    assert max(levels[11:]) < 0.001  # silence, under the clip that has no sound
    assert mixed.segments_encoded == 0  # the pictures were the same: only the sound was made again


async def test_a_one_frame_clip_between_crossfades(composer: Composer, storage: LocalStorage,
                                                   sources: Sources) -> None:
    spec = await make_spec(storage, [sources.red, sources.blue, sources.red], sources.music, (1.0, 1 / 30, 1.0),
                           [TransitionSpec("crossfade", 0.5), TransitionSpec("crossfade", 0.5)], aspect_ratio="1:1",
                           fit="crop")

    result = await composer.compose(spec, "jobs/test/videos/v1.mp4")

    frames = small_frames(output_path(storage, result.video_key), "rgb24", (4, 4))
    assert len(frames) == 61  # no room for the crossfades: they became cuts
    assert frames[30][2] > 180 and frames[30][0] < 80  # the single blue frame
    assert frames[29][0] > 180 and frames[31][0] > 180


async def test_cuts_snap_to_beats(composer: Composer, storage: LocalStorage, sources: Sources) -> None:
    spec = await make_spec(storage, [sources.red, sources.blue], sources.music, (1.0, 1.0), [], aspect_ratio="1:1",
                           fit="crop")

    result = await composer.compose(replace(spec, beat_timestamps=[0.8]), "jobs/test/videos/v1.mp4")

    frames = small_frames(output_path(storage, result.video_key), "rgb24", (4, 4))
    assert len(frames) == 60
    assert frames[23][0] > 180  # red up to the beat at 0.8 s (frame 24)
    assert frames[24][2] > 180 and frames[24][0] < 80  # blue from the beat


@pytest.mark.parametrize(("music", "ends_silent"), [("music_mp3", False), ("music_wav", True), ("music", False)])
async def test_music_is_fitted_to_the_video(composer: Composer, storage: LocalStorage, sources: Sources,
                                            music: str, ends_silent: bool) -> None:
    spec = await make_spec(storage, [sources.red], getattr(sources, music), (1.0,), [], aspect_ratio="1:1")

    result = await composer.compose(spec, "jobs/test/videos/v1.mp4")

    levels = audio_levels(output_path(storage, result.video_key))
    assert len(levels) == 20  # exactly the video's second
    assert min(levels[1:5]) > 0.05
    if ends_silent:  # 0.5 s of music, faded at its own end, then silence
        assert max(levels[11:]) < 0.001
        assert levels[9] < levels[4] / 2
    else:  # cut at the video's end, fading out over its last quarter second
        assert levels[-1] < levels[10] / 3


async def test_corrupt_clip_raises_media_error_naming_it(composer: Composer, storage: LocalStorage,
                                                         sources: Sources, work_root: Path) -> None:
    spec = await make_spec(storage, [sources.wide, sources.corrupt, sources.tall], sources.music)

    with pytest.raises(MediaError, match=r"^Clip 2 could not be read"):
        await composer.compose(spec, "jobs/test/videos/v1.mp4")

    assert not await storage.exists("jobs/test/videos/v1.mp4")
    assert leftovers(work_root) == []


async def test_a_script_posing_as_a_clip_is_refused(composer: Composer, storage: LocalStorage,
                                                    sources: Sources) -> None:
    spec = await make_spec(storage, [sources.disguised], sources.music, (1.0,), [])

    with pytest.raises(MediaError, match=r"^Clip 1 could not be read"):
        await composer.compose(spec, "jobs/test/videos/v1.mp4")


async def test_an_unknown_transition_is_refused_before_any_work(composer: Composer, storage: LocalStorage,
                                                                sources: Sources, work_root: Path) -> None:
    spec = await make_spec(storage, [sources.red, sources.blue], sources.music, (1.0, 1.0),
                           [TransitionSpec("fade'[x];movie=/etc/passwd", 0.5)])

    with pytest.raises(InvalidInput, match="Transition 1 has an unknown kind"):
        await composer.compose(spec, "jobs/test/videos/v1.mp4")
    assert leftovers(work_root) == []


@pytest.mark.parametrize(("replaced", "encoded"), [(0, 2), (1, 3), (2, 2)])
async def test_replacing_a_clip_gives_the_same_frames_as_a_full_recomposition(
        composer: Composer, storage: LocalStorage, sources: Sources, ffmpeg_exe: str, tmp_path: Path,
        replaced: int, encoded: int) -> None:
    clips = [sources.wide, sources.tall, sources.short]
    transitions = [TransitionSpec("crossfade", 0.3), TransitionSpec("wipeleft", 0.3)]
    spec = await make_spec(storage, clips, sources.music, (0.8, 0.8, 0.8), transitions, aspect_ratio="1:1")
    await composer.compose(spec, "jobs/test/videos/v1.mp4")
    new_clips = list(spec.clips)
    new_clips[replaced] = ClipSpec(await upload(storage, sources.red), 0.8)
    changed = replace(spec, clips=new_clips)

    # Incremental: the clip's body and the transitions touching it; the rest comes from the cache.
    incremental = await composer.compose(changed, "jobs/test/videos/v2.mp4")
    assert (incremental.segments_encoded, incremental.segments_reused) == (encoded, 5 - encoded)

    # The same job composed from nothing, in another store with an empty cache.
    other = LocalStorage(tmp_path / "other")
    for key in {c.video_key for c in changed.clips} | {changed.audio_key}:
        await other.put_file(key, output_path(storage, key))
    fresh = Composer(other, FfmpegRunner(ffmpeg_exe), settings_for(tmp_path), work_root=tmp_path / "work2")
    full = await fresh.compose(changed, "jobs/test/videos/v2.mp4")
    assert (full.segments_encoded, full.segments_reused) == (5, 0)

    assert frame_hashes(output_path(storage, incremental.video_key)) == frame_hashes(
        output_path(other, full.video_key))


SEVEN_SEGMENT_TRANSITIONS = [TransitionSpec("crossfade", 0.3), TransitionSpec("slideleft", 0.3),
                             TransitionSpec("fade", 0.3)]


async def seven_segments(storage: LocalStorage, sources: Sources) -> tuple[CompositionSpec, CompositionSpec]:
    """Four clips (seven segments, past the six the composers here run side by side) and the same
    with its second clip replaced."""
    clips = [sources.wide, sources.wide, sources.long, sources.vfr]
    spec = await make_spec(storage, clips, sources.music, (2.5, 2.5, 2.5, 1.0), SEVEN_SEGMENT_TRANSITIONS,
                           aspect_ratio="1:1")
    new_clips = list(spec.clips)
    new_clips[1] = ClipSpec(await upload(storage, sources.long), 2.5)
    return spec, replace(spec, clips=new_clips)


async def fresh_full_composition(storage: LocalStorage, spec: CompositionSpec, ffmpeg_exe: str,
                                 tmp_path: Path) -> bytes:
    """The bytes of ``spec`` composed from nothing (another store, an empty cache), one run at a time."""
    other = LocalStorage(tmp_path / "other")
    for key in {c.video_key for c in spec.clips} | {spec.audio_key}:
        await other.put_file(key, output_path(storage, key))
    fresh = Composer(other, FfmpegRunner(ffmpeg_exe), settings_for(tmp_path), work_root=tmp_path / "work2",
                     parallel_up_to=6)
    full = await fresh.compose(spec, "jobs/test/videos/v2.mp4")
    assert full.segments_encoded == 7
    return output_path(other, full.video_key).read_bytes()


async def test_a_recomposition_matches_a_full_composition_made_one_run_at_a_time(
        storage: LocalStorage, sources: Sources, ffmpeg_exe: str, work_root: Path, tmp_path: Path) -> None:
    # Seven segments, past the six this composer runs side by side: a full composition makes them
    # one at a time, each clip decoded once with its transitions' raw windows; the recomposition
    # after one change runs its three side by side, the transitions reading both clips themselves
    # (seeking into the first, a 2 s clip held past its end in a 2.5 s slot).
    composer = Composer(storage, FfmpegRunner(ffmpeg_exe), settings_for(tmp_path), work_root=work_root,
                        parallel_up_to=6)
    spec, changed = await seven_segments(storage, sources)
    first = await composer.compose(spec, "jobs/test/videos/v1.mp4")
    assert first.segments_encoded == 7
    for entry in await storage.list("cache/windows/"):  # without kept windows: read from the clips
        await storage.delete(entry.key)

    incremental = await composer.compose(changed, "jobs/test/videos/v2.mp4")
    assert (incremental.segments_encoded, incremental.segments_reused) == (3, 4)

    assert output_path(storage, incremental.video_key).read_bytes() == await fresh_full_composition(
        storage, changed, ffmpeg_exe, tmp_path)


class RecordingRunner(FfmpegRunner):
    """Runs ffmpeg and keeps the files each run read."""

    def __init__(self, ffmpeg_path: str) -> None:
        super().__init__(ffmpeg_path)
        self.inputs: list[str] = []

    async def run(self, args: Sequence[str], **kwargs: Any) -> None:
        self.inputs += [value for flag, value in itertools.pairwise(args) if flag == "-i"]
        await super().run(args, **kwargs)


async def test_a_recomposition_from_kept_windows_matches_a_full_composition(
        storage: LocalStorage, sources: Sources, ffmpeg_exe: str, work_root: Path, tmp_path: Path) -> None:
    # The full composition (one run at a time) keeps every transition's windows losslessly; after
    # one clip and one transition changed, the transitions read the neighbours' windows from
    # there, and no clip but the new one is decoded.
    runner = RecordingRunner(ffmpeg_exe)
    composer = Composer(storage, runner, settings_for(tmp_path), work_root=work_root, parallel_up_to=6)
    spec, changed = await seven_segments(storage, sources)
    await composer.compose(spec, "jobs/test/videos/v1.mp4")
    assert len(await storage.list("cache/windows/")) == 6
    changed = replace(changed, transitions=[*SEVEN_SEGMENT_TRANSITIONS[:2], TransitionSpec("circleopen", 0.3)])

    runner.inputs.clear()
    incremental = await composer.compose(changed, "jobs/test/videos/v2.mp4")
    assert (incremental.segments_encoded, incremental.segments_reused) == (4, 3)
    kept = [path for path in runner.inputs if "/cache/windows/" in path]
    assert len(kept) == 4  # clip 1's and clip 3's neighbours' windows; both of the changed transition's
    unchanged = {str(output_path(storage, c.video_key)) for number, c in enumerate(changed.clips) if number != 1}
    assert unchanged.isdisjoint(runner.inputs)
    assert len(await storage.list("cache/windows/")) == 6  # windows read from a clip are not kept again

    assert output_path(storage, incremental.video_key).read_bytes() == await fresh_full_composition(
        storage, changed, ffmpeg_exe, tmp_path)


async def test_a_damaged_kept_window_is_read_from_its_clip_instead(
        storage: LocalStorage, sources: Sources, ffmpeg_exe: str, work_root: Path, tmp_path: Path) -> None:
    # Kept windows are an aid: one the cache holds damaged is not trusted, the transition is made
    # from the clips, and the video is the same as a fresh full composition's.
    composer = Composer(storage, FfmpegRunner(ffmpeg_exe), settings_for(tmp_path), work_root=work_root,
                        parallel_up_to=6)
    spec, changed = await seven_segments(storage, sources)
    await composer.compose(spec, "jobs/test/videos/v1.mp4")
    kept = await storage.list("cache/windows/")
    assert len(kept) == 6
    for entry in kept:
        output_path(storage, entry.key).write_bytes(b"not a video")

    incremental = await composer.compose(changed, "jobs/test/videos/v2.mp4")
    assert (incremental.segments_encoded, incremental.segments_reused) == (3, 4)
    # The two it read (clip 1's tail, clip 3's head) are dropped, not read again by the next change.
    assert len(await storage.list("cache/windows/")) == 4

    assert output_path(storage, incremental.video_key).read_bytes() == await fresh_full_composition(
        storage, changed, ffmpeg_exe, tmp_path)


async def test_changing_one_transition_reencodes_exactly_one_segment(composer: Composer, storage: LocalStorage,
                                                                     sources: Sources) -> None:
    spec = await make_spec(storage, [sources.wide, sources.tall, sources.short], sources.music, (0.8, 0.8, 0.8),
                           [TransitionSpec("crossfade", 0.3), TransitionSpec("crossfade", 0.3)], aspect_ratio="1:1")
    await composer.compose(spec, "jobs/test/videos/v1.mp4")
    before = composer.cache_stats

    changed = replace(spec, transitions=[TransitionSpec("dip_white", 0.3), TransitionSpec("crossfade", 0.3)])
    result = await composer.compose(changed, "jobs/test/videos/v2.mp4")

    after = composer.cache_stats
    assert after.misses - before.misses == 1  # the new transition; every other segment and the music hit
    assert after.stores - before.stores == 1
    assert after.hits - before.hits == 5  # three bodies, the other transition, the soundtrack
    assert (result.segments_encoded, result.segments_reused) == (1, 4)


async def test_segments_share_their_encoder_headers(composer: Composer, storage: LocalStorage,
                                                    sources: Sources) -> None:
    # Joining by stream copy needs one SPS/PPS for all: every segment must carry the same.
    spec = await make_spec(storage, [sources.wide, sources.tall, sources.vfr], sources.music, (0.8, 0.8, 0.8),
                           [TransitionSpec("crossfade", 0.3), TransitionSpec("slideup", 0.3)], aspect_ratio="1:1")
    await composer.compose(spec, "jobs/test/videos/v1.mp4")

    headers = set()
    for entry in await storage.list("cache/segments/"):
        with av.open(str(output_path(storage, entry.key))) as container:
            headers.add(bytes(container.streams.video[0].codec_context.extradata or b""))
    assert len(headers) == 1 and next(iter(headers))


async def test_existing_output_is_never_overwritten(composer: Composer, storage: LocalStorage,
                                                    sources: Sources) -> None:
    spec = await make_spec(storage, [sources.tall], sources.music, durations=(1.0,))
    await storage.put_bytes("jobs/test/videos/v1.mp4", b"the current version")

    with pytest.raises(Conflict):
        await composer.compose(spec, "jobs/test/videos/v1.mp4")
    assert await storage.get_bytes("jobs/test/videos/v1.mp4") == b"the current version"


async def test_cancel_while_encoding_leaves_no_process_or_temp_file(
        composer: Composer, storage: LocalStorage, sources: Sources, work_root: Path) -> None:
    spec = await make_spec(storage, [sources.long], sources.music, durations=(8.0,), transitions=[])
    stages: list[str] = []

    async def on_progress(stage: str, fraction: float, eta: float | None) -> None:
        stages.append(stage)

    task = asyncio.create_task(composer.compose(spec, "jobs/test/videos/v1.mp4", on_progress=on_progress))
    await wait_for_child("libx264")
    await asyncio.sleep(0.3)  # well into the segment encode
    assert not task.done() and stages[-1] == "normalizing"

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert {pid: command for pid, command in children().items() if "ffmpeg" in command} == {}
    assert leftovers(work_root) == []
    assert leftovers(storage.root / ".tmp") == []
    assert not await storage.exists("jobs/test/videos/v1.mp4")
    assert await storage.list("cache/segments/") == []


async def test_a_killed_ffmpeg_is_retried(composer: Composer, storage: LocalStorage, sources: Sources,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="clipchat.retry")
    spec = await make_spec(storage, [sources.long], sources.music, durations=(8.0,), transitions=[])

    task = asyncio.create_task(composer.compose(spec, "jobs/test/videos/v1.mp4"))
    os.kill(await wait_for_child("libx264"), signal.SIGKILL)  # as the kernel's OOM killer would
    result = await task

    assert (await probe(output_path(storage, result.video_key))).frame_count == 240
    retries = [r for r in caplog.records if r.getMessage() == "retry.scheduled"]
    assert retries and getattr(retries[0], "error", "") == "FfmpegKilled"


class FlakyStorage(LocalStorage):
    """A store that behaves like a remote one (no local paths) and fails each first transfer."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failed: set[tuple[str, str]] = set()

    def local_path(self, key: str) -> Path | None:
        return None

    def _fail_once(self, operation: str, key: str) -> None:
        if (operation, key) not in self.failed:
            self.failed.add((operation, key))
            raise DependencyUnavailable("Storage is unavailable right now.")

    async def get_file(self, key: str, dest: Path) -> None:
        self._fail_once("get", key)
        await super().get_file(key, dest)

    async def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        if key.startswith("jobs/test/videos/"):
            self._fail_once("put", key)
        await super().put_file(key, path, content_type=content_type)


async def test_transient_download_and_upload_failures_are_retried(
        ffmpeg_exe: str, sources: Sources, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="clipchat.retry")
    storage = FlakyStorage(tmp_path / "remote")
    composer = Composer(storage, FfmpegRunner(ffmpeg_exe), settings_for(tmp_path), work_root=tmp_path / "work")
    spec = await make_spec(storage, [sources.red, sources.blue], sources.music, (0.3, 0.3), [], aspect_ratio="1:1")

    result = await composer.compose(spec, "jobs/test/videos/v1.mp4")

    assert result.segments_encoded == 2
    assert ("put", "jobs/test/videos/v1.mp4") in storage.failed and ("get", spec.audio_key) in storage.failed
    errors = {getattr(r, "error", "") for r in caplog.records if r.getMessage() == "retry.scheduled"}
    assert errors == {"DependencyUnavailable"}
    assert leftovers(tmp_path / "work") == []


async def test_a_missing_clip_fails_at_once_naming_it(composer: Composer, storage: LocalStorage,
                                                      sources: Sources, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="clipchat.retry")
    spec = await make_spec(storage, [sources.red, sources.blue], sources.music, (0.3, 0.3), [])
    spec = replace(spec, clips=[spec.clips[0], ClipSpec("jobs/test/clips/gone.mp4", 0.3)])

    with pytest.raises(MediaError, match=r"^Clip 2 could not be found"):
        await composer.compose(spec, "jobs/test/videos/v1.mp4")
    assert not [r for r in caplog.records if r.getMessage() == "retry.scheduled"]


# --- the streaming Compose RPC, over real gRPC -------------------------------------------------


def compose_request(spec: CompositionSpec, output_key: str) -> composer_pb2.ComposeRequest:
    return composer_pb2.ComposeRequest(
        job_id=spec.job_id, audio_key=spec.audio_key, output_key=output_key, aspect_ratio=spec.aspect_ratio,
        fit=spec.fit, beat_timestamps=spec.beat_timestamps,
        clips=[common_pb2.Clip(video_key=c.video_key, duration=c.duration) for c in spec.clips],
        transitions=[common_pb2.Transition(kind=t.kind, duration=t.duration) for t in spec.transitions])


@pytest.fixture
async def composer_stub(composer: Composer) -> AsyncIterator[composer_pb2_grpc.ComposerServiceStub]:
    server = await create_server([(composer_server.add_to_server, composer_server.ComposerServicer(composer),
                                   composer_server.SERVICE_NAME)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield composer_pb2_grpc.ComposerServiceStub(channel)
    await server.stop(grace=0)


async def test_compose_rpc_streams_progress_then_the_result(composer_stub: composer_pb2_grpc.ComposerServiceStub,
                                                            storage: LocalStorage, sources: Sources) -> None:
    spec = await make_spec(storage, [sources.wide, sources.tall], sources.music, durations=(1.0, 1.0),
                           aspect_ratio="1:1")
    messages = [m async for m in composer_stub.Compose(compose_request(spec, "jobs/test/videos/v1.mp4"),
                                                       timeout=300)]

    *progress, last = messages
    assert progress and all(0.0 <= m.fraction <= 1.0 for m in progress)
    assert {m.stage for m in progress} >= {common_pb2.STAGE_NORMALIZING}
    assert last.stage == common_pb2.STAGE_DONE and last.HasField("result")
    assert last.result.video_key == "jobs/test/videos/v1.mp4" and last.result.encoder == LIBX264
    assert last.result.segments_encoded >= 2
    with av.open(str(output_path(storage, "jobs/test/videos/v1.mp4"))) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert abs(seconds(container.streams.video[0]) - last.result.duration) < 0.1


async def test_compose_rpc_refuses_a_request_without_clips(
        composer_stub: composer_pb2_grpc.ComposerServiceStub) -> None:
    call = composer_stub.Compose(composer_pb2.ComposeRequest(audio_key="jobs/test/a.m4a",
                                                             output_key="jobs/test/videos/v1.mp4"), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_closing_the_compose_stream_stops_ffmpeg(composer_stub: composer_pb2_grpc.ComposerServiceStub,
                                                       storage: LocalStorage, sources: Sources,
                                                       work_root: Path) -> None:
    spec = await make_spec(storage, [sources.long], sources.music, durations=(8.0,), transitions=[])
    call = composer_stub.Compose(compose_request(spec, "jobs/test/videos/v1.mp4"), timeout=300)
    await call.read()  # the first progress message: the work is under way
    await wait_for_child("libx264")

    call.cancel()

    for _ in range(1200):  # the server sees the cancel, kills ffmpeg and cleans up (at most a minute)
        if not any("ffmpeg" in command for command in children().values()) and not leftovers(work_root):
            break
        await asyncio.sleep(0.05)
    assert {pid: command for pid, command in children().items() if "ffmpeg" in command} == {}
    assert leftovers(work_root) == []
    assert not await storage.exists("jobs/test/videos/v1.mp4")
