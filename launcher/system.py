"""Starts ClipChat's parts: all in one process (embedded) or one of them (distributed).

Both modes run the same services talking gRPC to each other; only the backends differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from clipchat.broker import Broker, create_broker
from clipchat.db import Database
from clipchat.db.migrate import upgrade
from clipchat.settings import Settings
from clipchat.storage import Storage, create_storage

log = logging.getLogger("clipchat.launcher")

SERVICES = ("status", "regenerator", "composer", "gateway")


def _port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


@dataclass
class RunningSystem:
    settings: Settings
    storage: Storage
    broker: Broker
    db: Database | None = None
    parts: list[Any] = field(default_factory=list)
    gateway_server: uvicorn.Server | None = None
    gateway_task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return self.settings.public_url or f"http://{self.settings.gateway_host}:{self.settings.gateway_port}"

    async def stop(self) -> None:
        if self.gateway_server is not None:
            self.gateway_server.should_exit = True
        if self.gateway_task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self.gateway_task, 10)
        for part in reversed(self.parts):
            with contextlib.suppress(Exception):
                await part.stop()
        with contextlib.suppress(Exception):
            await self.broker.close()
        if self.db is not None:
            await self.db.dispose()
        with contextlib.suppress(Exception):
            await self.storage.close()


async def start_gateway(settings: Settings, storage: Storage) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    from gateway.app import create_app

    app = create_app(settings, storage=storage)
    config = uvicorn.Config(app, host=settings.gateway_host, port=settings.gateway_port, log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(), name="gateway")
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"The gateway could not start on port {settings.gateway_port}.")
        await asyncio.sleep(0.05)
    return server, task


async def start_embedded(settings: Settings, *, services: tuple[str, ...] = SERVICES) -> RunningSystem:
    """Every service and the gateway in this process, on localhost, with the given backends."""
    from services.composer.service import ComposerService
    from services.regenerator.service import RegeneratorService
    from services.status.service import StatusService

    await upgrade(settings.resolved_database_url)
    storage = create_storage(settings)
    broker = create_broker(settings)
    await broker.connect()
    system = RunningSystem(settings=settings, storage=storage, broker=broker,
                           db=Database(settings.resolved_database_url))
    try:
        assert system.db is not None
        if "status" in services:
            status = StatusService(settings, system.db, broker)
            server = await status.start(port=0)
            system.parts.append(status)
            settings = settings.model_copy(update={"status_addr": f"127.0.0.1:{server.port}"})
        if "composer" in services:
            composer = ComposerService(settings, storage=storage, broker=broker)
            server = await composer.start(port=0)
            system.parts.append(composer)
            settings = settings.model_copy(update={"composer_addr": f"127.0.0.1:{server.port}"})
        if "regenerator" in services:
            regenerator = RegeneratorService(settings, storage=storage, broker=broker)
            server = await regenerator.start(port=0)
            system.parts.append(regenerator)
            settings = settings.model_copy(update={"regenerator_addr": f"127.0.0.1:{server.port}"})
        system.settings = settings
        if "gateway" in services:
            system.gateway_server, system.gateway_task = await start_gateway(settings, storage)
            if settings.gateway_port == 0:
                sock = system.gateway_server.servers[0].sockets[0]
                settings = settings.model_copy(update={"gateway_port": sock.getsockname()[1]})
                system.settings = settings
    except BaseException:
        await system.stop()
        raise
    return system


async def serve_one(service: str, settings: Settings, stop: asyncio.Event) -> None:
    """Distributed mode: run one service until ``stop`` is set, then shut down gracefully."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}")
    storage = create_storage(settings)
    if service == "gateway":
        server, task = await start_gateway(settings, storage)
        log.info("gateway.serving", extra={"port": settings.gateway_port})
        await stop.wait()
        server.should_exit = True
        await task
        await storage.close()
        return
    broker = create_broker(settings)
    await broker.connect()
    db: Database | None = None
    part: Any
    if service == "status":
        from services.status.service import StatusService

        db = Database(settings.resolved_database_url)
        part = StatusService(settings, db, broker)
        port = settings.grpc_port or _port_of(settings.status_addr)
    elif service == "regenerator":
        from services.regenerator.service import RegeneratorService

        part = RegeneratorService(settings, storage=storage, broker=broker)
        port = settings.grpc_port or _port_of(settings.regenerator_addr)
    else:
        from services.composer.service import ComposerService

        part = ComposerService(settings, storage=storage, broker=broker)
        port = settings.grpc_port or _port_of(settings.composer_addr)
    await part.start(host=settings.grpc_host, port=port)
    log.info("service.serving", extra={"service": service, "port": port})
    try:
        await stop.wait()
    finally:
        await part.stop()
        await broker.close()
        if db is not None:
            await db.dispose()
        await storage.close()
