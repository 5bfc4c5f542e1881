"""Version compare and usage over the status service's database (SQLite and PostgreSQL), and over gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import grpc
import pytest

from clipchat.db import Database
from clipchat.errors import InvalidInput, NotFound
from clipchat.rpc import create_server
from clipchat.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc
from services.status import server as status_server
from services.status.events import EventHub
from services.status.reports import JobReports
from services.status.state_machine import ClipInput, JobStateMachine
from tests.integration.status.conftest import Clock


@pytest.fixture
def machine(db: Database, clock: Clock) -> JobStateMachine:
    return JobStateMachine(db, lease_seconds=300, budget_limit=Decimal("50"),
                           budget_warning_fraction=Decimal("0.8"), clock=clock)


@pytest.fixture
def reports(db: Database) -> JobReports:
    return JobReports(db)


async def composed_job(machine: JobStateMachine, clock: Clock, owner: str = "alice") -> str:
    """A job of three clips; its initial composition (cost 0.0060) sits 5 s in the queued stage."""
    snapshot, token = await machine.create_job(
        owner=owner, clips=[ClipInput(f"prompt {i}", 2.0, f"jobs/x/in/{i}.mp4") for i in range(3)],
        audio_key="jobs/x/in/audio.wav")
    clock.advance(5)
    await machine.succeed(str(snapshot.job.id), token, video_key="jobs/x/v1.mp4", video_duration=6.0,
                          composition_cost="0.0060")
    return str(snapshot.job.id)


async def history(machine: JobStateMachine, clock: Clock) -> tuple[str, list[str]]:
    """Version 1; change A (clip 1) → version 2; B (clip 2) fails; C (clip 2) is cancelled; D (clip 0)
    → version 3. Returns the job and the ids of A, B, C, D."""
    job_id = await composed_job(machine, clock)
    ids = []

    async def begin(clip: int, instruction: str) -> tuple[str, str]:
        clock.advance(1)
        began = await machine.begin(job_id=job_id, owner="alice", clip_index=clip, instruction=instruction,
                                    history=[], estimated_cost="0.5")
        ids.append(str(began.regeneration.id))
        return began.lease_token, str(began.regeneration.id)

    token, a = await begin(1, "make it nighttime")
    clock.advance(1)
    await machine.record_progress(job_id, token, stage="rewriting", fraction=0.1)
    await machine.record_step(job_id, token, step="rewrite", cost="0.0123", modified_prompt="prompt 1 at night")
    clock.advance(2)
    await machine.record_progress(job_id, token, stage="generating", fraction=0.2)
    await machine.record_step(job_id, token, step="generate", cost="0.2500")
    clock.advance(3)
    await machine.record_progress(job_id, token, stage="encoding", fraction=0.7)
    clock.advance(4)
    await machine.succeed(job_id, token, regeneration_id=a, new_clip=ClipInput("prompt 1 at night", 2.0, "c1r1.mp4"),
                          video_key="jobs/x/v2.mp4", video_duration=6.0, composition_cost="0.0060")

    token, _ = await begin(2, "add rain")
    clock.advance(1)
    await machine.record_progress(job_id, token, stage="generating", fraction=0.2)
    await machine.record_step(job_id, token, step="generate", cost="0.3000")
    clock.advance(4)
    await machine.fail(job_id, token, error_code="provider_failed", error_message="The provider failed.")

    token, c = await begin(2, "add snow")
    clock.advance(1)
    await machine.record_progress(job_id, token, stage="rewriting", fraction=0.1)
    await machine.record_step(job_id, token, step="rewrite", cost="0.0100")
    clock.advance(1)
    await machine.cancel(job_id, "alice", c)

    token, d = await begin(0, "make it red")
    clock.advance(2)
    await machine.succeed(job_id, token, regeneration_id=d, new_clip=ClipInput("prompt 0 in red", 2.0, "c0r1.mp4"),
                          video_key="jobs/x/v3.mp4", video_duration=6.0, composition_cost="0.0050")
    return job_id, ids


async def test_compare_lists_exactly_the_changed_clips_and_the_changes_between(
        machine: JobStateMachine, reports: JobReports, clock: Clock) -> None:
    job_id, (a, b, c, d) = await history(machine, clock)

    one_two = await reports.compare_versions(job_id, "alice", 1, 2)
    [clip] = one_two.clips
    assert (clip.clip_index, clip.before.revision, clip.after.revision) == (1, 0, 1)
    assert (clip.before.prompt, clip.after.prompt) == ("prompt 1", "prompt 1 at night")
    assert [(str(row.id), version) for row, version in one_two.changes] == [(a, 2)]
    assert one_two.cost == Decimal("0.2683")

    two_three = await reports.compare_versions(job_id, "alice", 2, 3)
    assert [d_.clip_index for d_ in two_three.clips] == [0]
    assert [(str(row.id), row.status, version) for row, version in two_three.changes] == [
        (b, "failed", 0), (c, "cancelled", 0), (d, "completed", 3)]
    # The failed and cancelled attempts stay paid: they are part of what version 3 cost.
    assert two_three.cost == Decimal("0.3000") + Decimal("0.0100") + Decimal("0.0050")

    backwards = await reports.compare_versions(job_id, "alice", 3, 1)
    assert [(x.clip_index, x.before.revision, x.after.revision) for x in backwards.clips] == [(0, 1, 0), (1, 1, 0)]
    assert [str(row.id) for row, _ in backwards.changes] == [a, b, c, d]
    assert backwards.cost == one_two.cost + two_three.cost


async def test_compare_refuses_bad_versions_and_other_owners(machine: JobStateMachine, reports: JobReports,
                                                             clock: Clock) -> None:
    job_id = await composed_job(machine, clock)
    with pytest.raises(InvalidInput):
        await reports.compare_versions(job_id, "alice", 1, 1)
    with pytest.raises(InvalidInput):
        await reports.compare_versions(job_id, "alice", 0, 1)
    with pytest.raises(NotFound, match="version 2"):
        await reports.compare_versions(job_id, "alice", 1, 2)
    with pytest.raises(NotFound):
        await reports.compare_versions(job_id, "mallory", 1, 2)


async def test_usage_spend_by_step_adds_up_to_the_total_cost(machine: JobStateMachine, reports: JobReports,
                                                             clock: Clock) -> None:
    job_id, _ = await history(machine, clock)
    usage = await reports.usage("alice", job_id)
    job = (await machine.get_job(job_id)).job
    assert usage.total_cost == job.total_cost == Decimal("0.5893")
    assert usage.step_costs == {"rewrite": Decimal("0.0223"), "generate": Decimal("0.5500"),
                                "compose": Decimal("0.0170")}
    assert sum(usage.step_costs.values()) == usage.total_cost
    assert usage.outcomes == {"completed": 2, "failed": 1, "cancelled": 1, "running": 0}
    # Stretches of work: the initial composition (queued 5 s), A (queued 1, rewriting 2, generating 3,
    # encoding 4), B (queued 1, generating 4), C (queued 1, rewriting 1), D (queued 2).
    assert usage.stage_times == {"queued": (1.0, 5), "rewriting": (1.5, 2), "generating": (3.5, 2),
                                 "encoding": (4.0, 1)}
    assert usage.median_change_seconds == 6.0  # A took 10 s, D 2 s


async def test_usage_of_all_the_owners_jobs_counts_running_changes_apart(
        machine: JobStateMachine, reports: JobReports, clock: Clock) -> None:
    first, _ = await history(machine, clock)
    second = await composed_job(machine, clock)
    await composed_job(machine, clock, owner="bob")
    began = await machine.begin(job_id=second, owner="alice", clip_index=0, instruction="rain", history=[],
                                estimated_cost="0.5")
    await machine.record_step(second, began.lease_token, step="generate", cost="0.2000")
    usage = await reports.usage("alice")
    assert usage.jobs == 2
    assert usage.total_cost == Decimal("0.5893") + Decimal("0.0060")
    assert sum(usage.step_costs.values()) == usage.total_cost
    assert (usage.running_cost, usage.outcomes["running"]) == (Decimal("0.2000"), 1)
    assert (await reports.usage("nobody")).jobs == 0
    with pytest.raises(NotFound):
        await reports.usage("bob", first)


@pytest.fixture
async def stub(machine: JobStateMachine) -> AsyncIterator[jobs_pb2_grpc.JobStatusServiceStub]:
    servicer = status_server.JobStatusServicer(machine, EventHub())
    server = await create_server([(status_server.add_to_server, servicer, status_server.SERVICE_NAME)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield jobs_pb2_grpc.JobStatusServiceStub(channel)
    await server.stop(0)


async def test_compare_and_usage_over_grpc(machine: JobStateMachine, clock: Clock,
                                           stub: jobs_pb2_grpc.JobStatusServiceStub) -> None:
    job_id, (a, *_) = await history(machine, clock)
    reply = await stub.CompareVersions(jobs_pb2.CompareVersionsRequest(
        job_id=job_id, owner="alice", from_version=1, to_version=2), timeout=10)
    [clip] = reply.clips
    assert (clip.clip_index, clip.prompt_before, clip.prompt_after) == (1, "prompt 1", "prompt 1 at night")
    assert (clip.video_key_before, clip.video_key_after) == ("jobs/x/in/1.mp4", "c1r1.mp4")
    [change] = reply.changes
    assert (change.regeneration_id, change.version, change.cost) == (a, 2, "0.2683")
    assert change.state == common_pb2.REGENERATION_STATE_COMPLETED
    assert change.step_costs.generation == "0.2500" and reply.cost == "0.2683"
    usage = (await stub.GetUsage(jobs_pb2.GetUsageRequest(owner="alice", job_id=job_id), timeout=10)).usage
    assert (usage.total_cost, usage.rewrite_cost, usage.generate_cost, usage.compose_cost) == (
        "0.5893", "0.0223", "0.5500", "0.0170")
    assert (usage.completed, usage.failed, usage.cancelled, usage.running) == (2, 1, 1, 0)
    times = {common_pb2.Stage.Name(t.stage): (t.median_seconds, t.samples) for t in usage.stage_times}
    assert times["STAGE_GENERATING"] == (3.5, 2)
    for request, code in [
        (jobs_pb2.CompareVersionsRequest(job_id=job_id, owner="alice", from_version=2, to_version=2),
         grpc.StatusCode.INVALID_ARGUMENT),
        (jobs_pb2.CompareVersionsRequest(job_id=job_id, owner="bob", from_version=1, to_version=2),
         grpc.StatusCode.NOT_FOUND),
        (jobs_pb2.CompareVersionsRequest(job_id=job_id, owner="alice", from_version=1, to_version=9),
         grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CompareVersions(request, timeout=10)
        assert refused.value.code() == code
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await stub.GetUsage(jobs_pb2.GetUsageRequest(), timeout=10)
    assert anonymous.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_clips_own_progress_in_a_change_is_not_a_stage_of_the_work(
        machine: JobStateMachine, reports: JobReports, clock: Clock) -> None:
    from services.status.changes import ClipQuote

    job_id = await composed_job(machine, clock)
    began = await machine.begin_change(job_id=job_id, owner="alice", instruction="rain", history=[],
                                       quotes=[ClipQuote(i, {"rewrite": "0.01", "generate": "0.2"}) for i in (0, 1)])
    token, (first, second) = began.lease_token, began.members
    clock.advance(1)
    await machine.record_progress(job_id, token, stage="rewriting", fraction=0.02, regeneration_id=str(first.id))
    await machine.record_progress(job_id, token, stage="rewriting", fraction=0.02)
    clock.advance(1)
    await machine.record_progress(job_id, token, stage="generating", fraction=0.1, regeneration_id=str(first.id))
    clock.advance(1)
    await machine.record_progress(job_id, token, stage="rewriting", fraction=0.02, regeneration_id=str(second.id))
    clock.advance(1)
    await machine.record_progress(job_id, token, stage="generating", fraction=0.1)
    clock.advance(3)
    await machine.cancel(job_id, "alice", str(first.id))
    usage = await reports.usage("alice", job_id)
    # The change's own stages: queued 1 s, rewriting 3 s, generating 3 s (the clips' reports in between
    # do not cut them).
    assert usage.stage_times == {"queued": (3.0, 2), "rewriting": (3.0, 1), "generating": (3.0, 1)}
