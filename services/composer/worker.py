"""The RabbitMQ consumer of the compose queue: compose, then publish the new version."""

from __future__ import annotations

import json
import logging
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from clipchat.broker import Delivery, RequeueMessage
from clipchat.errors import ClipChatError, MediaError, StaleLease
from clipchat.lease import LeaseKeeper, LeaseLost
from clipchat.media.ffmpeg import FfmpegRunner
from clipchat.media.thumbnail import render_thumbnail
from clipchat.settings import Settings
from clipchat.status_client import StatusClient
from clipchat.storage import Storage, job_prefix, new_key
from clipchat.telemetry import extract_context, tracer
from clipchat.v1 import common_pb2, jobs_pb2
from services.composer.pipeline import ClipSpec, Composer, CompositionSpec, TransitionSpec

log = logging.getLogger("clipchat.composer")

RECOMPOSE_FAILED = "Recomposition failed. Original video preserved."
COMPOSE_FAILED = "Composition failed. Please check the clips and try again."


class CompositionFailed(Exception):
    """The composition failed for good: permanently, or on each of its attempts."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"composition failed: {cause!r}")
        self.cause = cause


def spec_for_job(job: common_pb2.Job, new_clip: dict[str, Any] | None = None) -> CompositionSpec:
    """The composition of a job's current clips, with one clip replaced when ``new_clip`` is given."""
    clips = [ClipSpec(video_key=c.video_key, duration=c.duration) for c in job.clips]
    if new_clip is not None:
        clips[int(new_clip["clip_index"])] = ClipSpec(video_key=new_clip["video_key"],
                                                      duration=float(new_clip["duration"]))
    return CompositionSpec(
        job_id=job.job_id, clips=clips, audio_key=job.audio_key,
        transitions=[TransitionSpec(kind=t.kind, duration=t.duration) for t in job.transitions],
        beat_timestamps=list(job.beat_timestamps), aspect_ratio=job.aspect_ratio or "16:9",
        fit=job.fit or "pad")


class ComposeWorker:
    """One composition a message; idempotent on the regeneration id (or the job for the first one)."""

    def __init__(self, *, composer: Composer, status: StatusClient, storage: Storage, ffmpeg: FfmpegRunner,
                 settings: Settings) -> None:
        self.composer = composer
        self.status = status
        self.storage = storage
        self.ffmpeg = ffmpeg
        self.settings = settings

    async def handle(self, delivery: Delivery) -> None:
        body = delivery.body
        job_id, token = str(body.get("job_id", "")), str(body.get("lease_token", ""))
        regeneration_id = str(body.get("regeneration_id", ""))
        if not job_id or not token:
            raise ValueError("malformed compose message")
        ids = {"job_id": job_id, "regeneration_id": regeneration_id}
        with tracer("clipchat.composer").start_as_current_span(
                "compose.message", context=extract_context(delivery.headers)) as span:
            trace_id = format(span.get_span_context().trace_id, "032x")
            try:
                job = await self.status.get_job(job_id)
                if not await self._still_active(job, regeneration_id):
                    log.info("compose.skip_inactive", extra=ids)
                    return
                async with LeaseKeeper(self.status, job_id, token, interval=self.settings.heartbeat_seconds):
                    await self._compose(job, token, regeneration_id, body.get("new_clip"))
            except (LeaseLost, StaleLease):
                log.info("compose.dropped_lease_lost", extra=ids)
            except CompositionFailed as failed:
                # The composition itself failed for good (permanently, or on each of its retries):
                # another delivery would only repeat them.
                await self._fail(job_id, token, regeneration_id, failed.cause, trace_id)
            except ClipChatError as exc:
                # Talking to the status service failed (before composing, or publishing the result).
                if exc.code in ("not_found", "job_not_found"):
                    return
                if not exc.retryable or delivery.delivery_count >= self.settings.retry_attempts:
                    await self._fail(job_id, token, regeneration_id, exc, trace_id)
                    return
                log.warning("compose.requeue", extra=ids)
                raise RequeueMessage(str(exc)) from exc

    async def _still_active(self, job: common_pb2.Job, regeneration_id: str) -> bool:
        if regeneration_id:
            return job.active_regeneration_id == regeneration_id
        return job.state == common_pb2.JOB_STATE_COMPOSING

    async def _compose(self, job: common_pb2.Job, token: str, regeneration_id: str,
                       new_clip: dict[str, Any] | None) -> None:
        spec = spec_for_job(job, new_clip)
        output_key = new_key(f"{job_prefix(job.job_id)}/versions", ".mp4")
        started = time.monotonic()

        async def on_progress(stage: str, fraction: float, eta: float | None) -> None:
            # The regeneration's first 60 % were rewriting and generating.
            overall = 0.6 + 0.4 * fraction if regeneration_id else fraction
            await self.status.progress(job.job_id, token, stage, overall, message=f"Composer: {stage}",
                                       eta_seconds=eta or 0.0)

        try:
            # No retry around the whole composition: the composer retries each download, upload
            # and killed ffmpeg itself, and nesting retries would multiply them.
            result = await self.composer.compose(spec, output_key, on_progress=on_progress)
        except StaleLease:
            raise
        except Exception as exc:
            raise CompositionFailed(exc) from exc
        cost = (self.settings.composition_price_per_second
                * type(self.settings.composition_price_per_second)(str(round(result.duration, 3))))
        request = jobs_pb2.SucceedRegenerationRequest(
            job_id=job.job_id, lease_token=token, regeneration_id=regeneration_id,
            video_key=result.video_key, video_duration=result.duration,
            composition_cost=str(cost.quantize(type(cost)("0.0001"))), encoder=result.encoder)
        if not regeneration_id:
            request.clip_thumbnail_keys.extend(await self._thumbnails(job))
        if new_clip is not None:
            request.new_clip.CopyFrom(jobs_pb2.ClipInput(
                prompt=str(new_clip["prompt"]), duration=float(new_clip["duration"]),
                video_key=str(new_clip["video_key"]), thumbnail_key=str(new_clip.get("thumbnail_key", ""))))
        await self.status.succeed(request)
        log.info("compose.published", extra={"job_id": job.job_id, "regeneration_id": regeneration_id,
                                             "seconds": round(time.monotonic() - started, 2),
                                             "segments_encoded": result.segments_encoded,
                                             "segments_reused": result.segments_reused})

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

    async def _fail(self, job_id: str, token: str, regeneration_id: str, exc: BaseException,
                    trace_id: str) -> None:
        message = RECOMPOSE_FAILED if regeneration_id else COMPOSE_FAILED
        if isinstance(exc, MediaError) and not regeneration_id:
            message = exc.message  # e.g. "Clip 3 could not be read." — the user's own upload
        detail = json.dumps({"step": "compose", "trace_id": trace_id, "error_type": type(exc).__name__,
                             "error_code": str(getattr(exc, "code", "")),
                             "message": str(getattr(exc, "message", exc)),
                             "detail": str(getattr(exc, "detail", ""))[-4000:],
                             "exception": "".join(traceback.format_exception(exc))[-8000:]})
        log.warning("compose.failed", extra={"job_id": job_id, "regeneration_id": regeneration_id,
                                             "code": getattr(exc, "code", type(exc).__name__)})
        try:
            await self.status.fail(job_id, token, code="composition_failed", message=message, detail=detail,
                                   retryable=not isinstance(exc, MediaError) or bool(regeneration_id))
        except StaleLease:
            pass
