"""Regenerations: what a change would cost, change one clip or several by instruction, cancel a
running change, read the history."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

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
    EstimateOut,
    RegenerateRequest,
    RegenerationAccepted,
    RegenerationList,
    RegenerationOut,
    estimate_out,
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

# ``?clips=`` of an estimate: one position, several separated by commas, or "all". The route reads
# it itself (``_estimate_request``) for a readable 422; the pattern only documents it.
_CLIP_POSITION = re.compile(r"[0-9]+")
CLIPS_PATTERN = rf"^(all|[0-9]{{1,2}}(,[0-9]{{1,2}}){{0,{MAX_CLIPS - 1}}})$"
ClipSelection = Annotated[str, Query(
    description=f'The clips the change would name, by position from 0: one ("2"), several separated by '
                f'commas ("0,2,3"), each once, at most {MAX_CLIPS}; or "all".',
    examples=["2", "0,2,3", "all"], json_schema_extra={"pattern": CLIPS_PATTERN})]


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


@router.get("/jobs/{job_id}/estimate", response_model=EstimateOut, summary="What a change of clips would cost",
            responses=documented(401, 404, 422))
async def estimate_change(job_id: JobId, clips: ClipSelection, owner: Owner, settings: SettingsDep,
                          downstream: DownstreamDep) -> EstimateOut:
    """The estimate of a change of ``?clips=`` (``2``, ``0,2,3`` or ``all``), step by step, and what
    the job's budget has left: whether the change fits, and whether it would near the budget.

    Nothing is leased, queued or spent. A retry of a failed change reuses the steps it already paid
    for, so when it is started its estimate can be lower than this one. 422 for clips that are not
    positions from 0, are named twice, are too many or are past the last clip.
    """
    request = _estimate_request(clips)
    request.job_id, request.owner = job_id, owner
    reply = await call(downstream.regenerator.EstimateRegeneration, request,
                       timeout=settings.grpc_deadline_seconds)
    return estimate_out(reply)


def _estimate_request(clips: str) -> regenerator_pb2.EstimateRegenerationRequest:
    """The regenerator's request for ``?clips=``; 422 for a selection that names no clip positions.

    Positions past the job's last clip are the regenerator's to refuse (it knows the job).
    """
    if clips == "all":
        return regenerator_pb2.EstimateRegenerationRequest(all_clips=True)
    parts = clips.split(",")
    if not clips:
        raise invalid_input('Name the clips to estimate: ?clips=2, ?clips=0,2,3 or ?clips=all.')
    if len(parts) > MAX_CLIPS:
        raise invalid_input(f"A change can name at most {MAX_CLIPS} clips.")
    if any(part.startswith("-") and _CLIP_POSITION.fullmatch(part[1:]) for part in parts):
        raise invalid_input("Clip positions start at 0: name clips from 0 up.")
    if not all(_CLIP_POSITION.fullmatch(part) for part in parts):
        raise invalid_input('clips must be clip positions from 0 separated by commas (e.g. "0,2,3"), or "all".')
    if any(len(part) > 2 for part in parts):
        raise invalid_input(f"A video has at most {MAX_CLIPS} clips: positions 0 to {MAX_CLIPS - 1}.")
    indices = [int(part) for part in parts]
    if len(set(indices)) != len(indices):
        raise invalid_input("Name each clip once.")
    return regenerator_pb2.EstimateRegenerationRequest(clip_indices=indices)


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
