"""``GET /api/v1/jobs/{id}`` on PostgreSQL through one gateway worker, on keep-alive connections."""

from __future__ import annotations

import asyncio

import pytest

from tests.load.conftest import LoadClient, LoadRecord, run_client
from tests.load.rig import TOKEN, LoadRig, Worker

SCENARIOS = [
    pytest.param(16, 300, id="300-requests"),
    pytest.param(16, 15000, id="15000-requests", marks=pytest.mark.load_slow),
]
WARM_UP_REQUESTS = 500


async def _completed_job(rig: LoadRig) -> str:
    async with Worker(rig.status_addr) as worker:
        return await worker.completed_job()


@pytest.mark.parametrize(("connections", "requests"), SCENARIOS)
def test_job_reads_all_answer(load_rig: LoadRig, load: LoadRecord, clients: list[LoadClient],
                              connections: int, requests: int) -> None:
    job_id = asyncio.run(_completed_job(load_rig))
    path = f"/api/v1/jobs/{job_id}"
    if requests >= WARM_UP_REQUESTS:  # connection pools filled, code paths warm
        run_client(clients, "get", url=load_rig.url, token=TOKEN, path=path, connections=connections,
                   requests=WARM_UP_REQUESTS)
    before, cpu_before = load_rig.transactions(), load_rig.cpu_seconds()
    result = run_client(clients, "get", url=load_rig.url, token=TOKEN, path=path, connections=connections,
                        requests=requests)
    transactions = load_rig.transactions() - before
    cpu = {name: used - cpu_before[name] for name, used in load_rig.cpu_seconds().items()}
    load.add(connections=connections, requests=result["requests"], rps=result["rps"], p50_ms=result["p50_ms"],
             p99_ms=result["p99_ms"], db_xact_per_request=transactions / requests,
             gateway_cpu_ms_per_request=1000 * cpu["gateway"] / requests,
             status_cpu_ms_per_request=1000 * cpu["status"] / requests)

    assert result["statuses"] == {"200": requests}, "every read answered 200 (no 5xx, no 429)"
