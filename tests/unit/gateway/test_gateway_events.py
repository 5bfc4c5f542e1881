"""Server-Sent Events through a real uvicorn server: replay, live events, heartbeats, disconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from clipchat.storage.local import LocalStorage
from clipchat.v1 import common_pb2
from gateway.app import create_app
from gateway.schemas import event_payload
from tests.unit.gateway.gateway_rig import (
    ALICE,
    Backend,
    SettingsFactory,
    error_of,
    make_job,
    running,
    served,
)

REGENERATION_ID = "0a4c2b8e-5a3f-4a8e-8c47-1b6a2e9d3c55"


@pytest.fixture
async def base_url(make_settings: SettingsFactory, storage: LocalStorage) -> AsyncIterator[str]:
    async with served(create_app(make_settings(sse_heartbeat_seconds=0.3), storage=storage)) as url:
        yield url


def _job_with_events(backend: Backend) -> str:
    job = backend.status.add_job(make_job("alice"))
    backend.status.add_event(job.job_id, "job.created")
    backend.status.add_event(job.job_id, "regeneration.queued", stage=common_pb2.STAGE_QUEUED)
    backend.status.add_event(job.job_id, "progress", stage=common_pb2.STAGE_REWRITING, fraction=0.1)
    backend.status.add_event(job.job_id, "progress", stage=common_pb2.STAGE_GENERATING, fraction=0.4,
                             progress=common_pb2.Progress(message="Generating the new clip", eta_seconds=12.5))
    backend.status.add_event(job.job_id, "regeneration.completed", stage=common_pb2.STAGE_DONE, fraction=1.0,
                             version_published=common_pb2.VersionPublished(
                                 regeneration_id=REGENERATION_ID, version=3, cost="0.3100", total_cost="1.2000",
                                 encoder="libx264"))
    return job.job_id


async def _read_stream(lines: AsyncIterator[str], *, events: int,
                       want_comment: bool) -> tuple[list[dict[str, str]], list[str]]:
    """Parse SSE frames until ``events`` events (and a comment if wanted) arrived."""
    frames: list[dict[str, str]] = []
    comments: list[str] = []
    current: dict[str, str] = {}
    async for line in lines:
        if line.startswith(":"):
            comments.append(line)
        elif line == "":
            if current:
                frames.append(current)
                current = {}
        else:
            field, _, value = line.partition(":")
            current[field] = value.removeprefix(" ")
        if len(frames) >= events and (comments or not want_comment):
            break
    return frames, comments


async def _ticket(base_url: str, job_id: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=10,
                                 headers={"Authorization": f"Bearer {ALICE}"}) as client:
        response = await client.post(f"/api/v1/jobs/{job_id}/tickets")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["expires_in"] == 60 and ALICE not in body["ticket"]
    return str(body["ticket"])


async def test_replays_after_last_event_id_then_follows(base_url: str, backend: Backend) -> None:
    job_id = _job_with_events(backend)
    ticket = await _ticket(base_url, job_id)
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client, client.stream(
            "GET", f"/api/v1/jobs/{job_id}/events", params={"ticket": ticket},
            headers={"Last-Event-ID": "2"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        lines = response.aiter_lines()
        frames, _ = await _read_stream(lines, events=3, want_comment=False)
        assert [f["id"] for f in frames] == ["3", "4", "5"]
        assert [f["event"] for f in frames] == ["progress", "progress", "regeneration.completed"]
        data = json.loads(frames[1]["data"])
        assert data == {"sequence": 4, "type": "progress", "stage": "generating", "fraction": 0.4,
                        "payload": {"message": "Generating the new clip", "eta_seconds": 12.5},
                        "created_at": data["created_at"]}
        assert json.loads(frames[0]["data"])["payload"] == {}  # no payload message: an empty object
        done = json.loads(frames[2]["data"])
        assert done["stage"] == "done"
        assert done["payload"] == {"regeneration_id": REGENERATION_ID, "version": 3, "cost": "0.3100",
                                   "total_cost": "1.2000", "encoder": "libx264"}

        backend.status.add_event(job_id, "progress", stage=common_pb2.STAGE_ENCODING, fraction=0.7)
        live, comments = await _read_stream(lines, events=1, want_comment=True)
        assert live[0]["id"] == "6" and json.loads(live[0]["data"])["stage"] == "encoding"
        assert comments and comments[0].startswith(": ping")
        backend.status.watch_closed.clear()
    # A replay of its own after Last-Event-ID, then the job's shared feed.
    replay, follow = backend.status.watch_requests
    assert (replay.after_sequence, replay.replay_only, replay.owner) == (2, True, "alice")
    assert (follow.after_sequence, follow.replay_only, follow.owner) == (5, False, "alice")
    # The client left (the job's last watcher): the gateway cancels the feed's WatchJob call.
    await asyncio.wait_for(backend.status.watch_closed.wait(), 5)


async def test_after_query_parameter_and_bearer_header(base_url: str, backend: Backend) -> None:
    job_id = _job_with_events(backend)
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client, client.stream(
            "GET", f"/api/v1/jobs/{job_id}/events?after=4",
            headers={"Authorization": f"Bearer {ALICE}"}) as response:
        frames, _ = await _read_stream(response.aiter_lines(), events=1, want_comment=False)
    assert frames[0]["id"] == "5"


async def test_heartbeat_on_a_quiet_stream(base_url: str, backend: Backend) -> None:
    job_id = _job_with_events(backend)
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client, client.stream(
            "GET", f"/api/v1/jobs/{job_id}/events", params={"after": 5},
            headers={"Authorization": f"Bearer {ALICE}"}) as response:
        frames, comments = await _read_stream(response.aiter_lines(), events=0, want_comment=True)
    assert frames == [] and comments[0].startswith(": ping")


async def test_event_stream_errors_are_json(client: httpx.AsyncClient, backend: Backend) -> None:
    job_id = _job_with_events(backend)
    unknown = await client.get("/api/v1/jobs/00000000-0000-4000-8000-000000000000/events")
    assert unknown.status_code == 404 and error_of(unknown)["code"] == "not_found"
    other = await client.get(f"/api/v1/jobs/{job_id}/events", headers={"Authorization": "Bearer bob-token"})
    assert other.status_code == 404
    bad_resume = await client.get(f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "x"})
    assert bad_resume.status_code == 422 and error_of(bad_resume)["code"] == "invalid_input"
    client.headers.pop("Authorization")
    anonymous = await client.get(f"/api/v1/jobs/{job_id}/events")
    assert anonymous.status_code == 401
    # The API token is never accepted in the URL; a ticket is.
    in_url = await client.get(f"/api/v1/jobs/{job_id}/events", params={"access_token": ALICE})
    assert in_url.status_code == 401 and error_of(in_url)["code"] == "unauthenticated"
    wrong = await client.get(f"/api/v1/jobs/{job_id}/events", params={"ticket": "nope"})
    assert wrong.status_code == 401 and error_of(wrong)["code"] == "invalid_ticket"


async def test_query_secrets_are_kept_out_of_the_url_seen_by_the_app(make_settings: SettingsFactory,
                                                                   storage: LocalStorage) -> None:
    app = create_app(make_settings(), storage=storage)
    seen: list[str] = []

    @app.middleware("http")
    async def record(request: httpx.Request, call_next):  # type: ignore[no-untyped-def]
        seen.append(str(request.url))
        return await call_next(request)

    async with running(app) as client:
        client.headers.pop("Authorization")
        await client.get("/api/v1/jobs/00000000-0000-4000-8000-000000000000/events",
                         params={"access_token": ALICE, "after": 3})
        await client.get("/api/v1/jobs/00000000-0000-4000-8000-000000000000/events",
                         params={"ticket": "1.YWxpY2U.abc", "after": 4})
    assert len(seen) == 2 and ALICE not in seen[0] and "after=3" in seen[0]
    assert "ticket" not in seen[1] and "after=4" in seen[1]


def test_typed_payloads_read_as_the_json_objects_the_status_service_stores() -> None:
    """Field names and values as stored; the step by its name; unset optional fields left out, or
    null where the stored object has null (a step recorded before any rewrite)."""
    step = common_pb2.JobEvent(type="regeneration.step", step_recorded=common_pb2.StepRecorded(
        regeneration_id=REGENERATION_ID, step=common_pb2.STEP_GENERATION_STARTED, cost="0"))
    assert event_payload(step) == {"regeneration_id": REGENERATION_ID, "step": "generation_started", "cost": "0",
                                   "modified_prompt": None, "rewriter": None, "change_summary": None}
    progress = common_pb2.JobEvent(type="progress", progress=common_pb2.Progress(message="Encoding"))
    assert event_payload(progress) == {"message": "Encoding"}  # the whole change's: no member id
    member = "7d2e9b1c-0f4a-4b6e-9c3d-5a8f1e2b7c90"
    clip_progress = common_pb2.JobEvent(type="progress", progress=common_pb2.Progress(
        message="Generating the new clip", regeneration_id=REGENERATION_ID, member_regeneration_id=member))
    assert event_payload(clip_progress) == {"message": "Generating the new clip", "regeneration_id": REGENERATION_ID,
                                            "member_regeneration_id": member}
    failed = common_pb2.JobEvent(type="job.failed", work_failed=common_pb2.WorkFailed(
        error_code="lease_expired", message="Composition failed. Please try again.", retryable=True,
        total_cost="0"))
    assert event_payload(failed) == {"regeneration_id": "", "error_code": "lease_expired",
                                     "message": "Composition failed. Please try again.", "retryable": True,
                                     "total_cost": "0"}
    assert event_payload(common_pb2.JobEvent(type="job.created", job_created=common_pb2.JobCreated(clips=3))) \
        == {"clips": 3}
