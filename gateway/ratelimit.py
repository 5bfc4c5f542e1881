"""Small in-process token buckets: per owner for the endpoints that start work, per client
address for failed authentications."""

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

    # Past this many keys, the buckets that have refilled (the same as no bucket) are dropped, so
    # keys from many client addresses cannot grow the table without end.
    MAX_KEYS = 10_000

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, key: str) -> int | None:
        """Take one token; ``None`` when allowed, else the seconds to wait before retrying."""
        bucket = self._refilled(key)
        if bucket is None:
            return None
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        return self._wait(bucket)

    def waiting(self, key: str) -> int | None:
        """Like ``acquire`` without taking a token: ``None`` when one is there, else the seconds to wait."""
        bucket = self._refilled(key)
        return None if bucket is None or bucket.tokens >= 1 else self._wait(bucket)

    def _refilled(self, key: str) -> _Bucket | None:
        if self.capacity <= 0:
            return None
        now = self._clock()
        if key not in self._buckets and len(self._buckets) >= self.MAX_KEYS:
            self._drop_full(now)
        bucket = self._buckets.setdefault(key, _Bucket(self.capacity, now))
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        return bucket

    def _wait(self, bucket: _Bucket) -> int:
        return max(1, math.ceil((1 - bucket.tokens) / self.rate))

    def _drop_full(self, now: float) -> None:
        self._buckets = {key: bucket for key, bucket in self._buckets.items()
                         if bucket.tokens + (now - bucket.updated) * self.rate < self.capacity}
