"""Event-stream tickets: bound to one job and one owner, short-lived, and useless once tampered with.

Time is a clock the test moves by hand; the streams that are accepted run through a real uvicorn
server (an accepted SSE stream never ends on its own, which an in-memory transport cannot cut).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from clipchat.storage.local import LocalStorage
from gateway.app import create_app
from gateway.errors import ApiError
from gateway.signing import MediaSigner
from gateway.tickets import TicketSigner
from tests.unit.gateway.gateway_rig import Backend, SettingsFactory, error_of, make_job, served

KEY = "test-signing-key"
TTL = 60


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def app(make_settings: SettingsFactory, storage: LocalStorage, clock: Clock) -> FastAPI:
    app = create_app(make_settings(media_signing_key=KEY, sse_ticket_ttl_seconds=TTL), storage=storage)
    app.state.tickets = TicketSigner(KEY, TTL, clock=clock)
    return app


@pytest.fixture
async def base_url(app: FastAPI) -> AsyncIterator[str]:
    async with served(app) as url:
        yield url


@pytest.fixture
async def anonymous(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        yield client


def _tickets(app: FastAPI) -> TicketSigner:
    tickets: TicketSigner = app.state.tickets
    return tickets


async def _open_with(client: httpx.AsyncClient, job_id: str, ticket: str) -> tuple[int, str]:
    """The stream's status, and its first line when it opened (then the client leaves)."""
    async with client.stream("GET", f"/api/v1/jobs/{job_id}/events", params={"ticket": ticket}) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, response.text
        async for line in response.aiter_lines():
            return 200, line
    return 200, ""


def _refusal(status: int, body: str) -> dict[str, object]:
    assert status == 401, body
    return error_of(httpx.Response(status, content=body.encode(), headers={"content-type": "application/json"}))


async def test_a_ticket_opens_its_own_jobs_stream(app: FastAPI, backend: Backend,
                                                  anonymous: httpx.AsyncClient) -> None:
    job = backend.status.add_job(make_job("alice"))
    backend.status.add_event(job.job_id, "job.created")
    status, first = await _open_with(anonymous, job.job_id, _tickets(app).issue("alice", job.job_id))
    assert status == 200 and first.startswith(("id:", "event:", "data:", "retry:"))


async def test_a_ticket_for_job_a_is_refused_on_job_bs_stream(app: FastAPI, backend: Backend,
                                                              anonymous: httpx.AsyncClient) -> None:
    job_a = backend.status.add_job(make_job("alice"))
    job_b = backend.status.add_job(make_job("alice"))  # the same owner's other job
    ticket = _tickets(app).issue("alice", job_a.job_id)
    error = _refusal(*await _open_with(anonymous, job_b.job_id, ticket))
    assert error["code"] == "invalid_ticket" and error["retryable"] is False
    assert backend.status.watch_requests == []


async def test_an_expired_ticket_is_refused(app: FastAPI, backend: Backend, clock: Clock,
                                            anonymous: httpx.AsyncClient) -> None:
    job = backend.status.add_job(make_job("alice"))
    backend.status.add_event(job.job_id, "job.created")
    ticket = _tickets(app).issue("alice", job.job_id)
    clock.now += TTL - 1
    assert (await _open_with(anonymous, job.job_id, ticket))[0] == 200
    clock.now += 1
    error = _refusal(*await _open_with(anonymous, job.job_id, ticket))
    assert error["code"] == "ticket_expired" and "expired" in str(error["message"])


async def test_a_ticket_of_one_owner_does_not_open_anothers_job(app: FastAPI, backend: Backend,
                                                                anonymous: httpx.AsyncClient) -> None:
    bobs = backend.status.add_job(make_job("bob"))
    alices = backend.status.add_job(make_job("alice"))
    # Alice cannot get a ticket for Bob's job: the job is checked as hers first.
    refused = await anonymous.post(f"/api/v1/jobs/{bobs.job_id}/tickets",
                                   headers={"Authorization": "Bearer alice-token"})
    assert refused.status_code == 404 and error_of(refused)["code"] == "not_found"
    # A well-signed ticket naming Alice for Bob's job still opens nothing: the owner is checked below.
    status, body = await _open_with(anonymous, bobs.job_id, _tickets(app).issue("alice", bobs.job_id))
    assert status == 404, body
    # Alice's own ticket with Bob written in as its owner: the signature no longer matches.
    exp, _, sig = _tickets(app).issue("alice", alices.job_id).split(".")
    forged = f"{exp}.{'Ym9i'}.{sig}"  # base64url("bob")
    error = _refusal(*await _open_with(anonymous, alices.job_id, forged))
    assert error["code"] == "invalid_ticket"


def _tampered(ticket: str) -> list[str]:
    exp, owner, sig = ticket.split(".")
    flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    return [
        f"{exp}.{owner}.{flipped}",               # one signature digit changed
        f"{int(exp) + 3600}.{owner}.{sig}",       # a later expiry
        f"{exp}.{owner}.",                        # no signature
        f"{exp}.{owner}",                         # a part missing
        f"{exp}.{owner}.{sig}.{sig}",             # a part added
        f"-{exp}.{owner}.{sig}",                  # not a number
        f"{exp}.%%%.{sig}",                       # an owner that is not base64
        ticket.upper(),
        "",
    ]


async def test_a_tampered_ticket_is_refused(app: FastAPI, backend: Backend,
                                            anonymous: httpx.AsyncClient) -> None:
    job = backend.status.add_job(make_job("alice"))
    ticket = _tickets(app).issue("alice", job.job_id)
    for bad in _tampered(ticket):
        status, body = await _open_with(anonymous, job.job_id, bad)
        assert status == 401, (bad, body)
        assert error_of(httpx.Response(status, content=body.encode()))["code"] in {"invalid_ticket",
                                                                                  "unauthenticated"}
    assert backend.status.watch_requests == []


def test_tickets_check_job_owner_expiry_and_key(clock: Clock) -> None:
    tickets = TicketSigner(KEY, TTL, clock=clock)
    ticket = tickets.issue("alice", "job-a")
    assert tickets.owner_of(ticket, "job-a") == "alice"
    with pytest.raises(ApiError) as other_job:
        tickets.owner_of(ticket, "job-b")
    assert other_job.value.status_code == 401 and other_job.value.body.code == "invalid_ticket"
    # Another deployment's key, and a media signature, are not tickets here.
    with pytest.raises(ApiError):
        TicketSigner("another-signing-key", TTL, clock=clock).owner_of(ticket, "job-a")
    media_sig = MediaSigner(KEY, TTL, clock=clock).url("job-a").rsplit("sig=", 1)[1]
    exp, owner, _ = ticket.split(".")
    with pytest.raises(ApiError):
        tickets.owner_of(f"{exp}.{owner}.{media_sig}", "job-a")
    for bad in _tampered(ticket):
        with pytest.raises(ApiError) as refused:
            tickets.owner_of(bad, "job-a")
        assert refused.value.status_code == 401
    clock.now += TTL
    with pytest.raises(ApiError) as expired:
        tickets.owner_of(ticket, "job-a")
    assert expired.value.body.code == "ticket_expired"
