"""Wakes ``WatchJob`` streams when a job gets a new event.

The event log in the database is the truth; this hub only says "look again". Notifications
come from this process's own writes and, across status replicas, from the broker's job-events
topic. Watchers also look again every second in case a notification was missed.

Tracing: a notification remembers the span it came from (the write's, or on another replica the
job-events CONSUMER span, itself the child of the publishing span in the writer's trace), and a
watcher woken by it links its own span (the ``WatchJob`` stream's) to that one, so the stream's
trace leads to each regeneration that woke it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

from opentelemetry import trace


class EventHub:
    def __init__(self) -> None:
        self._conditions: dict[str, asyncio.Condition] = defaultdict(asyncio.Condition)
        self._latest: dict[str, int] = {}
        self._notified_by: dict[str, trace.SpanContext] = {}

    async def notify(self, job_id: str, sequence: int) -> None:
        if sequence <= self._latest.get(job_id, 0):
            return
        self._latest[job_id] = sequence
        self._notified_by[job_id] = trace.get_current_span().get_span_context()
        condition = self._conditions[job_id]
        async with condition:
            condition.notify_all()

    async def wait(self, job_id: str, after: int, timeout: float) -> None:
        """Return when an event after ``after`` may exist, or after ``timeout`` seconds."""
        if self._latest.get(job_id, 0) <= after:
            condition = self._conditions[job_id]
            async with condition:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await condition.wait_for(lambda: self._latest.get(job_id, 0) > after)
        if self._latest.get(job_id, 0) > after:
            self._link(job_id)

    def _link(self, job_id: str) -> None:
        """Link the waiter's span to the span that notified the job's latest event."""
        notifier = self._notified_by.get(job_id)
        waiter = trace.get_current_span()
        if notifier is not None and notifier.is_valid and waiter.is_recording():
            waiter.add_link(notifier, {"clipchat.job_id": job_id,
                                       "clipchat.event.sequence": self._latest.get(job_id, 0)})
