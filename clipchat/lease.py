"""Work under a job's lease, as the workers do it: claim the work for one delivery, keep the lease
and the claim alive while working, report progress on the side, and stop when the lease is lost.

``run_claimed`` is the one way both workers (regenerator, composer) run a task message:

- the delivery claims the job's work for its phase (``ClaimWork``): an obsolete message (the work
  moved on, finished, was cancelled) is dropped; while another delivery holds a live claim the
  message waits and comes back later without using an attempt; otherwise this delivery holds the
  work, as attempt N;
- ``LeaseKeeper`` renews the lease and the claim every heartbeat and sends progress reports in the
  background. A refused renewal (cancel, expiry, another delivery took over) cancels the work —
  which kills any ffmpeg it runs and cancels a remote prediction — and the message is dropped;
- a retryable failure (a dependency down) gives the claim up and brings the message back after a
  growing delay; on the last attempt the job is failed with a retryable error first, so nothing is
  left stuck when the message is dead-lettered.

Progress is best effort: reports are coalesced while the status service is slow, dropped when it
is down, and a failed report never stops, restarts or re-pays the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

from clipchat.broker import Delivery, RequeueMessage
from clipchat.errors import ClipChatError, StaleLease
from clipchat.status_client import StatusClient
from clipchat.v1 import jobs_pb2

log = logging.getLogger("clipchat.lease")

# A busy claim is tried again after at least this long.
_MIN_BUSY_DELAY = 0.5
_RELEASE_TIMEOUT = 2.0
_PROGRESS_DEADLINE = 5.0


class LeaseLost(ClipChatError):
    """The lease was cancelled or expired while working: drop the work, write nothing more."""

    code = "lease_lost"


@dataclass(frozen=True)
class WorkClaim:
    """This delivery's hold on a job's work: the lease token, the claim and its attempt number."""

    job_id: str
    token: str
    claim_id: str
    attempt: int


@dataclass(frozen=True)
class _Report:
    stage: str
    fraction: float
    message: str
    eta_seconds: float
    regeneration_id: str = ""  # one clip of a change ("": the whole work)


# What a worker does with a claimed task.
Work = Callable[[WorkClaim], Awaitable[None]]


async def run_claimed(status: StatusClient, delivery: Delivery, phase: jobs_pb2.WorkPhase.ValueType,
                      work: Work, *, delivery_limit: int, give_up_message: str) -> None:
    """Claim ``delivery``'s work for ``phase`` and run ``work`` under it (see the module doc).

    Raises ``RequeueMessage`` to have the message back later (busy, or a retryable failure) and
    lets a permanent error through (the broker dead-letters the message). When the last attempt
    fails retryably, the job is failed first with ``give_up_message`` (retryable: the person can
    try again).
    """
    task = delivery.task
    ids = {"job_id": task.job_id, "regeneration_id": getattr(task, "regeneration_id", ""),
           "attempt": delivery.attempt}
    claim_id = uuid.uuid4().hex
    try:
        answer = await status.claim(task.job_id, task.lease_token, phase, claim_id)
    except ClipChatError as exc:
        if exc.code in ("not_found", "job_not_found"):
            return
        if not exc.retryable:
            raise
        log.warning("work.claim_failed", extra={**ids, "code": exc.code})
        raise RequeueMessage(str(exc)) from exc
    if answer.outcome == jobs_pb2.CLAIM_OUTCOME_OBSOLETE:
        log.info("work.skip_obsolete", extra=ids)
        return
    if answer.outcome == jobs_pb2.CLAIM_OUTCOME_BUSY:
        log.info("work.busy", extra={**ids, "retry_after": round(answer.retry_after_seconds, 2)})
        raise RequeueMessage("held by another delivery", counted=False,
                             delay=max(answer.retry_after_seconds, _MIN_BUSY_DELAY))
    claim = WorkClaim(task.job_id, task.lease_token, claim_id, answer.attempt)
    await _run(status, claim, work, ids, give_up_message=give_up_message if delivery.attempt >= delivery_limit
               else "")


async def _run(status: StatusClient, claim: WorkClaim, work: Work, ids: dict[str, object], *,
               give_up_message: str) -> None:
    try:
        await work(claim)
    except (LeaseLost, StaleLease):
        log.info("work.dropped_lease_lost", extra=ids)
    except ClipChatError as exc:
        if not exc.retryable:
            raise
        await _release(status, claim)
        if give_up_message:
            log.warning("work.giving_up", extra={**ids, "code": exc.code})
            with contextlib.suppress(ClipChatError):
                await status.fail(claim.job_id, claim.token, code="unavailable", message=give_up_message,
                                  detail=f"gave up after the last attempt: {exc.code}: {exc.message}",
                                  retryable=True)
        else:
            log.warning("work.retry", extra={**ids, "code": exc.code})
        raise RequeueMessage(str(exc)) from exc
    except asyncio.CancelledError:
        # Shut down before the work finished: the message goes back, the next delivery need not wait.
        await asyncio.shield(_release(status, claim))
        raise


async def _release(status: StatusClient, claim: WorkClaim) -> None:
    try:
        async with asyncio.timeout(_RELEASE_TIMEOUT):
            await status.release(claim.job_id, claim.token, claim.claim_id)
    except (ClipChatError, TimeoutError):
        log.info("work.release_failed", extra={"job_id": claim.job_id})


class LeaseKeeper:
    """``async with LeaseKeeper(...)``: renews every ``interval`` seconds (the heartbeat) and sends
    progress reports in the background.

    When a renewal is refused (the user cancelled, the lease expired and was recovered, or another
    delivery took the claim over) the task inside the block is cancelled and the block raises
    ``LeaseLost``. A renewal that fails for another reason (status briefly down) is retried at the
    next beat; the lease time covers several beats.
    """

    def __init__(self, status: StatusClient, job_id: str, token: str, *, interval: float,
                 claim_id: str = "") -> None:
        self.status = status
        self.job_id = job_id
        self.token = token
        self.claim_id = claim_id
        self.interval = interval
        self.lost = False
        self._task: asyncio.Task[object] | None = None
        self._beat: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._reports: list[_Report] = []
        self._queued = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @classmethod
    def for_claim(cls, status: StatusClient, claim: WorkClaim, *, interval: float) -> LeaseKeeper:
        return cls(status, claim.job_id, claim.token, interval=interval, claim_id=claim.claim_id)

    async def __aenter__(self) -> LeaseKeeper:
        self._task = asyncio.current_task()
        self._beat = asyncio.create_task(self._run(), name=f"lease-{self.job_id}")
        self._sender = asyncio.create_task(self._send_reports(), name=f"progress-{self.job_id}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        for task in (self._beat, self._sender):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.lost:
            if isinstance(exc, asyncio.CancelledError) and self._task is not None:
                self._task.uncancel()
            raise LeaseLost("The regeneration was cancelled or taken over.") from exc
        return False

    async def progress(self, stage: str, fraction: float, message: str = "", eta_seconds: float = 0.0,
                       regeneration_id: str = "") -> None:
        """Queue a progress report (of the whole work, or of one clip of a change:
        ``regeneration_id``); it is sent in the background, never raises and never waits.

        While reports wait, a newer one replaces the older of the same clip when that is of the same
        stage: one clip's report never replaces another's, and each clip's stages are still
        reported in order, each at least once."""
        report = _Report(stage, fraction, message, eta_seconds, regeneration_id)
        waiting = [n for n, queued in enumerate(self._reports) if queued.regeneration_id == regeneration_id]
        if waiting and self._reports[waiting[-1]].stage == stage:
            self._reports[waiting[-1]] = report
        else:
            self._reports.append(report)
        self._idle.clear()
        self._queued.set()

    async def flush(self, timeout: float = 2.0) -> None:
        """Wait (at most ``timeout`` seconds) until the queued reports are sent or dropped, so a
        final write is not overtaken by an older report."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.status.renew(self.job_id, self.token, self.claim_id)
            except StaleLease:
                log.info("lease.lost", extra={"job_id": self.job_id})
                self.lost = True
                if self._task is not None:
                    self._task.cancel()
                return
            except ClipChatError:
                log.warning("lease.renew_failed", exc_info=True, extra={"job_id": self.job_id})

    async def _send_reports(self) -> None:
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self._reports:
                await self._send(self._reports.pop(0))
            if not self._reports:
                self._idle.set()

    async def _send(self, report: _Report) -> None:
        try:
            # (asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation.)
            async with asyncio.timeout(_PROGRESS_DEADLINE):
                await self.status.progress(self.job_id, self.token, report.stage, report.fraction,
                                           message=report.message, eta_seconds=report.eta_seconds,
                                           claim_id=self.claim_id, regeneration_id=report.regeneration_id)
        except (ClipChatError, TimeoutError) as exc:
            # Only the heartbeat decides that the lease is lost; a report is just dropped.
            log.info("progress.dropped", extra={"job_id": self.job_id, "stage": report.stage,
                                                "error": type(exc).__name__})
