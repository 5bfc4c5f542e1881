"""Distributed mode end to end: PostgreSQL, RabbitMQ, moto S3, each service its own process."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import RunningClipChat, post_at_once, wait_for_idle, wait_for_job, wait_for_version
from tests.e2e.test_embedded import DEMO_SECONDS, assert_playable_1080p, download

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.s3]


@pytest.fixture(scope="module")
def demo(distributed: RunningClipChat, distributed_demo: str) -> dict:
    """The session's distributed demo job as this module finds it: composed, no change running (the
    trace and metrics tests regenerate it too, so its version depends on which ran first)."""
    with distributed.client() as client:
        return wait_for_idle(distributed, client, distributed_demo)


def test_regenerate_through_the_gateway(distributed: RunningClipChat, demo: dict, tmp_path: Path) -> None:
    """A change publishes the next version; the one before it still serves the same bytes."""
    assert demo["status"] == "completed", demo
    with distributed.client() as client:
        v1 = client.get(demo["video_url"], follow_redirects=True)
        assert v1.status_code == 200
        v1_sha = hashlib.sha256(v1.content).hexdigest()
        before = demo["current_version"]
        started = client.post(f"/api/v1/jobs/{demo['id']}/clips/2/regenerate",
                              json={"instruction": "make it nighttime"})
        assert started.status_code == 202, started.text
        assert started.json()["status"] == "queued"
        job = wait_for_version(distributed, client, demo["id"], before + 1)
        assert job["status"] == "completed" and job["current_version"] == before + 1, job
        assert "night" in job["clips"][2]["prompt"]
        versions = client.get(f"/api/v1/jobs/{demo['id']}/versions").json()["versions"]
        old = next(v for v in versions if v["version"] == before)
        again = client.get(old["url"], follow_redirects=True)
        assert hashlib.sha256(again.content).hexdigest() == v1_sha
        assert_playable_1080p(download(client, job["video_url"], tmp_path / "v2.mp4"), DEMO_SECONDS)
        history = client.get(f"/api/v1/jobs/{demo['id']}/regenerations").json()["regenerations"]
        assert history[0]["status"] == "completed"


def test_twenty_concurrent_regenerations_on_postgres(distributed: RunningClipChat, demo: dict) -> None:
    with distributed.client() as client:
        wait_for_job(client, demo["id"], {"completed", "failed"})
    codes = post_at_once(distributed, demo["id"], 0, "make it snowy")
    assert sorted(codes) == [202] + [409] * 19, codes
    with distributed.client() as client:
        job = client.get(f"/api/v1/jobs/{demo['id']}").json()
        if job["active_regeneration_id"]:
            client.post(f"/api/v1/jobs/{demo['id']}/regenerations/{job['active_regeneration_id']}/cancel")
        final = wait_for_job(client, demo["id"], {"completed", "failed"})
        assert final["current_version"] >= 1


def test_the_gateway_shows_the_composer_process_encoder(distributed: RunningClipChat, demo: dict) -> None:
    composer = httpx.get(f"{distributed.url}/api/v1/readyz", timeout=10).json()["composer"]
    assert composer["state"] == "ok" and composer["encoder_reason"]
    with distributed.client() as client:
        versions = client.get(f"/api/v1/jobs/{demo['id']}/versions").json()["versions"]
    assert {version["encoder"] for version in versions} == {composer["encoder"]}
    # The composer process has composed the demo job by now: its cache counted the segments.
    assert composer["cache"]["stores"] > 0
