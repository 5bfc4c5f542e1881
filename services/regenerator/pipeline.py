"""One regeneration's steps: rewrite the prompt → generate the clip → hand it to the composer.

Each step runs under the retry policy (capped attempts, exponential backoff with jitter, a
provider's ``Retry-After``; permanent errors are not retried). Its result and cost are checkpointed
on the regeneration row through the status service, so neither a redelivered message nor a retry
of a failed regeneration (same clip, same instruction) pays for it twice. A step that fails for
good fails the regeneration with a message for the person (``failure_outcome``) and the technical
detail for operators (``technical_detail``); an LLM answer that was refused is still recorded as
paid. Every write carries the lease token and the delivery's claim; a refused one (cancel, expiry,
another delivery took over) stops the work quietly.

Paid calls carry an idempotency key per (regeneration, step, attempt, try), and their cost is
recorded under that key, so a cost reported twice is counted once. A remote prediction is
checkpointed as soon as it is created (``generation_started``): a delivery that takes over from a
worker that died resumes it instead of paying for another. Writes to the status service are retried
for a while (it may be restarting); progress reports are best effort (``LeaseKeeper.progress``).

A change of several clips gives every clip the same look: its lead (first clip) is rewritten
first, and the LLM's description of the look it gave (``RewriteResult.style``) is given to every
other clip's rewrite (``shared_style``). The style is kept in the rewrite's checkpoint, so a retry
that reuses the lead's rewrite gives the others the same look.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from clipchat import metrics
from clipchat.domain import COMPOSE_SHARE, GENERATE_SHARE, REWRITE_SHARE, Stage, Step, overall_progress
from clipchat.errors import ClipChatError, DependencyUnavailable, InvalidInput, StaleLease
from clipchat.lease import LeaseKeeper, LeaseLost
from clipchat.media.ffmpeg import FfmpegRunner
from clipchat.media.probe import probe
from clipchat.media.thumbnail import render_thumbnail
from clipchat.retry import RetryPolicy
from clipchat.settings import Settings
from clipchat.status_client import StatusClient, checkpoints_by_step
from clipchat.storage import Storage, job_prefix, new_key
from clipchat.telemetry import tracer
from clipchat.v1 import common_pb2, jobs_pb2
from services.regenerator.generator import VideoGenerator
from services.regenerator.rewrite import PromptRewriter, RewriteRequest, RewriteResult, reference_clip

log = logging.getLogger("clipchat.regenerator")

FAILED_MESSAGE = "Regeneration failed. Please try again."
TIMED_OUT_MESSAGE = "Video generation timed out. Please retry."
# The error code a step's failure is recorded under (the provider's own code goes in the detail).
FAILED_CODES: dict[str, str] = {Step.REWRITE: "rewrite_failed", Step.GENERATE: "generation_failed"}
ACTIVE = (common_pb2.REGENERATION_STATE_QUEUED, common_pb2.REGENERATION_STATE_RUNNING)


class StepFailed(Exception):
    """A step failed for good: permanently, or on each of its attempts."""

    def __init__(self, step: str, cause: BaseException, attempts: int = 1) -> None:
        super().__init__(f"{step} failed after {attempts} attempt(s): {cause!r}")
        self.step = step
        self.cause = cause
        self.attempts = attempts


def failure_outcome(failed: StepFailed) -> tuple[str, str, bool]:
    """The error code, the message for the person and whether retrying can help.

    A refusal (content policy, an invalid or unusable prompt: ``InvalidInput``) keeps its own
    message, which says what to change, and is not retryable as it is. The generator's overall
    timeout has its own message; every other failure is the generic one.
    """
    cause = failed.cause
    if isinstance(cause, InvalidInput):
        return cause.code, cause.message, False
    if getattr(cause, "code", "") == "generation_timeout":
        return "generation_timeout", TIMED_OUT_MESSAGE, True
    return FAILED_CODES.get(failed.step, "regeneration_failed"), FAILED_MESSAGE, True


def technical_detail(failed: StepFailed, trace_id: str) -> str:
    """JSON for ``clip_regenerations.technical_detail``: for operators, never shown to users."""
    cause = failed.cause
    return json.dumps({
        "step": failed.step, "attempts": failed.attempts, "trace_id": trace_id,
        "error_type": type(cause).__name__, "error_code": str(getattr(cause, "code", "")),
        "provider_response": str(getattr(cause, "detail", ""))[:4000],
        "exception": "".join(traceback.format_exception(cause))[-8000:],
    })


class ChangeFailed(Exception):
    """Clips of a change of several clips failed for good (each with its ``StepFailed``)."""

    def __init__(self, failures: list[tuple[common_pb2.Regeneration, StepFailed]]) -> None:
        super().__init__(f"{len(failures)} clip(s) failed")
        self.failures = failures


def change_failure_message(message: str, clip_indices: list[int]) -> str:
    """The person's message for a change whose clips at ``clip_indices`` failed (numbered from 1)."""
    numbers = [str(index + 1) for index in sorted(clip_indices)]
    named = numbers[0] if len(numbers) == 1 else f"{', '.join(numbers[:-1])} and {numbers[-1]}"
    return f"Clip{'s' if len(numbers) > 1 else ''} {named} failed: {message}"


@dataclass
class RegenerationTask:
    job_id: str
    regeneration_id: str
    lease_token: str
    claim_id: str = ""  # the delivery's claim on the work ("" writes under the lease alone)
    attempt: int = 1

    def charge_key(self, step: str, tries: int = 1, regeneration_id: str = "") -> str:
        """The idempotency key of one paid call (of the change's clip ``regeneration_id``, "" its
        first), and the key its cost is recorded under."""
        return f"{regeneration_id or self.regeneration_id}:{step}:{self.attempt}.{tries}"


# Where a clip's steps report progress: (stage, overall fraction, message, eta seconds).
Report = Callable[[str, float, str, float], Awaitable[None]]


class _Tries:
    """Counts the tries of a step, for the idempotency key of each paid call."""

    def __init__(self) -> None:
        self.count = 0

    def next(self) -> int:
        self.count += 1
        return self.count


@dataclass
class _Resume:
    """The remote prediction the next try resumes ("" to create one): the one a worker started
    before (checkpointed), or this step's own once it exists, until the prediction itself fails."""

    provider_id: str


class RegenerationPipeline:
    def __init__(self, *, status: StatusClient, storage: Storage, rewriter: PromptRewriter,
                 generator: VideoGenerator, ffmpeg: FfmpegRunner, settings: Settings) -> None:
        self.status = status
        self.storage = storage
        self.rewriter = rewriter
        self.generator = generator
        self.ffmpeg = ffmpeg
        self.settings = settings
        self.policy = RetryPolicy(attempts=settings.retry_attempts, base_seconds=settings.retry_base_seconds,
                                  max_seconds=settings.retry_max_seconds)
        # A checkpoint write outlasts a status service restart rather than losing paid work.
        self.status_policy = RetryPolicy(attempts=8, base_seconds=settings.retry_base_seconds,
                                         max_seconds=settings.retry_max_seconds)

    async def run(self, task: RegenerationTask) -> None:
        """Do the regeneration's steps; record a failure with a user message when one fails for good.

        Returns quietly when the regeneration is no longer active (already done, cancelled, or its
        lease taken over): redelivered messages are harmless.
        """
        try:
            change = await self.status.get_change(task.job_id, task.regeneration_id)
        except ClipChatError as exc:
            if exc.code in ("not_found", "job_not_found"):
                return
            raise
        if change.regeneration.state not in ACTIVE:
            log.info("regeneration.skip_inactive", extra=self._ids(task))
            return
        with tracer("clipchat.regenerator").start_as_current_span("regenerate") as span:
            span.set_attribute("clipchat.job_id", task.job_id)
            span.set_attribute("clipchat.regeneration_id", task.regeneration_id)
            trace_id = format(span.get_span_context().trace_id, "032x")
            try:
                async with LeaseKeeper(self.status, task.job_id, task.lease_token, claim_id=task.claim_id,
                                       interval=self.settings.heartbeat_seconds) as keeper:
                    await self._steps(task, change, keeper)
            except (LeaseLost, StaleLease):
                log.info("regeneration.dropped_lease_lost", extra=self._ids(task))
            except StepFailed as failed:
                await self._record_failure(task, failed, trace_id)
            except ChangeFailed as failed:
                await self._record_failure(task, failed.failures[0][1], trace_id, failed.failures)

    async def _steps(self, task: RegenerationTask, change: jobs_pb2.GetRegenerationResponse,
                     keeper: LeaseKeeper) -> None:
        """Each clip's steps (a change of several clips, a bounded number at once), then one
        hand-off of every new clip to the composer."""
        clips = list((await self.status.get_job(task.job_id)).clips)
        if len(change.members) > 1:
            generated = await self._change(task, list(change.members), clips, keeper)
        else:
            generated = {change.regeneration.clip_index: await self._clip(
                task, change.regeneration, checkpoints_by_step(change), clips, keeper.progress)}
        await keeper.progress(Stage.QUEUED, overall_progress(COMPOSE_SHARE, 0), "Waiting for the composer")
        await keeper.flush()
        await self.status_policy.run(lambda: self._hand_to_composer(task, generated), what="queue_composition")

    async def _change(self, task: RegenerationTask, members: list[common_pb2.Regeneration],
                      clips: list[common_pb2.Clip], keeper: LeaseKeeper) -> dict[int, common_pb2.Checkpoint]:
        """Every clip of a change, ``change_concurrency`` at once: each clip reports its own
        progress (its regeneration's), and the change's progress bar is their mean. The lead (the
        first clip) is rewritten first; the others wait for its rewrite and take its look
        (``_look_of_the_lead``). Each clip's paid work is checkpointed even when another fails (a
        retry reuses it); ``ChangeFailed`` names the clips that failed. A lost lease stops them all."""
        slots = asyncio.Semaphore(self.settings.change_concurrency)
        fractions = dict.fromkeys((m.regeneration_id for m in members), 0.0)
        lead_look: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

        async def one(member: common_pb2.Regeneration) -> common_pb2.Checkpoint | StepFailed | None:
            async def report(stage: str, fraction: float, message: str, eta: float = 0.0) -> None:
                fractions[member.regeneration_id] = fraction
                done = sum(1 for f in fractions.values() if f >= GENERATE_SHARE[1])
                await keeper.progress(stage, fraction, message, eta, regeneration_id=member.regeneration_id)
                await keeper.progress(stage, sum(fractions.values()) / len(fractions),
                                      f"{message} ({done} of {len(fractions)} clips ready)", eta)

            lead = member is members[0]
            shared = None if lead else await lead_look  # before a slot: the lead may need the last one
            if shared is None and not lead:
                return None  # the lead's rewrite failed: nothing is started (or paid) for this clip
            async with slots:
                checkpoints = checkpoints_by_step(await self.status.get_change(task.job_id, member.regeneration_id))
                try:
                    return await self._clip(task, member, checkpoints, clips, report, shared_style=shared or None,
                                            on_rewritten=lead_look.set_result if lead else None)
                except StepFailed as failed:
                    if lead and not lead_look.done():
                        lead_look.set_result(None)
                    return failed

        try:
            async with asyncio.TaskGroup() as group:
                running = [(member, group.create_task(one(member))) for member in members]
        except BaseExceptionGroup as errors:
            raise errors.exceptions[0] from None
        results = [(member, done.result()) for member, done in running]
        failures = [(member, result) for member, result in results if isinstance(result, StepFailed)]
        if failures:
            raise ChangeFailed(failures)
        return {member.clip_index: result for member, result in results if isinstance(result, common_pb2.Checkpoint)}

    async def _clip(self, task: RegenerationTask, regeneration: common_pb2.Regeneration,
                    checkpoints: dict[Step, common_pb2.Checkpoint], clips: list[common_pb2.Clip],
                    report: Report, *, shared_style: str | None = None,
                    on_rewritten: Callable[[str], None] | None = None) -> common_pb2.Checkpoint:
        """One clip's steps: rewrite its prompt (with a change's ``shared_style``), generate it
        (each reused from its checkpoint). ``on_rewritten`` is given the look of the rewrite ("":
        none) before the generation starts."""
        index = regeneration.clip_index
        member = regeneration.regeneration_id if regeneration.change_id else ""
        await report(Stage.REWRITING, overall_progress(REWRITE_SHARE, 0.2), "Rewriting the prompt", 0.0)
        if Step.REWRITE in checkpoints:
            prompt = checkpoints[Step.REWRITE].prompt
            if on_rewritten is not None:
                on_rewritten(checkpoints[Step.REWRITE].style)
        else:
            result = await self._rewrite_clip(task, regeneration, clips, member, shared_style)
            prompt = result.prompt
            if on_rewritten is not None:
                on_rewritten(result.style)
        await report(Stage.GENERATING, overall_progress(GENERATE_SHARE, 0), "Generating the new clip", 0.0)
        if Step.GENERATE in checkpoints:
            return checkpoints[Step.GENERATE]
        started = checkpoints.get(Step.GENERATION_STARTED)
        resume = _Resume(started.provider_id if started is not None else "")
        tries = _Tries()
        generated, cost = await self._step("generate", lambda: self._generate(
            task, prompt, clips[index].duration, report, resume, task.charge_key("generate", tries.next(), member),
            member))
        try:
            await self._record_step(task, Step.GENERATE, cost=cost, checkpoint=generated,
                                    charge_key=task.charge_key("generate", tries.count, member),
                                    regeneration_id=member)
        except BaseException:
            # Not checkpointed (cancelled, taken over, status down): nothing will ever use it.
            await asyncio.shield(self._discard(generated))
            raise
        return generated

    async def _rewrite_clip(self, task: RegenerationTask, regeneration: common_pb2.Regeneration,
                            clips: list[common_pb2.Clip], member: str, shared_style: str | None) -> RewriteResult:
        """Rewrite one clip's prompt (its neighbours' prompts as context, a change's look to take)
        and checkpoint it with the look it gave (in a change, for a retry to give the others)."""
        index = regeneration.clip_index
        history = [{"role": turn.role, "content": turn.content} for turn in regeneration.conversation_history]
        reference = reference_clip(regeneration.user_instruction)
        request = RewriteRequest(
            original_prompt=regeneration.original_prompt, instruction=regeneration.user_instruction,
            history=history, previous_prompt=clips[index - 1].prompt if index > 0 else None,
            next_prompt=clips[index + 1].prompt if index + 1 < len(clips) else None,
            reference_prompt=clips[reference - 1].prompt if reference and reference <= len(clips) else None,
            shared_style=shared_style)
        tries = _Tries()
        try:
            result: RewriteResult = await self._step("rewrite", lambda: self._rewrite(request, task.charge_key(
                "rewrite", tries.next(), member)))
        except StepFailed as failed:
            await self._record_billed_refusal(task, failed, task.charge_key("rewrite", tries.count, member), member)
            raise
        await self._record_step(task, Step.REWRITE, cost=str(result.cost), modified_prompt=result.prompt,
                                change_summary=result.summary, rewriter=result.rewriter,
                                checkpoint=common_pb2.Checkpoint(prompt=result.prompt,
                                                                 style=result.style if member else ""),
                                charge_key=task.charge_key("rewrite", tries.count, member), regeneration_id=member)
        return result

    async def _discard(self, generated: common_pb2.Checkpoint) -> None:
        for key in (generated.video_key, generated.thumbnail_key):
            if key:
                try:
                    await self.storage.delete(key)
                except ClipChatError:
                    log.warning("regeneration.discard_failed", extra={"key": key})

    async def _record_step(self, task: RegenerationTask, step: Step, **fields: Any) -> None:
        """Checkpoint a step under the claim, retried while the status service is unavailable."""
        await self.status_policy.run(lambda: self.status.record_step(
            task.job_id, task.lease_token, step, claim_id=task.claim_id, **fields), what=f"record_{step}")

    async def _rewrite(self, request: RewriteRequest, idempotency_key: str) -> Any:
        request = replace(request, idempotency_key=idempotency_key)
        result = await self.rewriter.rewrite(request)
        if result is None:  # a chain always ends with a rewriter that answers
            raise ClipChatError("No rewriter handled the instruction.")
        return result

    async def _generate(self, task: RegenerationTask, prompt: str, duration: float, report: Report,
                        resume: _Resume, idempotency_key: str,
                        member: str = "") -> tuple[common_pb2.Checkpoint, str]:
        """Generate the clip and store it with its thumbnail: its checkpoint, and what it cost."""
        started = time.monotonic()

        async def on_progress(fraction: float) -> None:
            elapsed = time.monotonic() - started
            eta = elapsed / fraction - elapsed if fraction > 0.05 else 0.0
            await report(Stage.GENERATING, overall_progress(GENERATE_SHARE, fraction), "Generating the new clip", eta)

        async def on_started(provider_id: str) -> None:
            # Durable before any wait: a delivery that takes over resumes this prediction.
            resume.provider_id = provider_id
            await self._record_step(task, Step.GENERATION_STARTED, regeneration_id=member,
                                    checkpoint=common_pb2.Checkpoint(provider_id=provider_id))

        with tempfile.TemporaryDirectory(prefix="clipchat-gen-") as tmp:
            video = Path(tmp) / "clip.mp4"
            try:
                clip = await self.generator.generate(prompt, duration, video, on_progress=on_progress,
                                                     idempotency_key=idempotency_key,
                                                     resume_id=resume.provider_id, on_started=on_started)
            except Exception:
                # The prediction itself failed or was cancelled: the next try pays for a new one.
                resume.provider_id = ""
                raise
            # From here a failure (probe, storage) retries with the same, finished prediction.
            info = await probe(clip.path, label="The generated clip")
            thumb = Path(tmp) / "thumb.jpg"
            await render_thumbnail(self.ffmpeg, clip.path, thumb)
            prefix = f"{job_prefix(task.job_id)}/clips"
            video_key = new_key(prefix, ".mp4")
            thumb_key = new_key(prefix, ".jpg")
            await self.storage.put_file(video_key, clip.path, content_type="video/mp4")
            await self.storage.put_file(thumb_key, thumb, content_type="image/jpeg")
        return common_pb2.Checkpoint(
            video_key=video_key, thumbnail_key=thumb_key, duration=duration, probed_duration=info.duration,
            prompt=prompt, provider=self.generator.name, provider_id=clip.provider_id), str(Decimal(clip.cost))

    async def _hand_to_composer(self, task: RegenerationTask, generated: dict[int, common_pb2.Checkpoint]) -> None:
        """The status service queues the composition (its outbox) and moves the work on."""
        await self.status.queue_composition(task.job_id, task.lease_token, task.claim_id, {
            index: jobs_pb2.ClipInput(prompt=clip.prompt, duration=clip.duration, video_key=clip.video_key,
                                      thumbnail_key=clip.thumbnail_key)
            for index, clip in generated.items()})

    async def _step(self, name: str, fn: Any) -> Any:
        """Run one step under the retry policy; ``StepFailed`` when it fails for good."""
        attempts = 1

        async def on_retry(attempt: int, exc: BaseException) -> None:
            nonlocal attempts
            attempts = attempt + 1

        try:
            with metrics.stage_timer(name):
                return await self.policy.run(fn, what=name, on_retry=on_retry)
        except (LeaseLost, StaleLease, DependencyUnavailable):
            # Our own storage or status service down is not the regeneration failing: the message
            # comes back later (``run_claimed``) and resumes from the checkpoints.
            raise
        except Exception as exc:
            raise StepFailed(name, exc, attempts) from exc

    async def _record_billed_refusal(self, task: RegenerationTask, failed: StepFailed, charge_key: str,
                                     member: str = "") -> None:
        """An LLM answer that was refused (unusable prompt, model refusal) was still billed."""
        cost = getattr(failed.cause, "cost", None)
        if isinstance(cost, Decimal) and cost > 0:
            await self._record_step(task, Step.REWRITE, cost=str(cost), rewriter="llm", charge_key=charge_key,
                                    regeneration_id=member)

    async def _record_failure(self, task: RegenerationTask, failed: StepFailed, trace_id: str,
                              failures: list[tuple[common_pb2.Regeneration, StepFailed]] | None = None) -> None:
        """Fail the work with the person's message (in a change, naming the clips that failed)."""
        code, message, retryable = failure_outcome(failed)
        failed_ids: tuple[str, ...] = ()
        if failures:
            message = change_failure_message(message, [member.clip_index for member, _ in failures])
            failed_ids = tuple(member.regeneration_id for member, _ in failures)
        log.warning("regeneration.step_failed", extra={
            **self._ids(task), "step": failed.step, "code": code, "attempts": failed.attempts,
            "cause": type(failed.cause).__name__, "cause_code": getattr(failed.cause, "code", "")})
        try:
            await self.status_policy.run(lambda: self.status.fail(
                task.job_id, task.lease_token, code=code, message=message,
                detail=technical_detail(failed, trace_id), retryable=retryable, claim_id=task.claim_id,
                failed_regeneration_ids=failed_ids), what="record_failure")
        except StaleLease:
            pass

    @staticmethod
    def _ids(task: RegenerationTask) -> dict[str, str]:
        return {"job_id": task.job_id, "regeneration_id": task.regeneration_id}
