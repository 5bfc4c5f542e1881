"""What the clients of paid outside providers (the LLM, the video generators) share.

- ``retry_after``: the wait a provider asked for, from ``retry-after-ms`` or ``Retry-After``
  (delta-seconds or an HTTP-date).
- ``classify_status``: what a non-2xx HTTP status means for the caller (retry later, a conflict
  with a request still in flight, our credentials or account, a refusal of this request).
- ``OwnedHttpClient``: an ``httpx.AsyncClient`` that is closed on ``aclose`` only when it was
  created here, so tests and callers can hand in their own.
- ``check_base_url``: an API base URL must be http(s) with a host.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from types import TracebackType
from typing import Self

import httpx

from clipchat.settings import url_problem

DETAIL_CHARS = 2000  # enough of a provider's answer for support, not a whole HTML error page


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The wait (seconds) a provider asked for: ``retry-after-ms``, else ``Retry-After`` as
    delta-seconds or an HTTP-date; ``None`` when absent or unreadable. Never negative."""
    milliseconds = _non_negative(headers.get("retry-after-ms"))
    if milliseconds is not None:
        return milliseconds / 1000
    value = headers.get("retry-after")
    if not value:
        return None
    seconds = _non_negative(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _non_negative(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


class StatusKind(StrEnum):
    """What a non-2xx answer from a provider means for the caller."""

    RATE_LIMITED = "rate_limited"  # 429: wait (Retry-After) and try again
    IN_FLIGHT = "in_flight"  # 409: a request with the same idempotency key is still running
    TRANSIENT = "transient"  # 408, 5xx and stray 1xx/3xx: a later attempt may work
    UNAUTHORIZED = "unauthorized"  # 401/403: our credentials; an operator must fix them
    REFUSED = "refused"  # any other 4xx: this request is refused as it is


def classify_status(status: int) -> StatusKind:
    """The ``StatusKind`` of a non-2xx HTTP status."""
    if status == 429:
        return StatusKind.RATE_LIMITED
    if status == 409:
        return StatusKind.IN_FLIGHT
    if status == 408 or status >= 500 or status < 400:
        return StatusKind.TRANSIENT
    if status in (401, 403):
        return StatusKind.UNAUTHORIZED
    return StatusKind.REFUSED


def check_base_url(url: str) -> str:
    """``url`` without a trailing slash; ``ValueError`` unless it is http(s) with a host (the
    settings' own URL check, for a client made without settings)."""
    problem = url_problem(url, ("http", "https"))
    if problem:
        raise ValueError(f"base_url {problem}")
    return url.rstrip("/")


class OwnedHttpClient:
    """Holds the ``httpx.AsyncClient`` a provider client talks through.

    A client handed in is the caller's to close; one created here (no redirects followed, the
    given timeout) is closed by ``aclose`` or on leaving ``async with``.
    """

    def __init__(self, http: httpx.AsyncClient | None, timeout: float) -> None:
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    async def aclose(self) -> None:
        """Close the HTTP client if it was created here."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
