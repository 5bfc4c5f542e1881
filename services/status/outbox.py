"""The outbox relay: publishes the work messages that state changes wrote into ``outbox_messages``.

A state change and the task it causes commit together (``JobStateMachine``); this relay then
publishes each unsent message, oldest first, waiting for the broker's confirm, and marks it sent.
It is woken right after a commit and also looks every ``poll_seconds``, so a message written while
the broker was down goes out once it is back (with backoff while it stays down). A message is
published at least once — a crash between the confirm and the mark sends it again — so consumers
are idempotent. Several status replicas share the work: rows are taken with ``SKIP LOCKED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from clipchat.broker import Broker, decode_task
from clipchat.db import Database
from clipchat.db.models import OutboxMessage, utcnow
from clipchat.errors import DependencyUnavailable

log = logging.getLogger("clipchat.outbox")


class OutboxRelay:
    """Publishes unsent outbox rows. ``start``/``stop`` run it in the background; ``publish_pending``
    is one pass (tests call it directly).

    Errors: ``publish_pending`` raises ``DependencyUnavailable`` when the broker or the database is
    down (what was published before that is marked sent); the background loop backs off and retries.
    """

    def __init__(self, db: Database, broker: Broker, *, batch: int = 100, poll_seconds: float = 1.0,
                 backoff_max_seconds: float = 5.0, keep: timedelta = timedelta(days=1),
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.broker = broker
        self.batch = batch
        self.poll_seconds = poll_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.keep = keep
        self.clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_cleanup: datetime | None = None

    def wake(self) -> None:
        """Look for unsent messages now (called after a commit that wrote some)."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def publish_pending(self) -> int:
        """Publish unsent messages until none is left; returns how many were published."""
        total = 0
        while True:
            published, remaining = await self._publish_batch()
            total += published
            if not remaining:
                return total

    async def _run(self) -> None:
        delay = self.poll_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.publish_pending()
                await self._cleanup()
                delay = self.poll_seconds
            except asyncio.CancelledError:
                raise
            except DependencyUnavailable:
                delay = min(self.backoff_max_seconds, max(delay, 0.25) * 2)
                log.warning("outbox.publish_deferred", extra={"retry_in": delay})
            except Exception:
                delay = self.backoff_max_seconds
                log.exception("outbox.relay_failed")

    async def _publish_batch(self) -> tuple[int, bool]:
        """One transaction: take up to ``batch`` unsent rows, publish them in order, mark them sent.
        Returns (published, whether more may be waiting)."""
        published = 0
        failure: DependencyUnavailable | None = None
        async with self.db.transaction() as session:
            query = (select(OutboxMessage).where(OutboxMessage.published_at.is_(None))
                     .order_by(OutboxMessage.id).limit(self.batch))
            if not self.db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            rows = (await session.execute(query)).scalars().all()
            for row in rows:
                try:
                    await self._publish(row)
                except DependencyUnavailable as exc:
                    failure = exc
                    break
                row.published_at = self.clock()
                published += 1
        if published:
            log.info("outbox.published", extra={"count": published})
        if failure is not None:
            raise failure
        return published, len(rows) == self.batch

    async def _publish(self, row: OutboxMessage) -> None:
        try:
            task = decode_task(row.queue, row.body)
        except ValueError:
            # Written by a newer or broken release: keep it out of the way, and say so.
            log.error("outbox.undecodable", extra={"outbox_id": row.id, "queue": row.queue})
            return
        await self.broker.publish(row.queue, task, message_id=row.message_id)

    async def _cleanup(self) -> None:
        """Delete messages sent longer ago than ``keep``, at most once a minute."""
        now = self.clock()
        if self._last_cleanup is not None and now - self._last_cleanup < timedelta(minutes=1):
            return
        self._last_cleanup = now
        async with self.db.transaction() as session:
            await session.execute(delete(OutboxMessage).where(OutboxMessage.published_at < now - self.keep))
