"""The route that serves stored videos, thumbnails and tracks behind signed URLs."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated

import anyio
from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, RedirectResponse, Response

from clipchat.errors import NotFound
from clipchat.storage import check_key
from gateway.deps import SignerDep, StorageDep
from gateway.errors import documented

_CONTENT_TYPES = {
    ".mp4": "video/mp4",
    ".mov": "video/quicktime",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".mp3": "audio/mpeg",
    ".wav": "audio/wav",
    ".m4a": "audio/mp4",
    ".aac": "audio/aac",
    ".flac": "audio/flac",
}


def content_type_for(key: str) -> str:
    """The media type of a storage object, from the suffix the server gave its key."""
    return _CONTENT_TYPES.get(PurePosixPath(key).suffix.lower(), "application/octet-stream")


router = APIRouter(prefix="/api/v1", tags=["media"])


@router.head("/media/{key:path}", response_class=Response, include_in_schema=False)
@router.get("/media/{key:path}", responses=documented(403, 404), response_class=Response,
            summary="A stored video, thumbnail or track (signed URL)")
async def get_media(key: str, storage: StorageDep, signer: SignerDep,
                    exp: Annotated[str | None, Query(description="Expiry, epoch seconds")] = None,
                    sig: Annotated[str | None, Query(description="HMAC-SHA256 signature")] = None,
                    ) -> Response:
    """Serve a storage object behind a signed URL from the job JSON.

    A local folder is served directly, with HTTP Range support for seeking; S3 answers with a
    307 redirect to a presigned URL.
    """
    remaining = signer.verify(key, exp, sig)
    check_key(key)
    headers = {"Cache-Control": f"private, max-age={min(remaining, 3600)}",
               "X-Content-Type-Options": "nosniff"}
    path = storage.local_path(key)
    if path is not None:
        if not await anyio.Path(path).is_file():
            raise NotFound("This file is no longer available.")
        return FileResponse(path, media_type=content_type_for(key), headers=headers)
    presigned = await storage.presigned_url(key, remaining)
    if presigned:
        return RedirectResponse(presigned, status_code=307, headers={"Cache-Control": "no-store"})
    return Response(await storage.get_bytes(key), media_type=content_type_for(key), headers=headers)
