"""The ``Broker`` on RabbitMQ (aio-pika), for distributed mode.

Topology (names from ``clipchat.broker.topology``, each prefixed by ``namespace``):

- the work queues: durable quorum queues that dead-letter to the dead-letter exchange;
- for each work queue and each retry delay, a delay queue (classic, durable) whose messages
  expire after that delay back into the work queue: a delayed retry is a copy of the message
  (its ``attempt`` raised) published there, then the original is acked;
- the dead-letter exchange (fanout) and the dead-letter queue bound to it;
- the job-events topic exchange; each subscriber gets its own exclusive, auto-deleted queue.

Publishing uses one channel with publisher confirms and ``mandatory``, so a message is only
reported sent once RabbitMQ has stored it, and a message no queue would take raises. Every
consumer and subscriber has a channel of its own, so one's prefetch and failures do not touch
another's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError, DeliveryError, PublishError
from google.protobuf.message import Message

from clipchat import metrics
from clipchat.broker import (
    Delivery,
    EventHandler,
    Handler,
    RequeueMessage,
    Subscription,
    decode_task,
    next_attempt,
    publishing,
)
from clipchat.broker.topology import (
    CONTENT_TYPE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    QUEUE_HEADER,
    QUEUED_AT_HEADER,
    WORK_QUEUES,
    delay_queue,
)
from clipchat.errors import DependencyUnavailable
from clipchat.telemetry import consumer_span, producer_span

log = logging.getLogger("clipchat.broker")

# What a lost connection, a closed channel or a refused operation raise in aio-pika/aiormq.
_AMQP_FAILURES = (AMQPError, OSError, asyncio.TimeoutError)
_UNAVAILABLE = "The message broker is unavailable right now. Please try again shortly."


class RabbitMQBroker:
    """A ``Broker`` on RabbitMQ.

    ``delivery_limit`` is how many attempts a message gets before a handler that keeps raising
    ``RequeueMessage`` sends it to the dead-letter queue; ``retry_delays`` are the waits between
    attempts (``topology.retry_delays``). ``namespace`` prefixes every queue and exchange name
    (tests use one per test to stay apart). ``shutdown_grace_seconds`` is how long ``close`` lets
    running handlers finish.

    Errors: ``DependencyUnavailable`` when RabbitMQ cannot be reached, a publish is not confirmed
    in ``publish_timeout`` seconds, a message is unroutable, or the queue named is not part of the
    topology; ``TypeError`` for a body or header that cannot be encoded (a programming error).
    """

    def __init__(self, url: str, delivery_limit: int = 5, *, namespace: str = "",
                 retry_delays: tuple[float, ...] = (0.5,), connect_timeout: float = 10.0,
                 publish_timeout: float = 10.0, shutdown_grace_seconds: float = 10.0,
                 events_prefetch: int = 100) -> None:
        if delivery_limit < 1:
            raise ValueError("delivery_limit must be at least 1")
        if not retry_delays or min(retry_delays) <= 0:
            raise ValueError("retry_delays must be positive")
        self._url = url
        self.delivery_limit = delivery_limit
        self.retry_delays = retry_delays
        self._delay_tiers = tuple(sorted(set(retry_delays)))
        self.namespace = namespace
        self._connect_timeout = connect_timeout
        self._publish_timeout = publish_timeout
        self._grace = shutdown_grace_seconds
        self._events_prefetch = events_prefetch
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._events_exchange: AbstractExchange | None = None
        self._subscriptions: set[_QueueConsumer | _EventSubscriber] = set()

    async def connect(self) -> None:
        """Connect (reconnecting on its own afterwards) and declare the topology.

        Raises ``DependencyUnavailable`` when RabbitMQ cannot be reached or refuses the topology
        (for example a queue of the same name declared with other arguments).
        """
        if self._connection is not None and not self._connection.is_closed:
            return
        try:
            self._connection = await aio_pika.connect_robust(self._url, timeout=self._connect_timeout)
            self._publish_channel = await self._connection.channel(publisher_confirms=True,
                                                                   on_return_raises=True)
            self._events_exchange = await self._declare_topology(self._publish_channel)
        except _AMQP_FAILURES as exc:
            log.error("broker.connect_failed", extra={"error": repr(exc)})
            await self._close_connection()
            raise DependencyUnavailable(_UNAVAILABLE) from exc
        log.info("broker.connected", extra={"namespace": self.namespace})

    async def close(self) -> None:
        """Stop every consumer and subscriber (see ``Subscription.cancel``), then disconnect."""
        for subscription in list(self._subscriptions):
            await subscription.cancel()
        await self._close_connection()

    async def publish(self, queue: str, task: Message, *, message_id: str) -> None:
        """Persistently publish a work message to ``queue`` and wait for the broker's confirm.

        Raises ``DependencyUnavailable`` when not confirmed (broker down, timeout, no such queue).
        """
        await self._publish_task(queue, self._name(queue), task, message_id)
        metrics.message_published(queue)
        log.debug("broker.published", extra={"queue": queue, "message_id": message_id})

    async def retry_later(self, queue: str, task: Message, message_id: str, requeue: RequeueMessage) -> None:
        """Publish the next attempt of ``task`` to the delay queue that returns it to ``queue``
        after the attempt's delay (or the delay asked for). Raises ``DependencyUnavailable``."""
        attempt = int(getattr(task, "attempt", 0)) or 1
        delay = self._tier(attempt, requeue.delay)
        await self._publish_task(queue, self._name(delay_queue(queue, delay)),
                                 next_attempt(task, counted=requeue.counted), message_id, delay=delay)

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 1) -> Subscription:
        """Run ``handler`` on ``queue``'s messages, up to ``prefetch`` at a time.

        Returning acks the message; ``RequeueMessage`` returns it to the queue (dead-letters it on
        the ``delivery_limit``-th delivery); any other exception dead-letters it at once.
        Raises ``DependencyUnavailable`` for a queue outside the topology or a broker that is down.
        """
        self._require_topology_queue(queue)
        channel = await self._open_channel(prefetch)
        try:
            amqp_queue = await self._declare_queue(channel, queue)
            consumer = _QueueConsumer(self, queue, channel, amqp_queue, handler)
            await consumer.start()
        except _AMQP_FAILURES as exc:
            await _close_channel(channel)
            raise DependencyUnavailable(_UNAVAILABLE) from exc
        self._subscriptions.add(consumer)
        log.info("broker.consuming", extra={"queue": queue, "prefetch": prefetch})
        return consumer

    async def publish_event(self, routing_key: str, body: dict[str, Any]) -> None:
        """Publish on the job-events topic exchange; with no subscriber the event is dropped.

        Raises ``DependencyUnavailable`` when the broker does not confirm it.
        """
        self._require_publish_channel()
        assert self._events_exchange is not None
        message_id = uuid.uuid4().hex
        with producer_span("rabbitmq", EVENTS_EXCHANGE, message_id=message_id, routing_key=routing_key) as headers:
            message = aio_pika.Message(json.dumps(body).encode(), content_type="application/json",
                                       delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=message_id,
                                       headers=dict(headers))
            await self._publish(self._events_exchange, routing_key, message, mandatory=False)

    async def subscribe_events(self, pattern: str, handler: EventHandler) -> Subscription:
        """Call ``handler(routing_key, body)`` for each event matching ``pattern``, in order.

        A handler that raises is logged and the event skipped: events are notifications, and the
        status service's event log is the durable record. Raises ``DependencyUnavailable``.
        """
        channel = await self._open_channel(self._events_prefetch)
        try:
            exchange = await channel.declare_exchange(self._name(EVENTS_EXCHANGE),
                                                      aio_pika.ExchangeType.TOPIC, durable=True)
            # Named here rather than by the server: a robust channel re-declares it after a
            # reconnect, and server-chosen ``amq.gen-`` names cannot be declared by clients.
            queue = await channel.declare_queue(f"{self._name(EVENTS_EXCHANGE)}.sub.{uuid.uuid4().hex}",
                                                exclusive=True, auto_delete=True)
            await queue.bind(exchange, routing_key=pattern)
        except _AMQP_FAILURES as exc:
            await _close_channel(channel)
            raise DependencyUnavailable(_UNAVAILABLE) from exc
        subscriber = _EventSubscriber(self, pattern, channel, queue, handler)
        subscriber.start()
        self._subscriptions.add(subscriber)
        return subscriber

    async def dead_letters(self, queue: str = DEAD_LETTER_QUEUE) -> list[Delivery]:
        """Take every message now in ``queue`` (the dead-letter queue by default), acking each.

        A message that cannot be decoded comes back with ``task=None``. Raises
        ``DependencyUnavailable``.
        """
        self._require_topology_queue(queue)
        channel = await self._open_channel()
        drained: list[Delivery] = []
        try:
            amqp_queue = await self._declare_queue(channel, queue, robust=False)
            while (message := await amqp_queue.get(no_ack=False, fail=False)) is not None:
                drained.append(_decode(message, None))
                await message.ack()
        except _AMQP_FAILURES as exc:
            raise DependencyUnavailable(_UNAVAILABLE) from exc
        finally:
            await _close_channel(channel)
        return drained

    async def ping(self) -> bool:
        """Whether RabbitMQ answers now: an idempotent declare, a round trip on the publishing
        channel. Never raises."""
        if self._connection is None or self._connection.is_closed or self._publish_channel is None:
            return False
        try:
            await self._publish_channel.declare_exchange(
                self._name(EVENTS_EXCHANGE), aio_pika.ExchangeType.TOPIC, durable=True,
                timeout=self._connect_timeout, robust=False)
        except _AMQP_FAILURES:
            return False
        return True

    # --- internals -------------------------------------------------------------------------

    def _name(self, name: str) -> str:
        return f"{self.namespace}{name}"

    def _queue_arguments(self, queue: str) -> dict[str, Any]:
        if queue == DEAD_LETTER_QUEUE:
            return {"x-queue-type": "quorum"}
        return {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": self._name(DEAD_LETTER_EXCHANGE),
            # The consumer dead-letters past the delivery_limit-th attempt itself; the queue's
            # own count (of deliveries that were returned, e.g. by a worker killed mid-work)
            # catches messages whose handler kills the worker every time.
            "x-delivery-limit": self.delivery_limit,
        }

    def _tier(self, attempt: int, requested: float | None) -> float:
        """The declared delay to wait: the attempt's own, or the shortest one at least as long
        as the delay asked for (the longest when none is)."""
        if requested is None:
            return self.retry_delays[min(attempt, len(self.retry_delays)) - 1]
        return next((tier for tier in self._delay_tiers if tier >= requested), self._delay_tiers[-1])

    def _require_topology_queue(self, queue: str) -> None:
        # Only the topology's queues are declared with the arguments that make them work queues;
        # any other name is refused like an unroutable publish.
        if queue not in WORK_QUEUES and queue != DEAD_LETTER_QUEUE:
            log.warning("broker.unknown_queue", extra={"queue": queue})
            raise DependencyUnavailable(_UNAVAILABLE)

    async def _open_channel(self, prefetch: int | None = None) -> AbstractRobustChannel:
        connection = self._require_connection()
        try:
            channel = await connection.channel()
            if prefetch is not None:
                await channel.set_qos(prefetch_count=prefetch)
        except _AMQP_FAILURES as exc:
            raise DependencyUnavailable(_UNAVAILABLE) from exc
        return channel

    async def _declare_queue(self, channel: AbstractRobustChannel, queue: str, *,
                             robust: bool = True) -> AbstractQueue:
        # robust=False for a one-off use: the channel would otherwise re-declare it on reconnect.
        return await channel.declare_queue(self._name(queue), durable=True,
                                           arguments=self._queue_arguments(queue), robust=robust)

    async def _declare_topology(self, channel: AbstractRobustChannel) -> AbstractExchange:
        """Declare everything; the events exchange is returned for publishing."""
        dead_letter_exchange = await channel.declare_exchange(
            self._name(DEAD_LETTER_EXCHANGE), aio_pika.ExchangeType.FANOUT, durable=True)
        dead_letter_queue = await self._declare_queue(channel, DEAD_LETTER_QUEUE)
        await dead_letter_queue.bind(dead_letter_exchange, routing_key="")
        for queue in WORK_QUEUES:
            await self._declare_queue(channel, queue)
            for delay in self._delay_tiers:
                await channel.declare_queue(self._name(delay_queue(queue, delay)), durable=True, arguments={
                    "x-message-ttl": round(delay * 1000),
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self._name(queue)})
        return await channel.declare_exchange(self._name(EVENTS_EXCHANGE), aio_pika.ExchangeType.TOPIC,
                                              durable=True)

    async def _publish_task(self, queue: str, routing_key: str, task: Message, message_id: str, *,
                            delay: float = 0.0) -> None:
        # ``delay``: it reaches its work queue after that long (through a delay queue).
        headers: dict[str, Any] = {QUEUE_HEADER: queue, QUEUED_AT_HEADER: time.time() + delay}
        with publishing("rabbitmq", queue, task, message_id=message_id, routing_key=routing_key) as body:
            message = aio_pika.Message(body, content_type=CONTENT_TYPE, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                       message_id=message_id, headers=headers)
            channel = self._require_publish_channel()
            await self._publish(channel.default_exchange, routing_key, message, mandatory=True)

    async def _publish(self, exchange: AbstractExchange, routing_key: str,
                       message: aio_pika.Message, *, mandatory: bool) -> None:
        try:
            await exchange.publish(message, routing_key=routing_key, mandatory=mandatory,
                                   timeout=self._publish_timeout)
        except (DeliveryError, PublishError) as exc:
            # Returned (no queue took it) or nacked by the broker.
            log.warning("broker.publish_refused",
                        extra={"routing_key": routing_key, "message_id": message.message_id})
            raise DependencyUnavailable(_UNAVAILABLE) from exc
        except _AMQP_FAILURES as exc:
            log.warning("broker.publish_failed", extra={"routing_key": routing_key,
                                                         "message_id": message.message_id,
                                                         "error": repr(exc)})
            raise DependencyUnavailable(_UNAVAILABLE) from exc

    def _require_connection(self) -> AbstractRobustConnection:
        if self._connection is None or self._connection.is_closed:
            raise DependencyUnavailable(_UNAVAILABLE)
        return self._connection

    def _require_publish_channel(self) -> AbstractRobustChannel:
        self._require_connection()
        assert self._publish_channel is not None
        return self._publish_channel

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        self._publish_channel = self._events_exchange = None
        if connection is not None:
            try:
                await connection.close()
            except _AMQP_FAILURES:
                log.warning("broker.close_failed", exc_info=True)

    def _forget(self, subscription: _QueueConsumer | _EventSubscriber) -> None:
        self._subscriptions.discard(subscription)


class _QueueConsumer:
    """One ``consume`` call: a channel, its consumer tag and the handlers running now."""

    def __init__(self, broker: RabbitMQBroker, queue_name: str, channel: AbstractChannel,
                 queue: AbstractQueue, handler: Handler) -> None:
        self._broker = broker
        self._queue_name = queue_name
        self._channel = channel
        self._queue = queue
        self._handler = handler
        self._tag: str | None = None
        self._running: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        # aiormq runs each delivery in a task of its own, so up to ``prefetch`` handlers overlap.
        self._tag = await self._queue.consume(self._on_message)

    async def cancel(self) -> None:
        """Stop taking messages, let running handlers finish for the broker's shutdown grace,
        cancel the rest (their messages go back to the queue) and close the channel."""
        self._broker._forget(self)
        if self._tag is not None:
            try:
                await self._queue.cancel(self._tag)
            except _AMQP_FAILURES:
                log.warning("broker.cancel_failed", extra={"queue": self._queue_name}, exc_info=True)
        await _finish(self._running, self._broker._grace, self._queue_name)
        await _close_channel(self._channel)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # The work runs in a task of its own: when the connection drops, aiormq cancels this
        # callback, but the work in hand (a paid generation, an encode) goes on; its ack then fails
        # and the redelivered copy finds the work claimed. Only ``cancel`` (shutdown) cancels it.
        task = asyncio.create_task(self._process(message), name=f"handle:{self._queue_name}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        await asyncio.shield(task)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        fields: dict[str, Any] = {"queue": self._queue_name, "message_id": message.message_id}
        try:
            delivery = _decode(message, self._queue_name)
        except ValueError:
            log.error("broker.undecodable_message", extra=fields)
            metrics.dead_lettered(self._queue_name, "undecodable")
            await _settle(message.reject(requeue=False), fields)
            return
        fields.update(attempt=delivery.attempt, redelivered=delivery.redelivered)
        try:
            delivery.record_start()
            await self._handler(delivery)
        except RequeueMessage as requeue:
            await self._retry_or_dead_letter(message, delivery, requeue, fields)
        except Exception:
            log.exception("broker.dead_lettered", extra={**fields, "reason": "handler_error"})
            metrics.dead_lettered(self._queue_name, "handler_error")
            await _settle(message.reject(requeue=False), fields)
        else:
            await _settle(message.ack(), fields)

    async def _retry_or_dead_letter(self, message: AbstractIncomingMessage, delivery: Delivery,
                                    requeue: RequeueMessage, fields: dict[str, Any]) -> None:
        if requeue.counted and delivery.attempt >= self._broker.delivery_limit:
            log.warning("broker.dead_lettered", extra={**fields, "reason": "attempt_limit"})
            metrics.dead_lettered(self._queue_name, "attempt_limit")
            await _settle(message.reject(requeue=False), fields)
            return
        try:
            await self._broker.retry_later(self._queue_name, delivery.task, delivery.message_id, requeue)
        except DependencyUnavailable:
            # The delay queue could not take it: put it straight back (RabbitMQ counts that).
            log.warning("broker.retry_publish_failed", extra=fields)
            await _settle(message.nack(requeue=True), fields)
            return
        log.info("broker.retry_scheduled", extra={**fields, "counted": requeue.counted})
        await _settle(message.ack(), fields)


class _EventSubscriber:
    """One ``subscribe_events`` call: its queue, read in order by one task."""

    def __init__(self, broker: RabbitMQBroker, pattern: str, channel: AbstractChannel,
                 queue: AbstractQueue, handler: EventHandler) -> None:
        self._broker = broker
        self._pattern = pattern
        self._channel = channel
        self._queue = queue
        self._handler = handler
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name=f"events:{self._pattern}")

    async def cancel(self) -> None:
        """Stop the reader (an event being handled is interrupted) and drop the queue."""
        self._broker._forget(self)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await _close_channel(self._channel)

    async def _read(self) -> None:
        async with self._queue.iterator() as messages:
            async for message in messages:
                try:
                    body = json.loads(message.body)
                    with consumer_span("rabbitmq", EVENTS_EXCHANGE, message.headers,
                                       routing_key=message.routing_key or "", message_id=message.message_id or ""):
                        await self._handler(message.routing_key or "", body)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("broker.event_handler_failed",
                                  extra={"pattern": self._pattern, "routing_key": message.routing_key})
                await _settle(message.ack(), {"pattern": self._pattern})


def _decode(message: AbstractIncomingMessage, queue: str | None) -> Delivery:
    """The ``Delivery`` of an AMQP message of the work queue ``queue``.

    With ``queue=None`` (the dead-letter queue) the queue is read from the message's header and a
    body that cannot be decoded gives ``task=None``; otherwise that raises ``ValueError``.
    """
    headers = message.headers or {}
    original = headers.get(QUEUE_HEADER)
    if isinstance(original, bytes):
        original = original.decode()
    source = queue or (original if isinstance(original, str) else "")
    try:
        task: Message | None = decode_task(source, message.body)
    except ValueError:
        if queue is not None:
            raise
        task = None
    queued_at = headers.get(QUEUED_AT_HEADER)
    return Delivery(queue=source, task=task, message_id=message.message_id or "",
                    redelivered=bool(message.redelivered),
                    queued_at=float(queued_at) if isinstance(queued_at, (int, float)) else 0.0)


async def _settle(outcome: Any, fields: dict[str, Any]) -> None:
    """Await an ack/nack/reject; if the channel died first, RabbitMQ redelivers the message."""
    try:
        await outcome
    except _AMQP_FAILURES:
        log.warning("broker.settle_failed", extra=fields, exc_info=True)


async def _finish(running: set[asyncio.Task[Any]], grace: float, queue_name: str) -> None:
    if not running:
        return
    _, pending = await asyncio.wait(set(running), timeout=grace)
    if pending:
        log.warning("broker.handlers_cancelled", extra={"queue": queue_name, "count": len(pending)})
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _close_channel(channel: AbstractChannel) -> None:
    try:
        await channel.close()
    except _AMQP_FAILURES:
        log.warning("broker.channel_close_failed", exc_info=True)
