"""clipchat.metrics: each recording function moves its series, Prometheus reads them in its text format.

The provider is one per process and its counters only grow, so each test compares values before and
after what it records.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clipchat import metrics
from clipchat.settings import Settings


def samples() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the process's metrics: (name, labels) → value."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(name: str, **labels: str) -> float:
    return samples().get((name, frozenset(labels.items())), 0.0)


def test_every_listed_name_is_exported_once_recorded() -> None:
    metrics.regeneration_finished("failed", "generation_failed")
    with metrics.stage_timer("rewrite"):
        pass
    metrics.message_published("clipchat.regenerate")
    metrics.queue_waited("clipchat.regenerate", 0.2)
    metrics.composition_finished(1.5, encoder="libx264", kind="full")
    metrics.encoder_selected("libx264", fell_back=False)
    metrics.segment_cache_lookup(hit=True)
    metrics.dead_lettered("clipchat.compose", "attempt_limit")
    metrics.lease_expired("lease")
    metrics.cost_recorded("rewrite", Decimal("0.01"))
    names = {name for name, _ in samples()}
    for name in metrics.METRIC_NAMES:
        base = name if name in names else f"{name}_count"  # histograms show _bucket/_sum/_count
        assert base in names, name
        assert name.startswith("clipchat_")


def test_regenerations_count_by_outcome_and_error_code() -> None:
    before = value(metrics.REGENERATIONS, outcome="failed", error_code="rewrite_failed")
    completed = value(metrics.REGENERATIONS, outcome="completed", error_code="")
    metrics.regeneration_finished("failed", "rewrite_failed")
    metrics.regeneration_finished("failed", "rewrite_failed")
    metrics.regeneration_finished("completed")
    assert value(metrics.REGENERATIONS, outcome="failed", error_code="rewrite_failed") == before + 2
    assert value(metrics.REGENERATIONS, outcome="completed", error_code="") == completed + 1


def test_a_stage_that_raises_is_timed_as_an_error_and_the_error_goes_on() -> None:
    count = f"{metrics.STAGE_DURATION}_count"
    ok, error = value(count, stage="generate", outcome="ok"), value(count, stage="generate", outcome="error")
    with pytest.raises(RuntimeError), metrics.stage_timer("generate"):
        raise RuntimeError("provider down")
    with metrics.stage_timer("generate"):
        pass
    assert value(count, stage="generate", outcome="error") == error + 1
    assert value(count, stage="generate", outcome="ok") == ok + 1


def test_histograms_sum_the_seconds_in_their_buckets() -> None:
    total = value(f"{metrics.QUEUE_WAIT}_sum", queue="clipchat.compose")
    in_first_second = value(f"{metrics.QUEUE_WAIT}_bucket", queue="clipchat.compose", le="1.0")
    metrics.queue_waited("clipchat.compose", 0.75)
    metrics.queue_waited("clipchat.compose", -3.0)  # the publisher's clock ahead: counted as no wait
    assert value(f"{metrics.QUEUE_WAIT}_sum", queue="clipchat.compose") == pytest.approx(total + 0.75)
    assert value(f"{metrics.QUEUE_WAIT}_bucket", queue="clipchat.compose", le="1.0") == in_first_second + 2

    seconds = value(f"{metrics.COMPOSITION_DURATION}_sum", encoder="h264_nvenc", kind="incremental")
    metrics.composition_finished(4.0, encoder="h264_nvenc", kind="incremental")
    assert value(f"{metrics.COMPOSITION_DURATION}_sum", encoder="h264_nvenc",
                 kind="incremental") == pytest.approx(seconds + 4.0)


def test_the_encoder_gauge_names_one_encoder_and_a_fallback_is_counted() -> None:
    fallbacks = value(metrics.NVENC_FALLBACKS)
    metrics.encoder_selected("h264_nvenc", fell_back=False)
    assert value(metrics.ENCODER_IN_USE, encoder="h264_nvenc") == 1
    assert value(metrics.ENCODER_IN_USE, encoder="libx264") == 0
    assert value(metrics.NVENC_FALLBACKS) == fallbacks
    metrics.encoder_selected("libx264", fell_back=True)
    assert value(metrics.ENCODER_IN_USE, encoder="libx264") == 1
    assert value(metrics.ENCODER_IN_USE, encoder="h264_nvenc") == 0
    assert value(metrics.NVENC_FALLBACKS) == fallbacks + 1


def test_cache_lookups_give_a_hit_ratio() -> None:
    hits = value(metrics.SEGMENT_CACHE_LOOKUPS, result="hit")
    misses = value(metrics.SEGMENT_CACHE_LOOKUPS, result="miss")
    for hit in (True, True, True, False):
        metrics.segment_cache_lookup(hit)
    assert value(metrics.SEGMENT_CACHE_LOOKUPS, result="hit") - hits == 3
    assert value(metrics.SEGMENT_CACHE_LOOKUPS, result="miss") - misses == 1


def test_rare_events_start_at_zero_so_their_first_increase_shows() -> None:
    current = samples()
    for queue in ("clipchat.regenerate", "clipchat.compose"):
        assert (metrics.DEAD_LETTERED, frozenset({"queue": queue, "reason": "attempt_limit"}.items())) in current
        assert (metrics.MESSAGES_PUBLISHED, frozenset({"queue": queue}.items())) in current
    for kind in ("lease", "claim"):
        assert (metrics.LEASE_EXPIRIES, frozenset({"kind": kind}.items())) in current


def test_dead_letters_lease_expiries_and_costs_add_up() -> None:
    dead = value(metrics.DEAD_LETTERED, queue="clipchat.regenerate", reason="handler_error")
    claims = value(metrics.LEASE_EXPIRIES, kind="claim")
    spent = value(metrics.COST, step="generate")
    metrics.dead_lettered("clipchat.regenerate", "handler_error")
    metrics.lease_expired("claim")
    metrics.cost_recorded("generate", Decimal("0.3000"))
    metrics.cost_recorded("generate", Decimal("0"))
    assert value(metrics.DEAD_LETTERED, queue="clipchat.regenerate", reason="handler_error") == dead + 1
    assert value(metrics.LEASE_EXPIRIES, kind="claim") == claims + 1
    assert value(metrics.COST, step="generate") == pytest.approx(spent + 0.3)


def test_serve_answers_prometheus_on_its_own_port() -> None:
    port = metrics.serve("127.0.0.1", 0)
    try:
        metrics.message_published("clipchat.compose")
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert response.status_code == 200
        assert f'{metrics.MESSAGES_PUBLISHED}{{queue="clipchat.compose"}}' in response.text
    finally:
        metrics.stop_serving()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_a_busy_port_raises_oserror() -> None:
    port = metrics.serve("127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            metrics.serve("127.0.0.1", port)
    finally:
        metrics.stop_serving()


# --- the gateway's /metrics in embedded mode --------------------------------------------------------


async def test_embedded_gateway_serves_the_whole_process_at_metrics(tmp_path: Path) -> None:
    """One process: what the composer recorded at start (its encoder) is on the gateway's /metrics,
    without a token, and the route is not part of the API document."""
    from launcher.system import start_embedded

    settings = Settings(data_dir=tmp_path, gateway_port=0, encoder="libx264")
    system = await start_embedded(settings)
    try:
        async with httpx.AsyncClient(base_url=system.url, timeout=10) as client:
            response = await client.get("/metrics")
            openapi = (await client.get("/openapi.json")).json()
    finally:
        await system.stop()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    [in_use] = [s for s in families[metrics.ENCODER_IN_USE].samples if s.labels["encoder"] == "libx264"]
    assert in_use.value == 1
    # Every process exports the rare events from zero, the broker's too.
    assert metrics.DEAD_LETTERED.removesuffix("_total") in families
    assert "/metrics" not in openapi["paths"]


# --- the broker's own --------------------------------------------------------------------------------


async def test_the_broker_counts_publishes_queue_waits_and_dead_letters() -> None:
    import asyncio

    from clipchat.broker import REGENERATE_QUEUE, Delivery
    from clipchat.broker.memory import InMemoryBroker
    from clipchat.v1 import tasks_pb2

    published = value(metrics.MESSAGES_PUBLISHED, queue=REGENERATE_QUEUE)
    waits = value(f"{metrics.QUEUE_WAIT}_count", queue=REGENERATE_QUEUE)
    dead = value(metrics.DEAD_LETTERED, queue=REGENERATE_QUEUE, reason="handler_error")
    handled: asyncio.Queue[Delivery] = asyncio.Queue()

    async def handler(delivery: Delivery) -> None:
        await handled.put(delivery)
        if delivery.task.job_id == "poison":
            raise ValueError("cannot be handled")

    broker = InMemoryBroker()
    await broker.connect()
    try:
        for job_id in ("job", "poison"):
            await broker.publish(REGENERATE_QUEUE, tasks_pb2.RegenerateTask(job_id=job_id), message_id=job_id)
        await broker.consume(REGENERATE_QUEUE, handler)
        first, second = await handled.get(), await handled.get()
    finally:
        await broker.close()  # lets the handlers in hand finish: the poison one is dead-lettered
    await broker.connect()
    assert [d.message_id for d in await broker.dead_letters()] == ["poison"]
    assert first.queued_at > 0 and second.queued_at > 0
    assert value(metrics.MESSAGES_PUBLISHED, queue=REGENERATE_QUEUE) == published + 2
    assert value(f"{metrics.QUEUE_WAIT}_count", queue=REGENERATE_QUEUE) == waits + 2
    assert value(metrics.DEAD_LETTERED, queue=REGENERATE_QUEUE, reason="handler_error") == dead + 1


async def test_serve_names_the_setting_when_the_metrics_port_is_busy(tmp_path: Path) -> None:
    """`clipchat serve` stops with one line naming CLIPCHAT_METRICS_PORT, before anything else starts."""
    import asyncio
    import socket

    from launcher.errors import StartupError
    from launcher.system import serve_one

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = Settings(data_dir=tmp_path, metrics_port=taken.getsockname()[1])
        with pytest.raises(StartupError, match="CLIPCHAT_METRICS_PORT") as raised:
            await serve_one("regenerator", settings, asyncio.Event())
    assert "\n" not in str(raised.value)
