"""``LeaseKeeper.progress``: reports waiting while the status service is slow are coalesced per clip
and stage, so one clip's report never replaces another clip's and each clip's stages stay in order."""

from __future__ import annotations

import asyncio
from typing import Any

from clipchat.lease import LeaseKeeper


class SlowStatus:
    """Records each progress report; the first one waits until ``release`` is set."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, float]] = []  # (regeneration id, stage, fraction)
        self.first = asyncio.Event()
        self.release = asyncio.Event()

    async def progress(self, job_id: str, token: str, stage: str, fraction: float, *, message: str = "",
                       eta_seconds: float = 0.0, claim_id: str = "", regeneration_id: str = "") -> None:
        if not self.sent:
            self.first.set()
            await self.release.wait()
        self.sent.append((regeneration_id, stage, fraction))

    async def renew(self, *args: Any, **kwargs: Any) -> None:
        return None


async def test_waiting_reports_are_coalesced_per_clip_and_stage() -> None:
    status = SlowStatus()
    async with LeaseKeeper(status, "job", "token", interval=3600) as keeper:  # type: ignore[arg-type]
        await keeper.progress("rewriting", 0.0)
        await status.first.wait()  # the sender is busy with it; the next reports wait
        for clip, stage, fraction in [("a", "rewriting", 0.02), ("a", "generating", 0.1), ("b", "generating", 0.1),
                                      ("", "generating", 0.1), ("a", "generating", 0.3), ("b", "generating", 0.2),
                                      ("", "generating", 0.25), ("a", "generating", 0.5)]:
            await keeper.progress(stage, fraction, regeneration_id=clip)
        status.release.set()
        await keeper.flush()
    assert status.sent == [
        ("", "rewriting", 0.0),
        ("a", "rewriting", 0.02),  # clip a's earlier stage is still sent, before its later one
        ("a", "generating", 0.5),  # the newest of clip a's generating reports replaced the older
        ("b", "generating", 0.2),  # clip b's own newest: clip a's reports never replaced it
        ("", "generating", 0.25),  # the whole change's newest
    ]


async def test_a_clips_report_of_the_same_stage_does_not_replace_the_changes() -> None:
    status = SlowStatus()
    async with LeaseKeeper(status, "job", "token", interval=3600) as keeper:  # type: ignore[arg-type]
        await keeper.progress("queued", 0.0)
        await status.first.wait()
        await keeper.progress("generating", 0.3)
        await keeper.progress("generating", 0.4, regeneration_id="a")
        status.release.set()
        await keeper.flush()
    assert status.sent == [("", "queued", 0.0), ("", "generating", 0.3), ("a", "generating", 0.4)]
