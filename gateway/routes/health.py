"""Liveness and readiness.

Readiness asks the status and regenerator services for their gRPC health, and for the
dependencies they report under ``clipchat.dependency.<name>`` (``clipchat.health``): the database
(status) and the broker (status and regenerator). A name a service does not report (NOT_FOUND,
an older build) or a service that cannot be asked is "unknown", which does not fail readiness on
its own: the service's own check says whether it is up.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipchat.errors import ClipChatError
from clipchat.health import dependency_service_name
from clipchat.rpc import call
from clipchat.storage import Storage
from clipchat.v1 import composer_pb2
from gateway.deps import Downstream, DownstreamDep, SettingsDep, StorageDep
from gateway.errors import ErrorBody, ErrorResponse, with_retry_after
from gateway.schemas import CacheCounts, ComposerDetails, Liveness, Readiness

router = APIRouter(prefix="/api/v1", tags=["health"])

# Readiness must answer fast even when a dependency hangs.
READY_DEADLINE_SECONDS = 2.0
_NAMES = {"status": "the status service", "regenerator": "the regenerator service",
          "storage": "object storage", "database": "the database", "broker": "the message broker"}
OK, UNAVAILABLE, NOT_SERVING, UNKNOWN = "ok", "unavailable", "not serving", "unknown"
# States that do not fail readiness: "unknown" is a dependency nobody reported.
_READY_STATES = frozenset({OK, UNKNOWN})


class NotReady(ErrorResponse):
    checks: dict[str, str]
    down: list[str]
    composer: ComposerDetails


@router.get("/healthz", response_model=Liveness, summary="Liveness")
async def healthz() -> Liveness:
    """The process is up and serving HTTP. Checks no dependency."""
    return Liveness(status="ok")


@router.get("/readyz", response_model=Readiness, summary="Readiness",
            responses={503: {"model": NotReady, "description": "A dependency is down."}})
async def readyz(settings: SettingsDep, downstream: DownstreamDep,
                 storage: StorageDep) -> Readiness | JSONResponse:
    """Ready when the status and regenerator services report SERVING, storage answers, and no
    service reports the database or the broker down. 503 names what is down in ``down``.

    ``checks`` holds each one's state: "ok", "unavailable", "not serving" (a service), or
    "unknown" (a dependency nobody reported). ``composer`` tells what a composer replica composes
    with (its encoder and why, whether it fell back from NVENC to libx264, preset, workers, segment
    cache counts). It does not decide
    readiness: the gateway hands compositions to the composers through the queue, where they
    wait while no composer is up.
    """
    deadline = min(READY_DEADLINE_SECONDS, settings.grpc_deadline_seconds)
    checks, composer = await asyncio.gather(_checks(downstream, storage, deadline),
                                            _composer_details(downstream, deadline))
    down = [name for name, state in checks.items() if state not in _READY_STATES]
    if not down:
        return Readiness(status="ready", checks=checks, composer=composer)
    message = "Not ready: " + ", ".join(f"{_NAMES[name]} is {checks[name]}" for name in down) + "."
    body = NotReady(error=ErrorBody(code="not_ready", message=message, retryable=True), checks=checks,
                    down=down, composer=composer)
    return JSONResponse(body.model_dump(), status_code=503, headers=with_retry_after(503, True))


async def _checks(downstream: Downstream, storage: Storage, deadline: float) -> dict[str, str]:
    """Each dependency's state, asked all at once."""
    status_health, regenerator_health = downstream.status_health, downstream.regenerator_health
    status, regenerator, database, broker_for_status, broker_for_regenerator, store = \
        await asyncio.gather(
            _service_health(status_health, deadline),
            _service_health(regenerator_health, deadline),
            _dependency_health(status_health, "database", deadline),
            _dependency_health(status_health, "broker", deadline),
            _dependency_health(regenerator_health, "broker", deadline),
            _storage_health(storage, deadline))
    return {"status": status, "regenerator": regenerator, "storage": store, "database": database,
            "broker": _worst(broker_for_status, broker_for_regenerator)}


async def _service_health(stub: health_pb2_grpc.HealthStub, deadline: float) -> str:
    """The service's own health: ok, not serving, or unavailable (no answer)."""
    try:
        reply = await call(stub.Check, health_pb2.HealthCheckRequest(service=""), timeout=deadline)
    except ClipChatError:
        return UNAVAILABLE
    return OK if reply.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING


async def _dependency_health(stub: health_pb2_grpc.HealthStub, dependency: str, deadline: float) -> str:
    """What the service behind ``stub`` reports about ``dependency``: ok, unavailable, or
    unknown when it does not report it or cannot be asked."""
    request = health_pb2.HealthCheckRequest(service=dependency_service_name(dependency))
    try:
        reply = await call(stub.Check, request, timeout=deadline)
    except ClipChatError:  # NOT_FOUND: not reported; anything else: the service check tells
        return UNKNOWN
    return OK if reply.status == health_pb2.HealthCheckResponse.SERVING else UNAVAILABLE


def _worst(*states: str) -> str:
    """One state from several reports of the same dependency: down if any says so."""
    for state in (UNAVAILABLE, OK):
        if state in states:
            return state
    return UNKNOWN


async def _composer_details(downstream: Downstream, deadline: float) -> ComposerDetails:
    try:
        info = await call(downstream.composer.Describe, composer_pb2.DescribeRequest(), timeout=deadline)
    except ClipChatError:
        return ComposerDetails(state="unavailable")
    cache = info.cache
    return ComposerDetails(state="ok", encoder=info.encoder, encoder_reason=info.encoder_reason,
                           encoder_fallback=info.encoder_fallback, x264_preset=info.x264_preset, workers=info.workers,
                           cache=CacheCounts(hits=cache.hits, misses=cache.misses, stores=cache.stores,
                                             evictions=cache.evictions))


async def _storage_health(storage: Storage, deadline: float) -> str:
    try:
        await asyncio.wait_for(storage.exists("readyz/probe"), deadline)
    except Exception:  # any failure to answer means "not reachable" here
        return UNAVAILABLE
    return OK


