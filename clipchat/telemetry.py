"""Structured logs and OpenTelemetry tracing (exported over OTLP/gRPC when configured).

Spans come from the maintained instrumentations where one exists: grpc (``server_interceptors``,
``client_interceptors``), FastAPI/ASGI (``instrument_app``), httpx (every client, from
``configure``) and SQLAlchemy (``instrument_engine``).

Across the broker the trace goes as follows, the same way on RabbitMQ and on the in-process broker:

- A work message carries the trace in its protobuf ``trace_context`` field. The status service
  writes it into the outbox with the state change, in the request's span (``inject_headers``); the
  outbox relay publishes it later, outside that span, so the context has to travel with the stored
  body: AMQP headers set at publish time would name the relay's context, not the request's, and
  the delay and dead-letter queues copy the body as it is. The broker's ``publish`` is a PRODUCER
  span continuing that context (``producer_span``) and writes its own context into the field it
  sends, so the worker's CONSUMER span is the producer's child, in another process.
- A job-events notification carries the trace in its message headers (``traceparent``, from the
  publishing span); the subscriber handles it in a CONSUMER span that is the producer's child
  (``consumer_span``). The body stays the event itself.

The maintained aio-pika instrumentation is not used: its current release pins
opentelemetry-instrumentation and its semantic conventions to 0.66b1 exactly while the
instrumentations above are at 0.66b2, so pip falls back to 0.43b0, which declares
``aio_pika < 10`` and refuses to instrument aio-pika 10. It would also miss the events subscriber
(it wraps ``Queue.consume``; events are read with ``Queue.iterator``) and the in-process broker,
and its publish span would start in the outbox relay's context. The spans here follow the same
messaging conventions (``messaging.system``, ``messaging.destination.name``, the operation).
"""

from __future__ import annotations

import json
import logging
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fastapi import FastAPI
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine
    from starlette.types import ASGIApp, Receive, Scope, Send

_configured = False
# Probes and scrapes call these every few seconds; a span each would drown the requests people make.
_UNTRACED_URLS = "/api/v1/healthz,/api/v1/readyz,/metrics"
_instrumented_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, event, its fields and, inside a
    span, the trace and span ids."""

    _skip = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        timestamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry: dict[str, Any] = {"timestamp": timestamp.replace("+00:00", "Z"), "level": record.levelname.lower(),
                                 "logger": record.name, "event": record.getMessage()}
        entry.update({k: v for k, v in record.__dict__.items() if k not in self._skip})
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(service_name: str, *, otlp_endpoint: str = "", log_level: str = "INFO",
              log_file: Path | None = None) -> None:
    """Set up logging and tracing once per process.

    Logs go to stderr as JSON lines; with ``log_file`` they go there instead and only warnings
    reach the terminal (embedded mode, where a person reads the terminal).
    """
    global _configured
    if _configured:
        return
    _configured = True
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(JsonFormatter())
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        console.setLevel(logging.WARNING)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file)
        to_file.setFormatter(JsonFormatter())
        handlers.append(to_file)
    root = logging.getLogger("clipchat")
    root.handlers[:] = handlers
    root.setLevel(log_level.upper())
    root.propagate = False

    provider = tracer_provider(service_name)
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    instrument_httpx()


def tracer_provider(service_name: str) -> TracerProvider:
    """A tracer provider that names ``service_name`` in its spans; no exporter yet."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    return TracerProvider(resource=Resource.create({"service.name": service_name}))


def instrument_app(app: FastAPI) -> None:
    """A server span for each HTTP request to ``app``, continuing an incoming ``traceparent``.

    Health probes are left out, and so are the per-message send/receive spans (an SSE stream
    would add one per event).
    """
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, excluded_urls=_UNTRACED_URLS, exclude_spans=["receive", "send"])
    build = app.build_middleware_stack

    def build_with_fresh_context() -> ASGIApp:
        return _FreshTraceContext(build())

    app.build_middleware_stack = build_with_fresh_context  # type: ignore[method-assign]


class _FreshTraceContext:
    """Starts each request from an empty trace context, so its span is a server span of its own.

    On the asyncio loop a request's task can inherit the context of the one before it on the same
    connection (python/cpython#140947; with uvicorn, after a body over 64 KiB): the request's span
    would then be an INTERNAL child of an unrelated, finished request. An incoming ``traceparent``
    is still continued: the instrumentation reads it from the request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = otel_context.attach(otel_context.Context())
        try:
            await self.app(scope, receive, send)
        finally:
            otel_context.detach(token)


def instrument_httpx() -> None:
    """A client span for each request of every httpx client in this process, with ``traceparent``
    sent along (the providers' APIs, the LLM). Once per process; later calls do nothing."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    instrumentor = HTTPXClientInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()


def instrument_engine(engine: AsyncEngine | Engine) -> None:
    """A client span for each statement run on ``engine`` (an async engine's ``sync_engine``).

    Once per engine; later calls do nothing. Statements run outside any span are not traced.
    """
    from opentelemetry import metrics
    from opentelemetry.instrumentation.sqlalchemy import __name__ as scope
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.instrumentation.sqlalchemy.version import __version__
    from sqlalchemy.engine import Engine as SyncEngine

    sync_engine = engine if isinstance(engine, SyncEngine) else engine.sync_engine
    if sync_engine in _instrumented_engines:
        return
    _instrumented_engines.add(sync_engine)
    # What SQLAlchemyInstrumentor.instrument(engine=...) does, without its once-per-process
    # guard: a process here has several engines (the read and write ones, per database).
    connections = metrics.get_meter(scope, __version__).create_up_down_counter(
        "db.client.connections.usage", unit="connections",
        description="The number of connections that are currently in state described by the state attribute.")
    EngineTracer(_InsideSpansOnly(trace.get_tracer(scope, __version__)), sync_engine, connections)


class _InsideSpansOnly(trace.Tracer):
    """A tracer whose spans only start inside another span.

    Queries are traced inside a request or a message; the outbox relay's and the lease sweeper's
    polls (every second, outside any span) would otherwise each be a trace of their own.
    """

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def start_span(self, name: str, context: Context | None = None, *args: Any, **kwargs: Any) -> trace.Span:
        if not trace.get_current_span(context).get_span_context().is_valid:
            return trace.INVALID_SPAN
        return self._tracer.start_span(name, context, *args, **kwargs)

    def start_as_current_span(self, name: str, context: Context | None = None, *args: Any,
                              **kwargs: Any) -> Any:
        if not trace.get_current_span(context).get_span_context().is_valid:
            return trace.use_span(trace.INVALID_SPAN)
        return self._tracer.start_as_current_span(name, context, *args, **kwargs)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers() -> dict[str, str]:
    """The current trace context as message headers (W3C ``traceparent``), for messages."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, Any] | None) -> Context:
    """The trace context in message ``headers`` (an empty one when they carry none); AMQP header
    values may arrive as bytes."""
    carrier = {k: v.decode(errors="replace") if isinstance(v, bytes) else str(v) for k, v in (headers or {}).items()}
    return propagate.extract(carrier)


@contextmanager
def producer_span(system: str, destination: str, *, operation: str = "publish", parent: Context | None = None,
                  message_id: str = "", routing_key: str = "") -> Iterator[dict[str, str]]:
    """A PRODUCER span around sending one message to ``destination`` (a queue or an exchange),
    a child of ``parent`` (the current span when None); yields the headers that make the
    receiver's span its child."""
    attributes: dict[str, Any] = {"messaging.system": system, "messaging.destination.name": destination,
                                  "messaging.operation.name": operation, "messaging.operation.type": "send"}
    if message_id:
        attributes["messaging.message.id"] = message_id
    if routing_key:
        attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
    with tracer("clipchat.broker").start_as_current_span(f"{operation} {destination}", context=parent,
                                                         kind=trace.SpanKind.PRODUCER, attributes=attributes):
        yield inject_headers()


@contextmanager
def consumer_span(system: str, destination: str, headers: Mapping[str, Any] | None, *,
                  routing_key: str = "", message_id: str = "") -> Iterator[trace.Span]:
    """A CONSUMER span around handling one message from ``destination``, a child of the producer's
    span named in its ``headers`` (a trace of its own when they name none)."""
    attributes: dict[str, Any] = {"messaging.system": system, "messaging.destination.name": destination,
                                  "messaging.operation.name": "process", "messaging.operation.type": "process"}
    if message_id:
        attributes["messaging.message.id"] = message_id
    if routing_key:
        attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
    with tracer("clipchat.broker").start_as_current_span(
            f"process {destination}", context=extract_context(headers), kind=trace.SpanKind.CONSUMER,
            attributes=attributes) as span:
        yield span


def server_interceptors() -> list[Any]:
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]


def client_interceptors() -> list[Any]:
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())
