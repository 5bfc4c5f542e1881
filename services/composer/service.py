"""Wires the composer: encoder probe, composer, gRPC server and compose-queue consumer."""

from __future__ import annotations

import logging

from clipchat.broker import COMPOSE_QUEUE, Broker
from clipchat.media.ffmpeg import FfmpegRunner
from clipchat.queue_service import QueueService
from clipchat.rpc import GrpcServer
from clipchat.settings import Settings
from clipchat.status_client import StatusClient
from clipchat.storage import Storage
from services.composer import server as composer_server
from services.composer.pipeline import Composer
from services.composer.worker import ComposeWorker

log = logging.getLogger("clipchat.composer")


class ComposerService(QueueService):
    def __init__(self, settings: Settings, *, storage: Storage, broker: Broker) -> None:
        super().__init__(settings, broker=broker, grace=5.0,
                         status=StatusClient(settings.status_addr, deadline=settings.grpc_deadline_seconds,
                                             settings=settings))
        self.ffmpeg = FfmpegRunner(settings.ffmpeg_path or None)
        self.composer = Composer(storage, self.ffmpeg, settings)
        self.worker = ComposeWorker(composer=self.composer, status=self.status, storage=storage, ffmpeg=self.ffmpeg,
                                    settings=settings)
        self.encoder = ""

    async def start(self, *, host: str = "127.0.0.1", port: int = 0, consume: bool = True) -> GrpcServer:
        """Probe the encoder, serve, then take compose tasks one at a time. The composition in hand
        gets 5 s at ``stop``."""
        choice = await self.composer.encoder()
        self.encoder = choice.name
        log.info("composer.encoder", extra={"encoder": choice.name, "reason": choice.reason})
        server = await self._serve(
            [(composer_server.add_to_server, composer_server.ComposerServicer(self.composer),
              composer_server.SERVICE_NAME)], queue=COMPOSE_QUEUE, handler=self.worker.handle, prefetch=1,
            host=host, port=port, consume=consume)
        log.info("composer.started", extra={"port": server.port, "encoder": self.encoder})
        return server
