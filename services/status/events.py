"""Wakes ``WatchJob`` streams when a job gets a new event.

The event log in the database is the truth; this hub only says "look again". Notifications
come from this process's own writes and, across status replicas, from the broker's job-events
topic. Watchers also look again every second in case a notification was missed.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict


class EventHub:
    def __init__(self) -> None:
        self._conditions: dict[str, asyncio.Condition] = defaultdict(asyncio.Condition)
        self._latest: dict[str, int] = {}

    async def notify(self, job_id: str, sequence: int) -> None:
        if sequence <= self._latest.get(job_id, 0):
            return
        self._latest[job_id] = sequence
        condition = self._conditions[job_id]
        async with condition:
            condition.notify_all()

    async def wait(self, job_id: str, after: int, timeout: float) -> None:
        """Return when an event after ``after`` may exist, or after ``timeout`` seconds."""
        if self._latest.get(job_id, 0) > after:
            return
        condition = self._conditions[job_id]
        async with condition:
            try:
                await asyncio.wait_for(condition.wait_for(lambda: self._latest.get(job_id, 0) > after),
                                       timeout)
            except TimeoutError:
                pass
