"""Compose a job's clips, transitions and music into one H.264/AAC MP4, re-encoding only what changed.

**Segments.** The timeline (``timeline.py``) is kept in whole frames at 30 fps and cut into
segments: clip bodies and transition segments. Each is normalized (size and fit, rate, square
pixels, yuv420p, BT.709 tags, rotation) and encoded by its own ffmpeg run with the same encoder
arguments and an IDR frame first, so segments join by stream copy. Each is cached in storage
under a hash of everything that determines its bytes (``cache.py``): after one clip changed,
its body and the two transitions touching it are encoded again; after one transition's kind
changed, that one segment. A first composition is the same code with an empty cache.

**Runs.** A clip run encodes one body segment of a clip; the raw frames of the clip that its
transitions need ("windows") are written by a clip run too; a transition run blends two raw
windows and encodes them (``render.py``). A composition with many segments to make runs its
encoding runs one at a time (one x264 keeps both cores busy; memory stays at one encoder) and
has each clip decoded once, windows included; one with a few, as after a change, runs
``composer_workers`` of them at once, each transition reading its windows itself (kept ones from
the cache, the others from both clips), so the transitions are encoded beside the new body, not
after it (see ``_encoders``, ``_video_jobs``). Both ways give the same bytes: a frame's pixels
do not depend on which run read it (``render.seek_frame``).

**Kept windows.** A one-at-a-time composition keeps each raw window its clip runs write in the
cache too, losslessly (x264 at quantizer 0, about 1.6 MB for half a second of 1080p): right
after the transition that blends it is encoded, a small ffmpeg run of its own reads the raw file
and encodes it, in that transition's slot, so only one encoder is alive at any moment (two in
one clip run raised the composition's peak memory). It is kept under a hash of the clip object,
the window's frames, the canvas and the pipeline version (``_kept_key``). A transition of a
later recomposition that needs the window reads it from there instead of decoding the clip from
its keyframe, which for the tail of a neighbour that was not changed meant decoding the whole
clip. Decoded and timed as the fps filter times frames, a kept window gives the very bytes the
clip would (``render.clip_transition_command``). The windows a recomposition's transitions read
from clips are not kept: the extra encoder there cost a one-clip change more time than a later
hit would save. Kept windows are an aid, not pieces of the composition: they do not count as
segment cache hits, misses or stores, and one that is gone is read from its clip.

**Length and sound.** The video is exactly as long as its clips' timeline:
``sum(clip frames) − sum(transition frames)``, each clip ``round(duration × 30)`` frames. Beat
snapping moves cuts inside the timeline and never changes its length; the music never changes
it either. The music is the soundtrack: it starts with the video and is cut at its end, or, when
shorter, is followed by silence; its last second fades out (at the video's end, or at its own).
The clips' own sound is dropped unless the spec asks to mix it in. The soundtrack is encoded
once (and cached) as exactly 1,600 samples a frame and muxed with the joined segments by stream
copy, so audio and video stay aligned to the sample.

**Checks.** The result is validated (streams, High profile, size, rate, length of both streams,
A/V start, faststart) before it is uploaded to a new key; a file that fails is never published.
Transient failures (a download, an upload, ffmpeg killed by a signal) are retried with backoff;
an unreadable or unsupported input fails at once, naming the clip.

No user or model text reaches ffmpeg (see ``render.py``); ffmpeg reads only files this process
downloaded and probed, or made itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from clipchat import metrics
from clipchat.aio import settled
from clipchat.errors import ClipChatError, Conflict, InvalidInput, MediaError, NotFound
from clipchat.media.encoder import LIBX264, EncoderChoice, detect_encoder, video_encoder_args
from clipchat.media.ffmpeg import FfmpegError, FfmpegRunner
from clipchat.media.probe import MediaInfo, moov_before_mdat, probe
from clipchat.retry import RetryPolicy
from clipchat.settings import Settings
from clipchat.storage import ObjectInfo, Storage, check_key
from services.composer.cache import CacheStats, SegmentCache
from services.composer.progress import STAGES, FractionFn, ProgressFn, ProgressTracker, Stage
from services.composer.render import (
    AUDIO_BITRATE,
    AUDIO_SAMPLE_RATE,
    LOSSLESS_WINDOW_ARGS,
    SAMPLES_PER_FRAME,
    SEGMENT_OUTPUT_ARGS,
    Canvas,
    ClipOutput,
    SourceClip,
    WindowSource,
    audio_crossfade_command,
    clip_command,
    clip_transition_command,
    concat_listing,
    kept_windows_command,
    mux_command,
    soundtrack_command,
    transition_command,
    window_audio_command,
)
from services.composer.tasks import run_concurrently
from services.composer.timeline import FPS, ClipWindow, SegmentPlan, Timeline, plan_timeline

__all__ = ["STAGES", "ClipSpec", "Composer", "ComposerInfo", "CompositionResult", "CompositionSpec", "ProgressFn",
           "Stage", "TransitionSpec"]

log = logging.getLogger("clipchat.composer")

# Bump when a change here alters the bytes of cached pieces, so stale entries are not reused.
PIPELINE_VERSION = "4"
FRAME_SIZES: dict[str, tuple[int, int]] = {"16:9": (1920, 1080), "9:16": (1080, 1920), "1:1": (1080, 1080)}
FITS = ("pad", "crop")
DEFAULT_CACHE_MAX_BYTES = 20 * 1024**3
DEFAULT_WORKERS = 2
# Compositions with at most this many segments to encode run them ``composer_workers`` at a time:
# a change of up to four clips (each a body and its two transitions).
PARALLEL_UP_TO = 12
_DOWNLOADS_AT_ONCE = 4

# Rough cost of each piece of work, in "one frame of a clip body encoded", for progress and ETA.
_COST_DOWNLOAD = 5.0
_COST_TRANSITION_FRAME = 1.0
_COST_WINDOW_FRAME = 0.2
_COST_AUDIO_FRAME = 0.02
_COST_MUX_FRAME = 0.02
_COST_FIXED = 5.0
_MAKING_STAGES: tuple[Stage, ...] = ("normalizing", "transitions", "encoding")


@dataclass(frozen=True)
class ClipSpec:
    video_key: str  # storage key of the clip's video
    duration: float  # seconds it occupies on the timeline


@dataclass(frozen=True)
class TransitionSpec:
    kind: str = "cut"  # a key of timeline.TRANSITIONS, or "cut"
    duration: float = 0.0  # seconds the two clips overlap


@dataclass(frozen=True)
class CompositionSpec:
    job_id: str
    clips: list[ClipSpec]
    audio_key: str
    transitions: list[TransitionSpec]  # one per boundary (len(clips) - 1), or empty for all cuts
    beat_timestamps: list[float]
    aspect_ratio: str = "16:9"
    fit: str = "pad"  # "pad" (letterbox) or "crop" (fill)
    mix_clip_audio: bool = False  # mix the clips' own sound under the music


@dataclass(frozen=True)
class CompositionResult:
    video_key: str
    duration: float  # seconds
    encoder: str
    segments_encoded: int  # video segments encoded by this composition
    segments_reused: int  # video segments taken from the cache
    seconds: float  # wall time of the composition


@dataclass(frozen=True)
class ComposerInfo:
    encoder: EncoderChoice
    x264_preset: str
    workers: int
    cache: CacheStats
    fell_back: bool = False  # NVENC was wanted (encoder auto or h264_nvenc) and its test encode failed


class Composer:
    """Composes jobs; one instance serves many compositions (the encoder is detected once).

    ``work_root`` is where per-composition work folders are made (the system temp folder when
    None). Settings read: ``encoder``, ``x264_preset``, ``retry_attempts``/``retry_base_seconds``/
    ``retry_max_seconds``, ``segment_cache_max_bytes`` (the cache's size cap; default 20 GiB)
    and ``composer_workers`` (encoding runs at once in a composition with few segments to make;
    default 2).
    """

    def __init__(self, storage: Storage, ffmpeg: FfmpegRunner, settings: Settings, *,
                 work_root: Path | None = None, parallel_up_to: int = PARALLEL_UP_TO) -> None:
        self._storage = storage
        self._ffmpeg = ffmpeg
        self._settings = settings
        # Absolute, because the concat list names the segment files in it.
        self._work_root = work_root.absolute() if work_root is not None else None
        self._encoder: EncoderChoice | None = None
        self._encoder_lock = asyncio.Lock()
        # Transient failures (a download, an upload, ffmpeg killed by a signal) are retried here.
        self._retry = RetryPolicy(attempts=settings.retry_attempts, base_seconds=settings.retry_base_seconds,
                                  max_seconds=settings.retry_max_seconds)
        self._cache = SegmentCache(
            storage, max_bytes=settings.segment_cache_max_bytes,
            retry=self._retry)
        self._workers = max(1, settings.composer_workers)
        self._parallel_up_to = parallel_up_to
        # Probes decode a frame in this process; one at a time keeps its memory flat.
        self._probe_lock = asyncio.Lock()

    async def encoder(self) -> EncoderChoice:
        """The encoder this composer uses and why, detected on first use from ``settings.encoder``."""
        async with self._encoder_lock:
            if self._encoder is None:
                self._encoder = await detect_encoder(self._ffmpeg, self._settings.encoder)
                metrics.encoder_selected(self._encoder.name, fell_back=self.fell_back)
            return self._encoder

    @property
    def fell_back(self) -> bool:
        """Whether this composer wanted NVENC and encodes with libx264 because NVENC did not work."""
        return self._encoder is not None and self._encoder.name == LIBX264 and self._settings.encoder != LIBX264

    @property
    def cache_stats(self) -> CacheStats:
        """Segment cache hits, misses, stores and evictions since this composer was made."""
        return self._cache.stats

    async def describe(self) -> ComposerInfo:
        """What this composer works with, for health details: encoder and why, preset, workers, cache."""
        return ComposerInfo(await self.encoder(), self._settings.x264_preset, self._workers, self._cache.stats,
                            fell_back=self.fell_back)

    async def compose(self, spec: CompositionSpec, output_key: str, *,
                      on_progress: ProgressFn | None = None) -> CompositionResult:
        """Compose ``spec`` and upload the MP4 to ``output_key``.

        Raises ``InvalidInput`` for an impossible spec (no clips, bad durations, an unknown
        transition, aspect ratio or fit), ``Conflict`` when ``output_key`` exists, ``MediaError``
        naming the clip or track that cannot be read or processed (or when the result fails its
        checks; nothing is uploaded then), and ``FfmpegKilled`` or storage errors for transient
        failures that outlasted their retries. Cancelling the task kills ffmpeg; the work folder
        is removed in every case.
        """
        started = time.monotonic()
        check_key(output_key)
        canvas = _canvas(spec)
        timeline = plan_timeline([clip.duration for clip in spec.clips],
                                 [(t.kind, t.duration) for t in spec.transitions], spec.beat_timestamps)
        extra = {"job_id": spec.job_id, "output_key": output_key}
        if await self._storage.exists(output_key):
            raise Conflict("This video version already exists.")
        encoder = await self.encoder()
        encoder_args = video_encoder_args(encoder.name, x264_preset=self._settings.x264_preset)
        log.info("compose.started", extra={**extra, "clips": len(spec.clips), "frames": timeline.total_frames,
                                            "segments": len(timeline.segments), "encoder": encoder.name})

        work = self._work_folder()
        run = _Composition(self, spec, timeline, canvas, encoder_args, work,
                           ProgressTracker(on_progress, started=started))
        stored_before = self._cache.stats.stores
        try:
            duration = await run.execute(output_key)
        except asyncio.CancelledError:
            log.info("compose.cancelled", extra=extra)
            raise
        except Exception as exc:
            log.warning("compose.failed", extra={**extra, "error": type(exc).__name__,
                                                  "code": getattr(exc, "code", None),
                                                  "detail": str(getattr(exc, "detail", ""))[-2000:]})
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if self._cache.stats.stores > stored_before:  # only new entries can push it over its cap
            await self._evict_quietly(spec.job_id)

        seconds = time.monotonic() - started
        metrics.composition_finished(seconds, encoder=encoder.name, kind="incremental" if run.reused else "full")
        log.info("compose.finished", extra={**extra, "seconds": round(seconds, 3), "encoder": encoder.name,
                                             "segments_encoded": run.encoded, "segments_reused": run.reused})
        return CompositionResult(video_key=output_key, duration=duration, encoder=encoder.name,
                                 segments_encoded=run.encoded, segments_reused=run.reused, seconds=seconds)

    def _work_folder(self) -> Path:
        """A fresh folder for one composition's intermediate files (removed when it ends)."""
        if self._work_root is not None:
            self._work_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="clipchat-compose-", dir=self._work_root))

    async def _evict_quietly(self, job_id: str) -> None:
        # The video is published by now; a cache that cannot be trimmed is for operators, not users.
        try:
            await self._cache.evict()
        except Exception as exc:  # any storage failure here is only logged
            log.warning("compose.cache_eviction_failed", extra={"job_id": job_id, "error": repr(exc)[:300]})


@dataclass
class _Piece:
    """A file of the composition found in the cache or made by it: a video segment, the clips'
    sound under a segment, or the soundtrack."""

    key: str
    cached: bool = False
    path: Path | None = None


@dataclass
class _Segment:
    number: int
    plan: SegmentPlan
    video: _Piece
    sound: _Piece | None = None  # the clips' own sound, when the spec mixes it in
    kept: list[_Piece] = field(default_factory=list)  # a transition's windows kept losslessly


@dataclass
class _Window:
    """Raw normalized frames of a clip that a transition to be made needs; ``kept`` is the same
    window kept losslessly in the cache, encoded from the raw frames once that transition is made."""

    window: ClipWindow
    path: Path
    kept: _Piece
    ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class _Composition:
    """One ``compose`` call: its plan, work folder, downloaded sources and progress."""

    composer: Composer
    spec: CompositionSpec
    timeline: Timeline
    canvas: Canvas
    encoder_args: list[str]
    work: Path
    progress: ProgressTracker
    encoded: int = 0
    reused: int = 0
    _clips: dict[int, SourceClip] = field(default_factory=dict)
    _clip_locks: defaultdict[int, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    _music: tuple[Path, MediaInfo] | None = None
    _music_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Encoding runs at once (see ``_encoders``); jobs take a slot in the order they were listed.
    _slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))

    async def execute(self, output_key: str) -> float:
        """Make every piece, join them, check the result and upload it; returns its duration."""
        composer = self.composer
        objects = await self._stat_sources()
        segments = self._segments(objects)
        soundtrack = _Piece(self._soundtrack_key(objects[-1], segments))
        await self._look_up(segments, soundtrack)
        sounds = [s for s in segments if s.sound is not None and not s.sound.cached] if not soundtrack.cached else []
        encoders = self._encoders(segments)
        windows = self._windows(segments) if encoders == 1 else {}
        if encoders > 1:
            await self._look_up_kept(segments)
        self._plan_progress(segments, windows, sounds, soundtrack)
        await self.progress.report()

        self._slots = asyncio.Semaphore(encoders)
        # Sources are fetched while the first runs start: each run waits only for its own clips.
        jobs: list[Callable[[], Awaitable[None]]] = [
            functools.partial(self._fetch_sources, self._downloads(segments, windows, sounds, soundtrack))]
        if not soundtrack.cached and not sounds:  # one core for a second or two, beside the video
            jobs.append(functools.partial(self._make_soundtrack, soundtrack, segments))
        jobs += self._video_jobs(segments, windows)
        jobs += [functools.partial(self._make_sound, segment) for segment in sounds]
        await run_concurrently(jobs)
        if soundtrack.path is None:  # made from the clips' sound just extracted
            await self._make_soundtrack(soundtrack, segments)
        for stage in _MAKING_STAGES:
            await self.progress.finish(stage)

        output = self.work / "output.mp4"
        listing = self.work / "segments.ffconcat"
        listing.write_text(concat_listing([s.video.path for s in segments if s.video.path]), encoding="utf-8")
        assert soundtrack.path is not None
        await self._ffmpeg(mux_command(listing, soundtrack.path, output), self.timeline.total_frames,
                           self.progress.piece("muxing", self._mux_cost()))
        duration = await _validate_output(output, self.canvas, self.timeline.total_frames, self.spec.job_id)
        await self.progress.finish("muxing")

        await composer._retry.run(
            lambda: settled(composer._storage.put_file(output_key, output, content_type="video/mp4")),
            what="upload composition")
        await self.progress.finish("uploading")
        return duration

    # --- planning ---------------------------------------------------------------------------

    async def _stat_sources(self) -> list[ObjectInfo]:
        """Size and time of every clip, then of the music (last); cache keys are built from them."""
        labels = [(clip.video_key, f"clip {i + 1}") for i, clip in enumerate(self.spec.clips)]
        labels.append((self.spec.audio_key, "music track"))

        async def stat(key: str, label: str) -> ObjectInfo:
            try:
                return await self.composer._retry.run(
                    lambda: self.composer._storage.stat(check_key(key)), what="stat source")
            except (NotFound, InvalidInput) as exc:
                raise MediaError(f"{label.capitalize()} could not be found.") from exc

        return list(await asyncio.gather(*(stat(key, label) for key, label in labels)))

    def _segments(self, objects: list[ObjectInfo]) -> list[_Segment]:
        segments = []
        for number, plan in enumerate(self.timeline.segments):
            windows = [[objects[w.clip_index].key, objects[w.clip_index].size, w.start_frame, w.frames]
                       for w in plan.windows]
            video_key = SegmentCache.key("segments", {
                "version": PIPELINE_VERSION, "kind": plan.kind, "windows": windows, "xfade": plan.xfade,
                "fps": FPS, "canvas": [self.canvas.width, self.canvas.height, self.canvas.fit],
                "encoder": self.encoder_args, "output": SEGMENT_OUTPUT_ARGS}, ".mp4")
            sound = None
            if self.spec.mix_clip_audio:
                sound = _Piece(SegmentCache.key("clip-sound", {
                    "version": PIPELINE_VERSION, "kind": plan.kind, "windows": windows,
                    "rate": AUDIO_SAMPLE_RATE}, ".pcm"))
            kept = [_Piece(self._kept_key(objects[w.clip_index], w)) for w in plan.windows] \
                if plan.kind == "transition" else []
            segments.append(_Segment(number, plan, _Piece(video_key), sound, kept))
        return segments

    def _kept_key(self, clip: ObjectInfo, window: ClipWindow) -> str:
        """The key of ``window`` of ``clip`` normalized to the canvas and kept losslessly: the same
        frames whichever transition blends them, so a neighbour's window outlives a change."""
        return SegmentCache.key("windows", {
            "version": PIPELINE_VERSION, "window": [clip.key, clip.size, window.start_frame, window.frames],
            "fps": FPS, "canvas": [self.canvas.width, self.canvas.height, self.canvas.fit],
            "codec": LOSSLESS_WINDOW_ARGS}, ".mp4")

    def _soundtrack_key(self, music: ObjectInfo, segments: list[_Segment]) -> str:
        return SegmentCache.key("soundtrack", {
            "version": PIPELINE_VERSION, "music": [music.key, music.size], "frames": self.timeline.total_frames,
            "clip_sound": [s.sound.key for s in segments if s.sound] or None,
            "codec": ["aac", AUDIO_BITRATE, AUDIO_SAMPLE_RATE, 2]}, ".m4a")

    async def _look_up(self, segments: list[_Segment], soundtrack: _Piece) -> None:
        """Find the cached pieces and get a local file of each; one gone meanwhile counts as missing.

        The clips' sound only matters when the soundtrack is not cached.
        """
        await self._reuse(soundtrack, self.work / "soundtrack.m4a")
        pieces = [(s.video, self.work / f"segment-{s.number:03d}.mp4") for s in segments]
        if not soundtrack.cached:
            pieces += [(s.sound, self.work / f"sound-{s.number:03d}.pcm") for s in segments if s.sound]
        await asyncio.gather(*(self._reuse(piece, dest) for piece, dest in pieces))
        self.reused = sum(1 for s in segments if s.video.cached)

    async def _look_up_kept(self, segments: list[_Segment]) -> None:
        """Find the kept windows of the transitions to be made, for a composition whose transitions
        read their windows themselves (see ``_video_jobs``): a kept one saves decoding its clip from
        the keyframe. Not counted as segment cache hits or misses; one not found is read from its
        clip."""
        pieces = [(piece, self.work / f"kept-{s.number:03d}-{part}.mp4")
                  for s in segments if not s.video.cached for part, piece in enumerate(s.kept)]
        await asyncio.gather(*(self._reuse(piece, dest, counted=False) for piece, dest in pieces))

    async def _reuse(self, piece: _Piece, dest: Path, *, counted: bool = True) -> None:
        cache = self.composer._cache
        if await cache.lookup(piece.key, counted=counted):
            piece.path = await cache.fetch(piece.key, dest, counted=counted)
            if piece.path is None and counted:
                cache.forget_hit()
        piece.cached = piece.path is not None

    def _windows(self, segments: list[_Segment]) -> dict[tuple[int, int], _Window]:
        """The raw windows the transitions still to be made need, by (clip, first frame), for a
        composition made one run at a time (see ``_video_jobs``)."""
        windows: dict[tuple[int, int], _Window] = {}
        for segment in segments:
            if segment.plan.kind == "transition" and not segment.video.cached:
                for part, window in enumerate(segment.plan.windows):
                    windows[(window.clip_index, window.start_frame)] = _Window(
                        window, self.work / f"window-{segment.number:03d}-{part}.yuv", segment.kept[part])
        return windows

    def _video_jobs(self, segments: list[_Segment], windows: dict[tuple[int, int], _Window]
                    ) -> list[Callable[[], Awaitable[None]]]:
        """The clip runs and the transition runs, in the order they take encoding slots.

        A clip run encodes one chunk of a clip's body, and may write raw windows too; a run that
        only writes windows is light (no encoder) and takes no slot. Each transition is listed
        right after the runs of both its clips.

        - With ``windows`` (one slot, many segments to make): each raw window is written by the
          run encoding the clip's first chunk (its head window) or last chunk (its tail), or by a
          light run when that chunk is cached, so each clip is decoded once, and just before the
          transition that uses it, so raw frames are used up soon after they are written. A
          transition waits for its windows holding its slot; that cannot deadlock, as the runs
          writing them are listed earlier or take no slot.
        - Without (a few segments, as after one change): each transition reads its windows itself,
          kept ones from the cache and the others from the two clips, so it runs beside the body
          chunks from the start instead of after them; it decodes a little of a clip a second time.
        """
        transitions = {s.plan.clip_index: s for s in segments if s.plan.kind == "transition"}
        chunks: defaultdict[int, list[_Segment]] = defaultdict(list)
        for segment in segments:
            if segment.plan.kind == "body":
                chunks[segment.plan.clip_index].append(segment)
        attached: defaultdict[int, list[_Window]] = defaultdict(list)  # by the segment number of a chunk
        alone: defaultdict[int, list[_Window]] = defaultdict(list)  # by clip
        for (clip_index, start_frame), window in sorted(windows.items()):
            chunk = chunks[clip_index][0 if start_frame == 0 else -1]
            if not chunk.video.cached:
                attached[chunk.number].append(window)
            else:
                alone[clip_index].append(window)
        jobs: list[Callable[[], Awaitable[None]]] = []
        for clip_index, clip_chunks in sorted(chunks.items()):
            jobs += [functools.partial(self._make_clip_pieces, clip_index, None, [window])
                     for window in alone[clip_index]]
            jobs += [functools.partial(self._make_clip_pieces, clip_index, chunk, attached[chunk.number])
                     for chunk in clip_chunks if not chunk.video.cached]
            transition = transitions.get(clip_index - 1)
            if transition is not None and not transition.video.cached:
                pair = tuple(windows[(w.clip_index, w.start_frame)] for w in transition.plan.windows) if windows \
                    else None
                jobs.append(functools.partial(self._make_transition, transition, pair))
        return jobs

    def _encoders(self, segments: list[_Segment]) -> int:
        """How many encoding runs may go at once: ``composer_workers`` for a few, one for many.

        A recomposition after one clip or transition changed encodes a few short segments, and
        the person is waiting: running them side by side keeps both cores busy from the first
        frame to the last (one short run alone leaves them idle while it starts and drains). A
        composition with many segments runs them one at a time: over a long run x264's frame
        threads keep both cores busy by themselves, and only one encoder's memory (~250 MB at
        1080p) is held at any moment.
        """
        to_encode = sum(1 for s in segments if not s.video.cached)
        return self.composer._workers if to_encode <= self.composer._parallel_up_to else 1

    def _plan_progress(self, segments: list[_Segment], windows: dict[tuple[int, int], _Window],
                       sounds: list[_Segment], soundtrack: _Piece) -> None:
        progress = self.progress
        total = self.timeline.total_frames
        for segment in segments:
            if not segment.video.cached:
                progress.plan(_segment_stage(segment.plan), self._segment_cost(segment.plan))
        for window in windows.values():
            progress.plan("normalizing", self._window_cost(window.window))
        for segment in sounds:
            progress.plan("encoding", self._sound_cost(segment.plan))
        progress.plan("downloading", _COST_DOWNLOAD * len(self._downloads(segments, windows, sounds, soundtrack)))
        if not soundtrack.cached:
            progress.plan("encoding", _COST_FIXED + total * _COST_AUDIO_FRAME)
        progress.plan("muxing", self._mux_cost())
        progress.plan("uploading", _COST_FIXED + total * _COST_MUX_FRAME)

    @staticmethod
    def _segment_cost(plan: SegmentPlan) -> float:
        return _COST_FIXED + plan.frames * (1.0 if plan.kind == "body" else _COST_TRANSITION_FRAME)

    @staticmethod
    def _window_cost(window: ClipWindow) -> float:
        return window.frames * _COST_WINDOW_FRAME

    @staticmethod
    def _sound_cost(plan: SegmentPlan) -> float:
        return _COST_FIXED + plan.frames * _COST_AUDIO_FRAME

    def _mux_cost(self) -> float:
        return _COST_FIXED + self.timeline.total_frames * _COST_MUX_FRAME

    def _downloads(self, segments: list[_Segment], windows: dict[tuple[int, int], _Window],
                   sounds: list[_Segment], soundtrack: _Piece) -> list[Callable[[], Awaitable[None]]]:
        """One job for each source a piece still to be made needs: the clips, and the music."""
        clips = {w.clip_index for s in segments if not s.video.cached for w in _windows_from_clips(s)}
        clips |= {clip for clip, _ in windows}
        clips |= {w.clip_index for s in sounds for w in s.plan.windows}
        jobs: list[Callable[[], Awaitable[object]]] = [functools.partial(self._clip, i) for i in sorted(clips)]
        if not soundtrack.cached:
            jobs.append(self._load_music)
        return [functools.partial(self._download, job) for job in jobs]

    async def _fetch_sources(self, downloads: list[Callable[[], Awaitable[None]]]) -> None:
        await run_concurrently(downloads, limit=_DOWNLOADS_AT_ONCE)
        await self.progress.finish("downloading")

    async def _download(self, job: Callable[[], Awaitable[object]]) -> None:
        await job()
        await self.progress.piece("downloading", _COST_DOWNLOAD)(1.0)

    # --- sources ----------------------------------------------------------------------------

    async def _clip(self, index: int) -> SourceClip:
        """Clip ``index`` on local disk, probed: downloaded once, on first need."""
        async with self._clip_locks[index]:
            if index not in self._clips:
                label = f"clip {index + 1}"
                path = await self._fetch_source(self.spec.clips[index].video_key, self.work / f"clip-{index:03d}",
                                                label)
                info = await self._probe(path, label)
                if not info.has_video:
                    raise MediaError(f"{label.capitalize()} has no video.")
                self._clips[index] = SourceClip(path, info)
            return self._clips[index]

    async def _load_music(self) -> tuple[Path, MediaInfo]:
        """The music track on local disk, probed: downloaded once, on first need."""
        async with self._music_lock:
            if self._music is None:
                path = await self._fetch_source(self.spec.audio_key, self.work / "music", "music track")
                info = await self._probe(path, "music track")
                if not info.has_audio:
                    raise MediaError("The music track has no audio.")
                self._music = (path, info)
            return self._music

    async def _probe(self, path: Path, label: str) -> MediaInfo:
        async with self.composer._probe_lock:
            return await probe(path, label=label)

    async def _fetch_source(self, key: str, dest: Path, label: str) -> Path:
        """A local file with a job input's bytes: the store's own file when it is a local folder.

        A missing object is the input's fault (``MediaError``); transient failures are retried.
        """
        storage = self.composer._storage
        local = storage.local_path(key)
        if local is not None and local.is_file():
            return local
        try:
            await self.composer._retry.run(lambda: settled(storage.get_file(key, dest)), what="download source")
        except NotFound as exc:
            raise MediaError(f"{label.capitalize()} could not be found.") from exc
        return dest

    # --- pieces -----------------------------------------------------------------------------

    async def _make_clip_pieces(self, clip_index: int, chunk: _Segment | None, windows: list[_Window]) -> None:
        """One clip run: encode a body chunk (when given) and write the raw windows attached to it.

        A run that only writes windows is light (no encoder) and takes no slot.
        """
        outputs = [ClipOutput(w.window, w.path, encoded=False) for w in windows]
        cost = sum(self._window_cost(w.window) for w in windows)
        if chunk is not None:
            chunk.video.path = self.work / f"segment-{chunk.number:03d}.mp4"
            outputs.insert(0, ClipOutput(chunk.plan.windows[0], chunk.video.path, encoded=True))
            cost += self._segment_cost(chunk.plan)
        async with self._slots if chunk is not None else contextlib.nullcontext():
            # Taking the slot first of all, so jobs take slots in the order they were listed.
            source = await self._clip(clip_index)
            args = clip_command(source, self.canvas, outputs, self.encoder_args)
            frames = max(o.window.frames for o in outputs)  # ffmpeg reports the time written
            await self._ffmpeg(args, frames, self.progress.piece("normalizing", cost), label=f"clip {clip_index + 1}")
        for window in windows:
            window.ready.set_result(None)
        if chunk is not None:
            await self._encoded(chunk)

    async def _make_transition(self, segment: _Segment, windows: tuple[_Window, ...] | None) -> None:
        """Blend and encode a transition segment: from the raw windows clip runs write (and keep
        those losslessly for the cache), or, when there are none, from windows this run reads itself."""
        plan = segment.plan
        assert plan.xfade is not None
        dest = segment.video.path = self.work / f"segment-{segment.number:03d}.mp4"
        async with self._slots:
            if windows is None:
                await self._transition_from_sources(segment, dest)
            else:
                await asyncio.gather(*(window.ready for window in windows))
                args = transition_command(plan.xfade, plan.frames, windows[0].path, windows[1].path, self.canvas,
                                          self.encoder_args, dest)
                await self._ffmpeg(args, plan.frames, self.progress.piece("transitions", self._segment_cost(plan)),
                                   label=plan.label)
            kept = await self._keep_windows(windows or ())
        for window in windows or ():
            window.path.unlink(missing_ok=True)  # raw frames are big; each is used by one transition
        for window, path in kept:
            try:
                await self.composer._cache.store(window.kept.key, path, counted=False)
            except ClipChatError as exc:  # an aid only: a later change reads the clip instead
                log.warning("compose.window_not_kept", extra={"job_id": self.spec.job_id, "code": exc.code})
            path.unlink(missing_ok=True)
        await self._encoded(segment)

    async def _keep_windows(self, windows: tuple[_Window, ...]) -> list[tuple[_Window, Path]]:
        """Encode raw windows losslessly, for the cache, in a small run of their own.

        Called holding the slot of the transition that used them, after its encoder has ended: in
        a one-at-a-time composition only one encoder is alive at any moment. Best effort: a window
        that cannot be kept is read from its clip by a later change.
        """
        kept = [(window, window.path.with_suffix(".mp4")) for window in windows]
        if kept:
            args = kept_windows_command([(window.path, path) for window, path in kept], self.canvas)
            try:
                await self._ffmpeg(args, max(w.window.frames for w in windows), None, label="kept windows")
            except ClipChatError as exc:  # an aid only: the composition goes on without them
                log.warning("compose.window_not_kept", extra={"job_id": self.spec.job_id, "code": exc.code})
                return []
        return kept

    async def _transition_from_sources(self, segment: _Segment, dest: Path) -> None:
        """Blend a transition from windows this run reads itself: kept ones from the cache, the
        others from their clips. A kept window that cannot be read (a damaged cache entry) is not
        trusted again: it is dropped from the cache and the transition made once more from the clips."""
        plan = segment.plan
        assert plan.xfade is not None
        on_fraction = self.progress.piece("transitions", self._segment_cost(plan))
        for attempt in range(2):
            sources = [await self._window_source(w, kept) for w, kept in zip(plan.windows, segment.kept, strict=True)]
            args = clip_transition_command(plan.xfade, plan.frames, sources[0], sources[1], self.canvas,
                                           self.encoder_args, dest)
            try:
                await self._ffmpeg(args, plan.frames, on_fraction, label=plan.label)
                return
            except FfmpegError:
                if attempt or not any(kept.path is not None for kept in segment.kept):
                    raise
                log.warning("compose.kept_window_unreadable", extra={"job_id": self.spec.job_id,
                                                                     "segment": segment.number})
                for kept in segment.kept:
                    if kept.path is not None:
                        kept.path = None
                        await self.composer._cache.drop(kept.key)

    async def _window_source(self, window: ClipWindow, kept: _Piece) -> WindowSource:
        """Where a transition reads ``window``: its kept lossless copy when cached, else its clip."""
        if kept.path is not None:
            return kept.path
        return await self._clip(window.clip_index), window

    async def _encoded(self, segment: _Segment) -> None:
        """Check a segment just encoded has every frame, count it and cache it."""
        plan, piece = segment.plan, segment.video
        assert piece.path is not None
        info = await self._probe(piece.path, plan.label)
        if info.frame_count != plan.frames:
            log.error("compose.segment_incomplete", extra={
                "job_id": self.spec.job_id, "segment": segment.number, "frames": info.frame_count,
                "expected": plan.frames})
            raise MediaError(f"{_capitalized(plan.label)} could not be processed.")
        self.encoded += 1
        log.info("compose.segment_encoded", extra={"job_id": self.spec.job_id, "segment": piece.key,
                                                    "kind": plan.kind, "clip": plan.clip_index,
                                                    "frames": plan.frames})
        await self.composer._cache.store(piece.key, piece.path)

    async def _make_sound(self, segment: _Segment) -> None:
        """The clips' own sound under the segment as raw PCM, extracted (and cached)."""
        piece, plan = segment.sound, segment.plan
        assert piece is not None
        dest = self.work / f"sound-{segment.number:03d}.pcm"
        parts = []
        for part, window in enumerate(plan.windows):
            source = await self._clip(window.clip_index)
            path = self.work / f"sound-{segment.number:03d}-{part}.pcm"
            if source.info.has_audio:
                await self._ffmpeg(window_audio_command(window, source, path), window.frames, None,
                                   label=f"clip {window.clip_index + 1}")
            else:
                await asyncio.to_thread(_write_silence, path, window.frames * SAMPLES_PER_FRAME)
            parts.append(path)
        if plan.kind == "transition":
            await self._ffmpeg(audio_crossfade_command(parts[0], parts[1], plan.frames, dest), plan.frames,
                               None, label=plan.label)
        else:
            parts[0].replace(dest)
        piece.path = dest
        await self.progress.piece("encoding", self._sound_cost(plan))(1.0)
        await self.composer._cache.store(piece.key, dest)

    async def _make_soundtrack(self, soundtrack: _Piece, segments: list[_Segment]) -> None:
        """The music fitted to the video (with the clips' sound mixed in if asked) as AAC, cached."""
        dest = self.work / "soundtrack.m4a"
        music, info = await self._load_music()
        clip_sound = None
        if self.spec.mix_clip_audio:
            clip_sound = self.work / "clip-sound.pcm"
            await asyncio.to_thread(_join_files, [s.sound.path for s in segments if s.sound and s.sound.path],
                                    clip_sound)
        total = self.timeline.total_frames
        await self._ffmpeg(soundtrack_command(music, info, total, dest, clip_sound), total,
                           self.progress.piece("encoding", _COST_FIXED + total * _COST_AUDIO_FRAME),
                           label="music track")
        soundtrack.path = dest
        log.info("compose.soundtrack_encoded", extra={"job_id": self.spec.job_id, "frames": total})
        await self.composer._cache.store(soundtrack.key, dest)

    async def _ffmpeg(self, args: list[str], frames: int, on_fraction: FractionFn | None, *,
                      label: str = "") -> None:
        """Run ffmpeg, retrying when a signal killed it; a failure names ``label`` when given."""
        ffmpeg = self.composer._ffmpeg
        try:
            await self.composer._retry.run(
                lambda: ffmpeg.run(args, expected_duration=frames / FPS, on_progress=on_fraction,
                                   makes=label or "segment"), what="ffmpeg")
        except FfmpegError as exc:
            if not label:
                raise
            raise FfmpegError(f"{_capitalized(label)} could not be processed.", detail=exc.detail,
                              returncode=exc.returncode) from exc


def _windows_from_clips(segment: _Segment) -> list[ClipWindow]:
    """The windows making ``segment`` reads from its clips: all but a transition's kept ones."""
    kept = [piece.cached for piece in segment.kept] or [False] * len(segment.plan.windows)
    return [window for window, cached in zip(segment.plan.windows, kept, strict=True) if not cached]


def _segment_stage(plan: SegmentPlan) -> Stage:
    return "normalizing" if plan.kind == "body" else "transitions"


def _capitalized(label: str) -> str:
    return label[:1].upper() + label[1:]


def _canvas(spec: CompositionSpec) -> Canvas:
    if spec.aspect_ratio not in FRAME_SIZES:
        raise InvalidInput(f"Unsupported aspect ratio; use one of {', '.join(FRAME_SIZES)}.")
    if spec.fit not in FITS:
        raise InvalidInput(f"Unsupported fit; use one of {', '.join(FITS)}.")
    width, height = FRAME_SIZES[spec.aspect_ratio]
    return Canvas(width, height, spec.fit)


def _write_silence(path: Path, samples: int) -> None:
    path.write_bytes(bytes(samples * 4))  # 16-bit stereo


def _join_files(parts: list[Path], dest: Path) -> None:
    with dest.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, 1024 * 1024)


async def _validate_output(output: Path, canvas: Canvas, total_frames: int, job_id: str) -> float:
    """Check the composed file before anyone sees it; returns its duration in seconds.

    Raises ``MediaError`` when it is not the expected H.264 High/AAC video of the expected size,
    rate and length, with both streams starting together and its index in front.
    """
    expected = total_frames / FPS
    info = await probe(output, label="composed video")
    tolerance = 1 / FPS + 1e-3
    problems = []
    if (info.width, info.height) != (canvas.width, canvas.height):
        problems.append(f"size {info.width}x{info.height}")
    if info.fps is None or abs(info.fps - FPS) > 0.01:
        problems.append(f"fps {info.fps}")
    if info.video_codec != "h264" or info.pix_fmt != "yuv420p" or info.video_profile != "High":
        problems.append(f"video {info.video_codec} {info.video_profile} {info.pix_fmt}")
    if (not info.has_audio or info.audio_codec != "aac" or info.sample_rate != AUDIO_SAMPLE_RATE
            or info.channels != 2):
        problems.append(f"audio {info.audio_codec} {info.sample_rate} Hz {info.channels} channels")
    video_duration = info.video_duration if info.video_duration is not None else info.duration
    audio_duration = info.audio_duration if info.audio_duration is not None else info.duration
    if any(abs(d - expected) > tolerance for d in (video_duration, audio_duration, info.duration)):
        problems.append(f"duration video {video_duration:.3f} s, audio {audio_duration:.3f} s, "
                        f"file {info.duration:.3f} s, expected {expected:.3f} s")
    if info.frame_count is not None and info.frame_count != total_frames:
        problems.append(f"{info.frame_count} frames, expected {total_frames}")
    starts = (info.video_start or 0.0, info.audio_start or 0.0)
    if any(abs(start) > tolerance for start in starts):
        problems.append(f"starts video {starts[0]:.3f} s, audio {starts[1]:.3f} s")
    if not await moov_before_mdat(output):
        problems.append("index not in front (faststart)")
    if problems:
        log.error("compose.output_invalid", extra={"job_id": job_id, "problems": problems})
        raise MediaError("The composed video failed its quality checks.")
    return video_duration
