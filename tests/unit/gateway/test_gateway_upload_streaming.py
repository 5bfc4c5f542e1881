"""POST /jobs with many large files: the gateway's memory stays small, on a local folder and on S3.

The client streams its multipart body from a generator and the gateway runs in this process behind
a real uvicorn server, so ``tracemalloc`` sees every allocation of the upload on both sides: the
multipart parser, the temporary files, and the S3 requests (a moto server, a real S3 API). Before
uploads were streamed, S3 uploads under 64 MiB were read whole, four at a time.
"""

from __future__ import annotations

import hashlib
import json
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from clipchat.storage import Storage
from clipchat.storage.local import LocalStorage
from clipchat.storage.s3 import S3Storage
from gateway.app import create_app
from gateway.schemas import MAX_CLIPS
from tests.unit.gateway.gateway_rig import ALICE, Backend, SettingsFactory, error_of, served

MIB = 1024 * 1024
CHUNK = 256 * 1024
# An MP4 file's first box, so the gateway's content sniffing accepts the clip.
MP4_HEAD = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
WAV_HEAD = b"RIFF\x24\x00\x00\x00WAVEfmt "


class _Upload:
    """A multipart body made on the fly, and the SHA-256 of each file it sent."""

    def __init__(self, clips: int, clip_bytes: int) -> None:
        self.boundary = uuid.uuid4().hex
        self.clips = clips
        self.clip_bytes = clip_bytes
        self.digests: list[str] = []
        self.total = clips * clip_bytes

    def _part_head(self, name: str, filename: str, content_type: str) -> bytes:
        return (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                f"filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n").encode()

    def _file(self, head: bytes, size: int, seed: int) -> Iterator[bytes]:
        digest = hashlib.sha256()
        block = hashlib.sha256(str(seed).encode()).digest() * (CHUNK // 32)
        sent = 0
        while sent < size:
            chunk = (head + block)[:CHUNK] if sent == 0 else block
            chunk = chunk[:size - sent]
            digest.update(chunk)
            sent += len(chunk)
            yield chunk
        self.digests.append(digest.hexdigest())

    async def body(self) -> AsyncIterator[bytes]:
        manifest = {"clips": [{"prompt": f"clip {i}", "duration": 1.0} for i in range(self.clips)]}
        yield (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\r\n"
               f"{json.dumps(manifest)}\r\n").encode()
        for index in range(self.clips):
            yield self._part_head("clips", f"clip{index}.mp4", "video/mp4")
            for chunk in self._file(MP4_HEAD, self.clip_bytes, index):
                yield chunk
            yield b"\r\n"
        yield self._part_head("audio", "track.wav", "audio/wav")
        for chunk in self._file(WAV_HEAD, MIB, -1):
            yield chunk
        yield f"\r\n--{self.boundary}--\r\n".encode()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3),
                        pytest.param("s3-multipart", marks=pytest.mark.s3)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    backend: Storage
    if request.param == "local":
        backend = LocalStorage(tmp_path / "store")
    else:
        # s3: every clip goes up as one streamed PUT (the default 64 MiB threshold);
        # s3-multipart: in 5 MiB parts, each streamed from its slice of the file.
        sizes = {"multipart_threshold": 8 * MIB, "part_size": 5 * MIB} if request.param == "s3-multipart" else {}
        backend = S3Storage(bucket=request.getfixturevalue("s3_bucket"), prefix="up",
                            endpoint_url=request.getfixturevalue("moto_s3"), access_key_id="test",
                            secret_access_key="test", **sizes)  # type: ignore[arg-type]
    yield backend
    await backend.close()


async def _sha256_of(storage: Storage, key: str, tmp_path: Path) -> str:
    out = tmp_path / "check" / uuid.uuid4().hex
    await storage.get_file(key, out)
    digest = hashlib.sha256()
    with out.open("rb") as f:
        while block := f.read(MIB):
            digest.update(block)
    out.unlink()
    return digest.hexdigest()


async def test_many_large_files_go_to_storage_in_bounded_memory(make_settings: SettingsFactory, store: Storage,
                                                                backend: Backend, tmp_path: Path) -> None:
    upload = _Upload(clips=6, clip_bytes=16 * MIB)
    app = create_app(make_settings(), storage=store)
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=120,
                                                     headers={"Authorization": f"Bearer {ALICE}"}) as client:
        # Warm up (the S3 client loads its service model once: about 11 MiB) so the measure is of
        # the upload alone.
        await client.get("/api/v1/jobs")
        await store.exists("warm/up")
        tracemalloc.start()
        try:
            response = await client.post(
                "/api/v1/jobs", content=upload.body(),
                headers={"Content-Type": f"multipart/form-data; boundary={upload.boundary}"})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert response.status_code == 202, response.text
    created = backend.status.created[-1]
    keys = [clip.video_key for clip in created.clips] + [created.audio_key]
    sizes = [(await store.stat(key)).size for key in keys]
    assert sizes == [upload.clip_bytes] * upload.clips + [MIB]
    assert [await _sha256_of(store, key, tmp_path) for key in keys] == upload.digests
    # 97 MiB went through. One file read whole would be 16 MiB (four at once, as before, 64 MiB);
    # streamed, the peak is a few MiB of chunks and buffers.
    print(f"upload of {upload.total / MIB:.0f} MiB: peak traced allocations {peak / MIB:.1f} MiB")
    assert peak < upload.clip_bytes / 2


async def test_a_second_manifest_part_is_422(make_settings: SettingsFactory, backend: Backend,
                                             storage: LocalStorage) -> None:
    boundary = "b0undary"
    manifest = json.dumps({"clips": [{"prompt": "x", "duration": 1.0}]})
    body = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\r\n{manifest}\r\n"
                   for _ in range(2)) + f"--{boundary}--\r\n"
    async with served(create_app(make_settings(), storage=storage)) as url, httpx.AsyncClient(
            base_url=url, timeout=30, headers={"Authorization": f"Bearer {ALICE}"}) as client:
        response = await client.post("/api/v1/jobs", content=body.encode(),
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 422
    assert "manifest" in error_of(response)["message"]
    assert backend.status.created == []


@pytest.mark.parametrize(("headers", "what"), [
    ([("X-Padding", "a" * 5000)], "large"),
    ([(f"X-Extra-{i}", "v") for i in range(20)], "many"),
])
async def test_oversized_part_headers_are_a_json_4xx(make_settings: SettingsFactory, backend: Backend,
                                                     storage: LocalStorage, headers: list[tuple[str, str]],
                                                     what: str) -> None:
    boundary = "b0undary"
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"clips\"; filename=\"a.mp4\"\r\n{extra}\r\n"
            f"data\r\n--{boundary}--\r\n")
    async with served(create_app(make_settings(), storage=storage)) as url, httpx.AsyncClient(
            base_url=url, timeout=30, headers={"Authorization": f"Bearer {ALICE}"}) as client:
        response = await client.post("/api/v1/jobs", content=body.encode(),
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413, (what, response.text)
    error = error_of(response)
    assert error["code"] == "payload_too_large" and "header" in error["message"]
    assert backend.status.created == []


async def test_too_many_file_parts_are_422(make_settings: SettingsFactory, backend: Backend,
                                           storage: LocalStorage) -> None:
    boundary = "b0undary"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"clips\"; filename=\"a.mp4\"\r\n\r\n"
            f"{MP4_HEAD.decode('latin-1')}\r\n")
    body = (part * (MAX_CLIPS + 2) + f"--{boundary}--\r\n").encode("latin-1")
    async with served(create_app(make_settings(), storage=storage)) as url, httpx.AsyncClient(
            base_url=url, timeout=30, headers={"Authorization": f"Bearer {ALICE}"}) as client:
        response = await client.post("/api/v1/jobs", content=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 422
    assert f"at most {MAX_CLIPS + 1}" in error_of(response)["message"]
    assert backend.status.created == [] and await storage.list("") == []
