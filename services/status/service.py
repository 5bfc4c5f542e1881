"""Wires the status service: database, event hub, broker fan-out, lease sweeper, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from clipchat.broker import COMPOSE_QUEUE, Broker, Subscription
from clipchat.db import Database
from clipchat.db.models import JobEvent
from clipchat.errors import DependencyUnavailable
from clipchat.rpc import GrpcServer, create_server
from clipchat.settings import Settings
from clipchat.telemetry import inject_headers
from services.status import server as status_server
from services.status.events import EventHub
from services.status.state_machine import JobSnapshot, JobStateMachine

log = logging.getLogger("clipchat.status")


class StatusService:
    """The status service's parts, started and stopped together."""

    def __init__(self, settings: Settings, db: Database, broker: Broker) -> None:
        self.settings = settings
        self.db = db
        self.broker = broker
        self.hub = EventHub()
        self.machine = JobStateMachine(db, lease_seconds=settings.lease_seconds,
                                       budget_limit=settings.budget_limit,
                                       budget_warning_fraction=settings.budget_warning_fraction,
                                       notifier=self._notify)
        self.servicer = status_server.JobStatusServicer(self.machine, self.hub,
                                                        on_job_created=self._start_initial_composition)
        self._subscription: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.grpc: GrpcServer | None = None

    async def start(self, *, host: str = "127.0.0.1", port: int = 0) -> GrpcServer:
        self._subscription = await self.broker.subscribe_events("job.#", self._on_broker_event)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="lease-sweeper")
        self.grpc = await create_server(
            [(status_server.add_to_server, self.servicer, status_server.SERVICE_NAME)], host=host, port=port)
        log.info("status.started", extra={"port": self.grpc.port})
        return self.grpc

    async def stop(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop(grace=2.0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.cancel()

    async def _notify(self, job_id: str, sequence: int, event: JobEvent) -> None:
        await self.hub.notify(job_id, sequence)
        # Other status replicas wake their watchers from this; the log stays the truth.
        await self.broker.publish_event(f"job.{job_id}.{event.type}", {"job_id": job_id, "sequence": sequence})

    async def _on_broker_event(self, routing_key: str, body: dict[str, Any]) -> None:
        job_id, sequence = body.get("job_id"), body.get("sequence")
        if isinstance(job_id, str) and isinstance(sequence, int):
            await self.hub.notify(job_id, sequence)

    async def _start_initial_composition(self, snapshot: JobSnapshot, lease_token: str) -> None:
        job_id = str(snapshot.job.id)
        try:
            await self.broker.publish(COMPOSE_QUEUE, {"job_id": job_id, "lease_token": lease_token,
                                                      "regeneration_id": ""},
                                      message_id=f"compose-{job_id}-initial", headers=inject_headers())
        except Exception as exc:
            await self.machine.fail(job_id, lease_token, error_code="unavailable",
                                    error_message="Composition could not be started. Please try again.",
                                    technical_detail=repr(exc), retryable=True)
            raise DependencyUnavailable("The work queue is unavailable. Please try again shortly.") from exc

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.machine.sweep_expired()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("lease.sweep_failed", exc_info=True)
            await asyncio.sleep(self.settings.sweep_interval_seconds)
