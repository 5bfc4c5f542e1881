"""RegeneratorService.EstimateRegeneration against the real status service (SQLite and PostgreSQL):
the quote a change would get, against the job's budget, with nothing leased, queued or spent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest

from clipchat.broker.memory import InMemoryBroker
from clipchat.db import Database
from clipchat.db.migrate import upgrade
from clipchat.errors import CODE_KEY
from clipchat.rpc import GrpcServer, create_server
from clipchat.settings import Settings
from clipchat.status_client import StatusClient
from clipchat.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, regenerator_pb2, regenerator_pb2_grpc
from services.regenerator import server as regenerator_server
from services.regenerator.generator import GeneratedClip
from services.status.service import StatusService

GENERATION_PRICE = Decimal("0.05")  # per second of clip
INSTRUCTION = "make it nighttime"


class PricedGenerator:
    """A generator that is only ever asked for its price here (a change that starts is not worked)."""

    name = "priced"

    def estimate_cost(self, duration: float) -> Decimal:
        return GENERATION_PRICE * Decimal(str(duration))

    async def generate(self, prompt: str, duration: float, dest: Path, **_: object) -> GeneratedClip:
        raise AssertionError("an estimate generates nothing")


@dataclass
class Services:
    status: jobs_pb2_grpc.JobStatusServiceStub
    regenerator: regenerator_pb2_grpc.RegeneratorServiceStub


@pytest.fixture
async def services(database_url: str, tmp_path: Path) -> AsyncIterator[Services]:
    """The status service and a regenerator over real gRPC; rewriting is priced (an LLM is set)."""
    await upgrade(database_url)
    settings = Settings(data_dir=tmp_path, database_url=database_url, llm_base_url="http://127.0.0.1:9/v1",
                        max_clips_per_change=3)
    broker = InMemoryBroker()
    await broker.connect()
    db = Database(database_url)
    status = StatusService(settings, db, broker)
    await status.start(port=0)
    assert status.grpc is not None
    addr = f"127.0.0.1:{status.grpc.port}"
    client = StatusClient(addr, deadline=10, settings=settings)
    servicer = regenerator_server.RegeneratorServicer(status=client, generator=PricedGenerator(), settings=settings)
    server: GrpcServer = await create_server(
        [(regenerator_server.add_to_server, servicer, regenerator_server.SERVICE_NAME)], settings=settings)
    try:
        async with grpc.aio.insecure_channel(addr) as status_channel, \
                grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as regenerator_channel:
            yield Services(jobs_pb2_grpc.JobStatusServiceStub(status_channel),
                           regenerator_pb2_grpc.RegeneratorServiceStub(regenerator_channel))
    finally:
        await server.stop(0)
        await client.close()
        await status.stop()
        await broker.close()
        await db.dispose()


async def composed(stub: jobs_pb2_grpc.JobStatusServiceStub, budget: str = "") -> str:
    """A composed job of clips of 2, 3 and 5 seconds (a 10-second video) that cost 0.0100 to compose."""
    created = await stub.CreateJob(jobs_pb2.CreateJobRequest(
        owner="alice", audio_key="jobs/a/music.m4a", budget_limit=budget,
        clips=[jobs_pb2.ClipInput(prompt=f"p{i}", duration=d, video_key=f"jobs/a/{i}.mp4")
               for i, d in enumerate([2.0, 3.0, 5.0])]), timeout=10)
    await stub.SucceedRegeneration(jobs_pb2.SucceedRegenerationRequest(
        job_id=created.job.job_id, lease_token=created.lease_token, video_key="jobs/a/v1.mp4",
        video_duration=10, composition_cost="0.0100"), timeout=10)
    return created.job.job_id


async def estimate(services: Services, job_id: str, **clips: Any) -> regenerator_pb2.EstimateRegenerationResponse:
    return await services.regenerator.EstimateRegeneration(  # type: ignore[no-any-return]
        regenerator_pb2.EstimateRegenerationRequest(job_id=job_id, owner="alice", **clips), timeout=10)


async def test_each_clip_is_quoted_by_step_with_one_composition_on_the_first(services: Services) -> None:
    job_id = await composed(services.status)
    one = await estimate(services, job_id, clip_index=1)
    assert [(c.clip_index, dict(c.step_costs)) for c in one.clips] == [
        (1, {"rewrite": "0.0100", "generate": "0.1500", "compose": "0.0100"})]
    assert one.estimated_cost == "0.1700"
    several = await estimate(services, job_id, clip_indices=[2, 0])
    assert [(c.clip_index, dict(c.step_costs)) for c in several.clips] == [
        (0, {"rewrite": "0.0100", "generate": "0.1000", "compose": "0.0100"}),
        (2, {"rewrite": "0.0100", "generate": "0.2500"})]
    assert several.estimated_cost == "0.3800"
    every = await estimate(services, job_id, all_clips=True)
    assert [c.clip_index for c in every.clips] == [0, 1, 2] and every.estimated_cost == "0.5400"
    # The default budget is 50: 0.0100 spent on the first composition.
    assert (every.budget_left, every.within_budget, every.budget_warning) == ("49.9900", True, False)


async def test_an_estimate_leases_queues_and_spends_nothing_and_matches_the_start(services: Services) -> None:
    job_id = await composed(services.status)
    quoted = await estimate(services, job_id, clip_indices=[0, 1])
    job = (await services.status.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10)).job
    assert job.state == common_pb2.JOB_STATE_COMPLETED and not job.active_regeneration_id
    assert job.total_cost == "0.0100"
    listed = await services.status.ListRegenerations(jobs_pb2.ListRegenerationsRequest(job_id=job_id, owner="alice"),
                                                     timeout=10)
    assert list(listed.regenerations) == []
    started = await services.regenerator.StartRegeneration(regenerator_pb2.StartRegenerationRequest(
        job_id=job_id, owner="alice", instruction=INSTRUCTION, clip_indices=[0, 1]), timeout=10)
    assert Decimal(started.estimated_cost) == Decimal(quoted.estimated_cost)


async def test_the_budget_left_and_the_warning(services: Services) -> None:
    job_id = await composed(services.status, budget="0.3000")  # 0.2900 left, warning from 0.2400
    fits = await estimate(services, job_id, clip_index=0)  # 0.1200
    assert (fits.budget_left, fits.within_budget, fits.budget_warning) == ("0.2900", True, False)
    near = await estimate(services, job_id, clip_index=1)  # 0.1700: 0.1800 of 0.3000 spent, under 0.2400
    assert (near.within_budget, near.budget_warning) == (True, False)
    warned = await estimate(services, job_id, clip_indices=[0, 1])  # 0.2800: fits, past the warning
    assert (warned.within_budget, warned.budget_warning) == (True, True)
    over = await estimate(services, job_id, all_clips=True)  # 0.5400
    assert (over.budget_left, over.within_budget, over.budget_warning) == ("0.2900", False, True)
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # what a start of it would answer
        await services.regenerator.StartRegeneration(regenerator_pb2.StartRegenerationRequest(
            job_id=job_id, owner="alice", instruction=INSTRUCTION, all_clips=True), timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_retry_is_quoted_in_full_and_started_for_the_steps_still_to_pay(services: Services) -> None:
    job_id = await composed(services.status)
    quoted = await estimate(services, job_id, clip_index=2)
    # The change as the regenerator begins it, paid for its rewrite and generation, then failed.
    began = await services.status.BeginRegeneration(jobs_pb2.BeginRegenerationRequest(
        job_id=job_id, owner="alice", clip_index=2, user_instruction=INSTRUCTION,
        estimated_step_costs=quoted.clips[0].step_costs), timeout=10)
    token = began.lease_token
    for step, cost, checkpoint in [
            (common_pb2.STEP_REWRITE, "0.0100", common_pb2.Checkpoint(prompt="night")),
            (common_pb2.STEP_GENERATE, "0.2500", common_pb2.Checkpoint(prompt="night", video_key="jobs/a/g2.mp4",
                                                                       duration=5.0))]:
        await services.status.RecordStep(jobs_pb2.RecordStepRequest(
            job_id=job_id, lease_token=token, step=step, cost=cost, checkpoint=checkpoint,
            modified_prompt="night"), timeout=10)
    await services.status.FailRegeneration(jobs_pb2.FailRegenerationRequest(
        job_id=job_id, lease_token=token, error_code="composition_failed", retryable=True), timeout=10)

    again = await estimate(services, job_id, clip_index=2)
    assert again.estimated_cost == quoted.estimated_cost == "0.2700"
    retry = await services.regenerator.StartRegeneration(regenerator_pb2.StartRegenerationRequest(
        job_id=job_id, owner="alice", clip_index=2, instruction=INSTRUCTION), timeout=10)
    assert retry.estimated_cost == "0.0100"  # the composition only


@pytest.mark.parametrize(("clips", "code"), [
    ({"clip_index": 3}, "clip_index_out_of_range"), ({"clip_indices": [0, 0]}, "duplicate_clip"),
    ({"clip_indices": [0, -1]}, "clip_index_out_of_range"), ({"clip_indices": [0, 1, 2, 3]}, "too_many_clips")])
async def test_clips_that_are_not_the_jobs_are_invalid_input(services: Services, clips: dict[str, Any],
                                                             code: str) -> None:
    job_id = await composed(services.status)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await estimate(services, job_id, **clips)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (CODE_KEY, code) in tuple(refused.value.trailing_metadata() or ())


async def test_an_owner_is_needed_and_another_owners_job_is_not_found(services: Services) -> None:
    job_id = await composed(services.status)
    with pytest.raises(grpc.aio.AioRpcError) as no_owner:
        await services.regenerator.EstimateRegeneration(
            regenerator_pb2.EstimateRegenerationRequest(job_id=job_id, clip_index=0), timeout=10)
    assert no_owner.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs an owner" in (no_owner.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await services.regenerator.EstimateRegeneration(
            regenerator_pb2.EstimateRegenerationRequest(job_id=job_id, owner="bob", clip_index=0), timeout=10)
    assert other.value.code() == grpc.StatusCode.NOT_FOUND
