"""The RabbitMQ consumer of the regenerate queue."""

from __future__ import annotations

import logging

from clipchat.broker import Delivery, RequeueMessage
from clipchat.errors import ClipChatError
from clipchat.telemetry import extract_context, tracer
from services.regenerator.pipeline import RegenerationPipeline, RegenerationTask

log = logging.getLogger("clipchat.regenerator")


class RegenerateWorker:
    """Runs one regeneration a message; idempotent on the regeneration id."""

    def __init__(self, pipeline: RegenerationPipeline) -> None:
        self.pipeline = pipeline

    async def handle(self, delivery: Delivery) -> None:
        body = delivery.body
        try:
            task = RegenerationTask(job_id=str(body["job_id"]), regeneration_id=str(body["regeneration_id"]),
                                    lease_token=str(body["lease_token"]))
        except KeyError as exc:
            log.error("regenerate.bad_message", extra={"message_id": delivery.message_id})
            raise ValueError("malformed regenerate message") from exc
        with tracer("clipchat.regenerator").start_as_current_span(
                "regenerate.message", context=extract_context(delivery.headers)):
            try:
                await self.pipeline.run(task)
            except ClipChatError as exc:
                if exc.retryable:
                    # The status service was unreachable: try the message again later.
                    log.warning("regenerate.requeue", extra={"job_id": task.job_id,
                                                             "regeneration_id": task.regeneration_id})
                    raise RequeueMessage(str(exc)) from exc
                raise
