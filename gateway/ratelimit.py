"""A small in-process token bucket per owner, for the endpoints that start work."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBucketLimiter:
    """Allows ``per_minute`` requests a minute per owner, in bursts of up to ``per_minute``.

    In-process on purpose: each gateway replica limits on its own, which is enough to stop a
    runaway client without another dependency. ``per_minute <= 0`` turns limiting off.
    """

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, owner: str) -> int | None:
        """Take one token; ``None`` when allowed, else the seconds to wait before retrying."""
        if self.capacity <= 0:
            return None
        now = self._clock()
        bucket = self._buckets.setdefault(owner, _Bucket(self.capacity, now))
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        return max(1, math.ceil((1 - bucket.tokens) / self.rate))
