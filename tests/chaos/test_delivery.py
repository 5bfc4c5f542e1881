"""Messages delivered more than once: a duplicate while the first delivery runs, and a poison
message that fails on every attempt."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable

import httpx
import pytest

from tests.chaos.conftest import ChaosRecord
from tests.chaos.faults import wait_for
from tests.chaos.rig import REGENERATE_QUEUE, ChaosRig, duplicate_regenerate_message
from tests.chaos.scenario import (
    assert_completed_once,
    finish,
    lost,
    new_job,
    start_regeneration,
    wait_generating,
)
from tests.chaos.trace import Traced
from tests.e2e.rig import money

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.s3, pytest.mark.ffmpeg,
              pytest.mark.timeout(600)]

DELIVERY_LIMIT = 5  # the product's default ``delivery_limit``, which the rig keeps
SETTLE_SECONDS = 3.0  # let a duplicate's handler act before the first delivery is let finish
DEAD_LETTERED_WITHIN = 240.0
DEAD_LETTER_LAG = 30.0  # the job's failure and the dead-lettering are not one transaction
GROWTH_TOLERANCE = 0.25  # seconds of scheduling noise allowed between two equal waits


def test_the_same_message_delivered_twice_at_once(rig: ChaosRig, client: httpx.Client, chaos: ChaosRecord) -> None:
    job, original = new_job(rig, client)
    rig.start_replica("regenerator")  # a second worker, free to take the duplicate at once
    spend = rig.spend()
    rig.hold_generation()
    rid = start_regeneration(client, job["id"])
    wait_generating(rig, spend)

    duplicate_regenerate_message(rig, job["id"], rid)
    wait_for(lambda: len(rig.deliveries(REGENERATE_QUEUE, rid)) >= 2,
             "the duplicate to be delivered while the first delivery runs", limit=60)
    time.sleep(SETTLE_SECONDS)
    rig.release_generation()
    outcome = finish(rig, client, job["id"], rid, original)
    time.sleep(SETTLE_SECONDS)  # a duplicate that came back later has had its turn too

    chaos.recovery_s = None
    chaos.lost = lost(outcome, original, versions=[1, 2])
    chaos.paid_twice = spend.paid_twice(predictions=1)
    creates = spend.new_creates()
    assert len(creates) == 1, f"{len(creates)} generation calls: {[c.idempotency_key for c in creates]}"
    assert_completed_once(rig, outcome, original, money(job["total_cost"]))
    assert chaos.paid_twice == 0, spend.describe()


def _eventually(probe: Callable[[], bool], *, within: float) -> bool:
    """Whether ``probe`` turns true within ``within`` seconds."""
    deadline = time.monotonic() + within
    while not probe():
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
    return True


def waits_between_attempts(deliveries: list[Traced], publishes: list[Traced]) -> list[float]:
    """For each attempt after the first, how long the message waited before it: from the end of
    the attempt before (the message published again, to wait) to the next delivery; from the
    delivery before when nothing was published in between."""
    waits = []
    for before, after in itertools.pairwise(deliveries):
        scheduled = [p.at for p in publishes if before.at < p.at < after.at]
        waits.append(after.at - max(scheduled, default=before.at))
    return waits


@pytest.mark.chaos_slow
def test_a_poison_message_is_dead_lettered_after_the_limit(rig: ChaosRig, client: httpx.Client,
                                                           chaos: ChaosRecord) -> None:
    job, original = new_job(rig, client)
    spend = rig.spend()
    # Every upload of the new clip fails (storage answers 503): each attempt fails the same way.
    rig.base.s3.fail("PUT", f"/jobs/{uuid.UUID(job['id']).hex}/clips/")
    rid = start_regeneration(client, job["id"])

    failed = finish(rig, client, job["id"], rid, original, limit=DEAD_LETTERED_WITHIN)
    dead_lettered = _eventually(lambda: rig.dead_lettered(rid), within=DEAD_LETTER_LAG)
    deliveries = rig.deliveries(REGENERATE_QUEUE, rid)
    work_queue = rig.queue(REGENERATE_QUEUE)  # and its delay queues, named after it
    republished = [p for p in rig.trace.records("publish") if p.mentions(rid) and p.at > deliveries[0].at
                   and any(key.startswith(work_queue) for key in p.routing_keys)]
    waits = waits_between_attempts(deliveries, republished)
    poison_paid = spend.paid_twice(predictions=1)

    rig.base.s3.clear()  # the storage is healthy again: a retry through the API works
    retry = start_regeneration(client, job["id"])
    outcome = finish(rig, client, job["id"], retry, original)

    chaos.recovery_s = None
    chaos.lost = lost(outcome, original, versions=[1, 2])
    chaos.paid_twice = poison_paid
    assert dead_lettered, (f"not in the dead-letter queue; the regeneration ended {failed.row['status']} "
                           f"({failed.row['error']}) after {len(deliveries)} deliveries")
    assert len(deliveries) == DELIVERY_LIMIT, f"{len(deliveries)} deliveries, limit {DELIVERY_LIMIT}"
    assert all(w > 0.2 for w in waits), f"an attempt came back at once: waits {waits}"
    assert all(b >= a - GROWTH_TOLERANCE for a, b in itertools.pairwise(waits)) and waits[-1] > waits[0], (
        f"the waits between attempts do not grow: {[round(w, 2) for w in waits]}")
    assert failed.row["status"] == "failed" and failed.row["error"]["retryable"] is True, failed.row
    assert failed.job["current_version"] == 1 and failed.versions == [1]
    assert outcome.row["status"] == "completed", outcome.row
    assert outcome.versions == [1, 2] and original.intact()
    assert poison_paid == 0, f"the poison message's attempts paid {spend.new_predictions_paid()} predictions"
