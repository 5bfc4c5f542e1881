"""The ``Broker`` inside one process (embedded mode), with the same observable rules as RabbitMQ.

Work messages go through their wire form on the way in, as they would over the network, so a
handler never shares objects with the publisher. Nothing survives the process: this broker is for
a single-process install and for tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from clipchat import metrics
from clipchat.broker import (
    Delivery,
    EventHandler,
    Handler,
    RequeueMessage,
    Subscription,
    decode_task,
    delay_for,
    next_attempt,
    publishing,
)
from clipchat.broker.topology import DEAD_LETTER_QUEUE, EVENTS_EXCHANGE, WORK_QUEUES
from clipchat.errors import DependencyUnavailable
from clipchat.telemetry import consumer_span, producer_span

log = logging.getLogger("clipchat.broker")

_UNAVAILABLE = "The message broker is unavailable right now. Please try again shortly."
_SYSTEM = "clipchat.memory"  # messaging.system of this broker's spans


@dataclass(frozen=True)
class _Message:
    queue: str  # the work queue it was published to
    body: bytes  # wire form, decoded afresh for every delivery
    message_id: str
    redelivered: bool = False
    queued_at: float = field(default_factory=time.time)  # when it entered (or re-enters) its queue

    def delivery(self) -> Delivery:
        return Delivery(queue=self.queue, task=decode_task(self.queue, self.body), message_id=self.message_id,
                        redelivered=self.redelivered, queued_at=self.queued_at)


class InMemoryBroker:
    """A ``Broker`` made of asyncio queues: the work queues of the topology and the dead-letter
    queue, plus a topic fan-out for job events. Delayed retries are timers.

    Errors: ``DependencyUnavailable`` before ``connect`` or after ``close``, and for a queue that
    is not part of the topology (as RabbitMQ refuses an unroutable message); ``TypeError`` for a
    message of another queue's type, or an event body that is not JSON-serialisable.
    """

    def __init__(self, delivery_limit: int = 5, *, retry_delays: tuple[float, ...] = (0.5,),
                 shutdown_grace_seconds: float = 10.0) -> None:
        if delivery_limit < 1:
            raise ValueError("delivery_limit must be at least 1")
        self.delivery_limit = delivery_limit
        self.retry_delays = retry_delays
        self._grace = shutdown_grace_seconds
        self._queues: dict[str, asyncio.Queue[_Message]] = {}
        self._subscriptions: set[_MemoryConsumer | _MemorySubscriber] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._connected = False

    async def connect(self) -> None:
        """Create the queues (once; reconnecting keeps their messages)."""
        if not self._queues:
            self._queues = {name: asyncio.Queue() for name in (*WORK_QUEUES, DEAD_LETTER_QUEUE)}
        self._connected = True

    async def close(self) -> None:
        """Stop every consumer and subscriber (see ``Subscription.cancel``)."""
        for subscription in list(self._subscriptions):
            await subscription.cancel()
        self._connected = False

    async def publish(self, queue: str, task: Message, *, message_id: str) -> None:
        """Put a work message on ``queue``. Raises ``DependencyUnavailable`` for an unknown queue."""
        target = self._queue(queue)
        with publishing(_SYSTEM, queue, task, message_id=message_id) as body:
            target.put_nowait(_Message(queue, body, message_id))
        metrics.message_published(queue)
        log.debug("broker.published", extra={"queue": queue, "message_id": message_id})

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 1) -> Subscription:
        """Run ``handler`` on ``queue``'s messages, up to ``prefetch`` at a time (ack rules in
        ``clipchat.broker``). Raises ``DependencyUnavailable`` for an unknown queue."""
        consumer = _MemoryConsumer(self, queue, self._queue(queue), handler, max(prefetch, 1))
        consumer.start()
        self._subscriptions.add(consumer)
        log.info("broker.consuming", extra={"queue": queue, "prefetch": prefetch})
        return consumer

    async def publish_event(self, routing_key: str, body: dict[str, Any]) -> None:
        """Hand the event to every subscriber whose pattern matches ``routing_key``."""
        self._require_connected()
        text = json.dumps(body)
        with producer_span(_SYSTEM, EVENTS_EXCHANGE, routing_key=routing_key) as headers:
            for subscription in self._subscriptions:
                if isinstance(subscription, _MemorySubscriber) and subscription.matches(routing_key):
                    subscription.inbox.put_nowait((routing_key, text, headers))

    async def subscribe_events(self, pattern: str, handler: EventHandler) -> Subscription:
        """Call ``handler(routing_key, body)`` for each later event matching ``pattern``, in order.

        A handler that raises is logged and the event skipped, as with RabbitMQ.
        """
        self._require_connected()
        subscriber = _MemorySubscriber(self, pattern, handler)
        subscriber.start()
        self._subscriptions.add(subscriber)
        return subscriber

    async def dead_letters(self, queue: str = DEAD_LETTER_QUEUE) -> list[Delivery]:
        """Take every message now in ``queue`` (the dead-letter queue by default)."""
        source = self._queue(queue)
        drained: list[Delivery] = []
        while not source.empty():
            drained.append(source.get_nowait().delivery())
        return drained

    async def ping(self) -> bool:
        return self._connected

    # --- internals -------------------------------------------------------------------------

    def _require_connected(self) -> None:
        if not self._connected:
            raise DependencyUnavailable(_UNAVAILABLE)

    def _queue(self, name: str) -> asyncio.Queue[_Message]:
        self._require_connected()
        queue = self._queues.get(name)
        if queue is None:
            log.warning("broker.unknown_queue", extra={"queue": name})
            raise DependencyUnavailable(_UNAVAILABLE)
        return queue

    def _retry_later(self, message: _Message, requeue: RequeueMessage) -> None:
        task = decode_task(message.queue, message.body)
        delay = delay_for(self.retry_delays, int(getattr(task, "attempt", 0)) or 1, requeue.delay)
        again = _Message(message.queue, next_attempt(task, counted=requeue.counted).SerializeToString(),
                         message.message_id, queued_at=time.time() + delay)
        target = self._queues[message.queue]

        def fire() -> None:
            self._timers.discard(timer)
            target.put_nowait(again)

        timer = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(timer)

    def _redeliver(self, message: _Message) -> None:
        self._queues[message.queue].put_nowait(
            _Message(message.queue, message.body, message.message_id, redelivered=True))

    def _dead_letter(self, message: _Message) -> None:
        self._queues[DEAD_LETTER_QUEUE].put_nowait(message)

    def _forget(self, subscription: _MemoryConsumer | _MemorySubscriber) -> None:
        self._subscriptions.discard(subscription)


class _MemoryConsumer:
    """One ``consume`` call: a dispatcher task and the handler tasks it started."""

    def __init__(self, broker: InMemoryBroker, queue_name: str, queue: asyncio.Queue[_Message],
                 handler: Handler, prefetch: int) -> None:
        self._broker = broker
        self._queue_name = queue_name
        self._queue = queue
        self._handler = handler
        self._slots = asyncio.Semaphore(prefetch)
        self._running: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch(), name=f"consume:{self._queue_name}")

    async def cancel(self) -> None:
        """Stop taking messages, let running handlers finish for the broker's shutdown grace,
        and cancel the rest (their messages go back to the queue, as unacked ones would)."""
        self._broker._forget(self)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        if not self._running:
            return
        _, pending = await asyncio.wait(set(self._running), timeout=self._broker._grace)
        if pending:
            log.warning("broker.handlers_cancelled", extra={"queue": self._queue_name,
                                                             "count": len(pending)})
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _dispatch(self) -> None:
        while True:
            # A slot first, then a message: like a prefetch window, a message is only taken
            # off the queue when a handler is free to run it.
            await self._slots.acquire()
            try:
                message = await self._queue.get()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._process(message))
            self._running.add(task)
            task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slots.release()

    async def _process(self, message: _Message) -> None:
        fields: dict[str, Any] = {"queue": self._queue_name, "message_id": message.message_id}
        try:
            delivery = message.delivery()
        except ValueError:
            log.error("broker.undecodable_message", extra=fields)
            metrics.dead_lettered(self._queue_name, "undecodable")
            self._broker._dead_letter(message)
            return
        fields["attempt"] = delivery.attempt
        try:
            delivery.record_start()
            await self._handler(delivery)
        except RequeueMessage as requeue:
            if requeue.counted and delivery.attempt >= self._broker.delivery_limit:
                log.warning("broker.dead_lettered", extra={**fields, "reason": "attempt_limit"})
                metrics.dead_lettered(self._queue_name, "attempt_limit")
                self._broker._dead_letter(message)
            else:
                log.info("broker.retry_scheduled", extra={**fields, "counted": requeue.counted})
                self._broker._retry_later(message, requeue)
        except asyncio.CancelledError:
            self._broker._redeliver(message)
            raise
        except Exception:
            log.exception("broker.dead_lettered", extra={**fields, "reason": "handler_error"})
            metrics.dead_lettered(self._queue_name, "handler_error")
            self._broker._dead_letter(message)


class _MemorySubscriber:
    """One ``subscribe_events`` call: its inbox, read in order by one task."""

    def __init__(self, broker: InMemoryBroker, pattern: str, handler: EventHandler) -> None:
        self._broker = broker
        self._pattern = pattern
        self._words = tuple(pattern.split("."))
        self._handler = handler
        # (routing key, JSON body, headers with the publisher's trace context)
        self.inbox: asyncio.Queue[tuple[str, str, dict[str, str]]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name=f"events:{self._pattern}")

    def matches(self, routing_key: str) -> bool:
        return topic_matches(self._words, tuple(routing_key.split(".")))

    async def cancel(self) -> None:
        """Stop the reader (an event being handled is interrupted); queued events are dropped."""
        self._broker._forget(self)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        while True:
            routing_key, text, headers = await self.inbox.get()
            try:
                with consumer_span(_SYSTEM, EVENTS_EXCHANGE, headers, routing_key=routing_key):
                    await self._handler(routing_key, json.loads(text))
            except Exception:
                log.exception("broker.event_handler_failed",
                              extra={"pattern": self._pattern, "routing_key": routing_key})


def topic_matches(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    """AMQP topic matching on dot-separated words: ``*`` is one word, ``#`` zero or more."""
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return topic_matches(rest, words) or (bool(words) and topic_matches(pattern, words[1:]))
    if not words:
        return False
    return head in ("*", words[0]) and topic_matches(rest, words[1:])
