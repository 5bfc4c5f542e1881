"""JobStatusService: thin gRPC servicer translating messages ↔ state machine calls."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from clipchat import proto_enums
from clipchat.db.models import ClipRegeneration, JobEvent
from clipchat.domain import Stage
from clipchat.errors import InvalidInput
from clipchat.rpc import require_owner, rpc_method
from clipchat.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc
from services.status.events import EventHub
from services.status.paging import decode_page_token, encode_page_token, page_size
from services.status.reads import JobReads
from services.status.reports import Comparison, JobReports, Usage
from services.status.state_machine import (
    ClipInput,
    ClipQuote,
    JobSnapshot,
    JobStateMachine,
)

log = logging.getLogger("clipchat.status")

SERVICE_NAME = "clipchat.v1.JobStatusService"


def stage_to_proto(stage: str | None) -> common_pb2.Stage.ValueType:
    """A stored stage as the proto enum; one this version does not know is unspecified."""
    try:
        return proto_enums.stage_to_proto(stage)
    except ValueError:
        return common_pb2.STAGE_UNSPECIFIED


def stage_from_proto(stage: common_pb2.Stage.ValueType) -> Stage:
    try:
        known = proto_enums.stage_from_proto(stage)
    except ValueError:
        known = None
    if known is None:
        raise InvalidInput("A progress report needs a stage.")
    return known


def checkpoint_from_proto(checkpoint: common_pb2.Checkpoint) -> dict[str, Any]:
    """A step's checkpoint as stored (a JSON object of its set fields)."""
    return json_format.MessageToDict(checkpoint, preserving_proto_field_name=True)


def checkpoints_to_proto(stored: dict[str, Any] | None) -> list[common_pb2.StepCheckpoint]:
    """The stored checkpoints, by step; a step or field this version does not know is left out."""
    checkpoints = []
    for name, fields in (stored or {}).items():
        try:
            step = proto_enums.step_to_proto(name)
        except ValueError:
            continue
        checkpoint = common_pb2.Checkpoint()
        try:
            json_format.ParseDict(fields if isinstance(fields, dict) else {}, checkpoint, ignore_unknown_fields=True)
        except json_format.ParseError:
            log.warning("checkpoint.unreadable", extra={"step": name})
        checkpoints.append(common_pb2.StepCheckpoint(step=step, checkpoint=checkpoint))
    return checkpoints


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def job_to_proto(snapshot: JobSnapshot) -> common_pb2.Job:
    job = snapshot.job
    return common_pb2.Job(
        job_id=str(job.id), owner=job.owner, title=job.title, state=proto_enums.job_state_to_proto(job.status),
        audio_key=job.audio_key,
        transitions=[common_pb2.Transition(kind=t.get("kind", "cut"), duration=float(t.get("duration", 0)))
                     for t in job.transitions],
        beat_timestamps=job.beat_timestamps, aspect_ratio=job.aspect_ratio, fit=job.fit,
        current_version=job.current_version or 0, total_cost=str(job.total_cost),
        budget_limit=str(job.budget_limit),
        active_regeneration_id=str(job.active_regeneration_id or ""),
        clips=[common_pb2.Clip(clip_index=c.clip_index, prompt=c.prompt, duration=c.duration,
                               video_key=c.video_key, thumbnail_key=c.thumbnail_key, status=c.status,
                               cost=str(c.cost), revision=c.revision) for c in snapshot.clips],
        versions=[common_pb2.VideoVersion(
            version=v.version, storage_key=v.storage_key, duration=v.duration,
            created_by_regeneration_id=str(v.created_by_regeneration_id or ""),
            created_at=_ts(v.created_at), encoder=v.encoder) for v in snapshot.versions],
        created_at=_ts(job.created_at), updated_at=_ts(job.updated_at),
        error_code=job.error_code or "", error_message=job.error_message or "",
        error_retryable=job.error_retryable)


def regeneration_to_proto(row: ClipRegeneration) -> common_pb2.Regeneration:
    return common_pb2.Regeneration(
        regeneration_id=str(row.id), job_id=str(row.job_id), clip_index=row.clip_index,
        original_prompt=row.original_prompt, modified_prompt=row.modified_prompt or "",
        user_instruction=row.user_instruction,
        conversation_history=[common_pb2.Turn(role=str(turn.get("role", "")), content=str(turn.get("content", "")))
                              for turn in row.conversation_history or [] if isinstance(turn, dict)],
        cost=str(row.cost), estimated_cost=str(row.estimated_cost),
        step_costs=common_pb2.StepCosts(llm=str(row.llm_cost), generation=str(row.generation_cost),
                                        composition=str(row.composition_cost)),
        state=proto_enums.regeneration_state_to_proto(row.status), stage=stage_to_proto(row.stage),
        progress=row.progress,
        attempts=row.attempts, error_code=row.error_code or "", error_message=row.error_message or "",
        retryable=row.retryable, created_at=_ts(row.created_at), finished_at=_ts(row.finished_at),
        change_summary=row.change_summary or "", rewriter=row.rewriter or "",
        change_id=str(row.change_id or ""))


def clip_input(c: jobs_pb2.ClipInput) -> ClipInput:
    return ClipInput(c.prompt, c.duration, c.video_key, c.thumbnail_key)


def new_clips_from_proto(request: jobs_pb2.QueueCompositionRequest | jobs_pb2.SucceedRegenerationRequest
                         ) -> list[tuple[int, ClipInput]]:
    """The new clips of a change, by clip index."""
    return [(at.clip_index, clip_input(at.clip)) for at in request.new_clips]


# The payload message (JobEvent's oneof field) of each kind of event; the log stores it as a JSON object.
EVENT_PAYLOADS = {
    "job.created": "job_created",
    "regeneration.queued": "regeneration_queued",
    "budget.warning": "budget_warning",
    "progress": "progress",
    "regeneration.step": "step_recorded",
    "regeneration.completed": "version_published",
    "job.composed": "version_published",
    "regeneration.cancelled": "regeneration_cancelled",
    "version.restored": "version_restored",
    "regeneration.failed": "work_failed",
    "job.failed": "work_failed",
}


def event_to_proto(row: JobEvent) -> common_pb2.JobEvent:
    event = common_pb2.JobEvent(job_id=str(row.job_id), sequence=row.sequence, type=row.type,
                                stage=stage_to_proto(row.stage), fraction=row.fraction,
                                created_at=_ts(row.created_at))
    field = EVENT_PAYLOADS.get(row.type)
    if field is not None:
        payload = getattr(event, field)
        payload.SetInParent()
        stored = dict(row.payload) if isinstance(row.payload, dict) else {}
        if "step" in stored:
            try:
                stored["step"] = proto_enums.step_to_proto(str(stored["step"]))
            except ValueError:
                del stored["step"]
        try:
            json_format.ParseDict(stored, payload, ignore_unknown_fields=True)
        except json_format.ParseError:
            log.warning("event.payload_unreadable", extra={"job_id": str(row.job_id), "sequence": row.sequence})
    return event


class JobStatusServicer(jobs_pb2_grpc.JobStatusServiceServicer):
    def __init__(self, machine: JobStateMachine, hub: EventHub, *, poll_seconds: float = 1.0,
                 reports: JobReports | None = None) -> None:
        self.machine = machine
        self.hub = hub
        self.poll_seconds = poll_seconds
        self.reports = reports if reports is not None else JobReports(machine.db)
        self.reads = JobReads(machine, job_to_proto)

    @rpc_method
    async def CreateJob(self, request: jobs_pb2.CreateJobRequest, context: Any) -> jobs_pb2.CreateJobResponse:
        require_owner(request.owner, "Creating a job")
        snapshot, token = await self.machine.create_job(
            owner=request.owner,
            clips=[ClipInput(c.prompt, c.duration, c.video_key, c.thumbnail_key) for c in request.clips],
            audio_key=request.audio_key,
            transitions=[{"kind": t.kind or "cut", "duration": t.duration} for t in request.transitions],
            beat_timestamps=list(request.beat_timestamps), aspect_ratio=request.aspect_ratio or "16:9",
            fit=request.fit or "pad", budget_limit=request.budget_limit, title=request.title,
            job_id=request.job_id)
        return jobs_pb2.CreateJobResponse(job=job_to_proto(snapshot), lease_token=token)

    @rpc_method
    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: Any) -> jobs_pb2.GetJobResponse:
        return jobs_pb2.GetJobResponse(job=await self.reads.get_job(request.job_id, request.owner))

    @rpc_method
    async def ListJobs(self, request: jobs_pb2.ListJobsRequest, context: Any) -> jobs_pb2.ListJobsResponse:
        require_owner(request.owner, "Listing jobs")
        after = decode_page_token(request.page_token) if request.page_token else None
        page, next_key = await self.machine.list_jobs(request.owner, limit=page_size(request.page_size),
                                                      after=after)
        return jobs_pb2.ListJobsResponse(jobs=[job_to_proto(s) for s in page],
                                         next_page_token=encode_page_token(next_key) if next_key else "")

    @rpc_method
    async def BeginRegeneration(self, request: jobs_pb2.BeginRegenerationRequest,
                                context: Any) -> jobs_pb2.BeginRegenerationResponse:
        require_owner(request.owner, "Regenerating a clip")
        history = [{"role": turn.role, "content": turn.content} for turn in request.conversation_history]
        if request.clips:
            result = await self.machine.begin_change(
                job_id=request.job_id, owner=request.owner, instruction=request.user_instruction, history=history,
                quotes=[ClipQuote(q.clip_index, dict(q.step_costs)) for q in request.clips])
        else:
            result = await self.machine.begin(job_id=request.job_id, owner=request.owner,
                                              clip_index=request.clip_index,
                                              instruction=request.user_instruction, history=history,
                                              estimated_cost=request.estimated_cost,
                                              estimated_step_costs=dict(request.estimated_step_costs))
        return jobs_pb2.BeginRegenerationResponse(
            regeneration=regeneration_to_proto(result.regeneration), lease_token=result.lease_token,
            lease_expires_at=_ts(result.lease_expires_at), budget_warning=result.budget_warning,
            members=[regeneration_to_proto(row) for row in result.members],
            estimated_cost=str(result.estimated_cost))

    @rpc_method
    async def RenewLease(self, request: jobs_pb2.RenewLeaseRequest, context: Any) -> jobs_pb2.RenewLeaseResponse:
        expires = await self.machine.renew(request.job_id, request.lease_token, request.claim_id)
        return jobs_pb2.RenewLeaseResponse(lease_expires_at=_ts(expires))

    @rpc_method
    async def ClaimWork(self, request: jobs_pb2.ClaimWorkRequest, context: Any) -> jobs_pb2.ClaimWorkResponse:
        try:
            phase = proto_enums.work_phase_from_proto(request.phase)
        except ValueError:
            phase = None
        if phase is None:
            raise InvalidInput("A claim needs a work phase.")
        claim = await self.machine.claim_work(request.job_id, request.lease_token, phase, request.claim_id)
        return jobs_pb2.ClaimWorkResponse(outcome=proto_enums.claim_outcome_to_proto(claim.outcome),
                                          attempt=claim.attempt, retry_after_seconds=claim.retry_after)

    @rpc_method
    async def ReleaseClaim(self, request: jobs_pb2.ReleaseClaimRequest,
                           context: Any) -> jobs_pb2.ReleaseClaimResponse:
        await self.machine.release_claim(request.job_id, request.lease_token, request.claim_id)
        return jobs_pb2.ReleaseClaimResponse()

    @rpc_method
    async def QueueComposition(self, request: jobs_pb2.QueueCompositionRequest,
                               context: Any) -> jobs_pb2.QueueCompositionResponse:
        # (clip_index and new_clip: the one-clip form of workers that predate changes)
        await self.machine.queue_composition(
            request.job_id, request.lease_token, request.claim_id, new_clips_from_proto(request),
            clip_index=request.clip_index,
            new_clip=clip_input(request.new_clip) if request.HasField("new_clip") and not request.new_clips else None)
        return jobs_pb2.QueueCompositionResponse()

    @rpc_method
    async def RecordProgress(self, request: jobs_pb2.RecordProgressRequest,
                             context: Any) -> jobs_pb2.RecordProgressResponse:
        sequence = await self.machine.record_progress(
            request.job_id, request.lease_token, stage=stage_from_proto(request.stage),
            fraction=request.fraction, message=request.message, eta_seconds=request.eta_seconds,
            claim_id=request.claim_id, regeneration_id=request.regeneration_id)
        return jobs_pb2.RecordProgressResponse(sequence=sequence)

    @rpc_method
    async def RecordStep(self, request: jobs_pb2.RecordStepRequest, context: Any) -> jobs_pb2.RecordStepResponse:
        checkpoint = checkpoint_from_proto(request.checkpoint) if request.HasField("checkpoint") else None
        try:
            step = proto_enums.step_from_proto(request.step)
        except ValueError:
            step = None
        row = await self.machine.record_step(
            request.job_id, request.lease_token, step=step or "", cost=request.cost,
            modified_prompt=request.modified_prompt, change_summary=request.change_summary,
            rewriter=request.rewriter, checkpoint=checkpoint, claim_id=request.claim_id,
            charge_key=request.charge_key, regeneration_id=request.regeneration_id)
        return jobs_pb2.RecordStepResponse(regeneration=regeneration_to_proto(row))

    @rpc_method
    async def SucceedRegeneration(self, request: jobs_pb2.SucceedRegenerationRequest,
                                  context: Any) -> jobs_pb2.SucceedRegenerationResponse:
        snapshot = await self.machine.succeed(
            request.job_id, request.lease_token, regeneration_id=request.regeneration_id,
            new_clips=new_clips_from_proto(request),
            new_clip=clip_input(request.new_clip) if request.HasField("new_clip") and not request.new_clips else None,
            video_key=request.video_key, video_duration=request.video_duration,
            composition_cost=request.composition_cost, encoder=request.encoder,
            clip_thumbnail_keys=list(request.clip_thumbnail_keys), claim_id=request.claim_id)
        return jobs_pb2.SucceedRegenerationResponse(job=job_to_proto(snapshot))

    @rpc_method
    async def FailRegeneration(self, request: jobs_pb2.FailRegenerationRequest,
                               context: Any) -> jobs_pb2.FailRegenerationResponse:
        snapshot = await self.machine.fail(
            request.job_id, request.lease_token, error_code=request.error_code,
            error_message=request.error_message, technical_detail=request.technical_detail,
            retryable=request.retryable, claim_id=request.claim_id,
            failed_regeneration_ids=list(request.failed_regeneration_ids))
        return jobs_pb2.FailRegenerationResponse(job=job_to_proto(snapshot))

    @rpc_method
    async def CancelRegeneration(self, request: jobs_pb2.CancelRegenerationRequest,
                                 context: Any) -> jobs_pb2.CancelRegenerationResponse:
        require_owner(request.owner, "Cancelling a regeneration")
        row = await self.machine.cancel(request.job_id, request.owner, request.regeneration_id)
        return jobs_pb2.CancelRegenerationResponse(regeneration=regeneration_to_proto(row))

    @rpc_method
    async def GetRegeneration(self, request: jobs_pb2.GetRegenerationRequest,
                              context: Any) -> jobs_pb2.GetRegenerationResponse:
        row, rows = await self.machine.get_change(request.job_id, request.regeneration_id)
        return jobs_pb2.GetRegenerationResponse(
            regeneration=regeneration_to_proto(row), checkpoints=checkpoints_to_proto(row.checkpoints),
            members=[regeneration_to_proto(r) for r in rows] if len(rows) > 1 else [])

    @rpc_method
    async def ListRegenerations(self, request: jobs_pb2.ListRegenerationsRequest,
                                context: Any) -> jobs_pb2.ListRegenerationsResponse:
        require_owner(request.owner, "Listing regenerations")
        rows = await self.machine.list_regenerations(request.job_id, request.owner)
        return jobs_pb2.ListRegenerationsResponse(regenerations=[regeneration_to_proto(r) for r in rows])

    @rpc_method
    async def RestoreVersion(self, request: jobs_pb2.RestoreVersionRequest,
                             context: Any) -> jobs_pb2.RestoreVersionResponse:
        require_owner(request.owner, "Restoring a version")
        snapshot = await self.machine.restore_version(request.job_id, request.owner, request.version)
        return jobs_pb2.RestoreVersionResponse(job=job_to_proto(snapshot))

    @rpc_method
    async def WatchJob(self, request: jobs_pb2.WatchJobRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[common_pb2.JobEvent]:
        """Replay events after ``after_sequence`` from the log, then follow new ones.

        Always reading the log by sequence makes the stream gap-free and duplicate-free, whatever
        order notifications arrive in.
        """
        require_owner(request.owner, "Watching a job")
        await self.machine.check_owner(request.job_id, request.owner)
        last = max(request.after_sequence, 0)
        while True:
            events = await self.machine.events_after(request.job_id, last)
            for event in events:
                yield event_to_proto(event)
                last = event.sequence
            if events:
                continue
            if request.replay_only:
                return
            await self.hub.wait(request.job_id, last, self.poll_seconds)
            await asyncio.sleep(0)

    @rpc_method
    async def CompareVersions(self, request: jobs_pb2.CompareVersionsRequest,
                              context: Any) -> jobs_pb2.CompareVersionsResponse:
        require_owner(request.owner, "Comparing versions")
        comparison = await self.reports.compare_versions(request.job_id, request.owner,
                                                         request.from_version, request.to_version)
        return comparison_to_proto(comparison)

    @rpc_method
    async def GetUsage(self, request: jobs_pb2.GetUsageRequest, context: Any) -> jobs_pb2.GetUsageResponse:
        require_owner(request.owner, "Reading usage")
        usage = await self.reports.usage(request.owner, request.job_id)
        return jobs_pb2.GetUsageResponse(usage=usage_to_proto(usage))


def comparison_to_proto(comparison: Comparison) -> jobs_pb2.CompareVersionsResponse:
    return jobs_pb2.CompareVersionsResponse(
        from_version=comparison.from_version, to_version=comparison.to_version,
        clips=[jobs_pb2.ClipDifference(
            clip_index=d.clip_index, revision_before=d.before.revision, revision_after=d.after.revision,
            prompt_before=d.before.prompt, prompt_after=d.after.prompt,
            video_key_before=d.before.video_key, video_key_after=d.after.video_key,
            thumbnail_key_before=d.before.thumbnail_key, thumbnail_key_after=d.after.thumbnail_key)
            for d in comparison.clips],
        changes=[jobs_pb2.VersionChange(
            regeneration_id=str(row.id), clip_index=row.clip_index, user_instruction=row.user_instruction,
            state=proto_enums.regeneration_state_to_proto(row.status), cost=str(row.cost),
            step_costs=common_pb2.StepCosts(llm=str(row.llm_cost), generation=str(row.generation_cost),
                                            composition=str(row.composition_cost)),
            version=version, created_at=_ts(row.created_at), finished_at=_ts(row.finished_at))
            for row, version in comparison.changes],
        cost=str(comparison.cost))


def usage_to_proto(usage: Usage) -> jobs_pb2.Usage:
    return jobs_pb2.Usage(
        jobs=usage.jobs, total_cost=str(usage.total_cost), rewrite_cost=str(usage.step_costs["rewrite"]),
        generate_cost=str(usage.step_costs["generate"]), compose_cost=str(usage.step_costs["compose"]),
        running_cost=str(usage.running_cost), completed=usage.outcomes["completed"],
        failed=usage.outcomes["failed"], cancelled=usage.outcomes["cancelled"],
        running=usage.outcomes["running"],
        stage_times=[jobs_pb2.StageTime(stage=stage_to_proto(stage), median_seconds=median, samples=count)
                     for stage, (median, count) in usage.stage_times.items()],
        median_change_seconds=usage.median_change_seconds)


def add_to_server(servicer: JobStatusServicer, server: grpc.aio.Server) -> None:
    jobs_pb2_grpc.add_JobStatusServiceServicer_to_server(servicer, server)
