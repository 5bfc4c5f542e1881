"""The gateway's access log, with every credential kept out of it.

API tokens only ever travel in the ``Authorization`` header, which uvicorn does not log. What a URL
may carry is short-lived but still a credential while it lasts: an event-stream ``?ticket=``, a
media link's ``?sig=``, or a token an old client still puts in ``?access_token=``. An operator
reading or shipping access logs should not have to know which: every query value is redacted
except the few that only say which page or event a client asked for.
"""

from __future__ import annotations

import logging
import sys
from urllib.parse import parse_qsl, urlencode

from clipchat.telemetry import JsonFormatter

ACCESS_LOGGER = "uvicorn.access"
REDACTED = "[redacted]"
# Query parameters whose values are never secrets (paging, resuming, a link's expiry time).
_KEPT = frozenset({"after", "limit", "cursor", "exp"})
# Parameters whose names are shown (with their values redacted); any other name is the client's
# text, perhaps a token sent as a bare ``?<token>``, and is redacted as well.
_NAMED = _KEPT | {"ticket", "sig", "access_token"}


def redact_query(path: str) -> str:
    """``path`` with the value of every query parameter outside the short list replaced."""
    base, sep, query = path.partition("?")
    if not sep:
        return path
    pairs = parse_qsl(query, keep_blank_values=True)
    if not pairs:
        return f"{base}?{REDACTED}"
    shown = [(name if name in _NAMED else REDACTED, value if name in _KEPT else REDACTED)
             for name, value in pairs]
    return f"{base}?{urlencode(shown, safe='[]')}"


class RedactQuery(logging.Filter):
    """Rewrites the path of uvicorn's access records: ``(client, method, path, version, status)``."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def configure_access_log(enabled: bool, *, json_lines: bool = False) -> None:
    """Redact uvicorn's access records, and log them at INFO when ``enabled``.

    Call after building the ``uvicorn.Config``: it sets the access logger's level from its own
    ``log_level``. The filter goes on even when the log is off, so turning it on by other means
    (a logging config) never logs an unredacted line. With ``json_lines`` (uvicorn started with
    ``log_config=None``, as ``python -m gateway`` does, so the access logger has no handler of its
    own) the records go to stderr as JSON lines, like the process's other logs.
    """
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(existing, RedactQuery) for existing in logger.filters):
        logger.addFilter(RedactQuery())
    if enabled:
        logger.setLevel(logging.INFO)
        if json_lines and not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(JsonFormatter())
            logger.addHandler(handler)
            logger.propagate = False
