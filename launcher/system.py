"""Starts ClipChat's parts: all in one process (embedded) or one of them (distributed).

Both modes run the same services talking gRPC to each other; only the backends differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from clipchat.broker import Broker, create_broker
from clipchat.db import Database
from clipchat.db.migrate import upgrade
from clipchat.errors import ClipChatError
from clipchat.settings import Settings
from clipchat.storage import Storage, create_storage
from launcher.errors import StartupError

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


# How far past the configured port embedded mode looks for a free one.
_PORT_SEARCH = 100


def gateway_socket(settings: Settings, *, search: bool) -> socket.socket:
    """A listening socket for the gateway on ``gateway_host:gateway_port``.

    With ``search`` (embedded mode) a busy port is no error: the next free one is taken. Raises
    ``StartupError`` naming the port and the setting to change when none can be bound.
    """
    first = settings.gateway_port
    candidates = range(first, first + _PORT_SEARCH) if search and first else (first,)
    for port in candidates:
        sock = socket.socket(socket.AF_INET6 if ":" in settings.gateway_host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.gateway_host, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE and port != candidates[-1]:
                continue
            raise StartupError(f"cannot listen on {settings.gateway_host}:{port} ({exc.strerror or exc}); "
                               "set CLIPCHAT_GATEWAY_PORT (or --port) to a free port") from exc
        sock.listen(2048)
        sock.setblocking(False)
        return sock
    raise AssertionError("unreachable")


async def start_gateway(settings: Settings, storage: Storage, sock: socket.socket) -> tuple[uvicorn.Server,
                                                                                          asyncio.Task[None]]:
    """Serve the gateway on ``sock`` (bound already, so a busy port is found before anything starts)."""
    from gateway.access_log import configure_access_log
    from gateway.app import create_app

    app = create_app(settings, storage=storage)
    # No access log unless asked for: request spans record each request, and its per-request line
    # costs time under load. httptools parses HTTP where it is installed (uvicorn's "auto").
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=3,
                            access_log=settings.gateway_access_log, http="auto")
    configure_access_log(settings.gateway_access_log)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="gateway")
    while not server.started:
        if task.done():
            task.result()
            raise StartupError(f"the gateway could not start on port {settings.gateway_port}")
        await asyncio.sleep(0.05)
    return server, task


async def start_embedded(settings: Settings, *, services: tuple[str, ...] = SERVICES) -> RunningSystem:
    """Every service and the gateway in this process, on localhost, with the given backends."""
    from services.composer.service import ComposerService
    from services.regenerator.service import RegeneratorService
    from services.status.service import StatusService

    # The port first: a busy 8000 just means the next free one, found before anything starts.
    sock = gateway_socket(settings, search=True) if "gateway" in services else None
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
        if sock is not None:
            settings = settings.model_copy(update={"gateway_port": sock.getsockname()[1]})
            system.settings = settings
            system.gateway_server, system.gateway_task = await start_gateway(settings, storage, sock)
    except BaseException:
        if sock is not None and system.gateway_server is None:
            sock.close()
        await system.stop()
        raise
    return system


async def serve_one(service: str, settings: Settings, stop: asyncio.Event) -> None:
    """Distributed mode: run one service until ``stop`` is set, then shut down gracefully."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}")
    if service == "gateway":
        from gateway.collector import tune_garbage_collector

        tune_garbage_collector()
        sock = gateway_socket(settings, search=False)
        storage = create_storage(settings)
        server, task = await start_gateway(settings, storage, sock)
        log.info("gateway.serving", extra={"port": settings.gateway_port})
        await stop.wait()
        server.should_exit = True
        await task
        await storage.close()
        return
    # Each resource is closed when anything after it fails, and all of them at the end, in reverse.
    async with contextlib.AsyncExitStack() as resources:
        if settings.metrics_port:
            _serve_metrics(settings, resources)
        storage = create_storage(settings)
        resources.push_async_callback(storage.close)
        broker = create_broker(settings)
        try:
            await broker.connect()
        except ClipChatError as exc:
            raise StartupError("the message broker cannot be reached; check CLIPCHAT_BROKER_URL and that "
                               "RabbitMQ is running") from exc
        resources.push_async_callback(broker.close)
        part, port = await _service_part(service, settings, storage, broker, resources)
        try:
            await part.start(host=settings.grpc_host, port=port)
        except RuntimeError as exc:  # grpc: "Failed to bind to address"
            await part.stop()
            raise StartupError(f"cannot listen on {settings.grpc_host}:{port}; set CLIPCHAT_GRPC_PORT to a "
                               "free port") from exc
        resources.push_async_callback(part.stop)
        log.info("service.serving", extra={"service": service, "port": port})
        await stop.wait()


def _serve_metrics(settings: Settings, resources: contextlib.AsyncExitStack) -> None:
    """Prometheus' ``GET /metrics`` on ``grpc_host:metrics_port`` until ``resources`` close; a busy
    port is a ``StartupError`` naming the setting."""
    from clipchat import metrics

    try:
        metrics.serve(settings.grpc_host, settings.metrics_port)
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {settings.grpc_host}:{settings.metrics_port} "
                           f"({exc.strerror or exc}); set CLIPCHAT_METRICS_PORT to a free port (0: no "
                           "metrics)") from exc
    resources.callback(metrics.stop_serving)


async def _service_part(service: str, settings: Settings, storage: Storage, broker: Broker,
                        resources: contextlib.AsyncExitStack) -> tuple[Any, int]:
    """The service object for ``service`` and the port it serves on; the status service's database
    is checked first (``StartupError`` when it cannot be reached) and closed with ``resources``."""
    if service == "status":
        from services.status.service import StatusService

        db = Database(settings.resolved_database_url)
        resources.push_async_callback(db.dispose)
        if not await db.ping():
            raise StartupError("the database cannot be reached; check CLIPCHAT_DATABASE_URL and that "
                               "PostgreSQL is running")
        return StatusService(settings, db, broker), settings.grpc_port or _port_of(settings.status_addr)
    if service == "regenerator":
        from services.regenerator.service import RegeneratorService

        return (RegeneratorService(settings, storage=storage, broker=broker),
                settings.grpc_port or _port_of(settings.regenerator_addr))
    from services.composer.service import ComposerService

    return (ComposerService(settings, storage=storage, broker=broker),
            settings.grpc_port or _port_of(settings.composer_addr))
