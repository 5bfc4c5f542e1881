"""Hostile text in every field a person controls: stored byte for byte, or refused with a clear 4xx.

Text that is only dangerous when something reads it as code (filter-graph syntax, ``;``, ``$(…)``,
backticks, ``../``, quotes, bidi overrides, CR/LF) is data here: it reaches the services exactly as
sent and comes back exactly as sent. What cannot be stored (NUL and other control characters,
unpaired surrogates) or is too long is a 422 with the error shape, never a 5xx. File names and form
part names never become storage keys or paths; a log line can never be forged from a request.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from clipchat.storage import check_key
from clipchat.storage.local import LocalStorage
from clipchat.telemetry import JsonFormatter
from gateway.app import create_app
from tests.unit.gateway.gateway_rig import Backend, SettingsFactory, error_of, make_job, running

MP4_HEAD = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + bytes(64)
WAV_HEAD = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(64)

# Stored as sent, in every free-text field.
STORED = {
    "filter_graph": "'[0:v]drawtext=text='pwned':fontfile=/etc/passwd[v];[v]null[out]",
    "shell": "a; rm -rf / ; $(touch /tmp/pwned) `id` | cat && echo $HOME",
    "path": "../../etc/passwd",
    "bidi": "clip \u202etxt.exe\u202c \u2066isolated\u2069",
    "line_breaks": "first line\r\n{\"level\": \"error\", \"event\": \"forged\"}\nthird\ttabbed",
    "quotes": "\"double\" 'single' \\backslash\\ %s %(x)s {0}",
    "unicode": "ünïcødé ✓ 日本語 🎬\U0001f3b6 \u200bzero-width",
}
# Refused (422) in every free-text field.
REFUSED = {
    "nul": "before\x00after",
    "escape": "\x1b[31mred\x1b[0m",
    "bell": "ding\x07",
    "lone_surrogate": "broken \ud800 half",
    "huge": "ünïcødé ✓ 🎬 " * 8_000,  # about 100 KB of UTF-8
}


def _json(body: Any) -> dict[str, Any]:
    """A JSON request body, ASCII-escaped, so an unpaired surrogate travels as ``\\ud800``."""
    return {"content": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}}


def _manifest(**overrides: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = {"title": "Hostile", "clips": [{"prompt": "a beach", "duration": 1.0},
                                                              {"prompt": "a city", "duration": 1.0}],
                                "transitions": [{"kind": "crossfade", "duration": 0.3}]}
    manifest.update(overrides)
    return manifest


async def _create(client: httpx.AsyncClient, manifest: dict[str, Any], *, clip_name: str = "clip.mp4",
                  audio_name: str = "track.wav") -> httpx.Response:
    clips = len(manifest.get("clips") or [])
    files = [("clips", (clip_name, MP4_HEAD, "video/mp4")) for _ in range(clips)]
    files.append(("audio", (audio_name, WAV_HEAD, "audio/wav")))
    return await client.post("/api/v1/jobs", data={"manifest": json.dumps(manifest)}, files=files)


def _refused(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "invalid_input" and not error["retryable"]
    return str(error["message"])


# ---------------------------------------------------------------------------------------------
# The manifest


@pytest.mark.parametrize("name", sorted(STORED))
async def test_hostile_prompts_and_titles_are_stored_as_sent(client: httpx.AsyncClient, backend: Backend,
                                                             name: str) -> None:
    text = STORED[name]
    response = await _create(client, _manifest(title=text[:200], clips=[{"prompt": text, "duration": 1.0},
                                                                        {"prompt": "b", "duration": 1.0}]))
    assert response.status_code == 202, response.text
    [request] = backend.status.created
    assert request.title == text[:200] and request.clips[0].prompt == text.strip()
    job = (await client.get(f"/api/v1/jobs/{response.json()['id']}")).json()
    assert job["title"] == text[:200] and job["clips"][0]["prompt"] == text.strip()


@pytest.mark.parametrize("name", sorted(REFUSED))
@pytest.mark.parametrize("field", ["title", "prompt"])
async def test_unstorable_prompts_and_titles_are_422(client: httpx.AsyncClient, backend: Backend,
                                                     name: str, field: str) -> None:
    text = REFUSED[name]
    manifest = _manifest(title=text) if field == "title" else \
        _manifest(clips=[{"prompt": text, "duration": 1.0}, {"prompt": "b", "duration": 1.0}])
    message = _refused(await _create(client, manifest))
    # The manifest's JSON parser refuses an escaped unpaired surrogate itself.
    expected = "not valid JSON" if name == "lone_surrogate" else \
        f"manifest.{'title' if field == 'title' else 'clips.0.prompt'}"
    assert expected in message
    assert backend.status.created == []


@pytest.mark.parametrize("text", [*STORED.values(), "CROSSFADE", "crossfade ", "xfade=fade", ""])
async def test_hostile_transition_kinds_are_422_at_upload(client: httpx.AsyncClient, backend: Backend,
                                                          text: str) -> None:
    message = _refused(await _create(client, _manifest(transitions=[{"kind": text, "duration": 0.3}])))
    assert "manifest.transitions.0.kind" in message
    assert backend.status.created == []


@pytest.mark.parametrize("field", ["aspect_ratio", "fit", "budget_limit"])
@pytest.mark.parametrize("name", ["filter_graph", "shell", "path", "huge"])
async def test_hostile_choices_and_amounts_are_422(client: httpx.AsyncClient, backend: Backend,
                                                   field: str, name: str) -> None:
    text = {**STORED, **REFUSED}[name]
    message = _refused(await _create(client, _manifest(**{field: text})))
    assert f"manifest.{field}" in message
    assert backend.status.created == []


async def test_a_manifest_that_is_not_json_is_422(client: httpx.AsyncClient, backend: Backend) -> None:
    for text in ["'[0:v]null", "$(id)", "{\"clips\": [}", "\ud800".encode("utf-8", "surrogatepass").decode("latin-1")]:
        files = [("clips", ("c.mp4", MP4_HEAD, "video/mp4")), ("audio", ("a.wav", WAV_HEAD, "audio/wav"))]
        response = await client.post("/api/v1/jobs", data={"manifest": text}, files=files)
        _refused(response)
    assert backend.status.created == []


# ---------------------------------------------------------------------------------------------
# File names and form part names


@pytest.mark.parametrize("name", [*STORED.values(), "..\\..\\windows\\win.ini", "/etc/passwd", "a\x00b.mp4"])
async def test_file_names_never_reach_a_key_or_a_path(client: httpx.AsyncClient, backend: Backend,
                                                      storage: LocalStorage, tmp_path: Path, name: str) -> None:
    response = await _create(client, _manifest(), clip_name=name, audio_name=name)
    assert response.status_code == 202, response.text
    [request] = backend.status.created
    keys = [clip.video_key for clip in request.clips] + [request.audio_key]
    prefix = f"jobs/{request.job_id.replace('-', '')}/inputs/"
    for key in keys:
        assert key.startswith(prefix) and check_key(key) == key
        assert ".." not in key and "passwd" not in key and "win.ini" not in key
    assert [await storage.get_bytes(key) for key in keys] == [MP4_HEAD, MP4_HEAD, WAV_HEAD]
    stored = await asyncio.to_thread(lambda: sorted(p for p in tmp_path.rglob("*") if p.is_file()))
    assert all(p.is_relative_to(tmp_path / "storage") for p in stored), stored


async def test_a_file_name_too_long_for_its_part_headers_is_413(client: httpx.AsyncClient,
                                                                backend: Backend) -> None:
    response = await _create(client, _manifest(), clip_name="ü" * 5000)
    assert response.status_code == 413 and error_of(response)["code"] == "payload_too_large"
    assert backend.status.created == []


@pytest.mark.parametrize("part", ["../../etc/passwd", "manifest\r\nX-Injected: 1", "$(id)", "'[0:v]", "ü" * 300])
async def test_unexpected_form_parts_are_422(client: httpx.AsyncClient, backend: Backend, part: str) -> None:
    boundary = "hostileboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{part}\"\r\n\r\nvalue\r\n"
            f"--{boundary}--\r\n").encode()
    response = await client.post("/api/v1/jobs", content=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "invalid_input"
    assert backend.status.created == []


# ---------------------------------------------------------------------------------------------
# Instructions and history


@pytest.mark.parametrize("name", sorted(STORED))
async def test_hostile_instructions_and_history_are_stored_as_sent(client: httpx.AsyncClient, backend: Backend,
                                                                   name: str) -> None:
    text = STORED[name]
    job = backend.status.add_job(make_job("alice", budget_limit="100"))
    history = [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
    response = await client.post(f"/api/v1/jobs/{job.job_id}/clips/1/regenerate",
                                 **_json({"instruction": text, "conversation_history": history}))
    assert response.status_code == 202, response.text
    [regen] = backend.status.regenerations[job.job_id]
    assert regen.user_instruction == text.strip()
    assert [{"role": turn.role, "content": turn.content} for turn in regen.conversation_history] == history
    [listed] = (await client.get(f"/api/v1/jobs/{job.job_id}/regenerations")).json()["regenerations"]
    assert listed["instruction"] == text.strip()


@pytest.mark.parametrize("name", sorted(REFUSED))
@pytest.mark.parametrize("field", ["instruction", "history"])
async def test_unstorable_instructions_and_history_are_422(client: httpx.AsyncClient, backend: Backend,
                                                           field: str, name: str) -> None:
    text = REFUSED[name]
    job = backend.status.add_job(make_job("alice", budget_limit="100"))
    body = {"instruction": text} if field == "instruction" else \
        {"instruction": "make it nighttime", "conversation_history": [{"role": "user", "content": text}]}
    message = _refused(await client.post(f"/api/v1/jobs/{job.job_id}/clips/0/regenerate", **_json(body)))
    assert ("instruction" in message) if field == "instruction" else ("conversation_history.0.content" in message)
    assert backend.status.regenerations[job.job_id] == []


@pytest.mark.parametrize("role", ["system", "../../etc/passwd", "user\r\n", "$(id)"])
async def test_hostile_history_roles_are_422(client: httpx.AsyncClient, backend: Backend, role: str) -> None:
    job = backend.status.add_job(make_job("alice"))
    body = {"instruction": "make it nighttime", "conversation_history": [{"role": role, "content": "hi"}]}
    _refused(await client.post(f"/api/v1/jobs/{job.job_id}/clips/0/regenerate", **_json(body)))
    assert backend.status.regenerations[job.job_id] == []


async def test_a_body_that_is_not_utf8_json_is_422(client: httpx.AsyncClient, backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice"))
    for body in [b"UZ\xff\xfe{", b"{\"instruction\": \"\xff\"}", b"'[0:v]", b"\x00" * 10]:
        response = await client.post(f"/api/v1/jobs/{job.job_id}/clips/0/regenerate", content=body,
                                     headers={"Content-Type": "application/json"})
        _refused(response)
    assert backend.status.regenerations[job.job_id] == []


# ---------------------------------------------------------------------------------------------
# Query parameters, headers and paths


@pytest.mark.parametrize("text", [*STORED.values(), "null", "-1", "1e3", "99999999999999999999999"])
async def test_hostile_query_parameters_and_resume_ids_are_4xx(client: httpx.AsyncClient, backend: Backend,
                                                              text: str) -> None:
    job = backend.status.add_job(make_job("alice"))
    for response in [await client.get("/api/v1/jobs", params={"cursor": text}),
                     await client.get("/api/v1/jobs", params={"limit": text}),
                     await client.get(f"/api/v1/jobs/{job.job_id}/events", params={"after": text})]:
        _refused(response)
    # Header values travel as bytes: only what HTTP can carry (no CR or LF) is tried there.
    header = text.encode().replace(b"\r", b"").replace(b"\n", b"")
    _refused(await client.get(f"/api/v1/jobs/{job.job_id}/events", headers={b"Last-Event-ID": header}))
    ticket = await client.get(f"/api/v1/jobs/{job.job_id}/events", params={"ticket": text},
                              headers={"Authorization": ""})
    assert ticket.status_code == 401 and error_of(ticket)["code"] == "invalid_ticket"


@pytest.mark.parametrize("text", [*STORED.values()])
async def test_hostile_tokens_and_forwarded_addresses_are_401(make_settings: SettingsFactory,
                                                              storage: LocalStorage, text: str) -> None:
    header = text.encode().replace(b"\r", b"").replace(b"\n", b"")
    settings = make_settings(auth_failures_per_minute=1000)
    async with running(create_app(settings, storage=storage)) as client:
        response = await client.get("/api/v1/jobs", headers={b"Authorization": b"Bearer " + header,
                                                             b"X-Forwarded-For": header})
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_token"


@pytest.mark.parametrize("path", ["/api/v1/jobs/..%2F..%2Fetc%2Fpasswd", "/api/v1/jobs/%24(id)",
                                  "/api/v1/jobs/'%5B0:v%5D", "/api/v1/jobs/%0d%0aX-Injected:%201/clips",
                                  "/api/v1/jobs/" + "%E2%80%AE" * 200])
async def test_hostile_job_ids_are_404(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"
    assert "X-Injected" not in response.headers


@pytest.mark.parametrize("key", ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd",
                                 "jobs/x/../../../etc/passwd", "$(id)", "'[0:v]"])
async def test_hostile_media_keys_read_no_file(client: httpx.AsyncClient, key: str) -> None:
    response = await client.get(f"/api/v1/media/{key}", params={"exp": "9999999999", "sig": "x" * 64})
    assert response.status_code in (403, 404), response.text
    assert "root:" not in response.text


# ---------------------------------------------------------------------------------------------
# Logs


async def test_user_text_cannot_forge_a_log_line(client: httpx.AsyncClient, backend: Backend) -> None:
    """Every gateway log record is one line, as JSON and as plain text, whatever the request held.

    The JSON formatter escapes CR, LF and every other control character in the event and its fields;
    a plain-text formatter prints the event name only, which is always a constant.
    """
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    forged = "\r\n{\"level\": \"error\", \"event\": \"forged\"}\n\x1b[2K\u2028forged"
    keep = Keep(level=logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(keep)
    previous = root.level
    root.setLevel(logging.DEBUG)
    try:
        job = backend.status.add_job(make_job("alice"))
        from clipchat.errors import DependencyUnavailable
        backend.status.fail["GetJob"] = DependencyUnavailable("down")
        await client.get(f"/api/v1/jobs/{job.job_id}", headers={"X-Forwarded-For": "1.2.3.4"},
                         params={"cursor": forged})
        backend.status.fail.clear()
        await _create(client, _manifest(title=forged[:200]), clip_name=forged, audio_name=forged)
        await client.post(f"/api/v1/jobs/{job.job_id}/clips/0/regenerate",
                          **_json({"instruction": forged, "conversation_history": [{"role": "user",
                                                                                    "content": forged}]}))
        await client.get("/api/v1/jobs/" + "%0d%0aforged", params={"cursor": forged})
        await client.get(f"/api/v1/media/{quote(forged)}")
    finally:
        root.removeHandler(keep)
        root.setLevel(previous)
    served = [r for r in records if r.name != "httpx"]  # httpx logs this test's own client requests
    assert any(r.name == "clipchat.gateway" for r in served), "no gateway log line was captured"
    json_formatter, plain = JsonFormatter(), logging.Formatter("%(levelname)s %(name)s %(message)s")
    for record in served:
        as_json = json_formatter.format(record)
        assert "\n" not in as_json and "\r" not in as_json and "\x1b" not in as_json, as_json
        assert json.loads(as_json)["event"] == record.getMessage()
        as_text = plain.format(record)
        assert "\n" not in as_text and "\r" not in as_text and "forged" not in as_text, as_text


def test_the_json_formatter_escapes_user_text_in_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("clipchat.test_hostile_input")
    logger.addHandler(handler)
    logger.propagate = False
    text = "a\r\nb\x00c\x1bd\u2028e\u202ef"
    try:
        logger.warning("gateway.example", extra={"instruction": text, "path": "/x\r\n/y"})
    finally:
        logger.removeHandler(handler)
    [line] = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["instruction"] == text and entry["path"] == "/x\r\n/y" and entry["event"] == "gateway.example"
