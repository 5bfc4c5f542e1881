"""What crosses the broker, seen from outside: RabbitMQ's firehose tracer.

With ``rabbitmqctl trace_on`` RabbitMQ copies every message published to an exchange
(``publish.<exchange>``) and every message delivered from a queue (``deliver.<queue>``) to the
``amq.rabbitmq.trace`` exchange. ``BrokerTrace`` binds a queue of its own to it and keeps what it
sees, stamped with ``time.monotonic()`` on arrival: the deliveries of a work message (to count
attempts and measure the waits between them) and the exact bytes and properties of a published
message (to publish it again, whatever its format). It runs on a thread of its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from tests.chaos.backends import RabbitMQ

TRACE_EXCHANGE = "amq.rabbitmq.trace"
READY_WITHIN = 30.0


@dataclass(frozen=True)
class Traced:
    """One message the firehose copied: published to ``exchange`` or delivered from ``queue``."""

    kind: str  # "publish" | "deliver"
    name: str  # the exchange (publish; "" for the default exchange) or the queue (deliver)
    routing_keys: tuple[str, ...]
    properties: dict[str, Any]
    body: bytes
    redelivered: bool
    at: float

    @property
    def message_id(self) -> str:
        return str(self.properties.get("message_id") or "")

    def mentions(self, text: str) -> bool:
        """Whether the body or the message id carries ``text`` (an id: JSON and protobuf keep strings
        as UTF-8)."""
        return text.encode() in self.body or text in self.message_id


class BrokerTrace:
    """Turns the firehose on for the broker's default vhost and records it until ``stop``."""

    def __init__(self, broker: RabbitMQ) -> None:
        self.broker = broker
        self._records: list[Traced] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="broker-trace", daemon=True)

    def start(self) -> BrokerTrace:
        """Start recording; raises ``RuntimeError`` when the trace queue cannot be set up."""
        self.broker.ctl("trace_on")
        self._thread.start()
        if not self._ready.wait(READY_WITHIN) or self._error is not None:
            raise RuntimeError(f"the broker trace did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)
        self.broker.ctl("trace_off", check=False)

    def records(self, kind: str | None = None, name: str | None = None) -> list[Traced]:
        with self._lock:
            found = list(self._records)
        return [r for r in found if (kind is None or r.kind == kind) and (name is None or r.name == name)]

    def deliveries(self, queue: str, mentioning: str) -> list[Traced]:
        """The deliveries from ``queue`` of messages that carry ``mentioning``, in order."""
        return [r for r in self.records("deliver", queue) if r.mentions(mentioning)]

    def publishes(self, routing_key: str, mentioning: str) -> list[Traced]:
        """The messages published with ``routing_key`` that carry ``mentioning``, in order."""
        return [r for r in self.records("publish") if routing_key in r.routing_keys and r.mentions(mentioning)]

    # The recording thread.

    def _run(self) -> None:
        try:
            asyncio.run(self._consume())
        except BaseException as exc:  # reported by start(), or ends the recording
            self._error = exc
            self._ready.set()

    async def _consume(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        connection = await aio_pika.connect_robust(self.broker.amqp_url)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
            for pattern in ("publish.#", "deliver.#"):
                await queue.bind(TRACE_EXCHANGE, routing_key=pattern)
            await queue.consume(self._keep, no_ack=True)
            self._ready.set()
            await self._stopping.wait()
        finally:
            await connection.close()

    async def _keep(self, message: AbstractIncomingMessage) -> None:
        kind, _, name = (message.routing_key or "").partition(".")
        headers = message.headers or {}
        properties = headers.get("properties") or {}
        record = Traced(kind=kind, name=name,
                        routing_keys=tuple(_text(k) for k in headers.get("routing_keys") or ()),
                        properties={k: _text(v) for k, v in dict(properties).items()},
                        body=bytes(message.body), redelivered=bool(headers.get("redelivered")),
                        at=time.monotonic())
        with self._lock:
            self._records.append(record)


def _text(value: Any) -> Any:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


async def publish_again(amqp_url: str, original: Traced) -> None:
    """Publish ``original`` (a traced publish) once more: same exchange, routing key, bytes and
    properties (message id, headers, content type, persistence)."""
    props = original.properties
    message = aio_pika.Message(
        original.body, content_type=props.get("content_type"), content_encoding=props.get("content_encoding"),
        headers=dict(props.get("headers") or {}), delivery_mode=props.get("delivery_mode"),
        message_id=props.get("message_id"), correlation_id=props.get("correlation_id"),
        type=props.get("type"), app_id=props.get("app_id"))
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        if original.name:
            exchange = await channel.get_exchange(original.name, ensure=False)
        else:
            exchange = channel.default_exchange
        for routing_key in original.routing_keys:
            await exchange.publish(message, routing_key=routing_key, mandatory=True, timeout=10)
    finally:
        await connection.close()


async def peek(amqp_url: str, queue: str) -> list[bytes]:
    """The bodies of the messages waiting in ``queue``, left in it (taken unacknowledged, then
    given back when the channel closes)."""
    connection = await aio_pika.connect(amqp_url)
    bodies: list[bytes] = []
    try:
        channel = await connection.channel()
        amqp_queue = await channel.get_queue(queue, ensure=False)
        while (message := await amqp_queue.get(no_ack=False, fail=False, timeout=10)) is not None:
            bodies.append(bytes(message.body))
        await channel.close()
    finally:
        await connection.close()
    return bodies
