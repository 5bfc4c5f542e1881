"""Small asyncio tools shared by the core and the services."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def settled(operation: Awaitable[T]) -> T:
    """Await ``operation``; when cancelled meanwhile, let it finish first, then re-raise.

    Storage backends copy files in worker threads that a cancel cannot stop, and killing ffmpeg
    takes a moment; letting both end keeps a late write from landing in a work folder that has
    already been removed.
    """
    task = asyncio.ensure_future(operation)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return task.result()
