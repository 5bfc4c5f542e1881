"""Limits with clear answers: the operator's budget cap, known transitions, request size, and
gRPC RESOURCE_EXHAUSTED that is not about the budget."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, get_args

import grpc
import httpx
import pytest

from clipchat.errors import BudgetExceeded, ClipChatError
from clipchat.storage.local import LocalStorage
from gateway.app import create_app
from gateway.errors import from_domain_error
from gateway.schemas import TransitionKind
from services.composer.timeline import CUT, TRANSITIONS
from tests.unit.gateway.gateway_rig import Backend, SettingsFactory, error_of, make_job, running

MP4 = b"\0\0\0\x20ftypisom\0\0\2\0" + b"\0" * 2000
WAV = b"RIFF\x24\0\0\0WAVEfmt " + b"\0" * 2000
CLIP = {"prompt": "a beach", "duration": 1.0}


def _files(clips: int = 2) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [*[("clips", ("clip.mp4", MP4, "video/mp4"))] * clips, ("audio", ("a.wav", WAV, "audio/wav"))]


def _manifest(**fields: Any) -> dict[str, str]:
    return {"manifest": json.dumps({"clips": [CLIP, CLIP], **fields})}


def test_transition_kinds_are_the_composers() -> None:
    assert set(get_args(TransitionKind)) == {CUT, *TRANSITIONS}


async def test_budget_limit_up_to_the_operator_maximum_is_accepted(
        make_settings: SettingsFactory, storage: LocalStorage, backend: Backend) -> None:
    async with running(create_app(make_settings(max_budget_limit=100), storage=storage)) as client:
        response = await client.post("/api/v1/jobs", data=_manifest(budget_limit="100.00"), files=_files())
    assert response.status_code == 202, response.text
    assert backend.status.created[0].budget_limit == "100.00"


async def test_budget_limit_above_the_operator_maximum_is_422(
        make_settings: SettingsFactory, storage: LocalStorage, backend: Backend) -> None:
    async with running(create_app(make_settings(max_budget_limit=100), storage=storage)) as client:
        response = await client.post("/api/v1/jobs", data=_manifest(budget_limit="100.0001"),
                                     files=_files())
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_input" and not error["retryable"]
    assert error["message"] == "Invalid request: manifest.budget_limit: at most 100 on this server."
    assert backend.status.created == [] and await storage.list("jobs/") == []


async def test_the_default_maximum_refuses_huge_budgets(client: httpx.AsyncClient, backend: Backend) -> None:
    response = await client.post("/api/v1/jobs", data=_manifest(budget_limit="9999999999"), files=_files())
    assert response.status_code == 422 and "at most 10000" in error_of(response)["message"]
    assert backend.status.created == []


@pytest.mark.parametrize("kind", ["spin", "CROSSFADE", "fade ", "", "xfade=fade:duration=1"])
async def test_unknown_transition_kind_is_422_at_upload(client: httpx.AsyncClient, backend: Backend,
                                                        storage: LocalStorage, kind: str) -> None:
    response = await client.post("/api/v1/jobs", data=_manifest(transitions=[{"kind": kind, "duration": 0.2}]),
                                 files=_files())
    assert response.status_code == 422
    message = error_of(response)["message"]
    assert message.startswith("Invalid request: manifest.transitions.0.kind: ")
    assert "'crossfade'" in message and "'cut'" in message
    assert backend.status.created == [] and await storage.list("jobs/") == []


@pytest.mark.parametrize("kind", sorted(get_args(TransitionKind)))
async def test_every_known_transition_kind_is_accepted(client: httpx.AsyncClient, backend: Backend,
                                                       kind: str) -> None:
    response = await client.post("/api/v1/jobs", data=_manifest(transitions=[{"kind": kind, "duration": 0.2}]),
                                 files=_files())
    assert response.status_code == 202, response.text
    assert backend.status.created[0].transitions[0].kind == kind


async def test_request_over_the_total_is_413_from_its_content_length(
        make_settings: SettingsFactory, storage: LocalStorage, backend: Backend) -> None:
    # Each file is under the per-file limit; together they are over the request limit.
    settings = make_settings(max_upload_bytes=len(MP4) + 1, max_request_bytes=2 * len(MP4))
    async with running(create_app(settings, storage=storage)) as client:
        response = await client.post("/api/v1/jobs", data=_manifest(), files=_files())
    assert response.status_code == 413
    error = error_of(response)
    assert error == {"code": "payload_too_large", "retryable": False,
                     "message": "The upload is larger than 0.0 MiB in all. Send fewer or smaller files."}
    assert backend.status.created == [] and await storage.list("jobs/") == []


async def test_request_over_the_total_is_413_while_streaming(
        make_settings: SettingsFactory, storage: LocalStorage, backend: Backend) -> None:
    settings = make_settings(max_request_bytes=3 * 1024 * 1024)
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"clips\"; filename=\"c.mp4\"\r\n"
            "Content-Type: video/mp4\r\n\r\n").encode() + MP4

    async def body() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        yield head
        for _ in range(8):
            yield b"\0" * (512 * 1024)

    async with running(create_app(settings, storage=storage)) as client:
        response = await client.post("/api/v1/jobs", content=body(),
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413
    assert error_of(response)["message"] == ("The upload is larger than 3 MiB in all. Send fewer or "
                                             "smaller files.")
    assert backend.status.created == []


async def test_oversized_part_headers_are_413(client: httpx.AsyncClient, backend: Backend) -> None:
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"clips\"; filename=\"c.mp4\"\r\n"
            f"X-Padding: {'p' * 20_000}\r\n\r\n").encode() + MP4 + f"\r\n--{boundary}--\r\n".encode()
    response = await client.post("/api/v1/jobs", content=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413
    assert error_of(response) == {"code": "payload_too_large", "retryable": False,
                                  "message": "A form part's headers are too large."}
    assert backend.status.created == []


async def test_an_answer_over_the_grpc_size_limit_is_not_a_budget_error(client: httpx.AsyncClient,
                                                                        backend: Backend) -> None:
    for _ in range(17):  # 17 × 1 MiB titles: over the 16 MiB a gateway channel receives
        job = make_job("alice")
        job.title = "t" * (1024 * 1024)
        backend.status.add_job(job)
    response = await client.get("/api/v1/jobs")
    assert response.status_code == 503
    error = error_of(response)
    assert error["code"] == "resource_exhausted" and not error["retryable"]
    assert "budget" not in error["message"].lower() and "larger than max" not in error["message"]


async def test_a_budget_refusal_from_a_service_is_still_402(client: httpx.AsyncClient,
                                                            backend: Backend) -> None:
    job = backend.status.add_job(make_job("alice"))
    backend.status.fail["GetJob"] = BudgetExceeded("Over budget.")
    response = await client.get(f"/api/v1/jobs/{job.job_id}")
    assert response.status_code == 402
    assert error_of(response) == {"code": "budget_exceeded", "message": "Over budget.", "retryable": False}


def test_resource_exhausted_mapping() -> None:
    assert from_domain_error(BudgetExceeded())[0] == 402  # raised in the gateway itself
    rate_limited = ClipChatError("Slow down.", code="rate_limited")
    rate_limited.status = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert from_domain_error(rate_limited)[0] == 429
    other = ClipChatError("Received message larger than max (5 vs. 4)", code="quota")
    other.status = grpc.StatusCode.RESOURCE_EXHAUSTED
    status, body = from_domain_error(other)
    assert (status, body.code, body.retryable) == (503, "resource_exhausted", False)
    assert "larger than max" not in body.message


async def test_too_many_part_headers_are_413(client: httpx.AsyncClient, backend: Backend) -> None:
    boundary = "b0undary"
    lines = "".join(f"X-H{i}: v\r\n" for i in range(50))
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"clips\"; filename=\"c.mp4\"\r\n"
            f"{lines}\r\n").encode() + MP4 + f"\r\n--{boundary}--\r\n".encode()
    response = await client.post("/api/v1/jobs", content=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and error_of(response)["code"] == "payload_too_large"
    assert backend.status.created == []
