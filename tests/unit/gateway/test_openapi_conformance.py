"""schemathesis against the gateway's ``/openapi.json``: the document says what the server does.

What runs: the gateway app behind a real uvicorn server on 127.0.0.1 (in a thread of the test
process), in front of the rig's fake status, regenerator and composer services over real gRPC,
with local storage and a Bearer token of the rig. schemathesis's own command line runs in a child
process against it: the examples, coverage, fuzzing and stateful phases (the stateful phase follows
the document's links from ``POST /jobs`` to the job's operations), with the checks below.

Why a uvicorn server rather than schemathesis's ASGI transport: the gateway is only ever reached
over HTTP through uvicorn, whose parser decides what a header, a path or a multipart body can hold
before the app sees it (hostile bytes included), and the event stream and the upload reader stream
from the socket. The ASGI transport would skip that layer and run the app without its lifespan
(the gRPC channels are opened there). Why the rig's fakes rather than the real services: this test
is about the HTTP contract; the fakes raise the same domain errors over real gRPC, so every status
mapping is exercised, and the run stays short and needs no PostgreSQL or RabbitMQ.

Two adaptations, both outside the gateway: an event stream is cut right after its headers (a live
stream never ends, and its status, headers and content type are what the checks read), and in
schemathesis's process a hook gives the clip and audio files of positive ``POST /jobs`` cases the
first bytes of a real MP4 and MP3 (what a file is comes from its content, which no schema can say),
so jobs get created and the stateful phase has something to follow.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clipchat.rpc import create_server
from clipchat.settings import Settings
from clipchat.storage.local import LocalStorage
from clipchat.v1 import composer_pb2_grpc, jobs_pb2_grpc, regenerator_pb2_grpc
from gateway.app import create_app
from tests.unit.gateway.gateway_rig import (
    ALICE,
    BOB,
    FakeComposer,
    FakeRegenerator,
    FakeStatus,
    error_of,
    make_job,
    served,
)

ROOT = Path(__file__).resolve().parents[3]
# Cases per operation and phase: about a minute for the whole run on two cores.
MAX_EXAMPLES = 12
# A fixed seed: the same cases every run, so a failure here is a change in the gateway.
SEED = 20261129
CHECKS = ",".join([
    "not_a_server_error",             # no 5xx
    "status_code_conformance",        # every status is documented for its operation
    "content_type_conformance",       # the Content-Type is one the document names
    "response_schema_conformance",    # the body matches the documented schema
    "response_headers_conformance",   # documented headers are present and valid
    "allow_header_conformance",       # a 405's Allow lists the path's documented methods
    "negative_data_rejection",        # what the schema forbids is refused with a 4xx
    "ignored_auth",                   # without the token, a 401
])
MP4_HEAD = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + bytes(32)
MP3_HEAD = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(54)


class _EventStreamsEndAtOnce:
    """Ends a ``text/event-stream`` answer right after its headers; every other answer is untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers_sent = asyncio.Event()

        async def send_headers_only(message: Message) -> None:
            if headers_sent.is_set():
                return
            await send(message)
            if message["type"] == "http.response.start" and any(
                    name == b"content-type" and value.startswith(b"text/event-stream")
                    for name, value in message["headers"]):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                headers_sent.set()

        app_task = asyncio.ensure_future(self.app(scope, receive, send_headers_only))
        cut = asyncio.ensure_future(headers_sent.wait())
        await asyncio.wait({app_task, cut}, return_when=asyncio.FIRST_COMPLETED)
        cut.cancel()
        if not app_task.done():
            app_task.cancel()
        try:
            await app_task
        except asyncio.CancelledError:
            pass


@dataclass
class _Gateway:
    url: str
    status: FakeStatus


@contextmanager
def _gateway_in_thread(data_dir: Path) -> Iterator[_Gateway]:
    """The gateway and the rig's fake services, served from an event loop in another thread."""
    ready = threading.Event()
    started: dict[str, Any] = {}
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        status = FakeStatus()  # type: ignore[abstract]  # implements only what the gateway calls
        status.add_job(make_job("alice"))
        servers = [
            await create_server([(jobs_pb2_grpc.add_JobStatusServiceServicer_to_server, status,
                                  "clipchat.v1.JobStatusService")]),
            await create_server([(regenerator_pb2_grpc.add_RegeneratorServiceServicer_to_server,
                                  FakeRegenerator(status), "clipchat.v1.RegeneratorService")]),
            await create_server([(composer_pb2_grpc.add_ComposerServiceServicer_to_server,
                                  FakeComposer(),  # type: ignore[abstract]  # answers only Describe
                                  "clipchat.v1.ComposerService")]),
        ]
        status_addr, regenerator_addr, composer_addr = (f"127.0.0.1:{s.port}" for s in servers)
        settings = Settings(
            data_dir=data_dir, status_addr=status_addr, regenerator_addr=regenerator_addr,
            composer_addr=composer_addr, auth_tokens=f"{ALICE}=alice,{BOB}=bob",
            media_signing_key="test-signing-key", page_token="", grpc_deadline_seconds=5.0,
            # The run sends thousands of requests, many deliberately without a valid token.
            rate_limit_per_minute=1_000_000, auth_failures_per_minute=1_000_000)
        app = create_app(settings, storage=LocalStorage(data_dir / "storage"))
        try:
            async with served(_EventStreamsEndAtOnce(app)) as url:  # type: ignore[arg-type]  # uvicorn runs the lifespan
                started["gateway"] = _Gateway(url, status)
                ready.set()
                await stop.wait()
        finally:
            for server in servers:
                await server.stop(0)

    def run() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:
            started["error"] = exc
        finally:
            ready.set()
            leftovers = asyncio.all_tasks(loop)  # tasks the stopped server left behind, if any
            for task in leftovers:
                task.cancel()
            if leftovers:  # gather() of nothing looks for this thread's (unset) current loop
                loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))

    thread = threading.Thread(target=run, name="gateway-under-test", daemon=True)
    thread.start()
    ready.wait(60)
    if "gateway" not in started:
        raise RuntimeError("the gateway did not start") from started.get("error")
    try:
        yield started["gateway"]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


@pytest.mark.timeout(300)
def test_the_gateway_does_what_its_openapi_document_says(tmp_path: Path) -> None:
    with _gateway_in_thread(tmp_path) as gateway:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{gateway.url}/openapi.json",
             "--phases", "examples,coverage,fuzzing,stateful", "--checks", CHECKS,
             "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
             "--header", f"Authorization: Bearer {ALICE}", "--request-timeout", "20",
             "--suppress-health-check", "all", "--no-color"],
            env={**os.environ, "SCHEMATHESIS_HOOKS": __name__, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
            capture_output=True, text=True, timeout=280, check=False)
        created, regenerations = list(gateway.status.created), dict(gateway.status.regenerations)
    report = run.stdout[-12_000:] + run.stderr[-4_000:]
    assert run.returncode == 0, report
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅\s+{phase}", report), f"{phase} did not run and pass:\n{report}"
    # How many links a run covers varies with the jobs it happens to create (7 to 28 seen with this
    # seed); that it followed some, and reached regenerations through them, is what must hold.
    links = re.search(r"API Links:\s+(\d+) covered", report)
    assert links and int(links.group(1)) >= 5, f"the stateful phase followed few links:\n{report}"
    # Positive uploads made jobs, and the links from them reached the jobs' operations.
    assert created, report
    assert any(rows for job_id, rows in regenerations.items() if job_id in {c.job_id for c in created}), report


async def test_the_document_says_the_manifest_is_json_and_links_a_job_to_its_operations(
        client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    create = document["paths"]["/api/v1/jobs"]["post"]
    form = create["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]["properties"]["manifest"] == {"$ref": "#/components/schemas/JobManifest"}
    assert form["encoding"]["manifest"]["contentType"] == "application/json"
    assert form["schema"]["additionalProperties"] is False
    manifest = document["components"]["schemas"]["JobManifest"]
    assert manifest["properties"]["clips"]["maxItems"] == 100
    links = create["responses"]["202"]["links"]
    assert links["GetJob"]["parameters"] == {"job_id": "$response.body#/id"}
    targets = {link["operationRef"] for link in links.values()}
    for target in targets:  # every link names an operation that exists
        path, method = target.removeprefix("#/paths/").rsplit("/", 1)
        assert method in document["paths"][path.replace("~1", "/").replace("~0", "~")], target
    assert len(targets) == 7
    clip_index = next(p for p in document["paths"]["/api/v1/jobs/{job_id}/clips/{clip_index}/regenerate"]["post"]
                      ["parameters"] if p["name"] == "clip_index")
    assert (clip_index["schema"]["minimum"], clip_index["schema"]["maximum"]) == (0, 99)


async def test_optional_parameters_are_never_null_and_last_event_id_is_digits(client: httpx.AsyncClient,
                                                                              backend: Any) -> None:
    document = (await client.get("/openapi.json")).json()
    for operations in document["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                assert {"type": "null"} not in parameter["schema"].get("anyOf", []), parameter
    events = document["paths"]["/api/v1/jobs/{job_id}/events"]["get"]
    [header] = [p for p in events["parameters"] if p["in"] == "header"]
    assert header["schema"]["pattern"] == "^[0-9]{1,18}$"
    job = backend.status.add_job(make_job("alice"))
    for value in ["null", "", " 7", "-1", "1e3", "9" * 19]:
        response = await client.get(f"/api/v1/jobs/{job.job_id}/events", headers={"Last-Event-ID": value})
        assert response.status_code == 422 and error_of(response)["code"] == "invalid_input", value


async def test_a_wrong_method_names_every_method_of_the_path(client: httpx.AsyncClient) -> None:
    for path, allowed in [("/api/v1/jobs", "GET, POST"), ("/api/v1/healthz", "GET")]:
        response = await client.options(path)
        assert response.status_code == 405 and error_of(response)["code"] == "method_not_allowed"
        assert response.headers["Allow"] == allowed


# ---------------------------------------------------------------------------------------------
# Hooks, registered in schemathesis's process only (SCHEMATHESIS_HOOKS names this module).

def _with_real_file_heads(_: Any, case: Any) -> Any:
    """A positive ``POST /jobs`` case whose files start like a real MP4 (each clip) and MP3."""
    body = case.body
    positive = case.meta is not None and case.meta.generation.mode == schemathesis.GenerationMode.POSITIVE
    if positive and isinstance(body, dict) and isinstance(body.get("manifest"), dict):
        clips = body["manifest"].get("clips")
        if isinstance(clips, list) and clips:
            body["clips"] = [MP4_HEAD for _ in clips]
            body["audio"] = MP3_HEAD
    return case


if os.environ.get("SCHEMATHESIS_HOOKS") == __name__:
    schemathesis.hook("map_case").apply_to(  # type: ignore[attr-defined]
        method="POST", path="/api/v1/jobs")(_with_real_file_heads)

