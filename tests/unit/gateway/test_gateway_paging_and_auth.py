"""GET /jobs a page at a time, and failed authentications limited per client address."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from clipchat.storage.local import LocalStorage
from gateway.app import create_app
from gateway.ratelimit import TokenBucketLimiter
from tests.unit.gateway.gateway_rig import ALICE, Backend, SettingsFactory, error_of, make_job, now_ts, running


def _add_jobs(backend: Backend, count: int, owner: str = "alice") -> list[str]:
    """``count`` jobs, the first the oldest; returns their ids newest first."""
    ids = []
    for i in range(count):
        job = make_job(owner)
        job.created_at.CopyFrom(now_ts(-1000 + i))
        backend.status.add_job(job)
        ids.append(job.job_id)
    return ids[::-1]


async def _all_pages(client: httpx.AsyncClient, **params: Any) -> tuple[list[str], int]:
    seen: list[str] = []
    pages = 0
    cursor = None
    while True:
        response = await client.get("/api/v1/jobs", params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        body = response.json()
        seen += [job["id"] for job in body["jobs"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return seen, pages


async def test_jobs_come_newest_first_fifty_a_page(client: httpx.AsyncClient, backend: Backend) -> None:
    newest_first = _add_jobs(backend, 120)
    _add_jobs(backend, 3, owner="bob")
    first = (await client.get("/api/v1/jobs")).json()
    assert [job["id"] for job in first["jobs"]] == newest_first[:50]
    assert isinstance(first["next_cursor"], str)
    assert await _all_pages(client) == (newest_first, 3)


async def test_limit_sets_the_page_size(client: httpx.AsyncClient, backend: Backend) -> None:
    newest_first = _add_jobs(backend, 7)
    assert await _all_pages(client, limit=3) == (newest_first, 3)
    assert await _all_pages(client, limit=7) == (newest_first, 1)
    assert await _all_pages(client, limit=200) == (newest_first, 1)


async def test_no_jobs_is_one_empty_page(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/v1/jobs")).json() == {"jobs": [], "next_cursor": None}


async def test_jobs_created_between_pages_do_not_shift_them(client: httpx.AsyncClient,
                                                            backend: Backend) -> None:
    newest_first = _add_jobs(backend, 4)
    first = (await client.get("/api/v1/jobs", params={"limit": 2})).json()
    backend.status.add_job(make_job("alice"))  # newer than all: belongs before page one
    second = (await client.get("/api/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]})).json()
    assert [job["id"] for job in second["jobs"]] == newest_first[2:]
    assert second["next_cursor"] is None


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 201}, {"limit": "x"}, {"cursor": "not-a-cursor"},
                                    {"cursor": "W10"}, {"cursor": "e30"}, {"cursor": "x" * 201}])
async def test_bad_limit_or_cursor_is_422(client: httpx.AsyncClient, params: dict[str, Any]) -> None:
    response = await client.get("/api/v1/jobs", params=params)
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_input" and not error["retryable"]
    assert ("limit" in error["message"]) or ("cursor" in error["message"])


async def test_the_document_describes_paging_and_the_auth_limit(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    list_jobs = document["paths"]["/api/v1/jobs"]["get"]
    params = {p["name"]: p for p in list_jobs["parameters"]}
    limit = params["limit"]["schema"]
    assert (limit["type"], limit["minimum"], limit["maximum"], limit["default"]) == ("integer", 1, 200, 50)
    assert "cursor" in params
    assert {"401", "422", "429"} <= set(list_jobs["responses"])
    job_list = document["components"]["schemas"]["JobList"]
    assert set(job_list["required"]) == {"jobs", "next_cursor"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if "401" in operation.get("responses", {}):
                assert "429" in operation["responses"], f"{method} {path}"


async def test_failed_authentications_are_limited_per_client(make_settings: SettingsFactory,
                                                             storage: LocalStorage, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice"))
    app = create_app(make_settings(auth_failures_per_minute=3), storage=storage)
    async with running(app) as client:
        wrong = {"Authorization": "Bearer wrong-token"}
        for _ in range(2):
            assert (await client.get("/api/v1/jobs", headers=wrong)).status_code == 401
        # The right token still works until the failures run out, and does not use them up.
        for _ in range(5):
            assert (await client.get(f"/api/v1/jobs/{job.job_id}")).status_code == 200
        assert (await client.get("/api/v1/jobs", headers={"Authorization": ""})).status_code == 401
        for headers in (wrong, {"Authorization": f"Bearer {ALICE}"}):
            response = await client.get("/api/v1/jobs", headers=headers)
            assert response.status_code == 429
            error = error_of(response)
            assert error["code"] == "rate_limited" and error["retryable"]
            assert 1 <= int(response.headers["Retry-After"]) <= 20
            assert "failed sign-ins" in error["message"]
        events = await client.get(f"/api/v1/jobs/{job.job_id}/events", params={"access_token": "guess"})
        assert events.status_code == 429
        # Another address is not affected.
        other = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.0.0.9", 1234)),
                                  base_url="http://gateway", headers={"Authorization": f"Bearer {ALICE}"})
        async with other:
            assert (await other.get("/api/v1/jobs")).status_code == 200
            assert (await other.get("/api/v1/jobs", headers=wrong)).status_code == 401


def test_failure_buckets_refill_and_the_table_stays_bounded() -> None:
    now = [0.0]
    limiter = TokenBucketLimiter(2, clock=lambda: now[0])
    assert limiter.waiting("a") is None
    assert limiter.acquire("a") is None and limiter.acquire("a") is None
    assert limiter.waiting("a") == 30 and limiter.acquire("a") == 30
    now[0] += 30
    assert limiter.waiting("a") is None
    limiter.MAX_KEYS = 3
    for key in "bcd":
        limiter.waiting(key)  # full buckets: dropped when the table is full
    limiter.acquire("e")
    assert len(limiter._buckets) <= 3
