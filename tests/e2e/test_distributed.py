"""Distributed mode end to end: PostgreSQL, RabbitMQ, moto S3, each service its own process."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import RunningClipChat, post_at_once, wait_for_job
from tests.e2e.test_embedded import DEMO_SECONDS, assert_playable_1080p, download

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.s3]


@pytest.fixture(scope="module")
def demo(distributed: RunningClipChat) -> dict:
    created = distributed.cli("demo")
    assert created.returncode == 0, created.stdout + created.stderr
    job_id = created.stdout.split()[0]
    with distributed.client() as client:
        return wait_for_job(client, job_id, {"completed", "failed"})


def test_regenerate_through_the_gateway(distributed: RunningClipChat, demo: dict, tmp_path: Path) -> None:
    assert demo["status"] == "completed", demo
    with distributed.client() as client:
        v1 = client.get(demo["video_url"], follow_redirects=True)
        assert v1.status_code == 200
        v1_sha = hashlib.sha256(v1.content).hexdigest()
        started = client.post(f"/api/v1/jobs/{demo['id']}/clips/2/regenerate",
                              json={"instruction": "make it nighttime"})
        assert started.status_code == 202, started.text
        assert started.json()["status"] == "queued"
        job = wait_for_job(client, demo["id"], {"completed", "failed"})
        deadline = time.monotonic() + 300
        while job["current_version"] == 1 and job["status"] != "failed" and time.monotonic() < deadline:
            time.sleep(0.3)
            job = client.get(f"/api/v1/jobs/{demo['id']}").json()
        assert job["status"] == "completed" and job["current_version"] == 2, job
        assert "night" in job["clips"][2]["prompt"]
        versions = client.get(f"/api/v1/jobs/{demo['id']}/versions").json()["versions"]
        old = next(v for v in versions if v["version"] == 1)
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
