"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipchat.errors import ClipChatError
from clipchat.rpc import call
from clipchat.storage import Storage
from clipchat.v1 import composer_pb2
from gateway.deps import Downstream, DownstreamDep, SettingsDep, StorageDep
from gateway.errors import ErrorBody, ErrorResponse
from gateway.schemas import CacheCounts, ComposerDetails, Liveness, Readiness

router = APIRouter(prefix="/api/v1", tags=["health"])

# Readiness must answer fast even when a dependency hangs.
READY_DEADLINE_SECONDS = 2.0
_NAMES = {"status": "the status service", "regenerator": "the regenerator service",
          "storage": "object storage"}


class NotReady(ErrorResponse):
    checks: dict[str, str]
    composer: ComposerDetails


@router.get("/healthz", response_model=Liveness, summary="Liveness")
async def healthz() -> Liveness:
    """The process is up and serving HTTP. Checks no dependency."""
    return Liveness(status="ok")


@router.get("/readyz", response_model=Readiness, summary="Readiness",
            responses={503: {"model": NotReady, "description": "A dependency is down."}})
async def readyz(settings: SettingsDep, downstream: DownstreamDep,
                 storage: StorageDep) -> Readiness | JSONResponse:
    """Ready when the status and regenerator services report SERVING and storage answers.

    ``composer`` tells what a composer replica composes with (its encoder and why, preset,
    workers, segment cache counts). It does not decide readiness: the gateway hands compositions
    to the composers through the queue, where they wait while no composer is up.
    """
    deadline = min(READY_DEADLINE_SECONDS, settings.grpc_deadline_seconds)
    status, regenerator, store, composer = await asyncio.gather(
        _grpc_health(downstream.status_health, deadline),
        _grpc_health(downstream.regenerator_health, deadline),
        _storage_health(storage, deadline),
        _composer_details(downstream, deadline))
    checks = {"status": status, "regenerator": regenerator, "storage": store}
    down = [name for name, state in checks.items() if state != "ok"]
    if not down:
        return Readiness(status="ready", checks=checks, composer=composer)
    message = "Not ready: " + ", ".join(f"{_NAMES[name]} is {checks[name]}" for name in down) + "."
    body = NotReady(error=ErrorBody(code="not_ready", message=message, retryable=True), checks=checks,
                    composer=composer)
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})


async def _grpc_health(stub: health_pb2_grpc.HealthStub, deadline: float) -> str:
    try:
        reply = await call(stub.Check, health_pb2.HealthCheckRequest(service=""), timeout=deadline)
    except ClipChatError:
        return "unavailable"
    return "ok" if reply.status == health_pb2.HealthCheckResponse.SERVING else "not serving"


async def _composer_details(downstream: Downstream, deadline: float) -> ComposerDetails:
    try:
        info = await call(downstream.composer.Describe, composer_pb2.DescribeRequest(), timeout=deadline)
    except ClipChatError:
        return ComposerDetails(state="unavailable")
    cache = info.cache
    return ComposerDetails(state="ok", encoder=info.encoder, encoder_reason=info.encoder_reason,
                           x264_preset=info.x264_preset, workers=info.workers,
                           cache=CacheCounts(hits=cache.hits, misses=cache.misses, stores=cache.stores,
                                             evictions=cache.evictions))


async def _storage_health(storage: Storage, deadline: float) -> str:
    try:
        await asyncio.wait_for(storage.exists("readyz/probe"), deadline)
    except Exception:  # any failure to answer means "not reachable" here
        return "unavailable"
    return "ok"


