"""The CLI follows a job's events over a real HTTP connection: resumes after a drop, ends on an error."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest

from launcher.cli import CliError, sse_events


def _event(sequence: int) -> bytes:
    body = {"sequence": sequence, "type": "progress", "stage": "generating", "fraction": sequence / 10}
    return f"id: {sequence}\nevent: progress\ndata: {json.dumps(body)}\n\n".encode()


@dataclass
class EventServer:
    """An SSE endpoint on 127.0.0.1 that answers each connection from a script, and records what
    each request's ``Last-Event-ID`` was."""

    script: list[bytes]
    resume_points: list[str] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
        self.resume_points.append(headers.get("last-event-id") or headers.get("Last-Event-ID", ""))
        body = self.script.pop(0)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\r\n")
        writer.write(body)  # then the connection drops: no chunked end, no Content-Length
        await writer.drain()
        writer.close()


@pytest.fixture
async def events_server() -> AsyncIterator[EventServer]:
    server = EventServer(script=[_event(1) + _event(2) + b"id: 3\ndata: {\"seque",  # dropped mid-event
                                 _event(3) + b"event: watch.error\ndata: "
                                 + json.dumps({"error": {"code": "service_unavailable",
                                                         "message": "The job's events are unavailable."}}).encode()
                                 + b"\n\n"])
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield server


async def test_resumes_after_a_dropped_connection_and_ends_on_an_in_band_error(events_server: EventServer) -> None:
    received: list[int] = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{events_server.port}") as client:
        with pytest.raises(CliError, match="The job's events are unavailable"):
            async for event in sse_events(client, "job-1", 0):
                received.append(event["sequence"])

    assert received == [1, 2, 3]  # the half-sent event 3 was not taken; it came whole after resuming
    assert events_server.resume_points == ["0", "2"]


async def test_gives_up_with_one_line_when_the_gateway_stays_away() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()  # nothing listens there any more: every connection is refused
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        with pytest.raises(CliError, match="lost the event stream"):
            async for _ in sse_events(client, "job-1", 0):
                pass
