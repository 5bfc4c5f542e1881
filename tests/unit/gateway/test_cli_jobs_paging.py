"""``clipchat jobs`` lists every job, following the gateway's pages to the last one."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from clipchat.storage.local import LocalStorage
from gateway.app import create_app
from tests.unit.gateway.gateway_rig import ALICE, Backend, SettingsFactory, make_job, now_ts, served


async def test_clipchat_jobs_prints_every_page(make_settings: SettingsFactory, storage: LocalStorage,
                                               backend: Backend) -> None:
    ids = []
    for age in range(120):  # more than two pages of 50
        job = make_job("alice")
        job.created_at.CopyFrom(now_ts(-age))
        backend.status.add_job(job)
        ids.append(job.job_id)
    backend.status.add_job(make_job("bob"))
    async with served(create_app(make_settings(), storage=storage)) as url:
        env = {**os.environ, "CLIPCHAT_API_URL": url, "CLIPCHAT_API_TOKEN": ALICE}
        cli = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("clipchat")), "jobs", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(60):
            out, err = await cli.communicate()
    assert cli.returncode == 0, err.decode()
    printed = [line.split()[0] for line in out.decode().splitlines() if line.strip()]
    assert printed == ids  # newest first, each once, none of bob's
