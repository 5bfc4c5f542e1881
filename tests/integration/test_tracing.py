"""One regeneration is one trace: the browser's request, the status service, both workers, ffmpeg.

ClipChat runs in this process in embedded mode (SQLite, the in-process broker, the local
generator), with an in-memory span exporter on the tracer provider. The work messages carry the
trace in their ``trace_context`` field, so the spans of the workers join the request's trace; the
broker's publish is a PRODUCER span between them, on RabbitMQ as in process, and a job-events
notification is handled in a CONSUMER span, the child of the publishing one.
(tests/e2e/test_distributed_trace.py follows one regeneration across the service processes.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from clipchat import telemetry
from clipchat.broker import REGENERATE_QUEUE, Broker, Delivery
from clipchat.broker.memory import InMemoryBroker
from clipchat.broker.topology import EVENTS_EXCHANGE
from clipchat.v1 import tasks_pb2
from services.status.events import EventHub


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        # Set once per process; tracers handed out before (ProxyTracers) follow it.
        provider = telemetry.tracer_provider("clipchat-test")
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    """Every span ended in this process while the test runs."""
    exporter.clear()
    return exporter


@pytest.mark.ffmpeg
async def test_one_regeneration_is_one_trace_from_the_request_to_ffmpeg(
        spans: InMemorySpanExporter, tmp_path: Path, ffmpeg_exe: str) -> None:
    from clipchat.settings import Settings
    from launcher.system import start_embedded

    # The fastest preset the composer takes: the spans are the point, not the video's size.
    settings = Settings(_env_file=None, data_dir=tmp_path, gateway_port=0, llm_base_url="",  # type: ignore[call-arg]
                        generator="local", broker_url="memory://", database_url="", storage_url="",
                        ffmpeg_path=ffmpeg_exe, x264_preset="superfast")
    system = await start_embedded(settings)
    try:
        token = next(iter(system.settings.token_owners()))
        async with httpx.AsyncClient(base_url=system.url, headers={"Authorization": f"Bearer {token}"},
                                     timeout=60) as client:
            job = await _create_small_job(client, tmp_path / "media", ffmpeg_exe)
            await _wait_idle(client, job["id"])
            spans.clear()
            response = await client.post(f"/api/v1/jobs/{job['id']}/clips/2/regenerate",
                                         json={"instruction": "make it nighttime"})
            assert response.status_code == 202, response.text[:300]
            finished = await _wait_idle(client, job["id"])
            assert finished["status"] == "completed", finished
            request = await _wait_for_span(spans, lambda s: s.kind is SpanKind.SERVER and s.name.startswith("POST ")
                                           and s.name.endswith("/regenerate"))
            trace_id = _trace_id(request)
            # The composer's message span ends once its claim is settled, a moment after the job
            # says completed.
            await _wait_for_span(spans, lambda s: s.name == "compose.message" and _trace_id(s) == trace_id)
    finally:
        await system.stop()

    one_trace = [s for s in spans.get_finished_spans() if _trace_id(s) == trace_id]
    by_id = {s.context.span_id: s for s in one_trace}
    names = sorted({s.name for s in one_trace})

    assert request.attributes and request.attributes.get("http.route") == \
        "/api/v1/jobs/{job_id}/clips/{clip_index}/regenerate"
    begin = _one(one_trace, lambda s: s.kind is SpanKind.SERVER and s.name.endswith("/BeginRegeneration"), names)
    assert request in _ancestors(begin, by_id), "BeginRegeneration is not under the gateway's request"

    # Across the broker: the task's trace_context, written by the status service's outbox, names
    # the broker's publish span, the consumer's parent.
    regenerate = _one(one_trace, lambda s: s.name == "regenerate.message", names)
    assert begin in _ancestors(regenerate, by_id), "regenerate.message does not continue BeginRegeneration"
    assert regenerate.parent is not None
    published = by_id[regenerate.parent.span_id]
    assert (published.name, published.kind) == (f"publish {REGENERATE_QUEUE}", SpanKind.PRODUCER)
    compose = _one(one_trace, lambda s: s.name == "compose.message", names)
    assert regenerate in _ancestors(compose, by_id), "compose.message does not continue regenerate.message"
    # The job's events reach the status service's own job-events subscription in the same trace.
    notified = [s for s in one_trace if s.kind is SpanKind.CONSUMER and s.name == f"process {EVENTS_EXCHANGE}"]
    assert notified and all(by_id[s.parent.span_id].kind is SpanKind.PRODUCER for s in notified if s.parent), names

    composer_ffmpeg = [s for s in one_trace if s.name == "ffmpeg" and compose in _ancestors(s, by_id)]
    assert composer_ffmpeg, f"no ffmpeg span under compose.message; spans: {names}"
    for run in composer_ffmpeg:
        attributes = dict(run.attributes or {})
        assert attributes["process.exit.code"] == 0
        assert attributes["clipchat.ffmpeg.makes"]
        expected = attributes["clipchat.ffmpeg.expected_duration_s"]
        assert isinstance(expected, float) and expected > 0
    # The generator's render is one too, under the regenerator's message.
    assert any(s.name == "ffmpeg" and regenerate in _ancestors(s, by_id) for s in one_trace), names


async def test_a_request_is_a_server_span_of_its_own_unless_it_brings_a_traceparent(
        spans: InMemorySpanExporter) -> None:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    telemetry.instrument_app(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        # A span current where the request starts (as when asyncio hands a request the context of
        # the one before it on the connection) is not the request's parent.
        with trace.get_tracer("test").start_as_current_span("earlier request"):
            await client.get("/ping")
        await client.get("/ping", headers={"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"})
    fresh, continued = [s for s in spans.get_finished_spans() if s.name == "GET /ping"]
    assert fresh.kind is SpanKind.SERVER and fresh.parent is None
    assert continued.kind is SpanKind.SERVER and continued.parent is not None
    assert (continued.parent.trace_id, continued.parent.span_id) == (int("ab" * 16, 16), int("cd" * 8, 16))


def test_log_lines_carry_the_time_and_inside_a_span_its_trace_and_span_ids(spans: InMemorySpanExporter) -> None:
    formatter = telemetry.JsonFormatter()
    record = logging.LogRecord("clipchat.test", logging.INFO, __file__, 1, "job.created", (), None)
    record.job_id = "j1"
    outside = json.loads(formatter.format(record))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", outside["timestamp"])
    assert (outside["level"], outside["logger"], outside["event"], outside["job_id"]) == \
        ("info", "clipchat.test", "job.created", "j1")
    assert "trace_id" not in outside and "span_id" not in outside
    with trace.get_tracer("test").start_as_current_span("work") as span:
        inside = json.loads(formatter.format(record))
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert inside["span_id"] == format(span.get_span_context().span_id, "016x")


@pytest.mark.ffmpeg
async def test_each_ffmpeg_run_is_a_span_under_the_current_one(spans: InMemorySpanExporter, ffmpeg_exe: str) -> None:
    from clipchat.media.ffmpeg import FfmpegError, FfmpegRunner

    ffmpeg = FfmpegRunner(ffmpeg_exe)
    with trace.get_tracer("test").start_as_current_span("compose.message") as parent:
        parent.set_attribute("clipchat.job_id", "job-1")
        parent.set_attribute("clipchat.regeneration_id", "regen-1")
        await ffmpeg.run(["-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=0.5", "-f", "null", "-"],
                         expected_duration=0.5)
        with pytest.raises(FfmpegError):
            await ffmpeg.run(["-i", "/nonexistent/input.mp4", "-f", "mp4", "/nonexistent/out.mp4"],
                             makes="segment", quiet=True)
    ok, failed = [s for s in spans.get_finished_spans() if s.name == "ffmpeg"]
    for run in (ok, failed):
        assert run.parent is not None and run.parent.span_id == parent.get_span_context().span_id
    assert dict(ok.attributes or {}) == {"clipchat.ffmpeg.makes": "null", "clipchat.ffmpeg.expected_duration_s": 0.5,
                                         "clipchat.job_id": "job-1", "clipchat.regeneration_id": "regen-1",
                                         "process.exit.code": 0}
    assert ok.status.status_code is StatusCode.UNSET
    assert failed.attributes and failed.attributes["clipchat.ffmpeg.makes"] == "segment"
    assert failed.attributes["process.exit.code"] not in (0, None)
    assert failed.status.status_code is StatusCode.ERROR


def test_queries_are_traced_inside_a_span_and_not_on_their_own(spans: InMemorySpanExporter, tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    telemetry.instrument_engine(engine)
    telemetry.instrument_engine(engine)  # once per engine

    async def query() -> None:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def both() -> None:
        await query()  # a poll outside any span: no trace of its own
        with trace.get_tracer("test").start_as_current_span("request"):
            await query()
        await engine.dispose()

    asyncio.run(both())
    queries = [s for s in spans.get_finished_spans() if (s.attributes or {}).keys() & {"db.system", "db.system.name"}]
    assert len(queries) == 1 and queries[0].parent is not None, [(s.name, s.parent) for s in queries]


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    made: Broker
    if request.param == "memory":
        made = InMemoryBroker()
    else:
        from clipchat.broker.rabbitmq import RabbitMQBroker

        made = RabbitMQBroker(request.getfixturevalue("rabbitmq_url"), namespace=f"test-{uuid.uuid4().hex[:12]}.")
    await made.connect()
    yield made
    await made.close()
    if isinstance(made, InMemoryBroker):
        return
    from tests.integration.test_broker_contract import _delete_namespace

    await _delete_namespace(request.getfixturevalue("rabbitmq_url"), made.namespace)


async def test_a_task_is_sent_in_a_producer_span_that_is_the_consumers_parent(
        spans: InMemorySpanExporter, broker: Broker) -> None:
    received: asyncio.Queue[Delivery] = asyncio.Queue()
    subscription = await broker.consume(REGENERATE_QUEUE, lambda delivery: _put(received, delivery))
    try:
        with trace.get_tracer("test").start_as_current_span("request") as request:
            task = tasks_pb2.RegenerateTask(job_id="j1", regeneration_id="r1", lease_token="t",
                                            trace_context=telemetry.inject_headers())
        await broker.publish(REGENERATE_QUEUE, task, message_id="m1")
        async with asyncio.timeout(15):
            delivery = await received.get()
    finally:
        await subscription.cancel()
    published = _one(spans.get_finished_spans(), lambda s: s.kind is SpanKind.PRODUCER, [])
    assert published.name == f"publish {REGENERATE_QUEUE}"
    assert published.parent is not None and published.parent.span_id == request.get_span_context().span_id
    assert published.attributes and published.attributes["messaging.message.id"] == "m1"
    # The consumer continues the publish span, in the request's trace.
    parent = trace.get_current_span(telemetry.extract_context(dict(delivery.task.trace_context))).get_span_context()
    assert (parent.trace_id, parent.span_id) == (_trace_id(request), published.context.span_id)  # type: ignore[union-attr, arg-type]


async def test_a_job_event_is_handled_in_a_consumer_span_under_the_publishing_one(
        spans: InMemorySpanExporter, broker: Broker) -> None:
    handled: asyncio.Queue[trace.SpanContext] = asyncio.Queue()

    async def handler(routing_key: str, body: dict[str, Any]) -> None:
        handled.put_nowait(trace.get_current_span().get_span_context())

    subscription = await broker.subscribe_events("job.#", handler)
    try:
        with trace.get_tracer("test").start_as_current_span("write") as write:
            await broker.publish_event("job.j1.progress", {"job_id": "j1", "sequence": 1})
        async with asyncio.timeout(15):
            inside = await handled.get()
    finally:
        await subscription.cancel()
    finished = {s.context.span_id: s for s in spans.get_finished_spans()}  # type: ignore[union-attr]
    consumer = finished[inside.span_id]
    assert (consumer.name, consumer.kind) == (f"process {EVENTS_EXCHANGE}", SpanKind.CONSUMER)
    assert consumer.parent is not None
    producer = finished[consumer.parent.span_id]
    assert (producer.name, producer.kind) == (f"publish {EVENTS_EXCHANGE}", SpanKind.PRODUCER)
    assert producer.parent is not None and producer.parent.span_id == write.get_span_context().span_id
    assert consumer.attributes and consumer.attributes["messaging.rabbitmq.destination.routing_key"] == \
        "job.j1.progress"


async def test_a_watcher_woken_by_a_notification_links_to_the_span_that_sent_it(
        spans: InMemorySpanExporter) -> None:
    hub = EventHub()
    tracer = trace.get_tracer("test")

    async def watch() -> None:
        with tracer.start_as_current_span("WatchJob"):
            await hub.wait("j1", 0, timeout=15)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0)  # the watcher waits
    with tracer.start_as_current_span("write") as write:
        await hub.notify("j1", 1)
    await watcher
    watching = _one(spans.get_finished_spans(), lambda s: s.name == "WatchJob", [])
    assert [(link.context.span_id, dict(link.attributes or {})) for link in watching.links] == \
        [(write.get_span_context().span_id, {"clipchat.job_id": "j1", "clipchat.event.sequence": 1})]


async def _put(queue: asyncio.Queue[Delivery], delivery: Delivery) -> None:
    queue.put_nowait(delivery)


def _trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    chain = []
    parent = span.parent
    while parent is not None and parent.span_id in by_id:
        chain.append(by_id[parent.span_id])
        parent = by_id[parent.span_id].parent
    return chain


def _one(spans: Sequence[ReadableSpan], predicate, names: list[str]) -> ReadableSpan:  # type: ignore[no-untyped-def]
    found = [s for s in spans if predicate(s)]
    assert len(found) == 1, f"{len(found)} matching spans in the request's trace; its spans: {names}"
    return found[0]


async def _wait_for_span(spans: InMemorySpanExporter, predicate, limit: float = 30) -> ReadableSpan:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while True:
        found = [s for s in spans.get_finished_spans() if predicate(s)]
        if found:
            return found[-1]
        if time.monotonic() > deadline:
            ended = sorted({(s.name, s.kind.name) for s in spans.get_finished_spans()})
            raise AssertionError(f"no such span; ended: {ended}")
        await asyncio.sleep(0.05)


async def _wait_idle(client: httpx.AsyncClient, job_id: str, limit: float = 240) -> dict:
    """The job once nothing runs on it any more (composed, or failed)."""
    deadline = time.monotonic() + limit
    while True:
        job = (await client.get(f"/api/v1/jobs/{job_id}")).json()
        if job["status"] in ("completed", "failed") and not job["active_regeneration_id"]:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"the job is still {job['status']} after {limit:g} s")
        await asyncio.sleep(0.1)


async def _create_small_job(client: httpx.AsyncClient, folder: Path, ffmpeg_exe: str) -> dict:
    """Upload a job of three 1-second clips and a music track (``POST /jobs``); returns its JSON
    (202). The demo's six 4-second clips would make the composition eight times longer."""
    manifest = {"title": "traced", "aspect_ratio": "16:9", "beat_timestamps": [0.5 * beat for beat in range(6)],
                "clips": [{"prompt": f"a dancer on a rooftop, shot {n}", "duration": 1.0} for n in (1, 2, 3)],
                "transitions": [{"kind": "cut", "duration": 0}] * 2}
    files = await asyncio.to_thread(_small_job_files, folder, ffmpeg_exe)
    response = await client.post("/api/v1/jobs", data={"manifest": json.dumps(manifest)}, files=files)
    assert response.status_code == 202, response.text[:300]
    created: dict = response.json()
    return created


def _small_job_files(folder: Path, ffmpeg_exe: str) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Three 1-second test-pattern clips and 3 s of music, as ``POST /jobs`` form files."""
    from tests.fakes.prediction_server import render_sample_mp4

    folder.mkdir()
    clips = [render_sample_mp4(folder / f"clip{index}.mp4", ffmpeg=ffmpeg_exe) for index in range(3)]
    music = folder / "music.m4a"
    subprocess.run([ffmpeg_exe, "-nostdin", "-y", "-hide_banner", "-loglevel", "error", "-f", "lavfi",
                    "-i", "sine=frequency=220:sample_rate=48000:duration=3", "-c:a", "aac", str(music)],
                   check=True, capture_output=True, timeout=60)
    files = [("clips", (clip.name, clip.read_bytes(), "video/mp4")) for clip in clips]
    files.append(("audio", (music.name, music.read_bytes(), "audio/mp4")))
    return files
