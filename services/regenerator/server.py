"""RegeneratorService: accepts a regeneration; the status service takes the job's lease and queues the work."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import grpc

from clipchat.domain import check_clip_indices
from clipchat.errors import InvalidInput
from clipchat.pricing import composition_cost, round_money
from clipchat.rpc import call, require_owner, rpc_method
from clipchat.settings import Settings
from clipchat.status_client import StatusClient
from clipchat.v1 import common_pb2, jobs_pb2, regenerator_pb2, regenerator_pb2_grpc
from services.regenerator.generator import VideoGenerator
from services.regenerator.rewrite import reference_clip, sanitize_instruction

log = logging.getLogger("clipchat.regenerator")
SERVICE_NAME = "clipchat.v1.RegeneratorService"
MAX_HISTORY_TURNS = 50
MAX_TURN_CHARS = 4000
# The requests that name the clips of a change, with the same fields.
ChangeRequest = regenerator_pb2.StartRegenerationRequest | regenerator_pb2.EstimateRegenerationRequest


@dataclass(frozen=True)
class Quote:
    """A change's job, its clip indices as named, and each clip's step costs by clip index (the one
    composition on the first clip)."""

    job: common_pb2.Job
    indices: list[int]
    steps: list[tuple[int, dict[str, Decimal]]]

    @property
    def total(self) -> Decimal:
        """The change's estimate: every clip's steps and the one composition."""
        return sum((cost for _, costs in self.steps for cost in costs.values()), Decimal(0))


def check_history(turns: Sequence[common_pb2.Turn]) -> None:
    """Validate a conversation history: at most ``MAX_HISTORY_TURNS`` turns of a user or an assistant."""
    if len(turns) > MAX_HISTORY_TURNS:
        raise InvalidInput(f"Conversation history must be a list of at most {MAX_HISTORY_TURNS} turns.")
    for turn in turns:
        if turn.role not in ("user", "assistant") or len(turn.content) > MAX_TURN_CHARS:
            raise InvalidInput("Each conversation turn needs a role (user or assistant) and its text "
                               f"(at most {MAX_TURN_CHARS} characters).")


class RegeneratorServicer(regenerator_pb2_grpc.RegeneratorServiceServicer):
    def __init__(self, *, status: StatusClient, generator: VideoGenerator, settings: Settings) -> None:
        self.status = status
        self.generator = generator
        self.settings = settings

    def estimate(self, clip_duration: float, video_duration: float) -> dict[str, Decimal]:
        """What each step of a regeneration is expected to cost, before anything is spent."""
        steps = {
            "rewrite": self.settings.llm_estimated_cost if self.settings.llm_base_url else Decimal("0"),
            "generate": self.generator.estimate_cost(clip_duration),
            "compose": composition_cost(self.settings.composition_price_per_second, video_duration),
        }
        return {step: round_money(cost) for step, cost in steps.items()}

    @rpc_method
    async def StartRegeneration(self, request: regenerator_pb2.StartRegenerationRequest,
                                context: Any) -> regenerator_pb2.StartRegenerationResponse:
        """One clip changed by an instruction; or, with ``clip_indices`` or ``all_clips``, a change of
        several clips under one lease, with one composition and one new version."""
        require_owner(request.owner, "Regenerating a clip")
        instruction = sanitize_instruction(request.instruction, self.settings.max_instruction_chars)
        check_history(request.conversation_history)
        quote = await self.quote(request)
        reference = reference_clip(instruction)
        if reference is not None and not 1 <= reference <= len(quote.job.clips):
            raise InvalidInput(f"There is no clip {reference} to match: this video has clips 1 to "
                               f"{len(quote.job.clips)}.", code="reference_clip_out_of_range")
        several = bool(request.all_clips or request.clip_indices)
        quotes = [jobs_pb2.ClipQuote(clip_index=index, step_costs=_decimal_strings(costs))
                  for index, costs in quote.steps]
        # The status service quotes a retry for the steps it will still pay for.
        began = await call(self.status.stub.BeginRegeneration, jobs_pb2.BeginRegenerationRequest(
            job_id=request.job_id, owner=request.owner, clip_index=quote.indices[0], user_instruction=instruction,
            conversation_history=request.conversation_history, estimated_cost=str(quote.total),
            estimated_step_costs=quotes[0].step_costs if not several else {},
            clips=quotes if several else []), timeout=self.status.deadline)
        # The regenerate task was written with the lease (the status service's outbox).
        regeneration_id = began.regeneration.regeneration_id
        log.info("regeneration.queued", extra={"job_id": request.job_id, "regeneration_id": regeneration_id,
                                               "clips": len(quote.indices)})
        return regenerator_pb2.StartRegenerationResponse(
            regeneration_id=regeneration_id, state=common_pb2.REGENERATION_STATE_QUEUED,
            estimated_cost=began.estimated_cost or began.regeneration.estimated_cost,
            budget_warning=began.budget_warning, members=began.members)

    @rpc_method
    async def EstimateRegeneration(self, request: regenerator_pb2.EstimateRegenerationRequest,
                                   context: Any) -> regenerator_pb2.EstimateRegenerationResponse:
        """What the change ``request`` names would cost, step by step, against the job's budget.

        Nothing is leased, queued or spent. The quote is that of a new change: a retry of a failed
        change reuses the steps it already paid for, so when it is actually started the status
        service quotes (and budget-checks) it lower, for the steps still to pay only.
        """
        require_owner(request.owner, "Estimating a change")
        quote = await self.quote(request)
        total_cost, budget_limit = Decimal(quote.job.total_cost or "0"), Decimal(quote.job.budget_limit or "0")
        budget_left = max(budget_limit - total_cost, Decimal(0))
        return regenerator_pb2.EstimateRegenerationResponse(
            estimated_cost=str(quote.total),
            clips=[regenerator_pb2.ClipEstimate(clip_index=index, step_costs=_decimal_strings(costs))
                   for index, costs in quote.steps],
            budget_left=str(round_money(budget_left)), within_budget=quote.total <= budget_left,
            budget_warning=total_cost + quote.total >= budget_limit * self.settings.budget_warning_fraction)

    async def quote(self, request: ChangeRequest) -> Quote:
        """The job and the clips ``request`` names, each clip's steps quoted; ``InvalidInput`` for too
        many clips, a clip past the last or one named twice, ``NotFound`` for a job not the owner's."""
        job = await self.status.get_job(request.job_id, request.owner)
        indices = list(range(len(job.clips))) if request.all_clips else \
            list(request.clip_indices) if request.clip_indices else [request.clip_index]
        if len(indices) > self.settings.max_clips_per_change:
            raise InvalidInput(f"A change can name at most {self.settings.max_clips_per_change} clips.",
                               code="too_many_clips")
        check_clip_indices(indices, len(job.clips))
        video_duration = sum(c.duration for c in job.clips)
        # Each clip's steps; the one composition is quoted on the first clip.
        steps = [(index, {step: cost for step, cost in self.estimate(job.clips[index].duration, video_duration).items()
                          if step != "compose" or n == 0}) for n, index in enumerate(sorted(indices))]
        return Quote(job, indices, steps)

    @rpc_method
    async def ListRegenerations(self, request: regenerator_pb2.ListJobRegenerationsRequest,
                                context: Any) -> regenerator_pb2.ListJobRegenerationsResponse:
        require_owner(request.owner, "Listing regenerations")
        response = await call(self.status.stub.ListRegenerations, jobs_pb2.ListRegenerationsRequest(
            job_id=request.job_id, owner=request.owner), timeout=self.status.deadline)
        return regenerator_pb2.ListJobRegenerationsResponse(regenerations=response.regenerations)


def _decimal_strings(costs: Mapping[str, Decimal]) -> dict[str, str]:
    return {step: str(cost) for step, cost in costs.items()}


def add_to_server(servicer: RegeneratorServicer, server: grpc.aio.Server) -> None:
    regenerator_pb2_grpc.add_RegeneratorServiceServicer_to_server(servicer, server)
