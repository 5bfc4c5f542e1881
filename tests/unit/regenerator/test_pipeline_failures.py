"""``RegenerationPipeline``: retries, checkpoints, costs and what a failure records.

The status service, the rewriter and the generator are small in-process fakes that record what the
pipeline asks of them; storage is a local folder.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from clipchat.domain import Step
from clipchat.errors import DependencyUnavailable, StaleLease
from clipchat.media.ffmpeg import FfmpegRunner
from clipchat.proto_enums import step_to_proto
from clipchat.settings import Settings
from clipchat.storage.local import LocalStorage
from clipchat.v1 import common_pb2, jobs_pb2
from services.regenerator.generator import GeneratedClip, ProgressFn, StartedFn
from services.regenerator.http_generator import (
    REJECTED_MESSAGE,
    TIMEOUT_MESSAGE,
    GenerationRejected,
    TransientGenerationError,
)
from services.regenerator.pipeline import (
    FAILED_MESSAGE,
    TIMED_OUT_MESSAGE,
    RegenerationPipeline,
    RegenerationTask,
)
from services.regenerator.rewrite import LLMUnavailable, RewriteRejected, RewriteRequest, RewriteResult

JOB_ID = "6f1c3a52-3d43-4c07-9b7e-2f0d1c1f7a10"
REGENERATION_ID = "0a4c2b8e-5a3f-4a8e-8c47-1b6a2e9d3c55"
TOKEN = "lease-token"
PROMPTS = ["a dancer on a rooftop", "the city skyline", "the dancer bowing"]
TASK = RegenerationTask(JOB_ID, REGENERATION_ID, TOKEN)


class FakeStatus:
    """The calls a worker makes on the status service; ``cancel()`` makes every later write stale."""

    def __init__(self, checkpoints: dict[str, Any] | None = None, change: list[int] | None = None) -> None:
        # Given as JSON objects by step name, answered as the status client answers them.
        self.checkpoints = {Step(step): json_format.ParseDict(fields, common_pb2.Checkpoint())
                            for step, fields in (checkpoints or {}).items()}
        # A change of several clips: its clips' indices (the first is the lead, REGENERATION_ID).
        self.change = change or []
        self.cancelled = False
        self.unavailable_writes = 0  # this many writes fail as if the status service were down
        self.refuse_step = ""  # this step's checkpoint is refused, as after a cancel
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def cancel(self) -> None:
        self.cancelled = True

    def named(self, name: str) -> list[dict[str, Any]]:
        return [kwargs for call, kwargs in self.calls if call == name]

    def _write(self, name: str, **kwargs: Any) -> None:
        if self.cancelled:
            raise StaleLease()
        if self.unavailable_writes and name != "progress":
            self.unavailable_writes -= 1
            raise DependencyUnavailable()
        self.calls.append((name, kwargs))

    def member(self, index: int) -> common_pb2.Regeneration:
        """The regeneration of clip ``index`` (of the change, when there is one)."""
        lead = not self.change or index == self.change[0]
        return common_pb2.Regeneration(
            regeneration_id=REGENERATION_ID if lead else f"{REGENERATION_ID[:-2]}{index:02d}", job_id=JOB_ID,
            clip_index=index, original_prompt=PROMPTS[index], user_instruction="anime style",
            state=common_pb2.REGENERATION_STATE_QUEUED, change_id=REGENERATION_ID if self.change else "")

    async def get_change(self, job_id: str, regeneration_id: str) -> jobs_pb2.GetRegenerationResponse:
        members = [self.member(index) for index in self.change]
        [regeneration] = [m for m in members if m.regeneration_id == regeneration_id] or [self.member(1)]
        return jobs_pb2.GetRegenerationResponse(regeneration=regeneration, members=members, checkpoints=[
            common_pb2.StepCheckpoint(step=step_to_proto(step), checkpoint=checkpoint)
            for step, checkpoint in self.checkpoints.items()] if regeneration_id == REGENERATION_ID else [])

    async def get_job(self, job_id: str, owner: str = "") -> common_pb2.Job:
        return common_pb2.Job(job_id=job_id, clips=[
            common_pb2.Clip(clip_index=i, prompt=p, duration=1.0, video_key=f"jobs/x/clip{i}.mp4")
            for i, p in enumerate(PROMPTS)])

    async def renew(self, job_id: str, token: str, claim_id: str = "") -> None:
        self._write("renew")

    async def progress(self, job_id: str, token: str, stage: str, fraction: float, *, message: str = "",
                       eta_seconds: float = 0.0, claim_id: str = "", regeneration_id: str = "") -> None:
        self._write("progress", stage=stage, fraction=fraction, regeneration_id=regeneration_id)

    async def record_step(self, job_id: str, token: str, step: Step, *, claim_id: str = "", **kwargs: Any) -> None:
        if step == self.refuse_step:
            raise StaleLease()
        if not kwargs.get("regeneration_id"):  # one clip: the change's first
            kwargs.pop("regeneration_id", None)
        if kwargs.get("checkpoint") is not None:  # recorded as the JSON object the status service stores
            kwargs["checkpoint"] = json_format.MessageToDict(kwargs["checkpoint"], preserving_proto_field_name=True)
        self._write("record_step", step=step, **kwargs)

    async def queue_composition(self, job_id: str, token: str, claim_id: str,
                                new_clips: dict[int, jobs_pb2.ClipInput]) -> None:
        [(clip_index, new_clip), *_] = new_clips.items()
        self._write("queue_composition", token=token, claim_id=claim_id, clip_index=clip_index, new_clip=new_clip,
                    new_clips=new_clips)

    async def fail(self, job_id: str, token: str, *, code: str, message: str, detail: str = "",
                   retryable: bool = True, claim_id: str = "", failed_regeneration_ids: tuple[str, ...] = ()) -> None:
        self._write("fail", code=code, message=message, detail=json.loads(detail), retryable=retryable,
                    failed=failed_regeneration_ids)


class ScriptedRewriter:
    """Raises or returns the scripted outcomes in order; the last one repeats."""

    name = "llm"

    def __init__(self, *outcomes: RewriteResult | Exception) -> None:
        self.outcomes = list(outcomes)
        self.requests: list[tuple[float, RewriteRequest]] = []

    async def rewrite(self, req: RewriteRequest) -> RewriteResult:
        self.requests.append((time.monotonic(), req))
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


class ScriptedGenerator:
    """Raises the scripted errors in order; then copies ``sample`` (or hangs when it is None)."""

    name = "fake"

    def __init__(self, *errors: Exception, sample: Path | None = None) -> None:
        self.errors = list(errors)
        self.sample = sample
        self.prompts: list[str] = []
        self.keys: list[tuple[str, str]] = []  # (idempotency key, resumed prediction) of each call
        self.started = asyncio.Event()
        self.cancelled = False

    def estimate_cost(self, duration: float) -> Decimal:
        return Decimal("0.05") * Decimal(str(duration))

    async def generate(self, prompt: str, duration: float, dest: Path, *,
                       on_progress: ProgressFn | None = None, idempotency_key: str = "", resume_id: str = "",
                       on_started: StartedFn | None = None) -> GeneratedClip:
        self.prompts.append(prompt)
        self.keys.append((idempotency_key, resume_id))
        self.started.set()
        if self.errors:
            raise self.errors.pop(0)
        if on_started is not None and not resume_id:
            await on_started(f"pred-{len(self.prompts)}")
        if self.sample is None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        assert self.sample is not None
        shutil.copy(self.sample, dest)
        return GeneratedClip(path=dest, duration=duration, cost=Decimal("0.1234"), provider_id="pred-1")


LLM_RESULT = RewriteResult(prompt="the city skyline, anime style", summary="Anime style.", cost=Decimal("0.0042"),
                           rewriter="llm")

PipelineFactory = Callable[..., tuple[RegenerationPipeline, FakeStatus]]


@pytest.fixture
def make_pipeline(tmp_path: Path) -> PipelineFactory:
    def make(rewriter: Any, generator: Any, *, checkpoints: dict[str, Any] | None = None,
             retry_max_seconds: float = 0.01,
             change: list[int] | None = None) -> tuple[RegenerationPipeline, FakeStatus]:
        status = FakeStatus(checkpoints, change)
        settings = Settings(retry_attempts=3, retry_base_seconds=0.001, retry_max_seconds=retry_max_seconds,
                            heartbeat_seconds=0.05)
        pipeline = RegenerationPipeline(status=status, storage=LocalStorage(tmp_path / "storage"),  # type: ignore[arg-type]
                                        rewriter=rewriter, generator=generator,  # type: ignore[arg-type]
                                        ffmpeg=FfmpegRunner(None), settings=settings)
        return pipeline, status
    return make


async def test_generation_timeout_has_its_own_message(make_pipeline: PipelineFactory) -> None:
    timeout = TransientGenerationError(TIMEOUT_MESSAGE, code="generation_timeout")
    generator = ScriptedGenerator(timeout, timeout, timeout)
    pipeline, status = make_pipeline(ScriptedRewriter(LLM_RESULT), generator)

    await pipeline.run(TASK)

    assert len(generator.prompts) == 3
    [failed] = status.named("fail")
    assert (failed["code"], failed["message"], failed["retryable"]) == ("generation_timeout", TIMED_OUT_MESSAGE, True)
    assert TIMED_OUT_MESSAGE == "Video generation timed out. Please retry."
    assert failed["detail"]["step"] == "generate" and failed["detail"]["attempts"] == 3
    assert "TransientGenerationError" in failed["detail"]["exception"]


async def test_transient_failures_are_retried_then_reported_with_the_generic_message(
        make_pipeline: PipelineFactory) -> None:
    down = [TransientGenerationError(detail="HTTP 500: upstream exploded") for _ in range(3)]
    generator = ScriptedGenerator(*down)
    pipeline, status = make_pipeline(ScriptedRewriter(LLM_RESULT), generator)

    await pipeline.run(TASK)

    assert len(generator.prompts) == 3 and not status.named("queue_composition")
    [failed] = status.named("fail")
    assert (failed["code"], failed["message"], failed["retryable"]) == ("generation_failed", FAILED_MESSAGE, True)
    assert FAILED_MESSAGE == "Regeneration failed. Please try again."
    detail = failed["detail"]
    assert detail["provider_response"] == "HTTP 500: upstream exploded"
    assert detail["error_code"] == "generator_unavailable" and len(detail["trace_id"]) == 32
    # The rewrite was paid for and checkpointed before the generation failed.
    [rewrite] = status.named("record_step")
    assert rewrite["step"] == "rewrite" and rewrite["cost"] == "0.0042"
    assert rewrite["checkpoint"] == {"prompt": LLM_RESULT.prompt}


async def test_a_content_policy_refusal_is_not_retried(make_pipeline: PipelineFactory) -> None:
    generator = ScriptedGenerator(GenerationRejected(code="content_policy", detail="flagged (nsfw)"))
    pipeline, status = make_pipeline(ScriptedRewriter(LLM_RESULT), generator)

    await pipeline.run(TASK)

    assert len(generator.prompts) == 1
    [failed] = status.named("fail")
    assert (failed["code"], failed["message"], failed["retryable"]) == ("content_policy", REJECTED_MESSAGE, False)
    assert failed["detail"]["provider_response"] == "flagged (nsfw)"


async def test_a_rejected_llm_answer_is_still_paid_for(make_pipeline: PipelineFactory) -> None:
    rejected = RewriteRejected(detail="the answer repeats the system prompt", cost=Decimal("0.0031"))
    generator = ScriptedGenerator()
    rewriter = ScriptedRewriter(rejected)
    pipeline, status = make_pipeline(rewriter, generator)

    await pipeline.run(TASK)

    assert len(rewriter.requests) == 1 and not generator.prompts
    writes = [name for name, _ in status.calls if name in ("record_step", "fail")]
    assert writes == ["record_step", "fail"]  # the cost is on the row before the failure adds it up
    [step] = status.named("record_step")
    assert step == {"step": "rewrite", "cost": "0.0031", "rewriter": "llm",
                    "charge_key": f"{REGENERATION_ID}:rewrite:1.1"}
    [failed] = status.named("fail")
    assert (failed["code"], failed["message"], failed["retryable"]) == (
        "rewrite_rejected", RewriteRejected.default_message, False)
    assert "system prompt" in failed["detail"]["provider_response"]


async def test_an_llm_outage_is_retried_then_reported_with_the_generic_message(
        make_pipeline: PipelineFactory) -> None:
    rewriter = ScriptedRewriter(LLMUnavailable(detail="HTTP 503"))
    pipeline, status = make_pipeline(rewriter, ScriptedGenerator())

    await pipeline.run(TASK)

    assert len(rewriter.requests) == 3
    [failed] = status.named("fail")
    assert (failed["code"], failed["message"], failed["retryable"]) == ("rewrite_failed", FAILED_MESSAGE, True)
    assert not status.named("record_step")


async def test_retry_after_is_honoured(make_pipeline: PipelineFactory) -> None:
    rewriter = ScriptedRewriter(LLMUnavailable(code="llm_rate_limited", retry_after=0.3), LLM_RESULT)
    generator = ScriptedGenerator(GenerationRejected(code="invalid_prompt"))
    # (RetryPolicy waits at most 4 × retry_max_seconds, even when a provider asks for longer.)
    pipeline, status = make_pipeline(rewriter, generator, retry_max_seconds=0.1)

    await pipeline.run(TASK)

    (first, _), (second, _) = rewriter.requests
    assert second - first >= 0.3
    assert status.named("record_step")[0]["cost"] == "0.0042"


async def test_checkpointed_steps_are_not_paid_for_again(make_pipeline: PipelineFactory) -> None:
    generated: dict[str, Any] = {
        "video_key": "jobs/x/clips/new.mp4", "thumbnail_key": "jobs/x/clips/new.jpg", "duration": 1.0,
        "probed_duration": 1.0, "prompt": "p2", "provider": "http", "provider_id": "pred-9"}
    rewriter, generator = ScriptedRewriter(LLM_RESULT), ScriptedGenerator()
    pipeline, status = make_pipeline(rewriter, generator,
                                             checkpoints={"rewrite": {"prompt": "p2"}, "generate": generated})

    await pipeline.run(TASK)

    assert not rewriter.requests and not generator.prompts
    assert not status.named("record_step") and not status.named("fail")
    [queued] = status.named("queue_composition")
    assert queued["clip_index"] == 1
    assert queued["new_clip"] == jobs_pb2.ClipInput(prompt="p2", duration=1.0, video_key=generated["video_key"],
                                                    thumbnail_key=generated["thumbnail_key"])


async def test_a_cancel_stops_the_generation_and_records_nothing(make_pipeline: PipelineFactory) -> None:
    generator = ScriptedGenerator()  # hangs until cancelled
    pipeline, status = make_pipeline(ScriptedRewriter(LLM_RESULT), generator)

    async def cancel_when_generating() -> None:
        await generator.started.wait()
        status.cancel()  # the next heartbeat is refused

    async with asyncio.timeout(5):
        await asyncio.gather(pipeline.run(TASK), cancel_when_generating())

    assert generator.cancelled
    assert not status.named("fail") and not status.named("queue_composition")


async def test_a_generated_clip_is_stored_paid_for_and_handed_to_the_composer(
        make_pipeline: PipelineFactory, ffmpeg_exe: str, tmp_path: Path) -> None:
    from tests.fakes.prediction_server import render_sample_mp4

    sample = render_sample_mp4(tmp_path / "sample.mp4", ffmpeg=ffmpeg_exe)
    generator = ScriptedGenerator(sample=sample)
    pipeline, status = make_pipeline(ScriptedRewriter(LLM_RESULT), generator)

    await pipeline.run(TASK)

    assert generator.prompts == [LLM_RESULT.prompt]
    rewrite, started, generate = status.named("record_step")
    assert rewrite["step"] == "rewrite" and generate["step"] == "generate"
    # The prediction was checkpointed before it was waited for; each paid call has its own key.
    assert started == {"step": "generation_started", "checkpoint": {"provider_id": "pred-1"}}
    assert generator.keys == [(f"{REGENERATION_ID}:generate:1.1", "")]
    assert rewrite["charge_key"] == f"{REGENERATION_ID}:rewrite:1.1"
    assert generate["charge_key"] == f"{REGENERATION_ID}:generate:1.1"
    assert generate["cost"] == "0.1234" and "cost" not in generate["checkpoint"]
    assert (tmp_path / "storage" / generate["checkpoint"]["video_key"]).is_file()
    assert (tmp_path / "storage" / generate["checkpoint"]["thumbnail_key"]).is_file()
    [queued] = status.named("queue_composition")
    assert queued["token"] == TOKEN and queued["new_clip"].video_key == generate["checkpoint"]["video_key"]
    stages = [p["stage"] for p in status.named("progress")]
    assert stages[0] == "rewriting" and "generating" in stages and stages[-1] == "queued"


async def test_a_started_prediction_is_resumed_by_the_next_attempt(
        make_pipeline: PipelineFactory, ffmpeg_exe: str, tmp_path: Path) -> None:
    from tests.fakes.prediction_server import render_sample_mp4

    generator = ScriptedGenerator(sample=render_sample_mp4(tmp_path / "sample.mp4", ffmpeg=ffmpeg_exe))
    pipeline, status = make_pipeline(ScriptedRewriter(LLM_RESULT), generator, checkpoints={
        "rewrite": {"prompt": "p2"}, "generation_started": {"provider_id": "pred-7"}})

    await pipeline.run(RegenerationTask(JOB_ID, REGENERATION_ID, TOKEN, claim_id="c-2", attempt=2))

    # The worker that died had created pred-7: this attempt waits for it instead of paying again.
    assert generator.keys == [(f"{REGENERATION_ID}:generate:2.1", "pred-7")]
    assert [step["step"] for step in status.named("record_step")] == ["generate"]
    assert status.named("queue_composition")


async def test_a_status_outage_while_checkpointing_does_not_repeat_paid_work(
        make_pipeline: PipelineFactory, ffmpeg_exe: str, tmp_path: Path) -> None:
    from tests.fakes.prediction_server import render_sample_mp4

    generator = ScriptedGenerator(sample=render_sample_mp4(tmp_path / "sample.mp4", ffmpeg=ffmpeg_exe))
    rewriter = ScriptedRewriter(LLM_RESULT)
    pipeline, status = make_pipeline(rewriter, generator)
    status.unavailable_writes = 4  # the rewrite's checkpoint waits for the status service to come back

    await pipeline.run(TASK)

    assert len(rewriter.requests) == 1 and len(generator.prompts) == 1
    assert [step["step"] for step in status.named("record_step")] == ["rewrite", "generation_started", "generate"]
    assert status.named("queue_composition") and not status.named("fail")


async def test_progress_that_cannot_be_written_never_stops_the_work(
        make_pipeline: PipelineFactory, ffmpeg_exe: str, tmp_path: Path) -> None:
    from tests.fakes.prediction_server import render_sample_mp4

    generator = ScriptedGenerator(sample=render_sample_mp4(tmp_path / "sample.mp4", ffmpeg=ffmpeg_exe))
    pipeline, status = make_pipeline(ScriptedRewriter(LLM_RESULT), generator)

    async def progress_down(*args: Any, **kwargs: Any) -> None:
        raise DependencyUnavailable()

    status.progress = progress_down  # type: ignore[method-assign]
    await pipeline.run(TASK)

    assert len(generator.prompts) == 1
    assert status.named("queue_composition") and not status.named("fail")


async def test_a_clip_whose_checkpoint_is_refused_leaves_no_object_behind(
        make_pipeline: PipelineFactory, ffmpeg_exe: str, tmp_path: Path) -> None:
    from tests.fakes.prediction_server import render_sample_mp4

    generator = ScriptedGenerator(sample=render_sample_mp4(tmp_path / "sample.mp4", ffmpeg=ffmpeg_exe))
    pipeline, status = make_pipeline(ScriptedRewriter(LLM_RESULT), generator)
    status.refuse_step = "generate"  # cancelled while the clip was uploaded

    await pipeline.run(TASK)

    assert len(generator.prompts) == 1 and not status.named("queue_composition")
    stored = [p for p in (tmp_path / "storage").rglob("*") if p.is_file()]
    assert stored == []


class EchoRewriter:
    """Each clip's own prompt, in anime style."""

    name = "template"

    async def rewrite(self, req: RewriteRequest) -> RewriteResult:
        return RewriteResult(prompt=f"{req.original_prompt}, anime style", summary="Anime style.",
                             cost=Decimal("0.0010"), rewriter="template")


class PickyGenerator(ScriptedGenerator):
    """Refuses the prompts that contain ``refused``; copies the sample for the others."""

    def __init__(self, sample: Path, refused: str) -> None:
        super().__init__(sample=sample)
        self.refused = refused

    async def generate(self, prompt: str, duration: float, dest: Path, **kwargs: Any) -> GeneratedClip:
        if self.refused in prompt:
            self.prompts.append(prompt)
            raise GenerationRejected(code="content_policy", detail="flagged")
        return await super().generate(prompt, duration, dest, **kwargs)


async def test_a_change_generates_every_clip_and_hands_them_over_at_once(
        make_pipeline: PipelineFactory, ffmpeg_exe: str, tmp_path: Path) -> None:
    from tests.fakes.prediction_server import render_sample_mp4

    generator = ScriptedGenerator(sample=render_sample_mp4(tmp_path / "sample.mp4", ffmpeg=ffmpeg_exe))
    pipeline, status = make_pipeline(EchoRewriter(), generator, change=[0, 1, 2])

    await pipeline.run(TASK)

    assert sorted(generator.prompts) == sorted(f"{p}, anime style" for p in PROMPTS)
    steps = status.named("record_step")
    members = {status.member(i).regeneration_id: i for i in (0, 1, 2)}
    # Each clip's steps are recorded on its own regeneration, under its own keys.
    assert sorted((members[s["regeneration_id"]], s["step"]) for s in steps if s["step"] != "generation_started") \
        == [(i, step) for i in (0, 1, 2) for step in ("generate", "rewrite")]
    assert {s["charge_key"].split(":")[0] for s in steps if "charge_key" in s} == set(members)
    [queued] = status.named("queue_composition")
    assert sorted(queued["new_clips"]) == [0, 1, 2]
    assert {c.prompt for c in queued["new_clips"].values()} == {f"{p}, anime style" for p in PROMPTS}
    fractions = [p["fraction"] for p in status.named("progress") if not p["regeneration_id"]]
    # The mean of the clips' progress, up to the composer's 60 %.
    assert max(fractions) <= 0.6 + 1e-9 and fractions[-1] == pytest.approx(0.6)
    # Each clip's own progress, on its own regeneration: rewritten, then generating.
    for regeneration_id in members:
        own = [(p["stage"], p["fraction"]) for p in status.named("progress") if p["regeneration_id"] == regeneration_id]
        assert own[0] == ("rewriting", pytest.approx(0.02)) and own[-1] == ("generating", pytest.approx(0.1))
    assert not status.named("fail")


async def test_one_clip_of_a_change_failing_names_it_and_keeps_the_others_paid_work(
        make_pipeline: PipelineFactory, ffmpeg_exe: str, tmp_path: Path) -> None:
    from tests.fakes.prediction_server import render_sample_mp4

    sample = render_sample_mp4(tmp_path / "sample.mp4", ffmpeg=ffmpeg_exe)
    pipeline, status = make_pipeline(EchoRewriter(), PickyGenerator(sample, PROMPTS[1]), change=[0, 1, 2])

    await pipeline.run(TASK)

    [failed] = status.named("fail")
    assert failed["failed"] == (status.member(1).regeneration_id,)
    assert failed["code"] == "content_policy" and failed["message"] == f"Clip 2 failed: {REJECTED_MESSAGE}"
    generated = {s["regeneration_id"] for s in status.named("record_step") if s["step"] == "generate"}
    assert generated == {status.member(0).regeneration_id, status.member(2).regeneration_id}
    assert not status.named("queue_composition")


class LookRewriter:
    """An LLM-like rewriter that gives each clip its own look unless it is given one; the lead's
    (clip 0's) rewrite waits for ``gate`` and raises ``lead_error`` when set."""

    name = "llm"

    def __init__(self, lead_error: Exception | None = None) -> None:
        self.requests: list[RewriteRequest] = []
        self.asked = asyncio.Event()  # set by the first request
        self.gate = asyncio.Event()
        self.gate.set()
        self.lead_error = lead_error

    async def rewrite(self, req: RewriteRequest) -> RewriteResult:
        self.requests.append(req)
        self.asked.set()
        if req.original_prompt == PROMPTS[0]:
            await self.gate.wait()
            if self.lead_error is not None:
                raise self.lead_error
        style = req.shared_style or f"night, blue light over {req.original_prompt}"
        return RewriteResult(prompt=f"{req.original_prompt}, {style}", summary="Night.", cost=Decimal("0.0020"),
                             rewriter="llm", style=style)


async def test_a_change_rewrites_its_lead_first_and_gives_the_others_its_look(
        make_pipeline: PipelineFactory, ffmpeg_exe: str, tmp_path: Path) -> None:
    from tests.fakes.prediction_server import render_sample_mp4

    rewriter = LookRewriter()
    rewriter.gate.clear()
    generator = ScriptedGenerator(sample=render_sample_mp4(tmp_path / "sample.mp4", ffmpeg=ffmpeg_exe))
    pipeline, status = make_pipeline(rewriter, generator, change=[0, 1, 2])
    running = asyncio.create_task(pipeline.run(TASK))
    await rewriter.asked.wait()
    for _ in range(20):  # the other clips had every chance to start
        await asyncio.sleep(0.01)
    assert [r.original_prompt for r in rewriter.requests] == [PROMPTS[0]]  # only the lead, so far
    rewriter.gate.set()
    await running

    lead_look = f"night, blue light over {PROMPTS[0]}"
    assert [(r.original_prompt, r.shared_style) for r in rewriter.requests] == [
        (PROMPTS[0], None), *sorted((p, lead_look) for p in PROMPTS[1:])]
    assert sorted(generator.prompts) == sorted(f"{p}, {lead_look}" for p in PROMPTS)
    assert not status.named("fail") and status.named("queue_composition")
    # The look is kept in each clip's rewrite checkpoint (the lead's, for a retry; the others', the same).
    rewrites = [s for s in status.named("record_step") if s["step"] == Step.REWRITE]
    assert len(rewrites) == 3 and all(s["checkpoint"]["style"] == lead_look for s in rewrites)


async def test_when_the_leads_rewrite_fails_no_other_clip_is_started(make_pipeline: PipelineFactory) -> None:
    rewriter = LookRewriter(RewriteRejected(detail="the model returned an empty prompt"))
    generator = ScriptedGenerator()
    pipeline, status = make_pipeline(rewriter, generator, change=[0, 1, 2])

    await pipeline.run(TASK)

    assert [r.original_prompt for r in rewriter.requests] == [PROMPTS[0]]  # nothing paid for the others
    assert not generator.prompts and not status.named("record_step")
    [failed] = status.named("fail")
    assert failed["failed"] == (REGENERATION_ID,)  # the lead; the others are stopped with it
    assert failed["code"] == "rewrite_rejected" and failed["message"].startswith("Clip 1 failed: ")


async def test_a_retry_reuses_the_leads_rewrite_and_gives_the_others_its_checkpointed_look(
        make_pipeline: PipelineFactory, ffmpeg_exe: str, tmp_path: Path) -> None:
    from tests.fakes.prediction_server import render_sample_mp4

    lead_prompt, lead_look = f"{PROMPTS[0]}, golden dusk", "golden dusk, warm haze, long shadows"
    rewriter = LookRewriter()
    generator = ScriptedGenerator(sample=render_sample_mp4(tmp_path / "sample.mp4", ffmpeg=ffmpeg_exe))
    pipeline, status = make_pipeline(rewriter, generator, change=[0, 1, 2],
                                     checkpoints={"rewrite": {"prompt": lead_prompt, "style": lead_look}})

    await pipeline.run(TASK)

    assert sorted((r.original_prompt, r.shared_style) for r in rewriter.requests) == [
        (PROMPTS[1], lead_look), (PROMPTS[2], lead_look)]  # the lead's rewrite was not paid again
    assert sorted(generator.prompts) == sorted([lead_prompt, *(f"{p}, {lead_look}" for p in PROMPTS[1:])])
    assert not status.named("fail")
