"""Keeps a job's lease alive while a worker works, and stops the work when the lease is lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType

from clipchat.errors import ClipChatError, StaleLease
from clipchat.status_client import StatusClient

log = logging.getLogger("clipchat.lease")


class LeaseLost(ClipChatError):
    """The lease was cancelled or expired while working: drop the work, write nothing more."""

    code = "lease_lost"


class LeaseKeeper:
    """``async with LeaseKeeper(...)``: renews every ``interval`` seconds (the heartbeat).

    When a renewal is refused (the user cancelled, or the lease expired and was recovered) the
    task inside the block is cancelled — which kills any ffmpeg it runs — and the block raises
    ``LeaseLost``. A renewal that fails for another reason (status briefly down) is retried at the
    next beat; the lease time covers several beats.
    """

    def __init__(self, status: StatusClient, job_id: str, token: str, *, interval: float) -> None:
        self.status = status
        self.job_id = job_id
        self.token = token
        self.interval = interval
        self.lost = False
        self._task: asyncio.Task[object] | None = None
        self._beat: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LeaseKeeper:
        self._task = asyncio.current_task()
        self._beat = asyncio.create_task(self._run(), name=f"lease-{self.job_id}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
        if self.lost:
            if isinstance(exc, asyncio.CancelledError) and self._task is not None:
                self._task.uncancel()
            raise LeaseLost("The regeneration was cancelled or taken over.") from exc
        return False

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.status.renew(self.job_id, self.token)
            except StaleLease:
                log.info("lease.lost", extra={"job_id": self.job_id})
                self.lost = True
                if self._task is not None:
                    self._task.cancel()
                return
            except ClipChatError:
                log.warning("lease.renew_failed", exc_info=True, extra={"job_id": self.job_id})
