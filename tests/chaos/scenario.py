"""Steps the fault scenarios share: a job to break, its original video, waiting for the outcome
while checking the original stays put, and what counts as lost."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.chaos.rig import ChaosRig, Spend
from tests.e2e.rig import (
    FINISHED,
    GENERATION_COST,
    composition_cost,
    create_job,
    current_version,
    get_job,
    money,
    regeneration,
)

TEMPLATE_INSTRUCTION = "make it nighttime"  # the templates know it: no LLM call
LLM_INSTRUCTION = "anime style, keep the same dancer"  # the LLM rewrites it
FINISH_WITHIN = 240.0  # seconds for a regeneration to end once the fault is over (a bounded wait)
CHECK_EVERY = 0.5


@dataclass
class Original:
    """The job's first version in storage: its key and the sha256 of its bytes."""

    rig: ChaosRig
    job_id: str
    key: str = ""
    sha: str | None = None

    def __post_init__(self) -> None:
        self.key = self.rig.version_key(self.job_id, 1)
        self.sha = self.rig.object_sha(self.key)
        assert self.sha is not None, f"version 1 of {self.job_id} is not in storage"

    def intact(self) -> bool:
        return self.rig.object_sha(self.key) == self.sha


@dataclass
class Outcome:
    """How a regeneration ended, and what was seen on the way."""

    row: dict[str, Any]
    job: dict[str, Any]
    finished_at: float
    problems: list[str] = field(default_factory=list)  # the original touched, a version too early…

    @property
    def versions(self) -> list[int]:
        return [v["version"] for v in self.job["versions"]]


def new_job(rig: ChaosRig, client: httpx.Client) -> tuple[dict[str, Any], Original]:
    """A composed three-clip job, and its original video."""
    job = create_job(rig.base, client)
    return job, Original(rig, job["id"])


def wait_generating(rig: ChaosRig, spend: Spend, *, polls: int = 2, limit: float = 120) -> str:
    """Wait until the prediction this step created has been polled ``polls`` times (the generation
    runs); its id."""
    def polled() -> str | None:
        ids = [call.prediction_id for call in spend.new_polls()]
        return ids[0] if len(ids) >= polls else None

    deadline = time.monotonic() + limit
    while (found := polled()) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"no generation started within {limit:.0f} s\n{rig.base.log_tail(lines=40)}")
        time.sleep(0.05)
    return found


def finish(rig: ChaosRig, client: httpx.Client, job_id: str, regeneration_id: str, original: Original, *,
           limit: float = FINISH_WITHIN) -> Outcome:
    """Wait until the regeneration has finished, checking all along that the original object is
    byte-identical and that the job shows no new version before the regeneration completed."""
    problems: list[str] = []
    deadline = time.monotonic() + limit
    while True:
        # The job first: once it shows a new version, the commit that made it is visible, so the
        # regeneration read after it must show completed (the other order races that commit).
        job = _job_or_none(client, job_id)
        row = _regeneration_or_none(client, job_id, regeneration_id)
        if job is not None and row is not None and row["status"] != "completed" and job["current_version"] != 1:
            problems.append(f"version {job['current_version']} became current before the regeneration completed")
        if not original.intact():
            problems.append("the original video's object changed or went missing")
        if row is not None and job is not None and row["status"] in FINISHED:
            return Outcome(row=row, job=get_job(client, job_id), finished_at=time.monotonic(),
                           problems=sorted(set(problems)))
        if time.monotonic() > deadline:
            pytest.fail(f"regeneration {regeneration_id} did not finish within {limit:.0f} s "
                        f"(last: {row and row['status']}/{row and row['stage']})\n"
                        f"{rig.base.log_tail(lines=60)}")
        time.sleep(CHECK_EVERY)


def _regeneration_or_none(client: httpx.Client, job_id: str, regeneration_id: str) -> dict[str, Any] | None:
    try:
        return regeneration(client, job_id, regeneration_id)
    except (AssertionError, httpx.HTTPError, StopIteration):  # the API may answer 503 while things recover
        return None


def _job_or_none(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    try:
        return get_job(client, job_id)
    except (AssertionError, httpx.HTTPError):
        return None


def lost(outcome: Outcome, original: Original, *, versions: list[int]) -> int:
    """Jobs or versions lost: the original touched, the expected versions not all there, the job
    not back in a settled state."""
    count = 0 if original.intact() else 1
    count += len(set(versions) - set(outcome.versions))
    count += 0 if outcome.job["status"] in ("completed", "failed") else 1
    return count


def assert_completed_once(rig: ChaosRig, outcome: Outcome, original: Original, initial_cost: Decimal) -> None:
    """The regeneration completed with exactly one new version, the original untouched throughout,
    each step's cost recorded once."""
    row, job = outcome.row, outcome.job
    assert row["status"] == "completed", (row, rig.base.log_tail(row["id"], lines=40))
    assert outcome.problems == []
    assert outcome.versions == [1, 2] and job["current_version"] == 2, job["versions"]
    assert current_version(job)["created_by_regeneration_id"] == row["id"]
    assert original.intact()
    assert money(row["step_costs"]["generation"]) == GENERATION_COST, row["step_costs"]
    assert money(row["step_costs"]["composition"]) == composition_cost(current_version(job)["duration"]), row
    assert money(job["total_cost"]) == initial_cost + money(row["cost"]), (job["total_cost"], row["cost"])


def start_regeneration(client: httpx.Client, job_id: str, clip_index: int = 1,
                       instruction: str = TEMPLATE_INSTRUCTION) -> str:
    """POST regenerate; asserts the 202 and returns the regeneration id."""
    response = client.post(f"/api/v1/jobs/{job_id}/clips/{clip_index}/regenerate", json={"instruction": instruction})
    assert response.status_code == 202, response.text
    return str(response.json()["regeneration_id"])
