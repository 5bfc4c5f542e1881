"""Embedded mode end to end, as ``make run`` starts it: the demo job, a regeneration, bad input."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import av
import httpx
import pytest

from tests.e2e.conftest import RunningClipChat, post_at_once, wait_for_job

DEMO_SECONDS = 24.0


def demo_job(system: RunningClipChat) -> dict:
    with system.client() as client:
        jobs = client.get("/api/v1/jobs").json()["jobs"]
        assert len(jobs) == 1, jobs
        return wait_for_job(client, jobs[0]["id"], {"completed", "failed"})


def download(client: httpx.Client, url: str, dest: Path) -> Path:
    response = client.get(url, follow_redirects=True)
    assert response.status_code == 200, response.text[:200]
    dest.write_bytes(response.content)
    return dest


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_playable_1080p(path: Path, expected_seconds: float) -> None:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0]
        assert video.codec_context.name == "h264"
        assert (video.codec_context.width, video.codec_context.height) == (1920, 1080)
        assert video.average_rate == Fraction(30)
        assert audio.codec_context.name == "aac"
        frames = sum(1 for _ in container.decode(video=0))
    assert abs(frames / 30 - expected_seconds) <= 1 / 30 + 1e-9
    with av.open(str(path)) as container:
        assert container.duration is not None
        assert abs(container.duration / 1_000_000 - expected_seconds) <= 1 / 30 + 0.03


def test_demo_job_is_composed_and_playable(embedded: RunningClipChat, tmp_path: Path) -> None:
    job = demo_job(embedded)
    assert job["status"] == "completed", job
    assert job["current_version"] == 1
    assert len(job["clips"]) >= 6
    with embedded.client() as client:
        video = download(client, job["video_url"], tmp_path / "v1.mp4")
        page = client.get("/")
        assert page.status_code == 200 and "<video" in page.text
    assert_playable_1080p(video, DEMO_SECONDS)


def test_readiness_shows_the_encoder_the_versions_were_made_with(embedded: RunningClipChat) -> None:
    job = demo_job(embedded)
    ready = httpx.get(f"{embedded.url}/api/v1/readyz", timeout=10)
    assert ready.status_code == 200
    composer = ready.json()["composer"]
    assert composer["state"] == "ok"
    assert composer["encoder"] in ("libx264", "h264_nvenc") and composer["encoder_reason"]
    assert composer["x264_preset"] and composer["workers"] >= 1
    with embedded.client() as client:
        versions = client.get(f"/api/v1/jobs/{job['id']}/versions").json()["versions"]
    assert versions[0]["encoder"] == composer["encoder"]

    shown = embedded.cli("health")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[:5] == ["status       ok", "regenerator  ok", "storage      ok", "database     ok", "broker       ok"]
    assert lines[5].startswith(f"composer     ok  {composer['encoder']} (") and composer["encoder_reason"] in lines[5]
    assert "segment cache:" in lines[6] and lines[-1] == "ready"


def test_cli_regenerate_publishes_new_version_and_keeps_the_old(embedded: RunningClipChat,
                                                                 tmp_path: Path) -> None:
    job = demo_job(embedded)
    with embedded.client() as client:
        before = client.get(f"/api/v1/jobs/{job['id']}/versions").json()["versions"]
        old = before[-1]
        old_bytes = client.get(old["url"], follow_redirects=True).content
        result = embedded.cli("regenerate", job["id"], "2", "make it nighttime", "--watch")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "completed" in result.stdout
        after = client.get(f"/api/v1/jobs/{job['id']}").json()
        assert after["status"] == "completed"
        assert after["current_version"] == old["version"] + 1
        assert "night" in after["clips"][2]["prompt"]
        versions = client.get(f"/api/v1/jobs/{job['id']}/versions").json()["versions"]
        kept = next(v for v in versions if v["version"] == old["version"])
        assert sha256(client.get(kept["url"], follow_redirects=True).content) == sha256(old_bytes)
        new = download(client, after["video_url"], tmp_path / "new.mp4")
        history = client.get(f"/api/v1/jobs/{job['id']}/regenerations").json()["regenerations"]
        assert history[0]["status"] == "completed" and history[0]["instruction"] == "make it nighttime"
    assert_playable_1080p(new, DEMO_SECONDS)


def test_twenty_concurrent_regenerations_admit_one(embedded: RunningClipChat) -> None:
    job = demo_job(embedded)
    codes = post_at_once(embedded, job["id"], 1, "make it rainy")
    assert sorted(codes) == [202] + [409] * 19, codes
    with embedded.client() as client:
        current = client.get(f"/api/v1/jobs/{job['id']}").json()
        regeneration_id = current["active_regeneration_id"]
        assert regeneration_id
        cancelled = client.post(f"/api/v1/jobs/{job['id']}/regenerations/{regeneration_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        again = client.post(f"/api/v1/jobs/{job['id']}/regenerations/{regeneration_id}/cancel")
        assert again.status_code == 409
        assert again.json()["error"]["code"]
        after = client.get(f"/api/v1/jobs/{job['id']}").json()
        assert after["status"] == "completed"
        assert after["current_version"] == current["current_version"]


@pytest.mark.parametrize(("path_clip", "body", "status"), [
    ("abc", {"instruction": "make it nighttime"}, 422),
    ("-1", {"instruction": "make it nighttime"}, 422),
    ("99", {"instruction": "make it nighttime"}, 422),
    ("0", {"instruction": ""}, 422),
    ("0", {"instruction": "   "}, 422),
    ("0", {"instruction": "x" * 2001}, 422),
    ("0", {}, 422),
])
def test_bad_regenerate_requests_get_clear_errors(embedded: RunningClipChat, path_clip: str, body: dict,
                                                  status: int) -> None:
    job = demo_job(embedded)
    with embedded.client() as client:
        response = client.post(f"/api/v1/jobs/{job['id']}/clips/{path_clip}/regenerate", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and "Traceback" not in error["message"]
    assert set(error) >= {"code", "message", "retryable"}


def test_other_bad_input(embedded: RunningClipChat) -> None:
    job = demo_job(embedded)
    with embedded.client() as client:
        unknown = client.get("/api/v1/jobs/00000000-0000-0000-0000-000000000000")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"]
        assert client.get("/api/v1/jobs/not-a-uuid").status_code == 404
        malformed = client.post(f"/api/v1/jobs/{job['id']}/clips/0/regenerate", content=b"{not json",
                                headers={"Content-Type": "application/json"})
        assert malformed.status_code == 422 and malformed.json()["error"]["message"]
        cancel = client.post(f"/api/v1/jobs/{job['id']}/regenerations/00000000-0000-0000-0000-000000000000/cancel")
        assert cancel.status_code == 404
        finished = client.get(f"/api/v1/jobs/{job['id']}/regenerations").json()["regenerations"]
        done = [r for r in finished if r["status"] in ("completed", "cancelled", "failed")]
        if done:
            assert client.post(f"/api/v1/jobs/{job['id']}/regenerations/{done[0]['id']}/cancel").status_code == 409
    other = httpx.get(f"{embedded.url}/api/v1/jobs/{job['id']}", headers={"Authorization": "Bearer other-token"})
    assert other.status_code == 404
    assert httpx.get(f"{embedded.url}/api/v1/jobs").status_code == 401


@pytest.mark.parametrize(("args", "needle"), [
    (["regenerate", "JOB", "abc", "make it nighttime"], "a list such as \"1,2,3\" or \"all\""),
    (["regenerate", "JOB", "-1", "make it nighttime"], ""),
    (["regenerate", "JOB", "99", "make it nighttime"], "out of range"),
    (["regenerate", "JOB", "1,1", "make it rainy"], "each clip once"),
    (["regenerate", "JOB", "0,99", "make it rainy"], "Clip index 99 is out of range"),
    (["regenerate", "JOB", "0", ""], ""),
    (["regenerate", "00000000-0000-0000-0000-000000000000", "0", "make it nighttime"], ""),
    (["watch", "00000000-0000-0000-0000-000000000000"], ""),
])
def test_cli_mistakes_print_one_line(embedded: RunningClipChat, args: list[str], needle: str) -> None:
    job = demo_job(embedded)
    result = embedded.cli(*[job["id"] if a == "JOB" else a for a in args])
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "Traceback" not in result.stderr
    assert needle in lines[0]


def test_sse_resumes_after_last_event_id(embedded: RunningClipChat) -> None:
    job = demo_job(embedded)

    def read(after: int | None, count: int) -> list[dict]:
        headers = {"Authorization": f"Bearer {embedded.token}"}
        if after is not None:
            headers["Last-Event-ID"] = str(after)
        events: list[dict] = []
        with httpx.stream("GET", f"{embedded.url}/api/v1/jobs/{job['id']}/events", headers=headers,
                          timeout=httpx.Timeout(30, read=30)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            current: dict = {}
            for line in response.iter_lines():
                if line.startswith("id:"):
                    current["id"] = int(line[3:].strip())
                elif line.startswith("data:"):
                    current["data"] = json.loads(line[5:].strip())
                elif line == "" and "id" in current:
                    events.append(current)
                    current = {}
                    if len(events) == count:
                        break
        return events

    everything = read(None, 6)
    assert [e["id"] for e in everything] == list(range(1, 7))
    resumed = read(3, 3)
    assert [e["id"] for e in resumed] == [4, 5, 6]
    assert [e["data"] for e in resumed] == [e["data"] for e in everything[3:]]


def test_cli_lists_the_jobs(embedded: RunningClipChat) -> None:
    job = demo_job(embedded)
    listed = embedded.cli("jobs")
    assert listed.returncode == 0, listed.stderr
    [line] = listed.stdout.splitlines()
    assert line.startswith(f"{job['id']}  completed")


# Last in this module: it regenerates the demo job, which the tests above expect at version 1.
COMPARED_CLIP = 3


def test_compare_names_exactly_the_regenerated_clip_and_usage_adds_up_to_the_total(
        embedded: RunningClipChat) -> None:
    with embedded.client() as client:
        oldest = client.get("/api/v1/jobs").json()["jobs"][-1]  # the demo job
        job = wait_for_job(client, oldest["id"], {"completed", "failed"})
        before_version = job["current_version"]
        before_prompts = {c["index"]: c["prompt"] for c in job["clips"]}
        started = client.post(f"/api/v1/jobs/{job['id']}/clips/{COMPARED_CLIP}/regenerate",
                              json={"instruction": "make it nighttime"})
        assert started.status_code == 202, started.text
        regeneration_id = started.json()["regeneration_id"]
        after = wait_for_job(client, job["id"], {"completed", "failed"})
        assert after["status"] == "completed" and after["active_regeneration_id"] is None, after
        after_version = after["current_version"]
        assert after_version > before_version
        [made] = [r for r in client.get(f"/api/v1/jobs/{job['id']}/regenerations").json()["regenerations"]
                  if r["id"] == regeneration_id]
        assert made["status"] == "completed" and Decimal(made["cost"]) > 0

        compared = client.get(f"/api/v1/jobs/{job['id']}/versions/{before_version}/compare/{after_version}")
        assert compared.status_code == 200, compared.text
        body = compared.json()
        [clip] = body["clips"]  # exactly the regenerated clip differs
        assert clip["index"] == COMPARED_CLIP
        assert clip["prompt_before"] == before_prompts[COMPARED_CLIP]
        assert clip["prompt_after"] == after["clips"][COMPARED_CLIP]["prompt"] == made["modified_prompt"]
        assert "night" in clip["prompt_after"]
        assert clip["revision_after"] == clip["revision_before"] + 1
        assert clip["video_url_before"] and clip["video_url_after"]
        publishing = [c for c in body["changes"] if c["version"] is not None]
        assert [(c["id"], c["version"], c["cost"], c["instruction"]) for c in publishing] == [
            (regeneration_id, after_version, made["cost"], "make it nighttime")]
        # Anything else between the two versions was an attempt that published nothing.
        assert all(c["status"] in ("failed", "cancelled") for c in body["changes"] if c["version"] is None)
        assert Decimal(body["cost"]) == sum(Decimal(c["cost"]) for c in body["changes"])
        assert client.get(f"/api/v1/jobs/{job['id']}/versions/{after_version}/compare/{after_version}"
                          ).status_code == 422
        assert client.get(f"/api/v1/jobs/{job['id']}/versions/1/compare/{after_version + 1}").status_code == 404

        usage = client.get(f"/api/v1/jobs/{job['id']}/usage").json()
        total = Decimal(client.get(f"/api/v1/jobs/{job['id']}").json()["total_cost"])
        assert Decimal(usage["total_cost"]) == total
        assert sum(Decimal(v) for v in usage["spend_by_step"].values()) == total
        for step, paid in (("rewrite", "llm"), ("generate", "generation"), ("compose", "composition")):
            assert Decimal(usage["spend_by_step"][step]) >= Decimal(made["step_costs"][paid]), step
        assert usage["changes"]["completed"] >= 1 and usage["changes"]["running"] == 0
        stages = {s["stage"] for s in usage["median_seconds_by_stage"]}
        assert {"queued", "generating"} <= stages
        assert usage["median_change_seconds"] > 0
        everything = client.get("/api/v1/usage").json()
        assert everything["jobs"] >= 1 and Decimal(everything["total_cost"]) >= total

    shown = embedded.cli("compare", job["id"], str(before_version), str(after_version))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"version {before_version} -> {after_version}: 1 clip(s) differ")
    assert f"after:  {clip['prompt_after']}" in shown.stdout
    spent = embedded.cli("usage", job["id"])
    assert spent.returncode == 0, spent.stderr
    assert spent.stdout.splitlines()[0] == f"usage of job {job['id']}: total ${usage['total_cost']}"
    refused = embedded.cli("compare", job["id"], "1", "1")
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and len(refused.stderr.splitlines()) == 1
