"""JobStatusService over real gRPC: status codes, WatchJob resume, the lease sweeper, health."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipchat.broker.memory import InMemoryBroker
from clipchat.db import Database
from clipchat.db.migrate import upgrade
from clipchat.settings import Settings
from clipchat.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc
from services.status.service import StatusService


@pytest.fixture
async def service(database_url: str, tmp_path: Path) -> AsyncIterator[StatusService]:
    await upgrade(database_url)
    settings = Settings(data_dir=tmp_path, database_url=database_url, lease_seconds=1.0,
                        sweep_interval_seconds=0.1)
    broker = InMemoryBroker()
    await broker.connect()
    db = Database(database_url)
    status = StatusService(settings, db, broker)
    await status.start(port=0)
    yield status
    await status.stop()
    await broker.close()
    await db.dispose()


async def composed(stub: jobs_pb2_grpc.JobStatusServiceStub) -> str:
    created = await stub.CreateJob(jobs_pb2.CreateJobRequest(
        owner="alice", audio_key="jobs/a/music.m4a",
        clips=[jobs_pb2.ClipInput(prompt=f"p{i}", duration=2, video_key=f"jobs/a/{i}.mp4") for i in range(3)]),
        timeout=10)
    await stub.SucceedRegeneration(jobs_pb2.SucceedRegenerationRequest(
        job_id=created.job.job_id, lease_token=created.lease_token, video_key="jobs/a/v1.mp4",
        video_duration=6), timeout=10)
    return created.job.job_id


async def test_status_codes(stub: jobs_pb2_grpc.JobStatusServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetJob(jobs_pb2.GetJobRequest(job_id="00000000-0000-0000-0000-000000000000"), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    job_id = await composed(stub)
    begin = jobs_pb2.BeginRegenerationRequest(job_id=job_id, owner="alice", clip_index=1,
                                              user_instruction="make it nighttime", estimated_cost="0.1")
    first = await stub.BeginRegeneration(begin, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as second:
        await stub.BeginRegeneration(begin, timeout=10)
    assert second.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await stub.RenewLease(jobs_pb2.RenewLeaseRequest(job_id=job_id, lease_token="not-the-token"), timeout=10)
    assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await stub.RenewLease(jobs_pb2.RenewLeaseRequest(job_id=job_id, lease_token=first.lease_token), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as out_of_range:
        await stub.BeginRegeneration(jobs_pb2.BeginRegenerationRequest(
            job_id=job_id, owner="bob", clip_index=1, user_instruction="x"), timeout=10)
    assert out_of_range.value.code() == grpc.StatusCode.NOT_FOUND


async def test_worker_without_heartbeat_is_failed_and_fenced(stub: jobs_pb2_grpc.JobStatusServiceStub) -> None:
    job_id = await composed(stub)
    began = await stub.BeginRegeneration(jobs_pb2.BeginRegenerationRequest(
        job_id=job_id, owner="alice", clip_index=0, user_instruction="make it nighttime"), timeout=10)
    job = None
    for _ in range(200):  # the lease is 1 s; the sweeper runs every 0.1 s
        job = (await stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10)).job
        if job.state == common_pb2.JOB_STATE_FAILED:
            break
        await asyncio.sleep(0.05)
    assert job is not None and job.state == common_pb2.JOB_STATE_FAILED
    assert job.error_retryable and job.error_code == "lease_expired"
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await stub.SucceedRegeneration(jobs_pb2.SucceedRegenerationRequest(
            job_id=job_id, lease_token=began.lease_token, regeneration_id=began.regeneration.regeneration_id,
            new_clip=jobs_pb2.ClipInput(prompt="late", duration=2, video_key="jobs/a/late.mp4"),
            video_key="jobs/a/late-version.mp4", video_duration=6), timeout=10)
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    after = (await stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10)).job
    assert after.current_version == 1 and len(after.versions) == 1
    assert after.clips[0].prompt == "p0"


async def test_watch_resumes_without_gap_or_duplicate(stub: jobs_pb2_grpc.JobStatusServiceStub) -> None:
    job_id = await composed(stub)
    began = await stub.BeginRegeneration(jobs_pb2.BeginRegenerationRequest(
        job_id=job_id, owner="alice", clip_index=0, user_instruction="rain"), timeout=10)
    replay = [e async for e in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, owner="alice", replay_only=True),
                                             timeout=10)]
    sequences = [e.sequence for e in replay]
    assert sequences == list(range(1, len(sequences) + 1))
    n = sequences[-1]

    seen: list[int] = []
    call = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, owner="alice", after_sequence=n - 1), timeout=30)

    async def follow() -> None:
        async for event in call:
            seen.append(event.sequence)
            if event.type == "regeneration.cancelled":
                return

    follower = asyncio.create_task(follow())
    for i in range(5):
        await stub.RecordProgress(jobs_pb2.RecordProgressRequest(
            job_id=job_id, lease_token=began.lease_token, stage=common_pb2.STAGE_GENERATING,
            fraction=i / 5), timeout=10)
    await stub.CancelRegeneration(jobs_pb2.CancelRegenerationRequest(
        job_id=job_id, owner="alice", regeneration_id=began.regeneration.regeneration_id), timeout=10)
    await asyncio.wait_for(follower, 30)
    assert seen == list(range(n, n + 7))


async def test_history_checkpoints_and_event_payloads_are_typed(stub: jobs_pb2_grpc.JobStatusServiceStub) -> None:
    """What the log stores as JSON objects crosses the gRPC boundary as the protos' messages."""
    job_id = await composed(stub)
    history = [common_pb2.Turn(role="user", content="darker"), common_pb2.Turn(role="assistant", content="ok")]
    began = await stub.BeginRegeneration(jobs_pb2.BeginRegenerationRequest(
        job_id=job_id, owner="alice", clip_index=2, user_instruction="rain", conversation_history=history,
        estimated_cost="0.3"), timeout=10)
    assert list(began.regeneration.conversation_history) == history
    token, regeneration_id = began.lease_token, began.regeneration.regeneration_id
    await stub.RecordProgress(jobs_pb2.RecordProgressRequest(
        job_id=job_id, lease_token=token, stage=common_pb2.STAGE_REWRITING, fraction=0.05, message="Rewriting",
        eta_seconds=4.04), timeout=10)
    await stub.RecordStep(jobs_pb2.RecordStepRequest(
        job_id=job_id, lease_token=token, step=common_pb2.STEP_REWRITE, cost="0.0100", modified_prompt="p2, rain",
        rewriter="template", checkpoint=common_pb2.Checkpoint(prompt="p2, rain")), timeout=10)
    generated = common_pb2.Checkpoint(video_key="jobs/a/new.mp4", thumbnail_key="jobs/a/new.jpg", duration=2,
                                      probed_duration=2.04, prompt="p2, rain", provider="http", provider_id="pred-1")
    await stub.RecordStep(jobs_pb2.RecordStepRequest(
        job_id=job_id, lease_token=token, step=common_pb2.STEP_GENERATE, cost="0.2500", checkpoint=generated),
        timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as no_step:
        await stub.RecordStep(jobs_pb2.RecordStepRequest(job_id=job_id, lease_token=token, cost="1"), timeout=10)
    assert no_step.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    got = await stub.GetRegeneration(jobs_pb2.GetRegenerationRequest(
        job_id=job_id, regeneration_id=regeneration_id), timeout=10)
    assert {c.step: c.checkpoint for c in got.checkpoints} == {
        common_pb2.STEP_REWRITE: common_pb2.Checkpoint(prompt="p2, rain"), common_pb2.STEP_GENERATE: generated}
    assert list(got.regeneration.conversation_history) == history

    replay = [e async for e in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, owner="alice", replay_only=True),
                                             timeout=10)]
    by_type = {e.type: e for e in replay}
    assert by_type["job.created"].job_created.clips == 3
    assert by_type["job.composed"].version_published == common_pb2.VersionPublished(
        version=1, cost="0", total_cost="0.0000")
    assert by_type["regeneration.queued"].regeneration_queued == common_pb2.RegenerationQueued(
        regeneration_id=regeneration_id, clip_index=2, estimated_cost="0.3000")
    assert by_type["progress"].progress == common_pb2.Progress(message="Rewriting", eta_seconds=4.0,
                                                               regeneration_id=regeneration_id)
    rewrite, generate = [e.step_recorded for e in replay if e.type == "regeneration.step"]
    assert rewrite == common_pb2.StepRecorded(regeneration_id=regeneration_id, step=common_pb2.STEP_REWRITE,
                                              cost="0.0100", modified_prompt="p2, rain", rewriter="template")
    assert generate.step == common_pb2.STEP_GENERATE and generate.cost == "0.2500"
    assert not generate.HasField("change_summary")  # null in the log: never set
    assert all(e.WhichOneof("payload") for e in replay)


async def test_a_clips_own_progress_names_it_in_the_event(stub: jobs_pb2_grpc.JobStatusServiceStub) -> None:
    job_id = await composed(stub)
    steps = {"rewrite": "0.01", "generate": "0.2"}
    began = await stub.BeginRegeneration(jobs_pb2.BeginRegenerationRequest(
        job_id=job_id, owner="alice", user_instruction="rain",
        clips=[jobs_pb2.ClipQuote(clip_index=i, step_costs=steps) for i in (0, 2)]), timeout=10)
    lead, other = (m.regeneration_id for m in began.members)
    await stub.RecordProgress(jobs_pb2.RecordProgressRequest(
        job_id=job_id, lease_token=began.lease_token, stage=common_pb2.STAGE_GENERATING, fraction=0.3,
        regeneration_id=other), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as outside:
        await stub.RecordProgress(jobs_pb2.RecordProgressRequest(
            job_id=job_id, lease_token=began.lease_token, stage=common_pb2.STAGE_GENERATING, fraction=0.3,
            regeneration_id="00000000-0000-0000-0000-000000000000"), timeout=10)
    assert outside.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    replay = [e async for e in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, owner="alice", replay_only=True),
                                             timeout=10)]
    [progress] = [e for e in replay if e.type == "progress"]
    assert progress.progress == common_pb2.Progress(regeneration_id=lead, member_regeneration_id=other)
    assert progress.stage == common_pb2.STAGE_GENERATING and progress.fraction == pytest.approx(0.3)
    listed = await stub.ListRegenerations(jobs_pb2.ListRegenerationsRequest(job_id=job_id, owner="alice"),
                                          timeout=10)
    assert {r.regeneration_id: (r.stage, round(r.progress, 2)) for r in listed.regenerations} == {
        lead: (common_pb2.STAGE_QUEUED, 0.0), other: (common_pb2.STAGE_GENERATING, 0.3)}


async def test_health_and_reflection(service: StatusService) -> None:
    assert service.grpc is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="clipchat.v1.JobStatusService"),
                                   timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert "clipchat.v1.JobStatusService" in names


async def test_person_facing_calls_refuse_an_empty_owner(stub: jobs_pb2_grpc.JobStatusServiceStub) -> None:
    job_id = await composed(stub)
    # An empty owner would skip the ownership check: every call made on behalf of a person needs one.
    for rpc, request in [
        (stub.CreateJob, jobs_pb2.CreateJobRequest(audio_key="jobs/a/music.m4a", clips=[
            jobs_pb2.ClipInput(prompt="p", duration=2, video_key="jobs/a/0.mp4")])),
        (stub.ListJobs, jobs_pb2.ListJobsRequest()),
        (stub.BeginRegeneration, jobs_pb2.BeginRegenerationRequest(job_id=job_id, clip_index=1,
                                                                   user_instruction="brighter")),
        (stub.CancelRegeneration, jobs_pb2.CancelRegenerationRequest(job_id=job_id)),
        (stub.ListRegenerations, jobs_pb2.ListRegenerationsRequest(job_id=job_id)),
        (stub.RestoreVersion, jobs_pb2.RestoreVersionRequest(job_id=job_id, version=1)),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await rpc(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rpc
        assert "needs an owner" in (refused.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as refused_watch:
        async for _ in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, replay_only=True), timeout=10):
            pass
    assert refused_watch.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Workers read the job without an owner; the lease fences their writes.
    assert (await stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10)).job.job_id == job_id


async def test_a_service_token_guards_every_call_but_health(database_url: str, tmp_path: Path) -> None:
    await upgrade(database_url)
    token = "s" * 24
    settings = Settings(data_dir=tmp_path, database_url=database_url, service_token=token)
    broker = InMemoryBroker()
    await broker.connect()
    db = Database(database_url)
    status = StatusService(settings, db, broker)
    server = await status.start(port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = jobs_pb2_grpc.JobStatusServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListJobs(jobs_pb2.ListJobsRequest(owner="alice"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            listed = await stub.ListJobs(jobs_pb2.ListJobsRequest(owner="alice"), timeout=10,
                                         metadata=(("authorization", f"Bearer {token}"),))
            assert list(listed.jobs) == []
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await status.stop()
        await broker.close()
        await db.dispose()
