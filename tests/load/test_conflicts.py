"""Bursts of concurrent regenerate POSTs on one job: one is accepted, the rest are conflicts.

The rate limit is far above the bursts here, so a 429 would mean the limiter, not the job, answered
for a request the owner was allowed to make.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.load.conftest import LoadClient, LoadRecord, run_client
from tests.load.rig import RATE_LIMIT_PER_MINUTE, TOKEN, LoadRig, Worker

SCENARIOS = [
    pytest.param(20, 3, id="20-posts-3-rounds"),
    pytest.param(50, 8, id="50-posts-8-rounds", marks=pytest.mark.load_slow),
]


async def _completed_job(rig: LoadRig) -> str:
    async with Worker(rig.status_addr) as worker:
        return await worker.completed_job()


@pytest.mark.parametrize(("size", "rounds"), SCENARIOS)
def test_burst_gets_one_202_and_409s(load_rig: LoadRig, load: LoadRecord, clients: list[LoadClient],
                                     size: int, rounds: int) -> None:
    assert (size + 1) * rounds < RATE_LIMIT_PER_MINUTE, "the bursts stay under the owner's rate limit"
    job_id = asyncio.run(_completed_job(load_rig))
    result = run_client(clients, "burst", url=load_rig.url, token=TOKEN, job_id=job_id, size=size, rounds=rounds)
    seen: dict[str, int] = {}
    for answers in result["rounds"]:
        for status, count in answers.items():
            seen[status] = seen.get(status, 0) + count
    load.add(posts=size * rounds, rounds=rounds, **{f"http_{s}": n for s, n in sorted(seen.items())})

    assert result["rounds"] == [{"202": 1, "409": size - 1}] * rounds, \
        "each burst: exactly one 202, the rest 409, none 5xx or 429, and the accepted one cancelled"
