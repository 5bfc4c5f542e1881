"""Metrics: OpenTelemetry instruments, read by Prometheus.

Each thing is counted at the one place it happens, through the functions below (``regeneration_finished``
in the status service's state machine, ``stage_finished`` around a regeneration's steps, …). The
instruments belong to one ``MeterProvider`` per process, made on first use, whose
``PrometheusMetricReader`` feeds a registry of its own (``registry()``). It is also the process's
global meter provider, so the instrumentations' own metrics (HTTP server durations, database
connections) land there too. Nothing is exported by push: Prometheus scrapes

- the gateway at ``GET /metrics`` (``render``); in embedded mode, one process, that covers every
  service;
- each gRPC service (``clipchat serve status|regenerator|composer``) on ``CLIPCHAT_METRICS_PORT``
  (``serve``; 0 = off).

Names follow Prometheus' conventions: a ``clipchat_`` prefix, the unit in the name (``_seconds``,
``_dollars``) and ``_total`` on counters. ``METRIC_NAMES`` lists every name as Prometheus shows it
(the alert rules in ``deploy/k8s`` may use only these).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram, _Gauge
    from prometheus_client import CollectorRegistry

# Seconds, for a few milliseconds up to a long video generation.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                    600.0, 1200.0)
ENCODERS = ("h264_nvenc", "libx264")
DEAD_LETTER_REASONS = ("attempt_limit", "handler_error", "undecodable")

# Every series this module defines, as Prometheus names it (histograms add _bucket, _sum, _count).
REGENERATIONS = "clipchat_regenerations_total"
STAGE_DURATION = "clipchat_stage_duration_seconds"
MESSAGES_PUBLISHED = "clipchat_messages_published_total"
QUEUE_WAIT = "clipchat_queue_wait_seconds"
COMPOSITION_DURATION = "clipchat_composition_duration_seconds"
ENCODER_IN_USE = "clipchat_encoder_in_use"
NVENC_FALLBACKS = "clipchat_nvenc_fallbacks_total"
SEGMENT_CACHE_LOOKUPS = "clipchat_segment_cache_lookups_total"
DEAD_LETTERED = "clipchat_dead_lettered_messages_total"
LEASE_EXPIRIES = "clipchat_lease_expiries_total"
COST = "clipchat_cost_dollars_total"
METRIC_NAMES = (REGENERATIONS, STAGE_DURATION, MESSAGES_PUBLISHED, QUEUE_WAIT, COMPOSITION_DURATION,
                ENCODER_IN_USE, NVENC_FALLBACKS, SEGMENT_CACHE_LOOKUPS, DEAD_LETTERED, LEASE_EXPIRIES, COST)


@dataclass(frozen=True)
class _Instruments:
    regenerations: Counter
    stage_duration: Histogram
    messages_published: Counter
    queue_wait: Histogram
    composition_duration: Histogram
    encoder_in_use: _Gauge
    nvenc_fallbacks: Counter
    segment_cache_lookups: Counter
    dead_lettered: Counter
    lease_expiries: Counter
    cost: Counter


_lock = threading.Lock()
_state: tuple[CollectorRegistry, _Instruments] | None = None
_servers: dict[tuple[str, int], object] = {}


def _instruments() -> _Instruments:
    return _configure()[1]


def registry() -> CollectorRegistry:
    """The Prometheus registry this process's metrics are read from."""
    return _configure()[0]


def _configure() -> tuple[CollectorRegistry, _Instruments]:
    """The provider, its reader and the instruments: made once per process, on first use."""
    global _state
    with _lock:
        if _state is None:
            _state = _build()
        return _state


def _build() -> tuple[CollectorRegistry, _Instruments]:
    from opentelemetry import metrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import CollectorRegistry

    prometheus = CollectorRegistry(auto_describe=True)
    # No otel_scope_* labels: one scope, and every series would carry them.
    reader = PrometheusMetricReader(scope_info_enabled=False, registry=prometheus)
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create({"service.name": "clipchat"}))
    metrics.set_meter_provider(provider)
    meter = provider.get_meter("clipchat")

    def seconds(name: str, description: str) -> Histogram:
        return meter.create_histogram(name, unit="s", description=description,
                                      explicit_bucket_boundaries_advisory=DURATION_BUCKETS)

    instruments = _Instruments(
        regenerations=meter.create_counter(
            "clipchat_regenerations", description="Regenerations that finished, by outcome "
            "(completed, failed, cancelled) and error code (failed ones)."),
        stage_duration=seconds("clipchat_stage_duration", "Time one step of a regeneration took (stage: "
                               "rewrite, generate, compose), by outcome (ok, error)."),
        messages_published=meter.create_counter(
            "clipchat_messages_published", description="New work messages published, by work queue "
            "(retries of a message not counted)."),
        queue_wait=seconds("clipchat_queue_wait", "Time a work message waited in its queue before a worker "
                           "started it (a retry: from the end of its delay)."),
        composition_duration=seconds("clipchat_composition_duration", "Wall time of one composition "
                                     "(download, encode, mux, check, upload), by encoder and kind "
                                     "(full; incremental: segments reused from the cache)."),
        encoder_in_use=meter.create_gauge(
            "clipchat_encoder_in_use", description="1 for the H.264 encoder this composer uses, 0 for the other."),
        nvenc_fallbacks=meter.create_counter(
            "clipchat_nvenc_fallbacks", description="Times a composer wanted NVENC (encoder auto or "
            "h264_nvenc) and fell back to libx264 because the test encode failed."),
        segment_cache_lookups=meter.create_counter(
            "clipchat_segment_cache_lookups", description="Segment cache lookups, by result (hit, miss)."),
        dead_lettered=meter.create_counter(
            "clipchat_dead_lettered_messages", description="Work messages sent to the dead-letter queue, by "
            "work queue and reason (attempt_limit, handler_error, undecodable)."),
        lease_expiries=meter.create_counter(
            "clipchat_lease_expiries", description="Work whose worker stopped renewing it: leases that "
            "expired (the regeneration failed) and claims that lapsed (another delivery took over)."),
        cost=meter.create_counter(
            "clipchat_cost_dollars", description="Money spent, by step (rewrite, generate, compose)."),
    )
    _start_at_zero(instruments)
    return prometheus, instruments


def _start_at_zero(instruments: _Instruments) -> None:
    """The rare events' series exist from the start, at 0: Prometheus' ``increase`` then sees their
    first occurrence (a series born at 1 shows no increase)."""
    from clipchat.broker.topology import WORK_QUEUES

    for queue in WORK_QUEUES:
        instruments.messages_published.add(0, {"queue": queue})
        for reason in DEAD_LETTER_REASONS:
            instruments.dead_lettered.add(0, {"queue": queue, "reason": reason})
    for kind in ("lease", "claim"):
        instruments.lease_expiries.add(0, {"kind": kind})
    instruments.nvenc_fallbacks.add(0)
    for outcome in ("completed", "cancelled"):
        instruments.regenerations.add(0, {"outcome": outcome, "error_code": ""})


# --- what the services record ---------------------------------------------------------------------


def regeneration_finished(outcome: str, error_code: str = "") -> None:
    """A regeneration ended: ``outcome`` is completed, failed or cancelled."""
    _instruments().regenerations.add(1, {"outcome": outcome, "error_code": error_code})


@contextmanager
def stage_timer(stage: str) -> Iterator[None]:
    """Time the block as one run of ``stage``; an exception counts as outcome "error" and goes on."""
    started = time.monotonic()
    outcome = "error"
    try:
        yield
        outcome = "ok"
    finally:
        _instruments().stage_duration.record(time.monotonic() - started, {"stage": stage, "outcome": outcome})


def message_published(queue: str) -> None:
    """A new work message went to ``queue`` (confirmed by the broker)."""
    _instruments().messages_published.add(1, {"queue": queue})


def queue_waited(queue: str, seconds: float) -> None:
    """A worker started a message of ``queue`` that had waited ``seconds`` (clock skew: never below 0)."""
    _instruments().queue_wait.record(max(seconds, 0.0), {"queue": queue})


def composition_finished(seconds: float, *, encoder: str, kind: str) -> None:
    """A composition was made in ``seconds`` with ``encoder``; ``kind`` is full, or incremental when
    it reused cached segments."""
    _instruments().composition_duration.record(seconds, {"encoder": encoder, "kind": kind})


def encoder_selected(encoder: str, *, fell_back: bool) -> None:
    """The composer encodes with ``encoder`` from now on; ``fell_back`` when it wanted NVENC."""
    instruments = _instruments()
    for name in {*ENCODERS, encoder}:
        instruments.encoder_in_use.set(1 if name == encoder else 0, {"encoder": name})
    if fell_back:
        instruments.nvenc_fallbacks.add(1)


def segment_cache_lookup(hit: bool) -> None:
    """A segment cache lookup found a usable entry (``hit``) or not (a miss: the piece is made)."""
    _instruments().segment_cache_lookups.add(1, {"result": "hit" if hit else "miss"})


def dead_lettered(queue: str, reason: str) -> None:
    """A message of ``queue`` went to the dead-letter queue."""
    _instruments().dead_lettered.add(1, {"queue": queue, "reason": reason})


def lease_expired(kind: str) -> None:
    """``kind`` "lease": the status service failed work whose lease expired; "claim": a delivery took
    over work whose claim had lapsed."""
    _instruments().lease_expiries.add(1, {"kind": kind})


def cost_recorded(step: str, dollars: Decimal | float) -> None:
    """``dollars`` were spent on ``step``; zero amounts are not recorded."""
    if dollars:
        _instruments().cost.add(float(dollars), {"step": step})


# --- how Prometheus reads them --------------------------------------------------------------------


def render() -> tuple[bytes, str]:
    """The metrics in Prometheus' text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry()), CONTENT_TYPE_LATEST


def serve(host: str, port: int) -> int:
    """Serve ``GET /metrics`` on ``host:port`` from a thread, until the process ends; the port bound.

    Raises ``OSError`` when the port cannot be bound.
    """
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry())
    bound = int(server.server_address[1])
    _servers[(host, bound)] = server
    return bound


def stop_serving() -> None:
    """Stop every server ``serve`` started."""
    while _servers:
        _, server = _servers.popitem()
        server.shutdown()  # type: ignore[attr-defined]
        server.server_close()  # type: ignore[attr-defined]
