"""gRPC helpers: servers with health and reflection, domain-error mapping, client calls with deadlines."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clipchat.errors import CODE_KEY, RETRYABLE_KEY, ClipChatError, from_rpc_error, unexpected_error
from clipchat.health import LIVENESS_SERVICE, DependencyWatcher, HealthCheck, dependency_service_name

log = logging.getLogger("clipchat.rpc")

T = TypeVar("T")
Registration = tuple[Callable[[Any, grpc.aio.Server], None], Any, str]


class GrpcServer:
    """A running ``grpc.aio`` server with its health servicer, stopped gracefully.

    The server's health names (``""`` and each service) read SERVING while it takes work
    (``set_serving``) and, once ``watch`` is called, every watched dependency is up.
    """

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer: health.aio.HealthServicer,
                 service_names: Sequence[str]) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.service_names = list(service_names)
        self._taking_work = False
        self._watcher: DependencyWatcher | None = None

    async def set_serving(self, serving: bool) -> None:
        """Say whether this server takes work (False while draining); a dependency that is down
        keeps the health NOT_SERVING either way."""
        self._taking_work = serving
        await self._publish_own_health()

    async def watch(self, checks: Mapping[str, HealthCheck], *, interval: float = 5.0,
                    timeout: float | None = None) -> DependencyWatcher:
        """Make health follow ``checks`` (dependency name → async ping returning up or not).

        Pings each every ``interval`` seconds, each within ``timeout`` (default ``interval``); a
        ping that raises or overruns is down. Publishes each dependency as SERVING/NOT_SERVING
        under ``clipchat.dependency.<name>`` and the server's own names NOT_SERVING while any is
        down. The first round runs before this returns. Raises ``RuntimeError`` if called twice.
        """
        if self._watcher is not None:
            raise RuntimeError("this server already watches its dependencies")
        self._watcher = DependencyWatcher(checks, self._publish_dependencies, interval=interval,
                                          timeout=timeout)
        await self._watcher.start()
        return self._watcher

    async def stop(self, grace: float = 5.0) -> None:
        """Stop watching, report NOT_SERVING, then stop within ``grace`` seconds."""
        if self._watcher is not None:
            await self._watcher.stop()
        await self.set_serving(False)
        await self.server.stop(grace)

    async def _publish_dependencies(self, states: Mapping[str, bool]) -> None:
        for name, up in states.items():
            await self.health.set(dependency_service_name(name), _health_status(up))
        await self._publish_own_health()

    async def _publish_own_health(self) -> None:
        dependencies_up = self._watcher is None or self._watcher.all_up
        status = _health_status(self._taking_work and dependencies_up)
        for name in ["", *self.service_names]:
            await self.health.set(name, status)


def _health_status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return (health_pb2.HealthCheckResponse.SERVING if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING)


async def create_server(registrations: Sequence[Registration], *, host: str = "127.0.0.1",
                        port: int = 0) -> GrpcServer:
    """Start a server for ``(add_servicer_fn, servicer, full_service_name)`` triples.

    Health (``grpc.health.v1``) and reflection are registered too; ``LIVENESS_SERVICE`` answers
    SERVING while the process runs. ``port=0`` binds a free port, which is returned on the server
    object.
    """
    from clipchat.telemetry import server_interceptors

    server = grpc.aio.server(interceptors=server_interceptors(),
                             options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
    names = []
    for add, servicer, name in registrations:
        add(servicer, server)
        names.append(name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    wrapped = GrpcServer(server, bound, health_servicer, names)
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await wrapped.set_serving(True)
    return wrapped


async def abort_with(context: grpc.aio.ServicerContext, error: ClipChatError) -> None:
    context.set_trailing_metadata(((CODE_KEY, error.code),
                                   (RETRYABLE_KEY, "true" if error.retryable else "false")))
    await context.abort(error.status, error.message)


def rpc_method(func: Callable[..., Any]) -> Callable[..., Any]:
    """Map domain errors raised by a servicer method (unary or streaming) to gRPC status.

    Any other exception is logged and reported as ``unexpected_error`` maps it: UNAVAILABLE for a
    connection that failed or timed out, INTERNAL for the rest.
    """
    if inspect.isasyncgenfunction(func):
        @functools.wraps(func)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in func(self, request, context):
                    yield item
            except ClipChatError as exc:
                await abort_with(context, exc)
            except Exception as exc:
                log.exception("rpc.unhandled", extra={"method": func.__name__})
                await abort_with(context, unexpected_error(exc))
        return stream

    @functools.wraps(func)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await func(self, request, context)
        except ClipChatError as exc:
            await abort_with(context, exc)
        except Exception as exc:
            log.exception("rpc.unhandled", extra={"method": func.__name__})
            await abort_with(context, unexpected_error(exc))
    return unary


def insecure_channel(addr: str) -> grpc.aio.Channel:
    """A client channel with tracing interceptors and keepalive."""
    from clipchat.telemetry import client_interceptors

    return grpc.aio.insecure_channel(addr, interceptors=client_interceptors(), options=[
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ])


async def call(method: Callable[..., Awaitable[T]], request: Any, *, timeout: float) -> T:
    """Unary call with a deadline; gRPC errors come back as domain errors."""
    try:
        return await method(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc


async def stream(method: Callable[..., Any], request: Any, *, timeout: float | None) -> AsyncIterator[Any]:
    """Server-streaming call; gRPC errors come back as domain errors."""
    try:
        async for item in method(request, timeout=timeout):
            yield item
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:
            return
        raise from_rpc_error(exc) from exc
