"""The access log of ``clipchat serve gateway`` and of ``python -m gateway`` never holds a credential.

The gateway runs as ``serve gateway`` runs it (``launcher.system.start_gateway``: uvicorn's own
logging config, access log on through CLIPCHAT_GATEWAY_ACCESS_LOG) in front of the fake services.
What uvicorn prints, and the same records through ClipChat's JSON formatter, are captured while a
client uses its API token, an event-stream ticket, a signed media URL and a token in a URL. Then
``python -m gateway`` runs as a process of its own with the same setting, and what it prints is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from uvicorn.logging import AccessFormatter

from clipchat.storage.local import LocalStorage
from clipchat.telemetry import JsonFormatter
from gateway.access_log import ACCESS_LOGGER, REDACTED, redact_query
from launcher.system import start_gateway
from tests.conftest import free_port
from tests.e2e.conftest import ROOT
from tests.processes import spawn, stop_process
from tests.unit.gateway.gateway_rig import ALICE, BOB, Backend, SettingsFactory, make_job


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.text = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False)
        self.json = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += [self.text.format(record), self.json.format(record)]


@contextmanager
def _captured() -> Iterator[_Lines]:
    # Added once uvicorn has configured its logging, which replaces the access logger's handlers.
    handler = _Lines()
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def test_no_credential_reaches_the_access_log(make_settings: SettingsFactory, storage: LocalStorage,
                                                    backend: Backend, capsys: pytest.CaptureFixture[str]) -> None:
    job = backend.status.add_job(make_job("alice"))
    backend.status.add_event(job.job_id, "job.created")
    await storage.put_bytes(job.versions[-1].storage_key, b"\x00\x00\x00\x18ftypisom video")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    server, task = await start_gateway(make_settings(gateway_access_log=True), storage, sock)
    secrets: list[str] = [ALICE]
    with _captured() as captured:
        try:
            base = f"http://127.0.0.1:{sock.getsockname()[1]}"
            async with httpx.AsyncClient(base_url=base, timeout=10,
                                         headers={"Authorization": f"Bearer {ALICE}"}) as client:
                assert (await client.get("/api/v1/jobs", params={"limit": 1})).status_code == 200
                video_url = (await client.get(f"/api/v1/jobs/{job.job_id}")).json()["video_url"]
                secrets.append(video_url.rsplit("sig=", 1)[1])
                ticket = (await client.post(f"/api/v1/jobs/{job.job_id}/tickets")).json()["ticket"]
                secrets.append(ticket)
                media = await client.get(video_url, headers={"Authorization": ""})
                assert media.status_code == 200
                async with httpx.AsyncClient(base_url=base, timeout=10) as browser:
                    async with browser.stream("GET", f"/api/v1/jobs/{job.job_id}/events",
                                              params={"ticket": ticket, "after": 0}) as stream:
                        assert stream.status_code == 200
                        async for _ in stream.aiter_lines():
                            break
                    # An old client that still puts its token in the URL: refused, and not logged either.
                    in_url = await browser.get(f"/api/v1/jobs/{job.job_id}/events", params={"access_token": ALICE})
                    assert in_url.status_code == 401
        finally:
            server.should_exit = True
            await task
    printed = capsys.readouterr()
    lines = captured.lines + (printed.out + printed.err).splitlines()
    requests = [line for line in captured.lines if "HTTP/1.1" in line]
    assert len(requests) >= 2 * 6, captured.lines  # each request, as text and as JSON
    assert any("/events?" in line and f"ticket={REDACTED}" in line and "after=0" in line for line in lines)
    assert any("/api/v1/jobs?limit=1" in line for line in lines)
    assert any(f"sig={REDACTED}" in line for line in lines)
    for secret in secrets:
        assert not [line for line in lines if secret in line]


def _module_env(backend: Backend, data_dir: Path, port: int) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("CLIPCHAT_")}
    env.update({"CLIPCHAT_DATA_DIR": str(data_dir), "CLIPCHAT_GATEWAY_HOST": "127.0.0.1",
                "CLIPCHAT_GATEWAY_PORT": str(port), "CLIPCHAT_GATEWAY_ACCESS_LOG": "true",
                "CLIPCHAT_STATUS_ADDR": backend.status_addr, "CLIPCHAT_REGENERATOR_ADDR": backend.regenerator_addr,
                "CLIPCHAT_COMPOSER_ADDR": backend.composer_addr, "CLIPCHAT_AUTH_TOKENS": f"{ALICE}=alice,{BOB}=bob",
                "CLIPCHAT_MEDIA_SIGNING_KEY": "test-signing-key", "PYTHONUNBUFFERED": "1"})
    return env


async def _until_serving(base: str, proc: subprocess.Popen[str]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=2) as client:
        for _ in range(600):
            assert proc.poll() is None, "python -m gateway exited"
            try:
                if (await client.get("/api/v1/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("python -m gateway did not start")


async def test_python_m_gateway_logs_requests_without_credentials(backend: Backend, tmp_path: Path) -> None:
    job = backend.status.add_job(make_job("alice"))
    backend.status.add_event(job.job_id, "job.created")
    port, output = free_port(), tmp_path / "gateway.log"
    base = f"http://127.0.0.1:{port}"
    with output.open("w") as sink:
        proc = spawn([sys.executable, "-m", "gateway"], env=_module_env(backend, tmp_path, port), cwd=ROOT,
                     stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        await _until_serving(base, proc)
        async with httpx.AsyncClient(base_url=base, timeout=10,
                                     headers={"Authorization": f"Bearer {ALICE}"}) as client:
            ticket = (await client.post(f"/api/v1/jobs/{job.job_id}/tickets")).json()["ticket"]
        async with httpx.AsyncClient(base_url=base, timeout=10) as browser:
            async with browser.stream("GET", f"/api/v1/jobs/{job.job_id}/events",
                                      params={"ticket": ticket, "after": 0}) as stream:
                assert stream.status_code == 200
                async for _ in stream.aiter_lines():
                    break
            refused = await browser.get(f"/api/v1/jobs/{job.job_id}/events", params={"access_token": ALICE})
            assert refused.status_code == 401
    finally:
        stop_process(proc)
    lines = output.read_text().splitlines()
    access = [json.loads(line) for line in lines if '"logger": "uvicorn.access"' in line]
    logged = [entry["event"] for entry in access]
    assert any("/events?" in line and f"ticket={REDACTED}" in line and "after=0" in line for line in logged), lines
    assert any(f"access_token={REDACTED}" in line and line.endswith(" 401") for line in logged), lines
    assert any(f"/jobs/{job.job_id}/tickets" in line for line in logged), lines
    for secret in (ALICE, ticket):
        assert not [line for line in lines if secret in line]


@pytest.mark.parametrize(("path", "logged"), [
    ("/api/v1/jobs", "/api/v1/jobs"),
    ("/api/v1/jobs?limit=5&cursor=abc", "/api/v1/jobs?limit=5&cursor=abc"),
    ("/api/v1/jobs/x/events?ticket=1.YQ.ff&after=3", "/api/v1/jobs/x/events?ticket=[redacted]&after=3"),
    ("/api/v1/media/jobs/a/v.mp4?exp=99&sig=abcdef", "/api/v1/media/jobs/a/v.mp4?exp=99&sig=[redacted]"),
    ("/x?access_token=dev-token", "/x?access_token=[redacted]"),
    ("/x?dev-token", "/x?[redacted]=[redacted]"),
    ("/x?api_key=dev-token&limit=2", "/x?[redacted]=[redacted]&limit=2"),
    ("/x?", "/x?[redacted]"),
])
def test_query_values_are_redacted_but_paging(path: str, logged: str) -> None:
    assert redact_query(path) == logged
