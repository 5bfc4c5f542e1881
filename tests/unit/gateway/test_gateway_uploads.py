"""POST /jobs: multipart uploads, content sniffing, server-made keys, and the media route."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from clipchat.errors import InvalidInput
from clipchat.storage import check_key
from clipchat.storage.local import LocalStorage
from gateway.app import create_app
from gateway.signing import MediaSigner
from gateway.uploads import sniff
from tests.unit.gateway.gateway_rig import Backend, SettingsFactory, error_of, make_job, running

MANIFEST = {"title": "Beach day", "clips": [{"prompt": "a beach", "duration": 1.0},
                                             {"prompt": "a city", "duration": 1.5}],
            "transitions": [{"kind": "crossfade", "duration": 0.3}], "beat_timestamps": [0.0, 0.5, 1.0],
            "aspect_ratio": "9:16", "fit": "crop", "budget_limit": "25.50"}


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory, ffmpeg_exe: str) -> dict[str, bytes]:
    """A tiny real MP4 and WAV made by ffmpeg."""
    folder = tmp_path_factory.mktemp("media")
    mp4, wav = folder / "clip.mp4", folder / "track.wav"
    subprocess.run([ffmpeg_exe, "-v", "error", "-f", "lavfi", "-i", "color=c=blue:s=64x64:d=0.4:r=10",
                    "-c:v", "mpeg4", "-y", str(mp4)], check=True, timeout=60)
    subprocess.run([ffmpeg_exe, "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=0.3",
                    "-y", str(wav)], check=True, timeout=60)
    return {"mp4": mp4.read_bytes(), "wav": wav.read_bytes()}


def _files(media: dict[str, bytes], *, clips: int = 2, clip_name: str = "clip.mp4",
           clip_bytes: bytes | None = None) -> list[tuple[str, tuple[str, bytes, str]]]:
    files = [("clips", (clip_name, clip_bytes or media["mp4"], "video/mp4")) for _ in range(clips)]
    files.append(("audio", ("track.wav", media["wav"], "audio/wav")))
    return files


async def test_create_job_stores_uploads_under_server_keys(client: httpx.AsyncClient, backend: Backend,
                                                           storage: LocalStorage, media: dict[str, bytes],
                                                           tmp_path: Path) -> None:
    files = _files(media, clip_name="../../etc/passwd")
    files[2] = ("audio", ("../../../tmp/evil.sh", media["wav"], "text/x-shellscript"))
    response = await client.post("/api/v1/jobs", data={"manifest": json.dumps(MANIFEST)}, files=files)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["Location"] == f"/api/v1/jobs/{body['id']}"
    assert body["status"] == "composing" and body["title"] == "Beach day"

    [request] = backend.status.created
    assert request.job_id == body["id"] and request.owner == "alice"
    prefix = f"jobs/{request.job_id.replace('-', '')}/inputs/"
    keys = [c.video_key for c in request.clips] + [request.audio_key]
    for key in keys:
        assert key.startswith(prefix) and check_key(key) == key
        assert "passwd" not in key and "evil" not in key and ".." not in key
    assert [k.rsplit(".", 1)[1] for k in keys] == ["mp4", "mp4", "wav"]
    assert len(set(keys)) == 3
    assert await storage.get_bytes(keys[0]) == media["mp4"]
    assert await storage.get_bytes(request.audio_key) == media["wav"]
    assert [(c.prompt, c.duration) for c in request.clips] == [("a beach", 1.0), ("a city", 1.5)]
    assert [(t.kind, t.duration) for t in request.transitions] == [("crossfade", 0.3)]
    assert list(request.beat_timestamps) == [0.0, 0.5, 1.0]
    assert (request.aspect_ratio, request.fit, request.budget_limit, request.title) == \
        ("9:16", "crop", "25.50", "Beach day")
    written = [p.name for p in await asyncio.to_thread(lambda: list(tmp_path.rglob("*")))]
    assert "passwd" not in written and "evil.sh" not in written


async def test_defaults_when_the_manifest_leaves_them_out(client: httpx.AsyncClient, backend: Backend,
                                                          media: dict[str, bytes]) -> None:
    manifest = {"clips": [{"prompt": "a beach", "duration": 1.0}]}
    response = await client.post("/api/v1/jobs", data={"manifest": json.dumps(manifest)},
                                 files=_files(media, clips=1))
    assert response.status_code == 202, response.text
    [request] = backend.status.created
    assert (request.aspect_ratio, request.fit, request.budget_limit, len(request.transitions)) == \
        ("16:9", "pad", "", 0)


@pytest.mark.parametrize(("manifest", "fragment"), [
    ("{not json", "not valid JSON"),
    ({"clips": []}, "manifest.clips"),
    ({"clips": [{"prompt": "a", "duration": 0.1}] * 2}, "duration"),
    ({"clips": [{"prompt": "a", "duration": 61}] * 2}, "duration"),
    ({"clips": [{"prompt": " ", "duration": 1}] * 2}, "prompt"),
    ({"clips": [{"prompt": "a", "duration": 1}] * 2, "transitions": []}, "transitions"),
    ({"clips": [{"prompt": "a", "duration": 1}] * 2, "beat_timestamps": [1.0, 0.5]}, "sorted"),
    ({"clips": [{"prompt": "a", "duration": 1}] * 2, "beat_timestamps": [-1.0]}, "non-negative"),
    ({"clips": [{"prompt": "a", "duration": 1}] * 2, "aspect_ratio": "4:3"}, "aspect_ratio"),
    ({"clips": [{"prompt": "a", "duration": 1}] * 2, "budget_limit": "-5"}, "budget_limit"),
    ({"clips": [{"prompt": "a", "duration": 1}] * 101}, "manifest.clips"),
])
async def test_invalid_manifest_is_422(client: httpx.AsyncClient, backend: Backend, media: dict[str, bytes],
                                       storage: LocalStorage, manifest: Any, fragment: str) -> None:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    response = await client.post("/api/v1/jobs", data={"manifest": text}, files=_files(media))
    assert response.status_code == 422
    assert fragment in error_of(response)["message"]
    assert backend.status.created == [] and await storage.list("jobs/") == []


@pytest.mark.parametrize(("files", "fragment"), [
    ("one_clip_for_two", "one 'clips' file per manifest clip"),
    ("no_audio", "exactly one 'audio' file"),
    ("text_as_clip", "Clip 0 is not a supported file"),
    ("video_as_audio", "The audio file is not a supported file"),
    ("empty_clip", "Clip 0 is empty"),
    ("extra_part", "Unexpected form part"),
])
async def test_bad_files_are_422(client: httpx.AsyncClient, backend: Backend, media: dict[str, bytes],
                                 files: str, fragment: str) -> None:
    parts = _files(media)
    if files == "one_clip_for_two":
        parts = parts[1:]
    elif files == "no_audio":
        parts = parts[:2]
    elif files == "text_as_clip":
        parts[0] = ("clips", ("clip.mp4", b"#!/bin/sh\necho hello\n" * 10, "video/mp4"))
    elif files == "video_as_audio":
        parts[2] = ("audio", ("track.wav", b"\x1a\x45\xdf\xa3" + b"\0" * 60, "audio/wav"))
    elif files == "empty_clip":
        parts[0] = ("clips", ("clip.mp4", b"", "video/mp4"))
    else:
        parts.append(("thumbnail", ("x.jpg", b"\xff\xd8\xff", "image/jpeg")))
    response = await client.post("/api/v1/jobs", data={"manifest": json.dumps(MANIFEST)}, files=parts)
    assert response.status_code == 422
    assert fragment in error_of(response)["message"]
    assert backend.status.created == []


async def test_missing_manifest_and_wrong_content_type_are_422(client: httpx.AsyncClient,
                                                               media: dict[str, bytes]) -> None:
    response = await client.post("/api/v1/jobs", files=_files(media))
    assert response.status_code == 422 and "manifest" in error_of(response)["message"]
    response = await client.post("/api/v1/jobs", json=MANIFEST)
    assert response.status_code == 422 and "multipart/form-data" in error_of(response)["message"]
    truncated = await client.post("/api/v1/jobs", content=b"--xyz\r\nContent-Disposition: form-data; "
                                  b'name="manifest"\r\n\r\n{}',
                                  headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert truncated.status_code == 422 and "cut off" in error_of(truncated)["message"]


async def test_oversized_file_is_413(make_settings: SettingsFactory, storage: LocalStorage,
                                     backend: Backend, media: dict[str, bytes]) -> None:
    app = create_app(make_settings(max_upload_bytes=len(media["mp4"]) - 1), storage=storage)
    async with running(app) as client:
        response = await client.post("/api/v1/jobs", data={"manifest": json.dumps(MANIFEST)},
                                     files=_files(media))
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"
    assert backend.status.created == []


async def test_refused_create_job_removes_the_uploads(client: httpx.AsyncClient, backend: Backend,
                                                      storage: LocalStorage, media: dict[str, bytes]) -> None:
    backend.status.fail["CreateJob"] = InvalidInput("The transition 'spin' is not supported.")
    response = await client.post("/api/v1/jobs", data={"manifest": json.dumps(MANIFEST)}, files=_files(media))
    assert response.status_code == 422
    assert error_of(response)["message"] == "The transition 'spin' is not supported."
    assert await storage.list("jobs/") == []


async def test_create_job_needs_a_token(client: httpx.AsyncClient, media: dict[str, bytes]) -> None:
    client.headers.pop("Authorization")
    response = await client.post("/api/v1/jobs", data={"manifest": json.dumps(MANIFEST)}, files=_files(media))
    assert response.status_code == 401


@pytest.mark.parametrize(("head", "kind", "suffix"), [
    (b"\0\0\0\x20ftypisom\0\0\2\0", "video", ".mp4"),
    (b"\0\0\0\x14ftypqt  \0\0\0\0", "video", ".mov"),
    (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", "video", ".webm"),
    (b"\x1a\x45\xdf\xa3\xa3\x42\x86\x81\x01\x42\x82\x88matroska", "video", ".mkv"),
    (b"ID3\x04\0\0\0\0\0\0", "audio", ".mp3"),
    (b"\xff\xfb\x90\x64\0\0", "audio", ".mp3"),
    (b"RIFF\x24\0\0\0WAVEfmt ", "audio", ".wav"),
    (b"\0\0\0\x20ftypM4A \0\0\0\0", "audio", ".m4a"),
    (b"fLaC\0\0\0\x22", "audio", ".flac"),
])
def test_sniff_recognises_each_container(head: bytes, kind: str, suffix: str) -> None:
    sniffed = sniff(head, kind)  # type: ignore[arg-type]
    assert sniffed is not None and sniffed.suffix == suffix


@pytest.mark.parametrize(("head", "kind"), [(b"RIFF\0\0\0\0AVI LIST", "audio"), (b"<html>", "video"),
                                            (b"ID3\x04", "video"), (b"%PDF-1.7", "audio"),
                                            (b"RIFF\x24\0\0\0WAVEfmt ", "video")])
def test_sniff_refuses_other_content(head: bytes, kind: str) -> None:
    assert sniff(head, kind) is None  # type: ignore[arg-type]


# --- media ---------------------------------------------------------------------------------------------


async def _stored_video(backend: Backend, storage: LocalStorage,
                        client: httpx.AsyncClient) -> tuple[str, bytes]:
    job = backend.status.add_job(make_job("alice"))
    data = bytes(range(256)) * 40
    await storage.put_bytes(job.versions[1].storage_key, data)
    url = (await client.get(f"/api/v1/jobs/{job.job_id}")).json()["video_url"]
    return url, data


async def test_media_serves_signed_urls_with_ranges(client: httpx.AsyncClient, backend: Backend,
                                                    storage: LocalStorage) -> None:
    url, data = await _stored_video(backend, storage, client)
    client.headers.pop("Authorization")  # the signature is the permission
    whole = await client.get(url)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["content-type"] == "video/mp4"
    assert whole.headers["accept-ranges"] == "bytes"
    part = await client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    head = await client.head(url)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(data))


async def test_media_refuses_bad_or_expired_signatures(client: httpx.AsyncClient, backend: Backend,
                                                       storage: LocalStorage) -> None:
    url, _ = await _stored_video(backend, storage, client)
    path, query = url.split("?")
    tampered_sig = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    other_key = path.replace("v2.mp4", "v1.mp4") + "?" + query
    expired = MediaSigner("test-signing-key", 60, clock=lambda: time.time() - 7200).url(
        path.removeprefix("/api/v1/media/"))
    for bad in (tampered_sig, other_key, path, expired, path + "?exp=abc&sig=x"):
        response = await client.get(bad)
        assert response.status_code == 403, bad
        assert error_of(response)["code"] in ("invalid_link", "link_expired")
    assert error_of(await client.get(expired))["code"] == "link_expired"


async def test_media_missing_object_is_404(client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice"))
    url = (await client.get(f"/api/v1/jobs/{job.job_id}")).json()["video_url"]
    response = await client.get(url)
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


class _RemoteStorage(LocalStorage):
    """Storage that behaves like S3 for the media route: no local path, presigned URLs."""

    def local_path(self, key: str) -> Path | None:
        return None

    async def presigned_url(self, key: str, expires_seconds: int) -> str | None:
        return f"https://bucket.s3.example/{key}?X-Amz-Expires={expires_seconds}"


async def test_media_on_s3_redirects_to_a_presigned_url(make_settings: SettingsFactory, backend: Backend,
                                                       tmp_path: Path) -> None:
    app = create_app(make_settings(), storage=_RemoteStorage(tmp_path / "remote"))
    async with running(app) as client:
        job = backend.status.add_job(make_job("alice"))
        url = (await client.get(f"/api/v1/jobs/{job.job_id}")).json()["video_url"]
        response = await client.get(url)
    assert response.status_code == 307
    assert response.headers["location"].startswith(f"https://bucket.s3.example/{job.versions[1].storage_key}")
