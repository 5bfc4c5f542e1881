"""Regenerations through the Replicate and fal adapters, end to end: ``clipchat up`` configured for
each provider and pointed at a local fake of its API (written from the provider's reference).

One running system per provider and one small job (three 1-second clips); its clips are
regenerated one after another: the happy path after a 429 with Retry-After (cost to the cent,
output from the CDN host), a failed prediction, a cancel (received by the provider), an output on
a foreign host (refused).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import CLIPCHAT, RunningClipChat, base_env, start_process, wait_for_job, wait_until
from tests.e2e.rig import (
    CLIP_PROMPTS,
    CLIP_SECONDS,
    get_job,
    money,
    regenerate,
    render_job_media,
    wait_for,
    wait_regeneration,
)
from tests.fakes import fal_server, replicate_server
from tests.fakes.fal_server import FalServer
from tests.fakes.prediction_server import PredictionServer
from tests.fakes.replicate_server import ReplicateServer
from tests.processes import stop_process

TEMPLATE = "make it nighttime"  # handled by the templates: no LLM is configured


@dataclass
class ProviderSystem:
    name: str
    fake: PredictionServer
    system: RunningClipChat
    generation_cost: Decimal  # what one clip must cost, to the cent
    media: list[Path]  # the job's clips, then its audio track


# Replicate prices by compute time here (12.5 s × 0.0014 = 0.0175), fal by the clip's length
# (1 s × 0.05 = 0.0500): the two ways a provider's cost is recorded.
CASES: dict[str, tuple[type[PredictionServer], str, dict[str, str], Decimal]] = {
    "replicate": (ReplicateServer, replicate_server.MODEL,
                  {"CLIPCHAT_GENERATOR_PRICE_PER_COMPUTE_SECOND": "0.0014"}, Decimal("0.0175")),
    "fal": (FalServer, fal_server.MODEL, {"CLIPCHAT_GENERATION_PRICE_PER_SECOND": "0.05"}, Decimal("0.0500")),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def provider(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             ffmpeg_exe: str) -> Iterator[ProviderSystem]:
    name: str = request.param
    fake_class, model, prices, cost = CASES[name]
    data_dir = tmp_path_factory.mktemp(f"provider-{name}")
    media = render_job_media(data_dir / "media", ffmpeg_exe)
    fake = fake_class(video=media[0].read_bytes(), steps=2)
    port = free_port()
    env = base_env(data_dir)
    env.update({
        "CLIPCHAT_GENERATOR": name, "CLIPCHAT_GENERATOR_URL": "", "CLIPCHAT_GENERATOR_API_TOKEN": "test-token",
        "CLIPCHAT_GENERATOR_MODEL": model, "CLIPCHAT_GENERATOR_OUTPUT_HOSTS": "localhost",
        "CLIPCHAT_GENERATOR_ALLOW_HTTP_LOOPBACK": "true",
        "CLIPCHAT_GENERATOR_POLL_INITIAL_SECONDS": "0.05", "CLIPCHAT_GENERATOR_POLL_MAX_SECONDS": "0.1",
        "CLIPCHAT_GENERATOR_REQUEST_TIMEOUT_SECONDS": "5",
        "CLIPCHAT_RETRY_BASE_SECONDS": "0.05", "CLIPCHAT_RETRY_MAX_SECONDS": "0.5",
        "CLIPCHAT_LLM_BASE_URL": "", **prices,
    })
    output: list[str] = []
    fake.start()
    env["CLIPCHAT_GENERATOR_URL"] = fake.url
    proc = start_process([CLIPCHAT, "up", "--no-demo", "--port", str(port)], env, output)
    try:
        wait_until(lambda: any("ClipChat is running" in line for line in output), "clipchat up", [proc], output)
        system = RunningClipChat(f"http://127.0.0.1:{port}", "e2e-token", data_dir, env, output)
        yield ProviderSystem(name, fake, system, cost, media)
    finally:
        stop_process(proc)
        fake.stop()


@pytest.fixture(scope="module")
def job_id(provider: ProviderSystem) -> str:
    """A three-clip job, composed once (``POST /jobs``)."""
    clips, audio = provider.media[:-1], provider.media[-1]
    manifest = {"title": "providers", "aspect_ratio": "16:9", "beat_timestamps": [0.5, 1.5],
                "clips": [{"prompt": prompt, "duration": CLIP_SECONDS} for prompt in CLIP_PROMPTS],
                "transitions": [{"kind": "cut", "duration": 0} for _ in CLIP_PROMPTS[1:]]}
    files = [("clips", (path.name, path.read_bytes(), "video/mp4")) for path in clips]
    files.append(("audio", (audio.name, audio.read_bytes(), "audio/mp4")))
    with provider.system.client() as client:
        created = client.post("/api/v1/jobs", data={"manifest": json.dumps(manifest)}, files=files)
        assert created.status_code == 202, created.text
        done = wait_for_job(client, created.json()["id"], {"completed", "failed"})
    assert done["status"] == "completed", done
    return str(done["id"])


@pytest.fixture
def client(provider: ProviderSystem) -> Iterator[httpx.Client]:
    with provider.system.client() as http:
        yield http


def finish(client: httpx.Client, job_id: str, clip_index: int) -> dict[str, Any]:
    accepted = regenerate(client, job_id, clip_index, TEMPLATE)
    return wait_regeneration(client, job_id, accepted["regeneration_id"])


def test_a_regeneration_after_a_429_costs_what_the_provider_reported(
        provider: ProviderSystem, job_id: str, client: httpx.Client) -> None:
    fake = provider.fake
    before = len(fake.creates)
    fake.script(create=["429:1"])

    row = finish(client, job_id, 1)

    assert row["status"] == "completed", (row, "".join(provider.system.output[-40:]))
    first, second = fake.creates[before:]
    assert second.at - first.at >= 0.9  # the provider's Retry-After was honoured
    body = second.body["input"] if provider.name == "replicate" else second.body
    assert body["prompt"] == row["modified_prompt"] and "night" in body["prompt"]
    assert body["duration"] in (5, "5")  # the model's shortest length that covers the 1 s clip
    assert money(row["step_costs"]["generation"]) == provider.generation_cost
    assert money(row["step_costs"]["llm"]) == 0
    assert money(row["cost"]) == sum(money(v) for v in row["step_costs"].values())
    download = fake.downloads[-1]
    assert download.headers["host"].startswith("localhost:") and "authorization" not in download.headers
    job = get_job(client, job_id)
    assert job["clips"][1]["prompt"] == row["modified_prompt"] and job["current_version"] >= 2


def test_a_failed_prediction_fails_the_regeneration(
        provider: ProviderSystem, job_id: str, client: httpx.Client) -> None:
    failure = {"replicate": "failed:The model rejected the input prompt",
               "fal": "failed:model_error:The model rejected the input prompt"}[provider.name]
    provider.fake.script(poll=[failure])
    downloads = len(provider.fake.downloads)

    row = finish(client, job_id, 2)

    assert row["status"] == "failed" and row["error"]["code"] == "invalid_prompt", row
    assert money(row["step_costs"]["generation"]) == 0
    assert len(provider.fake.downloads) == downloads


def test_cancel_reaches_the_provider(provider: ProviderSystem, job_id: str, client: httpx.Client) -> None:
    fake = provider.fake
    cancels = len(fake.cancels)
    polls = len(fake.polls)
    fake.script(poll=["ok", "stall"])
    accepted = regenerate(client, job_id, 0, TEMPLATE)
    wait_for(lambda: len(fake.polls) >= polls + 2, "the prediction to be polled")

    cancelled = client.post(f"/api/v1/jobs/{job_id}/regenerations/{accepted['regeneration_id']}/cancel")

    assert cancelled.status_code == 200, cancelled.text
    [remote] = wait_for(lambda: fake.cancels[cancels:], "the remote cancel", limit=30)
    assert remote.prediction_id == fake.polls[-1].prediction_id
    assert remote.headers["authorization"].endswith(" test-token")
    row = wait_regeneration(client, job_id, accepted["regeneration_id"])
    assert row["status"] == "cancelled"
    fake.clear_script()


def test_an_output_on_a_foreign_host_is_refused(provider: ProviderSystem, job_id: str, client: httpx.Client) -> None:
    fake = provider.fake
    downloads = len(fake.downloads)
    fake.output_url = f"http://127.0.0.2:{fake.url.rsplit(':', 1)[1]}/files/elsewhere.mp4"
    try:
        row = finish(client, job_id, 2)
    finally:
        fake.output_url = None

    assert row["status"] == "failed", row
    assert len(fake.downloads) == downloads  # never fetched
    assert any("generation.output_url_refused" in line for line in provider.system.output)
