"""What routes get from FastAPI's dependency injection, as ``Annotated`` aliases.

Everything lives on ``app.state`` (set up by ``gateway.app.create_app`` and its lifespan), so the
routes never reach for globals. The dependencies are ``async def`` although none of them waits:
FastAPI runs a plain ``def`` dependency in a worker thread, a hop that costs more than its work.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import grpc
from fastapi import Depends, Path, Request, Security
from fastapi.security import APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer
from grpc_health.v1 import health_pb2_grpc

from clipchat.errors import NotFound
from clipchat.rpc import open_channel
from clipchat.settings import Settings
from clipchat.storage import Storage
from clipchat.v1 import composer_pb2_grpc, jobs_pb2_grpc, regenerator_pb2_grpc
from gateway.errors import RATE_LIMITED_CODE, ApiError
from gateway.feeds import FeedHub, StreamSlots
from gateway.ratelimit import TokenBucketLimiter
from gateway.signing import MediaSigner
from gateway.tickets import TicketSigner

# Where ``GatewayApp`` puts the ``?access_token=`` / ``?ticket=`` it took out of the query string.
QUERY_TOKEN_SCOPE_KEY = "clipchat.access_token"
QUERY_TICKET_SCOPE_KEY = "clipchat.ticket"


@dataclass
class Downstream:
    """The gRPC channels and stubs of the services behind the gateway.

    The gateway sends work to the composer through the queue; it asks the composer only what it
    composes with, for the readiness details.
    """

    status_channel: grpc.aio.Channel
    regenerator_channel: grpc.aio.Channel
    composer_channel: grpc.aio.Channel
    status: jobs_pb2_grpc.JobStatusServiceStub
    regenerator: regenerator_pb2_grpc.RegeneratorServiceStub
    composer: composer_pb2_grpc.ComposerServiceStub
    status_health: health_pb2_grpc.HealthStub
    regenerator_health: health_pb2_grpc.HealthStub

    @classmethod
    def connect(cls, status_channel: grpc.aio.Channel, regenerator_channel: grpc.aio.Channel,
                composer_channel: grpc.aio.Channel) -> Downstream:
        return cls(status_channel, regenerator_channel, composer_channel,
                   jobs_pb2_grpc.JobStatusServiceStub(status_channel),
                   regenerator_pb2_grpc.RegeneratorServiceStub(regenerator_channel),
                   composer_pb2_grpc.ComposerServiceStub(composer_channel),
                   health_pb2_grpc.HealthStub(status_channel),
                   health_pb2_grpc.HealthStub(regenerator_channel))

    @classmethod
    def open(cls, settings: Settings) -> Downstream:
        """Channels to the services ``settings`` names, with its service token and TLS."""
        return cls.connect(open_channel(settings.status_addr, settings),
                           open_channel(settings.regenerator_addr, settings),
                           open_channel(settings.composer_addr, settings))

    async def close(self) -> None:
        for channel in (self.status_channel, self.regenerator_channel, self.composer_channel):
            await channel.close()


def _app_state(attribute: str) -> Callable[[Request], Any]:
    """A dependency that hands out one of the objects ``create_app`` keeps on ``app.state``."""

    async def from_state(request: Request) -> Any:
        return getattr(request.app.state, attribute)

    from_state.__name__ = f"app_state_{attribute}"
    return from_state


SettingsDep = Annotated[Settings, Depends(_app_state("settings"))]
DownstreamDep = Annotated[Downstream, Depends(_app_state("downstream"))]
StorageDep = Annotated[Storage, Depends(_app_state("storage"))]
SignerDep = Annotated[MediaSigner, Depends(_app_state("signer"))]

_bearer = HTTPBearer(auto_error=False, description="A ClipChat API token.")
_query_ticket = APIKeyQuery(name="ticket", auto_error=False,
                            description="A short-lived event-stream ticket from POST /api/v1/jobs/{id}/tickets, "
                                        "for EventSource which cannot send headers.")


def _sign_in_allowance(request: Request) -> tuple[TokenBucketLimiter, str]:
    """The failed sign-ins limiter and the client's address; 429 when the address has none left."""
    failures: TokenBucketLimiter = request.app.state.auth_failures
    client = request.client.host if request.client else "unknown"
    retry_after = failures.waiting(client)
    if retry_after is not None:
        raise ApiError(429, RATE_LIMITED_CODE, f"Too many failed sign-ins from this address. Try again "
                       f"in {retry_after} s.", retryable=True, headers={"Retry-After": str(retry_after)})
    return failures, client


def _owner_of(token: str | None, settings: Settings, request: Request) -> str:
    """The owner of ``token``; 401 when there is none or it is unknown.

    Each 401 costs the client address one of its ``auth_failures_per_minute``; an address that has
    none left gets 429 before its token is even looked at, so guessing tokens learns nothing faster.
    """
    failures, client = _sign_in_allowance(request)
    if not token:
        failures.acquire(client)
        raise ApiError(401, "unauthenticated", "Sign in: send your API token as 'Authorization: Bearer "
                                               "<token>'.", headers={"WWW-Authenticate": "Bearer"})
    owner = None
    # Compare with every token in constant time so response timing says nothing about the tokens.
    for known, known_owner in settings.token_owners().items():
        if hmac.compare_digest(known.encode(), token.encode()):
            owner = known_owner
    if owner is None:
        failures.acquire(client)
        raise ApiError(401, "invalid_token", "This API token is not valid. Check it and sign in again.",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return owner


async def _current_owner(request: Request, settings: SettingsDep,
                         credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> str:
    return _owner_of(credentials.credentials if credentials else None, settings, request)


async def _stream_owner(request: Request, settings: SettingsDep, job_id: Annotated[str, Depends(_job_id)],
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
                        query_ticket: Annotated[str | None, Security(_query_ticket)]) -> str:
    """The owner from ``Authorization: Bearer`` or a ticket for this job in ``?ticket=``.

    The long-lived API token is never accepted in the URL (not even in development: the page and
    the CLI never need it there, and a token in a URL lands in access logs and browser history).
    GatewayApp moves ?ticket= out of the URL before telemetry records it, so the ticket is normally
    found in the scope; the query parameter covers the app run without that wrapper.
    """
    if credentials:
        return _owner_of(credentials.credentials, settings, request)
    ticket = request.scope.get(QUERY_TICKET_SCOPE_KEY) or query_ticket
    if not ticket:
        # No token and no ticket: the same answer (and throttling) as a request without a token.
        return _owner_of(None, settings, request)
    failures, client = _sign_in_allowance(request)
    tickets: TicketSigner = request.app.state.tickets
    try:
        return tickets.owner_of(ticket, job_id)
    except ApiError:
        failures.acquire(client)
        raise


async def _rate_limited_owner(request: Request, owner: Annotated[str, Depends(_current_owner)]) -> str:
    limiter: TokenBucketLimiter = request.app.state.limiter
    retry_after = limiter.acquire(owner)
    if retry_after is not None:
        raise ApiError(429, RATE_LIMITED_CODE, f"Too many requests. Try again in {retry_after} s.",
                       retryable=True, headers={"Retry-After": str(retry_after)})
    return owner


async def _job_id(job_id: Annotated[str, Path(description="The job's id (a UUID).")]) -> str:
    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        # Not a UUID cannot be anyone's job: the same answer as for someone else's job.
        raise NotFound("This video does not exist or is not yours.") from None


Owner = Annotated[str, Depends(_current_owner)]
"""The caller's owner id, from ``Authorization: Bearer``."""
StreamOwner = Annotated[str, Depends(_stream_owner)]
"""The caller's owner id, from the header or a ticket for the path's job in ``?ticket=`` (for EventSource)."""
FeedsDep = Annotated[FeedHub, Depends(_app_state("feeds"))]
StreamSlotsDep = Annotated[StreamSlots, Depends(_app_state("stream_slots"))]
TicketsDep = Annotated[TicketSigner, Depends(_app_state("tickets"))]
LimitedOwner = Annotated[str, Depends(_rate_limited_owner)]
"""The caller's owner id, after taking a token from their rate-limit bucket."""
JobId = Annotated[str, Depends(_job_id)]
"""The ``job_id`` path parameter in canonical UUID form."""
