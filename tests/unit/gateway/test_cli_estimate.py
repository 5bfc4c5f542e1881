"""``clipchat estimate JOB CLIPS``: each clip's steps and the budget left; mistakes are one line."""

from __future__ import annotations

import asyncio

from clipchat.storage.local import LocalStorage
from gateway.app import create_app
from launcher.cli import estimate_lines
from tests.unit.gateway.gateway_rig import Backend, SettingsFactory, make_job, served
from tests.unit.gateway.test_cli_reports import _clipchat


async def test_estimate_prints_each_clips_steps_and_the_budget_left(
        make_settings: SettingsFactory, storage: LocalStorage, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice", clips=3, total_cost="8.5000"))
    async with served(create_app(make_settings(), storage=storage)) as url:
        # The CLI processes run at once (each spends seconds starting).
        several, one, past, not_a_list = await asyncio.gather(
            _clipchat(url, "estimate", job.job_id, "2,0"),
            _clipchat(url, "estimate", job.job_id, "1"),
            _clipchat(url, "estimate", job.job_id, "3"),
            _clipchat(url, "estimate", job.job_id, "1,x"))

    code, out, err = several
    assert code == 0, err
    assert out.splitlines() == [
        "clip     rewrite   generate    compose",
        "0             $0      $0.45      $0.05",
        "2             $0      $0.45          -",
        "",
        "estimated $0.95, budget left $1.5000",
        "warning: this change would take the job near its budget"]
    code, out, err = one
    assert code == 0 and "estimated $0.50, budget left $1.5000" in out.splitlines(), err
    # Clips are numbered from 0 as in `clipchat regenerate`: clip 3 of three is past the last.
    for code, out, err in (past, not_a_list):
        assert code != 0 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "out of range" in past[2] and 'a list such as "1,2,3"' in not_a_list[2]


def test_a_change_over_the_budget_says_it_would_be_refused() -> None:
    lines = estimate_lines({"estimated_cost": "2.0000", "budget_left": "0.1000", "within_budget": False,
                            "budget_warning": True,
                            "clips": [{"clip_index": 4, "step_costs": {"rewrite": "0.0100", "generate": "1.9000",
                                                                        "compose": "0.0900"}}]})
    assert lines[1] == "4        $0.0100    $1.9000    $0.0900"
    assert lines[-1] == "over budget: this change would be refused"
