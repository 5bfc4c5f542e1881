"""Gateway test rig: fake JobStatusService, RegeneratorService and ComposerService servicers, and helpers.

The fakes keep their state in dicts and raise the same domain errors the real services raise, so
errors cross a real gRPC hop (status code + trailing metadata) before the gateway maps them.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from google.protobuf.timestamp_pb2 import Timestamp

from clipchat.domain import check_clip_indices
from clipchat.errors import (
    BudgetExceeded,
    ClipChatError,
    ConcurrentRegeneration,
    Conflict,
    InvalidInput,
    NotFound,
)
from clipchat.rpc import GrpcServer, rpc_method
from clipchat.settings import Settings
from clipchat.storage import job_prefix
from clipchat.v1 import (
    common_pb2,
    composer_pb2,
    composer_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    regenerator_pb2,
    regenerator_pb2_grpc,
)
from services.status.paging import PageKey, decode_page_token, encode_page_token, page_size

SettingsFactory = Callable[..., Settings]

ALICE = "alice-token"
BOB = "bob-token"
TERMINAL = (common_pb2.REGENERATION_STATE_COMPLETED, common_pb2.REGENERATION_STATE_FAILED,
            common_pb2.REGENERATION_STATE_CANCELLED)


def now_ts(offset: float = 0) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(datetime.fromtimestamp(datetime.now(UTC).timestamp() + offset, UTC))
    return ts


def make_job(owner: str = "alice", *, clips: int = 3, total_cost: str = "8.5000",
             budget_limit: str = "10.0000") -> common_pb2.Job:
    """A completed job with two versions (the second made by a regeneration)."""
    job_id = str(uuid.uuid4())
    prefix = job_prefix(job_id)
    return common_pb2.Job(
        job_id=job_id, owner=owner, title="Night drive", state=common_pb2.JOB_STATE_COMPLETED,
        audio_key=f"{prefix}/inputs/track.mp3", aspect_ratio="16:9", fit="pad", current_version=2,
        total_cost=total_cost, budget_limit=budget_limit,
        clips=[common_pb2.Clip(clip_index=i, prompt=f"prompt {i}", duration=2.0,
                               video_key=f"{prefix}/clips/{i}.mp4", thumbnail_key=f"{prefix}/thumbs/{i}.jpg",
                               revision=1, status="ready", cost="0.1000") for i in range(clips)],
        versions=[common_pb2.VideoVersion(version=1, storage_key=f"{prefix}/videos/v1.mp4", duration=6.0,
                                          created_at=now_ts(-60), encoder="libx264"),
                  common_pb2.VideoVersion(version=2, storage_key=f"{prefix}/videos/v2.mp4", duration=6.0,
                                          created_at=now_ts(), created_by_regeneration_id="r-1",
                                          encoder="libx264")],
        created_at=now_ts(-120))


class FakeStatus(jobs_pb2_grpc.JobStatusServiceServicer):
    """Just enough of JobStatusService for the gateway."""

    def __init__(self) -> None:
        self.jobs: dict[str, common_pb2.Job] = {}
        self.events: dict[str, list[common_pb2.JobEvent]] = {}
        self.regenerations: dict[str, list[common_pb2.Regeneration]] = {}
        self.created: list[jobs_pb2.CreateJobRequest] = []
        self.watch_requests: list[jobs_pb2.WatchJobRequest] = []
        self.watch_closed = asyncio.Event()
        self.fail: dict[str, ClipChatError] = {}

    def add_job(self, job: common_pb2.Job) -> common_pb2.Job:
        self.jobs[job.job_id] = job
        self.events.setdefault(job.job_id, [])
        self.regenerations.setdefault(job.job_id, [])
        return job

    def add_event(self, job_id: str, type_: str, *,
                  stage: common_pb2.Stage.ValueType = common_pb2.STAGE_UNSPECIFIED,
                  fraction: float = 0.0, **payload: Any) -> common_pb2.JobEvent:
        """``payload``: the event's payload message by its field name, e.g. ``progress=Progress(...)``."""
        log = self.events[job_id]
        event = common_pb2.JobEvent(job_id=job_id, sequence=len(log) + 1, type=type_, stage=stage,
                                    fraction=fraction, created_at=now_ts(), **payload)
        log.append(event)
        return event

    def job(self, job_id: str, owner: str) -> common_pb2.Job:
        job = self.jobs.get(job_id)
        if job is None or (owner and job.owner != owner):
            raise NotFound("This video does not exist or is not yours.")
        return job

    def _maybe_fail(self, method: str) -> None:
        if method in self.fail:
            raise self.fail[method]

    @rpc_method
    async def CreateJob(self, request: jobs_pb2.CreateJobRequest, context: Any) -> jobs_pb2.CreateJobResponse:
        self.created.append(request)
        self._maybe_fail("CreateJob")
        job = common_pb2.Job(
            job_id=request.job_id, owner=request.owner, title=request.title,
            state=common_pb2.JOB_STATE_COMPOSING, audio_key=request.audio_key,
            aspect_ratio=request.aspect_ratio, fit=request.fit, total_cost="0",
            budget_limit=request.budget_limit or "50", created_at=now_ts(),
            clips=[common_pb2.Clip(clip_index=i, prompt=c.prompt, duration=c.duration, video_key=c.video_key,
                                   revision=1) for i, c in enumerate(request.clips)])
        self.add_job(job)
        return jobs_pb2.CreateJobResponse(job=job, lease_token="secret-lease")

    @rpc_method
    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: Any) -> jobs_pb2.GetJobResponse:
        self._maybe_fail("GetJob")
        return jobs_pb2.GetJobResponse(job=self.job(request.job_id, request.owner))

    @rpc_method
    async def ListJobs(self, request: jobs_pb2.ListJobsRequest, context: Any) -> jobs_pb2.ListJobsResponse:
        self._maybe_fail("ListJobs")
        # The real service's paging contract, over the dict: newest first, keyed on (created_at, id).
        def key(job: common_pb2.Job) -> PageKey:
            return PageKey(job.created_at.ToDatetime(tzinfo=UTC), uuid.UUID(job.job_id))

        def order(k: PageKey) -> tuple[datetime, uuid.UUID]:
            return k.created_at, k.job_id

        mine = sorted((j for j in self.jobs.values() if j.owner == request.owner),
                      key=lambda j: order(key(j)), reverse=True)
        if request.page_token:
            after = order(decode_page_token(request.page_token))
            mine = [j for j in mine if order(key(j)) < after]
        limit = page_size(request.page_size)
        page = mine[:limit]
        more = encode_page_token(key(page[-1])) if len(mine) > limit else ""
        return jobs_pb2.ListJobsResponse(jobs=page, next_page_token=more)

    @rpc_method
    async def CancelRegeneration(self, request: jobs_pb2.CancelRegenerationRequest,
                                 context: Any) -> jobs_pb2.CancelRegenerationResponse:
        job = self.job(request.job_id, request.owner)
        for regen in self.regenerations[job.job_id]:
            if regen.regeneration_id == request.regeneration_id:
                if regen.state in TERMINAL:
                    raise Conflict("This regeneration has already finished.")
                regen.state = common_pb2.REGENERATION_STATE_CANCELLED
                job.active_regeneration_id = ""
                return jobs_pb2.CancelRegenerationResponse(regeneration=regen)
        raise NotFound("This regeneration does not exist.")

    @rpc_method
    async def RestoreVersion(self, request: jobs_pb2.RestoreVersionRequest,
                             context: Any) -> jobs_pb2.RestoreVersionResponse:
        job = self.job(request.job_id, request.owner)
        if request.version not in [v.version for v in job.versions]:
            raise NotFound("This video has no such version.")
        job.current_version = request.version
        return jobs_pb2.RestoreVersionResponse(job=job)

    @rpc_method
    async def CompareVersions(self, request: jobs_pb2.CompareVersionsRequest,
                              context: Any) -> jobs_pb2.CompareVersionsResponse:
        """Clip 0 differs between any two versions; the change that made the newer one is listed."""
        self._maybe_fail("CompareVersions")
        job = self.job(request.job_id, request.owner)
        if request.from_version == request.to_version:
            raise InvalidInput("Compare two different versions.")
        versions = {v.version: v for v in job.versions}
        for number in (request.from_version, request.to_version):
            if number not in versions:
                raise NotFound(f"This video has no version {number}.")
        newer = versions[max(request.from_version, request.to_version)]
        clip = job.clips[0]
        return jobs_pb2.CompareVersionsResponse(
            from_version=request.from_version, to_version=request.to_version,
            clips=[jobs_pb2.ClipDifference(clip_index=0, revision_before=0, revision_after=clip.revision,
                                           prompt_before="the first prompt", prompt_after=clip.prompt,
                                           video_key_before=clip.video_key, video_key_after=clip.video_key,
                                           thumbnail_key_after=clip.thumbnail_key)],
            changes=[jobs_pb2.VersionChange(
                regeneration_id=newer.created_by_regeneration_id or "r-0", clip_index=0,
                user_instruction="make it nighttime", state=common_pb2.REGENERATION_STATE_COMPLETED,
                cost="0.5000", step_costs=common_pb2.StepCosts(llm="0.0100", generation="0.4000",
                                                               composition="0.0900"),
                version=newer.version, created_at=now_ts(-30), finished_at=now_ts())],
            cost="0.5000")

    @rpc_method
    async def GetUsage(self, request: jobs_pb2.GetUsageRequest, context: Any) -> jobs_pb2.GetUsageResponse:
        """The jobs' total cost, split between generation and composition."""
        self._maybe_fail("GetUsage")
        if request.job_id:
            jobs = [self.job(request.job_id, request.owner)]
        else:
            jobs = [j for j in self.jobs.values() if j.owner == request.owner]
        total = sum((Decimal(j.total_cost or "0") for j in jobs), Decimal("0"))
        generate = (total / 2).quantize(Decimal("0.0001"))
        finished = [r for j in jobs for r in self.regenerations.get(j.job_id, [])]
        return jobs_pb2.GetUsageResponse(usage=jobs_pb2.Usage(
            jobs=len(jobs), total_cost=str(total), rewrite_cost="0", generate_cost=str(generate),
            compose_cost=str(total - generate), running_cost="0",
            completed=sum(r.state == common_pb2.REGENERATION_STATE_COMPLETED for r in finished),
            failed=sum(r.state == common_pb2.REGENERATION_STATE_FAILED for r in finished),
            cancelled=sum(r.state == common_pb2.REGENERATION_STATE_CANCELLED for r in finished),
            running=sum(r.state not in TERMINAL for r in finished),
            stage_times=[jobs_pb2.StageTime(stage=common_pb2.STAGE_GENERATING, median_seconds=4.5, samples=2)],
            median_change_seconds=9.0))

    @rpc_method
    async def WatchJob(self, request: jobs_pb2.WatchJobRequest,
                       context: Any) -> AsyncIterator[common_pb2.JobEvent]:
        self.watch_requests.append(request)
        self.job(request.job_id, request.owner)
        last = request.after_sequence
        try:
            while True:
                for event in list(self.events[request.job_id]):
                    if event.sequence > last:
                        yield event
                        last = event.sequence
                if request.replay_only:
                    return
                await asyncio.sleep(0.05)
        finally:
            self.watch_closed.set()


class FakeRegenerator(regenerator_pb2_grpc.RegeneratorServiceServicer):
    """StartRegeneration, EstimateRegeneration and ListRegenerations over the fake status's state."""

    estimated_cost = Decimal("0.50")

    def __init__(self, status: FakeStatus) -> None:
        self.status = status
        self.fail: dict[str, ClipChatError] = {}

    @rpc_method
    async def StartRegeneration(self, request: regenerator_pb2.StartRegenerationRequest,
                                context: Any) -> regenerator_pb2.StartRegenerationResponse:
        if "StartRegeneration" in self.fail:
            raise self.fail["StartRegeneration"]
        job = self.status.job(request.job_id, request.owner)
        if request.clip_index >= len(job.clips):
            raise InvalidInput(f"This video has {len(job.clips)} clips: pick one from 0 to "
                               f"{len(job.clips) - 1}.")
        if job.active_regeneration_id:
            raise ConcurrentRegeneration()
        total = Decimal(job.total_cost) + self.estimated_cost
        if total > Decimal(job.budget_limit):
            raise BudgetExceeded()
        regen = common_pb2.Regeneration(
            regeneration_id=str(uuid.uuid4()), job_id=job.job_id, clip_index=request.clip_index,
            original_prompt=job.clips[request.clip_index].prompt, user_instruction=request.instruction,
            conversation_history=request.conversation_history,
            state=common_pb2.REGENERATION_STATE_QUEUED, stage=common_pb2.STAGE_QUEUED,
            estimated_cost=str(self.estimated_cost), cost="0", created_at=now_ts())
        self.status.regenerations[job.job_id].append(regen)
        job.active_regeneration_id = regen.regeneration_id
        return regenerator_pb2.StartRegenerationResponse(
            regeneration_id=regen.regeneration_id, state=common_pb2.REGENERATION_STATE_QUEUED,
            estimated_cost=str(self.estimated_cost),
            budget_warning=total >= Decimal(job.budget_limit) * Decimal("0.8"))

    @rpc_method
    async def EstimateRegeneration(self, request: regenerator_pb2.EstimateRegenerationRequest,
                                   context: Any) -> regenerator_pb2.EstimateRegenerationResponse:
        """Each clip ``estimated_cost`` less the composition (0.05), which is quoted once, on the first."""
        job = self.status.job(request.job_id, request.owner)
        indices = list(range(len(job.clips))) if request.all_clips else \
            list(request.clip_indices) or [request.clip_index]
        check_clip_indices(indices, len(job.clips))
        compose = Decimal("0.05")
        generate = self.estimated_cost - compose
        clips = [regenerator_pb2.ClipEstimate(clip_index=index, step_costs={
            "rewrite": "0", "generate": str(generate), **({"compose": str(compose)} if n == 0 else {})})
            for n, index in enumerate(sorted(indices))]
        estimate = generate * len(indices) + compose
        spent, limit = Decimal(job.total_cost), Decimal(job.budget_limit)
        return regenerator_pb2.EstimateRegenerationResponse(
            estimated_cost=str(estimate), clips=clips, budget_left=str(max(limit - spent, Decimal(0))),
            within_budget=spent + estimate <= limit, budget_warning=spent + estimate >= limit * Decimal("0.8"))

    @rpc_method
    async def ListRegenerations(self, request: regenerator_pb2.ListJobRegenerationsRequest,
                                context: Any) -> regenerator_pb2.ListJobRegenerationsResponse:
        job = self.status.job(request.job_id, request.owner)
        rows = self.status.regenerations[job.job_id]
        return regenerator_pb2.ListJobRegenerationsResponse(regenerations=rows)


class FakeComposer(composer_pb2_grpc.ComposerServiceServicer):
    """Answers only ``Describe``, as a composer without NVENC does."""

    @rpc_method
    async def Describe(self, request: composer_pb2.DescribeRequest, context: Any) -> composer_pb2.ComposerInfo:
        return composer_pb2.ComposerInfo(
            encoder="libx264", encoder_reason="h264_nvenc test encode failed: Cannot load libcuda.so.1",
            encoder_fallback=True, x264_preset="veryfast", workers=2,
            cache=composer_pb2.CacheStats(hits=16, misses=3, stores=3))


@dataclass
class Backend:
    status: FakeStatus
    regenerator: FakeRegenerator
    status_addr: str
    regenerator_addr: str
    composer_addr: str
    servers: list[GrpcServer] = field(default_factory=list)  # status, regenerator, composer


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan, behind an in-memory httpx client authenticated as alice."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway",
                                     headers={"Authorization": f"Bearer {ALICE}"}) as client:
            yield client


@asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[str]:
    """The app behind a real uvicorn server on 127.0.0.1; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=1))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error object of a response, checking it has exactly the documented shape."""
    body = response.json()
    assert set(body) >= {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "retryable"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    return dict(error)
