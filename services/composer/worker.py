"""The RabbitMQ consumer of the compose queue: compose, then publish the new version."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
import traceback
from pathlib import Path

from opentelemetry import trace

from clipchat import metrics
from clipchat.broker import Delivery
from clipchat.domain import COMPOSE_SHARE, overall_progress
from clipchat.errors import ClipChatError, MediaError, StaleLease
from clipchat.lease import LeaseKeeper, WorkClaim, run_claimed
from clipchat.media.ffmpeg import FfmpegRunner
from clipchat.media.thumbnail import render_thumbnail
from clipchat.pricing import composition_cost
from clipchat.settings import Settings
from clipchat.status_client import StatusClient
from clipchat.storage import Storage, job_prefix, new_key
from clipchat.telemetry import extract_context, tracer
from clipchat.v1 import common_pb2, jobs_pb2, tasks_pb2
from services.composer.pipeline import ClipSpec, Composer, CompositionSpec, TransitionSpec

log = logging.getLogger("clipchat.composer")

RECOMPOSE_FAILED = "Recomposition failed. Original video preserved."
COMPOSE_FAILED = "Composition failed. Please check the clips and try again."
GAVE_UP_MESSAGE = "Composition failed because a service was unavailable. Please try again."


class CompositionFailed(Exception):
    """The composition failed for good: permanently, or on each of its attempts."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"composition failed: {cause!r}")
        self.cause = cause


def new_clips(task: tasks_pb2.ComposeTask) -> list[jobs_pb2.NewClipAt]:
    """A compose task's new clips: ``new_clips``, or the one-clip form of tasks that predate changes."""
    if task.new_clips:
        return list(task.new_clips)
    if task.HasField("new_clip"):
        return [jobs_pb2.NewClipAt(clip_index=task.clip_index, clip=task.new_clip)]
    return []


def spec_for_job(job: common_pb2.Job, task: tasks_pb2.ComposeTask | None = None) -> CompositionSpec:
    """The composition of a job's current clips, with the clips ``task`` carries new ones of replaced."""
    clips = [ClipSpec(video_key=c.video_key, duration=c.duration) for c in job.clips]
    for at in new_clips(task) if task is not None else []:
        if not 0 <= at.clip_index < len(clips):
            raise ValueError(f"compose message names clip {at.clip_index} of {len(clips)}")
        clips[at.clip_index] = ClipSpec(video_key=at.clip.video_key, duration=at.clip.duration)
    return CompositionSpec(
        job_id=job.job_id, clips=clips, audio_key=job.audio_key,
        transitions=[TransitionSpec(kind=t.kind, duration=t.duration) for t in job.transitions],
        beat_timestamps=list(job.beat_timestamps), aspect_ratio=job.aspect_ratio or "16:9",
        fit=job.fit or "pad")


class ComposeWorker:
    """One composition a message, under the delivery's claim (``clipchat.lease.run_claimed``)."""

    def __init__(self, *, composer: Composer, status: StatusClient, storage: Storage, ffmpeg: FfmpegRunner,
                 settings: Settings) -> None:
        self.composer = composer
        self.status = status
        self.storage = storage
        self.ffmpeg = ffmpeg
        self.settings = settings

    async def handle(self, delivery: Delivery) -> None:
        task: tasks_pb2.ComposeTask = delivery.task
        if not task.job_id or not task.lease_token:
            raise ValueError("malformed compose message")

        async def work(claim: WorkClaim) -> None:
            await self._run(task, claim)

        with tracer("clipchat.composer").start_as_current_span(
                "compose.message", context=extract_context(dict(task.trace_context)), kind=trace.SpanKind.CONSUMER):
            await run_claimed(self.status, delivery, jobs_pb2.WORK_PHASE_COMPOSE, work,
                              delivery_limit=self.settings.delivery_limit, give_up_message=GAVE_UP_MESSAGE)

    async def _run(self, task: tasks_pb2.ComposeTask, claim: WorkClaim) -> None:
        span = trace.get_current_span()
        span.set_attribute("clipchat.job_id", task.job_id)
        span.set_attribute("clipchat.regeneration_id", task.regeneration_id)
        job = await self.status.get_job(task.job_id)
        async with LeaseKeeper.for_claim(self.status, claim, interval=self.settings.heartbeat_seconds) as keeper:
            try:
                await self._compose(job, task, claim, keeper)
            except CompositionFailed as failed:
                # The composition itself failed for good (permanently, or on each of its retries):
                # another delivery would only repeat them.
                await self._fail(claim, task.regeneration_id, failed.cause,
                                 format(span.get_span_context().trace_id, "032x"))

    async def _compose(self, job: common_pb2.Job, task: tasks_pb2.ComposeTask, claim: WorkClaim,
                       keeper: LeaseKeeper) -> None:
        regeneration_id = task.regeneration_id
        spec = spec_for_job(job, task)
        output_key = new_key(f"{job_prefix(job.job_id)}/versions", ".mp4")
        started = time.monotonic()

        async def on_progress(stage: str, fraction: float, eta: float | None) -> None:
            # A regeneration was rewritten and generated before; a job's first composition is all of it.
            overall = overall_progress(COMPOSE_SHARE, fraction) if regeneration_id else fraction
            await keeper.progress(stage, overall, f"Composer: {stage}", eta or 0.0)

        try:
            # No retry around the whole composition: the composer retries each download, upload
            # and killed ffmpeg itself, and nesting retries would multiply them.
            with metrics.stage_timer("compose") if regeneration_id else contextlib.nullcontext():
                result = await self.composer.compose(spec, output_key, on_progress=on_progress)
        except StaleLease:
            raise
        except Exception as exc:
            raise CompositionFailed(exc) from exc
        cost = composition_cost(self.settings.composition_price_per_second, result.duration)
        request = jobs_pb2.SucceedRegenerationRequest(
            job_id=job.job_id, lease_token=claim.token, regeneration_id=regeneration_id,
            video_key=result.video_key, video_duration=result.duration,
            composition_cost=str(cost), encoder=result.encoder,
            claim_id=claim.claim_id)
        if not regeneration_id:
            request.clip_thumbnail_keys.extend(await self._thumbnails(job))
        request.new_clips.extend(new_clips(task))
        await keeper.flush()
        await self._publish(request)
        log.info("compose.published", extra={"job_id": job.job_id, "regeneration_id": regeneration_id,
                                             "seconds": round(time.monotonic() - started, 2),
                                             "segments_encoded": result.segments_encoded,
                                             "segments_reused": result.segments_reused})

    async def _publish(self, request: jobs_pb2.SucceedRegenerationRequest) -> None:
        """Make the new video current; a refused result leaves no orphan object behind."""
        try:
            await self.status.succeed(request)
        except StaleLease:
            with contextlib.suppress(ClipChatError):
                await self.storage.delete(request.video_key)
            raise


    async def _thumbnails(self, job: common_pb2.Job) -> list[str]:
        """A still for each uploaded clip that has none, for the page. Best effort: a clip
        without a thumbnail is shown with its number instead."""
        storage = self.storage
        keys: list[str] = []
        with tempfile.TemporaryDirectory(prefix="clipchat-thumbs-") as tmp:
            for clip in job.clips:
                if clip.thumbnail_key:
                    keys.append("")
                    continue
                try:
                    source = storage.local_path(clip.video_key)
                    if source is None:
                        source = Path(tmp) / f"clip{clip.clip_index}"
                        await storage.get_file(clip.video_key, source)
                    thumb = Path(tmp) / f"thumb{clip.clip_index}.jpg"
                    await render_thumbnail(self.ffmpeg, source, thumb)
                    key = new_key(f"{job_prefix(job.job_id)}/thumbnails", ".jpg")
                    await storage.put_file(key, thumb, content_type="image/jpeg")
                    keys.append(key)
                except ClipChatError:
                    log.warning("compose.thumbnail_failed", exc_info=True,
                                extra={"job_id": job.job_id, "clip": clip.clip_index})
                    keys.append("")
        return keys

    async def _fail(self, claim: WorkClaim, regeneration_id: str, exc: BaseException, trace_id: str) -> None:
        message = RECOMPOSE_FAILED if regeneration_id else COMPOSE_FAILED
        if isinstance(exc, MediaError) and not regeneration_id:
            message = exc.message  # e.g. "Clip 3 could not be read." — the user's own upload
        detail = json.dumps({"step": "compose", "trace_id": trace_id, "error_type": type(exc).__name__,
                             "error_code": str(getattr(exc, "code", "")),
                             "message": str(getattr(exc, "message", exc)),
                             "detail": str(getattr(exc, "detail", ""))[-4000:],
                             "exception": "".join(traceback.format_exception(exc))[-8000:]})
        log.warning("compose.failed", extra={"job_id": claim.job_id, "regeneration_id": regeneration_id,
                                             "code": getattr(exc, "code", type(exc).__name__)})
        try:
            await self.status.fail(claim.job_id, claim.token, code="composition_failed", message=message,
                                   detail=detail, claim_id=claim.claim_id,
                                   retryable=not isinstance(exc, MediaError) or bool(regeneration_id))
        except StaleLease:
            pass
