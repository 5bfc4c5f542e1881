"""Work claims, the outbox and one charge per paid call, on both databases.

A claim lets exactly one delivery of a task message work at a time; the outbox carries the task
messages with the state change that causes them; a cost reported twice for one paid call counts once.
"""

from __future__ import annotations

import asyncio
import os
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select, text

from clipchat.broker import REGENERATE_QUEUE
from clipchat.broker.memory import InMemoryBroker
from clipchat.broker.topology import COMPOSE_QUEUE
from clipchat.db import Database
from clipchat.db.migrate import head_revision
from clipchat.db.models import OutboxMessage
from clipchat.errors import DependencyUnavailable, StaleLease
from services.status.outbox import OutboxRelay
from services.status.state_machine import (
    PHASE_COMPOSE,
    PHASE_REGENERATE,
    ClipInput,
    JobStateMachine,
)
from tests.integration.status.conftest import Clock
from tests.integration.status.test_state_machine import begin, composed_job

CLAIM_SECONDS = 3


@pytest.fixture
def machine(db: Database, clock: Clock) -> JobStateMachine:
    return JobStateMachine(db, lease_seconds=30, budget_limit=Decimal("50"), claim_seconds=CLAIM_SECONDS,
                           budget_warning_fraction=Decimal("0.8"), clock=clock)


async def unsent(db: Database) -> list[OutboxMessage]:
    async with db.read() as session:
        rows = await session.execute(select(OutboxMessage).where(OutboxMessage.published_at.is_(None))
                                     .order_by(OutboxMessage.id))
        return list(rows.scalars().all())


async def test_one_delivery_holds_the_work_and_a_lapsed_claim_is_taken_over(
        machine: JobStateMachine, clock: Clock) -> None:
    job_id = await composed_job(machine)
    began = await begin(machine, job_id)
    token = began.lease_token

    first = await machine.claim_work(job_id, token, PHASE_REGENERATE, "delivery-a")
    assert (first.outcome, first.attempt) == ("claimed", 1)
    # A duplicate delivery while the first one works gets "busy", not the work.
    busy = await machine.claim_work(job_id, token, PHASE_REGENERATE, "delivery-b")
    assert busy.outcome == "busy" and 0 < busy.retry_after <= CLAIM_SECONDS
    # The holder's heartbeat keeps its claim alive past the claim time.
    clock.advance(CLAIM_SECONDS - 1)
    await machine.renew(job_id, token, "delivery-a")
    clock.advance(CLAIM_SECONDS - 1)
    assert (await machine.claim_work(job_id, token, PHASE_REGENERATE, "delivery-b")).outcome == "busy"
    # The holder dies: once its claim lapses (well before the lease), the redelivery takes over.
    clock.advance(CLAIM_SECONDS + 0.1)
    taken = await machine.claim_work(job_id, token, PHASE_REGENERATE, "delivery-b")
    assert (taken.outcome, taken.attempt) == ("claimed", 2)
    # The old holder's writes are refused from now on (fencing per attempt).
    with pytest.raises(StaleLease):
        await machine.renew(job_id, token, "delivery-a")
    with pytest.raises(StaleLease):
        await machine.record_step(job_id, token, step="rewrite", cost="0.01", claim_id="delivery-a")
    regeneration = await machine.get_regeneration(job_id, str(began.regeneration.id))
    assert regeneration.attempts == 2 and regeneration.llm_cost == 0


async def test_a_message_of_a_finished_phase_is_obsolete(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine)
    began = await begin(machine, job_id)
    token = began.lease_token
    assert (await machine.claim_work(job_id, token, PHASE_COMPOSE, "early")).outcome == "obsolete"
    await machine.claim_work(job_id, token, PHASE_REGENERATE, "regen")
    await machine.queue_composition(job_id, token, "regen", clip_index=1,
                                    new_clip=ClipInput("night", 2.0, "jobs/x/clips/n.mp4"))
    # The regenerate message came back late: its phase is over, nothing to do.
    assert (await machine.claim_work(job_id, token, PHASE_REGENERATE, "late")).outcome == "obsolete"
    compose = await machine.claim_work(job_id, token, PHASE_COMPOSE, "composer")
    assert (compose.outcome, compose.attempt) == ("claimed", 1)
    await machine.succeed(job_id, token, regeneration_id=str(began.regeneration.id), claim_id="composer",
                          new_clip=ClipInput("night", 2.0, "jobs/x/clips/n.mp4"),
                          video_key="jobs/x/v2.mp4", video_duration=6.0)
    # After success the lease is gone: every copy of either message is obsolete.
    assert (await machine.claim_work(job_id, token, PHASE_COMPOSE, "again")).outcome == "obsolete"


async def test_a_released_claim_is_free_at_once(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine)
    token = (await begin(machine, job_id)).lease_token
    await machine.claim_work(job_id, token, PHASE_REGENERATE, "a")
    await machine.release_claim(job_id, token, "a")
    retry = await machine.claim_work(job_id, token, PHASE_REGENERATE, "b")
    assert (retry.outcome, retry.attempt) == ("claimed", 2)


async def test_a_cost_reported_twice_for_one_paid_call_counts_once(machine: JobStateMachine) -> None:
    job_id = await composed_job(machine)
    began = await begin(machine, job_id)
    token = began.lease_token
    await machine.claim_work(job_id, token, PHASE_REGENERATE, "a")
    for _ in range(2):  # the answer to the first write was lost; the worker sends it again
        await machine.record_step(job_id, token, step="generate", cost="0.2500", claim_id="a",
                                  charge_key=f"{began.regeneration.id}:generate:1.1")
    await machine.record_step(job_id, token, step="generate", cost="0.2500", claim_id="a",
                              charge_key=f"{began.regeneration.id}:generate:1.2")
    regeneration = await machine.get_regeneration(job_id, str(began.regeneration.id))
    assert regeneration.generation_cost == Decimal("0.5000")
    assert regeneration.cost == Decimal("0.5000")


async def test_state_changes_write_their_task_messages_in_the_same_transaction(
        machine: JobStateMachine, db: Database) -> None:
    snapshot, _ = await machine.create_job(
        owner="alice", clips=[ClipInput("p", 2.0, "jobs/x/in/0.mp4")], audio_key="jobs/x/in/a.wav")
    [initial] = await unsent(db)
    assert (initial.queue, initial.message_id) == (COMPOSE_QUEUE, f"compose-{snapshot.job.id}-initial")
    job_id = await composed_job(machine)
    began = await begin(machine, job_id)
    messages = await unsent(db)
    assert [m.queue for m in messages] == [COMPOSE_QUEUE, COMPOSE_QUEUE, REGENERATE_QUEUE]
    assert messages[-1].message_id == str(began.regeneration.id)


async def test_the_relay_publishes_what_was_committed_once_the_broker_is_back(
        machine: JobStateMachine, db: Database) -> None:
    broker = InMemoryBroker()  # not connected: the broker is down
    relay = OutboxRelay(db, broker)
    machine.on_outbox = relay.wake
    job_id = await composed_job(machine)
    began = await begin(machine, job_id)  # succeeds although nothing can be published

    with pytest.raises(DependencyUnavailable):
        await relay.publish_pending()
    assert len(await unsent(db)) == 2

    await broker.connect()
    assert await relay.publish_pending() == 2
    assert await unsent(db) == []
    assert await relay.publish_pending() == 0
    queued: list[str] = []

    async def take(delivery: object) -> None:
        queued.append(delivery.task.regeneration_id)  # type: ignore[attr-defined]

    subscription = await broker.consume(REGENERATE_QUEUE, take)  # type: ignore[arg-type]
    for _ in range(100):
        if queued:
            break
        await asyncio.sleep(0.01)
    await subscription.cancel()
    assert queued == [str(began.regeneration.id)]


async def test_migrations_started_at_once_all_succeed(database_url: str, tmp_path: Path) -> None:
    """Status pods migrating at once (separate processes): on PostgreSQL each waits for the one
    before it (an advisory lock) and finds the schema at head."""
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite has one writer at a time anyway")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CLIPCHAT_")},
           "CLIPCHAT_DATABASE_URL": database_url, "CLIPCHAT_DATA_DIR": str(tmp_path)}
    clipchat = str(Path(sys.executable).with_name("clipchat"))
    runs = [await asyncio.create_subprocess_exec(clipchat, "migrate", env=env, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE) for _ in range(3)]
    outcomes = [await run.communicate() for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], [err.decode()[-500:] for _, err in outcomes]
    database = Database(database_url)
    try:
        async with database.read() as session:
            version = (await session.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
        assert version == head_revision()
    finally:
        await database.dispose()
