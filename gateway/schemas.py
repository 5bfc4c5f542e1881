"""The JSON the gateway speaks, and the translation from the services' protobuf messages.

Money is a decimal string, never a float. Storage keys never leave the gateway: every object is a
signed media URL. Technical detail (stack traces, lease tokens) is never copied out.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import AfterValidator, BaseModel, Field, StrictInt, WithJsonSchema, field_validator, model_validator

from clipchat.proto_enums import stage_from_proto, step_from_proto
from clipchat.v1 import common_pb2, jobs_pb2, regenerator_pb2
from gateway.errors import ErrorBody
from gateway.signing import MediaSigner

MAX_CLIPS = 100
MIN_CLIP_SECONDS = 0.2
MAX_CLIP_SECONDS = 60.0
MAX_PROMPT_CHARS = 2000
MAX_TURN_CHARS = 4000
MAX_TURNS = 50
# The transition kinds the composer knows (services/composer/timeline.py: "cut" and the keys of
# TRANSITIONS; a unit test keeps the two equal). Checked here so an unknown one is a 422 at upload,
# not a failed composition later.
TransitionKind = Literal[
    "cut", "crossfade", "fade", "dissolve", "fade_black", "fadeblack", "dip_white", "fadewhite",
    "wipeleft", "wiperight", "wipeup", "wipedown", "slideleft", "slideright", "slideup", "slidedown",
    "circleopen", "circleclose", "radial", "smoothleft", "smoothright",
]

# ---------------------------------------------------------------------------------------------
# Requests

# What a person's text may not hold: NUL and the other control characters but tab, line feed and
# carriage return (PostgreSQL cannot store NUL; the rest have no place in a prompt or a title), and
# unpaired surrogates (not encodable as UTF-8, so neither gRPC nor the database can carry them).
# Everything else (quotes, ``;``, ``$(…)``, brackets, bidi controls, any script) is stored as sent:
# it is data, and nothing downstream ever reads it as anything else.
_UNSTORABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _storable(value: str) -> str:
    if _UNSTORABLE.search(value):
        raise ValueError("must not contain control characters (other than tab and line breaks) or "
                         "unpaired surrogates")
    return value


# A money amount as text: digits, and at most four after the point (DECIMAL(14, 4)).
_DECIMAL_TEXT = r"^[0-9]{1,10}(\.[0-9]{1,4})?$"

StorableText = Annotated[str, AfterValidator(_storable),
                         Field(json_schema_extra={"pattern": r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"})]
"""Text a person wrote, stored byte for byte; refused (422) when it holds what cannot be stored."""


class ClipSpec(BaseModel):
    prompt: StorableText = Field(min_length=1, max_length=MAX_PROMPT_CHARS,
                        description="What the clip shows (the prompt it was generated from).")
    duration: float = Field(ge=MIN_CLIP_SECONDS, le=MAX_CLIP_SECONDS, allow_inf_nan=False,
                            description="Seconds of this clip used in the video.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()


class TransitionSpec(BaseModel):
    kind: TransitionKind = Field(description='"cut", "crossfade", "fade_black", …')
    duration: float = Field(ge=0, le=10, allow_inf_nan=False, description="Seconds.")


class JobManifest(BaseModel):
    """The ``manifest`` field of ``POST /jobs``: what the uploaded files are and how to join them."""

    title: StorableText | None = Field(default=None, max_length=200)
    clips: list[ClipSpec] = Field(min_length=1, max_length=MAX_CLIPS)
    transitions: list[TransitionSpec] | None = Field(
        default=None, description="One between each pair of clips (len(clips) - 1).")
    beat_timestamps: list[float] | None = Field(default=None, max_length=100_000,
                                                description="Seconds, sorted, non-negative.")
    aspect_ratio: Literal["16:9", "9:16", "1:1"] = "16:9"
    fit: Literal["pad", "crop"] = "pad"
    budget_limit: Annotated[Decimal | None, WithJsonSchema({"anyOf": [
        {"type": "number", "exclusiveMinimum": 0}, {"type": "string", "pattern": _DECIMAL_TEXT},
        {"type": "null"}]})] = Field(
        default=None, gt=0, max_digits=14, decimal_places=4,
        description='A decimal string, e.g. "25.00"; at most CLIPCHAT_MAX_BUDGET_LIMIT (10000 by default).')

    @field_validator("budget_limit", mode="before")
    @classmethod
    def _decimal_text(cls, value: object) -> object:
        if isinstance(value, str) and not re.fullmatch(_DECIMAL_TEXT, value):
            raise ValueError('must be a number or a decimal string such as "25.00"')
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JobManifest:
        if self.transitions is not None:
            if len(self.transitions) != len(self.clips) - 1:
                raise ValueError(f"transitions must have one entry between each pair of clips: "
                                 f"{len(self.clips) - 1} for {len(self.clips)} clips, "
                                 f"got {len(self.transitions)}")
            for i, transition in enumerate(self.transitions):
                shorter = min(self.clips[i].duration, self.clips[i + 1].duration)
                if transition.duration >= shorter:
                    raise ValueError(f"transition {i} ({transition.duration} s) must be shorter than "
                                     f"the clips it joins ({shorter} s)")
        beats = self.beat_timestamps or []
        if any(not math.isfinite(b) or b < 0 for b in beats):
            raise ValueError("beat_timestamps must be non-negative seconds")
        if any(a > b for a, b in itertools.pairwise(beats)):
            raise ValueError("beat_timestamps must be sorted")
        return self


class Turn(BaseModel):
    role: Literal["user", "assistant"]
    content: StorableText = Field(max_length=MAX_TURN_CHARS)


class RegenerateRequest(BaseModel):
    instruction: StorableText = Field(description="What to change, e.g. 'make it nighttime'. 1 to "
                                         "CLIPCHAT_MAX_INSTRUCTION_CHARS characters (2,000 by default).",
                             examples=["make it nighttime"])
    conversation_history: list[Turn] = Field(default_factory=list, max_length=MAX_TURNS)


ClipNumber = Annotated[StrictInt, Field(ge=0, le=MAX_CLIPS - 1)]


class ChangeRequest(RegenerateRequest):
    clips: Annotated[list[ClipNumber], Field(min_length=1, max_length=MAX_CLIPS)] | Literal["all"] = Field(
        description='The clips to change, by position from 0, each named once; or "all".',
        examples=[[1, 2, 3], "all"])

    @field_validator("clips")
    @classmethod
    def _once_each(cls, value: list[int] | str) -> list[int] | str:
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError("name each clip once")
        return value


# ---------------------------------------------------------------------------------------------
# Responses


class VersionOut(BaseModel):
    version: int
    url: str
    duration: float
    created_at: datetime | None
    created_by_regeneration_id: str | None
    encoder: str | None


class ClipOut(BaseModel):
    index: int
    prompt: str
    duration: float
    video_url: str | None
    thumbnail_url: str | None
    revision: int


class JobOut(BaseModel):
    id: str
    title: str
    status: Literal["composing", "completed", "regenerating", "failed", "unknown"]
    current_version: int
    video_url: str | None
    versions: list[VersionOut]
    clips: list[ClipOut]
    total_cost: str
    budget_limit: str
    budget_used_fraction: float
    budget_warning: bool
    active_regeneration_id: str | None
    error: ErrorBody | None
    aspect_ratio: str
    created_at: datetime | None


class JobList(BaseModel):
    jobs: list[JobOut] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last.")


class ClipList(BaseModel):
    clips: list[ClipOut]


class VersionList(BaseModel):
    current_version: int
    versions: list[VersionOut]


class RegenerationAccepted(BaseModel):
    regeneration_id: str
    status: Literal["queued", "running", "completed", "failed", "cancelled", "unknown"]
    estimated_cost: str
    budget_warning: bool


class ChangeClipOut(BaseModel):
    clip_index: int
    regeneration_id: str


class ChangeAccepted(RegenerationAccepted):
    """A change of several clips: ``regeneration_id`` is the change's id (its first clip's)."""

    clips: list[ChangeClipOut]


class StepCostsOut(BaseModel):
    llm: str
    generation: str
    composition: str


class RegenerationOut(BaseModel):
    id: str
    change_id: str | None = Field(description="The change of several clips this is one clip of (null: a "
                                              "one-clip change). Its id is its first clip's regeneration's.")
    clip_index: int
    instruction: str
    original_prompt: str
    modified_prompt: str | None
    change_summary: str | None
    rewriter: str | None
    status: Literal["queued", "running", "completed", "failed", "cancelled", "unknown"]
    stage: str | None
    progress: float
    cost: str
    step_costs: StepCostsOut
    estimated_cost: str
    attempts: int
    error: ErrorBody | None
    created_at: datetime | None
    finished_at: datetime | None


class RegenerationList(BaseModel):
    regenerations: list[RegenerationOut]


class EventOut(BaseModel):
    """The ``data:`` of one Server-Sent Event."""

    sequence: int
    type: str
    stage: str | None
    fraction: float
    payload: dict[str, Any]
    created_at: datetime | None


class CacheCounts(BaseModel):
    hits: int
    misses: int
    stores: int
    evictions: int


class ComposerDetails(BaseModel):
    """What one composer replica composes with; ``state`` is "ok" or "unavailable" (then nothing else)."""

    state: str
    encoder: str | None = None
    encoder_reason: str | None = None
    # NVENC was wanted and did not work: this replica encodes with libx264.
    encoder_fallback: bool | None = None
    x264_preset: str | None = None
    workers: int | None = None
    cache: CacheCounts | None = None


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: dict[str, str]
    composer: ComposerDetails


class Liveness(BaseModel):
    status: Literal["ok"]


# ---------------------------------------------------------------------------------------------
# Protobuf → JSON

_FAILED_MESSAGE = "This did not work. Please try again."
# Payload fields that are for operators or other services, never for the browser.
# Payloads whose unset optional fields are null in the event's JSON (the others leave them out).
_NULL_WHEN_UNSET = frozenset({"step_recorded"})


def _money(value: str) -> Decimal:
    try:
        amount = Decimal(value or "0")
    except InvalidOperation:
        return Decimal(0)
    return amount if amount.is_finite() else Decimal(0)


def _time(ts: Timestamp) -> datetime | None:
    if not ts.seconds and not ts.nanos:
        return None
    return ts.ToDatetime(tzinfo=UTC)


def _enum_name(value: int, enum: Any, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:
        return "unknown"
    return name.removeprefix(prefix).lower()


def stage_name(stage: int) -> str | None:
    """``STAGE_GENERATING`` → ``"generating"``; unspecified → ``None``."""
    try:
        known = stage_from_proto(stage)
    except ValueError:
        return "unknown"
    return known.value if known is not None else None


def regeneration_status(state: int) -> Any:
    if state == common_pb2.REGENERATION_STATE_UNSPECIFIED:
        return "unknown"
    return _enum_name(state, common_pb2.RegenerationState, "REGENERATION_STATE_")


def version_out(version: common_pb2.VideoVersion, signer: MediaSigner) -> VersionOut:
    return VersionOut(version=version.version, url=signer.url(version.storage_key),
                      duration=version.duration, created_at=_time(version.created_at),
                      created_by_regeneration_id=version.created_by_regeneration_id or None,
                      encoder=version.encoder or None)


def clips_out(clips: Iterable[common_pb2.Clip], signer: MediaSigner) -> list[ClipOut]:
    """The job's clips in timeline order. The status service sends only the clips in use, one per
    index: the current version's revisions (after a restore, not the highest)."""
    return [ClipOut(index=c.clip_index, prompt=c.prompt, duration=c.duration,
                    video_url=signer.optional_url(c.video_key),
                    thumbnail_url=signer.optional_url(c.thumbnail_key), revision=c.revision)
            for c in sorted(clips, key=lambda c: c.clip_index)]


def job_out(job: common_pb2.Job, signer: MediaSigner, warning_fraction: Decimal) -> JobOut:
    """The job JSON: state, current video, versions, clips, costs and the active regeneration."""
    total, limit = _money(job.total_cost), _money(job.budget_limit)
    used = total / limit if limit > 0 else Decimal(0)
    versions = sorted((version_out(v, signer) for v in job.versions), key=lambda v: v.version)
    current = next((v for v in versions if v.version == job.current_version), None)
    error = None
    if job.error_code:
        error = ErrorBody(code=job.error_code, message=job.error_message or _FAILED_MESSAGE,
                          retryable=job.error_retryable)
    status = "unknown" if job.state == common_pb2.JOB_STATE_UNSPECIFIED else \
        _enum_name(job.state, common_pb2.JobState, "JOB_STATE_")
    return JobOut(id=job.job_id, title=job.title, status=status,  # type: ignore[arg-type]
                  current_version=job.current_version, video_url=current.url if current else None,
                  versions=versions, clips=clips_out(job.clips, signer),
                  total_cost=str(total), budget_limit=str(limit),
                  budget_used_fraction=round(float(used), 4),
                  budget_warning=limit > 0 and used >= warning_fraction,
                  active_regeneration_id=job.active_regeneration_id or None, error=error,
                  aspect_ratio=job.aspect_ratio, created_at=_time(job.created_at))


def regeneration_out(regen: common_pb2.Regeneration) -> RegenerationOut:
    """One row of the regeneration history, without any technical detail."""
    status = regeneration_status(regen.state)
    error = None
    if regen.error_code or status == "failed":
        error = ErrorBody(code=regen.error_code or "failed",
                          message=regen.error_message or _FAILED_MESSAGE, retryable=regen.retryable)
    steps = regen.step_costs
    return RegenerationOut(
        id=regen.regeneration_id, change_id=regen.change_id or None, clip_index=regen.clip_index,
        instruction=regen.user_instruction,
        original_prompt=regen.original_prompt, modified_prompt=regen.modified_prompt or None,
        change_summary=regen.change_summary or None, rewriter=regen.rewriter or None,
        status=status, stage=stage_name(regen.stage), progress=regen.progress,
        cost=str(_money(regen.cost)),
        step_costs=StepCostsOut(llm=str(_money(steps.llm)), generation=str(_money(steps.generation)),
                                composition=str(_money(steps.composition))),
        estimated_cost=str(_money(regen.estimated_cost)), attempts=regen.attempts, error=error,
        created_at=_time(regen.created_at), finished_at=_time(regen.finished_at))


def event_payload(event: common_pb2.JobEvent) -> dict[str, Any]:
    """The event's payload message as a JSON object: its fields by name, the step by its name.

    An unset ``optional`` field is left out, except in ``StepRecorded`` where it is null; so is an
    empty list (a change of several clips names its clips, a one-clip change does not)."""
    kind = event.WhichOneof("payload")
    if kind is None:
        return {}
    message = getattr(event, kind)
    payload: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.has_presence and not message.HasField(field.name):
            if kind in _NULL_WHEN_UNSET:
                payload[field.name] = None
            continue
        value = getattr(message, field.name)
        if field.is_repeated:
            if value:
                payload[field.name] = list(value)
            continue
        if field.name == "step":
            step = step_from_proto(value)
            value = step.value if step is not None else ""
        payload[field.name] = value
    return payload


def event_out(event: common_pb2.JobEvent, signer: MediaSigner) -> EventOut:
    """One job event for SSE."""
    return EventOut(sequence=event.sequence, type=event.type, stage=stage_name(event.stage),
                    fraction=event.fraction, payload=event_payload(event), created_at=_time(event.created_at))


# ---------------------------------------------------------------------------------------------
# Version compare and usage


class ClipDifferenceOut(BaseModel):
    index: int
    revision_before: int
    revision_after: int
    prompt_before: str
    prompt_after: str
    video_url_before: str | None
    video_url_after: str | None
    thumbnail_url_before: str | None
    thumbnail_url_after: str | None


class VersionChangeOut(BaseModel):
    id: str
    clip_index: int
    instruction: str
    status: Literal["queued", "running", "completed", "failed", "cancelled", "unknown"]
    cost: str
    step_costs: StepCostsOut
    version: int | None = Field(description="The version this change published; null when it published "
                                            "none (failed, cancelled or still running).")
    created_at: datetime | None
    finished_at: datetime | None


class VersionComparison(BaseModel):
    """What differs between two versions of a job."""

    from_version: int = Field(description="The version compared from: its clips are the 'before'.")
    to_version: int = Field(description="The version compared to: its clips are the 'after'.")
    clips: list[ClipDifferenceOut] = Field(
        description="The clips whose revision differs between the two versions, in timeline order.")
    changes: list[VersionChangeOut] = Field(
        description="Oldest first: every change begun after the older of the two versions was "
                    "published, up to the publication of the newer one, whatever its outcome "
                    "(failed and cancelled attempts too).")
    cost: str = Field(description="The sum of those changes' costs (a decimal string): what was spent "
                                  "going from the older version to the newer, paid failed attempts included.")


class StepSpendOut(BaseModel):
    rewrite: str = Field(description="Prompt rewriting (the LLM).")
    generate: str = Field(description="Clip generation (the video provider).")
    compose: str = Field(description="Composition: the initial one and every change's.")


class OutcomeCounts(BaseModel):
    completed: int
    failed: int
    cancelled: int
    running: int = Field(description="Changes queued or running now.")


class StageTimeOut(BaseModel):
    stage: str
    median_seconds: float
    samples: int = Field(description="How many stretches of work in this stage were measured.")


class UsageOut(BaseModel):
    """Spend, changes and time, of one job or of all the caller's jobs."""

    job_id: str | None = Field(description="The job; null for all the caller's jobs.")
    jobs: int
    total_cost: str = Field(description="The jobs' total cost: initial compositions and finished changes.")
    spend_by_step: StepSpendOut = Field(
        description="What total_cost is made of, by step: it adds up to total_cost.")
    running_cost: str = Field(description="Spent so far by changes still running (added to total_cost "
                                          "when they finish).")
    changes: OutcomeCounts
    median_seconds_by_stage: list[StageTimeOut] = Field(
        description="From the job event log: a stage lasts from the first event in it to the next event "
                    "in another stage, or to the outcome of the work.")
    median_change_seconds: float | None = Field(
        description="Median seconds from a completed change's request to its new version; null when "
                    "none completed.")


def comparison_out(reply: jobs_pb2.CompareVersionsResponse, signer: MediaSigner) -> VersionComparison:
    """The JSON of a ``CompareVersionsResponse``: storage keys become signed URLs."""
    return VersionComparison(
        from_version=reply.from_version, to_version=reply.to_version,
        clips=[ClipDifferenceOut(
            index=d.clip_index, revision_before=d.revision_before, revision_after=d.revision_after,
            prompt_before=d.prompt_before, prompt_after=d.prompt_after,
            video_url_before=signer.optional_url(d.video_key_before),
            video_url_after=signer.optional_url(d.video_key_after),
            thumbnail_url_before=signer.optional_url(d.thumbnail_key_before),
            thumbnail_url_after=signer.optional_url(d.thumbnail_key_after)) for d in reply.clips],
        changes=[VersionChangeOut(
            id=c.regeneration_id, clip_index=c.clip_index, instruction=c.user_instruction,
            status=regeneration_status(c.state), cost=str(_money(c.cost)),
            step_costs=StepCostsOut(llm=str(_money(c.step_costs.llm)),
                                    generation=str(_money(c.step_costs.generation)),
                                    composition=str(_money(c.step_costs.composition))),
            version=c.version or None, created_at=_time(c.created_at), finished_at=_time(c.finished_at))
            for c in reply.changes],
        cost=str(_money(reply.cost)))


def usage_out(usage: jobs_pb2.Usage, job_id: str | None) -> UsageOut:
    """The JSON of a ``Usage`` message."""
    return UsageOut(
        job_id=job_id, jobs=usage.jobs, total_cost=str(_money(usage.total_cost)),
        spend_by_step=StepSpendOut(rewrite=str(_money(usage.rewrite_cost)),
                                   generate=str(_money(usage.generate_cost)),
                                   compose=str(_money(usage.compose_cost))),
        running_cost=str(_money(usage.running_cost)),
        changes=OutcomeCounts(completed=usage.completed, failed=usage.failed, cancelled=usage.cancelled,
                              running=usage.running),
        median_seconds_by_stage=[StageTimeOut(stage=stage_name(s.stage) or "unknown",
                                              median_seconds=s.median_seconds, samples=s.samples)
                                 for s in usage.stage_times],
        median_change_seconds=usage.median_change_seconds if usage.completed else None)


# ---------------------------------------------------------------------------------------------
# Estimates


class ClipEstimateOut(BaseModel):
    clip_index: int = Field(description="The clip's position, from 0.")
    step_costs: dict[str, str] = Field(
        description='What each step would cost (decimal strings): "rewrite", "generate" and, on the '
                    'change\'s first clip only, "compose" (one composition for the whole change).',
        examples=[{"rewrite": "0.0100", "generate": "0.2500", "compose": "0.0060"}])


class EstimateOut(BaseModel):
    """What a change of these clips would cost, before it is asked for: nothing is leased or spent."""

    estimated_cost: str = Field(description="The whole change: every clip's steps and one composition.")
    clips: list[ClipEstimateOut] = Field(description="By clip position.")
    budget_left: str = Field(description="What the job's budget has left now (never below 0).")
    within_budget: bool = Field(description="Whether the estimate fits in budget_left; if not, starting "
                                            "the change is refused (402).")
    budget_warning: bool = Field(description="Whether the change would take the job's spend to the "
                                             "budget's warning fraction (80 % by default) or past it.")


def estimate_out(reply: regenerator_pb2.EstimateRegenerationResponse) -> EstimateOut:
    """The JSON of an ``EstimateRegenerationResponse``."""
    return EstimateOut(
        estimated_cost=str(_money(reply.estimated_cost)),
        clips=[ClipEstimateOut(clip_index=c.clip_index,
                               step_costs={step: str(_money(cost)) for step, cost in c.step_costs.items()})
               for c in reply.clips],
        budget_left=str(_money(reply.budget_left)), within_budget=reply.within_budget,
        budget_warning=reply.budget_warning)
