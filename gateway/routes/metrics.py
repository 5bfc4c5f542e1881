"""``GET /metrics``: the process's metrics in Prometheus' text format (``clipchat.metrics``).

Outside ``/api/v1`` and the OpenAPI document: it is for Prometheus, not for API clients. Like the
probes it asks for no token; who may reach it is the network's business: in Kubernetes the
gateway's NetworkPolicy admits the monitoring namespace, and the Ingress routes only the page and
``/api/``, so ``/metrics`` is not reachable from outside the cluster. In embedded mode the one
process holds every service, so this covers them all.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from clipchat import metrics

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
