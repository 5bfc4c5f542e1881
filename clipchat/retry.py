"""Retry policies, declared where the call is made: attempts, backoff with jitter, what is permanent."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("clipchat.retry")


def is_retryable(exc: BaseException) -> bool:
    """Domain errors say it themselves; anything else is treated as permanent."""
    return bool(getattr(exc, "retryable", False))


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    base_seconds: float = 0.5
    max_seconds: float = 8.0
    jitter: float = 0.5  # fraction of the delay drawn at random, so retries don't stampede
    retryable: Callable[[BaseException], bool] = is_retryable

    def delay(self, attempt: int, exc: BaseException | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``Retry-After`` wins when a provider sent one)."""
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, (int, float)) and retry_after >= 0:
            return float(min(retry_after, self.max_seconds * 4))
        delay = min(self.max_seconds, self.base_seconds * (2 ** (attempt - 1)))
        return delay * (1 - self.jitter) + random.uniform(0, delay * self.jitter)

    async def run(self, fn: Callable[[], Awaitable[T]], *, what: str = "call",
                  on_retry: Callable[[int, BaseException], Awaitable[None]] | None = None) -> T:
        """Call ``fn`` until it succeeds, fails permanently, or the attempts are used up.

        The last error is raised as it was; cancellation is never retried.
        """
        attempt = 1
        while True:
            try:
                return await fn()
            except Exception as exc:
                if attempt >= self.attempts or not self.retryable(exc):
                    raise
                delay = self.delay(attempt, exc)
                log.warning("retry.scheduled", extra={"what": what, "attempt": attempt,
                                                       "delay": round(delay, 2), "error": type(exc).__name__})
                if on_retry is not None:
                    await on_retry(attempt, exc)
                await asyncio.sleep(delay)
                attempt += 1
