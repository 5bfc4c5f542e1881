"""Each service process's metrics after a regeneration through the distributed stack (the session's
``traced_regeneration``, which the trace test reads too).

The status, regenerator and composer processes serve Prometheus on their ``CLIPCHAT_METRICS_PORT``,
the gateway at ``/metrics``; each shows what it did, with values above zero where work happened.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clipchat import metrics
from clipchat.broker.topology import COMPOSE_QUEUE, REGENERATE_QUEUE
from tests.e2e.conftest import RunningClipChat, TracedRegeneration

# A composition and a recomposition on a busy two-core machine take minutes.
pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.s3, pytest.mark.ffmpeg,
              pytest.mark.timeout(900)]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, f"{url}: {response.status_code}"
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over the series whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, series), v in samples.items() if n == name and wanted <= series)


def test_each_service_shows_the_work_it_did(distributed: RunningClipChat,
                                            traced_regeneration: TracedRegeneration) -> None:
    assert set(distributed.metrics_urls) == {"status", "regenerator", "composer"}
    status = scrape(distributed.metrics_urls["status"])
    regenerator = scrape(distributed.metrics_urls["regenerator"])
    composer = scrape(distributed.metrics_urls["composer"])
    gateway = scrape(f"{distributed.url}/metrics")

    # The status service: the outcome, what it cost, the work it queued (its outbox relay publishes).
    assert value(status, metrics.REGENERATIONS, outcome="completed") >= 1
    # Embedded defaults: the template rewriter and the local generator are free, composing is not.
    assert value(status, metrics.COST, step="compose") > 0
    assert value(status, metrics.MESSAGES_PUBLISHED, queue=REGENERATE_QUEUE) >= 1
    assert value(status, metrics.MESSAGES_PUBLISHED, queue=COMPOSE_QUEUE) >= 2  # the demo's and the new one

    # The regenerator: its steps, timed, and how long the message waited for it.
    for stage in ("rewrite", "generate"):
        assert value(regenerator, f"{metrics.STAGE_DURATION}_count", stage=stage, outcome="ok") >= 1, stage
        assert value(regenerator, f"{metrics.STAGE_DURATION}_sum", stage=stage) > 0, stage
    assert value(regenerator, f"{metrics.QUEUE_WAIT}_count", queue=REGENERATE_QUEUE) >= 1

    # The composer: compositions and their seconds, the encoder, the segment cache.
    assert value(composer, f"{metrics.STAGE_DURATION}_count", stage="compose", outcome="ok") >= 1
    assert value(composer, f"{metrics.COMPOSITION_DURATION}_count") >= 2
    assert value(composer, f"{metrics.COMPOSITION_DURATION}_sum") > 0
    assert value(composer, f"{metrics.QUEUE_WAIT}_count", queue=COMPOSE_QUEUE) >= 2
    assert value(composer, metrics.SEGMENT_CACHE_LOOKUPS, result="miss") >= 1
    # After one clip changed, the rest of the video came from the cache.
    assert value(composer, metrics.SEGMENT_CACHE_LOOKUPS, result="hit") >= 1
    readiness = httpx.get(f"{distributed.url}/api/v1/readyz", timeout=10).json()["composer"]
    encoder = readiness["encoder"]
    assert value(composer, metrics.ENCODER_IN_USE, encoder=encoder) == 1
    assert value(composer, metrics.ENCODER_IN_USE) == 1  # one encoder in use, the other at 0
    # Readiness and the metrics agree on a fallback (on a machine without NVENC: libx264, fell back).
    assert value(composer, metrics.NVENC_FALLBACKS) == (1 if readiness["encoder_fallback"] else 0)
    assert readiness["encoder_fallback"] == (encoder == "libx264")

    # The gateway's own process: served, with the series every process starts at zero.
    assert value(gateway, metrics.DEAD_LETTERED, queue=COMPOSE_QUEUE, reason="attempt_limit") == 0
    # Nothing went wrong anywhere.
    for samples in (status, regenerator, composer):
        assert value(samples, metrics.DEAD_LETTERED) == 0
        assert value(samples, metrics.LEASE_EXPIRIES, kind="lease") == 0
