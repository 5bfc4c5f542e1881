"""The one conversion between the domain's ``StrEnum``s and the protos' enums.

A proto enum value is the domain value upper-cased behind the enum's prefix (``Stage.GENERATING``
↔ ``STAGE_GENERATING``, ``JobStatus.COMPLETED`` → ``JOB_STATE_COMPLETED``); the unspecified value
(0) is ``None`` on the domain side.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeVar

from clipchat.domain import ClaimOutcome, JobStatus, RegenerationStatus, Stage, Step, WorkPhase
from clipchat.v1 import common_pb2, jobs_pb2

E = TypeVar("E", bound=StrEnum)


def _to_proto(enum: Any, prefix: str, domain: type[StrEnum], value: str | None) -> int:
    """0 for ``None`` or ""; ``ValueError`` for a value that is not one of ``domain``'s."""
    if not value:
        return 0
    number: int = enum.Value(prefix + domain(value).value.upper())
    return number


def _from_proto(enum: Any, prefix: str, domain: type[E], number: int) -> E | None:
    """``None`` for the unspecified value; ``ValueError`` for a number this side does not know."""
    if number == 0:
        return None
    name: str = enum.Name(number)
    return domain(name.removeprefix(prefix).lower())


def stage_to_proto(stage: str | None) -> common_pb2.Stage.ValueType:
    """A ``Stage`` (or its value) as the proto enum."""
    return common_pb2.Stage.ValueType(_to_proto(common_pb2.Stage, "STAGE_", Stage, stage))


def stage_from_proto(number: int) -> Stage | None:
    return _from_proto(common_pb2.Stage, "STAGE_", Stage, number)


def step_to_proto(step: str | None) -> common_pb2.Step.ValueType:
    """A ``Step`` (or its value) as the proto enum."""
    return common_pb2.Step.ValueType(_to_proto(common_pb2.Step, "STEP_", Step, step))


def step_from_proto(number: int) -> Step | None:
    return _from_proto(common_pb2.Step, "STEP_", Step, number)


def job_state_to_proto(status: str) -> common_pb2.JobState.ValueType:
    """A ``JobStatus`` (or its stored value) as the proto enum."""
    return common_pb2.JobState.ValueType(_to_proto(common_pb2.JobState, "JOB_STATE_", JobStatus, status))


def regeneration_state_to_proto(status: str) -> common_pb2.RegenerationState.ValueType:
    """A ``RegenerationStatus`` (or its stored value) as the proto enum."""
    return common_pb2.RegenerationState.ValueType(
        _to_proto(common_pb2.RegenerationState, "REGENERATION_STATE_", RegenerationStatus, status))


def work_phase_from_proto(number: int) -> WorkPhase | None:
    return _from_proto(jobs_pb2.WorkPhase, "WORK_PHASE_", WorkPhase, number)


def claim_outcome_to_proto(outcome: str) -> jobs_pb2.ClaimOutcome.ValueType:
    """A ``ClaimOutcome`` as the proto enum."""
    return jobs_pb2.ClaimOutcome.ValueType(_to_proto(jobs_pb2.ClaimOutcome, "CLAIM_OUTCOME_", ClaimOutcome, outcome))
