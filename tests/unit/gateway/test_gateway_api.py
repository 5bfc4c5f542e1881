"""The REST API against real gRPC servers with fake servicers: JSON shapes, auth and every error path."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest

from clipchat.errors import ClipChatError, DependencyUnavailable
from clipchat.storage.local import LocalStorage
from clipchat.v1 import common_pb2
from gateway.app import create_app
from gateway.ratelimit import TokenBucketLimiter
from tests.unit.gateway.gateway_rig import BOB, Backend, SettingsFactory, error_of, make_job, now_ts, running

UNKNOWN_JOB = "00000000-0000-4000-8000-000000000000"


# --- health ---------------------------------------------------------------------------------------


async def test_healthz_needs_nothing(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/healthz", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_checks_both_services_and_storage_and_shows_the_composers_encoder(
        client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready", "checks": {"status": "ok", "regenerator": "ok", "storage": "ok",
                                      "database": "unknown", "broker": "unknown"},
        "composer": {"state": "ok", "encoder": "libx264",
                     "encoder_reason": "h264_nvenc test encode failed: Cannot load libcuda.so.1",
                     "encoder_fallback": True, "x264_preset": "veryfast", "workers": 2,
                     "cache": {"hits": 16, "misses": 3, "stores": 3, "evictions": 0}}}


async def test_a_composer_that_is_down_is_shown_but_does_not_make_the_gateway_unready(
        make_settings: SettingsFactory, storage: LocalStorage, backend: Backend) -> None:
    await backend.servers[2].stop(0)  # the composer: compositions wait in the queue meanwhile
    async with running(create_app(make_settings(), storage=storage)) as client:
        response = await client.get("/api/v1/readyz")
    assert response.status_code == 200
    assert response.json()["composer"] == {"state": "unavailable", "encoder": None, "encoder_reason": None,
                                           "encoder_fallback": None, "x264_preset": None, "workers": None,
                                           "cache": None}


async def test_readyz_names_the_dependency_that_is_down(make_settings: SettingsFactory,
                                                        storage: LocalStorage, backend: Backend) -> None:
    await backend.servers[1].stop(0)  # the regenerator
    async with running(create_app(make_settings(), storage=storage)) as client:
        response = await client.get("/api/v1/readyz")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "not_ready" and error["retryable"] is True
    assert "regenerator" in error["message"]
    assert response.json()["checks"]["regenerator"] == "unavailable"
    assert response.json()["checks"]["status"] == "ok"


# --- authentication and ownership -------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer wrong-token", "Basic abc", "Bearer "])
async def test_missing_or_invalid_token_is_401(client: httpx.AsyncClient, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    client.headers.pop("Authorization")
    response = await client.get("/api/v1/jobs", headers=headers)
    assert response.status_code == 401
    assert error_of(response)["code"] in ("unauthenticated", "invalid_token")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_query_token_is_not_accepted_on_plain_api_routes(client: httpx.AsyncClient) -> None:
    client.headers.pop("Authorization")
    response = await client.get("/api/v1/jobs", params={"access_token": "alice-token"})
    assert response.status_code == 401


async def test_lists_only_the_callers_jobs(client: httpx.AsyncClient, backend: Backend) -> None:
    mine = backend.status.add_job(make_job("alice"))
    backend.status.add_job(make_job("bob"))
    response = await client.get("/api/v1/jobs")
    assert response.status_code == 200
    assert [job["id"] for job in response.json()["jobs"]] == [mine.job_id]


async def test_another_owners_job_is_404(client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice"))
    response = await client.get(f"/api/v1/jobs/{job.job_id}", headers={"Authorization": f"Bearer {BOB}"})
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


@pytest.mark.parametrize("job_id", [UNKNOWN_JOB, "not-a-uuid"])
async def test_unknown_job_is_404(client: httpx.AsyncClient, job_id: str) -> None:
    for path in ("", "/clips", "/versions", "/regenerations"):
        response = await client.get(f"/api/v1/jobs/{job_id}{path}")
        assert response.status_code == 404, path
        assert error_of(response)["code"] == "not_found"


# --- job JSON -------------------------------------------------------------------------------------------


async def test_job_json(client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice", total_cost="8.5000", budget_limit="10.0000"))
    response = await client.get(f"/api/v1/jobs/{job.job_id}")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"id", "title", "status", "current_version", "video_url", "versions", "clips",
                         "total_cost", "budget_limit", "budget_used_fraction", "budget_warning",
                         "active_regeneration_id", "error", "aspect_ratio", "created_at"}
    assert body["id"] == job.job_id
    assert body["status"] == "completed"
    assert body["current_version"] == 2
    assert body["video_url"] == body["versions"][1]["url"]
    assert body["video_url"].startswith("/api/v1/media/jobs/") and "v2.mp4?exp=" in body["video_url"]
    assert body["total_cost"] == "8.5000" and body["budget_limit"] == "10.0000"
    assert body["budget_used_fraction"] == 0.85 and body["budget_warning"] is True
    assert body["active_regeneration_id"] is None and body["error"] is None
    assert [v["version"] for v in body["versions"]] == [1, 2]
    assert body["versions"][1]["created_by_regeneration_id"] == "r-1"
    assert body["versions"][0]["created_by_regeneration_id"] is None
    clip = body["clips"][0]
    assert set(clip) == {"index", "prompt", "duration", "video_url", "thumbnail_url", "revision"}
    assert clip["thumbnail_url"].split("?")[0].endswith("/thumbs/0.jpg")
    assert "storage_key" not in response.text and "owner" not in response.text


async def test_budget_warning_below_threshold(client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice", total_cost="1", budget_limit="10"))
    body = (await client.get(f"/api/v1/jobs/{job.job_id}")).json()
    assert body["budget_warning"] is False and body["budget_used_fraction"] == 0.1


async def test_failed_job_shows_a_readable_error(client: httpx.AsyncClient, backend: Backend) -> None:
    job = make_job("alice")
    job.state = common_pb2.JOB_STATE_FAILED
    job.error_code, job.error_message, job.error_retryable = "timeout", "Generation took too long.", True
    backend.status.add_job(job)
    body = (await client.get(f"/api/v1/jobs/{job.job_id}")).json()
    assert body["status"] == "failed"
    assert body["error"] == {"code": "timeout", "message": "Generation took too long.", "retryable": True}


async def test_clips_and_versions(client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice", clips=4))
    clips = (await client.get(f"/api/v1/jobs/{job.job_id}/clips")).json()["clips"]
    assert [c["index"] for c in clips] == [0, 1, 2, 3]
    versions = (await client.get(f"/api/v1/jobs/{job.job_id}/versions")).json()
    assert versions["current_version"] == 2 and len(versions["versions"]) == 2


async def test_restore_version(client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice"))
    response = await client.post(f"/api/v1/jobs/{job.job_id}/versions/1/restore")
    assert response.status_code == 200
    assert response.json()["current_version"] == 1
    assert response.json()["video_url"] == response.json()["versions"][0]["url"]
    missing = await client.post(f"/api/v1/jobs/{job.job_id}/versions/9/restore")
    assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
    bad = await client.post(f"/api/v1/jobs/{job.job_id}/versions/zero/restore")
    assert bad.status_code == 422 and error_of(bad)["code"] == "invalid_input"


# --- regenerate -----------------------------------------------------------------------------------------


async def test_regenerate_is_queued(client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice", total_cost="1", budget_limit="10"))
    response = await client.post(f"/api/v1/jobs/{job.job_id}/clips/1/regenerate",
                                 json={"instruction": "  make it nighttime  ",
                                       "conversation_history": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued" and body["estimated_cost"] == "0.50"
    assert body["budget_warning"] is False and body["regeneration_id"]
    regen = backend.status.regenerations[job.job_id][0]
    assert regen.user_instruction == "make it nighttime" and regen.clip_index == 1
    assert list(regen.conversation_history) == [common_pb2.Turn(role="user", content="hi")]


@pytest.mark.parametrize("clips", [[], [1, 1], [False], ["1"], [-1], [100], "some", None, 2])
async def test_a_change_of_several_clips_names_each_clip_once_or_all(client: httpx.AsyncClient, backend: Backend,
                                                                     clips: object) -> None:
    job = backend.status.add_job(make_job("alice", clips=3))
    response = await client.post(f"/api/v1/jobs/{job.job_id}/regenerate",
                                 json={"instruction": "make it nighttime", "clips": clips})
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "invalid_input"
    assert not backend.status.regenerations.get(job.job_id)


@pytest.mark.parametrize("clip_index", ["3", "-1", "abc", "1.5", "99999999999"])
async def test_bad_clip_index_is_422(client: httpx.AsyncClient, backend: Backend, clip_index: str) -> None:
    job = backend.status.add_job(make_job("alice", clips=3))
    response = await client.post(f"/api/v1/jobs/{job.job_id}/clips/{clip_index}/regenerate",
                                 json={"instruction": "make it nighttime"})
    assert response.status_code == 422
    assert error_of(response)["code"] == "invalid_input"


async def test_clip_index_past_the_end_explains_the_range(client: httpx.AsyncClient,
                                                          backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice", clips=3))
    response = await client.post(f"/api/v1/jobs/{job.job_id}/clips/3/regenerate",
                                 json={"instruction": "make it nighttime"})
    assert "0 to 2" in error_of(response)["message"]


@pytest.mark.parametrize("instruction", ["", "   ", "x" * 2001])
async def test_empty_or_long_instruction_is_422(client: httpx.AsyncClient, backend: Backend,
                                                 instruction: str) -> None:
    job = backend.status.add_job(make_job("alice", total_cost="0"))
    response = await client.post(f"/api/v1/jobs/{job.job_id}/clips/0/regenerate",
                                 json={"instruction": instruction})
    assert response.status_code == 422
    assert "2000" in error_of(response)["message"]
    assert backend.status.regenerations[job.job_id] == []


async def test_instruction_at_the_limit_is_accepted(client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice", total_cost="0"))
    response = await client.post(f"/api/v1/jobs/{job.job_id}/clips/0/regenerate",
                                 json={"instruction": "x" * 2000})
    assert response.status_code == 202


@pytest.mark.parametrize("body", ['{"instruction": "make it', "not json", '["instruction"]', "{}",
                                  '{"instruction": 5}'])
async def test_malformed_body_is_422(client: httpx.AsyncClient, backend: Backend, body: str) -> None:
    job = backend.status.add_job(make_job("alice"))
    response = await client.post(f"/api/v1/jobs/{job.job_id}/clips/0/regenerate", content=body,
                                 headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert error_of(response)["code"] == "invalid_input"


async def test_malformed_json_says_so(client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice"))
    response = await client.post(f"/api/v1/jobs/{job.job_id}/clips/0/regenerate", content="{oops",
                                 headers={"Content-Type": "application/json"})
    assert error_of(response)["message"] == "The request body is not valid JSON."


@pytest.mark.parametrize("history", [[{"role": "system", "content": "x"}],
                                     [{"role": "user", "content": "x" * 4001}],
                                     [{"role": "user", "content": "x"}] * 51])
async def test_bad_conversation_history_is_422(client: httpx.AsyncClient, backend: Backend,
                                               history: list[dict[str, str]]) -> None:
    job = backend.status.add_job(make_job("alice"))
    response = await client.post(f"/api/v1/jobs/{job.job_id}/clips/0/regenerate",
                                 json={"instruction": "make it nighttime", "conversation_history": history})
    assert response.status_code == 422
    assert "conversation_history" in error_of(response)["message"]


async def test_regenerate_while_another_runs_is_409(client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice", total_cost="0"))
    first = await client.post(f"/api/v1/jobs/{job.job_id}/clips/0/regenerate", json={"instruction": "a"})
    assert first.status_code == 202
    second = await client.post(f"/api/v1/jobs/{job.job_id}/clips/1/regenerate", json={"instruction": "b"})
    assert second.status_code == 409
    error = error_of(second)
    assert error["code"] == "regeneration_in_progress" and error["retryable"] is True


async def test_regenerate_over_budget_is_402(client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice", total_cost="9.8", budget_limit="10"))
    response = await client.post(f"/api/v1/jobs/{job.job_id}/clips/0/regenerate", json={"instruction": "a"})
    assert response.status_code == 402
    assert error_of(response)["code"] == "budget_exceeded"


async def test_regenerate_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post(f"/api/v1/jobs/{UNKNOWN_JOB}/clips/0/regenerate", json={"instruction": "a"})
    assert response.status_code == 404


async def test_downstream_rate_limit_is_429(client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice"))
    limited = ClipChatError("Slow down a little.", code="rate_limited", retryable=True)
    limited.status = grpc.StatusCode.RESOURCE_EXHAUSTED
    backend.regenerator.fail["StartRegeneration"] = limited
    response = await client.post(f"/api/v1/jobs/{job.job_id}/clips/0/regenerate", json={"instruction": "a"})
    assert response.status_code == 429
    assert error_of(response) == {"code": "rate_limited", "message": "Slow down a little.", "retryable": True}


# --- cancel and history ---------------------------------------------------------------------------------


def _regeneration(job: common_pb2.Job, state: int, **fields: object) -> common_pb2.Regeneration:
    return common_pb2.Regeneration(regeneration_id=f"r-{state}", job_id=job.job_id, clip_index=1,
                                   original_prompt="a beach", user_instruction="make it nighttime",
                                   state=state, **fields)  # type: ignore[arg-type]


async def test_cancel(client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice"))
    running_regen = _regeneration(job, common_pb2.REGENERATION_STATE_RUNNING,
                                  stage=common_pb2.STAGE_GENERATING)
    backend.status.regenerations[job.job_id] += [
        running_regen, _regeneration(job, common_pb2.REGENERATION_STATE_COMPLETED)]
    job.active_regeneration_id = running_regen.regeneration_id

    cancel_path = f"/api/v1/jobs/{job.job_id}/regenerations/{running_regen.regeneration_id}/cancel"
    response = await client.post(cancel_path)
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled" and response.json()["id"] == running_regen.regeneration_id

    again = await client.post(cancel_path)
    assert again.status_code == 409 and error_of(again)["code"] == "conflict"
    finished = await client.post(f"/api/v1/jobs/{job.job_id}/regenerations/r-3/cancel")
    assert finished.status_code == 409
    for unknown in ("r-nope", "..%2F..%2Fetc"):
        missing = await client.post(f"/api/v1/jobs/{job.job_id}/regenerations/{unknown}/cancel")
        assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"


async def test_regeneration_history(client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice"))
    backend.status.regenerations[job.job_id].append(_regeneration(
        job, common_pb2.REGENERATION_STATE_FAILED, stage=common_pb2.STAGE_GENERATING, progress=0.4,
        cost="0.2100", estimated_cost="0.5000", attempts=3, error_code="generation_failed",
        error_message="The video generator is busy. Try again.", retryable=True,
        modified_prompt="a beach at night", change_summary="time of day → night", rewriter="template",
        step_costs=common_pb2.StepCosts(llm="0.0100", generation="0.2000", composition="0"),
        created_at=now_ts(), finished_at=now_ts()))
    response = await client.get(f"/api/v1/jobs/{job.job_id}/regenerations")
    assert response.status_code == 200
    row = response.json()["regenerations"][0]
    assert set(row) == {"id", "change_id", "clip_index", "instruction", "original_prompt", "modified_prompt",
                        "change_summary", "rewriter", "status", "stage", "progress", "cost", "step_costs",
                        "estimated_cost", "attempts", "error", "created_at", "finished_at"}
    assert row["status"] == "failed" and row["stage"] == "generating" and row["attempts"] == 3
    assert row["cost"] == "0.2100"
    assert row["step_costs"] == {"llm": "0.0100", "generation": "0.2000", "composition": "0"}
    assert row["error"] == {"code": "generation_failed", "message": "The video generator is busy. Try again.",
                            "retryable": True}
    assert "conversation_history" not in row


# --- dependency trouble -------------------------------------------------------------------------------


async def test_downstream_unavailable_is_503_retryable(make_settings: SettingsFactory, storage: LocalStorage,
                                                       tmp_path: Path) -> None:
    dead = "127.0.0.1:9"  # the discard port: nothing listens there
    app = create_app(make_settings(status_addr=dead, regenerator_addr=dead), storage=storage)
    async with running(app) as client:
        for method, path in (("GET", "/api/v1/jobs"), ("GET", f"/api/v1/jobs/{UNKNOWN_JOB}"),
                             ("POST", f"/api/v1/jobs/{UNKNOWN_JOB}/clips/0/regenerate")):
            response = await client.request(method, path, json={"instruction": "a"})
            assert response.status_code == 503, path
            error = error_of(response)
            assert error["retryable"] is True and error["code"] == "unavailable"
            assert "ipv4" not in error["message"].lower() and "connect" not in error["message"].lower()


async def test_domain_unavailable_is_503(client: httpx.AsyncClient, backend: Backend) -> None:
    backend.status.fail["ListJobs"] = DependencyUnavailable("The database is busy. Try again shortly.")
    response = await client.get("/api/v1/jobs")
    assert response.status_code == 503
    assert error_of(response) == {"code": "unavailable", "retryable": True,
                                  "message": "The database is busy. Try again shortly."}


async def test_unknown_downstream_failure_is_a_generic_503(client: httpx.AsyncClient,
                                                           backend: Backend) -> None:
    backend.status.fail["ListJobs"] = ClipChatError("KeyError: 'lease' at state_machine.py:42")
    response = await client.get("/api/v1/jobs")
    assert response.status_code == 503
    error = error_of(response)
    assert error["code"] == "internal" and "state_machine" not in error["message"]


# --- framework errors, rate limit, OpenAPI ---------------------------------------------------------------


async def test_unknown_route_and_wrong_method_use_the_error_shape(client: httpx.AsyncClient) -> None:
    missing = await client.get("/api/v1/nope")
    assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
    wrong = await client.delete("/api/v1/jobs")
    assert wrong.status_code == 405 and error_of(wrong)["code"] == "method_not_allowed"
    assert wrong.headers["Allow"]


async def test_rate_limit_is_429_with_retry_after(make_settings: SettingsFactory, storage: LocalStorage,
                                                  backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice"))
    async with running(create_app(make_settings(rate_limit_per_minute=2), storage=storage)) as client:
        statuses = [(await client.post(f"/api/v1/jobs/{job.job_id}/versions/1/restore")).status_code
                    for _ in range(3)]
        assert statuses == [200, 200, 429]
        limited = await client.post(f"/api/v1/jobs/{job.job_id}/versions/1/restore")
        assert error_of(limited)["code"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1
        # Reads are not limited, and other owners have their own bucket.
        assert (await client.get(f"/api/v1/jobs/{job.job_id}")).status_code == 200
        other = await client.post(f"/api/v1/jobs/{job.job_id}/versions/1/restore",
                                  headers={"Authorization": f"Bearer {BOB}"})
        assert other.status_code == 404


def test_token_bucket_refills() -> None:
    now = [0.0]
    limiter = TokenBucketLimiter(60, clock=lambda: now[0])
    assert all(limiter.acquire("a") is None for _ in range(60))
    assert limiter.acquire("a") == 1
    now[0] += 1.0
    assert limiter.acquire("a") is None
    assert limiter.acquire("b") is None
    assert TokenBucketLimiter(0).acquire("a") is None


async def test_openapi_lists_every_route(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    expected = {
        ("get", "/api/v1/healthz"), ("get", "/api/v1/readyz"), ("post", "/api/v1/jobs"),
        ("get", "/api/v1/jobs"), ("get", "/api/v1/jobs/{job_id}"), ("get", "/api/v1/jobs/{job_id}/clips"),
        ("post", "/api/v1/jobs/{job_id}/clips/{clip_index}/regenerate"),
        ("post", "/api/v1/jobs/{job_id}/regenerations/{regeneration_id}/cancel"),
        ("get", "/api/v1/jobs/{job_id}/regenerations"), ("get", "/api/v1/jobs/{job_id}/versions"),
        ("post", "/api/v1/jobs/{job_id}/versions/{version}/restore"), ("get", "/api/v1/jobs/{job_id}/events"),
        ("get", "/api/v1/media/{key}"), ("get", "/api/v1/jobs/{job_id}/estimate"),
    }
    listed = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    assert expected <= listed
    regenerate = spec["paths"]["/api/v1/jobs/{job_id}/clips/{clip_index}/regenerate"]["post"]
    assert {"402", "409", "422", "503"} <= set(regenerate["responses"])
    assert "ErrorResponse" in spec["components"]["schemas"]
    assert "multipart/form-data" in spec["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]


# --- the page -----------------------------------------------------------------------------------------


async def test_page_embeds_the_page_token(make_settings: SettingsFactory, storage: LocalStorage) -> None:
    async with running(create_app(make_settings(page_token='demo"<x>'), storage=storage)) as client:
        page = await client.get("/", headers={"Authorization": ""})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<meta name="clipchat-token" content="demo&quot;&lt;x&gt;">' in page.text
        assert (await client.get("/static/app.js")).status_code == 200
        assert (await client.get("/static/style.css")).status_code == 200


async def test_page_without_a_page_token_asks_for_one(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and 'name="clipchat-token"' not in page.text
    assert 'id="sign-in"' in page.text and 'id="video"' in page.text
