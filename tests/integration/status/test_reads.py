"""GetJob's reads (services/status/reads.py) on both databases: the answer the state machine gives,
right after every kind of write, on this replica and on another one; and pooled connections that
PostgreSQL dropped while idle are replaced before a read uses them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal

import asyncpg
import pytest
from sqlalchemy import text

from clipchat.db import PING_AFTER_IDLE_SECONDS, Database
from clipchat.errors import NotFound
from clipchat.v1 import common_pb2
from services.status.reads import JobReads
from services.status.server import job_to_proto
from services.status.state_machine import PHASE_REGENERATE, ClipInput, JobStateMachine
from tests.integration.status.conftest import Clock


@pytest.fixture
def machine(db: Database, clock: Clock) -> JobStateMachine:
    return JobStateMachine(db, lease_seconds=30, budget_limit=Decimal("50"),
                           budget_warning_fraction=Decimal("0.8"), clock=clock)


def replica(db: Database, clock: Clock) -> JobReads:
    """The reads of one status replica: its own state machine and kept answers, the shared database."""
    machine = JobStateMachine(db, lease_seconds=30, budget_limit=Decimal("50"),
                              budget_warning_fraction=Decimal("0.8"), clock=clock)
    return JobReads(machine, job_to_proto)


async def expected(machine: JobStateMachine, job_id: str) -> common_pb2.Job:
    return job_to_proto(await machine.get_job(job_id, "alice"))


async def test_every_write_is_read_at_once_on_every_replica(db: Database, clock: Clock,
                                                           machine: JobStateMachine) -> None:
    replicas = [replica(db, clock), replica(db, clock)]

    async def assert_current() -> None:
        want = await expected(machine, job_id)
        for reads in replicas:
            for _ in range(2):  # the first read may load; the second comes from what was kept
                assert await reads.get_job(job_id, "alice") == want
                assert await reads.get_job(job_id) == want

    snapshot, token = await machine.create_job(
        owner="alice", clips=[ClipInput(f"prompt {i}", 2.0, f"jobs/x/in/{i}.mp4") for i in range(3)],
        audio_key="jobs/x/in/audio.wav")
    job_id = str(snapshot.job.id)
    writes: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("progress", lambda: machine.record_progress(job_id, token, stage="encoding", fraction=0.5)),
        # A heartbeat writes no event: only the row's updated_at (which GetJob returns) changes.
        ("renew", lambda: machine.renew(job_id, token)),
        ("compose", lambda: machine.succeed(job_id, token, video_key="jobs/x/v1.mp4", video_duration=6.0,
                                            composition_cost="0.0060",
                                            clip_thumbnail_keys=["t0.jpg", "t1.jpg", "t2.jpg"])),
    ]
    await assert_current()
    for _name, write in writes:
        await write()
        await assert_current()

    started = await machine.begin(job_id=job_id, owner="alice", clip_index=1, instruction="make it nighttime",
                                  history=[], estimated_cost="0.10")
    await assert_current()
    token, regeneration_id = started.lease_token, str(started.regeneration.id)
    assert (await machine.claim_work(job_id, token, PHASE_REGENERATE, "claim-1")).outcome == "claimed"
    await assert_current()
    await machine.record_step(job_id, token, step="generate", cost="0.2500", claim_id="claim-1")
    await assert_current()
    await machine.succeed(job_id, token, regeneration_id=regeneration_id, claim_id="claim-1",
                          new_clip=ClipInput("night prompt", 2.0, "jobs/x/c1r1.mp4", "c1r1.jpg"),
                          video_key="jobs/x/v2.mp4", video_duration=6.0)
    await assert_current()
    assert (await replicas[1].get_job(job_id)).current_version == 2

    await machine.restore_version(job_id, "alice", 1)
    await assert_current()
    assert (await replicas[0].get_job(job_id)).clips[1].prompt == "prompt 1"

    failing = await machine.begin(job_id=job_id, owner="alice", clip_index=0, instruction="brighter",
                                  history=[], estimated_cost="0.10")
    await assert_current()
    await machine.fail(job_id, failing.lease_token, error_code="provider_error",
                       error_message="The provider failed.")
    await assert_current()
    assert (await replicas[1].get_job(job_id)).error_code == "provider_error"

    cancelled = await machine.begin(job_id=job_id, owner="alice", clip_index=2, instruction="slower",
                                    history=[], estimated_cost="0.10")
    await assert_current()
    await machine.cancel(job_id, "alice", str(cancelled.regeneration.id))
    await assert_current()


async def test_an_unchanged_job_is_answered_without_loading_it_again(db: Database, clock: Clock,
                                                                     machine: JobStateMachine) -> None:
    reads = replica(db, clock)
    snapshot, _ = await machine.create_job(owner="alice", clips=[ClipInput("p", 2.0, "k.mp4")], audio_key="a.wav")
    job_id = str(snapshot.job.id)
    loads = 0
    load = reads.machine.get_job

    async def counted(job_id: str, owner: str = "") -> object:
        nonlocal loads
        loads += 1
        return await load(job_id, owner)

    reads.machine.get_job = counted  # type: ignore[assignment, method-assign]
    first = await reads.get_job(job_id, "alice")
    assert await reads.get_job(job_id, "alice") == first
    assert await reads.get_job(job_id) == first
    assert loads == 1


async def test_unknown_jobs_and_other_owners_are_not_found(db: Database, clock: Clock,
                                                           machine: JobStateMachine) -> None:
    reads = replica(db, clock)
    snapshot, _ = await machine.create_job(owner="alice", clips=[ClipInput("p", 2.0, "k.mp4")], audio_key="a.wav")
    job_id = str(snapshot.job.id)
    await reads.get_job(job_id, "alice")  # kept: another owner still gets nothing from it
    for job, owner in ((job_id, "mallory"), ("00000000-0000-0000-0000-000000000000", ""), ("not-a-uuid", "")):
        with pytest.raises(NotFound) as ours:
            await reads.get_job(job, owner)
        with pytest.raises(NotFound) as machines:
            await machine.get_job(job, owner)
        assert (ours.value.code, ours.value.message) == (machines.value.code, machines.value.message)


async def test_the_least_recently_read_jobs_are_let_go(db: Database, clock: Clock,
                                                      machine: JobStateMachine) -> None:
    reads = JobReads(machine, job_to_proto, max_jobs=2)
    ids = []
    for _ in range(3):
        snapshot, _ = await machine.create_job(owner="alice", clips=[ClipInput("p", 2.0, "k.mp4")],
                                               audio_key="a.wav")
        ids.append(str(snapshot.job.id))
        await reads.get_job(ids[-1])
    assert len(reads._kept) == 2
    for job_id in ids:
        assert await reads.get_job(job_id) == await expected(machine, job_id)


@pytest.mark.postgres
async def test_a_pooled_connection_dropped_while_idle_is_replaced_before_a_read(postgres_url: str) -> None:
    db = Database(postgres_url)
    admin = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        async with db.read_connection() as connection:
            pid = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid) is True
        await asyncio.sleep(PING_AFTER_IDLE_SECONDS + 0.2)
        async with db.read_connection() as connection:
            assert (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one() != pid
        async with db.read() as session:
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await admin.close()
        await db.dispose()
