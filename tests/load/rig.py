"""The parts the load scenarios run against, and the worker that makes a job's events.

A fresh PostgreSQL database; the status and regenerator services and ONE gateway process, each a
``clipchat serve`` subprocess (one uvicorn worker); the in-memory broker in each process (nothing
here needs messages to cross processes: no composition or regeneration really runs). Jobs are
created and driven through the status service's gRPC API with the service token, the calls a
composer makes (``CreateJob``, ``ClaimWork``, ``RecordProgress``, ``SucceedRegeneration``), so the
gateway serves what a real deployment would.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx

from clipchat.rpc import call, open_channel
from clipchat.settings import Settings
from clipchat.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc
from tests.conftest import _create_database, _drop_database, free_port
from tests.e2e.conftest import CLIPCHAT, ROOT, base_env, start_process, wait_until
from tests.processes import stop_process

TOKEN = "load-token"
OWNER = "load"
SERVICE_TOKEN = "load-service-token"
# Far above what any scenario opens or sends: the scenarios measure, the caps are tested elsewhere.
MAX_STREAMS_PER_OWNER = 5000
RATE_LIMIT_PER_MINUTE = 2000


@dataclass
class LoadRig:
    url: str
    status_addr: str
    database: str
    admin_dsn: str
    output: list[str]
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60)

    def database_dsn(self) -> str:
        return f"{self.admin_dsn.rsplit('/', 1)[0]}/{self.database}"

    def transactions(self) -> int:
        """Transactions the database has committed or rolled back so far (every statement the
        services send runs in one): the difference over a run is its database work."""

        async def read() -> int:
            conn = await asyncpg.connect(self.admin_dsn)
            try:
                await conn.execute("SELECT pg_stat_clear_snapshot()")
                value = await conn.fetchval(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1", self.database)
                return int(value or 0)
            finally:
                await conn.close()

        return asyncio.run(read())

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) each service process has used so far. On a machine shared with
        other work, CPU per request says more than requests per second."""
        names = ("status", "regenerator", "gateway")
        return {name: process_cpu_seconds(proc.pid) for name, proc in zip(names, self.procs, strict=True)}


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds process ``pid`` has used (Linux ``/proc``); 0.0 where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds every core of this machine has spent busy so far (Linux ``/proc/stat``)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def start_load_rig(tmp: Path, admin_dsn: str) -> Iterator[LoadRig]:
    """Start the rig; yields it and stops everything (dropping the database) when resumed."""
    database = f"clipchat_load_{uuid.uuid4().hex[:10]}"
    asyncio.run(_create_database(admin_dsn, database))
    env = base_env(tmp)
    ports = {name: free_port() for name in ("status", "regenerator", "composer", "gateway")}
    pg_base = admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    env.update({
        "CLIPCHAT_AUTH_TOKENS": f"{TOKEN}={OWNER}",
        "CLIPCHAT_DATABASE_URL": f"{pg_base}/{database}",
        "CLIPCHAT_BROKER_URL": "memory://",
        "CLIPCHAT_SERVICE_TOKEN": SERVICE_TOKEN,
        "CLIPCHAT_STATUS_ADDR": f"127.0.0.1:{ports['status']}",
        "CLIPCHAT_REGENERATOR_ADDR": f"127.0.0.1:{ports['regenerator']}",
        "CLIPCHAT_COMPOSER_ADDR": f"127.0.0.1:{ports['composer']}",
        "CLIPCHAT_GATEWAY_PORT": str(ports["gateway"]),
        "CLIPCHAT_SSE_MAX_STREAMS_PER_OWNER": str(MAX_STREAMS_PER_OWNER),
        "CLIPCHAT_RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT_PER_MINUTE),
        "CLIPCHAT_LEASE_SECONDS": "600",
        "CLIPCHAT_LOG_LEVEL": "WARNING",
    })
    output: list[str] = []
    rig = LoadRig(f"http://127.0.0.1:{ports['gateway']}", env["CLIPCHAT_STATUS_ADDR"], database, admin_dsn, output)
    try:
        migrated = subprocess.run([CLIPCHAT, "migrate"], env=env, capture_output=True, text=True, cwd=ROOT)
        assert migrated.returncode == 0, migrated.stderr
        for name in ("status", "regenerator", "gateway"):
            rig.procs.append(start_process([CLIPCHAT, "serve", name], env, output))

        def ready() -> bool:
            try:
                return httpx.get(f"{rig.url}/api/v1/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, "load rig", rig.procs, output, limit=120)
        yield rig
    finally:
        for proc in reversed(rig.procs):
            stop_process(proc)
        asyncio.run(_drop_database(admin_dsn, database))


class Worker:
    """Drives jobs through the status service as a composer does, over one gRPC channel."""

    def __init__(self, status_addr: str) -> None:
        self._settings = Settings(service_token=SERVICE_TOKEN)
        self._addr = status_addr

    async def __aenter__(self) -> Worker:
        self._channel = open_channel(self._addr, self._settings)
        self.stub = jobs_pb2_grpc.JobStatusServiceStub(self._channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close()

    async def composing_job(self, clips: int = 3) -> tuple[str, str, str]:
        """A new job whose initial composition this worker has claimed: (job id, lease token, claim id)."""
        created = await call(self.stub.CreateJob, jobs_pb2.CreateJobRequest(
            owner=OWNER, title="load", audio_key="load/audio.mp3",
            clips=[jobs_pb2.ClipInput(prompt=f"clip {i}", duration=2.0, video_key=f"load/clip{i}.mp4")
                   for i in range(clips)]), timeout=10)
        job_id, token, claim = created.job.job_id, created.lease_token, uuid.uuid4().hex
        claimed = await call(self.stub.ClaimWork, jobs_pb2.ClaimWorkRequest(
            job_id=job_id, lease_token=token, phase=jobs_pb2.WORK_PHASE_COMPOSE, claim_id=claim), timeout=10)
        assert claimed.outcome == jobs_pb2.CLAIM_OUTCOME_CLAIMED
        return job_id, token, claim

    async def progress(self, job_id: str, token: str, claim: str, fraction: float) -> int:
        """Report progress (one event); returns the event's sequence."""
        reply = await call(self.stub.RecordProgress, jobs_pb2.RecordProgressRequest(
            job_id=job_id, lease_token=token, claim_id=claim, stage=common_pb2.STAGE_ENCODING,
            fraction=fraction, message="encoding"), timeout=10)
        return reply.sequence

    async def finish(self, job_id: str, token: str, claim: str) -> None:
        """Publish the initial composition: the job is completed, with version 1."""
        await call(self.stub.SucceedRegeneration, jobs_pb2.SucceedRegenerationRequest(
            job_id=job_id, lease_token=token, claim_id=claim, video_key=f"jobs/{job_id}/v1.mp4",
            video_duration=6.0, encoder="libx264"), timeout=10)

    async def completed_job(self) -> str:
        job_id, token, claim = await self.composing_job()
        await self.finish(job_id, token, claim)
        return job_id
