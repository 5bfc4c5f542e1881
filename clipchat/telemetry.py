"""Structured logs and OpenTelemetry tracing (exported over OTLP when configured)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from opentelemetry import propagate, trace

_configured = False


class JsonFormatter(logging.Formatter):
    """One JSON object a line: the event name plus its fields."""

    _skip = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"level": record.levelname.lower(), "logger": record.name,
                                 "event": record.getMessage()}
        entry.update({k: v for k, v in record.__dict__.items() if k not in self._skip})
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
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

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers() -> dict[str, str]:
    """The current trace context as message headers (W3C traceparent), for RabbitMQ messages."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(headers: dict[str, Any] | None) -> Any:
    return propagate.extract({k: str(v) for k, v in (headers or {}).items()})


def server_interceptors() -> list[Any]:
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]


def client_interceptors() -> list[Any]:
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())
