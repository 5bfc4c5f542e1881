"""The ``Storage`` contract, run against the local folder and S3 (a moto server)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clipchat.errors import Conflict, InvalidInput, NotFound
from clipchat.storage import Storage
from clipchat.storage.local import LocalStorage
from clipchat.storage.s3 import S3Storage

MIB = 1024 * 1024
# Small multipart settings so a 12 MiB file goes up in three parts (S3's minimum part is 5 MiB).
S3_MULTIPART_THRESHOLD = 6 * MIB
S3_PART_SIZE = 5 * MIB
BIG_FILE_SIZE = 12 * MIB


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    store: LocalStorage | S3Storage
    if request.param == "local":
        store = LocalStorage(tmp_path / "store")
    else:
        store = S3Storage(bucket=request.getfixturevalue("s3_bucket"), prefix="clipchat",
                          endpoint_url=request.getfixturevalue("moto_s3"), region="us-east-1",
                          access_key_id="test", secret_access_key="test",
                          multipart_threshold=S3_MULTIPART_THRESHOLD, part_size=S3_PART_SIZE)
    yield store
    await store.close()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def write_random(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


class _FailingReader(io.BufferedReader):
    """Reads ``allowed`` bytes of a real file, then fails like a dying disk."""

    def __init__(self, path: str, allowed: int) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._left = allowed

    def _budget(self, size: int | None) -> int:
        if self._left <= 0:
            raise OSError(errno.EIO, "Input/output error")
        want = self._left if size is None or size < 0 else min(size, self._left)
        self._left -= want
        return want

    def read(self, size: int | None = -1) -> bytes:
        return super().read(self._budget(size))

    def read1(self, size: int = -1) -> bytes:
        return super().read1(self._budget(size))

    def readinto(self, buffer: Any) -> int:
        return super().readinto(memoryview(buffer)[: self._budget(len(buffer))])


class FailingPath(type(Path())):  # type: ignore[misc]
    """A path whose contents fail to read half-way through."""

    fail_after = 7 * MIB

    def open(self, mode: str = "r", *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        assert "b" in mode and "r" in mode
        return _FailingReader(str(self), self.fail_after)


async def test_bytes_round_trip(storage: Storage) -> None:
    await storage.put_bytes("jobs/a/clip.bin", b"hello clip", content_type="application/octet-stream")

    assert await storage.get_bytes("jobs/a/clip.bin") == b"hello clip"
    assert await storage.exists("jobs/a/clip.bin")
    info = await storage.stat("jobs/a/clip.bin")
    assert (info.key, info.size) == ("jobs/a/clip.bin", 10)
    assert info.modified > 0


async def test_file_round_trip_keeps_content(storage: Storage, tmp_path: Path) -> None:
    source = write_random(tmp_path / "source.mp4", BIG_FILE_SIZE)
    small = write_random(tmp_path / "small.mp4", 1000)

    await storage.put_file("jobs/a/big.mp4", source, content_type="video/mp4")
    await storage.put_file("jobs/a/small.mp4", small)
    await storage.get_file("jobs/a/big.mp4", tmp_path / "out" / "big.mp4")
    await storage.get_file("jobs/a/small.mp4", tmp_path / "out" / "small.mp4")

    assert sha256_of(tmp_path / "out" / "big.mp4") == sha256_of(source)
    assert sha256_of(tmp_path / "out" / "small.mp4") == sha256_of(small)
    assert (await storage.stat("jobs/a/big.mp4")).size == BIG_FILE_SIZE
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["big.mp4", "small.mp4"]


async def test_existing_object_is_never_overwritten(storage: Storage, tmp_path: Path) -> None:
    await storage.put_bytes("jobs/a/v1.mp4", b"original")
    replacement = write_random(tmp_path / "replacement.mp4", 100)

    with pytest.raises(Conflict):
        await storage.put_bytes("jobs/a/v1.mp4", b"replacement")
    with pytest.raises(Conflict):
        await storage.put_file("jobs/a/v1.mp4", replacement)

    assert await storage.get_bytes("jobs/a/v1.mp4") == b"original"


async def test_missing_object_is_not_found(storage: Storage, tmp_path: Path) -> None:
    dest = tmp_path / "dest.mp4"

    with pytest.raises(NotFound):
        await storage.get_bytes("jobs/missing.mp4")
    with pytest.raises(NotFound):
        await storage.stat("jobs/missing.mp4")
    with pytest.raises(NotFound):
        await storage.get_file("jobs/missing.mp4", dest)
    with pytest.raises(NotFound):
        await storage.touch("jobs/missing.mp4")

    assert not await storage.exists("jobs/missing.mp4")
    assert not dest.exists()


async def test_list_by_prefix(storage: Storage) -> None:
    for key in ("jobs/a/1.mp4", "jobs/a/2.mp4", "jobs/ab/3.mp4", "music/4.mp3"):
        await storage.put_bytes(key, key.encode())

    assert [i.key for i in await storage.list("jobs/a/")] == ["jobs/a/1.mp4", "jobs/a/2.mp4"]
    assert [i.key for i in await storage.list("jobs/a")] == ["jobs/a/1.mp4", "jobs/a/2.mp4",
                                                             "jobs/ab/3.mp4"]
    assert [i.key for i in await storage.list("")] == ["jobs/a/1.mp4", "jobs/a/2.mp4",
                                                       "jobs/ab/3.mp4", "music/4.mp3"]
    assert await storage.list("nothing/") == []
    assert [i.size for i in await storage.list("music/")] == [len(b"music/4.mp3")]


async def test_delete_removes_and_ignores_missing(storage: Storage) -> None:
    await storage.put_bytes("cache/seg.ts", b"segment")

    await storage.delete("cache/seg.ts")
    await storage.delete("cache/seg.ts")
    await storage.delete("cache/never-there.ts")

    assert not await storage.exists("cache/seg.ts")
    assert await storage.list("cache/") == []
    await storage.put_bytes("cache/seg.ts", b"written again")
    assert await storage.get_bytes("cache/seg.ts") == b"written again"


async def test_touch_keeps_content(storage: Storage) -> None:
    await storage.put_bytes("cache/seg.ts", b"segment", content_type="video/mp2t")
    before = await storage.stat("cache/seg.ts")

    await storage.touch("cache/seg.ts")

    after = await storage.stat("cache/seg.ts")
    assert after.modified >= before.modified
    assert await storage.get_bytes("cache/seg.ts") == b"segment"


async def test_local_touch_moves_mtime_forward(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    await store.put_bytes("cache/seg.ts", b"segment")
    path = store.local_path("cache/seg.ts")
    assert path is not None and path.read_bytes() == b"segment"
    os.utime(path, (1_000_000, 1_000_000))

    await store.touch("cache/seg.ts")

    assert (await store.stat("cache/seg.ts")).modified > 1_000_000


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/../b", "", "a/b\x00", "a b"])
async def test_bad_keys_are_refused(storage: Storage, key: str, tmp_path: Path) -> None:
    source = write_random(tmp_path / "source", 10)
    calls = [
        storage.put_bytes(key, b"x"), storage.put_file(key, source), storage.get_bytes(key),
        storage.get_file(key, tmp_path / "dest"), storage.exists(key), storage.stat(key),
        storage.delete(key), storage.touch(key), storage.presigned_url(key, 60),
    ]
    for call in calls:
        with pytest.raises(InvalidInput):
            await call
    with pytest.raises(InvalidInput):
        storage.local_path(key)
    with pytest.raises(InvalidInput):
        await storage.list("../")
    assert not (tmp_path / "x").exists() and not (tmp_path / "dest").exists()


async def test_concurrent_writers_exactly_one_wins(storage: Storage) -> None:
    payloads = [f"writer {i}".encode() * 1000 for i in range(6)]

    results = await asyncio.gather(*(storage.put_bytes("jobs/a/race.mp4", p) for p in payloads),
                                   return_exceptions=True)

    winners = [p for p, r in zip(payloads, results, strict=True) if r is None]
    assert len(winners) == 1, results
    assert all(isinstance(r, Conflict) for r in results if r is not None), results
    assert await storage.get_bytes("jobs/a/race.mp4") == winners[0]


async def test_failed_write_is_never_visible(storage: Storage, tmp_path: Path) -> None:
    source = FailingPath(write_random(tmp_path / "dying.mp4", BIG_FILE_SIZE))

    with pytest.raises(OSError):
        await storage.put_file("jobs/a/partial.mp4", source)

    assert not await storage.exists("jobs/a/partial.mp4")
    assert await storage.list("") == []
    # Nothing half-written blocks the key: a complete write afterwards succeeds.
    good = write_random(tmp_path / "good.mp4", 100)
    await storage.put_file("jobs/a/partial.mp4", good)
    assert await storage.get_bytes("jobs/a/partial.mp4") == good.read_bytes()


@pytest.mark.s3
async def test_s3_failed_multipart_upload_is_aborted(moto_s3: str, s3_bucket: str, tmp_path: Path) -> None:
    import boto3

    store = S3Storage(bucket=s3_bucket, endpoint_url=moto_s3, access_key_id="test",
                      secret_access_key="test", multipart_threshold=S3_MULTIPART_THRESHOLD,
                      part_size=S3_PART_SIZE)
    source = FailingPath(write_random(tmp_path / "dying.mp4", BIG_FILE_SIZE))
    try:
        with pytest.raises(OSError):
            await store.put_file("jobs/a/partial.mp4", source)
    finally:
        await store.close()

    s3 = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1", aws_access_key_id="test",
                      aws_secret_access_key="test")
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0


async def test_local_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "store")
    source = FailingPath(write_random(tmp_path / "dying.mp4", BIG_FILE_SIZE))

    with pytest.raises(OSError):
        await store.put_file("jobs/a/partial.mp4", source)

    leftovers = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert leftovers == []


async def test_presigned_url_downloads(storage: Storage) -> None:
    await storage.put_bytes("jobs/a/final.mp4", b"video bytes", content_type="video/mp4")
    await storage.touch("jobs/a/final.mp4")

    url = await storage.presigned_url("jobs/a/final.mp4", 300)

    if isinstance(storage, LocalStorage):
        assert url is None
        assert storage.local_path("jobs/a/final.mp4") is not None
        return
    assert url is not None and storage.local_path("jobs/a/final.mp4") is None
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.content == b"video bytes"
    # touch copies the object onto itself; the content type must survive it.
    assert response.headers["content-type"] == "video/mp4"
