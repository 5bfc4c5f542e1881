"""The job state machine on both databases: leases, fencing, concurrency, costs, the event log."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from clipchat.db import Database
from clipchat.errors import (
    BudgetExceeded,
    ConcurrentRegeneration,
    Conflict,
    InvalidInput,
    NotFound,
    StaleLease,
)
from services.status.state_machine import ClipInput, JobStateMachine
from tests.integration.status.conftest import Clock


@pytest.fixture
def machine(db: Database, clock: Clock) -> JobStateMachine:
    return JobStateMachine(db, lease_seconds=30, budget_limit=Decimal("50"),
                           budget_warning_fraction=Decimal("0.8"), clock=clock)


async def composed_job(machine: JobStateMachine, clips: int = 3, budget: str = "") -> str:
    snapshot, token = await machine.create_job(
        owner="alice", clips=[ClipInput(f"prompt {i}", 2.0, f"jobs/x/in/{i}.mp4") for i in range(clips)],
        audio_key="jobs/x/in/audio.wav", budget_limit=budget)
    job_id = str(snapshot.job.id)
    await machine.succeed(job_id, token, video_key="jobs/x/v1.mp4", video_duration=6.0,
                          composition_cost="0.0060")
    return job_id


async def begin(machine: JobStateMachine, job_id: str, clip: int = 1, estimate: str = "0.10"):
    return await machine.begin(job_id=job_id, owner="alice", clip_index=clip,
                               instruction="make it nighttime", history=[], estimated_cost=estimate)


async def test_initial_composition_publishes_version_one(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine)
    snap = await machine.get_job(job_id, "alice")
    assert snap.job.status == "completed"
    assert snap.job.current_version == 1
    assert [c.prompt for c in snap.clips] == ["prompt 0", "prompt 1", "prompt 2"]
    assert snap.job.total_cost == Decimal("0.0060")
    with pytest.raises(NotFound):
        await machine.get_job(job_id, "mallory")


async def test_regeneration_succeeds_with_new_version_and_costs(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine)
    started = await begin(machine, job_id)
    token = started.lease_token
    await machine.record_progress(job_id, token, stage="rewriting", fraction=0.1)
    await machine.record_step(job_id, token, step="rewrite", cost="0.0123", modified_prompt="night prompt",
                              rewriter="llm")
    await machine.record_step(job_id, token, step="generate", cost="0.2500", checkpoint={"video_key": "k"})
    snap = await machine.succeed(job_id, token, regeneration_id=str(started.regeneration.id),
                                 new_clip=ClipInput("night prompt", 2.0, "jobs/x/c1r1.mp4"),
                                 video_key="jobs/x/v2.mp4", video_duration=6.0, composition_cost="0.0060")
    assert snap.job.status == "completed"
    assert snap.job.current_version == 2
    assert snap.clips[1].prompt == "night prompt" and snap.clips[1].revision == 1
    assert [v.storage_key for v in snap.versions] == ["jobs/x/v1.mp4", "jobs/x/v2.mp4"]
    regeneration = await machine.get_regeneration(job_id, str(started.regeneration.id))
    assert regeneration.status == "completed"
    assert regeneration.cost == Decimal("0.2683")
    assert snap.job.total_cost == Decimal("0.0060") + Decimal("0.2683")
    # The token is spent: a replayed succeed is refused.
    with pytest.raises(StaleLease):
        await machine.record_progress(job_id, token, stage="encoding", fraction=0.5)


async def test_concurrent_begins_admit_exactly_one(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine)
    results = await asyncio.gather(*(begin(machine, job_id) for _ in range(20)), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, ConcurrentRegeneration)]
    assert len(ok) == 1
    assert len(refused) == 19
    regenerations = await machine.list_regenerations(job_id, "alice")
    assert len(regenerations) == 1


async def test_expired_lease_fails_job_and_fences_late_writes(machine: JobStateMachine, clock: Clock) -> None:
    job_id = await composed_job(machine)
    started = await begin(machine, job_id)
    await machine.renew(job_id, started.lease_token)
    clock.advance(31)
    assert await machine.sweep_expired() == 1
    snap = await machine.get_job(job_id)
    assert snap.job.status == "failed"
    assert snap.job.error_code == "lease_expired" and snap.job.error_retryable
    assert snap.job.current_version == 1
    before = (await machine.events_after(job_id, 0))[-1].sequence
    for late in (
        machine.renew(job_id, started.lease_token),
        machine.record_progress(job_id, started.lease_token, stage="encoding", fraction=0.9),
        machine.succeed(job_id, started.lease_token, regeneration_id=str(started.regeneration.id),
                        new_clip=ClipInput("late", 2.0, "k"), video_key="jobs/x/late.mp4", video_duration=6.0),
        machine.fail(job_id, started.lease_token, error_code="x", error_message="x"),
    ):
        with pytest.raises(StaleLease):
            await late
    after = await machine.get_job(job_id)
    assert after.job.current_version == 1 and len(after.versions) == 1
    assert (await machine.events_after(job_id, 0))[-1].sequence == before
    # A retry from failed begins a fresh regeneration.
    retry = await begin(machine, job_id)
    assert retry.lease_token != started.lease_token


async def test_expired_but_unswept_lease_is_taken_over_by_begin(machine: JobStateMachine, clock: Clock) -> None:
    job_id = await composed_job(machine)
    first = await begin(machine, job_id)
    clock.advance(31)
    second = await begin(machine, job_id)
    old = await machine.get_regeneration(job_id, str(first.regeneration.id))
    assert old.status == "failed" and old.error_code == "lease_expired"
    assert second.regeneration.status == "queued"


async def test_cancel_keeps_original_and_refuses_finished(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine)
    started = await begin(machine, job_id)
    await machine.record_step(job_id, started.lease_token, step="generate", cost="0.2000")
    cancelled = await machine.cancel(job_id, "alice", str(started.regeneration.id))
    assert cancelled.status == "cancelled"
    snap = await machine.get_job(job_id)
    assert snap.job.status == "completed" and snap.job.current_version == 1
    assert snap.job.total_cost == Decimal("0.2060")  # the paid generation stays paid
    with pytest.raises(Conflict):
        await machine.cancel(job_id, "alice", str(started.regeneration.id))
    with pytest.raises(NotFound):
        await machine.cancel(job_id, "alice", "00000000-0000-0000-0000-000000000000")
    with pytest.raises(NotFound):
        await machine.cancel(job_id, "alice", "not-a-uuid")
    with pytest.raises(StaleLease):
        await machine.record_progress(job_id, started.lease_token, stage="encoding", fraction=0.5)


async def test_bad_input_and_budget(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine, budget="1.00")
    with pytest.raises(InvalidInput):
        await begin(machine, job_id, clip=3)
    with pytest.raises(InvalidInput):
        await begin(machine, job_id, clip=-1)
    with pytest.raises(BudgetExceeded):
        await begin(machine, job_id, estimate="0.9950")
    with pytest.raises(NotFound):
        await machine.get_job("00000000-0000-0000-0000-000000000000")
    warned = await begin(machine, job_id, estimate="0.8000")
    assert warned.budget_warning
    types = [e.type for e in await machine.events_after(job_id, 0)]
    assert "budget.warning" in types


async def test_event_log_is_gap_free_under_concurrent_writers(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine)
    started = await begin(machine, job_id)
    await asyncio.gather(*(machine.record_progress(job_id, started.lease_token, stage="encoding",
                                                   fraction=i / 30) for i in range(30)))
    sequences = [e.sequence for e in await machine.events_after(job_id, 0)]
    assert sequences == list(range(1, len(sequences) + 1))
    later = await machine.events_after(job_id, 5)
    assert [e.sequence for e in later] == sequences[5:]


async def test_restore_version(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine)
    started = await begin(machine, job_id)
    await machine.succeed(job_id, started.lease_token, regeneration_id=str(started.regeneration.id),
                          new_clip=ClipInput("night", 2.0, "k1"), video_key="jobs/x/v2.mp4", video_duration=6.0)
    snap = await machine.restore_version(job_id, "alice", 1)
    assert snap.job.current_version == 1
    assert snap.clips[1].prompt == "prompt 1"
    with pytest.raises(NotFound):
        await machine.restore_version(job_id, "alice", 7)


async def test_retry_of_failed_regeneration_reuses_paid_steps(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine)
    first = await begin(machine, job_id)
    await machine.record_step(job_id, first.lease_token, step="rewrite", cost="0.0100",
                              modified_prompt="night", checkpoint={"prompt": "night"})
    await machine.record_step(job_id, first.lease_token, step="generate", cost="0.2000",
                              checkpoint={"video_key": "jobs/x/gen.mp4", "duration": 2.0})
    await machine.fail(job_id, first.lease_token, error_code="composition_failed",
                       error_message="Recomposition failed. Original video preserved.")
    retry = await begin(machine, job_id)
    assert retry.regeneration.checkpoints == {"rewrite": {"prompt": "night"},
                                              "generate": {"video_key": "jobs/x/gen.mp4", "duration": 2.0}}
    assert retry.regeneration.cost == Decimal("0")
    assert retry.regeneration.modified_prompt == "night"
    await machine.fail(job_id, retry.lease_token, error_code="x", error_message="x")
    changed = await machine.begin(job_id=job_id, owner="alice", clip_index=1, instruction="make it snowy",
                                  history=[], estimated_cost="0.1")
    assert changed.regeneration.checkpoints == {}


STEP_ESTIMATES = {"rewrite": "0.0500", "generate": "0.2500", "compose": "0.0300"}


async def test_a_retry_is_quoted_and_budget_checked_for_the_steps_it_still_pays(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine, budget="0.2000")  # too little for a whole regeneration
    with pytest.raises(BudgetExceeded):
        await machine.begin(job_id=job_id, owner="alice", clip_index=1, instruction="make it nighttime",
                            history=[], estimated_cost="0.3300", estimated_step_costs=STEP_ESTIMATES)
    job_id = await composed_job(machine, budget="0.5000")
    first = await machine.begin(job_id=job_id, owner="alice", clip_index=1, instruction="make it nighttime",
                                history=[], estimated_cost="0.3300", estimated_step_costs=STEP_ESTIMATES)
    assert first.regeneration.estimated_cost == Decimal("0.33")
    await machine.record_step(job_id, first.lease_token, step="rewrite", cost="0.0500",
                              modified_prompt="night", checkpoint={"prompt": "night"})
    await machine.record_step(job_id, first.lease_token, step="generate", cost="0.2500",
                              checkpoint={"video_key": "jobs/x/gen.mp4", "duration": 2.0})
    await machine.fail(job_id, first.lease_token, error_code="composition_failed", error_message="x")

    # 0.30 spent of 0.50: a whole regeneration (0.33) would not fit; the retry (0.03) does.
    retry = await machine.begin(job_id=job_id, owner="alice", clip_index=1, instruction="make it nighttime",
                                history=[], estimated_cost="0.3300", estimated_step_costs=STEP_ESTIMATES)
    assert retry.regeneration.estimated_cost == Decimal("0.03")
    assert set(retry.regeneration.checkpoints) == {"rewrite", "generate"}


async def test_the_same_change_after_a_cancel_reuses_the_paid_clip(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine)
    first = await begin(machine, job_id)
    await machine.record_step(job_id, first.lease_token, step="generate", cost="0.2500",
                              checkpoint={"video_key": "jobs/x/gen.mp4", "duration": 2.0})
    await machine.cancel(job_id, "alice", str(first.regeneration.id))

    again = await machine.begin(job_id=job_id, owner="alice", clip_index=1, instruction="make it nighttime",
                                history=[], estimated_cost="0.3300", estimated_step_costs=STEP_ESTIMATES)
    assert again.regeneration.checkpoints == {"generate": {"video_key": "jobs/x/gen.mp4", "duration": 2.0}}
    assert again.regeneration.estimated_cost == Decimal("0.08")  # the rewrite and the composition
