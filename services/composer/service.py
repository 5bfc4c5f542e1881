"""Wires the composer: encoder probe, composer, gRPC server and compose-queue consumer."""

from __future__ import annotations

import logging

from clipchat.broker import COMPOSE_QUEUE, Broker, Subscription
from clipchat.media.ffmpeg import FfmpegRunner
from clipchat.rpc import GrpcServer, create_server
from clipchat.settings import Settings
from clipchat.status_client import StatusClient
from clipchat.storage import Storage
from services.composer import server as composer_server
from services.composer.pipeline import Composer
from services.composer.worker import ComposeWorker

log = logging.getLogger("clipchat.composer")


class ComposerService:
    def __init__(self, settings: Settings, *, storage: Storage, broker: Broker) -> None:
        self.settings = settings
        self.broker = broker
        self.ffmpeg = FfmpegRunner(settings.ffmpeg_path or None)
        self.composer = Composer(storage, self.ffmpeg, settings)
        self.status = StatusClient(settings.status_addr, deadline=settings.grpc_deadline_seconds,
                                   settings=settings)
        self.worker = ComposeWorker(composer=self.composer, status=self.status, storage=storage, ffmpeg=self.ffmpeg,
                                    settings=settings)
        self.grpc: GrpcServer | None = None
        self._consumer: Subscription | None = None
        self.encoder = ""

    async def start(self, *, host: str = "127.0.0.1", port: int = 0, consume: bool = True) -> GrpcServer:
        choice = await self.composer.encoder()
        self.encoder = choice.name
        log.info("composer.encoder", extra={"encoder": choice.name, "reason": choice.reason})
        self.grpc = await create_server(
            [(composer_server.add_to_server, composer_server.ComposerServicer(self.composer),
              composer_server.SERVICE_NAME)], host=host, port=port,
            settings=self.settings)
        await self.grpc.watch({"broker": self.broker.ping}, interval=self.settings.health_check_interval_seconds,
                              timeout=self.settings.health_check_timeout_seconds)
        if consume:
            self._consumer = await self.broker.consume(COMPOSE_QUEUE, self.worker.handle, prefetch=1)
        log.info("composer.started", extra={"port": self.grpc.port, "encoder": self.encoder})
        return self.grpc

    async def stop(self) -> None:
        """Not serving first, then no new messages; the composition in hand gets the shutdown grace."""
        if self.grpc is not None:
            await self.grpc.set_serving(False)
        if self._consumer is not None:
            await self._consumer.cancel()
        if self.grpc is not None:
            await self.grpc.stop(grace=5.0)
        await self.status.close()
