"""One regeneration is one trace across the service processes, from the caller's ``traceparent`` to
the composer's ffmpeg runs.

Each service is its own ``clipchat serve`` process (PostgreSQL, RabbitMQ, local storage), exporting
its spans over OTLP/gRPC to a fake collector in this process (``tests/fakes/otlp_collector.py``):
processes cannot share an in-memory exporter. The test follows the spans by their ids: the gateway's
request under the caller's span, the status service's RPC under it, the status service's publish
spans and the workers' CONSUMER spans under them across RabbitMQ, and the ffmpeg runs.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from clipchat.broker.topology import COMPOSE_QUEUE, EVENTS_EXCHANGE, REGENERATE_QUEUE
from tests.e2e.conftest import RunningClipChat, base_env, serve_distributed
from tests.fakes.otlp_collector import CollectedSpan, OtlpCollector
from tests.processes import stop_process

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.ffmpeg]


@dataclass
class TracedClipChat:
    system: RunningClipChat
    collector: OtlpCollector
    job_id: str  # the demo job, composed


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, ffmpeg_exe: str, postgres_admin_dsn: str,
           rabbitmq_url: str) -> Iterator[TracedClipChat]:
    """Each service its own process, exporting its spans to a fake collector."""
    import asyncio

    from tests.conftest import _create_database, _drop_database

    collector = OtlpCollector()
    data_dir = tmp_path_factory.mktemp("traced")
    db_name = f"clipchat_trace_{uuid.uuid4().hex[:10]}"
    asyncio.run(_create_database(postgres_admin_dsn, db_name))
    env = base_env(data_dir)
    pg_base = postgres_admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    env.update({
        "CLIPCHAT_DATABASE_URL": f"{pg_base}/{db_name}",
        "CLIPCHAT_BROKER_URL": rabbitmq_url,
        "CLIPCHAT_BROKER_NAMESPACE": f"trace-{uuid.uuid4().hex[:8]}",
        "CLIPCHAT_OTLP_ENDPOINT": collector.start(),
        # The batch span processors send what ended every 200 ms rather than every 5 s.
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    })
    output: list[str] = []
    procs: list = []
    try:
        url = serve_distributed(env, procs, output)
        system = RunningClipChat(url, "e2e-token", data_dir, env, output)
        created = system.cli("demo")
        assert created.returncode == 0, created.stdout + created.stderr
        job_id = created.stdout.split()[0]
        with system.client() as client:
            assert _wait_for_version(system, client, job_id, 1)["status"] == "completed"
        yield TracedClipChat(system, collector, job_id)
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        collector.stop()
        asyncio.run(_drop_database(postgres_admin_dsn, db_name))


# Setting up starts four services and composes the demo job; the test composes it again.
@pytest.mark.timeout(900)
def test_one_regeneration_is_one_trace_across_the_services_and_rabbitmq(traced: TracedClipChat) -> None:
    system, collector, job_id = traced.system, traced.collector, traced.job_id
    with system.client() as client:
        trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
        started = client.post(f"/api/v1/jobs/{job_id}/clips/1/regenerate", json={"instruction": "make it rainy"},
                              headers={"traceparent": f"00-{trace_id}-{caller_span}-01"})
        assert started.status_code == 202, started.text
        regeneration_id = started.json()["regeneration_id"]
        job = _wait_for_version(system, client, job_id, 2)
        assert (job["status"], job["current_version"]) == ("completed", 2), job

    def composed(spans: list[CollectedSpan]) -> list[CollectedSpan] | None:
        found = [s for s in spans if s.trace_id == trace_id]
        return found if any(s.name == "compose.message" for s in found) else None

    # The composer's message span ends once its claim is settled, just after the job completes.
    one_trace = collector.wait_for(composed, "the composer's compose.message in the request's trace")
    by_id = {s.span_id: s for s in one_trace}
    described = "\n".join(sorted(str(s) for s in one_trace))

    def one(predicate: Callable[[CollectedSpan], bool]) -> CollectedSpan:
        found = [s for s in one_trace if predicate(s)]
        assert len(found) == 1, f"{len(found)} matching spans in the trace:\n{described}"
        return found[0]

    def ancestors(span: CollectedSpan) -> list[CollectedSpan]:
        chain = []
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            chain.append(span)
        return chain

    # The gateway honours the caller's traceparent: its request span is the caller's span's child.
    request = one(lambda s: s.service == "clipchat-gateway" and s.kind == "SERVER" and s.name.startswith("POST "))
    assert request.parent_span_id == caller_span
    assert request.attributes.get("http.route") == "/api/v1/jobs/{job_id}/clips/{clip_index}/regenerate"

    begin = one(lambda s: s.service == "clipchat-status" and s.kind == "SERVER"
                and s.name.endswith("/BeginRegeneration"))
    assert request in ancestors(begin), described

    # Across RabbitMQ: each worker's CONSUMER span is the child of the status service's publish span.
    regenerate = one(lambda s: s.service == "clipchat-regenerator" and s.name == "regenerate.message")
    assert regenerate.kind == "CONSUMER"
    sent = by_id[regenerate.parent_span_id]
    assert (sent.service, sent.kind, sent.name) == ("clipchat-status", "PRODUCER", f"publish {REGENERATE_QUEUE}")
    assert sent.attributes["messaging.system"] == "rabbitmq"
    assert begin in ancestors(regenerate), described

    compose = one(lambda s: s.service == "clipchat-composer" and s.name == "compose.message")
    assert compose.kind == "CONSUMER"
    sent = by_id[compose.parent_span_id]
    assert (sent.service, sent.kind, sent.name) == ("clipchat-status", "PRODUCER", f"publish {COMPOSE_QUEUE}")
    assert regenerate in ancestors(compose), described

    # The composer's ffmpeg runs, each with the job and the regeneration it works for.
    runs = [s for s in one_trace if s.service == "clipchat-composer" and s.name == "ffmpeg"]
    assert runs, described
    for run in runs:
        assert compose in ancestors(run)
        assert (run.attributes["clipchat.job_id"], run.attributes["clipchat.regeneration_id"]) == \
            (job_id, regeneration_id)
        assert run.attributes["process.exit.code"] == 0 and not run.error

    # The job's events go out on the job-events topic in the same trace, and the status service's
    # subscription handles them in CONSUMER spans under the publishing ones.
    notified = [s for s in one_trace if s.kind == "CONSUMER" and s.name == f"process {EVENTS_EXCHANGE}"]
    assert notified, described
    for span in notified:
        sent = by_id[span.parent_span_id]
        assert (sent.service, sent.kind, sent.name) == ("clipchat-status", "PRODUCER", f"publish {EVENTS_EXCHANGE}")

    # A log line written inside the regenerator's work names the trace and one of its spans.
    regenerator_spans = {s.span_id for s in one_trace if s.service == "clipchat-regenerator"}
    lines = [_json(line) for line in system.output]
    worked = [line for line in lines if line.get("logger") == "clipchat.regenerator"
              and line.get("trace_id") == trace_id and line.get("span_id") in regenerator_spans]
    assert worked, [line for line in lines if line.get("logger") == "clipchat.regenerator"][-10:]
    assert worked[0]["timestamp"].endswith("Z")


def _wait_for_version(system: RunningClipChat, client: httpx.Client, job_id: str, version: int,
                      limit: float = 600) -> dict:
    """The job once it has ``version`` or has failed (the API is the only way to see it); a readiness
    wait, not a speed check: it fails with the services' last lines when the job seems stuck."""
    deadline = time.monotonic() + limit
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] == "failed" or (job["status"] == "completed" and job["current_version"] >= version):
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} is still {job['status']} at version {job['current_version']}\n"
                        + "".join(system.output[-40:]))
        time.sleep(0.3)


def _json(line: str) -> dict:
    try:
        parsed = json.loads(line)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
