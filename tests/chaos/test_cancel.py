"""Cancel a regeneration in each of its phases: queued, rewriting, generating, composing,
publishing.

Each phase is held open at the place it happens (a busy worker, a hanging LLM, a prediction that
keeps processing, a long encode, an upload held by the storage proxy), the regeneration is
cancelled through the API, and within 5 s the work must have stopped: the worker let go of the
message, no ffmpeg left, the remote prediction cancelled. After that no provider is called again,
the original video is current and byte-identical, and storage keeps no object that nothing names.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.chaos.conftest import ChaosRecord
from tests.chaos.faults import ffmpeg_children, wait_for
from tests.chaos.rig import COMPOSE_QUEUE, REGENERATE_QUEUE, ChaosRig, Spend
from tests.chaos.scenario import (
    LLM_INSTRUCTION,
    Original,
    finish,
    new_job,
    start_regeneration,
    wait_generating,
)
from tests.e2e.rig import get_job, regeneration

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.s3, pytest.mark.ffmpeg,
              pytest.mark.timeout(600)]

STOP_WITHIN = 5.0  # the promise: a cancelled regeneration has stopped within 5 s
QUIET_AFTER = 12.0  # then nothing may call a provider again (long enough for any retry to show)
SETTLE_SECONDS = 3.0
ORPHANS_GONE_WITHIN = 30.0  # cleanup of what stopped work wrote (a bounded wait, not a promise)
PHASE_REACHED_WITHIN = 180.0
SLOW_ENCODES = {"CLIPCHAT_X264_PRESET": "veryslow"}
VERSIONS = "/versions/"


@dataclass
class Held:
    """A regeneration held in a phase: what must be true once it has stopped (each by name), and
    what to undo."""

    regeneration_id: str
    stopped: dict[str, Callable[[], bool]]
    release: Callable[[], None] = lambda: None
    predictions: int = 0  # predictions the work is entitled to have paid (before the cancel)
    llm_answers: int = 0
    notes: dict[str, Any] = field(default_factory=dict)


def let_go(rig: ChaosRig, queue: str) -> dict[str, Callable[[], bool]]:
    """No worker holds a message of ``queue`` any more (acked or handed back)."""
    return {f"{queue} message let go": lambda: rig.held(queue) == 0}


def no_ffmpeg(rig: ChaosRig) -> dict[str, Callable[[], bool]]:
    return {"no ffmpeg running": lambda: not rig.ffmpeg()}


def hold_queued(rig: ChaosRig, client: httpx.Client, job: dict[str, Any], spend: Spend) -> Held:
    """Another job's generation keeps the only regenerator busy: this one waits in the queue."""
    blocker, blocker_original = new_job(rig, client)
    rig.hold_generation()
    blocker_rid = start_regeneration(client, blocker["id"])
    wait_generating(rig, spend)
    rid = start_regeneration(client, job["id"])
    time.sleep(1.0)
    row = regeneration(client, job["id"], rid)
    assert row["status"] == "queued", f"not held in the queue: {row['status']}/{row['stage']}"

    def release() -> None:
        rig.release_generation()
        finished = finish(rig, client, blocker["id"], blocker_rid, blocker_original)
        assert finished.row["status"] == "completed", finished.row

    return Held(rid, stopped={"cancelled": lambda: regeneration(client, job["id"], rid)["status"] == "cancelled"},
                release=release, predictions=1)


def hold_rewriting(rig: ChaosRig, client: httpx.Client, job: dict[str, Any], spend: Spend) -> Held:
    """The LLM does not answer (longer than the client's timeout, on every try)."""
    rig.base.llm.script(["timeout"] * 6)
    rid = start_regeneration(client, job["id"], instruction=LLM_INSTRUCTION)
    wait_for(spend.new_llm_calls, "the LLM to be asked", limit=PHASE_REACHED_WITHIN)
    return Held(rid, stopped=let_go(rig, REGENERATE_QUEUE), llm_answers=1)


def hold_generating(rig: ChaosRig, client: httpx.Client, job: dict[str, Any], spend: Spend) -> Held:
    """The prediction keeps processing."""
    rig.hold_generation()
    rid = start_regeneration(client, job["id"])
    prediction = wait_generating(rig, spend)
    return Held(rid, stopped={"prediction cancelled": lambda: prediction in spend.new_cancelled_ids(),
                              **let_go(rig, REGENERATE_QUEUE)},
                release=rig.release_generation, predictions=1)


def hold_composing(rig: ChaosRig, client: httpx.Client, job: dict[str, Any], spend: Spend) -> Held:
    """The composer encodes slowly; the cancel lands mid-encode."""
    rig.restart("composer", **SLOW_ENCODES)
    rid = start_regeneration(client, job["id"])
    wait_for(lambda: [p for p in ffmpeg_children(rig.pid("composer")) if p.is_encoding],
             "the composer to encode", limit=PHASE_REACHED_WITHIN, interval=0.02)
    return Held(rid, stopped={**no_ffmpeg(rig), **let_go(rig, COMPOSE_QUEUE)}, predictions=1)


def hold_publishing(rig: ChaosRig, client: httpx.Client, job: dict[str, Any], spend: Spend) -> Held:
    """The upload of the new version is in flight (held by the storage proxy)."""
    rig.base.s3.hold("PUT", VERSIONS)
    rid = start_regeneration(client, job["id"])
    wait_for(rig.base.s3.held, "the composer to upload the new version", limit=PHASE_REACHED_WITHIN)
    # The held upload goes through right after the cancel, as an upload already sent would:
    # the composer must not publish it, and must not leave it behind.
    return Held(rid, stopped={**no_ffmpeg(rig), **let_go(rig, COMPOSE_QUEUE)}, predictions=1,
                notes={"release_upload": True})


PHASES: dict[str, Callable[[ChaosRig, httpx.Client, dict[str, Any], Spend], Held]] = {
    "queued": hold_queued,
    "rewriting": hold_rewriting,
    "generating": hold_generating,
    "composing": hold_composing,
    "publishing": hold_publishing,
}


def first_times(checks: dict[str, Callable[[], bool]], *, within: float) -> dict[str, float | None]:
    """For each check, the seconds until it first held (a probe begun within ``within`` seconds
    counts), None if it never did."""
    began = time.monotonic()
    seen: dict[str, float | None] = dict.fromkeys(checks)
    while time.monotonic() - began <= within and None in seen.values():
        for name, check in checks.items():
            if seen[name] is None and check():
                seen[name] = time.monotonic() - began
        time.sleep(0.1)
    return seen


def wait_no_orphans(rig: ChaosRig, job_id: str) -> set[str]:
    """The orphan objects left once cleanup had ``ORPHANS_GONE_WITHIN`` seconds."""
    deadline = time.monotonic() + ORPHANS_GONE_WITHIN
    while (orphans := rig.orphans(job_id)) and time.monotonic() < deadline:
        time.sleep(1.0)
    return orphans


@pytest.mark.chaos_slow
@pytest.mark.parametrize("phase", list(PHASES))
def test_cancel_in_each_phase(phase: str, rig: ChaosRig, client: httpx.Client, chaos: ChaosRecord) -> None:
    job, original = new_job(rig, client)
    before = rig.job_objects(job["id"])
    spend = rig.spend()
    held = PHASES[phase](rig, client, job, spend)

    in_hand = [name for name, check in held.stopped.items() if name.endswith("let go") and check()]
    assert in_hand == [], f"{phase}: no worker held the message before the cancel ({in_hand})"

    cancelled_at = time.monotonic()
    response = client.post(f"/api/v1/jobs/{job['id']}/regenerations/{held.regeneration_id}/cancel")
    if held.notes.get("release_upload"):
        rig.base.s3.release()
    stop_times = first_times(held.stopped, within=STOP_WITHIN)
    stopped_after = None if None in stop_times.values() else max(t for t in stop_times.values() if t is not None)
    ffmpeg_left = [" ".join(p.argv[:3]) for p in rig.ffmpeg()]
    quiet_until = cancelled_at + STOP_WITHIN
    time.sleep(max(0.0, cancelled_at + QUIET_AFTER - time.monotonic()))
    held.release()  # a queued message reaches a worker only now
    time.sleep(SETTLE_SECONDS)
    late_calls = ([round(c.at - cancelled_at, 1) for c in spend.new_llm_calls() if c.at > quiet_until]
                  + [round(c.at - cancelled_at, 1) for c in spend.new_creates() if c.at > quiet_until])
    orphans = wait_no_orphans(rig, job["id"])
    row = regeneration(client, job["id"], held.regeneration_id)
    after = get_job(client, job["id"])

    chaos.recovery_s = stopped_after
    chaos.lost = (0 if original.intact() else 1) + (0 if after["current_version"] == 1 else 1)
    chaos.paid_twice = spend.paid_twice(predictions=held.predictions, llm_answers=held.llm_answers)
    assert response.status_code == 200 and response.json()["status"] == "cancelled", response.text
    assert stopped_after is not None, (
        f"{phase}: the work had not stopped {STOP_WITHIN:.0f} s after the cancel: "
        + ", ".join(f"{name}: {'no' if t is None else f'after {t:.1f} s'}" for name, t in stop_times.items()))
    assert ffmpeg_left == [], f"{phase}: ffmpeg still running {STOP_WITHIN:.0f} s after the cancel: {ffmpeg_left}"
    assert late_calls == [], f"{phase}: providers called again {late_calls} s after the cancel"
    assert_original_kept(after, row, original)
    assert orphans == set(), f"{phase}: objects nothing names: {sorted(orphans - before)}"
    assert chaos.paid_twice == 0, spend.describe()


def assert_original_kept(job: dict[str, Any], row: dict[str, Any], original: Original) -> None:
    assert row["status"] == "cancelled", row
    assert job["status"] == "completed" and job["active_regeneration_id"] is None, job["status"]
    assert job["current_version"] == 1 and [v["version"] for v in job["versions"]] == [1]
    assert original.intact(), "the original video's object changed"


def test_orphans_are_found(rig: ChaosRig, client: httpx.Client) -> None:
    """The orphan check itself: an object under the job's prefix that no row names is one."""
    job, _ = new_job(rig, client)
    assert rig.orphans(job["id"]) == set()
    stray = f"jobs/{uuid.UUID(job['id']).hex}/versions/{uuid.uuid4().hex}.mp4"
    rig.s3().put_object(Bucket=rig.bucket, Key=stray, Body=b"not a video")
    assert rig.orphans(job["id"]) == {stray}
