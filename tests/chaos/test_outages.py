"""Dependencies that go away for a while: RabbitMQ, PostgreSQL, the status service.

Nothing is restarted to recover (except the status service itself, which is what is down): the
services must ride the outage out, keep or refuse work honestly meanwhile (503 ``unavailable``,
retryable — never a 500), and finish the work once the dependency is back, paying once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.chaos.conftest import ChaosRecord
from tests.chaos.faults import kill9, postgres_stopped, rabbitmq_stopped
from tests.chaos.rig import SERVICES, ChaosRig
from tests.chaos.scenario import (
    assert_completed_once,
    finish,
    lost,
    new_job,
    start_regeneration,
    wait_generating,
)
from tests.e2e.rig import money, regeneration

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.s3, pytest.mark.ffmpeg,
              pytest.mark.chaos_slow, pytest.mark.timeout(600)]

RABBITMQ_DOWN_SECONDS = 10.0
POSTGRES_DOWN_SECONDS = 20.0
STATUS_DOWN_SECONDS = 15.0
RELEASE_AFTER = 5.0  # seconds into an outage when the held generation finishes
BROKER_DOWN_AT_REQUEST_SECONDS = 8.0
CALL_EVERY = 0.5


@dataclass
class Answer:
    what: str
    status: int
    body: Any
    retry_after: str | None


def call_api(client: httpx.Client, job_id: str) -> list[Answer]:
    """One round of the API calls a page makes about a job (reads, and a regenerate that conflicts
    with the running one)."""
    calls: list[tuple[str, Callable[[], httpx.Response]]] = [
        ("GET /jobs", lambda: client.get("/api/v1/jobs")),
        ("GET /jobs/{id}", lambda: client.get(f"/api/v1/jobs/{job_id}")),
        ("GET /jobs/{id}/clips", lambda: client.get(f"/api/v1/jobs/{job_id}/clips")),
        ("GET /jobs/{id}/regenerations", lambda: client.get(f"/api/v1/jobs/{job_id}/regenerations")),
        ("GET /jobs/{id}/versions", lambda: client.get(f"/api/v1/jobs/{job_id}/versions")),
        ("POST /jobs/{id}/clips/2/regenerate",
         lambda: client.post(f"/api/v1/jobs/{job_id}/clips/2/regenerate", json={"instruction": "make it snowy"})),
    ]
    answers = []
    for what, send in calls:
        try:
            response = send()
        except httpx.HTTPError as exc:
            answers.append(Answer(what, 0, repr(exc), None))
            continue
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text[:200]
        answers.append(Answer(what, response.status_code, body, response.headers.get("retry-after")))
    return answers


def keep_calling(client: httpx.Client, job_id: str, seconds: float, *,
                 at: tuple[float, Callable[[], None]] | None = None) -> list[Answer]:
    """Call the API every ``CALL_EVERY`` seconds for ``seconds``; ``at`` = (delay, action) runs an
    action once on the way (e.g. release the generation)."""
    answers: list[Answer] = []
    began = time.monotonic()
    pending = at
    while time.monotonic() - began < seconds:
        answers.extend(call_api(client, job_id))
        if pending is not None and time.monotonic() - began >= pending[0]:
            pending[1]()
            pending = None
        time.sleep(CALL_EVERY)
    if pending is not None:
        pending[1]()
    return answers


def is_unavailable(answer: Answer) -> bool:
    error = answer.body.get("error") if isinstance(answer.body, dict) else None
    return (answer.status == 503 and isinstance(error, dict) and error.get("code") == "unavailable"
            and error.get("retryable") is True and bool(error.get("message")))


def test_rabbitmq_stopped_and_started_mid_job(rig: ChaosRig, client: httpx.Client, chaos: ChaosRecord) -> None:
    job, original = new_job(rig, client)
    spend = rig.spend()
    rig.hold_generation()
    rid = start_regeneration(client, job["id"])
    wait_generating(rig, spend)

    with rabbitmq_stopped(rig.rabbitmq) as outage:
        # The generation ends while the broker is down: the hand-over to the composer must wait.
        answers = keep_calling(client, job["id"], RABBITMQ_DOWN_SECONDS, at=(RELEASE_AFTER, rig.release_generation))
    rig.renew_trace()
    outcome = finish(rig, client, job["id"], rid, original)

    assert outage.ended is not None
    chaos.recovery_s = outcome.finished_at - outage.ended
    chaos.lost = lost(outcome, original, versions=[1, 2])
    chaos.paid_twice = spend.paid_twice(predictions=1)
    paid = spend.describe()
    failed = [(a.what, a.status) for a in answers if a.what.startswith("GET") and a.status != 200]
    assert failed == [], f"the API stopped answering while RabbitMQ was down: {failed[:10]}"
    assert_completed_once(rig, outcome, original, money(job["total_cost"]))
    # Consumers and publishers reconnected: a new regeneration goes all the way through.
    again = start_regeneration(client, job["id"], clip_index=2)
    after = finish(rig, client, job["id"], again, original)
    assert after.row["status"] == "completed", after.row
    assert after.versions == [1, 2, 3]
    assert chaos.paid_twice == 0, paid


def test_postgres_stopped_20s_during_a_regeneration(rig: ChaosRig, client: httpx.Client,
                                                    chaos: ChaosRecord) -> None:
    job, original = new_job(rig, client)
    spend = rig.spend()
    pids = {service: rig.pid(service) for service in SERVICES}
    rig.hold_generation()
    rid = start_regeneration(client, job["id"])
    wait_generating(rig, spend)

    with postgres_stopped(rig.postgres) as outage:
        answers = keep_calling(client, job["id"], POSTGRES_DOWN_SECONDS, at=(RELEASE_AFTER, rig.release_generation))
    outcome = finish(rig, client, job["id"], rid, original)

    assert outage.ended is not None
    chaos.recovery_s = outcome.finished_at - outage.ended
    chaos.lost = lost(outcome, original, versions=[1, 2])
    chaos.paid_twice = spend.paid_twice(predictions=1)
    server_errors = [(a.what, a.status, a.body) for a in answers if a.status >= 500 and a.status != 503]
    assert server_errors == [], f"{len(server_errors)} answers were server errors: {server_errors[:3]}"
    wrong = [(a.what, a.status, a.body) for a in answers if not is_unavailable(a)]
    assert wrong == [], (f"{len(wrong)} of {len(answers)} answers were not 503 unavailable/retryable: "
                         f"{wrong[:3]}")
    assert all(a.retry_after for a in answers), "a 503 without Retry-After"
    assert {s: rig.pid(s) for s in SERVICES} == pids and all(rig.proc(s).poll() is None for s in SERVICES), (
        "a service was restarted or died")
    assert_completed_once(rig, outcome, original, money(job["total_cost"]))
    assert chaos.paid_twice == 0, spend.describe()


def test_broker_unreachable_when_a_regeneration_is_requested(rig: ChaosRig, client: httpx.Client,
                                                             chaos: ChaosRecord) -> None:
    job, original = new_job(rig, client)
    spend = rig.spend()

    with rabbitmq_stopped(rig.rabbitmq) as outage:
        response = client.post(f"/api/v1/jobs/{job['id']}/clips/1/regenerate",
                               json={"instruction": "make it nighttime"})
        assert response.status_code == 202, f"{response.status_code}: {response.text}"
        rid = response.json()["regeneration_id"]
        time.sleep(BROKER_DOWN_AT_REQUEST_SECONDS)
        waiting = regeneration(client, job["id"], rid)
        created_while_down = list(spend.new_creates())
    rig.renew_trace()
    outcome = finish(rig, client, job["id"], rid, original)

    assert outage.ended is not None
    chaos.recovery_s = outcome.finished_at - outage.ended
    chaos.lost = lost(outcome, original, versions=[1, 2])
    chaos.paid_twice = spend.paid_twice(predictions=1)
    assert waiting["status"] == "queued", f"while the broker was down the regeneration was {waiting['status']}"
    assert created_while_down == [], "work started with no broker to hand it over"
    assert_completed_once(rig, outcome, original, money(job["total_cost"]))
    assert chaos.paid_twice == 0, spend.describe()


def test_status_service_down_15s_during_a_generation(rig: ChaosRig, client: httpx.Client,
                                                     chaos: ChaosRecord) -> None:
    job, original = new_job(rig, client)
    spend = rig.spend()
    worker = rig.pid("regenerator")
    rig.hold_generation()
    rid = start_regeneration(client, job["id"])
    prediction = wait_generating(rig, spend)

    kill9(rig.proc("status"))
    down_at = time.monotonic()
    try:
        time.sleep(RELEASE_AFTER)
        rig.release_generation()  # the generation finishes while the status service is down
        time.sleep(max(0.0, STATUS_DOWN_SECONDS - (time.monotonic() - down_at)))
    finally:
        rig.start("status")
    back_at = time.monotonic()
    outcome = finish(rig, client, job["id"], rid, original)

    chaos.recovery_s = outcome.finished_at - back_at
    chaos.lost = lost(outcome, original, versions=[1, 2])
    chaos.paid_twice = spend.paid_twice(predictions=1)
    creates = spend.new_creates()
    polled = {call.prediction_id for call in spend.new_polls()}
    assert rig.pid("regenerator") == worker and rig.proc("regenerator").poll() is None, "the worker died"
    assert len(creates) == 1 and polled == {prediction}, (
        f"the generation was restarted: {len(creates)} creates, predictions polled {sorted(polled)}")
    assert_completed_once(rig, outcome, original, money(job["total_cost"]))
    assert chaos.paid_twice == 0, spend.describe()
