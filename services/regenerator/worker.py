"""The RabbitMQ consumer of the regenerate queue."""

from __future__ import annotations

import logging

from opentelemetry import trace

from clipchat.broker import Delivery
from clipchat.lease import WorkClaim, run_claimed
from clipchat.status_client import StatusClient
from clipchat.telemetry import extract_context, tracer
from clipchat.v1 import jobs_pb2, tasks_pb2
from services.regenerator.pipeline import RegenerationPipeline, RegenerationTask

log = logging.getLogger("clipchat.regenerator")

GAVE_UP_MESSAGE = "Regeneration failed because a service was unavailable. Please try again."


class RegenerateWorker:
    """Runs one regeneration a message, under the delivery's claim (``clipchat.lease.run_claimed``)."""

    def __init__(self, pipeline: RegenerationPipeline, status: StatusClient, *, delivery_limit: int) -> None:
        self.pipeline = pipeline
        self.status = status
        self.delivery_limit = delivery_limit

    async def handle(self, delivery: Delivery) -> None:
        task: tasks_pb2.RegenerateTask = delivery.task
        if not task.job_id or not task.regeneration_id or not task.lease_token:
            log.error("regenerate.bad_message", extra={"message_id": delivery.message_id})
            raise ValueError("malformed regenerate message")

        async def work(claim: WorkClaim) -> None:
            await self.pipeline.run(RegenerationTask(task.job_id, task.regeneration_id, task.lease_token,
                                                     claim_id=claim.claim_id, attempt=claim.attempt))

        with tracer("clipchat.regenerator").start_as_current_span(
                "regenerate.message", context=extract_context(dict(task.trace_context)),
                kind=trace.SpanKind.CONSUMER):
            await run_claimed(self.status, delivery, jobs_pb2.WORK_PHASE_REGENERATE, work,
                              delivery_limit=self.delivery_limit, give_up_message=GAVE_UP_MESSAGE)

