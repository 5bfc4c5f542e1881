"""A fake OpenTelemetry collector: takes OTLP/gRPC trace exports, as a real collector on 4317 does,
and keeps the spans for a test to read.

The services export with the SDK's OTLP/gRPC exporter when ``CLIPCHAT_OTLP_ENDPOINT`` names this
collector's URL; ``OTEL_BSP_SCHEDULE_DELAY`` (milliseconds) makes their batch processors send
ended spans soon instead of every five seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

T = TypeVar("T")


@dataclass(frozen=True)
class CollectedSpan:
    service: str  # the exporting process's service.name
    name: str
    kind: str  # SERVER, CLIENT, PRODUCER, CONSUMER or INTERNAL
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]  # (trace id, span id) of each linked span
    error: bool

    def __str__(self) -> str:
        return f"{self.service}: {self.name} ({self.kind}) {self.span_id} <- {self.parent_span_id or 'root'}"


class OtlpCollector:
    """An OTLP/gRPC ``TraceService`` on 127.0.0.1 in a thread pool. ``start`` returns its URL."""

    def __init__(self) -> None:
        self._spans: list[CollectedSpan] = []
        self._changed = threading.Condition()
        self._server: grpc.Server | None = None

    def start(self) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-collector"))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self._receive), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1).wait()
            self._server = None

    def spans(self) -> list[CollectedSpan]:
        with self._changed:
            return list(self._spans)

    def wait_for(self, found: Callable[[list[CollectedSpan]], T | None], what: str, limit: float = 60) -> T:
        """The first truthy ``found(spans)`` as spans arrive; fails with what arrived after ``limit``
        seconds (a readiness wait for the exporters' batches, not a speed check)."""
        deadline = time.monotonic() + limit
        with self._changed:
            while True:
                result = found(list(self._spans))
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    arrived = "\n".join(sorted({f"{s.service}: {s.name} ({s.kind})" for s in self._spans}))
                    raise AssertionError(f"{what}: not among the {len(self._spans)} spans exported:\n{arrived}")
                self._changed.wait(left)

    def _receive(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        received = list(_decode(request))
        with self._changed:
            self._spans.extend(received)
            self._changed.notify_all()


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receive: Callable[[trace_service_pb2.ExportTraceServiceRequest], None]) -> None:
        self._receive = receive

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receive(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def _decode(request: trace_service_pb2.ExportTraceServiceRequest) -> Iterator[CollectedSpan]:
    for resource_spans in request.resource_spans:
        service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield CollectedSpan(
                    service=service, name=span.name, kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                    trace_id=span.trace_id.hex(), span_id=span.span_id.hex(), parent_span_id=span.parent_span_id.hex(),
                    attributes=_attributes(span.attributes),
                    links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                    error=span.status.code == span.status.STATUS_CODE_ERROR)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None
