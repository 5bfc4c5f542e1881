"""The gateway's HTTP routes, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.routes import events, health, jobs, media, page, regenerations, reports


def api_router() -> APIRouter:
    """Every route of the gateway (the API under ``/api/v1``, and the page at ``/``)."""
    router = APIRouter()
    for module in (health, jobs, regenerations, reports, events, media, page):
        router.include_router(module.router)
    return router
