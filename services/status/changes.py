"""A change of several clips: one regeneration row per clip, sharing the change id.

The change id is the id of its first clip's regeneration (the *lead*): the job's lease, its task
messages and its events name the lead, as they name a one-clip regeneration; the other clips'
rows point at it with ``change_id``. A one-clip change has no change id. A version appears only
when every clip of a change succeeded; a retry of a change that failed or was cancelled (same
instruction, same video version) reuses each clip's paid steps, so only what failed is paid again.

Progress of a change of several clips: each clip's rewrite and generation report that clip's own
progress (``RecordProgress`` with its regeneration id), which sets that clip's row and names it in
the event (``member_regeneration_id``). The change's overall progress (no regeneration id) is in the
events without a member id, as before; in the clips' own stages (rewriting, generating) it writes no
row, so each row keeps its own clip's stage and progress, and in the stages of the whole change
(waiting for the composer, composing) it writes every clip's row, so they all show it after a reload.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from clipchat.db.models import ClipRegeneration, Job
from clipchat.domain import RegenerationStatus, Stage
from clipchat.errors import StaleLease

# Error of a clip whose own steps went well, in a change another clip of which failed.
STOPPED_CODE = "change_failed"
STOPPED_MESSAGE = "Not applied: another clip of this change failed. Its paid work is kept for a retry."
# The stages each clip of a change goes through on its own (its own progress, on its own row).
CLIP_STAGES = frozenset({Stage.REWRITING, Stage.GENERATING})


@dataclass(frozen=True)
class ClipQuote:
    """What changing one clip is expected to cost, by step ("rewrite", "generate", "compose")."""

    clip_index: int
    step_costs: dict[str, str]


async def members(session: AsyncSession, lead: ClipRegeneration) -> list[ClipRegeneration]:
    """Every clip's regeneration of the change ``lead`` leads (just ``lead`` for a one-clip change),
    by clip index."""
    if lead.change_id is None:
        return [lead]
    rows = await session.execute(select(ClipRegeneration).where(ClipRegeneration.change_id == lead.change_id))
    return sorted(rows.scalars().all(), key=lambda r: r.clip_index)


async def member(session: AsyncSession, lead: ClipRegeneration, regeneration_id: str) -> ClipRegeneration:
    """The regeneration ``regeneration_id`` of the change ``lead`` leads ("" is the lead itself);
    ``StaleLease`` when it is not one of the change's clips."""
    if not regeneration_id or regeneration_id == str(lead.id):
        return lead
    try:
        row = await session.get(ClipRegeneration, uuid.UUID(regeneration_id))
    except ValueError:
        row = None
    if row is None or lead.change_id is None or row.change_id != lead.change_id:
        raise StaleLease("This regeneration is not part of the running change.")
    return row


async def progress_rows(session: AsyncSession, lead: ClipRegeneration, regeneration_id: str,
                        stage: str) -> tuple[list[ClipRegeneration], str]:
    """The rows a progress report of the change ``lead`` leads sets, and the member it is of ("":
    the whole change). See the module doc; ``StaleLease`` for a clip outside the change."""
    if lead.change_id is None:
        await member(session, lead, regeneration_id)
        return [lead], ""
    if regeneration_id:
        row = await member(session, lead, regeneration_id)
        return [row], str(row.id)
    if stage in CLIP_STAGES:
        return [], ""
    return await members(session, lead), ""


async def latest(session: AsyncSession, job: Job) -> ClipRegeneration | None:
    """The job's latest regeneration (one clip's of its latest change)."""
    return (await session.execute(
        select(ClipRegeneration).where(ClipRegeneration.job_id == job.id)
        .order_by(ClipRegeneration.created_at.desc()).limit(1))).scalar_one_or_none()


async def retry_sources(session: AsyncSession, job: Job, last: ClipRegeneration | None,
                        instruction: str) -> dict[int, ClipRegeneration]:
    """The regenerations a new change retries, by clip index: those of the job's latest change
    (``last``) when it failed or was cancelled, with the same instruction on the same video version.
    Their paid steps are reused, so the LLM and the generator are not paid twice for the same clip."""
    if last is None or last.status not in (RegenerationStatus.FAILED, RegenerationStatus.CANCELLED) \
            or last.user_instruction != instruction or last.base_version != job.current_version:
        return {}
    if last.change_id is not None:
        last = await session.get(ClipRegeneration, last.change_id) or last
    return {row.clip_index: row for row in await members(session, last)}
