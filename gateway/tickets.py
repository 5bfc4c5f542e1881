"""Short-lived stream tickets: what goes in an EventSource URL instead of the API token.

EventSource cannot send headers, and a URL ends up in access logs, browser history and proxies. So
the page exchanges its token (``POST /api/v1/jobs/{id}/tickets``, bearer auth) for a ticket valid
for one job, one owner and ``ttl_seconds``, and puts only that in the URL. A logged ticket is
useless a minute later and never opened anything but that job's events.

A ticket is ``<expiry>.<owner, base64url>.<HMAC-SHA256>``, signed with a key derived from the media
signing key (so a media signature is never a valid ticket, nor the reverse).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable

from gateway.errors import ApiError

_INVALID = "This event-stream ticket is not valid. Ask for a new one (POST /api/v1/jobs/{id}/tickets)."
_EXPIRED = "This event-stream ticket has expired. Ask for a new one (POST /api/v1/jobs/{id}/tickets)."


def _unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, headers={"WWW-Authenticate": f'Bearer error="{code}"'})


class TicketSigner:
    """Issues and checks tickets bound to an owner and a job."""

    def __init__(self, signing_key: str, ttl_seconds: int, *, clock: Callable[[], float] = time.time) -> None:
        self._key = hmac.new(signing_key.encode(), b"clipchat stream tickets v1", hashlib.sha256).digest()
        self.ttl_seconds = ttl_seconds
        self._clock = clock

    def _signature(self, owner: str, job_id: str, exp: int) -> str:
        return hmac.new(self._key, f"{owner}\n{job_id}\n{exp}".encode(), hashlib.sha256).hexdigest()

    def issue(self, owner: str, job_id: str) -> str:
        exp = int(self._clock()) + self.ttl_seconds
        encoded = base64.urlsafe_b64encode(owner.encode()).decode().rstrip("=")
        return f"{exp}.{encoded}.{self._signature(owner, job_id, exp)}"

    def owner_of(self, ticket: str, job_id: str) -> str:
        """The owner the ticket was issued to. Raises ``ApiError`` 401 if it is bad, expired or for another job."""
        exp_text, _, rest = ticket.partition(".")
        encoded, _, sig = rest.partition(".")
        if not (exp_text.isdigit() and len(exp_text) <= 12 and encoded and sig):
            raise _unauthorized("invalid_ticket", _INVALID)
        try:
            owner = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise _unauthorized("invalid_ticket", _INVALID) from None
        exp = int(exp_text)
        if not hmac.compare_digest(self._signature(owner, job_id, exp), sig):
            raise _unauthorized("invalid_ticket", _INVALID)
        if exp <= self._clock():
            raise _unauthorized("ticket_expired", _EXPIRED)
        return owner
