"""Object storage: one interface, a local folder and S3 behind it.

Keys are always made by the server (``new_key``), never taken from a user. A write becomes
visible only once complete, and an existing object is never overwritten.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from clipchat.errors import InvalidInput

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9/_.-]{0,511}$")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # epoch seconds


class Storage(Protocol):
    """Where clips, music, segments and composed videos live."""

    async def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        """Store a local file under ``key``. Raises ``Conflict`` when ``key`` already exists."""

    async def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        """Store bytes under ``key``. Raises ``Conflict`` when ``key`` already exists."""

    async def get_file(self, key: str, dest: Path) -> None:
        """Download ``key`` to ``dest`` (written whole or not at all). Raises ``NotFound``."""

    async def get_bytes(self, key: str) -> bytes:
        """The object's bytes. Raises ``NotFound``."""

    async def exists(self, key: str) -> bool: ...

    async def stat(self, key: str) -> ObjectInfo:
        """Size and modification time. Raises ``NotFound``."""

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``."""

    async def delete(self, key: str) -> None:
        """Remove ``key``; missing keys are ignored (used for cache eviction only)."""

    async def touch(self, key: str) -> None:
        """Mark ``key`` as recently used (for LRU eviction of caches)."""

    def local_path(self, key: str) -> Path | None:
        """The file behind ``key`` when storage is a local folder, else None."""

    async def presigned_url(self, key: str, expires_seconds: int) -> str | None:
        """A time-limited download URL where the backend has one (S3), else None."""

    async def close(self) -> None: ...


def check_key(key: str) -> str:
    """Refuse keys that could escape the store (``..``, absolute paths, odd characters)."""
    if not _KEY_RE.match(key) or ".." in key.split("/") or "//" in key:
        raise InvalidInput("Invalid storage key.")
    return key


def new_key(prefix: str, suffix: str) -> str:
    """A fresh, server-generated key: ``{prefix}/{uuid}{suffix}``."""
    return check_key(f"{prefix.strip('/')}/{uuid.uuid4().hex}{suffix}")


def job_prefix(job_id: str) -> str:
    return f"jobs/{uuid.UUID(job_id).hex}"


def create_storage(settings: object) -> Storage:
    """Build the storage named by ``settings.resolved_storage_url`` (``file://`` or ``s3://bucket``)."""
    from clipchat.settings import Settings

    assert isinstance(settings, Settings)
    url = settings.resolved_storage_url
    if url.startswith("file://"):
        from clipchat.storage.local import LocalStorage

        return LocalStorage(Path(url.removeprefix("file://")))
    if url.startswith("s3://"):
        from clipchat.storage.s3 import S3Storage

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return S3Storage(bucket=bucket, prefix=prefix, endpoint_url=settings.s3_endpoint_url,
                         region=settings.s3_region, access_key_id=settings.s3_access_key_id,
                         secret_access_key=settings.s3_secret_access_key)
    raise InvalidInput(f"Unsupported storage URL scheme in CLIPCHAT_STORAGE_URL: {url.split(':', 1)[0]}")
