"""Reports over a job's history: compare two versions, and usage (of one job or all the caller's)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam

from clipchat.rpc import call
from clipchat.v1 import jobs_pb2
from gateway.deps import DownstreamDep, JobId, Owner, SettingsDep, SignerDep
from gateway.errors import documented, invalid_input
from gateway.schemas import UsageOut, VersionComparison, comparison_out, usage_out

router = APIRouter(prefix="/api/v1", tags=["reports"])

FromVersion = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="The version compared from.")]
ToVersion = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="The version compared to.")]


@router.get("/jobs/{job_id}/versions/{a}/compare/{b}", response_model=VersionComparison,
            summary="Compare two versions", responses=documented(401, 404, 422))
async def compare_versions(job_id: JobId, a: FromVersion, b: ToVersion, owner: Owner, settings: SettingsDep,
                           downstream: DownstreamDep, signer: SignerDep) -> VersionComparison:
    """The clips that differ between versions ``a`` and ``b`` (their prompts and videos before and
    after), the changes made between the two, and what they cost.

    404 for a version the job does not have; 422 when ``a`` and ``b`` are the same version.
    """
    if a == b:
        raise invalid_input("Compare two different versions.")
    reply = await call(downstream.status.CompareVersions,
                       jobs_pb2.CompareVersionsRequest(job_id=job_id, owner=owner, from_version=a, to_version=b),
                       timeout=settings.grpc_deadline_seconds)
    return comparison_out(reply, signer)


@router.get("/usage", response_model=UsageOut, summary="The caller's usage",
            responses=documented(401))
async def usage(owner: Owner, settings: SettingsDep, downstream: DownstreamDep) -> UsageOut:
    """Spend by step, changes by outcome and median time per stage, over all the caller's jobs."""
    reply = await call(downstream.status.GetUsage, jobs_pb2.GetUsageRequest(owner=owner),
                       timeout=settings.grpc_deadline_seconds)
    return usage_out(reply.usage, None)


@router.get("/jobs/{job_id}/usage", response_model=UsageOut, summary="One job's usage",
            responses=documented(401, 404))
async def job_usage(job_id: JobId, owner: Owner, settings: SettingsDep, downstream: DownstreamDep) -> UsageOut:
    """Spend by step, changes by outcome and median time per stage, of one job."""
    reply = await call(downstream.status.GetUsage, jobs_pb2.GetUsageRequest(owner=owner, job_id=job_id),
                       timeout=settings.grpc_deadline_seconds)
    return usage_out(reply.usage, job_id)
