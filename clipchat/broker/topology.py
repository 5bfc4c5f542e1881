"""Names of the RabbitMQ exchanges and queues, the message type of each work queue, and the
delays between retries, in one place."""

from __future__ import annotations

from google.protobuf.message import Message

from clipchat.v1 import tasks_pb2

REGENERATE_QUEUE = "clipchat.regenerate"
COMPOSE_QUEUE = "clipchat.compose"
WORK_QUEUES = (REGENERATE_QUEUE, COMPOSE_QUEUE)
EVENTS_EXCHANGE = "clipchat.events"
DEAD_LETTER_EXCHANGE = "clipchat.dlx"
DEAD_LETTER_QUEUE = "clipchat.dead-letter"

# The protobuf message each work queue carries.
TASK_TYPES: dict[str, type[Message]] = {
    REGENERATE_QUEUE: tasks_pb2.RegenerateTask,
    COMPOSE_QUEUE: tasks_pb2.ComposeTask,
}
# Header naming the work queue a message was published to (read back from the dead-letter queue).
QUEUE_HEADER = "clipchat-queue"
# Header with the time (Unix seconds) a message entered its work queue, or will after a retry's
# delay: the queue wait a worker reports (``clipchat.metrics.queue_waited``) is counted from it.
QUEUED_AT_HEADER = "clipchat-queued-at"
CONTENT_TYPE = "application/x-protobuf"


def retry_delays(base_seconds: float, max_seconds: float, delivery_limit: int) -> tuple[float, ...]:
    """The wait before attempt n + 1 after attempt n failed, for n = 1 … delivery_limit - 1:
    doubling from ``base_seconds``, capped at ``max_seconds``."""
    return tuple(min(max_seconds, base_seconds * 2 ** n) for n in range(max(delivery_limit - 1, 1)))


def delay_queue(queue: str, delay: float) -> str:
    """The queue where messages of ``queue`` wait ``delay`` seconds before they return to it.

    The delay is part of the name, so changing the retry settings declares new queues instead of
    clashing with the arguments of existing ones."""
    return f"{queue}.delay.{round(delay * 1000)}ms"
