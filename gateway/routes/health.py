"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipchat.errors import ClipChatError
from clipchat.rpc import call
from clipchat.storage import Storage
from gateway.deps import DownstreamDep, SettingsDep, StorageDep
from gateway.errors import ErrorBody, ErrorResponse
from gateway.schemas import Liveness, Readiness

router = APIRouter(prefix="/api/v1", tags=["health"])

# Readiness must answer fast even when a dependency hangs.
READY_DEADLINE_SECONDS = 2.0
_NAMES = {"status": "the status service", "regenerator": "the regenerator service",
          "storage": "object storage"}


class NotReady(ErrorResponse):
    checks: dict[str, str]


@router.get("/healthz", response_model=Liveness, summary="Liveness")
async def healthz() -> Liveness:
    """The process is up and serving HTTP. Checks no dependency."""
    return Liveness(status="ok")


@router.get("/readyz", response_model=Readiness, summary="Readiness",
            responses={503: {"model": NotReady, "description": "A dependency is down."}})
async def readyz(settings: SettingsDep, downstream: DownstreamDep,
                 storage: StorageDep) -> Readiness | JSONResponse:
    """Ready when the status and regenerator services report SERVING and storage answers."""
    deadline = min(READY_DEADLINE_SECONDS, settings.grpc_deadline_seconds)
    status, regenerator, store = await asyncio.gather(
        _grpc_health(downstream.status_health, deadline),
        _grpc_health(downstream.regenerator_health, deadline),
        _storage_health(storage, deadline))
    checks = {"status": status, "regenerator": regenerator, "storage": store}
    down = [name for name, state in checks.items() if state != "ok"]
    if not down:
        return Readiness(status="ready", checks=checks)
    message = "Not ready: " + ", ".join(f"{_NAMES[name]} is {checks[name]}" for name in down) + "."
    body = NotReady(error=ErrorBody(code="not_ready", message=message, retryable=True), checks=checks)
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})


async def _grpc_health(stub: health_pb2_grpc.HealthStub, deadline: float) -> str:
    try:
        reply = await call(stub.Check, health_pb2.HealthCheckRequest(service=""), timeout=deadline)
    except ClipChatError:
        return "unavailable"
    return "ok" if reply.status == health_pb2.HealthCheckResponse.SERVING else "not serving"


async def _storage_health(storage: Storage, deadline: float) -> str:
    try:
        await asyncio.wait_for(storage.exists("readyz/probe"), deadline)
    except Exception:  # any failure to answer means "not reachable" here
        return "unavailable"
    return "ok"


