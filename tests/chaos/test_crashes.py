"""Workers that die or are stopped in the middle of paid work.

A kill -9 takes the whole process group (the service and its ffmpeg children), as when a pod or a
node dies; the message it held must come back and the job complete exactly once, the original
video untouched until then, nothing paid twice. A SIGTERM (a rollout) must let the work in hand
finish: health NOT_SERVING first, then the encode done, acked, and exit 0.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.chaos.conftest import ChaosRecord
from tests.chaos.faults import ffmpeg_children, kill9, sigterm, wait_for
from tests.chaos.rig import COMPOSE_QUEUE, REGENERATE_QUEUE, ChaosRig, grpc_health
from tests.chaos.scenario import (
    assert_completed_once,
    finish,
    lost,
    new_job,
    start_regeneration,
    wait_generating,
)
from tests.e2e.rig import money

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.s3, pytest.mark.ffmpeg,
              pytest.mark.timeout(600)]

# A slower x264 preset makes each encode last long enough to land a signal in the middle of one.
SLOW_ENCODES = {"CLIPCHAT_X264_PRESET": "veryslow"}
ENCODE_STARTS_WITHIN = 180.0
GRACEFUL_EXIT_WITHIN = 300.0  # bounded wait for the graceful stop (the service's grace is 60 s by default)


def wait_encoding(rig: ChaosRig) -> None:
    """Until the composer runs an ffmpeg that encodes (mid-encode)."""
    wait_for(lambda: [p for p in ffmpeg_children(rig.pid("composer")) if p.is_encoding],
             "the composer to encode", limit=ENCODE_STARTS_WITHIN, interval=0.02)


def test_kill9_composer_mid_encode(rig: ChaosRig, client: httpx.Client, chaos: ChaosRecord) -> None:
    job, original = new_job(rig, client)
    rig.restart("composer", **SLOW_ENCODES)
    spend = rig.spend()
    rid = start_regeneration(client, job["id"])
    wait_encoding(rig)

    kill9(rig.proc("composer"))
    killed_at = time.monotonic()
    assert original.intact()
    rig.start("composer")  # a new replica takes the message back
    outcome = finish(rig, client, job["id"], rid, original)

    chaos.recovered(killed_at)
    chaos.lost = lost(outcome, original, versions=[1, 2])
    chaos.paid_twice = spend.paid_twice(predictions=1)
    assert_completed_once(rig, outcome, original, money(job["total_cost"]))
    assert len(rig.deliveries(COMPOSE_QUEUE, rid)) >= 2, "the compose message was not delivered again"
    assert chaos.paid_twice == 0, spend.describe()


def test_kill9_regenerator_mid_generation(rig: ChaosRig, client: httpx.Client, chaos: ChaosRecord) -> None:
    job, original = new_job(rig, client)
    spend = rig.spend()
    rig.hold_generation()
    rid = start_regeneration(client, job["id"])
    prediction = wait_generating(rig, spend)

    kill9(rig.proc("regenerator"))
    killed_at = time.monotonic()
    rig.start("regenerator")
    rig.release_generation()  # the prediction the dead worker started can now finish
    outcome = finish(rig, client, job["id"], rid, original)

    chaos.recovered(killed_at)
    chaos.lost = lost(outcome, original, versions=[1, 2])
    chaos.paid_twice = spend.paid_twice(predictions=1)
    assert_completed_once(rig, outcome, original, money(job["total_cost"]))
    assert len(rig.deliveries(REGENERATE_QUEUE, rid)) >= 2, "the regenerate message was not delivered again"
    assert spend.new_predictions_paid() == 1, (
        f"{spend.new_predictions_paid()} predictions paid; the first was {prediction}; "
        f"creates: {[c.idempotency_key for c in spend.new_creates()]}")
    assert chaos.paid_twice == 0, spend.describe()


class HealthWatch:
    """Polls a gRPC server's health on a thread, keeping each answer with its time."""

    def __init__(self, addr: str, every: float = 0.05) -> None:
        self.addr = addr
        self.every = every
        self.answers: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-watch", daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.answers.append((time.monotonic(), grpc_health(self.addr, timeout=0.5)))
            self._stop.wait(self.every)

    def since(self, moment: float) -> list[str]:
        return [status for at, status in self.answers if at >= moment]


def test_sigterm_composer_mid_encode(rig: ChaosRig, client: httpx.Client, chaos: ChaosRecord) -> None:
    job, original = new_job(rig, client)
    composer = rig.restart("composer", **SLOW_ENCODES)
    spend = rig.spend()
    rid = start_regeneration(client, job["id"])
    wait_encoding(rig)

    with HealthWatch(rig.addr("composer")) as health:
        signalled = time.monotonic()
        sigterm(composer)
        try:
            code = composer.wait(GRACEFUL_EXIT_WITHIN)
        except Exception:
            kill9(composer)
            raise
        exited = time.monotonic()
    at_exit = client.get(f"/api/v1/jobs/{job['id']}/regenerations").json()["regenerations"]
    row_at_exit = next(r for r in at_exit if r["id"] == rid)
    rig.start("composer")
    outcome = finish(rig, client, job["id"], rid, original)
    time.sleep(3)  # a message that was not acked would be delivered to the new composer by now

    chaos.recovered(signalled)
    chaos.lost = lost(outcome, original, versions=[1, 2])
    chaos.paid_twice = spend.paid_twice(predictions=1)
    answers = health.since(signalled)
    assert code == 0, f"the composer exited {code} after SIGTERM\n{rig.base.log_tail(lines=40)}"
    changed = [status for status in answers if status != "SERVING"]
    assert changed and changed[0] == "NOT_SERVING", (
        f"health did not turn NOT_SERVING first after SIGTERM: {changed[:5]} (exited after {exited - signalled:.1f} s)")
    assert row_at_exit["status"] == "completed", (
        f"the composer exited before finishing its encode: {row_at_exit['status']}/{row_at_exit['stage']}")
    assert len(rig.deliveries(COMPOSE_QUEUE, rid)) == 1, "the compose message was delivered again (not acked)"
    assert_completed_once(rig, outcome, original, money(job["total_cost"]))
    assert chaos.paid_twice == 0, spend.describe()
