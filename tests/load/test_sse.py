"""Many watchers of one job on one gateway process: every one connects, every event reaches every
watcher in order, and the database work does not grow with the number of watchers."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.load.conftest import LoadClient, LoadRecord
from tests.load.rig import TOKEN, LoadRig, Worker, machine_busy_seconds, process_cpu_seconds

# (watchers, events, seconds between events): two events a second is how often ffmpeg reports
# progress while a composer encodes.
SCENARIOS = [
    pytest.param(50, 10, 0.1, id="50-watchers"),
    pytest.param(1000, 30, 0.5, id="1000-watchers", marks=pytest.mark.load_slow),
]


async def _make_events(rig: LoadRig, job: tuple[str, str, str], count: int, interval: float) -> tuple[int, int]:
    """``count`` progress events, one every ``interval`` seconds; their first and last sequences."""
    sequences = []
    async with Worker(rig.status_addr) as worker:
        for index in range(count):
            sequences.append(await worker.progress(*job, fraction=(index + 1) / count))
            await asyncio.sleep(interval)
    return sequences[0], sequences[-1]


async def _composing_job(rig: LoadRig) -> tuple[str, str, str]:
    async with Worker(rig.status_addr) as worker:
        return await worker.composing_job()


@pytest.mark.parametrize(("watchers", "events", "interval"), SCENARIOS)
def test_every_watcher_gets_every_event_in_order(load_rig: LoadRig, load: LoadRecord, clients: list[LoadClient],
                                                 watchers: int, events: int, interval: float) -> None:
    job = asyncio.run(_composing_job(load_rig))
    client = LoadClient("sse", url=load_rig.url, token=TOKEN, job_id=job[0], watchers=watchers)
    clients.append(client)
    connected = client.read()
    assert connected["statuses"] == {"200": watchers}, "every watcher gets its stream (no 429, no 503)"

    before, cpu_before, started = load_rig.transactions(), load_rig.cpu_seconds(), time.monotonic()
    busy_before, client_before = machine_busy_seconds(), process_cpu_seconds(client.proc.pid)
    first, last = asyncio.run(_make_events(load_rig, job, events, interval))
    seconds, transactions = time.monotonic() - started, load_rig.transactions() - before
    cpu = {name: used - cpu_before[name] for name, used in load_rig.cpu_seconds().items()}
    # What the rest of the machine kept busy meanwhile (PostgreSQL, this test making the events, other
    # work): latencies taken while it was high are the machine's, not the gateway's.
    client_cpu = process_cpu_seconds(client.proc.pid) - client_before
    others = max(machine_busy_seconds() - busy_before - sum(cpu.values()) - client_cpu, 0.0) / seconds
    client.say(f"{first} {last}")
    result = client.read()
    load.add(watchers=f"{result['statuses'].get('200', 0)}/{watchers}", events=last, events_per_s=events / seconds,
             complete=result["complete"], p50_ms=result["p50_ms"], p99_ms=result["p99_ms"],
             max_ms=result["max_ms"], db_xact_per_s=transactions / seconds,
             db_xact_per_event=transactions / events, connect_s=result["connect_seconds"],
             gateway_cpu_ms_per_event=1000 * cpu["gateway"] / events,
             status_cpu_ms_per_event=1000 * cpu["status"] / events, other_busy_cores=others)

    assert result["dropped"] == 0, "no watcher was dropped as too slow"
    assert result["out_of_order"] == 0
    assert result["missing_max"] == 0, "every watcher got every event"
    assert result["complete"] == watchers, "every watcher got events 1 to last, each once and in order"
