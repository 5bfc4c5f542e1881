"""An event stream ends, closes its chunks and gives its stream slot back when the client
disconnects, and when its job feed cuts it off (a client that stopped reading)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from starlette.types import Message

from gateway.routes.events import EventStream


class _Stream:
    """Chunks that record the task writing them and whether they were closed."""

    def __init__(self) -> None:
        self.writer: asyncio.Task[object] | None = None
        self.closed = False
        self.released = 0

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        self.writer = asyncio.current_task()
        try:
            yield b"a"
            await asyncio.Event().wait()  # a quiet job
        finally:
            self.closed = True

    def release(self) -> None:
        self.released += 1


def _response(stream: _Stream) -> EventStream:
    return EventStream(stream.chunks(), release=stream.release, headers={"Cache-Control": "no-cache"})


async def test_a_client_that_disconnects_ends_its_stream() -> None:
    stream, sent = _Stream(), list[Message]()
    first_chunk_sent = asyncio.Event()

    async def send(message: Message) -> None:
        sent.append(message)
        if message.get("body") == b"a":
            first_chunk_sent.set()

    async def receive() -> Message:
        await first_chunk_sent.wait()
        return {"type": "http.disconnect"}

    await asyncio.wait_for(_response(stream)({"type": "http"}, receive, send), 5)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    assert sent[1] == {"type": "http.response.body", "body": b"a", "more_body": True}
    assert stream.closed and stream.released == 1


async def test_a_stream_cut_off_by_its_feed_ends() -> None:
    stream = _Stream()
    stuck = asyncio.Event()

    async def send(message: Message) -> None:
        if message.get("body") == b"a":
            stuck.set()
            await asyncio.Event().wait()  # the client's window is full and stays full

    async def receive() -> Message:
        await asyncio.Event().wait()  # the client never goes
        raise AssertionError("unreachable")

    serving = asyncio.create_task(_response(stream)({"type": "http"}, receive, send))
    await asyncio.wait_for(stuck.wait(), 5)
    assert stream.writer is not None
    stream.writer.cancel()  # what the feed does to a watcher that holds a chunk too long
    await asyncio.wait_for(serving, 5)
    assert stream.closed and stream.released == 1
