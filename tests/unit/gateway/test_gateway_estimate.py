"""``GET /jobs/{id}/estimate?clips=…``: the gateway in front of the real regenerator servicer (over
real gRPC) and the rig's fake status service: the quote of a change, its 422s, 404s and document."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from clipchat.rpc import create_server
from clipchat.settings import Settings
from clipchat.status_client import StatusClient
from clipchat.storage.local import LocalStorage
from gateway.app import create_app
from gateway.routes.regenerations import CLIPS_PATTERN
from services.regenerator import server as regenerator_server
from services.regenerator.generator import GeneratedClip
from tests.unit.gateway.gateway_rig import BOB, Backend, SettingsFactory, error_of, make_job, running


class PricedGenerator:
    """0.05 a second of clip; only ever asked for its price (an estimate generates nothing)."""

    name = "priced"

    def estimate_cost(self, duration: float) -> Decimal:
        return Decimal("0.05") * Decimal(str(duration))

    async def generate(self, prompt: str, duration: float, dest: Path, **_: object) -> GeneratedClip:
        raise AssertionError("an estimate generates nothing")


@pytest.fixture
async def regenerator_addr(backend: Backend) -> AsyncIterator[str]:
    """The real regenerator servicer, asking the rig's fake status; at most 3 clips a change."""
    settings = Settings(max_clips_per_change=3)
    status = StatusClient(backend.status_addr, deadline=5, settings=settings)
    servicer = regenerator_server.RegeneratorServicer(status=status, generator=PricedGenerator(), settings=settings)
    server = await create_server([(regenerator_server.add_to_server, servicer, regenerator_server.SERVICE_NAME)],
                                 settings=settings)
    yield f"127.0.0.1:{server.port}"
    await server.stop(0)
    await status.close()


@pytest.fixture
async def api(make_settings: SettingsFactory, storage: LocalStorage,
              regenerator_addr: str) -> AsyncIterator[httpx.AsyncClient]:
    # One request a minute: reads are not rate limited, so the estimates below never meet it.
    settings = make_settings(regenerator_addr=regenerator_addr, rate_limit_per_minute=1)
    async with running(create_app(settings, storage=storage)) as client:
        yield client


async def test_the_estimate_of_one_clip_several_and_all(api: httpx.AsyncClient, backend: Backend) -> None:
    # Three clips of 2 s (a 6-s video), 8.50 spent of a budget of 10, warning from 8.00.
    job = backend.status.add_job(make_job("alice"))
    one = await api.get(f"/api/v1/jobs/{job.job_id}/estimate", params={"clips": "2"})
    assert one.status_code == 200, one.text
    assert one.json() == {
        "estimated_cost": "0.1060",
        "clips": [{"clip_index": 2, "step_costs": {"rewrite": "0.0000", "generate": "0.1000", "compose": "0.0060"}}],
        "budget_left": "1.5000", "within_budget": True, "budget_warning": True}
    several = (await api.get(f"/api/v1/jobs/{job.job_id}/estimate?clips=2,0")).json()
    assert [(c["clip_index"], sorted(c["step_costs"])) for c in several["clips"]] == [
        (0, ["compose", "generate", "rewrite"]), (2, ["generate", "rewrite"])]
    assert several["estimated_cost"] == "0.2060"
    every = (await api.get(f"/api/v1/jobs/{job.job_id}/estimate?clips=all")).json()
    assert [c["clip_index"] for c in every["clips"]] == [0, 1, 2] and every["estimated_cost"] == "0.3060"
    # Nothing was started, and ten more reads are not held back by the limit of one request a minute.
    assert backend.status.regenerations[job.job_id] == [] and not job.active_regeneration_id
    for _ in range(10):
        assert (await api.get(f"/api/v1/jobs/{job.job_id}/estimate?clips=1")).status_code == 200


async def test_a_change_past_the_budget_is_not_within_it(api: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice", total_cost="9.9000"))
    body = (await api.get(f"/api/v1/jobs/{job.job_id}/estimate?clips=0,1")).json()
    assert (body["estimated_cost"], body["budget_left"]) == ("0.2060", "0.1000")
    assert (body["within_budget"], body["budget_warning"]) == (False, True)
    fresh = backend.status.add_job(make_job("alice", total_cost="0"))
    body = (await api.get(f"/api/v1/jobs/{fresh.job_id}/estimate?clips=0")).json()
    assert (body["budget_left"], body["within_budget"], body["budget_warning"]) == ("10.0000", True, False)


@pytest.mark.parametrize(("clips", "code", "says"), [
    ("", "invalid_input", "Name the clips"),
    ("two", "invalid_input", "clip positions from 0"),
    ("1,,2", "invalid_input", "clip positions from 0"),
    (" 1", "invalid_input", "clip positions from 0"),
    ("-1", "invalid_input", "start at 0"),
    ("1,1", "invalid_input", "each clip once"),
    ("100", "invalid_input", "positions 0 to 99"),
    (",".join(str(i % 100) for i in range(101)), "invalid_input", "at most 100 clips"),
    ("3", "clip_index_out_of_range", "clips 0 to 2"),  # past the job's last clip: the regenerator knows it
    ("0,1,2,3", "too_many_clips", "at most 3 clips"),  # the regenerator's CLIPCHAT_MAX_CLIPS_PER_CHANGE
])
async def test_clips_that_name_no_clips_of_the_job_are_422(api: httpx.AsyncClient, backend: Backend, clips: str,
                                                           code: str, says: str) -> None:
    job = backend.status.add_job(make_job("alice", clips=3))
    response = await api.get(f"/api/v1/jobs/{job.job_id}/estimate", params={"clips": clips})
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == code and says in error["message"] and not error["retryable"]


async def test_no_clips_at_all_is_422(api: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice"))
    response = await api.get(f"/api/v1/jobs/{job.job_id}/estimate")
    assert response.status_code == 422 and "clips is required" in error_of(response)["message"]


async def test_an_unknown_job_or_another_owners_is_404_and_no_token_is_401(api: httpx.AsyncClient,
                                                                          backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice"))
    for path, headers in [("/api/v1/jobs/00000000-0000-0000-0000-000000000000/estimate?clips=0", {}),
                          ("/api/v1/jobs/not-a-job/estimate?clips=0", {}),
                          (f"/api/v1/jobs/{job.job_id}/estimate?clips=0", {"Authorization": f"Bearer {BOB}"})]:
        response = await api.get(path, headers=headers)
        assert response.status_code == 404 and error_of(response)["code"] == "not_found", path
    # Authentication comes first: a bad selection without a token is a 401, not a 422.
    response = await api.get(f"/api/v1/jobs/{job.job_id}/estimate?clips=1,1", headers={"Authorization": ""})
    assert response.status_code == 401 and error_of(response)["code"] == "unauthenticated"


async def test_the_document_describes_the_estimate(api: httpx.AsyncClient) -> None:
    document = (await api.get("/openapi.json")).json()
    operation = document["paths"]["/api/v1/jobs/{job_id}/estimate"]["get"]
    assert operation["summary"] == "What a change of clips would cost"
    assert set(operation["responses"]) == {"200", "401", "404", "422", "429", "503"}
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/EstimateOut"}
    [clips] = [p for p in operation["parameters"] if p["name"] == "clips"]
    assert clips["required"] and clips["in"] == "query" and clips["schema"]["pattern"] == CLIPS_PATTERN
    schemas = document["components"]["schemas"]
    assert set(schemas["EstimateOut"]["required"]) == {"estimated_cost", "clips", "budget_left", "within_budget",
                                                       "budget_warning"}
    assert schemas["ClipEstimateOut"]["properties"]["step_costs"]["additionalProperties"] == {"type": "string"}
