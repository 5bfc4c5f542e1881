"""A typed client of JobStatusService for workers: every call has a deadline."""

from __future__ import annotations

from clipchat.domain import Step
from clipchat.proto_enums import stage_to_proto, step_from_proto, step_to_proto
from clipchat.rpc import call, open_channel
from clipchat.settings import Settings
from clipchat.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc


class StatusClient:
    def __init__(self, addr: str, *, deadline: float, settings: Settings | None = None) -> None:
        """``settings`` gives the channel its service token and TLS (none: neither)."""
        self.channel = open_channel(addr, settings)
        self.stub = jobs_pb2_grpc.JobStatusServiceStub(self.channel)
        self.deadline = deadline

    async def close(self) -> None:
        await self.channel.close()

    async def get_job(self, job_id: str, owner: str = "") -> common_pb2.Job:
        response = await call(self.stub.GetJob, jobs_pb2.GetJobRequest(job_id=job_id, owner=owner),
                              timeout=self.deadline)
        return response.job

    async def get_regeneration(self, job_id: str, regeneration_id: str) -> tuple[
            common_pb2.Regeneration, dict[Step, common_pb2.Checkpoint]]:
        """The regeneration and the checkpoints recorded so far, by step."""
        response = await self.get_change(job_id, regeneration_id)
        return response.regeneration, checkpoints_by_step(response)

    async def get_change(self, job_id: str, regeneration_id: str) -> jobs_pb2.GetRegenerationResponse:
        """The regeneration, its checkpoints and, in a change of several clips, every clip's regeneration."""
        return await call(self.stub.GetRegeneration, jobs_pb2.GetRegenerationRequest(
            job_id=job_id, regeneration_id=regeneration_id), timeout=self.deadline)

    async def renew(self, job_id: str, token: str, claim_id: str = "") -> None:
        await call(self.stub.RenewLease, jobs_pb2.RenewLeaseRequest(job_id=job_id, lease_token=token,
                                                                    claim_id=claim_id), timeout=self.deadline)

    async def claim(self, job_id: str, token: str, phase: jobs_pb2.WorkPhase.ValueType,
                    claim_id: str) -> jobs_pb2.ClaimWorkResponse:
        return await call(self.stub.ClaimWork, jobs_pb2.ClaimWorkRequest(
            job_id=job_id, lease_token=token, phase=phase, claim_id=claim_id), timeout=self.deadline)

    async def release(self, job_id: str, token: str, claim_id: str) -> None:
        await call(self.stub.ReleaseClaim, jobs_pb2.ReleaseClaimRequest(
            job_id=job_id, lease_token=token, claim_id=claim_id), timeout=self.deadline)

    async def queue_composition(self, job_id: str, token: str, claim_id: str,
                                new_clips: dict[int, jobs_pb2.ClipInput]) -> None:
        """Hand the change's new clips (by clip index) to the composer."""
        request = jobs_pb2.QueueCompositionRequest(job_id=job_id, lease_token=token, claim_id=claim_id)
        for index, clip in sorted(new_clips.items()):
            request.new_clips.add(clip_index=index).clip.CopyFrom(clip)
        await call(self.stub.QueueComposition, request, timeout=self.deadline)

    async def progress(self, job_id: str, token: str, stage: str, fraction: float, *, message: str = "",
                       eta_seconds: float = 0.0, claim_id: str = "", regeneration_id: str = "") -> None:
        """Report progress: of the whole work, or of one clip of a change (``regeneration_id``)."""
        await call(self.stub.RecordProgress, jobs_pb2.RecordProgressRequest(
            job_id=job_id, lease_token=token, stage=stage_to_proto(stage),
            fraction=fraction, message=message, eta_seconds=eta_seconds, claim_id=claim_id,
            regeneration_id=regeneration_id), timeout=self.deadline)

    async def record_step(self, job_id: str, token: str, step: Step, *, cost: str = "",
                          modified_prompt: str = "", change_summary: str = "", rewriter: str = "",
                          checkpoint: common_pb2.Checkpoint | None = None, claim_id: str = "",
                          charge_key: str = "", regeneration_id: str = "") -> common_pb2.Regeneration:
        response = await call(self.stub.RecordStep, jobs_pb2.RecordStepRequest(
            job_id=job_id, lease_token=token, step=step_to_proto(step), cost=cost,
            modified_prompt=modified_prompt, change_summary=change_summary, rewriter=rewriter,
            checkpoint=checkpoint, claim_id=claim_id, charge_key=charge_key, regeneration_id=regeneration_id),
            timeout=self.deadline)
        return response.regeneration

    async def succeed(self, request: jobs_pb2.SucceedRegenerationRequest) -> common_pb2.Job:
        response = await call(self.stub.SucceedRegeneration, request, timeout=self.deadline)
        return response.job

    async def fail(self, job_id: str, token: str, *, code: str, message: str, detail: str = "",
                   retryable: bool = True, claim_id: str = "", failed_regeneration_ids: tuple[str, ...] = ()) -> None:
        await call(self.stub.FailRegeneration, jobs_pb2.FailRegenerationRequest(
            job_id=job_id, lease_token=token, error_code=code, error_message=message,
            technical_detail=detail, retryable=retryable, claim_id=claim_id,
            failed_regeneration_ids=failed_regeneration_ids), timeout=self.deadline)


def checkpoints_by_step(response: jobs_pb2.GetRegenerationResponse) -> dict[Step, common_pb2.Checkpoint]:
    """A regeneration's checkpoints recorded so far, by step (one this version does not know is left out)."""
    checkpoints = {}
    for recorded in response.checkpoints:
        step = step_from_proto(recorded.step)
        if step is not None:
            checkpoints[step] = recorded.checkpoint
    return checkpoints
