"""A change of several clips in the state machine: one lease, one version, all or nothing, retry
of what failed, cancel of every clip, costs summed (on both databases)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from clipchat.db import Database
from clipchat.errors import BudgetExceeded, InvalidInput, StaleLease
from services.status.changes import STOPPED_CODE, ClipQuote
from services.status.state_machine import ClipInput, JobStateMachine
from tests.integration.status.conftest import Clock
from tests.integration.status.test_state_machine import composed_job

STEPS = {"rewrite": "0.0100", "generate": "0.2000"}


@pytest.fixture
def machine(db: Database, clock: Clock) -> JobStateMachine:
    return JobStateMachine(db, lease_seconds=30, budget_limit=Decimal("50"),
                           budget_warning_fraction=Decimal("0.8"), clock=clock)


def quotes(*indices: int) -> list[ClipQuote]:
    """Each clip's steps; the composition quoted once, on the first."""
    return [ClipQuote(index, {**STEPS, **({"compose": "0.0300"} if n == 0 else {})})
            for n, index in enumerate(indices)]


async def change(machine: JobStateMachine, job_id: str, *indices: int, instruction: str = "make it nighttime"):
    return await machine.begin_change(job_id=job_id, owner="alice", quotes=quotes(*indices),
                                      instruction=instruction, history=[])


async def generate(machine: JobStateMachine, job_id: str, token: str, row, cost: str = "0.2000") -> None:
    await machine.record_step(job_id, token, step="rewrite", cost="0.0100", modified_prompt=f"night {row.clip_index}",
                              checkpoint={"prompt": f"night {row.clip_index}"}, regeneration_id=str(row.id),
                              charge_key=f"{row.id}:rewrite")
    await machine.record_step(job_id, token, step="generate", cost=cost, regeneration_id=str(row.id),
                              checkpoint={"video_key": f"jobs/x/gen{row.clip_index}.mp4", "duration": 2.0},
                              charge_key=f"{row.id}:generate")


def new_clips(*indices: int) -> list[tuple[int, ClipInput]]:
    return [(i, ClipInput(f"night {i}", 2.0, f"jobs/x/gen{i}.mp4")) for i in indices]


async def test_three_clips_change_in_one_version_with_costs_to_the_cent(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine, clips=5)
    began = await change(machine, job_id, 3, 0, 2)
    assert [row.clip_index for row in began.members] == [0, 2, 3]
    assert began.regeneration.id == began.members[0].id
    assert {row.change_id for row in began.members} == {began.regeneration.id}
    assert began.estimated_cost == Decimal("0.66")  # 3 × (0.01 + 0.20) + 0.03
    token = began.lease_token
    assert (await machine.claim_work(job_id, token, "regenerate", "delivery-1")).outcome == "claimed"
    for row in began.members:
        await generate(machine, job_id, token, row)
    await machine.queue_composition(job_id, token, "delivery-1", new_clips(0, 2, 3))
    snap = await machine.succeed(job_id, token, regeneration_id=str(began.regeneration.id),
                                 new_clips=new_clips(0, 2, 3), video_key="jobs/x/v2.mp4", video_duration=10.0,
                                 composition_cost="0.0300")
    assert snap.job.current_version == 2 and [v.version for v in snap.versions] == [1, 2]
    assert [c.revision for c in snap.clips] == [1, 0, 1, 1, 0]
    assert [c.prompt for c in snap.clips] == ["night 0", "prompt 1", "night 2", "night 3", "prompt 4"]
    assert snap.job.total_cost == Decimal("0.0060") + Decimal("0.66")
    _, rows = await machine.get_change(job_id, str(began.members[1].id))
    assert [row.status for row in rows] == ["completed"] * 3
    assert [row.attempts for row in rows] == [1, 1, 1]  # every clip was in the one attempt
    assert [row.cost for row in rows] == [Decimal("0.24"), Decimal("0.21"), Decimal("0.21")]


async def test_the_whole_change_is_checked_against_the_budget_before_anything(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine, clips=4, budget="0.5000")  # two clips fit, three do not
    with pytest.raises(BudgetExceeded):
        await change(machine, job_id, 0, 1, 2)
    snap = await machine.get_job(job_id, "alice")
    assert snap.job.status == "completed" and await machine.list_regenerations(job_id, "alice") == []
    with pytest.raises(InvalidInput):
        await change(machine, job_id, 1, 1)
    with pytest.raises(InvalidInput):
        await change(machine, job_id, 0, 4)


async def test_one_clip_failing_fails_the_change_and_the_retry_pays_only_for_it(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine, clips=4)
    began = await change(machine, job_id, 0, 1, 2)
    token = began.lease_token
    first, failing, third = began.members
    await generate(machine, job_id, token, first)
    await generate(machine, job_id, token, third)
    await machine.record_step(job_id, token, step="rewrite", cost="0.0100", regeneration_id=str(failing.id),
                              checkpoint={"prompt": "night 1"}, modified_prompt="night 1")
    snap = await machine.fail(job_id, token, error_code="generation_failed", error_message="Regeneration failed.",
                              failed_regeneration_ids=[str(failing.id)])
    assert snap.job.status == "failed" and snap.job.current_version == 1
    assert snap.job.total_cost == Decimal("0.0060") + Decimal("0.43")  # paid steps stay paid
    _, rows = await machine.get_change(job_id, str(began.regeneration.id))
    assert [(row.status, row.error_code) for row in rows] == [
        ("failed", STOPPED_CODE), ("failed", "generation_failed"), ("failed", STOPPED_CODE)]

    retry = await change(machine, job_id, 0, 1, 2)
    assert [set(row.checkpoints) for row in retry.members] == [{"rewrite", "generate"}, {"rewrite"},
                                                                {"rewrite", "generate"}]
    # Only the failed clip's generation and the composition are still to pay.
    assert retry.estimated_cost == Decimal("0.23")
    assert retry.members[1].modified_prompt == "night 1"


async def test_cancel_stops_every_clip_and_keeps_the_original(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine, clips=3)
    began = await change(machine, job_id, 0, 1, 2)
    await generate(machine, job_id, began.lease_token, began.members[0])
    await machine.cancel(job_id, "alice", str(began.members[2].id))
    snap = await machine.get_job(job_id, "alice")
    assert snap.job.status == "completed" and snap.job.current_version == 1
    assert snap.job.total_cost == Decimal("0.0060") + Decimal("0.21")
    _, rows = await machine.get_change(job_id, str(began.regeneration.id))
    assert [row.status for row in rows] == ["cancelled"] * 3
    with pytest.raises(StaleLease):
        await generate(machine, job_id, began.lease_token, began.members[1])


async def test_a_step_for_a_clip_outside_the_change_is_refused(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine, clips=3)
    one = await machine.begin(job_id=job_id, owner="alice", clip_index=0, instruction="x", history=[],
                              estimated_cost="0.1")
    await machine.cancel(job_id, "alice", str(one.regeneration.id))
    began = await change(machine, job_id, 1, 2)
    with pytest.raises(StaleLease):
        await machine.record_step(job_id, began.lease_token, step="rewrite", cost="0.01",
                                  regeneration_id=str(one.regeneration.id))
    with pytest.raises(InvalidInput):
        await machine.queue_composition(job_id, began.lease_token, "", new_clips(1))


async def test_each_clip_reports_its_own_progress_on_its_own_row(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine, clips=4)
    began = await change(machine, job_id, 0, 1, 3)
    token, (first, second, third) = began.lease_token, began.members
    after = (await machine.get_job(job_id, "alice")).job.last_event_sequence
    await machine.record_progress(job_id, token, stage="rewriting", fraction=0.02, regeneration_id=str(second.id))
    await machine.record_progress(job_id, token, stage="generating", fraction=0.35, regeneration_id=str(third.id))
    # The change's own bar, in a clip's stage: it sets no row, so each keeps its own clip's.
    await machine.record_progress(job_id, token, stage="generating", fraction=0.12, message="1 of 3 clips ready")
    _, rows = await machine.get_change(job_id, str(first.id))
    assert [(row.stage, row.progress) for row in rows] == [("queued", 0.0), ("rewriting", 0.02),
                                                           ("generating", 0.35)]
    assert [row.status for row in rows] == ["running"] * 3  # the change is running

    events = await machine.events_after(job_id, after)
    assert [(e.stage, e.fraction, e.payload.get("member_regeneration_id")) for e in events] == [
        ("rewriting", 0.02, str(second.id)), ("generating", 0.35, str(third.id)), ("generating", 0.12, None)]
    assert {e.payload["regeneration_id"] for e in events} == {str(first.id)}  # the change's id, as before

    # Waiting for the composer and composing are the whole change's: every clip's row shows them.
    await machine.record_progress(job_id, token, stage="encoding", fraction=0.8)
    _, rows = await machine.get_change(job_id, str(first.id))
    assert [(row.stage, row.progress) for row in rows] == [("encoding", 0.8)] * 3


async def test_progress_of_a_clip_outside_the_change_or_under_a_stale_lease_is_refused(
        machine: JobStateMachine, clock: Clock) -> None:
    job_id = await composed_job(machine, clips=3)
    one = await machine.begin(job_id=job_id, owner="alice", clip_index=0, instruction="x", history=[],
                              estimated_cost="0.1")
    await machine.cancel(job_id, "alice", str(one.regeneration.id))
    began = await change(machine, job_id, 1, 2)
    after = (await machine.get_job(job_id, "alice")).job.last_event_sequence
    for outside in (str(one.regeneration.id), "not-a-uuid"):
        with pytest.raises(StaleLease):
            await machine.record_progress(job_id, began.lease_token, stage="generating", fraction=0.3,
                                          regeneration_id=outside)
    with pytest.raises(StaleLease):
        await machine.record_progress(job_id, "not-the-lease", stage="generating", fraction=0.3,
                                      regeneration_id=str(began.members[1].id))
    clock.advance(31)  # the lease expired
    with pytest.raises(StaleLease):
        await machine.record_progress(job_id, began.lease_token, stage="generating", fraction=0.3,
                                      regeneration_id=str(began.members[1].id))
    assert await machine.events_after(job_id, after) == []
    _, rows = await machine.get_change(job_id, str(began.regeneration.id))
    assert [(row.stage, row.progress) for row in rows] == [("queued", 0.0)] * 2
    cancelled = await machine.get_regeneration(job_id, str(one.regeneration.id))
    assert cancelled.stage == "queued" and cancelled.progress == 0.0


async def test_a_one_clip_change_keeps_its_progress_on_its_row(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine, clips=2)
    began = await machine.begin(job_id=job_id, owner="alice", clip_index=1, instruction="x", history=[],
                                estimated_cost="0.1")
    await machine.record_progress(job_id, began.lease_token, stage="generating", fraction=0.3)
    await machine.record_progress(job_id, began.lease_token, stage="generating", fraction=0.4,
                                  regeneration_id=str(began.regeneration.id))
    row = await machine.get_regeneration(job_id, str(began.regeneration.id))
    assert (row.stage, row.progress, row.status) == ("generating", 0.4, "running")
    events = await machine.events_after(job_id, 0)
    assert all("member_regeneration_id" not in e.payload for e in events if e.type == "progress")
