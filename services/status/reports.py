"""Read-only reports over a job's history: what changed between two versions, and what was spent.

Both read the same rows the state machine writes (``video_versions.clip_revisions``, ``clips``,
``clip_regenerations`` with their per-step costs, ``job_events``) in one read transaction each;
nothing here writes.

Definitions (also in the OpenAPI document):

- The **changes between** versions ``a`` and ``b`` are every regeneration begun after the older of
  the two was published, up to the publication of the newer one, whatever its outcome, and the
  regenerations that published the versions in between; their **cost** is the sum of what each of
  them cost (a failed or cancelled attempt stays paid, so it counts).
- **Spend by step** counts what the job's ``total_cost`` counts: the initial composition (the
  ``job.composed`` event's cost) and every finished change's rewrite, generation and composition.
  What changes still running have spent is reported apart, as ``running_cost``.
- **Time per stage** comes from the job event log: a stretch of work starts at ``job.created`` or
  ``regeneration.queued`` and ends at its outcome event; each stage lasts from the first event in
  that stage to the next event in another stage (or the outcome).
"""

from __future__ import annotations

import statistics
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from clipchat.db import Database
from clipchat.db.models import Clip, ClipRegeneration, Job, JobEvent, VideoVersion
from clipchat.domain import FINISHED_REGENERATION, RegenerationStatus
from clipchat.errors import InvalidInput, NotFound
from services.status.state_machine import load_job, money

# Events that open and close one stretch of work in the log.
_WORK_STARTS = frozenset({"job.created", "regeneration.queued"})
_WORK_ENDS = frozenset({"job.composed", "job.failed", "regeneration.completed", "regeneration.failed",
                        "regeneration.cancelled"})
_TIMED_TYPES = tuple(_WORK_STARTS | _WORK_ENDS | {"progress"})


@dataclass
class ClipDifference:
    clip_index: int
    before: Clip
    after: Clip


@dataclass
class Comparison:
    from_version: int
    to_version: int
    clips: list[ClipDifference]
    # Oldest first, each with the version it published (0 for none).
    changes: list[tuple[ClipRegeneration, int]]
    cost: Decimal


@dataclass
class Usage:
    jobs: int = 0
    total_cost: Decimal = Decimal("0")
    step_costs: dict[str, Decimal] = field(
        default_factory=lambda: {"rewrite": Decimal("0"), "generate": Decimal("0"), "compose": Decimal("0")})
    running_cost: Decimal = Decimal("0")
    outcomes: dict[str, int] = field(
        default_factory=lambda: {"completed": 0, "failed": 0, "cancelled": 0, "running": 0})
    # stage → (median seconds, samples), in the order the stages first appear.
    stage_times: dict[str, tuple[float, int]] = field(default_factory=dict)
    median_change_seconds: float = 0.0


class JobReports:
    """Compare versions and sum usage, over the status service's database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def compare_versions(self, job_id: str, owner: str, from_version: int, to_version: int) -> Comparison:
        """The clips that differ between two versions and the changes between them.

        Raises ``InvalidInput`` for a version number below 1 or the same version twice, and
        ``NotFound`` for a job that is not the owner's or a version the job does not have.
        """
        if from_version < 1 or to_version < 1:
            raise InvalidInput("Version numbers start at 1.")
        if from_version == to_version:
            raise InvalidInput("Compare two different versions.")
        async with self.db.read() as session:
            job = await load_job(session, job_id, owner)
            versions = {v.version: v for v in job.versions}
            for number in (from_version, to_version):
                if number not in versions:
                    raise NotFound(f"This video has no version {number}.", code="version_not_found")
            before, after = versions[from_version], versions[to_version]
            clips = _clip_differences(job.clips, before, after)
            older, newer = sorted((before, after), key=lambda v: v.version)
            changes = await _changes_between(session, job, older, newer)
        return Comparison(from_version, to_version, clips, changes,
                          sum((row.cost for row, _ in changes), Decimal("0")))

    async def usage(self, owner: str, job_id: str = "") -> Usage:
        """Spend, outcomes and stage times of one job of the owner's, or of all the owner's jobs.

        Raises ``NotFound`` for a job that is not the owner's.
        """
        async with self.db.read() as session:
            if job_id:
                jobs = [await load_job(session, job_id, owner, eager=False)]
            else:
                jobs = list((await session.execute(select(Job).where(Job.owner == owner))).scalars().all())
            ids = [job.id for job in jobs]
            regenerations = await _regenerations_of(session, ids)
            events = await _timed_events_of(session, ids)
        usage = Usage(jobs=len(jobs), total_cost=sum((j.total_cost for j in jobs), Decimal("0")))
        _add_regenerations(usage, regenerations)
        usage.step_costs["compose"] += sum((money(str(e.payload.get("cost") or "0"))
                                            for e in events if e.type == "job.composed"), Decimal("0"))
        usage.stage_times = _median_stage_times(events)
        return usage


def _clip_differences(clips: Sequence[Clip], before: VideoVersion, after: VideoVersion) -> list[ClipDifference]:
    by_key = {(c.clip_index, c.revision): c for c in clips}
    count = max(len(before.clip_revisions), len(after.clip_revisions))
    differences = []
    for index in range(count):
        old = _revision(before, index)
        new = _revision(after, index)
        if old != new and (index, old) in by_key and (index, new) in by_key:
            differences.append(ClipDifference(index, by_key[(index, old)], by_key[(index, new)]))
    return differences


def _revision(version: VideoVersion, index: int) -> int:
    revisions = version.clip_revisions or []
    return int(revisions[index]) if index < len(revisions) else 0


async def _changes_between(session: AsyncSession, job: Job, older: VideoVersion,
                           newer: VideoVersion) -> list[tuple[ClipRegeneration, int]]:
    """Changes begun after ``older`` was published up to ``newer``'s publication, and those that
    published a version numbered in between (by number, whatever the clock said)."""
    published = {v.created_by_regeneration_id: v.version for v in job.versions
                 if v.created_by_regeneration_id is not None and older.version < v.version <= newer.version}
    rows = (await session.execute(
        select(ClipRegeneration).where(ClipRegeneration.job_id == job.id)
        .order_by(ClipRegeneration.created_at, ClipRegeneration.id))).scalars().all()
    by_version = {v.created_by_regeneration_id: v.version for v in job.versions
                  if v.created_by_regeneration_id is not None}
    chosen = []
    for row in rows:
        if row.id in published:
            chosen.append((row, published[row.id]))
        elif row.id not in by_version and older.created_at < row.created_at <= newer.created_at:
            chosen.append((row, 0))
    return chosen


async def _regenerations_of(session: AsyncSession, job_ids: Sequence[uuid.UUID]) -> list[ClipRegeneration]:
    if not job_ids:
        return []
    rows = await session.execute(select(ClipRegeneration).where(ClipRegeneration.job_id.in_(job_ids)))
    return list(rows.scalars().all())


async def _timed_events_of(session: AsyncSession, job_ids: Sequence[uuid.UUID]) -> list[JobEvent]:
    if not job_ids:
        return []
    rows = await session.execute(
        select(JobEvent).where(JobEvent.job_id.in_(job_ids), JobEvent.type.in_(_TIMED_TYPES))
        .order_by(JobEvent.job_id, JobEvent.sequence))
    return list(rows.scalars().all())


def _add_regenerations(usage: Usage, regenerations: Iterable[ClipRegeneration]) -> None:
    durations = []
    for row in regenerations:
        if row.status in FINISHED_REGENERATION:
            usage.outcomes[row.status] += 1
            usage.step_costs["rewrite"] += row.llm_cost
            usage.step_costs["generate"] += row.generation_cost
            usage.step_costs["compose"] += row.composition_cost
            if row.status == RegenerationStatus.COMPLETED and row.finished_at is not None:
                durations.append((row.finished_at - row.created_at).total_seconds())
        else:
            usage.outcomes["running"] += 1
            usage.running_cost += row.cost
    usage.median_change_seconds = round(statistics.median(durations), 3) if durations else 0.0


def _median_stage_times(events: Sequence[JobEvent]) -> dict[str, tuple[float, int]]:
    """Median seconds per stage over every stretch of work in the log (events in job, sequence order).
    One clip's own progress in a change (``member_regeneration_id``) is not the work's stage."""
    samples: dict[str, list[float]] = defaultdict(list)
    stage, since, job = "", None, None
    for event in events:
        if (event.payload or {}).get("member_regeneration_id"):
            continue
        if event.job_id != job:
            stage, since, job = "", None, event.job_id
        if event.type in _WORK_STARTS:
            stage, since = event.stage or "queued", event.created_at
            continue
        if since is None:
            continue
        ends = event.type in _WORK_ENDS
        if ends or (event.stage and event.stage != stage):
            if stage:
                samples[stage].append(_seconds(since, event.created_at))
            stage, since = event.stage, event.created_at
        if ends:
            stage, since = "", None
    return {name: (round(statistics.median(values), 3), len(values)) for name, values in samples.items()}


def _seconds(start: datetime, end: datetime) -> float:
    return max((end - start).total_seconds(), 0.0)
