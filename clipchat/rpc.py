"""gRPC helpers: servers with health and reflection, domain-error mapping, client calls with deadlines.

Between the parts, calls are authenticated with one shared service token (``authorization: Bearer
<CLIPCHAT_SERVICE_TOKEN>``): the client interceptor of every channel made here adds it and the
server interceptor of every server made here checks it, health checks excepted. A shared token
rather than mTLS because mTLS needs a CA and certificate rotation; a mesh can add mTLS on top.
TLS itself is optional (``CLIPCHAT_GRPC_TLS_*``) and encrypts the token on the wire.
"""

from __future__ import annotations

import functools
import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clipchat.errors import CODE_KEY, RETRYABLE_KEY, ClipChatError, InvalidInput, from_rpc_error, unexpected_error
from clipchat.health import LIVENESS_SERVICE, DependencyWatcher, HealthCheck, dependency_service_name

if TYPE_CHECKING:
    from clipchat.settings import Settings

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

    @property
    def watcher(self) -> DependencyWatcher | None:
        """What ``watch`` started (None before): ``check_now()`` re-checks at once."""
        return self._watcher

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
                        port: int = 0, settings: Settings | None = None) -> GrpcServer:
    """Start a server for ``(add_servicer_fn, servicer, full_service_name)`` triples.

    Health (``grpc.health.v1``) is registered too, open to every caller; ``LIVENESS_SERVICE``
    answers SERVING while the process runs. From ``settings``: every other call must carry the
    service token when one is set, reflection is registered when enabled, and the port is TLS when
    a certificate is set (no settings: no token, reflection, plaintext). ``port=0`` binds a free
    port, which is returned on the server object. Raises ``OSError`` when a TLS file cannot be read.
    """
    from clipchat.telemetry import server_interceptors

    interceptors = server_interceptors()
    if settings is not None and settings.service_token:
        interceptors.append(ServiceTokenInterceptor(settings.service_token))
    server = grpc.aio.server(interceptors=interceptors,
                             options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
    names = []
    for add, servicer, name in registrations:
        add(servicer, server)
        names.append(name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings is None or settings.reflection_enabled:
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if settings is not None and settings.grpc_tls_cert_file and settings.grpc_tls_key_file:
        credentials = grpc.ssl_server_credentials([(settings.grpc_tls_key_file.read_bytes(),
                                                    settings.grpc_tls_cert_file.read_bytes())])
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    wrapped = GrpcServer(server, bound, health_servicer, names)
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await wrapped.set_serving(True)
    return wrapped


def require_owner(owner: str, action: str) -> None:
    """Raise ``InvalidInput`` (INVALID_ARGUMENT) when a call made on behalf of a person has no owner.

    An empty owner skips the ownership check further down, so only the calls the workers make
    (``GetJob``, ``GetRegeneration``, lease-guarded writes) may leave it out.
    """
    if not owner:
        raise InvalidInput(f"{action} needs an owner.")


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


# Open without the service token: kubelet's gRPC probes carry none.
_OPEN_METHOD_PREFIXES = (f"/{health.SERVICE_NAME}/",)


class ServiceTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) a call whose ``authorization`` is not ``Bearer <token>``.

    Health checks pass without it. The comparison takes the same time however much of the token
    matches.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("a service token is needed")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_OPEN_METHOD_PREFIXES):
            return handler
        sent = next((value for key, value in handler_call_details.invocation_metadata or ()
                     if key == "authorization"), "")
        sent_bytes = sent if isinstance(sent, bytes) else str(sent).encode()
        if hmac.compare_digest(sent_bytes, self._expected):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "This call needs the service token.")

    # Streaming answers must come from an async generator (the tracing interceptor iterates it).
    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await refuse(request, context)
        yield  # never reached: the abort raises

    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **codec)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **codec)


class _BearerMetadata:
    """Adds ``authorization: Bearer <token>`` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


# grpc.aio files an interceptor under one kind only, so each kind gets its own class.
class _BearerUnaryUnary(_BearerMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request)


class _BearerUnaryStream(_BearerMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request)


class _BearerStreamUnary(_BearerMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                     request_iterator: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request_iterator)


class _BearerStreamStream(_BearerMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                      request_iterator: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request_iterator)


def service_token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors sending ``token`` on every kind of call."""
    return [kind(token) for kind in (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary,
                                     _BearerStreamStream)]


def open_channel(addr: str, settings: Settings | None = None) -> grpc.aio.Channel:
    """A client channel with tracing interceptors and keepalive.

    From ``settings``: the service token on every call when one is set, and TLS checked against
    ``grpc_tls_ca_file`` when that is set (no settings: no token, plaintext). Raises ``OSError``
    when the CA file cannot be read.
    """
    from clipchat.telemetry import client_interceptors

    interceptors: list[Any] = client_interceptors()
    if settings is not None and settings.service_token:
        interceptors += service_token_interceptors(settings.service_token)
    options = [("grpc.keepalive_time_ms", 30_000), ("grpc.max_receive_message_length", 16 * 1024 * 1024)]
    if settings is not None and settings.grpc_tls_ca_file is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=settings.grpc_tls_ca_file.read_bytes())
        return grpc.aio.secure_channel(addr, credentials, interceptors=interceptors, options=options)
    return grpc.aio.insecure_channel(addr, interceptors=interceptors, options=options)


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
