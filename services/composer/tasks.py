"""Running a composition's pieces of work a few at a time, and letting file copies finish on cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from clipchat.aio import settled

T = TypeVar("T")


async def run_concurrently(jobs: Sequence[Callable[[], Awaitable[None]]], *, limit: int | None = None) -> None:
    """Run ``jobs`` in order, at most ``limit`` at a time (all at once by default), until all
    succeed or one fails.

    The first failure cancels the jobs still running (which kills their ffmpeg processes), waits
    for them to finish, and is raised as it was. Cancelling the caller does the same.
    """
    semaphore = asyncio.Semaphore(max(1, limit or len(jobs)))

    async def guarded(job: Callable[[], Awaitable[None]]) -> None:
        async with semaphore:
            await job()

    tasks = [asyncio.ensure_future(guarded(job)) for job in jobs]
    if not tasks:
        return
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:  # in job order, so the error reported is the earliest job's
            if task in done and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await settled(asyncio.gather(*tasks, return_exceptions=True))
