"""One regeneration is one trace across the service processes, from the caller's ``traceparent`` to
the composer's ffmpeg runs.

Each service is its own ``clipchat serve`` process (the session's ``distributed`` stack: PostgreSQL,
RabbitMQ, moto S3), exporting its spans over OTLP/gRPC to a fake collector in this process
(``tests/fakes/otlp_collector.py``): processes cannot share an in-memory exporter. The regeneration
is the session's ``traced_regeneration``, which the metrics test reads too. The test follows the
spans by their ids: the gateway's request under the caller's span, the status service's RPC under
it, the status service's publish spans and the workers' CONSUMER spans under them across RabbitMQ,
and the ffmpeg runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from clipchat.broker.topology import COMPOSE_QUEUE, EVENTS_EXCHANGE, REGENERATE_QUEUE
from tests.e2e.conftest import RunningClipChat, TracedRegeneration
from tests.fakes.otlp_collector import CollectedSpan

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.s3, pytest.mark.ffmpeg]


# Setting up may start the four services and compose the demo job; the regeneration composes it again.
@pytest.mark.timeout(900)
def test_one_regeneration_is_one_trace_across_the_services_and_rabbitmq(
        distributed: RunningClipChat, traced_regeneration: TracedRegeneration) -> None:
    system, collector = distributed, distributed.collector
    assert collector is not None
    job_id, regeneration_id = traced_regeneration.job_id, traced_regeneration.regeneration_id
    trace_id, caller_span = traced_regeneration.trace_id, traced_regeneration.caller_span

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


def _json(line: str) -> dict:
    try:
        parsed = json.loads(line)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
