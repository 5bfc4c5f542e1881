"""Regenerations: change one clip by instruction, cancel a running change, read the history."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Path

from clipchat.errors import NotFound
from clipchat.rpc import call
from clipchat.v1 import common_pb2, jobs_pb2, regenerator_pb2
from gateway.deps import DownstreamDep, JobId, LimitedOwner, Owner, SettingsDep
from gateway.errors import documented, invalid_input
from gateway.schemas import (
    MAX_CLIPS,
    ChangeAccepted,
    ChangeClipOut,
    ChangeRequest,
    RegenerateRequest,
    RegenerationAccepted,
    RegenerationList,
    RegenerationOut,
    regeneration_out,
    regeneration_status,
)

router = APIRouter(prefix="/api/v1", tags=["regenerations"])

_REGENERATION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

ClipIndex = Annotated[int, Path(ge=0, le=MAX_CLIPS - 1, description="The clip's position, from 0.")]


def _regeneration_id(regeneration_id: Annotated[str, Path(description="The regeneration's id.")]) -> str:
    if not _REGENERATION_ID.match(regeneration_id):
        raise NotFound("This regeneration does not exist.")
    return regeneration_id


RegenerationId = Annotated[str, Depends(_regeneration_id)]


@router.post("/jobs/{job_id}/clips/{clip_index}/regenerate", status_code=202,
             response_model=RegenerationAccepted, summary="Change one clip by instruction",
             responses=documented(401, 402, 404, 409, 422, 429), max_body_size=512 * 1024)
async def regenerate_clip(job_id: JobId, clip_index: ClipIndex, body: RegenerateRequest,
                          owner: LimitedOwner, settings: SettingsDep,
                          downstream: DownstreamDep) -> RegenerationAccepted:
    """Queue a regeneration of clip ``clip_index`` (202). Follow it with ``GET /jobs/{id}/events``.

    409 while another regeneration of this job runs; 402 when its estimated cost would pass the
    job's budget; 422 for an index past the last clip or an empty or too long instruction.
    """
    request = _start_request(job_id, owner, body, settings.max_instruction_chars)
    request.clip_index = clip_index
    reply = await call(downstream.regenerator.StartRegeneration, request, timeout=settings.grpc_deadline_seconds)
    status = regeneration_status(reply.state)
    return RegenerationAccepted(regeneration_id=reply.regeneration_id,
                                status="queued" if status == "unknown" else status,
                                estimated_cost=reply.estimated_cost or "0",
                                budget_warning=reply.budget_warning)


@router.post("/jobs/{job_id}/regenerate", status_code=202, response_model=ChangeAccepted,
             summary="Change several clips by one instruction", responses=documented(401, 402, 404, 409, 422, 429),
             max_body_size=512 * 1024)
async def change_clips(job_id: JobId, body: ChangeRequest, owner: LimitedOwner, settings: SettingsDep,
                       downstream: DownstreamDep) -> ChangeAccepted:
    """Queue one change of several clips (202): each rewritten and generated, then **one**
    recomposition and **one** new version, which appears only when every clip succeeded.

    ``clips`` names the clips by position (``[1, 2, 3]``) or is ``"all"``. The budget is checked for
    the whole change before anything is spent (402); 409 while other work on the job runs; 422 for
    an index past the last clip. Cancel it (every clip) with the returned id.
    """
    request = _start_request(job_id, owner, body, settings.max_instruction_chars)
    if body.clips == "all":
        request.all_clips = True
    else:
        request.clip_indices.extend(body.clips)
    reply = await call(downstream.regenerator.StartRegeneration, request, timeout=settings.grpc_deadline_seconds)
    members = list(reply.members)
    return ChangeAccepted(regeneration_id=reply.regeneration_id, status="queued",
                          estimated_cost=reply.estimated_cost or "0", budget_warning=reply.budget_warning,
                          clips=[ChangeClipOut(clip_index=m.clip_index, regeneration_id=m.regeneration_id)
                                 for m in members])


def _start_request(job_id: str, owner: str, body: RegenerateRequest,
                   max_chars: int) -> regenerator_pb2.StartRegenerationRequest:
    """The regenerator's request for ``body``'s instruction; 422 for an empty or too long one."""
    instruction = body.instruction.strip()
    if not 1 <= len(instruction) <= max_chars:
        raise invalid_input(f"Write an instruction of 1 to {max_chars} characters, e.g. 'make it nighttime'.")
    history = [common_pb2.Turn(role=turn.role, content=turn.content) for turn in body.conversation_history]
    return regenerator_pb2.StartRegenerationRequest(job_id=job_id, owner=owner, instruction=instruction,
                                                    conversation_history=history)


@router.post("/jobs/{job_id}/regenerations/{regeneration_id}/cancel", response_model=RegenerationOut,
             summary="Cancel a regeneration", responses=documented(401, 404, 409, 429))
async def cancel_regeneration(job_id: JobId, regeneration_id: RegenerationId, owner: LimitedOwner,
                              settings: SettingsDep, downstream: DownstreamDep) -> RegenerationOut:
    """Stop a queued or running regeneration; the current video stays. 409 if it already finished."""
    reply = await call(downstream.status.CancelRegeneration,
                       jobs_pb2.CancelRegenerationRequest(job_id=job_id, owner=owner,
                                                          regeneration_id=regeneration_id),
                       timeout=settings.grpc_deadline_seconds)
    return regeneration_out(reply.regeneration)


@router.get("/jobs/{job_id}/regenerations", response_model=RegenerationList,
            summary="A job's regeneration history", responses=documented(401, 404))
async def list_regenerations(job_id: JobId, owner: Owner, settings: SettingsDep,
                             downstream: DownstreamDep) -> RegenerationList:
    """Every regeneration of the job, newest first: instruction, prompts, costs, status, error."""
    reply = await call(downstream.regenerator.ListRegenerations,
                       regenerator_pb2.ListJobRegenerationsRequest(job_id=job_id, owner=owner),
                       timeout=settings.grpc_deadline_seconds)
    rows = sorted(reply.regenerations, key=_created_key, reverse=True)
    return RegenerationList(regenerations=[regeneration_out(r) for r in rows])


def _created_key(regen: common_pb2.Regeneration) -> tuple[int, int]:
    return regen.created_at.seconds, regen.created_at.nanos
