"""The status service's metrics follow what it committed: outcomes, expiries and costs, once each."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from clipchat import metrics
from clipchat.db import Database
from clipchat.db.migrate import upgrade
from services.status.state_machine import PHASE_REGENERATE, ClipInput, JobStateMachine
from tests.integration.status.conftest import Clock
from tests.integration.status.test_state_machine import begin, composed_job
from tests.unit.core.test_metrics import value

CLAIM_SECONDS = 3
LEASE_SECONDS = 30


@pytest.fixture
async def machine(sqlite_url: str, clock: Clock) -> AsyncIterator[JobStateMachine]:
    await upgrade(sqlite_url)
    db = Database(sqlite_url)
    yield JobStateMachine(db, lease_seconds=LEASE_SECONDS, budget_limit=Decimal("50"), claim_seconds=CLAIM_SECONDS,
                          budget_warning_fraction=Decimal("0.8"), clock=clock)
    await db.dispose()


async def test_an_expired_lease_and_a_lapsed_claim_are_counted(machine: JobStateMachine, clock: Clock) -> None:
    leases, claims = value(metrics.LEASE_EXPIRIES, kind="lease"), value(metrics.LEASE_EXPIRIES, kind="claim")
    failed = value(metrics.REGENERATIONS, outcome="failed", error_code="lease_expired")
    job_id = await composed_job(machine)
    token = (await begin(machine, job_id)).lease_token
    await machine.claim_work(job_id, token, PHASE_REGENERATE, "delivery-a")
    clock.advance(CLAIM_SECONDS + 0.1)
    assert (await machine.claim_work(job_id, token, PHASE_REGENERATE, "delivery-b")).outcome == "claimed"
    assert value(metrics.LEASE_EXPIRIES, kind="claim") == claims + 1
    # The same delivery claiming again is no lapse.
    await machine.claim_work(job_id, token, PHASE_REGENERATE, "delivery-b")
    assert value(metrics.LEASE_EXPIRIES, kind="claim") == claims + 1

    clock.advance(LEASE_SECONDS + 1)
    assert await machine.sweep_expired() == 1
    assert await machine.sweep_expired() == 0
    assert value(metrics.LEASE_EXPIRIES, kind="lease") == leases + 1
    assert value(metrics.REGENERATIONS, outcome="failed", error_code="lease_expired") == failed + 1


async def test_outcomes_and_costs_are_counted_once(machine: JobStateMachine) -> None:
    completed = value(metrics.REGENERATIONS, outcome="completed", error_code="")
    cancelled = value(metrics.REGENERATIONS, outcome="cancelled", error_code="")
    spent = {step: value(metrics.COST, step=step) for step in ("rewrite", "generate", "compose")}
    job_id = await composed_job(machine)  # its composition cost: 0.0060
    began = await begin(machine, job_id)
    token = began.lease_token
    for _ in range(2):  # a cost reported again after a lost answer counts once
        await machine.record_step(job_id, token, step="rewrite", cost="0.0100", charge_key="regen:rewrite:1.1")
    await machine.record_step(job_id, token, step="generate", cost="0.2500", charge_key="regen:generate:1.1")
    await machine.succeed(job_id, token, regeneration_id=str(began.regeneration.id), video_key="jobs/x/v2.mp4",
                          video_duration=6.0, composition_cost="0.0060",
                          new_clip=ClipInput("night", 2.0, "jobs/x/new.mp4"))
    assert value(metrics.REGENERATIONS, outcome="completed", error_code="") == completed + 1
    assert value(metrics.COST, step="rewrite") == pytest.approx(spent["rewrite"] + 0.01)
    assert value(metrics.COST, step="generate") == pytest.approx(spent["generate"] + 0.25)
    assert value(metrics.COST, step="compose") == pytest.approx(spent["compose"] + 0.012)

    again = await begin(machine, job_id)
    await machine.cancel(job_id, "alice", str(again.regeneration.id))
    assert value(metrics.REGENERATIONS, outcome="cancelled", error_code="") == cancelled + 1
