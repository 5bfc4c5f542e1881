"""The distributed system with scripted providers, for the regeneration suite.

PostgreSQL, RabbitMQ (its own namespace) and moto S3 behind a fault-injecting proxy; the fake LLM
and the fake prediction API run in the test process; the four services run as ``clipchat serve``
subprocesses in HTTP mode. Tests drive everything through the gateway and script the fakes.

Costs are configured here so that every test can compute what each step must cost, to the
hundredth of a cent, from the fakes' usage and these prices.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import _create_database, _drop_database
from tests.e2e.conftest import (
    TOKEN,
    base_env,
    serve_distributed,
    stop_process,
)
from tests.fakes.llm_server import FakeLLMServer
from tests.fakes.prediction_server import PredictionServer, render_sample_mp4
from tests.fakes.s3_fault_proxy import S3FaultProxy

FRACTION = Decimal("0.0001")
LLM_KEY = "e2e-llm-key"
GENERATOR_TOKEN = "e2e-generator-token"
# Prices the services are configured with (dollars).
LLM_PRICE_PER_1K_INPUT = Decimal("0.5")
LLM_PRICE_PER_1K_OUTPUT = Decimal("1.5")
LLM_ESTIMATE = Decimal("0.05")
GENERATION_PRICE_PER_SECOND = Decimal("0.2")
COMPOSITION_PRICE_PER_SECOND = Decimal("0.01")
# What the fake prediction API bills for each succeeded prediction.
GENERATION_COST = Decimal("0.25")
# S3Storage's botocore config retries a put 3 times: 4 requests before the error reaches the composer.
S3_REQUESTS_PER_PUT = 4
RETRY_ATTEMPTS = 3

CLIP_PROMPTS = (
    "a dancer spinning on a city rooftop on a sunny afternoon",
    "wide shot of the city skyline with the dancer in the foreground",
    "the dancer bowing on the rooftop as the crowd cheers",
)
# The prompts of a fourth and fifth clip (without the first clip's time of day).
MORE_CLIP_PROMPTS = (
    "close-up of the dancer's shoes tapping on the rooftop",
    "the dancer walking away along the rooftop edge",
)
CLIP_SECONDS = 1.0
FINISHED = frozenset({"completed", "failed", "cancelled"})


@dataclass
class Rig:
    url: str
    env: dict[str, str]
    output: list[str]
    llm: FakeLLMServer
    predictions: PredictionServer
    s3: S3FaultProxy
    database_dsn: str  # plain asyncpg DSN of the services' database
    media: list[Path]  # clip files, then the audio track
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def client(self, token: str = TOKEN) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def reset(self) -> None:
        """Between tests: no scripted failure or fault left over from the last one."""
        self.llm.clear_script()
        self.predictions.clear_script()
        self.s3.clear()

    def log_tail(self, *needles: str, lines: int = 30) -> str:
        """The services' last log lines that mention all of ``needles`` (for failure messages)."""
        return "".join(self.log_lines(*needles)[-lines:])

    def log_lines(self, *needles: str) -> list[str]:
        return [line for line in list(self.output) if all(n in line for n in needles)]

    def technical_detail(self, regeneration_id: str) -> dict[str, Any] | None:
        """What ``clip_regenerations.technical_detail`` holds (the gateway never returns it)."""
        async def query() -> str | None:
            import asyncpg

            conn = await asyncpg.connect(self.database_dsn)
            try:
                value: str | None = await conn.fetchval(
                    "SELECT technical_detail FROM clip_regenerations WHERE id = $1", uuid.UUID(regeneration_id))
                return value
            finally:
                await conn.close()

        text = asyncio.run(query())
        return json.loads(text) if text else None


def start_rig(tmp_path_factory: pytest.TempPathFactory, *, ffmpeg: str, postgres_admin_dsn: str,
              rabbitmq_url: str, moto_s3: str) -> Iterator[Rig]:
    """Start everything; yield the rig; stop everything (the body of a module-scoped fixture)."""
    import boto3

    data_dir = tmp_path_factory.mktemp("regeneration-suite")
    media = render_job_media(data_dir / "media", ffmpeg)
    db_name = f"clipchat_regen_{uuid.uuid4().hex[:10]}"
    asyncio.run(_create_database(postgres_admin_dsn, db_name))
    bucket = f"clipchat-regen-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket=bucket)
    llm = FakeLLMServer(api_key=LLM_KEY, hang_seconds=5.0)
    predictions = PredictionServer(video=media[0], token=GENERATOR_TOKEN, cost=str(GENERATION_COST), steps=2)
    s3 = S3FaultProxy(moto_s3)
    procs: list[subprocess.Popen[str]] = []
    output: list[str] = []
    dsn_base = postgres_admin_dsn.rsplit("/", 1)[0]
    try:
        llm.start()
        predictions.start()
        s3.start()
        env = base_env(data_dir)
        env.update({
            "CLIPCHAT_DATABASE_URL": f"{dsn_base.replace('postgresql://', 'postgresql+asyncpg://')}/{db_name}",
            "CLIPCHAT_BROKER_URL": rabbitmq_url,
            "CLIPCHAT_BROKER_NAMESPACE": f"regen-{uuid.uuid4().hex[:8]}",
            "CLIPCHAT_STORAGE_URL": f"s3://{bucket}",
            "CLIPCHAT_S3_ENDPOINT_URL": s3.url,
            "CLIPCHAT_S3_ACCESS_KEY_ID": "test", "CLIPCHAT_S3_SECRET_ACCESS_KEY": "test",
            # The fastest preset the composer takes (3 s of 1080p in 2.7 s of one core instead of
            # 4.8 s at veryfast): the suite checks what the videos hold, not how small they are.
            "CLIPCHAT_ENCODER": "libx264", "CLIPCHAT_X264_PRESET": "superfast",
            "CLIPCHAT_LLM_BASE_URL": llm.url, "CLIPCHAT_LLM_API_KEY": LLM_KEY, "CLIPCHAT_LLM_MODEL": "fake-llm-1",
            "CLIPCHAT_LLM_TIMEOUT_SECONDS": "3",
            "CLIPCHAT_GENERATOR": "http", "CLIPCHAT_GENERATOR_URL": predictions.url,
            "CLIPCHAT_GENERATOR_API_TOKEN": GENERATOR_TOKEN, "CLIPCHAT_GENERATOR_MODEL": "fake/video-1",
            "CLIPCHAT_GENERATOR_REQUEST_TIMEOUT_SECONDS": "5",
            "CLIPCHAT_GENERATOR_POLL_INITIAL_SECONDS": "0.05", "CLIPCHAT_GENERATOR_POLL_MAX_SECONDS": "0.1",
            "CLIPCHAT_RETRY_ATTEMPTS": str(RETRY_ATTEMPTS),
            "CLIPCHAT_RETRY_BASE_SECONDS": "0.05", "CLIPCHAT_RETRY_MAX_SECONDS": "0.2",
            "CLIPCHAT_HEARTBEAT_SECONDS": "1", "CLIPCHAT_SSE_HEARTBEAT_SECONDS": "1",
            "CLIPCHAT_RATE_LIMIT_PER_MINUTE": "10000",
            "CLIPCHAT_LLM_PRICE_PER_1K_INPUT": str(LLM_PRICE_PER_1K_INPUT),
            "CLIPCHAT_LLM_PRICE_PER_1K_OUTPUT": str(LLM_PRICE_PER_1K_OUTPUT),
            "CLIPCHAT_LLM_ESTIMATED_COST": str(LLM_ESTIMATE),
            "CLIPCHAT_GENERATION_PRICE_PER_SECOND": str(GENERATION_PRICE_PER_SECOND),
            "CLIPCHAT_COMPOSITION_PRICE_PER_SECOND": str(COMPOSITION_PRICE_PER_SECOND),
        })
        url = serve_distributed(env, procs, output)
        yield Rig(url=url, env=env, output=output, llm=llm, predictions=predictions, s3=s3,
                  database_dsn=f"{dsn_base}/{db_name}", media=media, procs=procs)
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        if os.environ.get("CLIPCHAT_E2E_SERVICE_LOG"):  # keep the services' logs for debugging
            Path(os.environ["CLIPCHAT_E2E_SERVICE_LOG"]).write_text("".join(output))
        s3.stop()
        predictions.stop()
        llm.stop()
        asyncio.run(_drop_database(postgres_admin_dsn, db_name))


# ---- media and jobs ---------------------------------------------------------------------------


def render_job_media(folder: Path, ffmpeg: str) -> list[Path]:
    """Three 1-second 320x180 clips (the first one doubles as the generated clip) and a 3 s AAC track."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = [render_sample_mp4(folder / "clip0.mp4", ffmpeg=ffmpeg, seconds=CLIP_SECONDS)]
    for index, source in ((1, "smptebars"), (2, "rgbtestsrc")):
        dest = folder / f"clip{index}.mp4"
        subprocess.run([ffmpeg, "-nostdin", "-y", "-hide_banner", "-loglevel", "error", "-f", "lavfi",
                        "-i", f"{source}=size=320x180:rate=25:duration={CLIP_SECONDS}", "-c:v", "libx264",
                        "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(dest)],
                       check=True, capture_output=True, timeout=60)
        clips.append(dest)
    audio = folder / "music.m4a"
    seconds = CLIP_SECONDS * len(clips)
    subprocess.run([ffmpeg, "-nostdin", "-y", "-hide_banner", "-loglevel", "error", "-f", "lavfi",
                    "-i", f"sine=frequency=220:sample_rate=48000:duration={seconds}", "-c:a", "aac",
                    "-b:a", "64k", str(audio)], check=True, capture_output=True, timeout=60)
    return [*clips, audio]


def create_job(rig: Rig, client: httpx.Client, *, budget_limit: str | None = None,
               clip_count: int = len(CLIP_PROMPTS)) -> dict[str, Any]:
    """Upload a job of ``clip_count`` clips (three unless said, at most five; the second and third
    sample clips repeated past three) through ``POST /jobs`` and wait for its first composition."""
    samples, audio = rig.media[:-1], rig.media[-1]
    # Past three, the second and third samples again: the first is what the fake provider returns.
    clips = [*samples, *samples[1:]][:clip_count]
    prompts = [*CLIP_PROMPTS, *MORE_CLIP_PROMPTS][:clip_count]
    manifest: dict[str, Any] = {
        "title": "regeneration suite",
        "clips": [{"prompt": prompt, "duration": CLIP_SECONDS} for prompt in prompts],
        "transitions": [{"kind": "cut", "duration": 0} for _ in prompts[1:]],
        "beat_timestamps": [0.5 * i for i in range(6)],
        "aspect_ratio": "16:9",
    }
    if budget_limit is not None:
        manifest["budget_limit"] = budget_limit
    files = [("clips", (f"{n}-{path.name}", path.read_bytes(), "video/mp4")) for n, path in enumerate(clips)]
    files.append(("audio", (audio.name, audio.read_bytes(), "audio/mp4")))
    response = client.post("/api/v1/jobs", data={"manifest": json.dumps(manifest)}, files=files)
    assert response.status_code == 202, response.text
    job = wait_for(lambda: _job_if(client, response.json()["id"], {"completed", "failed"}), "first composition")
    assert job["status"] == "completed" and job["current_version"] == 1, (job, rig.log_tail(job["id"]))
    return job


# ---- driving regenerations --------------------------------------------------------------------


def regenerate(client: httpx.Client, job_id: str, clip_index: int, instruction: str,
               history: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """``POST …/regenerate``; asserts the 202 and returns its body."""
    body: dict[str, Any] = {"instruction": instruction}
    if history is not None:
        body["conversation_history"] = history
    response = client.post(f"/api/v1/jobs/{job_id}/clips/{clip_index}/regenerate", json=body)
    assert response.status_code == 202, response.text
    accepted: dict[str, Any] = response.json()
    assert accepted["status"] == "queued"
    return accepted


def regenerations(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/v1/jobs/{job_id}/regenerations")
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()["regenerations"]
    return rows


def regeneration(client: httpx.Client, job_id: str, regeneration_id: str) -> dict[str, Any]:
    return next(r for r in regenerations(client, job_id) if r["id"] == regeneration_id)


def wait_regeneration(client: httpx.Client, job_id: str, regeneration_id: str,
                      statuses: frozenset[str] = FINISHED, limit: float = 120) -> dict[str, Any]:
    """The regeneration once its status is one of ``statuses`` (a finished one has released the job
    in the same transaction)."""
    def reached() -> dict[str, Any] | None:
        row = regeneration(client, job_id, regeneration_id)
        return row if row["status"] in statuses else None

    row: dict[str, Any] = wait_for(reached, f"regeneration {regeneration_id} to be {sorted(statuses)}",
                                   limit=limit)
    return row


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def video_bytes(client: httpx.Client, url: str) -> bytes:
    response = client.get(url, follow_redirects=True)
    assert response.status_code == 200, response.text[:200]
    return response.content


def events(client: httpx.Client, job_id: str, until: Callable[[dict[str, Any]], bool],
           limit: float = 30) -> list[dict[str, Any]]:
    """The job's Server-Sent Events from the start, read until one matches ``until``."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + limit
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events", params={"after": 0},
                       timeout=httpx.Timeout(10, read=5)) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                seen.append(json.loads(line.removeprefix("data:").strip()))
                if until(seen[-1]):
                    return seen
            if time.monotonic() > deadline:
                break
    pytest.fail(f"no matching event within {limit:.0f} s; saw {[e['type'] for e in seen]}")


def wait_for(probe: Callable[[], Any], what: str, *, limit: float = 120, interval: float = 0.2,
             rig: Rig | None = None) -> Any:
    """Poll ``probe`` until it returns something truthy (a readiness wait, not a speed check).

    On time-out the failure shows the services' last log lines when ``rig`` is given.
    """
    deadline = time.monotonic() + limit
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f"\n{rig.log_tail()}" if rig else ""))
        time.sleep(interval)


def _job_if(client: httpx.Client, job_id: str, statuses: set[str]) -> dict[str, Any] | None:
    job = get_job(client, job_id)
    return job if job["status"] in statuses else None


# ---- money ------------------------------------------------------------------------------------


def llm_cost(usage: dict[str, int]) -> Decimal:
    """What an LLM answer costs at the configured prices, from the usage the fake reported."""
    cost = (usage["prompt_tokens"] * LLM_PRICE_PER_1K_INPUT
            + usage["completion_tokens"] * LLM_PRICE_PER_1K_OUTPUT) / 1000
    return cost.quantize(FRACTION, rounding=ROUND_HALF_UP)


def composition_cost(video_seconds: float) -> Decimal:
    return (COMPOSITION_PRICE_PER_SECOND * Decimal(str(round(video_seconds, 3)))).quantize(FRACTION, ROUND_HALF_UP)


def estimate(*, clip_seconds: float = CLIP_SECONDS,
             video_seconds: float = CLIP_SECONDS * len(CLIP_PROMPTS)) -> Decimal:
    """What POST regenerate must quote: the LLM estimate + generation + composition."""
    generation = (Decimal(str(clip_seconds)) * GENERATION_PRICE_PER_SECOND).quantize(FRACTION, ROUND_HALF_UP)
    return (LLM_ESTIMATE + generation + composition_cost(video_seconds)).quantize(FRACTION)


def money(value: str) -> Decimal:
    return Decimal(value)


def current_version(job: dict[str, Any]) -> dict[str, Any]:
    version: dict[str, Any] = next(v for v in job["versions"] if v["version"] == job["current_version"])
    return version
