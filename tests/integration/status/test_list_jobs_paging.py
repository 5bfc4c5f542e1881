"""ListJobs a page at a time at the status service, and the operator's budget cap, over real gRPC.

Both run on SQLite and PostgreSQL (the ``database_url`` fixture).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from sqlalchemy import event

from clipchat.broker.memory import InMemoryBroker
from clipchat.db import Database
from clipchat.db.migrate import upgrade
from clipchat.db.models import Job
from clipchat.settings import Settings
from clipchat.storage.local import LocalStorage
from clipchat.v1 import jobs_pb2, jobs_pb2_grpc
from gateway.app import create_app
from services.status.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from services.status.service import StatusService
from services.status.state_machine import ClipInput
from tests.integration.status.conftest import Clock


@pytest.fixture
async def service(database_url: str, tmp_path: Path, clock: Clock) -> AsyncIterator[StatusService]:
    await upgrade(database_url)
    settings = Settings(data_dir=tmp_path, database_url=database_url, max_budget_limit=Decimal("500"))
    broker = InMemoryBroker()
    await broker.connect()
    db = Database(database_url)
    status = StatusService(settings, db, broker)
    status.machine.clock = clock
    await status.start(port=0)
    yield status
    await status.stop()
    await broker.close()
    await db.dispose()


async def _create(service: StatusService, clock: Clock, count: int, owner: str = "alice", *,
                  same_time: int = 1) -> list[str]:
    """``count`` jobs, ``same_time`` of them at each instant; their ids in creation order."""
    ids = []
    for index in range(count):
        if index % same_time == 0:
            clock.advance(1)
        snapshot, _ = await service.machine.create_job(
            owner=owner, clips=[ClipInput("p", 2, "jobs/a/0.mp4")], audio_key="jobs/a/music.m4a")
        ids.append(str(snapshot.job.id))
    return ids


def _newest_first(ids: list[str], same_time: int) -> list[str]:
    """Creation order → the service's order: newest instant first, ties by id descending."""
    groups = [ids[i:i + same_time] for i in range(0, len(ids), same_time)]
    return [job_id for group in reversed(groups) for job_id in sorted(group, reverse=True)]


async def _all_pages(stub: jobs_pb2_grpc.JobStatusServiceStub, **request: Any) -> list[list[str]]:
    pages: list[list[str]] = []
    token = ""
    while True:
        reply = await stub.ListJobs(jobs_pb2.ListJobsRequest(owner="alice", page_token=token, **request), timeout=10)
        pages.append([job.job_id for job in reply.jobs])
        token = reply.next_page_token
        if not token:
            return pages


async def test_pages_cover_every_job_once_newest_first(service: StatusService, clock: Clock,
                                                        stub: jobs_pb2_grpc.JobStatusServiceStub) -> None:
    # Three jobs per instant, so pages also split inside a group of equal creation times.
    ids = await _create(service, clock, 23, same_time=3)
    await _create(service, clock, 4, owner="bob")
    pages = await _all_pages(stub, page_size=5)
    assert [len(page) for page in pages] == [5, 5, 5, 5, 3]
    assert [job_id for page in pages for job_id in page] == _newest_first(ids, 3)


async def test_page_size_defaults_and_is_capped(service: StatusService, clock: Clock,
                                                stub: jobs_pb2_grpc.JobStatusServiceStub) -> None:
    # Plain rows in one transaction: only their owner and creation time matter to a listing.
    async with service.db.transaction() as session:
        session.add_all(Job(owner="alice", audio_key="jobs/a/music.m4a", budget_limit=Decimal("50"),
                            created_at=clock.now + timedelta(seconds=i)) for i in range(MAX_PAGE_SIZE + 1))
    default = await stub.ListJobs(jobs_pb2.ListJobsRequest(owner="alice"), timeout=10)
    assert len(default.jobs) == DEFAULT_PAGE_SIZE and default.next_page_token
    capped = await stub.ListJobs(jobs_pb2.ListJobsRequest(owner="alice", page_size=10_000), timeout=10)
    assert len(capped.jobs) == MAX_PAGE_SIZE and capped.next_page_token
    rest = await stub.ListJobs(jobs_pb2.ListJobsRequest(owner="alice", page_size=10_000,
                                                        page_token=capped.next_page_token), timeout=10)
    assert len(rest.jobs) == 1 and rest.next_page_token == ""


async def test_jobs_created_between_pages_do_not_shift_them(service: StatusService, clock: Clock,
                                                            stub: jobs_pb2_grpc.JobStatusServiceStub) -> None:
    ids = await _create(service, clock, 4)
    first = await stub.ListJobs(jobs_pb2.ListJobsRequest(owner="alice", page_size=2), timeout=10)
    await _create(service, clock, 1)  # newer than all: before page one
    second = await stub.ListJobs(jobs_pb2.ListJobsRequest(owner="alice", page_size=2,
                                                          page_token=first.next_page_token), timeout=10)
    assert [job.job_id for job in second.jobs] == ids[1::-1]
    assert second.next_page_token == ""


async def test_a_page_reads_one_page_of_rows(service: StatusService, clock: Clock,
                                             stub: jobs_pb2_grpc.JobStatusServiceStub) -> None:
    await _create(service, clock, 30)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM jobs" in statement:
            statements.append(statement)

    engine = service.db.read_engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        reply = await stub.ListJobs(jobs_pb2.ListJobsRequest(owner="alice", page_size=4), timeout=10)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(reply.jobs) == 4
    # The keyset query asks the database for one page (plus one row to know there is more).
    assert len(statements) == 1 and "LIMIT" in statements[0].upper()


@pytest.mark.parametrize("token", ["not-a-token", "W10", "e30", "WzEsMiwzXQ", "x" * 300,
                                   "WzEsMTAwMDAwMDAwMDAsIjAwMDAwMDAwLTAwMDAtMDAwMC0wMDAwLTAwMDAwMDAwMDAwMCJd",
                                   "Wzk5OTk5OTk5OTk5OTk5LDAsIjAwMDAwMDAwLTAwMDAtMDAwMC0wMDAwLTAwMDAwMDAwMDAwMCJd"])
async def test_a_token_not_made_by_the_service_is_invalid_argument(
        stub: jobs_pb2_grpc.JobStatusServiceStub, token: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListJobs(jobs_pb2.ListJobsRequest(owner="alice", page_token=token), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cursor" in (refused.value.details() or "")


async def test_a_negative_page_size_is_invalid_argument(stub: jobs_pb2_grpc.JobStatusServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListJobs(jobs_pb2.ListJobsRequest(owner="alice", page_size=-1), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _create_request(budget_limit: str) -> jobs_pb2.CreateJobRequest:
    return jobs_pb2.CreateJobRequest(owner="alice", audio_key="jobs/a/music.m4a", budget_limit=budget_limit,
                                     clips=[jobs_pb2.ClipInput(prompt="p", duration=2, video_key="jobs/a/0.mp4")])


@pytest.mark.parametrize("budget_limit", ["500.01", "9999999999", "1e12"])
async def test_a_budget_above_the_operator_maximum_is_refused(stub: jobs_pb2_grpc.JobStatusServiceStub,
                                                               budget_limit: str) -> None:
    """A gRPC caller cannot get past the cap the gateway also enforces."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateJob(_create_request(budget_limit), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 500" in (refused.value.details() or "")
    listed = await stub.ListJobs(jobs_pb2.ListJobsRequest(owner="alice"), timeout=10)
    assert list(listed.jobs) == []


async def test_a_budget_at_the_operator_maximum_is_kept(stub: jobs_pb2_grpc.JobStatusServiceStub) -> None:
    created = await stub.CreateJob(_create_request("500"), timeout=10)
    assert Decimal(created.job.budget_limit) == Decimal("500")


async def test_the_gateway_pages_with_the_status_service(service: StatusService, clock: Clock,
                                                         tmp_path: Path) -> None:
    """GET /api/v1/jobs in front of the real service: limit and cursor passed through, same wire format."""
    ids = await _create(service, clock, 7, same_time=2)
    assert service.grpc is not None
    unused = "127.0.0.1:9"  # the listing needs only the status service
    settings = Settings(data_dir=tmp_path, status_addr=f"127.0.0.1:{service.grpc.port}", regenerator_addr=unused,
                        composer_addr=unused, auth_tokens="alice-token=alice", media_signing_key="k" * 32)
    app = create_app(settings, storage=LocalStorage(tmp_path / "store"))
    seen: list[str] = []
    cursor = None
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway",
            headers={"Authorization": "Bearer alice-token"}) as client:
        while True:
            response = await client.get("/api/v1/jobs", params={"limit": 3, **({"cursor": cursor} if cursor else {})})
            assert response.status_code == 200, response.text
            body = response.json()
            assert set(body) == {"jobs", "next_cursor"} and len(body["jobs"]) <= 3
            seen += [job["id"] for job in body["jobs"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        bad = await client.get("/api/v1/jobs", params={"cursor": "e30"})
    assert seen == _newest_first(ids, 2)
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "invalid_input" and "cursor" in bad.json()["error"]["message"]
