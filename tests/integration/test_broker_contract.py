"""The ``Broker`` contract, run against the in-process broker and RabbitMQ.

Each RabbitMQ test gets a namespace of its own (a prefix on every queue and exchange name), deleted
when it ends.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from clipchat.broker import (
    COMPOSE_QUEUE,
    DEAD_LETTER_QUEUE,
    REGENERATE_QUEUE,
    Broker,
    Delivery,
    RequeueMessage,
)
from clipchat.broker.memory import InMemoryBroker
from clipchat.broker.rabbitmq import RabbitMQBroker
from clipchat.broker.topology import (
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    WORK_QUEUES,
    delay_queue,
    retry_delays,
)
from clipchat.errors import DependencyUnavailable
from clipchat.v1 import jobs_pb2, tasks_pb2

DELIVERY_LIMIT = 3
GRACE_SECONDS = 0.5
TIMEOUT = 15.0
# Doubling waits between attempts: 0.2 s, then 0.4 s.
RETRY_DELAYS = retry_delays(0.2, 1.0, DELIVERY_LIMIT)


def regenerate(n: int | str, **fields: Any) -> tasks_pb2.RegenerateTask:
    return tasks_pb2.RegenerateTask(job_id=f"job-{n}", regeneration_id=f"regen-{n}", lease_token="t", **fields)


def compose(n: int | str, **fields: Any) -> tasks_pb2.ComposeTask:
    return tasks_pb2.ComposeTask(job_id=f"job-{n}", lease_token="t", **fields)

BrokerFactory = Callable[[], Awaitable[Broker]]


async def _delete_namespace(url: str, namespace: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for queue in (*WORK_QUEUES, DEAD_LETTER_QUEUE):
            await channel.queue_delete(namespace + queue)
        for queue in WORK_QUEUES:
            for delay in set(RETRY_DELAYS):
                await channel.queue_delete(namespace + delay_queue(queue, delay))
        for exchange in (DEAD_LETTER_EXCHANGE, EVENTS_EXCHANGE):
            await channel.exchange_delete(namespace + exchange)


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def make_broker(request: pytest.FixtureRequest) -> AsyncIterator[BrokerFactory]:
    """Builds connected brokers; on RabbitMQ they share this test's namespace."""
    namespace = f"test-{uuid.uuid4().hex[:12]}."
    url = request.getfixturevalue("rabbitmq_url") if request.param == "rabbitmq" else ""
    made: list[Broker] = []

    async def make() -> Broker:
        broker: Broker
        if request.param == "memory":
            broker = InMemoryBroker(delivery_limit=DELIVERY_LIMIT, retry_delays=RETRY_DELAYS,
                                    shutdown_grace_seconds=GRACE_SECONDS)
        else:
            broker = RabbitMQBroker(url, delivery_limit=DELIVERY_LIMIT, namespace=namespace,
                                    retry_delays=RETRY_DELAYS, shutdown_grace_seconds=GRACE_SECONDS)
        await broker.connect()
        made.append(broker)
        return broker

    yield make
    for broker in made:
        await broker.close()
    if url:
        await _delete_namespace(url, namespace)


@pytest.fixture
async def broker(make_broker: BrokerFactory) -> Broker:
    return await make_broker()


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait until ``check()`` is true, for state only visible by asking (a queue's contents)."""
    async with asyncio.timeout(TIMEOUT):
        while not await check():  # noqa: ASYNC110 - a queue's contents can only be polled
            await asyncio.sleep(0.02)


async def drain_until(broker: Broker, queue: str, count: int) -> list[Delivery]:
    """Take messages from ``queue`` until ``count`` have been seen."""
    taken: list[Delivery] = []

    async def enough() -> bool:
        taken.extend(await broker.dead_letters(queue))
        return len(taken) >= count

    await eventually(enough)
    return taken


class Recorder:
    """A handler that records deliveries and lets a test wait for the n-th one."""

    def __init__(self, outcome: Callable[[Delivery], Awaitable[None]] | None = None) -> None:
        self.deliveries: list[Delivery] = []
        self.times: list[float] = []
        self._outcome = outcome
        self._changed = asyncio.Condition()

    async def __call__(self, delivery: Delivery) -> None:
        async with self._changed:
            self.deliveries.append(delivery)
            self.times.append(asyncio.get_running_loop().time())
            self._changed.notify_all()
        if self._outcome is not None:
            await self._outcome(delivery)

    async def wait_for(self, count: int) -> list[Delivery]:
        async with asyncio.timeout(TIMEOUT), self._changed:
            await self._changed.wait_for(lambda: len(self.deliveries) >= count)
        return self.deliveries


async def test_publish_consume_ack_removes_message(broker: Broker) -> None:
    task = compose("nuit étoilée ✨", regeneration_id="r-1", clip_index=3, attempt=1,
                   new_clip=jobs_pb2.ClipInput(prompt="nuit étoilée ✨", duration=1.25, video_key="k"),
                   trace_context={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    recorder = Recorder()
    subscription = await broker.consume(COMPOSE_QUEUE, recorder)

    await broker.publish(COMPOSE_QUEUE, task, message_id="r-1")
    [delivery] = await recorder.wait_for(1)

    assert delivery.task == task
    assert delivery.queue == COMPOSE_QUEUE
    assert delivery.message_id == "r-1"
    assert delivery.attempt == 1
    assert not delivery.redelivered
    await subscription.cancel()

    # After a reconnect the acked message is not delivered again: only the sentinel arrives.
    await broker.close()
    assert not await broker.ping()
    await broker.connect()
    assert await broker.ping()
    after = Recorder()
    subscription = await broker.consume(REGENERATE_QUEUE, after)
    await broker.publish(REGENERATE_QUEUE, regenerate("sentinel"), message_id="sentinel")
    await after.wait_for(1)
    await subscription.cancel()
    assert [d.message_id for d in after.deliveries] == ["sentinel"]
    assert await broker.dead_letters(COMPOSE_QUEUE) == []
    assert await broker.dead_letters(REGENERATE_QUEUE) == []
    assert await broker.dead_letters() == []


async def test_acked_message_is_not_redelivered_to_a_new_connection(make_broker: BrokerFactory) -> None:
    first = await make_broker()
    recorder = Recorder()
    await first.consume(COMPOSE_QUEUE, recorder)
    await first.publish(COMPOSE_QUEUE, compose(1), message_id="m-1")
    await recorder.wait_for(1)
    await first.close()

    second = await make_broker()

    assert await second.dead_letters(COMPOSE_QUEUE) == []


async def test_requeue_comes_back_later_then_dead_letters_at_the_limit(broker: Broker) -> None:
    async def always_requeue(delivery: Delivery) -> None:
        raise RequeueMessage

    recorder = Recorder(always_requeue)
    await broker.consume(REGENERATE_QUEUE, recorder)

    await broker.publish(REGENERATE_QUEUE, regenerate(1, attempt=1), message_id="flaky")
    [dead] = await drain_until(broker, DEAD_LETTER_QUEUE, 1)

    # The attempt is the message's own count, raised on each retry: the limit holds whatever the
    # broker counts (RabbitMQ 4.3 no longer counts nacks).
    assert [d.attempt for d in recorder.deliveries] == list(range(1, DELIVERY_LIMIT + 1))
    assert {d.message_id for d in recorder.deliveries} == {"flaky"}
    assert (dead.message_id, dead.queue, dead.task.job_id, dead.attempt) == (
        "flaky", REGENERATE_QUEUE, "job-1", DELIVERY_LIMIT)
    # Each retry waited longer than the one before: 0.2 s, then 0.4 s.
    gaps = [later - earlier for earlier, later in zip(recorder.times, recorder.times[1:], strict=False)]
    assert gaps[0] >= RETRY_DELAYS[0] * 0.9
    assert gaps[1] >= RETRY_DELAYS[1] * 0.9
    assert gaps[1] > gaps[0]


async def test_uncounted_requeue_keeps_the_attempt(broker: Broker) -> None:
    async def busy_twice(delivery: Delivery) -> None:
        if len(recorder.deliveries) <= 2:
            raise RequeueMessage("held elsewhere", counted=False, delay=0.1)

    recorder = Recorder(busy_twice)
    subscription = await broker.consume(COMPOSE_QUEUE, recorder)
    await broker.publish(COMPOSE_QUEUE, compose(1, attempt=1), message_id="busy")
    await recorder.wait_for(3)
    await subscription.cancel()

    assert [d.attempt for d in recorder.deliveries] == [1, 1, 1]
    assert await broker.dead_letters() == []


async def test_publish_refuses_another_queues_message_type(broker: Broker) -> None:
    with pytest.raises(TypeError):
        await broker.publish(COMPOSE_QUEUE, regenerate(1), message_id="wrong")


async def test_requeued_message_succeeds_on_a_later_delivery(broker: Broker) -> None:
    async def fail_once(delivery: Delivery) -> None:
        if delivery.attempt == 1:
            raise RequeueMessage

    recorder = Recorder(fail_once)
    subscription = await broker.consume(REGENERATE_QUEUE, recorder)

    await broker.publish(REGENERATE_QUEUE, regenerate(1), message_id="once")
    await recorder.wait_for(2)
    await subscription.cancel()

    assert [d.attempt for d in recorder.deliveries] == [1, 2]
    assert await broker.dead_letters(REGENERATE_QUEUE) == []
    assert await broker.dead_letters() == []


async def test_other_exception_dead_letters_at_once(broker: Broker) -> None:
    async def broken(delivery: Delivery) -> None:
        raise ValueError("permanent")

    recorder = Recorder(broken)
    subscription = await broker.consume(COMPOSE_QUEUE, recorder)

    await broker.publish(COMPOSE_QUEUE, compose(1), message_id="poison")
    [dead] = await drain_until(broker, DEAD_LETTER_QUEUE, 1)
    await subscription.cancel()

    assert [d.attempt for d in recorder.deliveries] == [1]
    assert dead.message_id == "poison"
    assert await broker.dead_letters(COMPOSE_QUEUE) == []


async def test_unknown_queue_is_unavailable(broker: Broker) -> None:
    with pytest.raises(DependencyUnavailable):
        await broker.publish("clipchat.no-such-queue", compose(1), message_id="lost")
    with pytest.raises(DependencyUnavailable):
        await broker.consume("clipchat.no-such-queue", Recorder())

    # The broker is still usable after the refusal.
    recorder = Recorder()
    await broker.consume(COMPOSE_QUEUE, recorder)
    await broker.publish(COMPOSE_QUEUE, compose(2), message_id="kept")
    assert [d.message_id for d in await recorder.wait_for(1)] == ["kept"]


async def test_unavailable_before_connect_and_after_close() -> None:
    broker = InMemoryBroker(delivery_limit=DELIVERY_LIMIT)
    with pytest.raises(DependencyUnavailable):
        await broker.publish(REGENERATE_QUEUE, regenerate(1), message_id="m")
    await broker.connect()
    await broker.close()
    with pytest.raises(DependencyUnavailable):
        await broker.publish(REGENERATE_QUEUE, regenerate(1), message_id="m")


@pytest.mark.rabbitmq
async def test_rabbitmq_unreachable_is_unavailable() -> None:
    broker = RabbitMQBroker("amqp://guest:guest@127.0.0.1:1/", delivery_limit=DELIVERY_LIMIT,
                            connect_timeout=2)
    with pytest.raises(DependencyUnavailable):
        await broker.connect()
    assert not await broker.ping()
    with pytest.raises(DependencyUnavailable):
        await broker.publish(REGENERATE_QUEUE, regenerate(1), message_id="m")


class Concurrency:
    """A handler that tracks how many of its calls overlap."""

    def __init__(self, hold: Callable[[], Awaitable[None]]) -> None:
        self.in_flight = 0
        self.most = 0
        self.done: list[str] = []
        self._hold = hold

    async def __call__(self, delivery: Delivery) -> None:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self._hold()
        finally:
            self.in_flight -= 1
        self.done.append(delivery.message_id)


async def test_prefetch_one_runs_one_handler_at_a_time(broker: Broker) -> None:
    all_done = asyncio.Event()

    async def hold() -> None:
        # Give a second delivery every chance to start while this one runs.
        for _ in range(5):
            await asyncio.sleep(0.01)

    handler = Concurrency(hold)

    async def handle(delivery: Delivery) -> None:
        await handler(delivery)
        if len(handler.done) == 4:
            all_done.set()

    await broker.consume(REGENERATE_QUEUE, handle, prefetch=1)
    for i in range(4):
        await broker.publish(REGENERATE_QUEUE, regenerate(i), message_id=f"m-{i}")
    async with asyncio.timeout(TIMEOUT):
        await all_done.wait()

    assert handler.most == 1
    assert handler.done == [f"m-{i}" for i in range(4)]


async def test_handlers_run_concurrently_up_to_prefetch(broker: Broker) -> None:
    three_running, release, all_done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        if handler.in_flight == 3:
            three_running.set()
        await release.wait()

    handler = Concurrency(hold)

    async def handle(delivery: Delivery) -> None:
        await handler(delivery)
        if len(handler.done) == 6:
            all_done.set()

    await broker.consume(COMPOSE_QUEUE, handle, prefetch=3)
    for i in range(6):
        await broker.publish(COMPOSE_QUEUE, compose(i), message_id=f"m-{i}")

    async with asyncio.timeout(TIMEOUT):
        await three_running.wait()
    release.set()
    async with asyncio.timeout(TIMEOUT):
        await all_done.wait()

    assert handler.most == 3
    assert sorted(handler.done) == [f"m-{i}" for i in range(6)]


async def test_slow_handler_loses_no_message(broker: Broker) -> None:
    async def slow(delivery: Delivery) -> None:
        await asyncio.sleep(0.01 * (int(delivery.task.job_id.removeprefix("job-")) % 3))

    recorder = Recorder(slow)
    subscription = await broker.consume(REGENERATE_QUEUE, recorder, prefetch=2)
    ids = [f"m-{i}" for i in range(20)]
    for i, message_id in enumerate(ids):
        await broker.publish(REGENERATE_QUEUE, regenerate(i), message_id=message_id)

    await recorder.wait_for(len(ids))
    await subscription.cancel()

    assert sorted(d.message_id for d in recorder.deliveries) == sorted(ids)
    assert all(d.attempt == 1 and not d.redelivered for d in recorder.deliveries)
    assert await broker.dead_letters(REGENERATE_QUEUE) == []
    assert await broker.dead_letters() == []


async def test_cancel_lets_a_running_handler_finish(broker: Broker) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def gated(delivery: Delivery) -> None:
        started.set()
        await release.wait()

    recorder = Recorder(gated)
    subscription = await broker.consume(COMPOSE_QUEUE, recorder)
    await broker.publish(COMPOSE_QUEUE, compose(1), message_id="in-flight")
    async with asyncio.timeout(TIMEOUT):
        await started.wait()

    cancelling = asyncio.create_task(subscription.cancel())
    await asyncio.sleep(0)
    release.set()
    async with asyncio.timeout(TIMEOUT):
        await cancelling

    assert await broker.dead_letters(COMPOSE_QUEUE) == []  # acked, not returned


async def test_handler_cut_off_at_shutdown_is_redelivered(broker: Broker) -> None:
    started = asyncio.Event()

    async def stuck(delivery: Delivery) -> None:
        started.set()
        await asyncio.Event().wait()

    await broker.consume(COMPOSE_QUEUE, Recorder(stuck))
    await broker.publish(COMPOSE_QUEUE, compose(1), message_id="interrupted")
    async with asyncio.timeout(TIMEOUT):
        await started.wait()

    await broker.close()  # waits GRACE_SECONDS, then cancels the handler
    await broker.connect()
    recorder = Recorder()
    await broker.consume(COMPOSE_QUEUE, recorder)

    [delivery] = await recorder.wait_for(1)
    assert delivery.message_id == "interrupted"
    assert delivery.redelivered  # cut off by the shutdown: not a failure, so no attempt used
    assert delivery.attempt == 1


async def test_topic_subscriptions_receive_matching_events_only(broker: Broker) -> None:
    received: dict[str, list[tuple[str, Any]]] = {"one_word": [], "all_jobs": [], "abc_anywhere": []}
    finished = {name: asyncio.Event() for name in received}

    def collector(name: str) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
        async def collect(routing_key: str, body: dict[str, Any]) -> None:
            received[name].append((routing_key, body["n"]))
            if body["n"] == "end":
                finished[name].set()
        return collect

    await broker.publish_event("job.abc.progress", {"n": "before subscribing"})
    await broker.subscribe_events("job.*.progress", collector("one_word"))
    await broker.subscribe_events("job.#", collector("all_jobs"))
    await broker.subscribe_events("*.abc.#", collector("abc_anywhere"))

    events = ["job.abc.progress", "job.abc.stage.done", "job.xyz.progress", "other.abc.progress",
              "job", "jobs.abc.progress"]
    for n, routing_key in enumerate(events):
        await broker.publish_event(routing_key, {"n": n})
    await broker.publish_event("job.abc.progress", {"n": "end"})
    async with asyncio.timeout(TIMEOUT):
        for event in finished.values():
            await event.wait()

    end = ("job.abc.progress", "end")
    assert received["one_word"] == [("job.abc.progress", 0), ("job.xyz.progress", 2), end]
    assert received["all_jobs"] == [("job.abc.progress", 0), ("job.abc.stage.done", 1),
                                    ("job.xyz.progress", 2), ("job", 4), end]
    assert received["abc_anywhere"] == [("job.abc.progress", 0), ("job.abc.stage.done", 1),
                                        ("other.abc.progress", 3), ("jobs.abc.progress", 5), end]


async def test_failing_event_handler_keeps_its_subscription(broker: Broker) -> None:
    seen: list[int] = []
    second = asyncio.Event()

    async def flaky(routing_key: str, body: dict[str, Any]) -> None:
        seen.append(body["n"])
        if body["n"] == 1:
            raise RuntimeError("subscriber bug")
        second.set()

    subscription = await broker.subscribe_events("job.*.progress", flaky)
    await broker.publish_event("job.a.progress", {"n": 1})
    await broker.publish_event("job.a.progress", {"n": 2})
    async with asyncio.timeout(TIMEOUT):
        await second.wait()
    await subscription.cancel()

    assert seen == [1, 2]
    await broker.publish_event("job.a.progress", {"n": 3})  # no subscriber left: dropped quietly
