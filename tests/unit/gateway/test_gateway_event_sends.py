"""An event stream ends when one send waits longer than its send timeout (a client that stopped
reading)."""

from __future__ import annotations

import asyncio

import pytest
from sse_starlette.sse import SendTimeoutError
from starlette.types import Message

from gateway.feeds import StreamSlots
from gateway.routes.events import _SlotHeldResponse


async def test_a_send_that_waits_past_the_timeout_ends_the_stream() -> None:
    slots = StreamSlots(per_owner=1)
    assert slots.take("alice")
    response = _SlotHeldResponse(iter(()), slots=slots, owner="alice", send_timeout=0.05)
    sent: list[Message] = []

    async def stuck(message: Message) -> None:
        sent.append(message)
        await asyncio.Event().wait()  # the client's window is full and stays full

    with pytest.raises(SendTimeoutError):
        await response._send_with_timeout(stuck, {"type": "http.response.body", "body": b"x"})
    assert len(sent) == 1


async def test_a_send_that_completes_passes() -> None:
    response = _SlotHeldResponse(iter(()), slots=StreamSlots(per_owner=1), owner="alice", send_timeout=5)
    sent: list[Message] = []

    async def quick(message: Message) -> None:
        sent.append(message)

    await response._send_with_timeout(quick, {"type": "http.response.body", "body": b"x"})
    assert sent == [{"type": "http.response.body", "body": b"x"}]
