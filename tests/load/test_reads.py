"""``GET /api/v1/jobs/{id}`` on PostgreSQL through one gateway worker, on keep-alive connections."""

from __future__ import annotations

import asyncio

import pytest

from tests.load.conftest import LoadClient, LoadRecord, run_client
from tests.load.rig import TOKEN, LoadRig, Worker

# (connections, requests, the most seconds the run may take): the large run stops at whichever
# comes first, so a slow or busy machine still finishes within make load's bound.
SCENARIOS = [
    pytest.param(16, 300, 600, id="300-requests"),
    pytest.param(16, 30000, 30, id="30-seconds", marks=pytest.mark.load_slow),
]
WARM_UP_REQUESTS = 500
WARM_UP_SECONDS = 5


async def _completed_job(rig: LoadRig) -> str:
    async with Worker(rig.status_addr) as worker:
        return await worker.completed_job()


@pytest.mark.parametrize(("connections", "requests", "seconds"), SCENARIOS)
def test_job_reads_all_answer(load_rig: LoadRig, load: LoadRecord, clients: list[LoadClient],
                              connections: int, requests: int, seconds: float) -> None:
    job_id = asyncio.run(_completed_job(load_rig))
    path = f"/api/v1/jobs/{job_id}"
    if requests >= WARM_UP_REQUESTS:  # connection pools filled, code paths warm
        run_client(clients, "get", url=load_rig.url, token=TOKEN, path=path, connections=connections,
                   requests=WARM_UP_REQUESTS, seconds=WARM_UP_SECONDS)
    before, cpu_before = load_rig.transactions(), load_rig.cpu_seconds()
    result = run_client(clients, "get", url=load_rig.url, token=TOKEN, path=path, connections=connections,
                        requests=requests, seconds=seconds)
    transactions = load_rig.transactions() - before
    cpu = {name: used - cpu_before[name] for name, used in load_rig.cpu_seconds().items()}
    done = result["requests"]
    load.add(connections=connections, requests=done, rps=result["rps"], p50_ms=result["p50_ms"],
             p99_ms=result["p99_ms"], db_xact_per_request=transactions / max(done, 1),
             gateway_cpu_ms_per_request=1000 * cpu["gateway"] / max(done, 1),
             status_cpu_ms_per_request=1000 * cpu["status"] / max(done, 1))

    assert done > 0
    assert result["statuses"] == {"200": done}, "every read answered 200 (no 5xx, no 429)"
