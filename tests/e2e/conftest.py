"""The whole system as a user runs it: ``clipchat up`` (embedded) or one process per service."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.fakes.otlp_collector import OtlpCollector
from tests.processes import spawn, stop_process

ROOT = Path(__file__).resolve().parents[2]
CLIPCHAT = str(Path(sys.executable).with_name("clipchat"))
TOKEN = "e2e-token"
# Where the page tests saved their screenshots (printed at the end of the run).
SCREENSHOTS_KEY = pytest.StashKey[Path]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    folder = config.stash.get(SCREENSHOTS_KEY, None)
    if folder is not None:
        terminalreporter.write_sep("-", "page screenshots")
        terminalreporter.write_line(f"Screenshots of the page's states (desktop and phone): {folder}")


@dataclass
class RunningClipChat:
    url: str
    token: str
    data_dir: Path
    env: dict[str, str]
    output: list[str]
    # Distributed mode: each gRPC service's metrics URL (the gateway's is url + "/metrics").
    metrics_urls: dict[str, str] = field(default_factory=dict)
    # Distributed mode: the fake collector the services export their spans to.
    collector: OtlpCollector | None = None

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"},
                            timeout=60, **kwargs)  # type: ignore[arg-type]

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLIPCHAT, *args, "--url", self.url, "--token", self.token], env=self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _pump(proc: subprocess.Popen[str], sink: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sink.append(line)


def start_process(args: list[str], env: dict[str, str], sink: list[str]) -> subprocess.Popen[str]:
    """Start ``args`` in its own session with its output (stdout and stderr) appended to ``sink``.

    It dies with this process: SIGKILLed by the kernel when this process dies, stopped at exit."""
    proc = spawn(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threading.Thread(target=_pump, args=(proc, sink), daemon=True).start()
    return proc


def wait_until(predicate, what: str, procs: list[subprocess.Popen[str]], output: list[str],
               limit: float = 300) -> None:
    """Readiness wait (not a speed check): fail with the processes' output if they die or hang."""
    deadline = time.monotonic() + limit
    while not predicate():
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"{what}: a process exited\n{''.join(output[-60:])}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not ready after {limit:.0f} s\n{''.join(output[-60:])}")
        time.sleep(0.2)


def base_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPCHAT_")}
    env.update({"CLIPCHAT_DATA_DIR": str(data_dir), "CLIPCHAT_AUTH_TOKENS": f"{TOKEN}=e2e,other-token=other",
                "CLIPCHAT_LEASE_SECONDS": "30", "CLIPCHAT_HEARTBEAT_SECONDS": "1",
                "PYTHONUNBUFFERED": "1"})
    return env


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory, ffmpeg_exe: str) -> Iterator[RunningClipChat]:
    """``clipchat up`` on a free port with a fresh data folder: the demo job is composed when ready."""
    data_dir = tmp_path_factory.mktemp("embedded")
    port = free_port()
    env = base_env(data_dir)
    output: list[str] = []
    proc = start_process([CLIPCHAT, "up", "--port", str(port)], env, output)
    try:
        wait_until(lambda: any("ClipChat is running" in line for line in output), "clipchat up", [proc], output)
        yield RunningClipChat(f"http://127.0.0.1:{port}", TOKEN, data_dir, env, output)
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def distributed(tmp_path_factory: pytest.TempPathFactory, ffmpeg_exe: str, postgres_admin_dsn: str,
                rabbitmq_url: str, moto_s3: str) -> Iterator[RunningClipChat]:
    """Each service its own process, with PostgreSQL, RabbitMQ and moto S3, exporting its spans to a
    fake collector in this process (processes cannot share an in-memory exporter)."""
    import asyncio
    import uuid

    import boto3

    from tests.conftest import _create_database, _drop_database

    data_dir = tmp_path_factory.mktemp("distributed")
    db_name = f"clipchat_e2e_{uuid.uuid4().hex[:10]}"
    asyncio.run(_create_database(postgres_admin_dsn, db_name))
    bucket = f"clipchat-e2e-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket=bucket)
    collector = OtlpCollector()
    env = base_env(data_dir)
    pg_base = postgres_admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    env.update({
        "CLIPCHAT_DATABASE_URL": f"{pg_base}/{db_name}",
        "CLIPCHAT_BROKER_URL": rabbitmq_url,
        "CLIPCHAT_BROKER_NAMESPACE": f"e2e-{uuid.uuid4().hex[:8]}",
        "CLIPCHAT_STORAGE_URL": f"s3://{bucket}",
        "CLIPCHAT_S3_ENDPOINT_URL": moto_s3,
        "CLIPCHAT_S3_ACCESS_KEY_ID": "test", "CLIPCHAT_S3_SECRET_ACCESS_KEY": "test",
        "CLIPCHAT_OTLP_ENDPOINT": collector.start(),
        # The batch span processors send what ended every 200 ms rather than every 5 s.
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        # The fastest preset the composer takes: these tests check the videos play, not how small
        # they are, and the demo's 24 s at 1080p is the longest thing they wait for.
        "CLIPCHAT_X264_PRESET": "superfast",
    })
    output: list[str] = []
    procs: list[subprocess.Popen[str]] = []
    try:
        metrics_urls: dict[str, str] = {}
        url = serve_distributed(env, procs, output, metrics_urls)
        yield RunningClipChat(url, TOKEN, data_dir, env, output, metrics_urls, collector)
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        collector.stop()
        asyncio.run(_drop_database(postgres_admin_dsn, db_name))


@dataclass(frozen=True)
class TracedRegeneration:
    """A regeneration on the ``distributed`` stack that a caller started inside its own trace, published
    as a new version of the job."""

    job_id: str
    regeneration_id: str
    trace_id: str  # 32 hex digits, sent in the request's traceparent
    caller_span: str  # the caller's span id (16 hex digits), the gateway request span's parent
    job: dict  # the job once the regeneration was published


@pytest.fixture(scope="session")
def distributed_demo(distributed: RunningClipChat) -> str:
    """The id of the demo job on the ``distributed`` stack (``clipchat demo``), once composed. One job
    for the session: the distributed tests regenerate its clips one after another, so a test reads
    the versions it starts from rather than assuming version 1."""
    created = distributed.cli("demo")
    assert created.returncode == 0, created.stdout + created.stderr
    job_id = created.stdout.split()[0]
    with distributed.client() as client:
        job = wait_for_version(distributed, client, job_id, 1)
    assert job["status"] == "completed", job
    return job_id


@pytest.fixture(scope="session")
def traced_regeneration(distributed: RunningClipChat, distributed_demo: str) -> TracedRegeneration:
    """Clip 1 of the distributed demo job, regenerated ("make it rainy") by a caller that sent a
    ``traceparent`` header, into the job's next version. One regeneration for the tests that read
    what it left: its spans (the trace test) and the services' metrics (the metrics test)."""
    import secrets

    job_id = distributed_demo
    with distributed.client() as client:
        before = wait_for_idle(distributed, client, job_id)
        assert before["status"] == "completed", before
        trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
        started = client.post(f"/api/v1/jobs/{job_id}/clips/1/regenerate", json={"instruction": "make it rainy"},
                              headers={"traceparent": f"00-{trace_id}-{caller_span}-01"})
        assert started.status_code == 202, started.text
        job = wait_for_version(distributed, client, job_id, before["current_version"] + 1)
    assert (job["status"], job["current_version"]) == ("completed", before["current_version"] + 1), job
    return TracedRegeneration(job_id, started.json()["regeneration_id"], trace_id, caller_span, job)


def serve_distributed(env: dict[str, str], procs: list[subprocess.Popen[str]], output: list[str],
                      metrics_urls: dict[str, str] | None = None) -> str:
    """Migrate, start each service as its own ``clipchat serve`` process on free ports and wait until
    the gateway is ready; returns the gateway's URL. The processes are added to ``procs`` as they
    start, so the caller stops them whatever happens. Each gRPC service serves its metrics on a
    port of its own (``CLIPCHAT_METRICS_PORT``), whose URL goes into ``metrics_urls``."""
    ports = {name: free_port() for name in ("status", "regenerator", "composer", "gateway")}
    metrics_ports = {name: free_port() for name in ("status", "regenerator", "composer")}
    if metrics_urls is not None:
        metrics_urls.update({name: f"http://127.0.0.1:{port}/metrics" for name, port in metrics_ports.items()})
    env.update({
        "CLIPCHAT_STATUS_ADDR": f"127.0.0.1:{ports['status']}",
        "CLIPCHAT_REGENERATOR_ADDR": f"127.0.0.1:{ports['regenerator']}",
        "CLIPCHAT_COMPOSER_ADDR": f"127.0.0.1:{ports['composer']}",
        "CLIPCHAT_GATEWAY_PORT": str(ports["gateway"]),
    })
    migrated = subprocess.run([CLIPCHAT, "migrate"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert migrated.returncode == 0, migrated.stderr
    procs.extend(start_process([CLIPCHAT, "serve", name],
                               {**env, "CLIPCHAT_METRICS_PORT": str(metrics_ports.get(name, 0))}, output)
                 for name in ("status", "composer", "regenerator", "gateway"))
    url = f"http://127.0.0.1:{ports['gateway']}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/api/v1/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, "distributed services", procs, output, limit=120)
    return url


def post_at_once(system: RunningClipChat, job_id: str, clip_index: int, instruction: str,
                 times: int = 20) -> list[int]:
    """POST the same regeneration ``times`` times at once; the status codes, in no order."""
    url = f"{system.url}/api/v1/jobs/{job_id}/clips/{clip_index}/regenerate"
    headers = {"Authorization": f"Bearer {system.token}"}

    def post(_: int) -> int:
        return httpx.post(url, json={"instruction": instruction}, headers=headers, timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=times) as pool:
        return list(pool.map(post, range(times)))


def wait_for_job(client: httpx.Client, job_id: str, statuses: set[str], limit: float = 300) -> dict:
    deadline = time.monotonic() + limit
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} stayed {job['status']}")
        time.sleep(0.3)


def wait_for_version(system: RunningClipChat, client: httpx.Client, job_id: str, version: int,
                     limit: float = 600) -> dict:
    """The job once it has ``version`` or has failed; a readiness wait, not a speed check: it fails
    with the services' last lines when the job seems stuck."""
    deadline = time.monotonic() + limit
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] == "failed" or (job["status"] == "completed" and job["current_version"] >= version):
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} is still {job['status']} at version {job['current_version']}\n"
                        + "".join(system.output[-40:]))
        time.sleep(0.3)


def wait_for_idle(system: RunningClipChat, client: httpx.Client, job_id: str, limit: float = 600) -> dict:
    """The job once it is completed or failed with no regeneration running on it (one a test
    cancelled has wound down); a readiness wait, not a speed check."""
    deadline = time.monotonic() + limit
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("completed", "failed") and not job["active_regeneration_id"]:
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} is still {job['status']}, running {job['active_regeneration_id']}\n"
                        + "".join(system.output[-40:]))
        time.sleep(0.3)
