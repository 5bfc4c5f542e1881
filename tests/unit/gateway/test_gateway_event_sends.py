"""An event stream ends, closes its chunks and gives its stream slot back when the client
disconnects, and when one send waits too long (a client that stopped reading)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from starlette.types import Message

from gateway.routes.events import EventStream


class _Stream:
    """Chunks that record the task writing them and whether they were closed."""

    def __init__(self) -> None:
        self.closed = False
        self.released = 0

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            yield b"a"
            yield b"b"
            await asyncio.Event().wait()  # a quiet job
        finally:
            self.closed = True

    def release(self) -> None:
        self.released += 1


def _response(stream: _Stream, stalled_after: float = 30) -> EventStream:
    return EventStream(stream.chunks(), release=stream.release, headers={"Cache-Control": "no-cache"},
                       stalled_after=stalled_after)


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


async def test_a_send_that_stalls_ends_the_stream() -> None:
    stream = _Stream()

    async def send(message: Message) -> None:
        if message.get("body") == b"a":
            await asyncio.Event().wait()  # the client's window is full and stays full

    async def receive() -> Message:
        await asyncio.Event().wait()  # the client never goes
        raise AssertionError("unreachable")

    await asyncio.wait_for(_response(stream, stalled_after=0.2)({"type": "http"}, receive, send), 5)
    assert stream.closed and stream.released == 1


async def test_slow_sends_that_complete_keep_the_stream() -> None:
    stream, bodies = _Stream(), list[bytes]()
    both_sent = asyncio.Event()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            await asyncio.sleep(0.15)  # each under the limit, together over it
            bodies.append(message["body"])
            if len(bodies) == 2:
                both_sent.set()

    async def receive() -> Message:
        await both_sent.wait()
        await asyncio.sleep(0.3)  # a quiet stream, longer than the limit, then the client leaves
        return {"type": "http.disconnect"}

    await asyncio.wait_for(_response(stream, stalled_after=0.2)({"type": "http"}, receive, send), 5)
    assert bodies == [b"a", b"b"] and stream.closed and stream.released == 1
