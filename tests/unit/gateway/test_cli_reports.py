"""``clipchat compare`` and ``clipchat usage`` against the gateway: readable tables, one-line errors."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from clipchat.storage.local import LocalStorage
from gateway.app import create_app
from tests.unit.gateway.gateway_rig import ALICE, Backend, SettingsFactory, make_job, served


async def _clipchat(url: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "CLIPCHAT_API_URL": url, "CLIPCHAT_API_TOKEN": ALICE}
    cli = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("clipchat")), *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        out, err = await cli.communicate()
    assert cli.returncode is not None
    return cli.returncode, out.decode(), err.decode()


async def test_compare_and_usage_print_tables_and_errors_are_one_line(
        make_settings: SettingsFactory, storage: LocalStorage, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice", total_cost="8.5000"))
    backend.status.add_job(make_job("alice", total_cost="1.5000"))
    async with served(create_app(make_settings(), storage=storage)) as url:
        # Six reads of the same jobs: the CLI processes run at once (each spends seconds starting).
        compared, one, everything, same, missing, not_a_number = await asyncio.gather(
            _clipchat(url, "compare", job.job_id, "1", "2"),
            _clipchat(url, "usage", job.job_id),
            _clipchat(url, "usage"),
            _clipchat(url, "compare", job.job_id, "2", "2"),
            _clipchat(url, "compare", job.job_id, "1", "9"),
            _clipchat(url, "compare", job.job_id, "1", "two"))

    code, out, err = compared
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "version 1 -> 2: 1 clip(s) differ, 1 change(s), cost $0.5000"
    assert any(line.startswith("0     0 -> 1") and line.endswith("before: the first prompt") for line in lines)
    assert any(line.strip() == "after:  prompt 0" for line in lines)
    assert any(line.startswith("r-1") and "completed" in line and "$0.5000" in line and "v2" in line
               and line.endswith("make it nighttime") for line in lines)

    code, out, err = one
    assert code == 0, err
    assert out.splitlines()[0] == f"usage of job {job.job_id}: total $8.5000"
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:] if line.strip()}
    assert (rows["rewrite"], rows["generate"], rows["compose"]) == (["$0"], ["$4.2500"], ["$4.2500"])
    assert rows["generating"] == ["4.5s", "2"]

    code, out, err = everything
    assert code == 0 and out.splitlines()[0] == "usage of your 2 job(s): total $10.0000", err

    for code, out, err in (same, missing, not_a_number):
        assert code != 0 and out == ""
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "different versions" in same[2] and "version 9" in missing[2]
