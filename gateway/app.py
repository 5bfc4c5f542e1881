"""The gateway application: REST + SSE for browsers in front of the gRPC services.

``create_app(settings)`` does no I/O; the gRPC channels (and storage, unless one is handed in) are
opened by the lifespan when a server starts the app, and closed when it stops. ``serve(settings)``
runs it with uvicorn on ``settings.gateway_host:gateway_port``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode

import uvicorn
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from clipchat import telemetry
from clipchat.settings import Settings
from clipchat.storage import Storage, create_storage
from gateway.access_log import configure_access_log
from gateway.deps import QUERY_TICKET_SCOPE_KEY, QUERY_TOKEN_SCOPE_KEY, Downstream
from gateway.errors import install_error_handlers
from gateway.feeds import FeedHub, StreamSlots
from gateway.openapi import complete_document
from gateway.ratelimit import TokenBucketLimiter
from gateway.routes import api_router
from gateway.routes import metrics as metrics_route
from gateway.routes.events import WATCH_STREAM_SECONDS
from gateway.routes.page import STATIC_DIR
from gateway.signing import MediaSigner
from gateway.tickets import TicketSigner

API_DESCRIPTION = """Change one clip of an AI music video by chatting with it, and get the whole video
back, recomposed.

Authenticate with `Authorization: Bearer <token>`. Errors always have the shape
`{"error": {"code", "message", "retryable"}}`. Money is a decimal string. Media URLs in the JSON are
signed and expire; fetch the job again for fresh ones."""


_SECRET_QUERY_KEYS = {"access_token": QUERY_TOKEN_SCOPE_KEY, "ticket": QUERY_TICKET_SCOPE_KEY}


class GatewayApp(FastAPI):
    """FastAPI that keeps ``?ticket=`` (and a stray ``?access_token=``) out of the URL everything else sees.

    EventSource cannot send headers, so the page passes a short-lived ticket in the query string.
    FastAPI's telemetry records the query of each request in its span; the value is moved into the
    ASGI scope before that happens, where the authentication dependency finds it. An API token in
    the URL is not accepted, but an old client may still send one: it is taken out all the same.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = scope.get("query_string", b"") if scope["type"] == "http" else b""
        if b"access_token=" in query or b"ticket=" in query:
            pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
            found = {_SECRET_QUERY_KEYS[key]: value for key, value in reversed(pairs) if key in _SECRET_QUERY_KEYS}
            if found:
                scope = {**scope, **found,
                         "query_string": urlencode([(k, v) for k, v in pairs if k not in _SECRET_QUERY_KEYS])
                         .encode("latin-1")}
        await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document, completed once with what the route signatures cannot say."""
        if self.openapi_schema is None:
            complete_document(super().openapi())
        return super().openapi()


def create_app(settings: Settings, *, storage: Storage | None = None) -> FastAPI:
    """Build the gateway for ``settings``; ``storage`` overrides the one ``settings`` names."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        downstream = Downstream.open(settings)
        owned_storage = storage is None
        app.state.downstream = downstream
        app.state.storage = create_storage(settings) if storage is None else storage
        try:
            yield
        finally:
            await downstream.close()
            if owned_storage:
                await app.state.storage.close()

    app = GatewayApp(title="ClipChat API", version="1.0.0", description=API_DESCRIPTION,
                     lifespan=lifespan)
    app.state.settings = settings
    app.state.signer = MediaSigner(settings.media_signing_key, settings.media_url_ttl_seconds,
                                   base_url=settings.public_url)
    app.state.limiter = TokenBucketLimiter(settings.rate_limit_per_minute)
    app.state.auth_failures = TokenBucketLimiter(settings.auth_failures_per_minute)
    app.state.tickets = TicketSigner(settings.media_signing_key, settings.sse_ticket_ttl_seconds)
    app.state.feeds = FeedHub(queue_size=settings.sse_subscriber_queue, stream_seconds=WATCH_STREAM_SECONDS,
                               heartbeat_seconds=settings.sse_heartbeat_seconds)
    app.state.stream_slots = StreamSlots(settings.sse_max_streams_per_owner)
    install_error_handlers(app)
    app.include_router(api_router())
    app.include_router(metrics_route.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    telemetry.instrument_app(app)
    return app


async def serve(settings: Settings, *, storage: Storage | None = None) -> None:
    """Run the gateway with uvicorn until the process is asked to stop (SIGINT/SIGTERM)."""
    config = uvicorn.Config(
        create_app(settings, storage=storage), host=settings.gateway_host, port=settings.gateway_port,
        # Logging is configured by clipchat.telemetry. No access log unless asked for (request spans
        # record each request); when it is on, its lines are redacted as `clipchat serve gateway`'s are.
        log_config=None, access_log=settings.gateway_access_log,
        # The client address (failed-authentication limits) comes from X-Forwarded-For only when
        # the peer is a trusted proxy (an ingress controller).
        proxy_headers=True, forwarded_allow_ips=settings.forwarded_allow_ips,
        # Open SSE streams must not hold a rolling restart for long; EventSource reconnects.
        timeout_graceful_shutdown=5)
    configure_access_log(settings.gateway_access_log, json_lines=True)
    await uvicorn.Server(config).serve()
