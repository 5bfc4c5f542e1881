"""Compose a job's clips and music into one H.264/AAC MP4, one cached segment per clip.

The timeline is kept in whole frames at 30 fps. Every clip is normalized (size, rate, pixel format,
colour tags) and encoded on its own as an MP4 segment with identical encoder parameters, starting
on an IDR frame, so the segments join by stream copy. Segments are cached in storage under a hash
of everything that determines their bytes: recomposing after one clip changed re-encodes that
clip only. The music is trimmed to the video's length and encoded once, then everything is muxed
by copy, checked, and uploaded to a new key.

No user or model text reaches ffmpeg: its arguments are numbers computed here and paths of files
this process made (its work folder, or the local store's own files).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from clipchat.errors import Conflict, InvalidInput, MediaError, NotFound
from clipchat.media.encoder import EncoderChoice, detect_encoder, video_encoder_args
from clipchat.media.ffmpeg import FfmpegError, FfmpegRunner
from clipchat.media.probe import probe
from clipchat.settings import Settings
from clipchat.storage import ObjectInfo, Storage, check_key

log = logging.getLogger("clipchat.composer")

# Bump when a change here alters segment bytes, so stale cached segments are not reused.
PIPELINE_VERSION = "1"
FPS = 30
AUDIO_SAMPLE_RATE = 48_000
SAMPLES_PER_FRAME = AUDIO_SAMPLE_RATE // FPS  # 1,600: audio and video lengths match exactly
AUDIO_BITRATE = "192k"
FADE_OUT_SECONDS = 1.0
# 512 ticks a frame at 30 fps: every segment shares it, so concatenated timestamps stay exact.
VIDEO_TIMESCALE = 15_360
SEGMENT_CACHE_PREFIX = "cache/segments"
AUDIO_CACHE_PREFIX = "cache/audio"
MAX_CLIP_SECONDS = 600.0

FRAME_SIZES: dict[str, tuple[int, int]] = {"16:9": (1920, 1080), "9:16": (1080, 1920), "1:1": (1080, 1080)}
FITS = ("pad", "crop")

Stage = Literal["downloading", "normalizing", "transitions", "encoding", "muxing", "uploading"]
STAGES: tuple[Stage, ...] = ("downloading", "normalizing", "transitions", "encoding", "muxing", "uploading")

# Called with (stage, fraction of the whole composition 0..1, estimated seconds left or None).
ProgressFn = Callable[[str, float, float | None], Awaitable[None]]

T = TypeVar("T")


@dataclass(frozen=True)
class ClipSpec:
    video_key: str  # storage key of the clip's video
    duration: float  # seconds it occupies on the timeline


@dataclass(frozen=True)
class TransitionSpec:
    kind: str = "cut"
    duration: float = 0.0


@dataclass(frozen=True)
class CompositionSpec:
    job_id: str
    clips: list[ClipSpec]
    audio_key: str
    transitions: list[TransitionSpec]  # one per boundary (len(clips) - 1), or empty for all cuts
    beat_timestamps: list[float]
    aspect_ratio: str = "16:9"
    fit: str = "pad"  # "pad" (letterbox) or "crop" (fill)


@dataclass(frozen=True)
class CompositionResult:
    video_key: str
    duration: float  # seconds
    encoder: str
    segments_encoded: int
    segments_reused: int
    seconds: float  # wall time of the composition


@dataclass(frozen=True)
class Canvas:
    """The output picture every segment is normalized to."""

    width: int
    height: int
    fit: str


@dataclass(frozen=True)
class SegmentPlan:
    """One piece of the timeline, encoded on its own and joined to the others by stream copy.

    ``kind`` is "clip" for a clip's body. A transition segment (see
    ``Composer._transition_segments``) takes ``overlap_before`` frames from the end of the clip
    before it and ``overlap_after`` from the start of the clip after it; those clips' bodies are
    shortened by as much.
    """

    kind: str
    clip_index: int  # the clip shown (for a transition: the clip before it)
    start_frame: int  # first frame of the clip used, counted at 30 fps from its start
    frames: int
    overlap_before: int = 0
    overlap_after: int = 0

    @property
    def label(self) -> str:
        return f"clip {self.clip_index + 1}"


@dataclass
class _Segment:
    plan: SegmentPlan
    cache_key: str
    cached: bool = False  # found in the cache when the composition started
    path: Path | None = None  # the local file once encoded or fetched


class Composer:
    """Composes jobs; one instance serves many compositions (the encoder is detected once).

    ``work_root`` is where per-composition work folders are made (the system temp folder when None).
    """

    def __init__(self, storage: Storage, ffmpeg: FfmpegRunner, settings: Settings, *,
                 work_root: Path | None = None) -> None:
        self._storage = storage
        self._ffmpeg = ffmpeg
        self._settings = settings
        self._work_root = work_root
        self._encoder: EncoderChoice | None = None
        self._encoder_lock = asyncio.Lock()

    async def encoder(self) -> EncoderChoice:
        """The encoder this composer uses, detected on first use from ``settings.encoder``."""
        async with self._encoder_lock:
            if self._encoder is None:
                self._encoder = await detect_encoder(self._ffmpeg, self._settings.encoder)
            return self._encoder

    async def compose(self, spec: CompositionSpec, output_key: str, *,
                      on_progress: ProgressFn | None = None) -> CompositionResult:
        """Compose ``spec`` and upload the MP4 to ``output_key``.

        Raises ``InvalidInput`` for an impossible spec (no clips, bad durations, unknown aspect
        ratio), ``Conflict`` when ``output_key`` exists, ``MediaError`` naming the clip or track
        that cannot be read (or when the result fails its checks; nothing is uploaded then),
        ``FfmpegKilled``/``TransientError`` and storage errors for failures a retry may fix.
        Cancelling the task stops ffmpeg; the work folder is removed in every case.
        """
        started = time.monotonic()
        check_key(output_key)
        canvas = _canvas(spec)
        plans = self._plan_timeline(spec)
        total_frames = sum(plan.frames for plan in plans)
        extra = {"job_id": spec.job_id, "output_key": output_key}
        if await self._storage.exists(output_key):
            raise Conflict("This video version already exists.")
        encoder = await self.encoder()
        encoder_args = video_encoder_args(encoder.name, x264_preset=self._settings.x264_preset)
        log.info("compose.started", extra={**extra, "clips": len(spec.clips), "frames": total_frames,
                                            "encoder": encoder.name})

        sources = await self._stat_sources(spec)
        segments = [_Segment(plan, _segment_cache_key(plan, sources, canvas, encoder_args)) for plan in plans]
        for segment in segments:
            segment.cached = await self._storage.exists(segment.cache_key)
        audio_cache_key = _audio_cache_key(sources[-1], total_frames)
        audio_cached = await self._storage.exists(audio_cache_key)
        to_encode = [segment for segment in segments if not segment.cached]
        progress = _Progress(on_progress, started, _stage_weights(
            frames_to_encode=sum(s.plan.frames for s in to_encode), total_frames=total_frames,
            audio_cached=audio_cached))

        if self._work_root is not None:
            self._work_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="clipchat-compose-", dir=self._work_root))
        try:
            await progress.report("downloading", 0.0)
            clip_files = await self._fetch_clips(spec, sorted({s.plan.clip_index for s in to_encode}), work,
                                                 progress)
            await progress.report("downloading", 1.0)

            encoded, reused = await self._prepare_segments(spec, segments, clip_files, canvas, encoder_args,
                                                           work, progress)
            await progress.report("transitions", 1.0)

            await progress.report("encoding", 0.0)
            audio = await self._prepare_audio(spec, audio_cache_key, audio_cached, total_frames, work,
                                              progress.stage("encoding"))

            await progress.report("muxing", 0.0)
            output = work / "output.mp4"
            await self._mux(segments, audio, output, total_frames, work, progress.stage("muxing"))
            duration = await _validate_output(output, canvas, total_frames, spec.job_id)

            await progress.report("uploading", 0.0)
            await _settled(self._storage.put_file(output_key, output, content_type="video/mp4"))
            await progress.report("uploading", 1.0)
        except asyncio.CancelledError:
            log.info("compose.cancelled", extra=extra)
            raise
        except Exception as exc:
            log.warning("compose.failed", extra={**extra, "error": type(exc).__name__,
                                                  "code": getattr(exc, "code", None),
                                                  "detail": getattr(exc, "detail", "")[-2000:]})
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)

        seconds = time.monotonic() - started
        log.info("compose.finished", extra={**extra, "seconds": round(seconds, 3), "encoder": encoder.name,
                                             "segments_encoded": encoded, "segments_reused": reused})
        return CompositionResult(video_key=output_key, duration=duration, encoder=encoder.name,
                                 segments_encoded=encoded, segments_reused=reused, seconds=seconds)

    # --- timeline -------------------------------------------------------------------------

    def _plan_timeline(self, spec: CompositionSpec) -> list[SegmentPlan]:
        """The segments of the timeline in order: clip bodies, with transition segments between."""
        if not spec.clips:
            raise InvalidInput("A video needs at least one clip.")
        if spec.transitions and len(spec.transitions) != len(spec.clips) - 1:
            raise InvalidInput("There must be one transition between each pair of clips.")
        clip_frames = [_clip_frames(clip.duration, index) for index, clip in enumerate(spec.clips)]
        transitions = self._transition_segments(spec, clip_frames)
        plans: list[SegmentPlan] = []
        for index, frames in enumerate(clip_frames):
            before = transitions.get(index - 1)
            after = transitions.get(index)
            head = before.overlap_after if before else 0
            tail = after.overlap_before if after else 0
            plans.append(SegmentPlan("clip", index, start_frame=head, frames=frames - head - tail))
            if after:
                plans.append(after)
        return plans

    def _transition_segments(self, spec: CompositionSpec, clip_frames: list[int]) -> dict[int, SegmentPlan]:
        """The segment replacing the cut after clip ``i``, for each boundary ``i`` that has one.

        Richer transitions (crossfades, wipes, dips) plug in here: each returns a ``SegmentPlan``
        of its own kind with the overlaps it borrows from its neighbours. Until then every
        boundary is a cut, whatever kind the spec names, so the map is empty.
        """
        for transition in spec.transitions:
            if not math.isfinite(transition.duration) or transition.duration < 0:
                raise InvalidInput("A transition's duration must be zero or more seconds.")
        return {}

    # --- inputs -----------------------------------------------------------------------------

    async def _stat_sources(self, spec: CompositionSpec) -> list[ObjectInfo]:
        """Size and time of every clip, then of the music (last); cache keys are built from them."""
        keys = [(clip.video_key, f"clip {i + 1}") for i, clip in enumerate(spec.clips)]
        keys.append((spec.audio_key, "music track"))
        infos = []
        for key, label in keys:
            try:
                infos.append(await self._storage.stat(check_key(key)))
            except (NotFound, InvalidInput) as exc:
                raise MediaError(f"{label.capitalize()} could not be found.") from exc
        return infos

    async def _fetch_clips(self, spec: CompositionSpec, indexes: list[int], work: Path,
                           progress: _Progress) -> dict[int, Path]:
        """Download and check the clips that have segments to encode."""
        files: dict[int, Path] = {}
        for done, index in enumerate(indexes):
            files[index] = await self._fetch_clip(spec, index, work)
            await progress.report("downloading", (done + 1) / (len(indexes) + 1))
        return files

    async def _fetch_clip(self, spec: CompositionSpec, index: int, work: Path) -> Path:
        label = f"clip {index + 1}"
        path = await self._fetch_source(spec.clips[index].video_key, work / f"clip-{index:03d}", label)
        info = await probe(path, label=label)
        if not info.has_video:
            raise MediaError(f"{label.capitalize()} has no video.")
        return path

    async def _fetch_source(self, key: str, dest: Path, label: str) -> Path:
        """``_fetch`` for a job's input: a missing object is the input's fault (``MediaError``)."""
        try:
            return await self._fetch(key, dest)
        except NotFound as exc:
            raise MediaError(f"{label.capitalize()} could not be found.") from exc

    async def _fetch(self, key: str, dest: Path) -> Path:
        """A local file with ``key``'s bytes: the store's own file when it is a local folder.

        Raises ``NotFound``.
        """
        local = self._storage.local_path(key)
        if local is not None and local.is_file():
            return local
        await _settled(self._storage.get_file(key, dest))
        return dest

    # --- video segments ---------------------------------------------------------------------

    async def _prepare_segments(self, spec: CompositionSpec, segments: list[_Segment],
                                clip_files: dict[int, Path], canvas: Canvas, encoder_args: list[str],
                                work: Path, progress: _Progress) -> tuple[int, int]:
        """Give every segment a local file: fetched from the cache, or encoded and cached."""
        extra = {"job_id": spec.job_id}
        encoded = reused = 0
        frames_to_encode = sum(s.plan.frames for s in segments if not s.cached) or 1
        frames_done = 0
        await progress.report("normalizing", 0.0)
        for number, segment in enumerate(segments):
            plan = segment.plan
            dest = work / f"segment-{number:03d}.mp4"
            if segment.cached:
                segment.path = await self._reuse_segment(segment, dest)
                if segment.path is not None:
                    reused += 1
                    log.info("compose.segment_reused", extra={**extra, "segment": segment.cache_key,
                                                               "clip": plan.clip_index})
                    continue
                # Evicted since it was looked up: encode it after all.
                frames_to_encode += plan.frames
            if plan.clip_index not in clip_files:
                clip_files[plan.clip_index] = await self._fetch_clip(spec, plan.clip_index, work)
            on_fraction = progress.span("normalizing", frames_done / frames_to_encode,
                                        plan.frames / frames_to_encode)
            source = clip_files[plan.clip_index]
            await self._encode_segment(plan, source, canvas, encoder_args, dest, on_fraction)
            segment.path = dest
            encoded += 1
            frames_done += plan.frames
            log.info("compose.segment_encoded", extra={**extra, "segment": segment.cache_key,
                                                        "clip": plan.clip_index, "frames": plan.frames})
            await self._store_in_cache(segment.cache_key, dest)
        await progress.report("normalizing", 1.0)
        return encoded, reused

    async def _reuse_segment(self, segment: _Segment, dest: Path) -> Path | None:
        """The cached segment as a local file, or None when it has gone meanwhile."""
        try:
            # Marks it recently used, so cache eviction keeps it.
            await self._storage.touch(segment.cache_key)
            return await self._fetch(segment.cache_key, dest)
        except NotFound:
            return None

    async def _encode_segment(self, plan: SegmentPlan, source: Path, canvas: Canvas, encoder_args: list[str],
                              dest: Path, on_fraction: Callable[[float], Awaitable[None]]) -> None:
        """Normalize ``plan.frames`` frames of ``source`` to ``canvas`` and encode them to ``dest``.

        Raises ``FfmpegError`` naming the clip when its picture data breaks off mid-way.
        """
        try:
            await self._ffmpeg.run(
                ["-i", str(source), "-map", "0:v:0", "-an", "-sn", "-dn", "-map_metadata", "-1",
                 "-filter:v", _clip_filter(plan, canvas), "-frames:v", str(plan.frames),
                 *encoder_args, *_SEGMENT_OUTPUT_ARGS, "-f", "mp4", str(dest)],
                expected_duration=plan.frames / FPS, on_progress=on_fraction)
        except FfmpegError as exc:
            raise FfmpegError(f"{plan.label.capitalize()} could not be processed.", detail=exc.detail,
                              returncode=exc.returncode) from exc

    async def _store_in_cache(self, key: str, path: Path) -> None:
        try:
            await _settled(self._storage.put_file(key, path, content_type="video/mp4"))
        except Conflict:
            pass  # another composition cached the same segment first; the bytes are equivalent

    # --- audio and output -------------------------------------------------------------------

    async def _prepare_audio(self, spec: CompositionSpec, cache_key: str, cached: bool, total_frames: int,
                             work: Path, on_fraction: Callable[[float], Awaitable[None]]) -> Path:
        """The music as AAC, exactly ``total_frames`` long with a fade-out: cached or encoded."""
        dest = work / "music.m4a"
        if cached:
            with contextlib.suppress(NotFound):
                await self._storage.touch(cache_key)
                return await self._fetch(cache_key, dest)
        music = await self._fetch_source(spec.audio_key, work / "music", "music track")
        info = await probe(music, label="music track")
        if not info.has_audio:
            raise MediaError("The music track has no audio.")
        await self._ffmpeg.run(
            ["-i", str(music), "-map", "0:a:0", "-vn", "-sn", "-dn", "-map_metadata", "-1",
             "-filter:a", _audio_filter(total_frames * SAMPLES_PER_FRAME),
             "-c:a", "aac", "-b:a", AUDIO_BITRATE, "-ar", str(AUDIO_SAMPLE_RATE), "-ac", "2",
             "-movflags", "+faststart", "-f", "mp4", str(dest)],
            expected_duration=total_frames / FPS, on_progress=on_fraction)
        log.info("compose.audio_encoded", extra={"job_id": spec.job_id, "frames": total_frames})
        await self._store_in_cache(cache_key, dest)
        return dest

    async def _mux(self, segments: list[_Segment], audio: Path, output: Path, total_frames: int, work: Path,
                   on_fraction: Callable[[float], Awaitable[None]]) -> None:
        """Join the segments and the music by stream copy into ``output``."""
        listing = work / "segments.ffconcat"
        lines = ["ffconcat version 1.0"]
        for segment in segments:
            assert segment.path is not None
            lines.append(f"file {_concat_quote(segment.path)}")
        listing.write_text("\n".join(lines) + "\n", encoding="utf-8")
        await self._ffmpeg.run(
            ["-f", "concat", "-safe", "0", "-i", str(listing), "-i", str(audio),
             "-map", "0:v:0", "-map", "1:a:0", "-c", "copy", "-map_metadata", "-1",
             "-movflags", "+faststart", "-f", "mp4", str(output)],
            expected_duration=total_frames / FPS, on_progress=on_fraction)


# Output options every segment shares, so they join by copy and play with the right colours.
_SEGMENT_OUTPUT_ARGS = [
    "-pix_fmt", "yuv420p", "-color_primaries", "bt709", "-color_trc", "bt709", "-colorspace", "bt709",
    "-color_range", "tv", "-video_track_timescale", str(VIDEO_TIMESCALE), "-movflags", "+faststart",
]


def _canvas(spec: CompositionSpec) -> Canvas:
    if spec.aspect_ratio not in FRAME_SIZES:
        raise InvalidInput(f"Unsupported aspect ratio; use one of {', '.join(FRAME_SIZES)}.")
    if spec.fit not in FITS:
        raise InvalidInput(f"Unsupported fit; use one of {', '.join(FITS)}.")
    width, height = FRAME_SIZES[spec.aspect_ratio]
    return Canvas(width, height, spec.fit)


def _clip_frames(duration: float, index: int) -> int:
    if not math.isfinite(duration) or duration <= 0 or duration > MAX_CLIP_SECONDS:
        raise InvalidInput(f"Clip {index + 1} needs a duration between 0 and {MAX_CLIP_SECONDS:g} seconds.")
    return max(1, round(duration * FPS))


def _clip_filter(plan: SegmentPlan, canvas: Canvas) -> str:
    """The filter graph for a clip body: frames ``start_frame`` to ``start_frame + frames`` at 30 fps.

    A source shorter than that holds its last frame (tpad clone) rather than ending early.
    """
    w, h = canvas.width, canvas.height
    if canvas.fit == "crop":
        fit = (f"scale={w}:{h}:force_original_aspect_ratio=increase:out_color_matrix=bt709:out_range=tv,"
               f"crop={w}:{h}")
    else:
        fit = (f"scale={w}:{h}:force_original_aspect_ratio=decrease:force_divisible_by=2:"
               f"out_color_matrix=bt709:out_range=tv,pad={w}:{h}:(ow-iw)/2:(oh-ih)/2:color=black")
    end = plan.start_frame + plan.frames
    return (f"setpts=PTS-STARTPTS,fps={FPS},{fit},setsar=1,format=yuv420p,"
            f"tpad=stop_mode=clone:stop={end},trim=start_frame={plan.start_frame}:end_frame={end},"
            f"setpts=PTS-STARTPTS")


def _audio_filter(samples: int) -> str:
    """Music resampled to 48 kHz stereo, cut or padded with silence to exactly ``samples``."""
    fade = min(round(FADE_OUT_SECONDS * AUDIO_SAMPLE_RATE), samples // 4)
    return (f"asetpts=PTS-STARTPTS,aresample={AUDIO_SAMPLE_RATE},"
            f"aformat=sample_fmts=fltp:channel_layouts=stereo,apad=whole_len={samples},"
            f"atrim=end_sample={samples},afade=t=out:start_sample={samples - fade}:nb_samples={max(fade, 1)}")


def _segment_cache_key(plan: SegmentPlan, sources: list[ObjectInfo], canvas: Canvas,
                       encoder_args: list[str]) -> str:
    """Storage key of a segment: a hash of everything that determines its bytes.

    A clip body is made from its clip; a transition segment also from the clip after it.
    """
    used = [plan.clip_index] if plan.kind == "clip" else [plan.clip_index, plan.clip_index + 1]
    material = {
        "version": PIPELINE_VERSION, "kind": plan.kind,
        "sources": [[sources[index].key, sources[index].size] for index in used],
        "start_frame": plan.start_frame, "frames": plan.frames, "fps": FPS,
        "canvas": [canvas.width, canvas.height, canvas.fit], "filter": _clip_filter(plan, canvas),
        "encoder": encoder_args, "output": _SEGMENT_OUTPUT_ARGS,
    }
    return f"{SEGMENT_CACHE_PREFIX}/{_digest(material)}.mp4"


def _audio_cache_key(music: ObjectInfo, total_frames: int) -> str:
    material = {
        "version": PIPELINE_VERSION, "source": [music.key, music.size],
        "filter": _audio_filter(total_frames * SAMPLES_PER_FRAME), "codec": ["aac", AUDIO_BITRATE, 2],
    }
    return f"{AUDIO_CACHE_PREFIX}/{_digest(material)}.m4a"


def _digest(material: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _concat_quote(path: Path) -> str:
    # The concat demuxer's quoting: inside '…' only a quote itself needs escaping.
    return "'" + str(path).replace("'", "'\\''") + "'"


async def _validate_output(output: Path, canvas: Canvas, total_frames: int, job_id: str) -> float:
    """Check the composed file before anyone sees it; returns its duration in seconds.

    Raises ``MediaError`` when it is not the expected H.264/AAC video of the expected length.
    """
    expected = total_frames / FPS
    info = await probe(output, label="composed video")
    tolerance = 1 / FPS + 1e-3
    problems = []
    if (info.width, info.height) != (canvas.width, canvas.height):
        problems.append(f"size {info.width}x{info.height}")
    if info.fps is None or abs(info.fps - FPS) > 0.01:
        problems.append(f"fps {info.fps}")
    if info.video_codec != "h264":
        problems.append(f"video codec {info.video_codec}")
    if not info.has_audio or info.audio_codec != "aac" or info.sample_rate != AUDIO_SAMPLE_RATE:
        problems.append(f"audio {info.audio_codec} {info.sample_rate}")
    video_duration = info.video_duration if info.video_duration is not None else info.duration
    if abs(video_duration - expected) > tolerance or abs(info.duration - expected) > tolerance:
        problems.append(f"duration {video_duration:.3f}/{info.duration:.3f} s, expected {expected:.3f} s")
    if info.frame_count is not None and info.frame_count != total_frames:
        problems.append(f"{info.frame_count} frames, expected {total_frames}")
    if problems:
        log.error("compose.output_invalid", extra={"job_id": job_id, "problems": problems})
        raise MediaError("The composed video failed its quality checks.")
    return video_duration


async def _settled(operation: Awaitable[T]) -> T:
    """Await a storage operation; when cancelled, let it finish first, then re-raise.

    Storage backends copy files in worker threads that a cancel cannot stop; letting them end
    keeps a late write from landing in a work folder that has already been removed.
    """
    task = asyncio.ensure_future(operation)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return task.result()


def _stage_weights(*, frames_to_encode: int, total_frames: int, audio_cached: bool) -> dict[str, float]:
    """Rough share of the wall time each stage takes, from the work it has to do."""
    encode_share = frames_to_encode / max(total_frames, 1)
    return {
        "downloading": 0.04 + 0.04 * encode_share,
        "normalizing": 0.03 + 0.75 * encode_share,
        "transitions": 0.0,
        "encoding": 0.01 if audio_cached else 0.06,
        "muxing": 0.05,
        "uploading": 0.04,
    }


class _Progress:
    """Maps (stage, fraction of the stage) to a monotonic overall fraction and an ETA."""

    def __init__(self, on_progress: ProgressFn | None, started: float, weights: dict[str, float]) -> None:
        self._on_progress = on_progress
        self._started = started
        total = sum(weights.values())
        self._spans: dict[str, tuple[float, float]] = {}
        offset = 0.0
        for stage in STAGES:
            share = weights.get(stage, 0.0) / total
            self._spans[stage] = (offset, share)
            offset += share
        self._last = 0.0

    async def report(self, stage: Stage, fraction: float) -> None:
        if self._on_progress is None:
            return
        offset, share = self._spans[stage]
        overall = min(1.0, max(self._last, offset + share * min(1.0, max(0.0, fraction))))
        self._last = overall
        elapsed = time.monotonic() - self._started
        eta = elapsed * (1 - overall) / overall if overall >= 0.05 else None
        await self._on_progress(stage, overall, eta)

    def stage(self, stage: Stage) -> Callable[[float], Awaitable[None]]:
        """A callback for one ffmpeg run that makes up the whole of ``stage``."""
        return self.span(stage, 0.0, 1.0)

    def span(self, stage: Stage, start: float, width: float) -> Callable[[float], Awaitable[None]]:
        """A callback for one ffmpeg run that makes up ``width`` of ``stage`` from ``start``."""

        async def report(fraction: float) -> None:
            await self.report(stage, start + width * fraction)

        return report
