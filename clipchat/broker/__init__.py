"""Work queues and job events: one interface, RabbitMQ and an in-process broker behind it.

Semantics both keep (the contract tests check them):

- Work messages are protobuf messages of the queue's type (``topology.TASK_TYPES``), each with an
  ``attempt`` (1 on the first delivery) and a ``trace_context``. ``publish`` is persistent and
  confirmed; publishing to a queue outside the topology raises ``DependencyUnavailable``.
- A consumer handler that returns normally acks the message after its work is done.
- Raising ``RequeueMessage`` brings the message back later, after a delay: by default the delay
  grows with each attempt (``topology.retry_delays``) and the attempt counts — the message comes
  back with ``attempt + 1``, and past ``delivery_limit`` attempts it goes to the dead-letter queue.
  The count is the application's own (a field of the message), so the limit holds whatever the
  broker counts. ``RequeueMessage(delay=…, counted=False)`` waits without using an attempt (the
  work is held by another delivery).
- Any other exception dead-letters the message at once (permanent failure).
- A handler still running when its consumer is cancelled gets ``shutdown_grace_seconds`` to finish;
  one cut off then is delivered again (an unacked message goes back to the queue).
- Handlers must be idempotent: a message can be delivered more than once.
- ``publish_event`` / ``subscribe_events`` use a topic exchange; a subscriber sees the events
  published after it subscribed (no replay: the status service's event log is the replayable one).
- Tracing (``clipchat.telemetry``): ``publish`` is a PRODUCER span continuing the trace in the
  message's ``trace_context`` and sends its own context there, so the consumer's span is its child;
  an event carries the publishing span's context in its headers and its handler runs in a CONSUMER
  span, the producer's child.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf.message import Message

from clipchat import metrics
from clipchat.broker.topology import (
    COMPOSE_QUEUE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    REGENERATE_QUEUE,
    TASK_TYPES,
    retry_delays,
)

__all__ = [
    "COMPOSE_QUEUE",
    "DEAD_LETTER_QUEUE",
    "EVENTS_EXCHANGE",
    "REGENERATE_QUEUE",
    "Broker",
    "Delivery",
    "Handler",
    "RequeueMessage",
    "Subscription",
    "create_broker",
    "decode_task",
]


class RequeueMessage(Exception):
    """Raised by a handler to have the message delivered again later (transient failure).

    ``delay`` overrides the growing retry delay; ``counted=False`` does not use up an attempt.
    """

    def __init__(self, reason: str = "", *, delay: float | None = None, counted: bool = True) -> None:
        super().__init__(reason)
        self.delay = delay
        self.counted = counted


@dataclass
class Delivery:
    queue: str  # the work queue the message was published to
    task: Any  # the queue's protobuf message (``topology.TASK_TYPES``); None for an undecodable one
    message_id: str
    redelivered: bool = False  # the broker delivered it before (a crash or a lost connection)
    queued_at: float = 0.0  # when it entered its work queue (Unix seconds; 0: unknown)

    @property
    def attempt(self) -> int:
        return int(getattr(self.task, "attempt", 0)) or 1

    def record_start(self) -> None:
        """A worker starts on this message now: count how long it waited (metrics)."""
        if self.queued_at:
            metrics.queue_waited(self.queue, time.time() - self.queued_at)


Handler = Callable[[Delivery], Awaitable[None]]
EventHandler = Callable[[str, dict[str, Any]], Awaitable[None]]


class Subscription(Protocol):
    async def cancel(self) -> None: ...


class Broker(Protocol):
    delivery_limit: int

    async def connect(self) -> None:
        """Connect and declare the topology (queues, exchanges, delays, dead-lettering)."""

    async def close(self) -> None: ...

    async def publish(self, queue: str, task: Message, *, message_id: str) -> None:
        """Persistently publish a work message, confirmed by the broker."""

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 1) -> Subscription:
        """Deliver the queue's messages to ``handler`` (see the module doc for ack rules)."""

    async def publish_event(self, routing_key: str, body: dict[str, Any]) -> None:
        """Publish on the job-events topic exchange (e.g. ``job.<id>.progress``)."""

    async def subscribe_events(self, pattern: str, handler: EventHandler) -> Subscription:
        """Receive events whose routing key matches ``pattern`` (``#`` and ``*`` wildcards)."""

    async def dead_letters(self, queue: str = DEAD_LETTER_QUEUE) -> list[Delivery]:
        """Drain and return the dead-lettered messages (operators and tests)."""

    async def ping(self) -> bool:
        """Whether the broker is reachable now (readiness)."""


def encode_task(queue: str, task: Message) -> bytes:
    """The wire form of a work message. Raises ``TypeError`` for a message of another queue's type."""
    expected = TASK_TYPES.get(queue)
    if expected is not None and not isinstance(task, expected):
        raise TypeError(f"{queue} carries {expected.__name__}, not {type(task).__name__}")
    return task.SerializeToString()


@contextmanager
def publishing(system: str, queue: str, task: Message, *, message_id: str, routing_key: str = "") -> Iterator[bytes]:
    """Around sending ``task`` to ``queue``: a PRODUCER span continuing the trace that ``task``
    carries; yields the wire form, whose ``trace_context`` names this span. Raises ``TypeError``
    as ``encode_task`` does."""
    from clipchat.telemetry import extract_context, producer_span

    with producer_span(system, queue, parent=extract_context(dict(getattr(task, "trace_context", {}))),
                       message_id=message_id, routing_key=routing_key) as headers:
        sent = type(task)()
        sent.CopyFrom(task)
        if hasattr(sent, "trace_context"):
            sent.trace_context.clear()
            sent.trace_context.update(headers)
        yield encode_task(queue, sent)


def decode_task(queue: str, body: bytes) -> Message:
    """The work message of ``queue`` in ``body``. Raises ``ValueError`` when it is not one."""
    message_type = TASK_TYPES.get(queue)
    if message_type is None:
        raise ValueError(f"no message type for queue {queue!r}")
    task = message_type()
    try:
        task.ParseFromString(body)
    except Exception as exc:  # protobuf's DecodeError
        raise ValueError(f"not a {message_type.__name__}") from exc
    return task


def next_attempt(task: Message, *, counted: bool) -> Message:
    """A copy of ``task`` for its next delivery (``attempt`` raised when the failure counts)."""
    copy = type(task)()
    copy.CopyFrom(task)
    attempt = int(getattr(copy, "attempt", 0)) or 1
    copy.attempt = attempt + 1 if counted else attempt  # type: ignore[attr-defined]
    return copy


def create_broker(settings: object) -> Broker:
    """The broker named by ``settings.broker_url``: ``memory://`` or ``amqp://…``."""
    from clipchat.settings import Settings

    assert isinstance(settings, Settings)
    delays = retry_delays(settings.redelivery_base_seconds, settings.redelivery_max_seconds, settings.delivery_limit)
    if settings.broker_url.startswith("memory://"):
        from clipchat.broker.memory import InMemoryBroker

        return InMemoryBroker(delivery_limit=settings.delivery_limit, retry_delays=delays,
                              shutdown_grace_seconds=settings.shutdown_grace_seconds)
    from clipchat.broker.rabbitmq import RabbitMQBroker

    return RabbitMQBroker(settings.broker_url, delivery_limit=settings.delivery_limit,
                          namespace=settings.broker_namespace, retry_delays=delays,
                          shutdown_grace_seconds=settings.shutdown_grace_seconds)


def delay_for(delays: tuple[float, ...], attempt: int, requested: float | None) -> float:
    """The delay before the next delivery: ``requested`` when given, else the attempt's own."""
    if requested is not None:
        return requested
    return delays[min(max(attempt, 1), len(delays)) - 1]
