"""Signed, expiring media URLs.

The browser's ``<video>`` and ``<img>`` elements cannot send an ``Authorization`` header, so every
storage object the API hands out is a URL signed with HMAC-SHA256 over the key and an expiry.
The signature is the permission: only the owner of a job ever receives its URLs.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable

from gateway.errors import ApiError

MEDIA_PATH = "/api/v1/media/"


class MediaSigner:
    """Makes and checks signed, expiring media URLs."""

    def __init__(self, secret: str, ttl_seconds: int, *, base_url: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self._secret = secret.encode()
        self.ttl_seconds = ttl_seconds
        self._base_url = base_url.rstrip("/")
        self._clock = clock
        # Expiries are rounded up to this step so a job's URLs stay the same between polls and the
        # browser keeps its cached video instead of reloading it.
        self._step = max(1, min(300, ttl_seconds))

    def _signature(self, key: str, exp: int) -> str:
        return hmac.new(self._secret, f"{key}\n{exp}".encode(), hashlib.sha256).hexdigest()

    def url(self, key: str) -> str:
        """A URL for ``key`` valid for at least ``ttl_seconds`` ("" for an empty key)."""
        if not key:
            return ""
        exp = (int(self._clock() + self.ttl_seconds) // self._step + 1) * self._step
        return f"{self._base_url}{MEDIA_PATH}{key}?exp={exp}&sig={self._signature(key, exp)}"

    def optional_url(self, key: str) -> str | None:
        return self.url(key) or None

    def verify(self, key: str, exp: str | None, sig: str | None) -> int:
        """Seconds the link stays valid. Raises ``ApiError`` 403 for a bad or expired signature."""
        expires = int(exp) if exp and exp.isdigit() and len(exp) <= 12 else None
        if expires is None or not sig or not hmac.compare_digest(self._signature(key, expires), sig):
            raise ApiError(403, "invalid_link", "This media link is not valid. Reload the page to get a "
                                                "fresh one.")
        remaining = expires - int(self._clock())
        if remaining <= 0:
            raise ApiError(403, "link_expired", "This media link has expired. Reload the page to get a "
                                                "fresh one.")
        return remaining
