"""A job's live events as Server-Sent Events, fed by the status service's ``WatchJob`` stream."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Header, Query
from sse_starlette import EventSourceResponse, ServerSentEvent

from clipchat.errors import ClipChatError
from clipchat.rpc import call, stream
from clipchat.v1 import jobs_pb2
from gateway.deps import Downstream, DownstreamDep, JobId, SettingsDep, SignerDep, StreamOwner
from gateway.errors import documented, from_domain_error, invalid_input
from gateway.schemas import event_out
from gateway.signing import MediaSigner

log = logging.getLogger("clipchat.gateway")

router = APIRouter(prefix="/api/v1", tags=["events"])

# The WatchJob deadline. The browser's EventSource reconnects with Last-Event-ID when a stream ends,
# so a bounded stream loses nothing and no gRPC call ever runs without a deadline.
WATCH_STREAM_SECONDS = 15 * 60
# A client that stops reading for this long is dropped instead of holding the stream open.
SEND_TIMEOUT_SECONDS = 30
# How long the browser waits before reconnecting after the stream ends.
RECONNECT_MILLISECONDS = 2000
_MAX_SEQUENCE = 2**63 - 1


@router.get(
    "/jobs/{job_id}/events", summary="Live job events (Server-Sent Events)",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "id: sequence, event: type, data: JSON {sequence, type, stage, "
                                    "fraction, payload, created_at}; ': ping' comments as heartbeats."},
               **documented(401, 404, 422)})
async def job_events(
    job_id: JobId, owner: StreamOwner, settings: SettingsDep, downstream: DownstreamDep, signer: SignerDep,
    after: Annotated[int | None, Query(ge=0, le=_MAX_SEQUENCE,
                                       description="Replay events after this sequence number.")] = None,
    last_event_id: Annotated[str | None, Header(description="Set by EventSource on reconnect.")] = None,
) -> EventSourceResponse:
    """Replay the job's events after ``Last-Event-ID`` (or ``?after=``), then follow new ones.

    Authenticate with ``Authorization: Bearer`` or ``?access_token=`` (EventSource cannot send
    headers). Heartbeat comments keep proxies from closing an idle stream.
    """
    after_sequence = _resume_point(last_event_id, after)
    # Ask once before streaming so an unknown job is a 404 JSON answer, not an empty stream.
    await call(downstream.status.GetJob, jobs_pb2.GetJobRequest(job_id=job_id, owner=owner),
               timeout=settings.grpc_deadline_seconds)
    request = jobs_pb2.WatchJobRequest(job_id=job_id, owner=owner, after_sequence=after_sequence)
    return EventSourceResponse(
        _events(downstream, request, signer), ping=settings.sse_heartbeat_seconds,
        send_timeout=SEND_TIMEOUT_SECONDS, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _resume_point(last_event_id: str | None, after: int | None) -> int:
    if last_event_id is not None and last_event_id.strip():
        try:
            value = int(last_event_id)
        except ValueError:
            raise invalid_input("Last-Event-ID must be an event sequence number.") from None
        if not 0 <= value <= _MAX_SEQUENCE:
            raise invalid_input("Last-Event-ID must be an event sequence number.")
        return value
    return after or 0


class _WatchCall:
    """Opens ``WatchJob`` and remembers the call so it can be cancelled when the client leaves."""

    def __init__(self, downstream: Downstream) -> None:
        self._downstream = downstream
        self.call: Any = None

    def __call__(self, request: jobs_pb2.WatchJobRequest, *, timeout: float | None) -> Any:
        self.call = self._downstream.status.WatchJob(request, timeout=timeout)
        return self.call

    def cancel(self) -> None:
        if self.call is not None and not self.call.done():
            self.call.cancel()


async def _events(downstream: Downstream, request: jobs_pb2.WatchJobRequest,
                  signer: MediaSigner) -> AsyncIterator[ServerSentEvent]:
    watch = _WatchCall(downstream)
    try:
        async for event in stream(watch, request, timeout=WATCH_STREAM_SECONDS):
            yield ServerSentEvent(data=event_out(event, signer).model_dump_json(), event=event.type,
                                  id=str(event.sequence), retry=RECONNECT_MILLISECONDS)
    except ClipChatError as exc:
        if exc.status is grpc.StatusCode.DEADLINE_EXCEEDED:
            return  # the planned end of a bounded stream; EventSource reconnects and resumes
        # Headers are already sent: tell the page in-band, then end the stream.
        status, body = from_domain_error(exc)
        log.warning("gateway.watch_failed", extra={"job_id": request.job_id, "code": exc.code,
                                                   "http_status": status})
        yield ServerSentEvent(data=body.model_dump_json(), event="watch.error",
                              retry=RECONNECT_MILLISECONDS)
    finally:
        # Runs when the client disconnects too (the response cancels this generator).
        watch.cancel()
