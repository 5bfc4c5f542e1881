"""The regeneration suite's distributed rig (``tests.e2e.rig``), with what the fault suite needs.

``ChaosRig`` wraps a running ``Rig`` on the suite's own PostgreSQL and RabbitMQ and adds: each
service's process (restart it, with other settings; start another replica), its gRPC health,
holding and releasing a generation at the fake provider, what the providers were paid, the
objects in storage and the rows that reference them, queue depths, and publishing a work message
again exactly as it was published.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.chaos.backends import Postgres, RabbitMQ
from tests.chaos.faults import ffmpeg_children, wait_for
from tests.chaos.trace import BrokerTrace, Traced, peek, publish_again
from tests.conftest import free_port
from tests.e2e.conftest import CLIPCHAT, start_process, stop_process
from tests.e2e.rig import Rig

# The order ``serve_distributed`` starts the services in: the index of each in ``Rig.procs``.
SERVICES = ("status", "composer", "regenerator", "gateway")
REGENERATE_QUEUE = "clipchat.regenerate"
COMPOSE_QUEUE = "clipchat.compose"
DEAD_LETTER_QUEUE = "clipchat.dead-letter"
READY_WITHIN = 120.0  # seconds for a restarted service to serve (a bounded wait, not a speed check)
BASELINE_STEPS = 2  # what ``start_rig`` gives the fake prediction API
# The product's own step-retry defaults (``Settings``), in place of the regeneration suite's quick
# ones; a work message's redeliveries wait 1, 2, 4, 8 s (production: 5 … 60 s), so the poison
# message reaches the dead-letter queue within the suite's time and an outage is still ridden out.
CHAOS_SETTINGS = {"CLIPCHAT_RETRY_BASE_SECONDS": "0.5", "CLIPCHAT_RETRY_MAX_SECONDS": "8",
                  "CLIPCHAT_REDELIVERY_BASE_SECONDS": "1", "CLIPCHAT_REDELIVERY_MAX_SECONDS": "8"}
HELD_STEPS = 10**9


@dataclass
class Spend:
    """What the providers had been paid when a test step began; ``paid_twice`` compares."""

    rig: ChaosRig
    predictions: int = 0
    llm_answers: int = 0
    llm_calls: int = 0
    creates: int = 0
    polls: int = 0
    cancels: int = 0
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        fakes = self.rig.base
        self.predictions = fakes.predictions.paid_predictions
        self.llm_answers = len(fakes.llm.answers)
        self.llm_calls = len(fakes.llm.calls)
        self.creates = len(fakes.predictions.creates)
        self.polls = len(fakes.predictions.polls)
        self.cancels = len(fakes.predictions.cancelled_ids)

    def new_predictions_paid(self) -> int:
        return self.rig.base.predictions.paid_predictions - self.predictions

    def new_llm_answers(self) -> int:
        return len(self.rig.base.llm.answers) - self.llm_answers

    def new_llm_calls(self) -> list[Any]:
        return self.rig.base.llm.calls[self.llm_calls:]

    def new_creates(self) -> list[Any]:
        return self.rig.base.predictions.creates[self.creates:]

    def new_polls(self) -> list[Any]:
        return self.rig.base.predictions.polls[self.polls:]

    def new_cancelled_ids(self) -> list[str]:
        return self.rig.base.predictions.cancelled_ids[self.cancels:]

    def describe(self) -> str:
        """What was paid since, for failure messages."""
        keys = [call.idempotency_key or "(no key)" for call in self.new_creates()]
        return (f"{self.new_predictions_paid()} predictions paid from {len(keys)} creates (keys {keys}), "
                f"{self.new_llm_answers()} LLM answers")

    def paid_twice(self, *, predictions: int, llm_answers: int = 0) -> int:
        """Provider calls paid beyond the ``predictions`` and ``llm_answers`` the work needed."""
        return (max(0, self.new_predictions_paid() - predictions)
                + max(0, self.new_llm_answers() - llm_answers))


class ChaosRig:
    """A running ``Rig`` plus the controls the fault suite needs (see the module docstring)."""

    def __init__(self, base: Rig, postgres: Postgres, rabbitmq: RabbitMQ, trace: BrokerTrace) -> None:
        self.base = base
        self.postgres = postgres
        self.rabbitmq = rabbitmq
        self.trace = trace
        self.namespace = base.env["CLIPCHAT_BROKER_NAMESPACE"]
        self.bucket = base.env["CLIPCHAT_STORAGE_URL"].removeprefix("s3://")
        self._overridden: set[str] = set()
        self._replicas: list[subprocess.Popen[str]] = []

    # ---- processes -----------------------------------------------------------------------------

    def proc(self, service: str) -> subprocess.Popen[str]:
        return self.base.procs[SERVICES.index(service)]

    def pid(self, service: str) -> int:
        return self.proc(service).pid

    def addr(self, service: str) -> str:
        return self.base.env[f"CLIPCHAT_{service.upper()}_ADDR"]

    def start(self, service: str, **overrides: str) -> subprocess.Popen[str]:
        """Start ``service`` (again) in its slot, with ``overrides`` (``CLIPCHAT_*`` settings) on top of
        the rig's, and wait until it serves. The old process must be gone."""
        assert self.proc(service).poll() is not None, f"{service} is still running"
        env = {**self.base.env, **overrides}
        proc = start_process([CLIPCHAT, "serve", service], env, self.base.output)
        self.base.procs[SERVICES.index(service)] = proc
        if overrides:
            self._overridden.add(service)
        else:
            self._overridden.discard(service)
        self.wait_serving(service, proc)
        return proc

    def adopt(self, settings: dict[str, str]) -> None:
        """Make ``settings`` part of the rig's own and restart every service with them."""
        self.base.env.update(settings)
        for service in SERVICES:
            self.restart(service)

    def restart(self, service: str, **overrides: str) -> subprocess.Popen[str]:
        """Stop ``service`` gracefully, then ``start`` it with ``overrides``."""
        stop_process(self.proc(service))
        return self.start(service, **overrides)

    def start_replica(self, service: str, **overrides: str) -> subprocess.Popen[str]:
        """Another process of ``service`` (its own gRPC port), stopped by ``baseline``."""
        port = free_port()
        env = {**self.base.env, "CLIPCHAT_GRPC_PORT": str(port), **overrides}
        proc = start_process([CLIPCHAT, "serve", service], env, self.base.output)
        self._replicas.append(proc)
        self.base.procs.append(proc)  # the rig stops it at the end, whatever happens
        self._wait_grpc_serving(f"127.0.0.1:{port}", proc, service)
        return proc

    def wait_serving(self, service: str, proc: subprocess.Popen[str] | None = None) -> None:
        proc = proc or self.proc(service)
        if service == "gateway":
            wait_for(lambda: _alive_or_fail(proc, service, self) and self.gateway_ready(), "the gateway",
                     limit=READY_WITHIN, interval=0.2)
        else:
            self._wait_grpc_serving(self.addr(service), proc, service)

    def _wait_grpc_serving(self, addr: str, proc: subprocess.Popen[str], service: str) -> None:
        wait_for(lambda: _alive_or_fail(proc, service, self) and grpc_health(addr) == "SERVING",
                 f"{service} to serve on {addr}", limit=READY_WITHIN, interval=0.2)

    def gateway_ready(self) -> bool:
        try:
            return httpx.get(f"{self.base.url}/api/v1/readyz", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    def health(self, service: str) -> str:
        """The service's gRPC health: SERVING, NOT_SERVING, or the error code (UNAVAILABLE…)."""
        return grpc_health(self.addr(service))

    def ffmpeg(self) -> list[Any]:
        """The ffmpeg processes running under any service of the rig."""
        return [p for proc in self.base.procs if proc.poll() is None for p in ffmpeg_children(proc.pid)]

    def baseline(self) -> None:
        """Back to how ``start_rig`` left things: every service up with the rig's settings, no extra
        replica, no scripted provider failure or storage fault, generations not held."""
        for proc in self._replicas:
            stop_process(proc)
            if proc in self.base.procs:
                self.base.procs.remove(proc)
        self._replicas.clear()
        self.base.reset()
        self.release_generation()
        for service in SERVICES:
            if self.proc(service).poll() is not None:
                self.start(service)
            elif service in self._overridden:
                self.restart(service)

    # ---- the fake providers ----------------------------------------------------------------------

    def hold_generation(self) -> None:
        """Predictions stay ``processing`` (polled, progressing) until ``release_generation``."""
        self.base.predictions.steps = HELD_STEPS

    def release_generation(self) -> None:
        """Held predictions succeed at their next poll."""
        self.base.predictions.steps = BASELINE_STEPS

    def spend(self) -> Spend:
        return Spend(self)

    # ---- storage and database ----------------------------------------------------------------------

    def s3(self) -> Any:
        """A boto3 client of the S3 server itself (not through the fault proxy)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.base.s3.upstream, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")

    def object_sha(self, key: str) -> str | None:
        """The sha256 of the object's bytes, None when it does not exist."""
        client = self.s3()
        try:
            body = client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None
        return hashlib.sha256(body).hexdigest()

    def job_objects(self, job_id: str) -> set[str]:
        """Every object key under the job's prefix in storage."""
        prefix = f"jobs/{uuid.UUID(job_id).hex}/"
        keys: set[str] = set()
        for page in self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.update(obj["Key"] for obj in page.get("Contents", []))
        return keys

    def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """Rows of a query on the services' database."""
        async def query() -> list[dict[str, Any]]:
            import asyncpg

            conn = await asyncpg.connect(self.base.database_dsn, timeout=10)
            try:
                return [dict(row) for row in await conn.fetch(sql, *args)]
            finally:
                await conn.close()

        return asyncio.run(query())

    def version_key(self, job_id: str, version: int) -> str:
        [row] = self.fetch("SELECT storage_key FROM video_versions WHERE job_id = $1 AND version = $2",
                           uuid.UUID(job_id), version)
        return str(row["storage_key"])

    def rows_mentioning_job(self, job_id: str) -> str:
        """Every row of every table about the job (the job itself and each table with a ``job_id``),
        as JSON text: whatever names an object there keeps it."""
        tables = [row["table_name"] for row in self.fetch(
            "SELECT table_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND column_name = 'job_id'")]
        ident = uuid.UUID(job_id)
        texts = [json.dumps([str(r["row"]) for r in self.fetch(
            "SELECT row_to_json(t)::text AS row FROM jobs t WHERE id = $1", ident)])]
        for table in tables:
            texts.append(json.dumps([str(r["row"]) for r in self.fetch(
                f'SELECT row_to_json(t)::text AS row FROM "{table}" t WHERE t.job_id::text = $1', str(ident))]))
        return "\n".join(texts)

    def orphans(self, job_id: str) -> set[str]:
        """Objects under the job's prefix that no row names (left behind by stopped work)."""
        text = self.rows_mentioning_job(job_id)
        return {key for key in self.job_objects(job_id) if key not in text}

    def lease_token(self, job_id: str) -> str | None:
        [row] = self.fetch("SELECT lease_token FROM jobs WHERE id = $1", uuid.UUID(job_id))
        return row["lease_token"]

    # ---- the broker --------------------------------------------------------------------------------

    def queue(self, name: str) -> str:
        """The broker's name of one of the topology's queues (the rig's namespace in front)."""
        return f"{self.namespace}{name}"

    def held(self, name: str) -> int:
        """How many messages of the queue consumers hold now (delivered, not yet acknowledged).

        Read from the consumers' channels, which answer at once (a quorum queue's own counters
        lag by seconds)."""
        consumers = json.loads(self.rabbitmq.ctl("list_consumers", "-q", "queue_name", "channel_pid",
                                                 "--formatter", "json").stdout or "[]")
        channels = {row["channel_pid"] for row in consumers if row["queue_name"] == self.queue(name)}
        listed = json.loads(self.rabbitmq.ctl("list_channels", "-q", "pid", "messages_unacknowledged",
                                              "--formatter", "json").stdout or "[]")
        return sum(int(row["messages_unacknowledged"]) for row in listed if row["pid"] in channels)

    def dead_lettered(self, mentioning: str) -> bool:
        """Whether the dead-letter queue holds a message carrying ``mentioning`` (an id)."""
        bodies = asyncio.run(peek(self.rabbitmq.amqp_url, self.queue(DEAD_LETTER_QUEUE)))
        return any(mentioning.encode() in body for body in bodies)

    def renew_trace(self) -> None:
        """Trace the broker afresh (RabbitMQ forgets tracing when its application restarts)."""
        self.trace.stop()
        self.trace = BrokerTrace(self.rabbitmq).start()

    def deliveries(self, name: str, mentioning: str) -> list[Traced]:
        """The broker's deliveries from the queue of messages carrying ``mentioning`` (an id)."""
        return self.trace.deliveries(self.queue(name), mentioning)


def duplicate_regenerate_message(rig: ChaosRig, job_id: str, regeneration_id: str) -> Traced:
    """Publish the regenerate message of ``regeneration_id`` once more, byte for byte as the
    service published it (the broker's trace kept it), so the same message is delivered twice
    whatever its format. Returns the message published. Fails the test when none was seen."""
    published = wait_for(lambda: rig.trace.publishes(rig.queue(REGENERATE_QUEUE), regeneration_id),
                         f"the regenerate message of {regeneration_id} (job {job_id})", limit=30)
    assert isinstance(published, list)
    original: Traced = published[0]
    asyncio.run(publish_again(rig.rabbitmq.amqp_url, original))
    return original


def grpc_health(addr: str, timeout: float = 1.0) -> str:
    """``grpc.health.v1`` Check of the whole server at ``addr``: SERVING, NOT_SERVING, or the
    error code name when it does not answer (UNAVAILABLE, DEADLINE_EXCEEDED…)."""
    with grpc.insecure_channel(addr) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                               timeout=timeout)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _alive_or_fail(proc: subprocess.Popen[str], service: str, rig: ChaosRig) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"{service} exited ({proc.returncode}) while starting\n{rig.base.log_tail(lines=40)}")
    return True
