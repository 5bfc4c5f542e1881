"""Wires the status service: database, event hub, outbox relay, broker fan-out, lease sweeper, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from clipchat.broker import Broker, Subscription
from clipchat.db import Database
from clipchat.db.migrate import head_revision, schema_at_head
from clipchat.db.models import JobEvent
from clipchat.rpc import GrpcServer, create_server
from clipchat.settings import Settings
from services.status import server as status_server
from services.status.events import EventHub
from services.status.outbox import OutboxRelay
from services.status.state_machine import JobStateMachine

log = logging.getLogger("clipchat.status")

# Cross-replica event notifications waiting to be published; past this they are dropped (watchers
# also poll the log, so a dropped notification only delays them).
_MAX_PENDING_NOTIFICATIONS = 1000
_NOTIFY_TIMEOUT = 5.0


class StatusService:
    """The status service's parts, started and stopped together."""

    def __init__(self, settings: Settings, db: Database, broker: Broker) -> None:
        self.settings = settings
        self.db = db
        self.broker = broker
        self.hub = EventHub()
        self.relay = OutboxRelay(db, broker, backoff_max_seconds=settings.retry_max_seconds)
        self.machine = JobStateMachine(db, lease_seconds=settings.lease_seconds,
                                       budget_limit=settings.budget_limit,
                                       max_budget_limit=settings.max_budget_limit,
                                       budget_warning_fraction=settings.budget_warning_fraction,
                                       claim_seconds=3 * settings.heartbeat_seconds,
                                       notifier=self._notify, on_outbox=self.relay.wake)
        self.servicer = status_server.JobStatusServicer(self.machine, self.hub)
        self._subscription: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._notifications: set[asyncio.Task[None]] = set()
        self.grpc: GrpcServer | None = None

    async def start(self, *, host: str = "127.0.0.1", port: int = 0) -> GrpcServer:
        self._subscription = await self.broker.subscribe_events("job.#", self._on_broker_event)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="lease-sweeper")
        self.relay.start()
        self.relay.wake()  # messages left unsent by an earlier run
        self.grpc = await create_server(
            [(status_server.add_to_server, self.servicer, status_server.SERVICE_NAME)], host=host, port=port,
            settings=self.settings)
        head = head_revision()
        await self.grpc.watch({"database": self.db.ping, "schema": lambda: schema_at_head(self.db, head),
                               "broker": self.broker.ping},
                              interval=self.settings.health_check_interval_seconds,
                              timeout=self.settings.health_check_timeout_seconds)
        log.info("status.started", extra={"port": self.grpc.port})
        return self.grpc

    async def stop(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop(grace=2.0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.relay.stop()
        for task in list(self._notifications):
            task.cancel()
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.cancel()

    async def _notify(self, job_id: str, sequence: int, event: JobEvent) -> None:
        await self.hub.notify(job_id, sequence)
        # Other status replicas wake their watchers from this; the log stays the truth. Sent in the
        # background: a slow broker never holds up the write that made the event.
        if len(self._notifications) >= _MAX_PENDING_NOTIFICATIONS:
            log.warning("event.notification_dropped", extra={"job_id": job_id, "sequence": sequence})
            return
        task = asyncio.create_task(self._publish_notification(f"job.{job_id}.{event.type}",
                                                              {"job_id": job_id, "sequence": sequence}))
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    async def _publish_notification(self, routing_key: str, body: dict[str, Any]) -> None:
        try:
            async with asyncio.timeout(_NOTIFY_TIMEOUT):
                await self.broker.publish_event(routing_key, body)
        except Exception as exc:  # best effort: watchers poll the log as well
            log.info("event.notify_failed", extra={"routing_key": routing_key, "error": type(exc).__name__})

    async def _on_broker_event(self, routing_key: str, body: dict[str, Any]) -> None:
        job_id, sequence = body.get("job_id"), body.get("sequence")
        if isinstance(job_id, str) and isinstance(sequence, int):
            await self.hub.notify(job_id, sequence)

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.machine.sweep_expired()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("lease.sweep_failed", exc_info=True)
            await asyncio.sleep(self.settings.sweep_interval_seconds)
