"""The one conversion between the domain's StrEnums and the proto enums covers every value both ways
the status service needs, by the naming rule; values one side does not know are refused."""

from __future__ import annotations

import pytest

from clipchat import proto_enums
from clipchat.domain import ClaimOutcome, JobStatus, RegenerationStatus, WorkPhase
from clipchat.v1 import common_pb2, jobs_pb2


def test_every_job_and_regeneration_status_has_its_proto_state() -> None:
    assert {status: proto_enums.job_state_to_proto(status) for status in JobStatus} == {
        JobStatus.COMPOSING: common_pb2.JOB_STATE_COMPOSING, JobStatus.COMPLETED: common_pb2.JOB_STATE_COMPLETED,
        JobStatus.REGENERATING: common_pb2.JOB_STATE_REGENERATING, JobStatus.FAILED: common_pb2.JOB_STATE_FAILED}
    assert [proto_enums.regeneration_state_to_proto(status) for status in RegenerationStatus] == [
        common_pb2.REGENERATION_STATE_QUEUED, common_pb2.REGENERATION_STATE_RUNNING,
        common_pb2.REGENERATION_STATE_COMPLETED, common_pb2.REGENERATION_STATE_FAILED,
        common_pb2.REGENERATION_STATE_CANCELLED]
    # Stored values are plain strings.
    assert proto_enums.regeneration_state_to_proto("cancelled") == common_pb2.REGENERATION_STATE_CANCELLED
    with pytest.raises(ValueError):
        proto_enums.job_state_to_proto("paused")


def test_claim_outcomes_and_work_phases() -> None:
    assert [proto_enums.claim_outcome_to_proto(outcome) for outcome in ClaimOutcome] == [
        jobs_pb2.CLAIM_OUTCOME_CLAIMED, jobs_pb2.CLAIM_OUTCOME_BUSY, jobs_pb2.CLAIM_OUTCOME_OBSOLETE]
    assert proto_enums.work_phase_from_proto(jobs_pb2.WORK_PHASE_REGENERATE) is WorkPhase.REGENERATE
    assert proto_enums.work_phase_from_proto(jobs_pb2.WORK_PHASE_COMPOSE) is WorkPhase.COMPOSE
    assert proto_enums.work_phase_from_proto(jobs_pb2.WORK_PHASE_UNSPECIFIED) is None
    with pytest.raises(ValueError):
        proto_enums.work_phase_from_proto(99)


def test_every_proto_value_but_unspecified_has_a_domain_value() -> None:
    """A value added to a proto enum without its domain value (or the other way round) fails here."""
    for enum, prefix, domain in [(common_pb2.JobState, "JOB_STATE_", JobStatus),
                                 (common_pb2.RegenerationState, "REGENERATION_STATE_", RegenerationStatus),
                                 (jobs_pb2.ClaimOutcome, "CLAIM_OUTCOME_", ClaimOutcome),
                                 (jobs_pb2.WorkPhase, "WORK_PHASE_", WorkPhase)]:
        names = {name.removeprefix(prefix).lower() for name in enum.keys()} - {"unspecified"}
        assert names == {member.value for member in domain}, enum
