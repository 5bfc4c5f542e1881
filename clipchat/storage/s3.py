"""Object storage on S3 or an S3-compatible server (MinIO, Ceph, moto in tests).

Writes are conditional (``If-None-Match: *``), so S3 itself refuses to overwrite an existing key,
with no check-then-write race; a multipart upload is conditional on its completion, and an object
only becomes visible when a single put or a multipart completion succeeds.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from clipchat.errors import Conflict, DependencyUnavailable, NotFound
from clipchat.storage import ObjectInfo, check_key

log = logging.getLogger("clipchat.storage")

_MIB = 1024 * 1024
_DOWNLOAD_CHUNK = _MIB
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# 412: the key exists. 409 ConditionalRequestConflict: another conditional write to the same key
# is in flight; one of the two will win, so for this writer it is a conflict as well.
_CONFLICT_CODES = frozenset({"412", "PreconditionFailed", "ConditionalRequestConflict"})
# The longest wait botocore's standard retry mode makes between two attempts.
_MAX_RETRY_BACKOFF = 20.0
_UNAVAILABLE = "Storage is unavailable right now. Please try again shortly."


class S3Storage:
    """A ``Storage`` on an S3 bucket, every key under an optional ``prefix``.

    One aioboto3 session; the client is opened on first use, reused, and closed by ``close()``.
    Files at or above ``multipart_threshold`` bytes go up in parts of ``part_size`` bytes (S3 wants
    at least 5 MiB a part). A file is never read into memory: the request body (a whole file, or
    one part's slice of it) is streamed from disk in small chunks by a worker thread, so memory
    stays a few MiB per upload whatever the file's size.

    Errors: ``InvalidInput`` for a bad key, ``Conflict`` when writing a key that exists,
    ``NotFound`` for a missing key, ``DependencyUnavailable`` when S3 cannot be reached, times out
    after the capped retries, or refuses the request (credentials, missing bucket).

    aiohttp's read timeout does not run while a request waits for ``100 Continue`` or writes its
    body, so a server that accepts connections but never answers would hold an upload for ever.
    Each request that sends a body therefore has a deadline: every attempt's connect and read
    timeouts, plus its body at ``min_upload_rate`` bytes a second, plus botocore's backoffs.
    """

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region: str = "us-east-1", access_key_id: str | None = None,
                 secret_access_key: str | None = None, *, connect_timeout: float = 5.0,
                 read_timeout: float = 60.0, max_attempts: int = 3,
                 multipart_threshold: int = 64 * _MIB, part_size: int = 16 * _MIB,
                 min_upload_rate: int = 256 * 1024) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._endpoint_url = endpoint_url
        self._session = aioboto3.Session(aws_access_key_id=access_key_id,
                                         aws_secret_access_key=secret_access_key, region_name=region)
        self._config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                              retries={"max_attempts": max_attempts, "mode": "standard"},
                              signature_version="s3v4")
        self._attempt_seconds = connect_timeout + read_timeout
        self._max_attempts = max(max_attempts, 1)
        self._min_upload_rate = min_upload_rate
        self._multipart_threshold = multipart_threshold
        self._part_size = max(part_size, 5 * _MIB)
        self._client: Any = None
        self._exit_stack = AsyncExitStack()
        self._client_lock = asyncio.Lock()

    async def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        """Upload the local file ``path`` to ``key``. Raises ``Conflict`` when ``key`` exists.

        If reading ``path`` fails (the ``OSError`` propagates) or the upload fails half-way, the
        multipart upload is aborted and nothing becomes visible under ``key``.
        """
        name = self._name(key)
        size = (await asyncio.to_thread(path.stat)).st_size
        if size < self._multipart_threshold:
            with await asyncio.to_thread(_FileSlice, path, 0, size) as body:
                await self._put_object(key, name, body, size, content_type)
            return
        await self._put_multipart(key, name, path, size, content_type)

    async def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        """Store ``data`` under ``key``. Raises ``Conflict`` when ``key`` exists."""
        await self._put_object(key, self._name(key), data, len(data), content_type)

    async def get_file(self, key: str, dest: Path) -> None:
        """Download ``key`` to a temporary file beside ``dest``, then rename it into place, so
        ``dest`` is whole or untouched. Raises ``NotFound``."""
        name = self._name(key)
        dest = Path(dest)
        await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        try:
            async with self._errors(key):
                client = await self._get_client()
                response = await client.get_object(Bucket=self.bucket, Key=name)
                body = response["Body"]
                # The body proxy checks the length read against Content-Length; the raw
                # response that ``async with body as ...`` would yield does not.
                async with body:
                    with await asyncio.to_thread(tmp.open, "wb") as out:
                        while chunk := await body.read(_DOWNLOAD_CHUNK):
                            await asyncio.to_thread(out.write, chunk)
            await asyncio.to_thread(os.replace, tmp, dest)
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)

    async def get_bytes(self, key: str) -> bytes:
        """The object's bytes. Raises ``NotFound``."""
        name = self._name(key)
        async with self._errors(key):
            client = await self._get_client()
            response = await client.get_object(Bucket=self.bucket, Key=name)
            body = response["Body"]
            async with body:
                data: bytes = await body.read()
        return data

    async def exists(self, key: str) -> bool:
        try:
            await self.stat(key)
        except NotFound:
            return False
        return True

    async def stat(self, key: str) -> ObjectInfo:
        """Size and last-modified time (S3 keeps whole seconds). Raises ``NotFound``."""
        name = self._name(key)
        async with self._errors(key):
            client = await self._get_client()
            head = await client.head_object(Bucket=self.bucket, Key=name)
        return ObjectInfo(key=key, size=int(head["ContentLength"]),
                          modified=head["LastModified"].timestamp())

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (``""`` for all), sorted by key."""
        if prefix:
            check_key(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        found: list[ObjectInfo] = []
        async with self._errors(prefix):
            client = await self._get_client()
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                     Prefix=base + prefix)
            async for page in pages:
                for item in page.get("Contents", ()):
                    found.append(ObjectInfo(key=item["Key"].removeprefix(base), size=int(item["Size"]),
                                            modified=item["LastModified"].timestamp()))
        return sorted(found, key=lambda info: info.key)

    async def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is ignored (S3 answers 204 either way)."""
        name = self._name(key)
        async with self._errors(key):
            client = await self._get_client()
            await client.delete_object(Bucket=self.bucket, Key=name)
        log.debug("storage.deleted", extra={"key": key})

    async def touch(self, key: str) -> None:
        """Refresh the object's last-modified time by copying it onto itself. Raises ``NotFound``.

        S3 has no "set mtime"; a copy in place with ``MetadataDirective=REPLACE`` is the one way,
        and it must restate the content type and metadata or they would be dropped. The copy is
        server-side (no bytes through this process) and limited to objects under 5 GiB.
        """
        name = self._name(key)
        async with self._errors(key):
            client = await self._get_client()
            head = await client.head_object(Bucket=self.bucket, Key=name)
            await client.copy_object(Bucket=self.bucket, Key=name,
                                     CopySource={"Bucket": self.bucket, "Key": name},
                                     MetadataDirective="REPLACE",
                                     ContentType=head.get("ContentType", "binary/octet-stream"),
                                     Metadata=head.get("Metadata", {}))

    def local_path(self, key: str) -> Path | None:
        """Always None: objects are not local files."""
        check_key(key)
        return None

    async def presigned_url(self, key: str, expires_seconds: int) -> str | None:
        """A GET URL valid for ``expires_seconds``. Signing is local: the key need not exist."""
        name = self._name(key)
        async with self._errors(key):
            client = await self._get_client()
            url: str = await client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": name}, ExpiresIn=expires_seconds)
        return url

    async def close(self) -> None:
        """Close the client (and its connection pool); a later call opens a new one."""
        async with self._client_lock:
            self._client = None
            await self._exit_stack.aclose()

    # --- internals -------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    async def _get_client(self) -> Any:
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    client_cm = self._session.client("s3", endpoint_url=self._endpoint_url,
                                                     config=self._config)
                    self._client = await self._exit_stack.enter_async_context(client_cm)
        return self._client

    async def _put_object(self, key: str, name: str, body: bytes | _FileSlice, size: int,
                          content_type: str | None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        async with self._errors(key):
            client = await self._get_client()
            # A retry of a put whose first attempt landed but whose answer was lost reports
            # Conflict; keys are fresh per write (new_key), so the caller can treat it as failed.
            async with self._upload_deadline(size):
                await client.put_object(Bucket=self.bucket, Key=name, Body=body, IfNoneMatch="*",
                                        **extra)
        log.debug("storage.stored", extra={"key": key, "size": size})

    async def _put_multipart(self, key: str, name: str, path: Path, size: int,
                             content_type: str | None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        async with self._errors(key):
            client = await self._get_client()
            async with self._upload_deadline(0):
                upload = await client.create_multipart_upload(Bucket=self.bucket, Key=name, **extra)
            upload_id = upload["UploadId"]
            try:
                parts = []
                for number, offset in enumerate(range(0, size, self._part_size), start=1):
                    length = min(self._part_size, size - offset)
                    with await asyncio.to_thread(_FileSlice, path, offset, length) as body:
                        async with self._upload_deadline(length):
                            part = await client.upload_part(Bucket=self.bucket, Key=name, UploadId=upload_id,
                                                            PartNumber=number, Body=body)
                    parts.append({"ETag": part["ETag"], "PartNumber": number})
                async with self._upload_deadline(0):
                    await client.complete_multipart_upload(Bucket=self.bucket, Key=name,
                                                           UploadId=upload_id,
                                                           MultipartUpload={"Parts": parts},
                                                           IfNoneMatch="*")
            except BaseException:
                # Uploaded parts cost storage until aborted; shield so a cancelled caller still
                # cleans up.
                await asyncio.shield(self._abort_upload(client, key, name, upload_id))
                raise
        log.debug("storage.stored", extra={"key": key, "parts": len(parts)})

    def _upload_deadline(self, size: int) -> asyncio.Timeout:
        """A deadline for one request that sends ``size`` bytes, its retries included."""
        per_attempt = self._attempt_seconds + size / self._min_upload_rate
        seconds = self._max_attempts * per_attempt + (self._max_attempts - 1) * _MAX_RETRY_BACKOFF
        return asyncio.timeout(seconds)

    async def _abort_upload(self, client: Any, key: str, name: str, upload_id: str) -> None:
        try:
            await client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
        except (BotoCoreError, ClientError):
            # The bucket's lifecycle rule for incomplete uploads is the backstop.
            log.warning("storage.abort_upload_failed", extra={"key": key}, exc_info=True)

    @asynccontextmanager
    async def _errors(self, key: str) -> AsyncIterator[None]:
        """Map botocore errors to domain errors."""
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _NOT_FOUND_CODES or (status == "404" and code != "NoSuchBucket"):
                raise NotFound("The stored object was not found.") from exc
            if code in _CONFLICT_CODES or status == "412":
                raise Conflict("This object already exists.") from exc
            log.error("storage.s3_error", extra={"key": key, "code": code, "http_status": status})
            raise DependencyUnavailable(_UNAVAILABLE, retryable=not status.startswith("4")) from exc
        except (BotoCoreError, TimeoutError) as exc:
            log.warning("storage.s3_unreachable", extra={"key": key, "error": type(exc).__name__})
            raise DependencyUnavailable(_UNAVAILABLE) from exc


class _FileSlice(io.RawIOBase):
    """``length`` bytes of a file from ``offset``, as a seekable read-only stream: a request body.

    botocore measures it (seek and tell), hashes it and rewinds it for a retry; aiohttp reads it in
    64 KiB chunks in a worker thread while sending. If the file is shorter than it was when the
    upload began, the read comes up short and the request fails on its Content-Length.
    """

    def __init__(self, path: Path, offset: int, length: int) -> None:
        super().__init__()
        self._file = path.open("rb")
        self._offset = offset
        self._length = length
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self._length - self._position)
        if wanted <= 0:
            return 0
        self._file.seek(self._offset + self._position)
        read = self._file.readinto(memoryview(buffer)[:wanted])
        self._position += read
        return read

    def read(self, size: int | None = -1) -> bytes:
        remaining = max(0, self._length - self._position)
        wanted = remaining if size is None or size < 0 else min(size, remaining)
        self._file.seek(self._offset + self._position)
        data = self._file.read(wanted)
        self._position += len(data)
        return data

    def close(self) -> None:
        self._file.close()
        super().close()
