"""Version compare and usage through the gateway: JSON shape, signed URLs, errors, owner isolation."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest

from clipchat.errors import DependencyUnavailable
from tests.unit.gateway.gateway_rig import BOB, Backend, error_of, make_job


async def test_compare_lists_the_differing_clips_with_prompts_signed_urls_changes_and_cost(
        client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice"))
    response = await client.get(f"/api/v1/jobs/{job.job_id}/versions/1/compare/2")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["from_version"], body["to_version"], body["cost"]) == (1, 2, "0.5000")
    [clip] = body["clips"]
    assert (clip["index"], clip["revision_before"], clip["revision_after"]) == (0, 0, 1)
    assert (clip["prompt_before"], clip["prompt_after"]) == ("the first prompt", "prompt 0")
    assert "sig=" in clip["video_url_after"] and "sig=" in clip["thumbnail_url_after"]
    assert clip["thumbnail_url_before"] is None
    [change] = body["changes"]
    assert change == {**change, "id": "r-1", "clip_index": 0, "instruction": "make it nighttime",
                      "status": "completed", "cost": "0.5000", "version": 2}
    assert change["step_costs"] == {"llm": "0.0100", "generation": "0.4000", "composition": "0.0900"}


async def test_compare_refuses_the_same_version_and_bad_numbers_and_names_a_missing_version(
        client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice"))
    base = f"/api/v1/jobs/{job.job_id}/versions"
    for path in ("2/compare/2", "0/compare/1", "1/compare/x", "-1/compare/2", f"1/compare/{2**31}"):
        response = await client.get(f"{base}/{path}")
        assert response.status_code == 422 and error_of(response)["code"] == "invalid_input", path
    missing = await client.get(f"{base}/1/compare/7")
    assert missing.status_code == 404 and "version 7" in error_of(missing)["message"]


async def test_another_owners_job_is_404_for_compare_and_usage(client: httpx.AsyncClient,
                                                                 backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice"))
    other = {"Authorization": f"Bearer {BOB}"}
    for path in (f"/api/v1/jobs/{job.job_id}/versions/1/compare/2", f"/api/v1/jobs/{job.job_id}/usage",
                 "/api/v1/jobs/not-a-uuid/usage"):
        response = await client.get(path, headers=other)
        assert response.status_code == 404 and error_of(response)["code"] == "not_found", path
    mine = (await client.get("/api/v1/usage", headers=other)).json()
    assert (mine["jobs"], mine["total_cost"]) == (0, "0")


async def test_usage_of_one_job_and_of_all_the_callers_jobs(client: httpx.AsyncClient, backend: Backend) -> None:
    first = backend.status.add_job(make_job("alice", total_cost="8.5000"))
    backend.status.add_job(make_job("alice", total_cost="1.2500"))
    backend.status.add_job(make_job("bob", total_cost="3.0000"))
    one = (await client.get(f"/api/v1/jobs/{first.job_id}/usage")).json()
    assert (one["job_id"], one["jobs"], one["total_cost"]) == (first.job_id, 1, "8.5000")
    steps = one["spend_by_step"]
    assert sum(Decimal(v) for v in steps.values()) == Decimal(one["total_cost"])
    assert one["median_seconds_by_stage"] == [{"stage": "generating", "median_seconds": 4.5, "samples": 2}]
    assert set(one["changes"]) == {"completed", "failed", "cancelled", "running"}
    everything = (await client.get("/api/v1/usage")).json()
    assert (everything["job_id"], everything["jobs"], everything["total_cost"]) == (None, 2, "9.7500")


@pytest.mark.parametrize("path", ["/api/v1/usage", "/api/v1/jobs/{job}/usage",
                                  "/api/v1/jobs/{job}/versions/1/compare/2"])
async def test_a_status_service_that_is_down_is_503(client: httpx.AsyncClient, backend: Backend, path: str) -> None:
    job = backend.status.add_job(make_job("alice"))
    backend.status.fail["GetUsage"] = backend.status.fail["CompareVersions"] = DependencyUnavailable("database")
    response = await client.get(path.format(job=job.job_id))
    assert response.status_code == 503 and error_of(response)["retryable"] is True


async def test_the_document_describes_compare_and_usage(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    compare = paths["/api/v1/jobs/{job_id}/versions/{a}/compare/{b}"]["get"]
    assert {"200", "404", "422"} <= set(compare["responses"])
    assert {"200", "401"} <= set(paths["/api/v1/usage"]["get"]["responses"])
    assert {"200", "404"} <= set(paths["/api/v1/jobs/{job_id}/usage"]["get"]["responses"])
