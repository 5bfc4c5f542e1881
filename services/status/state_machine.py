"""The job state machine: leases, fencing, costs, versions and the per-job event log.

::

    composing ──succeed──▶ completed ──begin──▶ regenerating ──succeed──▶ completed (new version)
                              ▲                    │  │
                              │                    │  └──cancel──▶ completed (original kept)
                              │                    └──fail──▶ failed (original kept) ──begin──▶ …

Every method is one short transaction. The job row is the lock: ``SELECT … FOR UPDATE`` on
PostgreSQL (``NOWAIT`` for ``begin``), an immediate transaction on SQLite. Writes about running
work carry the lease token; a token that is not the job's live lease is refused (``StaleLease``).

The work under a lease is done by one delivery of its task message at a time: a worker claims it
(``claim_work``) for its phase (regenerate, then compose), each claim is a new attempt, and the
claim lapses after ``claim_seconds`` without a heartbeat, so a redelivered message takes over from a
worker that died without waiting for the whole lease. Writes that carry a claim are refused once
another delivery holds the work. The task messages themselves are written to the outbox in the
same transaction as the change that causes them (``OutboxMessage``); the status service's relay
publishes them.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from google.protobuf.message import Message
from sqlalchemy import and_, or_, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from clipchat import metrics
from clipchat.broker.topology import COMPOSE_QUEUE, REGENERATE_QUEUE
from clipchat.db import Database
from clipchat.db.models import (
    Clip,
    ClipRegeneration,
    Job,
    JobEvent,
    OutboxMessage,
    RegenerationCharge,
    VideoVersion,
    utcnow,
)
from clipchat.domain import (
    FINISHED_REGENERATION,
    ClaimOutcome,
    JobStatus,
    RegenerationStatus,
    Step,
    WorkPhase,
    check_clip_indices,
)
from clipchat.errors import (
    BudgetExceeded,
    ConcurrentRegeneration,
    Conflict,
    InvalidInput,
    NotFound,
    StaleLease,
)
from clipchat.pricing import round_money
from clipchat.telemetry import inject_headers
from clipchat.v1 import jobs_pb2, tasks_pb2
from services.status import changes
from services.status.changes import ClipQuote
from services.status.paging import PageKey

log = logging.getLogger("clipchat.status")

LEASE_EXPIRED_MESSAGE = "Regeneration failed. Please try again."
COMPOSE_LEASE_EXPIRED_MESSAGE = "Composition failed. Please try again."

# Called after commit with (job_id, sequence, event) for every event written.
Notifier = Callable[[str, int, JobEvent], Awaitable[None]]
# Paid steps whose result a retry of the same change reuses (their checkpoints).
# A started prediction is reused too: when it succeeded at the provider, its output is fetched
# instead of paying again; when it failed, the generator creates a new one.
REUSABLE_STEPS = (Step.REWRITE, Step.GENERATE, Step.GENERATION_STARTED)
# Steps a worker records; "generation_started" checkpoints a remote prediction before it is paid,
# so a worker that takes over resumes it instead of paying for another.
STEPS = tuple(Step)
# The two phases of a regeneration's work, each the work of one queue.
PHASE_REGENERATE = WorkPhase.REGENERATE
PHASE_COMPOSE = WorkPhase.COMPOSE


@dataclass(frozen=True)
class Claim:
    """What ``claim_work`` answers: the outcome, the attempt claimed, or when to try again."""

    outcome: ClaimOutcome
    attempt: int = 0
    retry_after: float = 0.0


@dataclass(frozen=True)
class ClipInput:
    """A clip as it enters a job: uploaded with the job, or made by a regeneration."""

    prompt: str
    duration: float
    video_key: str
    thumbnail_key: str = ""


@dataclass
class JobSnapshot:
    """A job with what a reader needs: its current clips and its versions."""

    job: Job
    clips: list[Clip]
    versions: list[VideoVersion]
    active_regeneration: ClipRegeneration | None = None


@dataclass
class BeginResult:
    regeneration: ClipRegeneration  # the change's first clip's: its id is the change's
    lease_token: str
    lease_expires_at: datetime
    budget_warning: bool
    members: list[ClipRegeneration]  # every clip's, by clip index
    estimated_cost: Decimal  # of the whole change


@dataclass
class _Pending:
    events: list[JobEvent] = field(default_factory=list)
    outbox: bool = False


def money(value: str | Decimal | None) -> Decimal:
    """Parse a decimal string; empty means zero. Floats are refused (money is never float)."""
    if value is None or value == "":
        return Decimal("0")
    try:
        amount = Decimal(str(value))
    except ArithmeticError as exc:
        raise InvalidInput("Invalid amount of money.") from exc
    if not amount.is_finite() or amount < 0:
        raise InvalidInput("Invalid amount of money.")
    return round_money(amount)


def parse_uuid(value: str, what: str = "job") -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError as exc:
        raise NotFound(f"No such {what}.") from exc


async def load_job(session: AsyncSession, job_id: str, owner: str, *, eager: bool = True) -> Job:
    """The job (with its clips and versions when ``eager``); ``NotFound`` when there is none or it
    is not ``owner``'s (an empty owner: any job, for the services' own calls)."""
    stmt = select(Job).where(Job.id == parse_uuid(job_id))
    if eager:
        stmt = stmt.options(selectinload(Job.clips), selectinload(Job.versions))
    job = (await session.execute(stmt)).scalar_one_or_none()
    if job is None or (owner and job.owner != owner):
        raise NotFound("No such video.", code="job_not_found")
    return job


def current_clips(job: Job, versions: Sequence[VideoVersion] | None = None) -> list[Clip]:
    """The clip revision in use for each index: the current version's, or revision 0 before the first."""
    by_key = {(c.clip_index, c.revision): c for c in job.clips}
    count = max((c.clip_index for c in job.clips), default=-1) + 1
    revisions = [0] * count
    for version in versions if versions is not None else job.versions:
        if version.version == job.current_version:
            revisions = list(version.clip_revisions)
    return [by_key[(index, revision)] for index, revision in enumerate(revisions)]


class JobStateMachine:
    def __init__(self, db: Database, *, lease_seconds: float, budget_limit: Decimal,
                 budget_warning_fraction: Decimal, notifier: Notifier | None = None,
                 claim_seconds: float | None = None, on_outbox: Callable[[], None] | None = None,
                 clock: Callable[[], datetime] = utcnow, max_budget_limit: Decimal | None = None) -> None:
        self.db = db
        self.lease = timedelta(seconds=lease_seconds)
        self.claim = timedelta(seconds=claim_seconds if claim_seconds is not None else lease_seconds / 4)
        self.on_outbox = on_outbox
        self.default_budget = budget_limit
        # The most a caller may set as a job's own budget (None: no cap of the operator's).
        self.max_budget_limit = max_budget_limit
        self.warning_fraction = budget_warning_fraction
        self.notifier = notifier
        self.clock = clock

    # ---- jobs -------------------------------------------------------------------------------

    async def create_job(self, *, owner: str, clips: Sequence[ClipInput], audio_key: str,
                         transitions: Sequence[dict[str, Any]] = (), beat_timestamps: Sequence[float] = (),
                         aspect_ratio: str = "16:9", fit: str = "pad", budget_limit: str = "",
                         title: str = "", job_id: str = "") -> tuple[JobSnapshot, str]:
        """Create a job in ``composing`` with a lease for its initial composition."""
        if not owner:
            raise InvalidInput("A job needs an owner.")
        if not clips:
            raise InvalidInput("A job needs at least one clip.")
        if not audio_key:
            raise InvalidInput("A job needs a music track.")
        if transitions and len(transitions) != len(clips) - 1:
            raise InvalidInput("There must be one transition between each pair of clips.")
        if aspect_ratio not in ("16:9", "9:16", "1:1"):
            raise InvalidInput("Aspect ratio must be 16:9, 9:16 or 1:1.")
        if fit not in ("pad", "crop"):
            raise InvalidInput("Fit must be pad or crop.")
        if list(beat_timestamps) != sorted(beat_timestamps) or any(b < 0 for b in beat_timestamps):
            raise InvalidInput("Beat timestamps must be sorted and not negative.")
        budget = money(budget_limit) if budget_limit else self.default_budget
        if self.max_budget_limit is not None and budget > self.max_budget_limit:
            raise InvalidInput(f"The budget limit can be at most {self.max_budget_limit} on this server.")
        now = self.clock()
        token = secrets.token_hex(16)
        job = Job(id=uuid.UUID(job_id) if job_id else uuid.uuid4(), owner=owner, title=title[:200],
                  status=JobStatus.COMPOSING, audio_key=audio_key,
                  transitions=[dict(t) for t in transitions], beat_timestamps=list(beat_timestamps),
                  aspect_ratio=aspect_ratio, fit=fit, total_cost=Decimal("0"),
                  budget_limit=budget,
                  lease_token=token, lease_expires_at=now + self.lease, created_at=now, updated_at=now,
                  last_event_sequence=0, work_phase=PHASE_COMPOSE, work_attempt=0)
        pending = _Pending()
        async with self.db.transaction() as session:
            session.add(job)
            await session.flush()
            for index, clip in enumerate(clips):
                session.add(Clip(job_id=job.id, clip_index=index, revision=0, prompt=clip.prompt,
                                 duration=clip.duration, video_key=clip.video_key,
                                 thumbnail_key=clip.thumbnail_key, created_at=now))
            self._event(session, job, pending, "job.created", stage="queued",
                        payload={"clips": len(clips)})
            self._outbox(session, pending, COMPOSE_QUEUE, f"compose-{job.id}-initial", tasks_pb2.ComposeTask(
                job_id=str(job.id), lease_token=token, attempt=1))
        await self._flush(pending)
        return await self.get_job(str(job.id)), token

    async def get_job(self, job_id: str, owner: str = "") -> JobSnapshot:
        async with self.db.read() as session:
            job = await load_job(session, job_id, owner)
            active = None
            if job.active_regeneration_id:
                active = await session.get(ClipRegeneration, job.active_regeneration_id)
            return JobSnapshot(job, current_clips(job), list(job.versions), active)

    async def list_jobs(self, owner: str, *, limit: int,
                        after: PageKey | None = None) -> tuple[list[JobSnapshot], PageKey | None]:
        """The owner's jobs newest first, at most ``limit`` of them, starting after ``after``.

        Also returns the key to pass as ``after`` for the next page, or None on the last page.
        """
        query = select(Job).where(Job.owner == owner)
        if after is not None:
            query = query.where(or_(Job.created_at < after.created_at,
                                    and_(Job.created_at == after.created_at, Job.id < after.job_id)))
        query = (query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
                 .options(selectinload(Job.clips), selectinload(Job.versions)))
        async with self.db.read() as session:
            rows = (await session.execute(query)).scalars().all()
            page = [JobSnapshot(job, current_clips(job), list(job.versions)) for job in rows[:limit]]
            last = rows[limit - 1] if len(rows) > limit else None
            return page, PageKey(last.created_at, last.id) if last is not None else None

    # ---- a regeneration's life --------------------------------------------------------------

    async def begin(self, *, job_id: str, owner: str, clip_index: int, instruction: str,
                    history: list[dict[str, Any]], estimated_cost: str,
                    estimated_step_costs: dict[str, str] | None = None) -> BeginResult:
        """Take the job's lease for one regeneration of one clip.

        The estimate is ``estimated_cost``, or, when ``estimated_step_costs`` is given, the sum of
        the steps this regeneration will pay for: a retry reuses the paid steps of the one it
        retries (see ``changes.retry_sources``), and is quoted and budget-checked without them.

        Raises ``NotFound`` (no such job for this owner), ``InvalidInput`` (clip index out of range),
        ``ConcurrentRegeneration`` (a live lease), ``Conflict`` (still composing) and
        ``BudgetExceeded`` (job total + estimate over the budget) — before anything is spent.
        """
        quote = ClipQuote(clip_index, dict(estimated_step_costs or {}))
        return await self._begin(job_id, owner, [quote], instruction, history, estimated_cost=estimated_cost)

    async def begin_change(self, *, job_id: str, owner: str, quotes: Sequence[ClipQuote], instruction: str,
                           history: list[dict[str, Any]]) -> BeginResult:
        """Take the job's lease for one change of several clips: a regeneration per clip, all
        under the change id, one task, and the budget checked for the whole change (each clip
        quoted for the steps it will still pay for). Raises as ``begin`` does, and ``InvalidInput``
        for a clip named twice."""
        if not quotes:
            raise InvalidInput("Name at least one clip to change.", code="no_clips")
        return await self._begin(job_id, owner, quotes, instruction, history, change=True)

    async def _begin(self, job_id: str, owner: str, quotes: Sequence[ClipQuote], instruction: str,
                     history: list[dict[str, Any]], *, estimated_cost: str = "", change: bool = False) -> BeginResult:
        now = self.clock()
        pending = _Pending()
        async with self.db.transaction() as session:
            job = await self._lock(session, job_id, owner, nowait=True)
            await self._check_can_begin(session, job, pending, [q.clip_index for q in quotes], now)
            last = await changes.latest(session, job)
            sources = await changes.retry_sources(session, job, last, instruction)
            if last is not None and last.created_at >= now:
                # Keeps (job, clip, created_at) unique and history ordered even if replicas' clocks differ.
                now = last.created_at + timedelta(microseconds=1)
            rows = []
            for quote in sorted(quotes, key=lambda q: q.clip_index):
                source = sources.get(quote.clip_index)
                reused = {step: value for step, value in (source.checkpoints or {}).items()
                          if step in REUSABLE_STEPS} if source is not None else {}
                estimate = self._estimate(estimated_cost, quote.step_costs, reused)
                rows.append(self._new_regeneration(job, quote.clip_index, instruction, history, estimate, reused,
                                                   source, now))
            total = sum((row.estimated_cost for row in rows), Decimal(0))
            self._check_budget(job, total)
            lead = rows[0]
            for row in rows:
                row.change_id = lead.id if change else None
                session.add(row)
            token = self._take_lease(session, job, pending, lead, now)
            warning = self._queued_events(session, job, pending, lead, total,
                                          [row.clip_index for row in rows] if change else [])
        await self._flush(pending)
        log.info("regeneration.begun", extra={"job_id": job_id, "regeneration_id": str(lead.id), "clips": len(rows)})
        return BeginResult(lead, token, job.lease_expires_at or now, warning, rows, total)

    async def _check_can_begin(self, session: AsyncSession, job: Job, pending: _Pending,
                               clip_indices: Sequence[int], now: datetime) -> None:
        """Refuse while other work holds a live lease, or when there is nothing to change; fail
        work whose lease expired first (its worker died)."""
        if job.status in (JobStatus.REGENERATING, JobStatus.COMPOSING) and self._lease_live(job, now):
            if job.status == JobStatus.COMPOSING:
                raise Conflict("The video is still being composed. Try again when it is ready.",
                               code="still_composing", retryable=True)
            raise ConcurrentRegeneration()
        if job.status in (JobStatus.REGENERATING, JobStatus.COMPOSING):
            await self._expire(session, job, pending, now)
        if job.current_version is None:
            raise Conflict("This video has no composition yet, so there is nothing to change.", code="no_video")
        check_clip_indices(clip_indices, len(current_clips(job)))

    @staticmethod
    def _estimate(estimated_cost: str, step_costs: dict[str, str], reused: dict[str, Any]) -> Decimal:
        """The estimate of the steps still to pay for (``estimated_cost`` when no step is quoted)."""
        step_estimates = {step: money(cost) for step, cost in step_costs.items()}
        if not step_estimates:
            return money(estimated_cost)
        return sum((cost for step, cost in step_estimates.items() if step not in reused), Decimal(0))

    @staticmethod
    def _check_budget(job: Job, estimate: Decimal) -> None:
        if job.total_cost + estimate > job.budget_limit:
            raise BudgetExceeded(
                f"This regeneration (about ${estimate:.2f}) would take the video past its budget "
                f"of ${job.budget_limit:.2f} (${job.total_cost:.2f} spent so far).")

    @staticmethod
    def _new_regeneration(job: Job, clip_index: int, instruction: str, history: list[dict[str, Any]],
                          estimate: Decimal, reused: dict[str, Any], source: ClipRegeneration | None,
                          now: datetime) -> ClipRegeneration:
        """The regeneration row, carrying over the paid steps (and the rewritten prompt) it reuses."""
        regeneration = ClipRegeneration(
            id=uuid.uuid4(), job_id=job.id, clip_index=clip_index,
            original_prompt=current_clips(job)[clip_index].prompt, user_instruction=instruction,
            conversation_history=history, status=RegenerationStatus.QUEUED, stage="queued",
            estimated_cost=estimate, base_version=job.current_version, created_at=now, checkpoints=reused)
        if source is not None and Step.REWRITE in reused:
            regeneration.modified_prompt = source.modified_prompt
            regeneration.change_summary = source.change_summary
            regeneration.rewriter = source.rewriter
        return regeneration

    def _take_lease(self, session: AsyncSession, job: Job, pending: _Pending, regeneration: ClipRegeneration,
                    now: datetime) -> str:
        """Give the job a fresh lease for ``regeneration`` and queue its task (outbox); the token."""
        token = secrets.token_hex(16)
        job.status = JobStatus.REGENERATING
        job.lease_token = token
        job.lease_expires_at = now + self.lease
        job.active_regeneration_id = regeneration.id
        self._start_work(job, PHASE_REGENERATE)
        job.error_code = job.error_message = None
        job.error_retryable = False
        self._outbox(session, pending, REGENERATE_QUEUE, str(regeneration.id), tasks_pb2.RegenerateTask(
            job_id=str(job.id), regeneration_id=str(regeneration.id), lease_token=token, attempt=1))
        return token

    def _queued_events(self, session: AsyncSession, job: Job, pending: _Pending, regeneration: ClipRegeneration,
                       estimate: Decimal, clip_indices: list[int]) -> bool:
        """The "queued" event, and a budget warning when the estimate nears the budget (returned)."""
        payload: dict[str, Any] = {"regeneration_id": str(regeneration.id), "clip_index": regeneration.clip_index,
                                   "estimated_cost": str(estimate)}
        if clip_indices:
            payload["clip_indices"] = clip_indices
        self._event(session, job, pending, "regeneration.queued", stage="queued", payload=payload)
        warning = job.total_cost + estimate >= job.budget_limit * self.warning_fraction
        if warning:
            self._event(session, job, pending, "budget.warning", payload={
                "total_cost": str(job.total_cost), "estimated_cost": str(estimate),
                "budget_limit": str(job.budget_limit)})
        return bool(warning)

    async def renew(self, job_id: str, token: str, claim_id: str = "") -> datetime:
        """Extend a live lease, and the claim when given (the worker's heartbeat).

        Raises ``StaleLease`` if the lease is not live or another delivery holds the work."""
        async with self.db.transaction() as session:
            job = await self._fenced(session, job_id, token, claim_id)
            now = self.clock()
            job.lease_expires_at = now + self.lease
            if claim_id:
                job.claim_expires_at = now + self.claim
            return job.lease_expires_at

    async def claim_work(self, job_id: str, token: str, phase: str, claim_id: str) -> Claim:
        """Claim the job's work in ``phase`` for one delivery (``claim_id``).

        ``obsolete`` when the lease is gone or the work is in another phase (drop the message),
        ``busy`` while another delivery's claim is live (try again after ``retry_after``), else
        ``claimed`` with the new attempt number. Raises ``InvalidInput`` for an empty claim id.
        """
        if not claim_id or phase not in (PHASE_REGENERATE, PHASE_COMPOSE):
            raise InvalidInput("A claim needs a phase and a claim id.")
        now = self.clock()
        async with self.db.transaction() as session:
            try:
                job = await self._fenced(session, job_id, token)
            except (StaleLease, NotFound):
                return Claim(ClaimOutcome.OBSOLETE)
            if job.work_phase != phase:
                return Claim(ClaimOutcome.OBSOLETE)
            if job.claim_id and job.claim_id != claim_id and job.claim_expires_at and job.claim_expires_at > now:
                return Claim(ClaimOutcome.BUSY, retry_after=(job.claim_expires_at - now).total_seconds())
            lapsed = bool(job.claim_id and job.claim_id != claim_id)  # its worker stopped heartbeating
            job.work_attempt += 1
            job.claim_id = claim_id
            job.claim_expires_at = now + self.claim
            job.lease_expires_at = now + self.lease
            regeneration = await session.get(ClipRegeneration, job.active_regeneration_id) \
                if job.active_regeneration_id else None
            for row in await changes.members(session, regeneration) if regeneration is not None else []:
                row.attempts = job.work_attempt  # every clip of a change is in this attempt
            attempt = job.work_attempt
        log.info("work.claimed", extra={"job_id": job_id, "phase": phase, "attempt": attempt})
        if lapsed:
            metrics.lease_expired("claim")
        return Claim(ClaimOutcome.CLAIMED, attempt=attempt)

    async def release_claim(self, job_id: str, token: str, claim_id: str) -> None:
        """Give the claim up, so the next delivery need not wait for it to lapse. A claim that is
        not held (any more) is left alone."""
        async with self.db.transaction() as session:
            try:
                job = await self._fenced(session, job_id, token, claim_id)
            except StaleLease:
                return
            job.claim_id = None
            job.claim_expires_at = None

    async def queue_composition(self, job_id: str, token: str, claim_id: str,
                                new_clips: Sequence[tuple[int, ClipInput]] = (), *, clip_index: int = -1,
                                new_clip: ClipInput | None = None) -> None:
        """Hand a change's new clips (one per clip it changes, by index) to the composer: the work
        moves to the compose phase, the claim is given up and the compose task goes into the
        outbox, in one transaction.

        Raises ``StaleLease`` when the lease or the claim is no longer this worker's, and
        ``InvalidInput`` when the clips are not those the change is changing. (``clip_index`` and
        ``new_clip``: the one new clip of a one-clip change.)"""
        if new_clip is not None:
            new_clips = [(clip_index, new_clip)]
        pending = _Pending()
        async with self.db.transaction() as session:
            job = await self._fenced(session, job_id, token, claim_id)
            lead = await self._active(session, job)
            rows = await changes.members(session, lead)
            if sorted(index for index, _ in new_clips) != [row.clip_index for row in rows]:
                raise InvalidInput("The new clips are not for the clips being regenerated.")
            self._start_work(job, PHASE_COMPOSE)
            task = tasks_pb2.ComposeTask(job_id=job_id, regeneration_id=str(lead.id), lease_token=token, attempt=1)
            for index, clip in sorted(new_clips, key=lambda pair: pair[0]):
                at = task.new_clips.add(clip_index=index)
                at.clip.CopyFrom(jobs_pb2.ClipInput(prompt=clip.prompt, duration=clip.duration,
                                                    video_key=clip.video_key, thumbnail_key=clip.thumbnail_key))
            if len(new_clips) == 1:  # the one-clip form, read by composers that predate changes
                task.clip_index = task.new_clips[0].clip_index
                task.new_clip.CopyFrom(task.new_clips[0].clip)
            self._outbox(session, pending, COMPOSE_QUEUE, f"compose-{lead.id}", task)
        await self._flush(pending)

    async def record_progress(self, job_id: str, token: str, *, stage: str, fraction: float,
                              message: str = "", eta_seconds: float = 0.0, claim_id: str = "",
                              regeneration_id: str = "") -> int:
        """Append a progress event (and extend the lease and the claim: progress is a sign of life):
        of the whole work, or of the running change's clip ``regeneration_id`` (its row's stage and
        progress; which rows a change's own progress sets: ``changes.progress_rows``).

        Raises ``StaleLease`` when the lease is not live or the clip is not one of the change's."""
        fraction = min(max(float(fraction), 0.0), 1.0)
        pending = _Pending()
        async with self.db.transaction() as session:
            job = await self._fenced(session, job_id, token, claim_id)
            job.lease_expires_at = self.clock() + self.lease
            if claim_id:
                job.claim_expires_at = self.clock() + self.claim
            payload: dict[str, Any] = {"message": message[:200]}
            if eta_seconds > 0:
                payload["eta_seconds"] = round(eta_seconds, 1)
            if job.active_regeneration_id:
                payload.update(await self._progress_rows(session, await self._active(session, job),
                                                         regeneration_id, stage, fraction))
            elif regeneration_id:
                raise StaleLease("This regeneration is not part of the running change.")
            event = self._event(session, job, pending, "progress", stage=stage, fraction=fraction,
                                payload=payload)
        await self._flush(pending)
        return event.sequence

    @staticmethod
    async def _progress_rows(session: AsyncSession, lead: ClipRegeneration, regeneration_id: str, stage: str,
                             fraction: float) -> dict[str, str]:
        """Set the stage and progress of the rows a progress report is for; the event's ids."""
        rows, member_id = await changes.progress_rows(session, lead, regeneration_id, stage)
        for row in rows:
            row.stage = stage
            row.progress = fraction
        for row in rows or await changes.members(session, lead):  # the change is running
            if row.status == RegenerationStatus.QUEUED:
                row.status = RegenerationStatus.RUNNING
                row.attempts = max(row.attempts, 1)
        ids = {"regeneration_id": str(lead.id)}
        if member_id:
            ids["member_regeneration_id"] = member_id
        return ids

    async def record_step(self, job_id: str, token: str, *, step: str, cost: str = "",
                          modified_prompt: str = "", change_summary: str = "", rewriter: str = "",
                          checkpoint: dict[str, Any] | None = None, claim_id: str = "",
                          charge_key: str = "", regeneration_id: str = "") -> ClipRegeneration:
        """Checkpoint one step's result and what it cost (paid even if a later step fails), on
        the running change's clip ``regeneration_id`` ("": its first).

        A cost recorded with a ``charge_key`` already recorded (the same paid call, reported
        again after a lost answer) is not added twice."""
        if step not in STEPS:
            raise InvalidInput("Unknown step.")
        amount = money(cost)
        pending = _Pending()
        async with self.db.transaction() as session:
            job = await self._fenced(session, job_id, token, claim_id)
            regeneration = await changes.member(session, await self._active(session, job), regeneration_id)
            if regeneration.status == RegenerationStatus.QUEUED:
                regeneration.status = RegenerationStatus.RUNNING
            if charge_key and amount and not await self._charge_once(session, regeneration, step, charge_key,
                                                                    amount):
                log.info("charge.duplicate", extra={"job_id": job_id, "charge_key": charge_key})
                amount = Decimal("0")
            if step == Step.REWRITE:
                regeneration.llm_cost += amount
                regeneration.modified_prompt = modified_prompt or regeneration.modified_prompt
                regeneration.change_summary = change_summary or regeneration.change_summary
                regeneration.rewriter = rewriter or regeneration.rewriter
            elif step == Step.GENERATE:
                regeneration.generation_cost += amount
            elif step == Step.COMPOSE:
                regeneration.composition_cost += amount
            regeneration.cost = (regeneration.llm_cost + regeneration.generation_cost
                                 + regeneration.composition_cost)
            if checkpoint is not None:
                regeneration.checkpoints = {**(regeneration.checkpoints or {}), step: checkpoint}
            self._event(session, job, pending, "regeneration.step", stage=regeneration.stage, payload={
                "regeneration_id": str(regeneration.id), "step": step, "cost": str(amount),
                "modified_prompt": regeneration.modified_prompt, "rewriter": regeneration.rewriter,
                "change_summary": regeneration.change_summary})
        await self._flush(pending)
        return regeneration

    async def succeed(self, job_id: str, token: str, *, regeneration_id: str = "",
                      new_clips: Sequence[tuple[int, ClipInput]] = (), new_clip: ClipInput | None = None,
                      video_key: str, video_duration: float, composition_cost: str = "", encoder: str = "",
                      clip_thumbnail_keys: Sequence[str] = (), claim_id: str = "") -> JobSnapshot:
        """Publish a finished composition as the job's new current version (fenced by the token):
        the initial composition (no ``regeneration_id``), or a change's, with its new clips by
        index (``new_clip``: the one new clip of a one-clip change)."""
        if not video_key:
            raise InvalidInput("A finished composition needs its video.")
        cost = money(composition_cost)
        now = self.clock()
        pending = _Pending()
        async with self.db.transaction() as session:
            job = await self._fenced(session, job_id, token, claim_id)
            revisions = [c.revision for c in current_clips(job)]
            lead: ClipRegeneration | None = None
            clip_indices: list[int] = []
            if regeneration_id:
                lead = await self._active(session, job)
                if str(lead.id) != regeneration_id:
                    raise StaleLease()
                if new_clip is not None:
                    new_clips = [(lead.clip_index, new_clip)]
                rows = await self._complete_change(session, job, lead, new_clips, cost, revisions, now)
                clip_indices = [row.clip_index for row in rows]
                spent = sum((row.cost for row in rows), Decimal(0))
            elif job.status != JobStatus.COMPOSING:
                raise StaleLease()
            else:
                spent = cost
                self._keep_thumbnails(job, clip_thumbnail_keys)
            number = self._publish(session, job, pending, lead, revisions, spent, clip_indices, now,
                                   video_key=video_key, video_duration=video_duration, encoder=encoder)
        await self._flush(pending)
        metrics.cost_recorded(Step.COMPOSE, cost)
        log.info("job.version_published", extra={"job_id": job_id, "regeneration_id": regeneration_id,
                                                 "version": number})
        return await self.get_job(job_id)

    def _publish(self, session: AsyncSession, job: Job, pending: _Pending, lead: ClipRegeneration | None,
                 revisions: list[int], spent: Decimal, clip_indices: list[int], now: datetime, *,
                 video_key: str, video_duration: float, encoder: str) -> int:
        """Add the next version, make it current, release the lease and say so; its number."""
        number = max((v.version for v in job.versions), default=0) + 1
        session.add(VideoVersion(job_id=job.id, version=number, storage_key=video_key,
                                 duration=video_duration, encoder=encoder, clip_revisions=revisions,
                                 created_by_regeneration_id=lead.id if lead else None, created_at=now))
        job.current_version = number
        job.total_cost += spent
        self._release(job, JobStatus.COMPLETED)
        job.error_code = job.error_message = None
        job.error_retryable = False
        payload: dict[str, Any] = {"regeneration_id": str(lead.id) if lead else "", "version": number,
                                   "cost": str(spent), "total_cost": str(job.total_cost), "encoder": encoder}
        if len(clip_indices) > 1:
            payload["clip_indices"] = clip_indices
        self._event(session, job, pending, "regeneration.completed" if lead else "job.composed", stage="done",
                    fraction=1.0, payload=payload)
        return number

    async def _complete_change(self, session: AsyncSession, job: Job, lead: ClipRegeneration,
                               new_clips: Sequence[tuple[int, ClipInput]], composition_cost: Decimal,
                               revisions: list[int], now: datetime) -> list[ClipRegeneration]:
        """Every clip of the change gets its new clip, as its next revision in ``revisions``; the
        composition is paid once, on the lead."""
        rows = await changes.members(session, lead)
        by_index = dict(new_clips)
        if sorted(by_index) != [row.clip_index for row in rows] or len(by_index) != len(new_clips):
            raise InvalidInput("A regeneration's result needs one new clip for each clip it changed.")
        for row in rows:
            revisions[row.clip_index] = self._complete_regeneration(
                session, job, row, by_index[row.clip_index], composition_cost if row is lead else Decimal(0), now)
        return rows

    @staticmethod
    def _complete_regeneration(session: AsyncSession, job: Job, regeneration: ClipRegeneration,
                               new_clip: ClipInput, composition_cost: Decimal, now: datetime) -> int:
        """Add the new clip as the next revision of its index and close the regeneration as
        completed, with its composition cost; returns the new revision."""
        index = regeneration.clip_index
        revision = max(c.revision for c in job.clips if c.clip_index == index) + 1
        session.add(Clip(job_id=job.id, clip_index=index, revision=revision, prompt=new_clip.prompt,
                         duration=new_clip.duration, video_key=new_clip.video_key,
                         thumbnail_key=new_clip.thumbnail_key, cost=regeneration.generation_cost,
                         created_by_regeneration_id=regeneration.id, created_at=now))
        regeneration.composition_cost += composition_cost
        regeneration.cost = regeneration.llm_cost + regeneration.generation_cost + regeneration.composition_cost
        regeneration.status = RegenerationStatus.COMPLETED
        regeneration.stage = "done"
        regeneration.progress = 1.0
        regeneration.finished_at = now
        regeneration.error_code = regeneration.error_message = None
        return revision

    @staticmethod
    def _keep_thumbnails(job: Job, clip_thumbnail_keys: Sequence[str]) -> None:
        """The initial composition's stills, for uploaded clips that came without one."""
        for clip in job.clips:
            if clip.revision == 0 and clip.clip_index < len(clip_thumbnail_keys) \
                    and clip_thumbnail_keys[clip.clip_index] and not clip.thumbnail_key:
                clip.thumbnail_key = clip_thumbnail_keys[clip.clip_index]

    async def fail(self, job_id: str, token: str, *, error_code: str, error_message: str,
                   technical_detail: str = "", retryable: bool = True, claim_id: str = "",
                   failed_regeneration_ids: Sequence[str] = ()) -> JobSnapshot:
        """Mark the running work failed; the current version stays where it was. In a change of
        several clips, ``failed_regeneration_ids`` names the clips that failed (none: all did)."""
        now = self.clock()
        pending = _Pending()
        async with self.db.transaction() as session:
            job = await self._fenced(session, job_id, token, claim_id)
            await self._fail_locked(session, job, pending, now, code=error_code or "failed",
                                    message=error_message or LEASE_EXPIRED_MESSAGE,
                                    detail=technical_detail, retryable=retryable,
                                    failed=set(failed_regeneration_ids))
        await self._flush(pending)
        log.info("regeneration.failed", extra={"job_id": job_id, "error_code": error_code})
        return await self.get_job(job_id)

    async def cancel(self, job_id: str, owner: str, regeneration_id: str) -> ClipRegeneration:
        """Stop a regeneration at the user's request, with every clip of its change; the original
        video is kept. Returns the regeneration named.

        Raises ``NotFound`` for an unknown regeneration and ``Conflict`` when it already finished.
        """
        regen_uuid = parse_uuid(regeneration_id, "regeneration")
        now = self.clock()
        pending = _Pending()
        async with self.db.transaction() as session:
            job = await self._lock(session, job_id, owner)
            regeneration = await session.get(ClipRegeneration, regen_uuid)
            if regeneration is None or regeneration.job_id != job.id:
                raise NotFound("No such regeneration for this video.")
            if regeneration.status in FINISHED_REGENERATION:
                raise Conflict(f"This regeneration already finished ({regeneration.status}).",
                               code="already_finished")
            lead = await session.get(ClipRegeneration, regeneration.change_id) if regeneration.change_id \
                else regeneration
            rows = await changes.members(session, lead or regeneration)
            for row in rows:
                row.status = RegenerationStatus.CANCELLED
                row.finished_at = now
                row.error_code = "cancelled"
                row.error_message = "Cancelled. The original video is kept."
            cost = sum((row.cost for row in rows), Decimal(0))
            if job.active_regeneration_id in {row.id for row in rows}:
                job.total_cost += cost
                self._release(job, JobStatus.COMPLETED if job.current_version else JobStatus.FAILED)
            self._event(session, job, pending, "regeneration.cancelled", payload={
                "regeneration_id": str(rows[0].id), "cost": str(cost), "total_cost": str(job.total_cost)})
        await self._flush(pending)
        log.info("regeneration.cancelled", extra={"job_id": job_id, "regeneration_id": regeneration_id})
        return regeneration

    async def sweep_expired(self) -> int:
        """Fail the work of every job whose lease expired (its worker died). Returns how many."""
        now = self.clock()
        async with self.db.read() as session:
            ids = (await session.execute(
                select(Job.id).where(Job.status.in_([JobStatus.REGENERATING, JobStatus.COMPOSING]),
                                     Job.lease_expires_at < now))).scalars().all()
        swept = 0
        for job_id in ids:
            pending = _Pending()
            try:
                async with self.db.transaction() as session:
                    job = await self._lock(session, str(job_id), skip_locked=True)
                    if job.status in (JobStatus.REGENERATING, JobStatus.COMPOSING) \
                            and not self._lease_live(job, now):
                        await self._expire(session, job, pending, now)
                        swept += 1
            except (NotFound, ConcurrentRegeneration):
                continue
            await self._flush(pending)
            log.warning("lease.expired", extra={"job_id": str(job_id)})
        return swept

    # ---- history and versions ---------------------------------------------------------------

    async def get_regeneration(self, job_id: str, regeneration_id: str) -> ClipRegeneration:
        return (await self.get_change(job_id, regeneration_id))[0]

    async def get_change(self, job_id: str, regeneration_id: str) -> tuple[ClipRegeneration, list[ClipRegeneration]]:
        """A regeneration, and every clip's regeneration of its change (by clip index)."""
        async with self.db.read() as session:
            regeneration = await session.get(ClipRegeneration, parse_uuid(regeneration_id, "regeneration"))
            if regeneration is None or str(regeneration.job_id) != str(parse_uuid(job_id)):
                raise NotFound("No such regeneration for this video.")
            lead = await session.get(ClipRegeneration, regeneration.change_id) if regeneration.change_id else None
            return regeneration, await changes.members(session, lead or regeneration)

    async def list_regenerations(self, job_id: str, owner: str = "") -> list[ClipRegeneration]:
        async with self.db.read() as session:
            job = await load_job(session, job_id, owner, eager=False)
            rows = await session.execute(select(ClipRegeneration).where(ClipRegeneration.job_id == job.id)
                                         .order_by(ClipRegeneration.created_at.desc()))
            return list(rows.scalars().all())

    async def restore_version(self, job_id: str, owner: str, version: int) -> JobSnapshot:
        """Make an earlier version current again (its clips too). Refused while work runs."""
        pending = _Pending()
        async with self.db.transaction() as session:
            job = await self._lock(session, job_id, owner)
            if job.status in (JobStatus.REGENERATING, JobStatus.COMPOSING):
                raise Conflict("Wait for the running regeneration to finish, or cancel it, before "
                               "restoring a version.", code="busy")
            if not any(v.version == version for v in job.versions):
                raise NotFound(f"This video has no version {version}.")
            job.current_version = version
            job.status = JobStatus.COMPLETED
            self._event(session, job, pending, "version.restored", payload={"version": version})
        await self._flush(pending)
        return await self.get_job(job_id)

    async def events_after(self, job_id: str, after: int, limit: int = 500) -> list[JobEvent]:
        async with self.db.read() as session:
            rows = await session.execute(
                select(JobEvent).where(JobEvent.job_id == parse_uuid(job_id), JobEvent.sequence > after)
                .order_by(JobEvent.sequence).limit(limit))
            return list(rows.scalars().all())

    async def check_owner(self, job_id: str, owner: str = "") -> None:
        async with self.db.read() as session:
            await load_job(session, job_id, owner, eager=False)

    # ---- internals --------------------------------------------------------------------------

    async def _lock(self, session: AsyncSession, job_id: str, owner: str = "", *, nowait: bool = False,
                    skip_locked: bool = False) -> Job:
        stmt = (select(Job).where(Job.id == parse_uuid(job_id))
                .options(selectinload(Job.clips), selectinload(Job.versions)))
        if not self.db.is_sqlite:
            stmt = stmt.with_for_update(nowait=nowait, skip_locked=skip_locked)
        try:
            job = (await session.execute(stmt)).scalar_one_or_none()
        except DBAPIError as exc:
            if _sqlstate(exc) == "55P03":  # lock_not_available: another begin holds the row
                raise ConcurrentRegeneration() from exc
            raise
        if job is None or (owner and job.owner != owner):
            raise NotFound("No such video.", code="job_not_found")
        return job

    async def _fenced(self, session: AsyncSession, job_id: str, token: str, claim_id: str = "") -> Job:
        """The locked job, if ``token`` is its live lease (and ``claim_id``, when given, holds its
        work); else ``StaleLease``."""
        job = await self._lock(session, job_id)
        if not token or job.lease_token != token or not self._lease_live(job, self.clock()):
            raise StaleLease()
        if claim_id and job.claim_id != claim_id:
            raise StaleLease("This attempt was taken over by another delivery; its result was discarded.")
        return job

    async def _charge_once(self, session: AsyncSession, regeneration: ClipRegeneration, step: str,
                           charge_key: str, amount: Decimal) -> bool:
        """Record one paid call; False when its key was recorded before (the job row lock makes
        the check and the insert atomic; the unique key is the backstop)."""
        seen = (await session.execute(select(RegenerationCharge.id)
                                      .where(RegenerationCharge.charge_key == charge_key))).first()
        if seen is not None:
            return False
        session.add(RegenerationCharge(regeneration_id=regeneration.id, charge_key=charge_key[:200], step=step,
                                       cost=amount, created_at=self.clock()))
        return True

    @staticmethod
    def _start_work(job: Job, phase: str) -> None:
        job.work_phase = phase
        job.work_attempt = 0
        job.claim_id = None
        job.claim_expires_at = None

    def _outbox(self, session: AsyncSession, pending: _Pending, queue: str, message_id: str,
                task: Message) -> None:
        """Queue ``task`` in the outbox of this transaction, with the caller's trace context."""
        task.trace_context.update(inject_headers())  # type: ignore[attr-defined]
        session.add(OutboxMessage(queue=queue, message_id=message_id, body=task.SerializeToString(),
                                  created_at=self.clock()))
        pending.outbox = True

    async def _active(self, session: AsyncSession, job: Job) -> ClipRegeneration:
        regeneration = (await session.get(ClipRegeneration, job.active_regeneration_id)
                        if job.active_regeneration_id else None)
        if regeneration is None:
            raise StaleLease()
        return regeneration

    def _lease_live(self, job: Job, now: datetime) -> bool:
        return bool(job.lease_token and job.lease_expires_at and job.lease_expires_at > now)

    def _release(self, job: Job, status: str) -> None:
        job.status = status
        job.lease_token = None
        job.lease_expires_at = None
        job.active_regeneration_id = None
        job.work_phase = None
        job.claim_id = None
        job.claim_expires_at = None

    async def _expire(self, session: AsyncSession, job: Job, pending: _Pending, now: datetime) -> None:
        composing = job.status == JobStatus.COMPOSING
        await self._fail_locked(session, job, pending, now, code="lease_expired",
                                message=COMPOSE_LEASE_EXPIRED_MESSAGE if composing else LEASE_EXPIRED_MESSAGE,
                                detail="The worker stopped renewing its lease.", retryable=True)

    async def _fail_locked(self, session: AsyncSession, job: Job, pending: _Pending, now: datetime, *,
                           code: str, message: str, detail: str, retryable: bool,
                           failed: set[str] | None = None) -> None:
        """Fail the running work: every clip of the running change, those in ``failed`` (or all,
        when none is named) with the error, the others as stopped with it."""
        lead = (await session.get(ClipRegeneration, job.active_regeneration_id)
                if job.active_regeneration_id else None)
        rows = await changes.members(session, lead) if lead is not None else []
        failed_clips = []
        for row in rows:
            own = not failed or str(row.id) in failed
            row.status = RegenerationStatus.FAILED
            row.finished_at = now
            row.error_code = code if own else changes.STOPPED_CODE
            row.error_message = message if own else changes.STOPPED_MESSAGE
            row.technical_detail = (detail[:20000] or None) if own else None
            row.retryable = retryable
            failed_clips += [row.clip_index] if own else []
            # Steps already paid for stay paid.
            job.total_cost += row.cost
        self._release(job, JobStatus.FAILED)
        job.error_code = code
        job.error_message = message
        job.error_retryable = retryable
        payload: dict[str, Any] = {"regeneration_id": str(lead.id) if lead else "", "error_code": code,
                                   "message": message, "retryable": retryable, "total_cost": str(job.total_cost)}
        if len(rows) > 1:
            payload["failed_clips"] = failed_clips
        self._event(session, job, pending, "regeneration.failed" if lead else "job.failed", payload=payload)

    def _event(self, session: AsyncSession, job: Job, pending: _Pending, type_: str, *, stage: str = "",
               fraction: float = 0.0, payload: dict[str, Any] | None = None) -> JobEvent:
        job.last_event_sequence += 1
        event = JobEvent(job_id=job.id, sequence=job.last_event_sequence, type=type_, stage=stage,
                         fraction=fraction, payload=payload or {}, created_at=self.clock())
        session.add(event)
        pending.events.append(event)
        return event

    async def _flush(self, pending: _Pending) -> None:
        _count(pending.events)
        if pending.outbox and self.on_outbox is not None:
            self.on_outbox()
        if self.notifier is None:
            return
        for event in pending.events:
            try:
                await self.notifier(str(event.job_id), event.sequence, event)
            except Exception:  # notification is best effort: watchers poll as well
                log.warning("event.notify_failed", exc_info=True, extra={"job_id": str(event.job_id)})


def _count(events: list[JobEvent]) -> None:
    """The metrics of committed events: regeneration outcomes, leases that expired, step costs."""
    for event in events:
        payload = event.payload or {}
        if event.type in ("regeneration.completed", "regeneration.failed", "regeneration.cancelled"):
            metrics.regeneration_finished(event.type.removeprefix("regeneration."),
                                          str(payload.get("error_code", "")) if event.type.endswith("failed") else "")
        if event.type in ("regeneration.failed", "job.failed") and payload.get("error_code") == "lease_expired":
            metrics.lease_expired("lease")
        elif event.type == "regeneration.step":
            metrics.cost_recorded(str(payload.get("step", "")), money(payload.get("cost")))


def _sqlstate(exc: DBAPIError) -> str | None:
    orig = exc.orig
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
