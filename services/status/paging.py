"""Pages of a job list: the page size rules and the opaque token that marks where a page ended.

Pages are keyed on (created_at, job id), newest first, never on an offset: jobs created between two
pages do not shift them, and no page reads the rows of the pages before it (the query asks for the
owner's jobs past the key, ordered, with a LIMIT). The
token is ``base64url(JSON [seconds, nanos, job_id])`` of the last job on the page; the gateway hands
it to REST clients as ``next_cursor`` unchanged.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from clipchat.errors import InvalidInput

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
# A token is about 70 characters; anything much longer was not made here.
_MAX_TOKEN_CHARS = 200
_BAD_TOKEN = ("The page cursor is not valid: pass the cursor the previous page returned, or none for "
              "the first page.")


@dataclass(frozen=True)
class PageKey:
    """Where a page ended: the last job's creation time and id."""

    created_at: datetime
    job_id: uuid.UUID


def page_size(requested: int) -> int:
    """The page size for a request: 0 means the default, more than the maximum is the maximum."""
    if requested < 0:
        raise InvalidInput("The page size cannot be negative.")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(key: PageKey) -> str:
    stamp = Timestamp()
    stamp.FromDatetime(key.created_at)
    text = json.dumps([stamp.seconds, stamp.nanos, str(key.job_id)], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_page_token(token: str) -> PageKey:
    """The key a token marks. Raises ``InvalidInput`` for anything this module did not make."""
    if len(token) > _MAX_TOKEN_CHARS:
        raise InvalidInput(_BAD_TOKEN)
    try:
        seconds, nanos, job_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if isinstance(seconds, int) and isinstance(nanos, int) and isinstance(job_id, str):
            created_at = Timestamp(seconds=seconds, nanos=nanos).ToDatetime(tzinfo=UTC)
            return PageKey(created_at, uuid.UUID(job_id))
    except (ValueError, TypeError, OverflowError):
        pass
    raise InvalidInput(_BAD_TOKEN)
