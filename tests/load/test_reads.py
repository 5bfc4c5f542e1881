"""``GET /api/v1/jobs/{id}`` on PostgreSQL through one gateway worker, on keep-alive connections."""

from __future__ import annotations

import asyncio
import os
import resource
import time
from pathlib import Path

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


def _machine_busy_seconds() -> float:
    """CPU seconds every core of this machine has spent busy so far (Linux ``/proc/stat``)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _reaped_children_cpu_seconds() -> float:
    """CPU seconds this process's finished (and waited for) children have used so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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
    before, cpu_before, busy_before = load_rig.transactions(), load_rig.cpu_seconds(), _machine_busy_seconds()
    reaped_before, started = _reaped_children_cpu_seconds(), time.monotonic()
    client = LoadClient("get", url=load_rig.url, token=TOKEN, path=path, connections=connections,
                        requests=requests, seconds=seconds)
    clients.append(client)
    result = client.read()
    client.proc.wait(30)  # it exits after its answer; once reaped, its CPU time is counted below
    client_cpu = _reaped_children_cpu_seconds() - reaped_before
    busy, elapsed = _machine_busy_seconds() - busy_before, time.monotonic() - started
    transactions = load_rig.transactions() - before
    cpu = {name: used - cpu_before[name] for name, used in load_rig.cpu_seconds().items()}
    done = result["requests"]
    # What the rest of the machine kept busy meanwhile (PostgreSQL, other work): figures taken while
    # it was high are the machine's, not the services'.
    others = max(busy - sum(cpu.values()) - client_cpu, 0.0) / elapsed
    load.add(connections=connections, requests=done, rps=result["rps"], p50_ms=result["p50_ms"],
             p99_ms=result["p99_ms"], db_xact_per_request=transactions / max(done, 1),
             gateway_cpu_ms_per_request=1000 * cpu["gateway"] / max(done, 1),
             status_cpu_ms_per_request=1000 * cpu["status"] / max(done, 1), other_busy_cores=others)

    assert done > 0
    assert result["statuses"] == {"200": done}, "every read answered 200 (no 5xx, no 429)"
