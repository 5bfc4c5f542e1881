"""A job's live events as Server-Sent Events, fed by one shared ``WatchJob`` stream per job.

Every watcher of a job on this gateway process reads the same upstream stream (``gateway.feeds``);
an owner holds at most ``sse_max_streams_per_owner`` streams at once. The EventSource URL carries a
short-lived ticket (``POST /jobs/{id}/tickets``), never the API token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Header, Query
from pydantic import BaseModel, Field
from sse_starlette import ServerSentEvent
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from clipchat.errors import ClipChatError
from clipchat.rpc import call
from clipchat.v1 import common_pb2, jobs_pb2
from gateway.deps import (
    DownstreamDep,
    FeedsDep,
    JobId,
    Owner,
    SettingsDep,
    SignerDep,
    StreamOwner,
    StreamSlotsDep,
    TicketsDep,
)
from gateway.errors import RATE_LIMITED_CODE, ApiError, documented, from_domain_error
from gateway.feeds import FeedHub, SubscriberOverflow, WatchMethod
from gateway.schemas import event_out
from gateway.signing import MediaSigner

log = logging.getLogger("clipchat.gateway")

router = APIRouter(prefix="/api/v1", tags=["events"])

# The deadline of each upstream WatchJob call; a job's shared feed reopens where it stopped, so no
# gRPC call ever runs without a deadline and no watcher notices.
WATCH_STREAM_SECONDS = 15 * 60
# A client whose send has waited this long (it stopped reading) is cut off.
SEND_STALLED_SECONDS = 30.0
# The comment sent every CLIPCHAT_SSE_HEARTBEAT_SECONDS, so proxies do not close a quiet stream.
HEARTBEAT = b": ping\r\n\r\n"
# How long the browser waits before reconnecting after the stream ends.
RECONNECT_MILLISECONDS = 2000
# What a client over its stream cap is asked to wait before trying again.
STREAM_CAP_RETRY_AFTER_SECONDS = 5
_MAX_SEQUENCE = 2**63 - 1
# Every id this gateway sends is a sequence number; 18 digits stay below _MAX_SEQUENCE.
LAST_EVENT_ID_PATTERN = r"^[0-9]{1,18}$"


class TicketOut(BaseModel):
    """A short-lived credential for one job's event stream: ``GET .../events?ticket=<ticket>``."""

    ticket: str = Field(description="Pass as ?ticket= on GET /api/v1/jobs/{id}/events.")
    expires_in: int = Field(description="Seconds the ticket stays valid; ask for a new one on reconnect.")


@router.post("/jobs/{job_id}/tickets", summary="A short-lived ticket for the job's event stream",
             response_model=TicketOut, responses=documented(401, 404))
async def create_ticket(job_id: JobId, owner: Owner, settings: SettingsDep, downstream: DownstreamDep,
                        tickets: TicketsDep) -> TicketOut:
    """Exchange the API token (``Authorization: Bearer``) for a ticket valid for this job only.

    EventSource cannot send headers; a ticket in its URL is bound to the owner and the job and
    expires after ``expires_in`` seconds, so the long-lived token never appears in a URL or a log.
    """
    await call(downstream.status.GetJob, jobs_pb2.GetJobRequest(job_id=job_id, owner=owner),
               timeout=settings.grpc_deadline_seconds)
    return TicketOut(ticket=tickets.issue(owner, job_id), expires_in=tickets.ttl_seconds)


class EventStream(StreamingResponse):
    """A ``text/event-stream`` answer written straight to the ASGI ``send``, one send per chunk.

    Ends when the chunks end, when the client disconnects, or when one send has waited more than
    ``stalled_after`` seconds (a client that stopped reading: the server then closes the connection,
    and uvicorn logs that the response was not completed). Gives its owner's stream slot back
    however it ends. Nothing runs per chunk but the send: the job feed makes the bytes, once for
    every watcher, and publishes the heartbeats; a stalled send is found by a check every third of
    ``stalled_after``, not by a timeout around each send (at a thousand watchers, sse-starlette's
    task group and per-send timeout cost more than the send itself).
    """

    def __init__(self, chunks: AsyncGenerator[bytes, None], *, release: Callable[[], None],
                 headers: dict[str, str], status_code: int = 200,
                 stalled_after: float = SEND_STALLED_SECONDS) -> None:
        # The media type is set here, not on the class: FastAPI would document the route's error
        # answers (JSON) as event streams.
        super().__init__(chunks, status_code=status_code, headers=headers, media_type="text/event-stream")
        self._chunks = chunks
        self._release = release
        self._stalled_after = stalled_after
        self._sending_since: float | None = None
        self._check_handle: asyncio.TimerHandle | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            writer = asyncio.create_task(self._write(send), name="event-stream")
            disconnect = asyncio.create_task(_disconnected(receive), name="event-stream-disconnect")
            self._check_handle = asyncio.get_running_loop().call_later(self._stalled_after / 3, self._check, writer)
            try:
                done, _ = await asyncio.wait((writer, disconnect), return_when=asyncio.FIRST_COMPLETED)
                if writer in done and not writer.cancelled():
                    writer.result()  # the stream's own failure, if it had one
            finally:
                self._check_handle.cancel()
                writer.cancel()
                disconnect.cancel()
                await asyncio.wait((writer, disconnect))
        finally:
            self._release()

    async def _write(self, send: Send) -> None:
        clock = asyncio.get_running_loop().time
        async with aclosing(self._chunks) as chunks:
            async for chunk in chunks:
                self._sending_since = clock()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self._sending_since = None
        self._sending_since = clock()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _check(self, writer: asyncio.Task[None]) -> None:
        loop = asyncio.get_running_loop()
        if self._sending_since is not None and loop.time() - self._sending_since > self._stalled_after:
            log.info("gateway.watcher_dropped", extra={"reason": "stalled"})
            writer.cancel()
            return
        self._check_handle = loop.call_later(self._stalled_after / 3, self._check, writer)


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone."""
    while (await receive())["type"] != "http.disconnect":
        pass


@router.get(
    "/jobs/{job_id}/events", summary="Live job events (Server-Sent Events)",
    response_class=EventStream,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "id: sequence, event: type, data: JSON {sequence, type, stage, "
                                    "fraction, payload, created_at}; ': ping' comments as heartbeats."},
               **documented(401, 404, 422, 429)})
async def job_events(
    job_id: JobId, owner: StreamOwner, settings: SettingsDep, downstream: DownstreamDep, signer: SignerDep,
    feeds: FeedsDep, slots: StreamSlotsDep,
    after: Annotated[int | None, Query(ge=0, le=_MAX_SEQUENCE,
                                       description="Replay events after this sequence number.")] = None,
    last_event_id: Annotated[str | None, Header(
        pattern=LAST_EVENT_ID_PATTERN,
        description="Set by EventSource on reconnect: the id of the last event it received (a sequence "
                    "number, 1 to 18 digits). Takes precedence over ?after=.")] = None,
) -> EventStream:
    """Replay the job's events after ``Last-Event-ID`` (or ``?after=``), then follow new ones.

    Authenticate with ``Authorization: Bearer`` or, from EventSource (which cannot send headers),
    ``?ticket=`` from ``POST /jobs/{id}/tickets``; the API token is not accepted in the URL. One
    owner holds at most ``CLIPCHAT_SSE_MAX_STREAMS_PER_OWNER`` streams per gateway process (429 with
    ``Retry-After`` past it). A client that falls far behind, or stops reading for 30 seconds, is
    disconnected and resumes with ``Last-Event-ID``. Heartbeat comments keep proxies from closing an idle stream.
    """
    after_sequence = _resume_point(last_event_id, after)
    if not slots.take(owner):
        raise ApiError(429, RATE_LIMITED_CODE,
                       f"You have {slots.per_owner} event streams open already. Close one (another tab?) "
                       f"and try again.", retryable=True,
                       headers={"Retry-After": str(STREAM_CAP_RETRY_AFTER_SECONDS)})
    try:
        # Ask once before streaming so an unknown job is a 404 JSON answer, not an empty stream;
        # an open feed of the owner's job has asked already.
        if not feeds.is_watched(owner, job_id):
            await call(downstream.status.GetJob, jobs_pb2.GetJobRequest(job_id=job_id, owner=owner),
                       timeout=settings.grpc_deadline_seconds)
        return EventStream(_events(feeds, downstream.status.WatchJob, owner, job_id, after_sequence, signer),
                           release=partial(slots.give_back, owner),
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    except BaseException:
        slots.give_back(owner)
        raise


def _resume_point(last_event_id: str | None, after: int | None) -> int:
    """The sequence to replay after: ``Last-Event-ID`` (digits only, checked by its pattern) or ``after``."""
    return int(last_event_id) if last_event_id is not None else after or 0


async def _events(feeds: FeedHub, watch: WatchMethod, owner: str, job_id: str, after: int,
                  signer: MediaSigner) -> AsyncGenerator[bytes, None]:
    def encode(event: common_pb2.JobEvent) -> bytes:
        return ServerSentEvent(data=event_out(event, signer).model_dump_json(), event=event.type,
                               id=str(event.sequence), retry=RECONNECT_MILLISECONDS).encode()

    try:
        async with aclosing(feeds.stream(watch, owner, job_id, after, encode, HEARTBEAT)) as chunks:
            async for chunk in chunks:
                yield chunk
    except SubscriberOverflow:
        return  # fell behind (or the feed ended): EventSource reconnects and resumes from its last id
    except ClipChatError as exc:
        # Headers are already sent: tell the page in-band, then end the stream.
        status, body = from_domain_error(exc)
        log.warning("gateway.watch_failed", extra={"job_id": job_id, "code": exc.code, "http_status": status})
        yield ServerSentEvent(data=body.model_dump_json(), event="watch.error", retry=RECONNECT_MILLISECONDS).encode()
