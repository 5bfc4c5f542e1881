"""Work queues and job events: one interface, RabbitMQ and an in-process broker behind it.

Semantics both keep (the contract tests check them):

- ``publish`` to a work queue is persistent and confirmed; publishing to a queue that does not
  exist (unroutable) raises ``DependencyUnavailable``.
- A consumer handler that returns normally acks the message after its work is done. Raising
  ``RequeueMessage`` puts it back for another delivery; after ``delivery_limit`` deliveries it goes
  to the dead-letter queue. Any other exception dead-letters it at once (permanent failure).
- Handlers must be idempotent on the message id: a message can be delivered more than once.
- ``publish_event`` / ``subscribe_events`` use a topic exchange; a subscriber sees the events
  published after it subscribed (no replay: the status service's event log is the replayable one).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from clipchat.broker.topology import COMPOSE_QUEUE, DEAD_LETTER_QUEUE, EVENTS_EXCHANGE, REGENERATE_QUEUE

__all__ = [
    "COMPOSE_QUEUE",
    "DEAD_LETTER_QUEUE",
    "EVENTS_EXCHANGE",
    "REGENERATE_QUEUE",
    "Broker",
    "Delivery",
    "RequeueMessage",
    "Subscription",
    "create_broker",
]


class RequeueMessage(Exception):
    """Raised by a handler to have the message delivered again later (transient failure)."""


@dataclass
class Delivery:
    body: dict[str, Any]
    message_id: str
    delivery_count: int = 1  # 1 on the first delivery
    headers: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Delivery], Awaitable[None]]
EventHandler = Callable[[str, dict[str, Any]], Awaitable[None]]


class Subscription(Protocol):
    async def cancel(self) -> None: ...


class Broker(Protocol):
    async def connect(self) -> None:
        """Connect and declare the topology (queues, exchanges, dead-lettering)."""

    async def close(self) -> None: ...

    async def publish(self, queue: str, body: dict[str, Any], *, message_id: str,
                      headers: dict[str, Any] | None = None) -> None:
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


def create_broker(settings: object) -> Broker:
    """The broker named by ``settings.broker_url``: ``memory://`` or ``amqp://…``."""
    from clipchat.settings import Settings

    assert isinstance(settings, Settings)
    if settings.broker_url.startswith("memory://"):
        from clipchat.broker.memory import InMemoryBroker

        return InMemoryBroker(delivery_limit=settings.delivery_limit)
    from clipchat.broker.rabbitmq import RabbitMQBroker

    return RabbitMQBroker(settings.broker_url, delivery_limit=settings.delivery_limit,
                          namespace=settings.broker_namespace)
