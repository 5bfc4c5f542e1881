"""Jobs: create one from uploads, read them, their clips and video versions, restore a version."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Annotated, Any

import anyio
import grpc
from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from pydantic import ValidationError

from clipchat.errors import ClipChatError
from clipchat.rpc import call
from clipchat.settings import Settings
from clipchat.storage import Storage, job_prefix, new_key
from clipchat.v1 import common_pb2, jobs_pb2
from gateway.deps import DownstreamDep, JobId, LimitedOwner, Owner, SettingsDep, SignerDep, StorageDep
from gateway.errors import describe_validation_errors, documented, invalid_input
from gateway.schemas import (
    MAX_CLIPS,
    ClipList,
    JobList,
    JobManifest,
    JobOut,
    VersionList,
    clips_out,
    job_out,
    version_out,
)
from gateway.uploads import MediaKind, ReceivedFile, Sniffed, receive_multipart, sniff

log = logging.getLogger("clipchat.gateway")

router = APIRouter(prefix="/api/v1", tags=["jobs"])

# Uploads run a few at a time: enough to hide S3 latency without opening a hundred connections.
_UPLOAD_CONCURRENCY = 4
# CreateJob answers that say for sure no job was made, so its uploaded inputs can go.
_REFUSED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                      grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
                      grpc.StatusCode.ALREADY_EXISTS})

_CREATE_JOB_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["manifest", "clips", "audio"],
                "additionalProperties": False,
                "properties": {
                    # gateway.openapi puts JobManifest's schema under components.
                    "manifest": {"$ref": "#/components/schemas/JobManifest"},
                    "clips": {"type": "array", "items": {"type": "string", "format": "binary"},
                              "minItems": 1, "maxItems": MAX_CLIPS,
                              "description": "One video (MP4, MOV, WebM, MKV) per manifest clip, in "
                                             "order. What a file is comes from its first bytes."},
                    "audio": {"type": "string", "format": "binary",
                              "description": "The music track (MP3, WAV, M4A, FLAC)."},
                },
            },
            "encoding": {"manifest": {"contentType": "application/json"}},
        }},
    },
}

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200

VersionNumber = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="A video version number.")]


@router.post("/jobs", status_code=202, response_model=JobOut, summary="Create a job from uploads",
             responses=documented(401, 413, 422, 429), openapi_extra=_CREATE_JOB_BODY)
async def create_job(request: Request, response: Response, owner: LimitedOwner, settings: SettingsDep,
                     downstream: DownstreamDep, storage: StorageDep, signer: SignerDep) -> JobOut:
    """Upload clips and a music track; the video is composed in the background (202).

    Files are checked by content, stored under keys the server makes, and the job is created by the
    status service, which starts the first composition. Follow it with ``GET /jobs/{id}/events``.
    """
    workdir = Path(await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="clipchat-upload-")))
    try:
        form = await receive_multipart(request, workdir, file_fields=frozenset({"clips", "audio"}),
                                       text_fields=frozenset({"manifest"}),
                                       max_file_bytes=settings.max_upload_bytes, max_files=MAX_CLIPS + 1,
                                       max_request_bytes=settings.max_request_bytes)
        manifest = _parse_manifest(form.fields.get("manifest"), settings)
        clips = _checked_files(form.files_named("clips"), "clips", len(manifest.clips))
        audio = _checked_files(form.files_named("audio"), "audio", 1)[0]
        job_id = str(uuid.uuid4())
        inputs = f"{job_prefix(job_id)}/inputs"
        clip_keys = [new_key(inputs, sniffed.suffix) for _, sniffed in clips]
        audio_key = new_key(inputs, audio[1].suffix)
        await _store_all(storage, [*zip(clip_keys, clips, strict=True), (audio_key, audio)])
        create = jobs_pb2.CreateJobRequest(
            job_id=job_id, owner=owner, title=manifest.title or "",
            clips=[jobs_pb2.ClipInput(prompt=spec.prompt, duration=spec.duration, video_key=key)
                   for spec, key in zip(manifest.clips, clip_keys, strict=True)],
            audio_key=audio_key,
            transitions=[common_pb2.Transition(kind=t.kind, duration=t.duration)
                         for t in manifest.transitions or []],
            beat_timestamps=manifest.beat_timestamps or [], aspect_ratio=manifest.aspect_ratio,
            fit=manifest.fit, budget_limit=str(manifest.budget_limit) if manifest.budget_limit else "")
        try:
            created = await call(downstream.status.CreateJob, create, timeout=settings.grpc_deadline_seconds)
        except ClipChatError as exc:
            if exc.status in _REFUSED:
                await _discard(storage, [*clip_keys, audio_key])
            raise
    finally:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(workdir, ignore_errors=True))
    log.info("gateway.job_created", extra={"job_id": job_id, "clips": len(clip_keys)})
    response.headers["Location"] = f"/api/v1/jobs/{job_id}"
    return job_out(created.job, signer, settings.budget_warning_fraction)


@router.get("/jobs", response_model=JobList, summary="The caller's jobs",
            responses=documented(401, 422))
async def list_jobs(owner: Owner, settings: SettingsDep, downstream: DownstreamDep, signer: SignerDep,
                    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE,
                                                description="Jobs on one page.")] = DEFAULT_PAGE_SIZE,
                    cursor: Annotated[str | None, Query(max_length=200, description="The next_cursor of "
                                                        "the previous page.")] = None) -> JobList:
    """The caller's jobs, newest first, a page at a time: follow ``next_cursor`` until it is null."""
    # The status service pages (keyed on creation time and job id, so jobs created meanwhile do
    # not shift the pages); its page token is the REST cursor, passed through as it is.
    reply = await call(downstream.status.ListJobs,
                       jobs_pb2.ListJobsRequest(owner=owner, page_size=limit, page_token=cursor or ""),
                       timeout=settings.grpc_deadline_seconds)
    return JobList(jobs=[job_out(job, signer, settings.budget_warning_fraction) for job in reply.jobs],
                   next_cursor=reply.next_page_token or None)


@router.get("/jobs/{job_id}", response_model=JobOut, summary="One job",
            responses=documented(401, 404))
async def get_job(job_id: JobId, owner: Owner, settings: SettingsDep, downstream: DownstreamDep,
                  signer: SignerDep) -> Response:
    """Status, current video, versions, clips, costs against the budget and the active regeneration."""
    job = await _get_job(downstream, settings.grpc_deadline_seconds, job_id, owner)
    # The API's most polled answer is rendered here: given a JobOut, FastAPI would validate it
    # again from its attributes before rendering the same JSON (JobOut validated when job_out built it).
    body = job_out(job, signer, settings.budget_warning_fraction).model_dump_json(by_alias=True)
    return Response(body, media_type="application/json")


@router.get("/jobs/{job_id}/clips", response_model=ClipList, summary="A job's clips",
            responses=documented(401, 404))
async def list_clips(job_id: JobId, owner: Owner, settings: SettingsDep, downstream: DownstreamDep,
                     signer: SignerDep) -> ClipList:
    job = await _get_job(downstream, settings.grpc_deadline_seconds, job_id, owner)
    return ClipList(clips=clips_out(job.clips, signer))


@router.get("/jobs/{job_id}/versions", response_model=VersionList, summary="A job's video versions",
            responses=documented(401, 404))
async def list_versions(job_id: JobId, owner: Owner, settings: SettingsDep, downstream: DownstreamDep,
                        signer: SignerDep) -> VersionList:
    job = await _get_job(downstream, settings.grpc_deadline_seconds, job_id, owner)
    versions = sorted((version_out(v, signer) for v in job.versions), key=lambda v: v.version)
    return VersionList(current_version=job.current_version, versions=versions)


@router.post("/jobs/{job_id}/versions/{version}/restore", response_model=JobOut,
             summary="Make an earlier version current", responses=documented(401, 404, 409, 429))
async def restore_version(job_id: JobId, version: VersionNumber, owner: LimitedOwner,
                          settings: SettingsDep, downstream: DownstreamDep, signer: SignerDep) -> JobOut:
    """The job's current video becomes ``version``; nothing is deleted. 409 while a regeneration runs."""
    reply = await call(downstream.status.RestoreVersion,
                       jobs_pb2.RestoreVersionRequest(job_id=job_id, owner=owner, version=version),
                       timeout=settings.grpc_deadline_seconds)
    return job_out(reply.job, signer, settings.budget_warning_fraction)


async def _get_job(downstream: DownstreamDep, deadline: float, job_id: str, owner: str) -> common_pb2.Job:
    reply = await call(downstream.status.GetJob, jobs_pb2.GetJobRequest(job_id=job_id, owner=owner),
                       timeout=deadline)
    return reply.job


def _parse_manifest(text: str | None, settings: Settings) -> JobManifest:
    if text is None:
        raise invalid_input("The form needs a 'manifest' field: JSON describing the clips.")
    try:
        manifest = JobManifest.model_validate_json(text)
    except ValidationError as exc:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            raise invalid_input("The 'manifest' field is not valid JSON.") from None
        raise invalid_input(describe_validation_errors(errors, prefix="manifest")) from None
    if manifest.budget_limit is not None and manifest.budget_limit > settings.max_budget_limit:
        raise invalid_input(f"Invalid request: manifest.budget_limit: at most "
                            f"{settings.max_budget_limit} on this server.")
    return manifest


def _checked_files(files: list[ReceivedFile], name: str, expected: int) -> list[tuple[ReceivedFile, Sniffed]]:
    """The files of one form field, in order, each recognised by content."""
    if len(files) != expected:
        what = "one 'clips' file per manifest clip" if name == "clips" else "exactly one 'audio' file"
        raise invalid_input(f"Send {what}: expected {expected}, got {len(files)}.")
    checked = []
    for index, received in enumerate(files):
        label = f"Clip {index}" if name == "clips" else "The audio file"
        if received.size == 0:
            raise invalid_input(f"{label} is empty.")
        kind: MediaKind = "video" if name == "clips" else "audio"
        sniffed = sniff(received.head, kind)
        if sniffed is None:
            accepted = "MP4, MOV, WebM or MKV video" if kind == "video" else "MP3, WAV, M4A or FLAC audio"
            raise invalid_input(f"{label} is not a supported file: send {accepted}.")
        checked.append((received, sniffed))
    return checked


async def _store_all(storage: Storage, items: list[tuple[str, tuple[ReceivedFile, Sniffed]]]) -> None:
    """Upload every file under its key; on failure remove what was stored and re-raise."""
    gate = asyncio.Semaphore(_UPLOAD_CONCURRENCY)
    stored: list[str] = []

    async def store(key: str, received: ReceivedFile, sniffed: Sniffed) -> None:
        async with gate:
            await storage.put_file(key, received.path, content_type=sniffed.content_type)
            stored.append(key)

    try:
        async with asyncio.TaskGroup() as group:
            for key, (received, sniffed) in items:
                group.create_task(store(key, received, sniffed))
    except BaseExceptionGroup as group_error:
        await _discard(storage, stored)
        raise group_error.exceptions[0] from None


async def _discard(storage: Storage, keys: list[str]) -> None:
    for key in keys:
        try:
            await storage.delete(key)
        except Exception:  # best effort: an orphaned input costs space, not correctness
            log.warning("gateway.discard_failed", extra={"key": key})
