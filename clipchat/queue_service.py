"""What the composer and the regenerator share as processes: a gRPC server that reads its broker's
health, one queue consumed, and a stop in the order that loses no work."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from clipchat.broker import Broker, Handler, Subscription
from clipchat.rpc import GrpcServer, Registration, create_server
from clipchat.settings import Settings
from clipchat.status_client import StatusClient

log = logging.getLogger("clipchat.service")


class QueueService:
    """Serves ``registrations`` over gRPC and consumes ``queue`` with ``handler``.

    ``stop`` turns health to NOT_SERVING first (no new gRPC calls are routed here), then cancels the
    consumer (no new messages), then gives the work in hand ``grace`` seconds; an unfinished
    message is not acknowledged and so is delivered again elsewhere.
    """

    def __init__(self, settings: Settings, *, broker: Broker, status: StatusClient, grace: float) -> None:
        self.settings = settings
        self.broker = broker
        self.status = status
        self.grace = grace
        self.grpc: GrpcServer | None = None
        self._consumer: Subscription | None = None

    async def _serve(self, registrations: Sequence[Registration], *, queue: str, handler: Handler, prefetch: int,
                     host: str, port: int, consume: bool) -> GrpcServer:
        self.grpc = await create_server(list(registrations), host=host, port=port, settings=self.settings)
        await self.grpc.watch({"broker": self.broker.ping}, interval=self.settings.health_check_interval_seconds,
                              timeout=self.settings.health_check_timeout_seconds)
        if consume:
            self._consumer = await self.broker.consume(queue, handler, prefetch=prefetch)
        return self.grpc

    async def stop(self) -> None:
        if self.grpc is not None:
            await self.grpc.set_serving(False)
        if self._consumer is not None:
            await self._consumer.cancel()
        if self.grpc is not None:
            await self.grpc.stop(grace=self.grace)
        await self.status.close()
