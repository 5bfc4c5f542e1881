"""The load client: runs in its own process, so its CPU is not the gateway's.

    python -m tests.load.client sse   '{"url": …, "token": …, "job_id": …, "watchers": 1000}'
    python -m tests.load.client get   '{"url": …, "token": …, "path": …, "connections": 16, "requests": 20000,
                                        "seconds": 20}'
    python -m tests.load.client burst '{"url": …, "token": …, "job_id": …, "size": 20, "rounds": 5}'

Each prints one JSON line with what it saw. ``sse`` first prints ``{"connected": …}`` once every
watcher has its response headers and the job's first event, then reads ``<first> <last>`` on stdin (the sequences of the
events the test is making) and prints the result when every watcher has ``last`` or a minute passed.

HTTP/1.1 is spoken directly on asyncio protocols (no client library): at a thousand streams a
library's per-read cost would be the client's bottleneck, and the figures are the server's.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlparse

# How long the SSE client waits for the last event after the test says it was made.
DELIVERY_LIMIT_SECONDS = 60
CONNECT_CONCURRENCY = 50


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _request(method: str, path: str, host: str, token: str, body: bytes = b"",
             accept: str = "application/json") -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Accept: {accept}\r\n")
    if method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


def _split_head(buffer: bytearray) -> tuple[int, dict[str, str]] | None:
    """Status and headers (lower-case names) when ``buffer`` holds them all; consumes them."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    del buffer[:end + 4]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ", 2)[1]), headers


class _Exchange(asyncio.Protocol):
    """One keep-alive connection making one request at a time (Content-Length answers)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._head: tuple[int, dict[str, str]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._head is None:
            self._head = _split_head(self._buffer)
            if self._head is None:
                return
        length = int(self._head[1].get("content-length", "0"))
        if len(self._buffer) >= length and self._waiter is not None:
            status, body = self._head[0], bytes(self._buffer[:length])
            del self._buffer[:length]
            self._head = None
            self._waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed"))

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self._waiter


def _address(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 80


async def _connect(url: str) -> _Exchange:
    _, protocol = await asyncio.get_running_loop().create_connection(_Exchange, *_address(url))
    return protocol


# ---- GET: keep-alive connections, each one request after another -------------------------------


async def run_get(url: str, token: str, path: str, connections: int, requests: int,
                  seconds: float = 600) -> dict[str, Any]:
    """``requests`` GETs of ``path`` on ``connections`` keep-alive connections, fewer if ``seconds``
    run out first."""
    host = urlparse(url).netloc
    raw = _request("GET", path, host, token)
    conns = [await _connect(url) for _ in range(connections)]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    left = [requests]
    deadline = time.perf_counter() + seconds

    async def loop(conn: _Exchange) -> None:
        while left[0] > 0 and time.perf_counter() < deadline:
            left[0] -= 1
            sent = time.perf_counter()
            status, _ = await conn.send(raw)
            latencies.append(time.perf_counter() - sent)
            statuses[str(status)] = statuses.get(str(status), 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in conns))
    seconds = time.perf_counter() - start
    for conn in conns:
        assert conn.transport is not None
        conn.transport.close()
    return {"requests": len(latencies), "seconds": seconds, "rps": len(latencies) / seconds,
            "p50_ms": 1000 * (percentile(latencies, 0.50) or 0), "p99_ms": 1000 * (percentile(latencies, 0.99) or 0),
            "statuses": statuses}


# ---- burst: concurrent regenerate POSTs on one job, then cancel the one accepted ------------------


async def run_burst(url: str, token: str, job_id: str, size: int, rounds: int) -> dict[str, Any]:
    host = urlparse(url).netloc
    post = _request("POST", f"/api/v1/jobs/{job_id}/clips/0/regenerate", host, token,
                    json.dumps({"instruction": "make it nighttime"}).encode())
    results = []
    for _ in range(rounds):
        conns = [await _connect(url) for _ in range(size)]  # all open first, so the POSTs go at once
        answers = await asyncio.gather(*(c.send(post) for c in conns))
        statuses: dict[str, int] = {}
        for status, _ in answers:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        accepted = [json.loads(body)["regeneration_id"] for status, body in answers if status == 202]
        for conn in conns:
            assert conn.transport is not None
            conn.transport.close()
        for regeneration_id in accepted:  # on a new connection: the burst's may have idled out
            canceller = await _connect(url)
            status, _ = await canceller.send(_request(
                "POST", f"/api/v1/jobs/{job_id}/regenerations/{regeneration_id}/cancel", host, token))
            assert canceller.transport is not None
            canceller.transport.close()
            if status != 200:
                statuses[f"cancel {status}"] = statuses.get(f"cancel {status}", 0) + 1
        results.append(statuses)
    return {"rounds": results}


# ---- SSE: many watchers of one job ---------------------------------------------------------------


@dataclass
class _Shared:
    created_at: dict[int, float] = field(default_factory=dict)  # sequence → event time (epoch s)
    last: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0


class _Watcher(asyncio.Protocol):
    """One EventSource-like stream: records each event's sequence and when it arrived."""

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.status: int | None = None
        self.headers_received = asyncio.get_running_loop().create_future()
        self.first_event = asyncio.get_running_loop().create_future()
        self.received: list[tuple[int, float]] = []
        self.closed = False
        self._raw = bytearray()
        self._body = bytearray()
        self._chunk_left = 0
        self._finished = False

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self._raw += data
        if self.status is None:
            head = _split_head(self._raw)
            if head is None:
                return
            self.status = head[0]
            self.headers_received.set_result(self.status)
            if self.status != 200:
                return
        self._dechunk()
        self._events(now)

    def _dechunk(self) -> None:
        raw = self._raw
        while raw:
            if self._chunk_left == 0:
                end = raw.find(b"\r\n")
                if end < 0:
                    return
                size_text = bytes(raw[:end]).split(b";")[0].strip()
                if not size_text:  # the CRLF after a chunk's data
                    del raw[:end + 2]
                    continue
                self._chunk_left = int(size_text, 16)
                del raw[:end + 2]
                if self._chunk_left == 0:
                    return
            take = min(self._chunk_left, len(raw))
            self._body += raw[:take]
            del raw[:take]
            self._chunk_left -= take

    def _events(self, now: float) -> None:
        body = self._body
        while True:
            end = body.find(b"\r\n\r\n")
            if end < 0:
                return
            block = bytes(body[:end])
            del body[:end + 4]
            sequence = None
            data = None
            for line in block.split(b"\r\n"):
                if line.startswith(b"id: "):
                    sequence = int(line[4:])
                elif line.startswith(b"data: "):
                    data = line[6:]
            if sequence is None:
                continue  # a heartbeat comment
            self.received.append((sequence, now))
            if not self.first_event.done():
                self.first_event.set_result(sequence)
            shared = self.shared
            if sequence not in shared.created_at and data is not None:
                created = json.loads(data)["created_at"]
                shared.created_at[sequence] = datetime.fromisoformat(created).timestamp()
            if shared.last is not None and sequence == shared.last and not self._finished:
                self._arrived()

    def _arrived(self) -> None:
        self._finished = True
        self.shared.waiting -= 1
        if self.shared.waiting <= 0:
            self.shared.done.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for waiter in (self.headers_received, self.first_event):
            if not waiter.done():
                waiter.set_result(None)  # closed before it came


def _read_stdin_line(loop: asyncio.AbstractEventLoop, future: asyncio.Future[str]) -> None:
    line = sys.stdin.readline()
    loop.call_soon_threadsafe(future.set_result, line)


async def run_sse(url: str, token: str, job_id: str, watchers: int) -> dict[str, Any]:
    parsed = urlparse(url)
    raw = _request("GET", f"/api/v1/jobs/{job_id}/events", parsed.netloc, token, accept="text/event-stream")
    loop = asyncio.get_running_loop()
    shared = _Shared()
    streams: list[_Watcher] = []
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one() -> None:
        async with gate:
            transport, protocol = await loop.create_connection(lambda: _Watcher(shared), *_address(url))
            streams.append(protocol)
            transport.write(raw)
            # Connected: the stream is open and the replay of the job's first event came.
            if await protocol.headers_received == 200:
                await protocol.first_event

    started = time.perf_counter()
    await asyncio.gather(*(open_one() for _ in range(watchers)))
    connect_seconds = time.perf_counter() - started
    statuses: dict[str, int] = {}
    for stream in streams:
        statuses[str(stream.status)] = statuses.get(str(stream.status), 0) + 1
    print(json.dumps({"connected": statuses.get("200", 0), "statuses": statuses}), flush=True)

    said: asyncio.Future[str] = loop.create_future()
    threading.Thread(target=_read_stdin_line, args=(loop, said), daemon=True).start()
    first, last = (int(x) for x in (await said).split())
    ok = [s for s in streams if s.status == 200]
    shared.last = last
    shared.waiting = sum(1 for s in ok if not any(seq == last for seq, _ in s.received))
    for stream in ok:
        stream._finished = any(seq == last for seq, _ in stream.received)
    if shared.waiting > 0:
        try:
            async with asyncio.timeout(DELIVERY_LIMIT_SECONDS):
                await shared.done.wait()
        except TimeoutError:
            pass
    latencies = [now - shared.created_at[seq] for s in ok for seq, now in s.received
                 if first <= seq <= last and seq in shared.created_at]
    expected = list(range(1, last + 1))
    complete = sum(1 for s in ok if [seq for seq, _ in s.received] == expected)
    missing = [len(expected) - len({seq for seq, _ in s.received}) for s in ok]
    out_of_order = sum(1 for s in ok if [seq for seq, _ in s.received] != sorted(seq for seq, _ in s.received))
    return {"watchers": watchers, "statuses": statuses, "connect_seconds": connect_seconds,
            "complete": complete, "events": len(expected), "deliveries": len(latencies),
            "missing_max": max(missing, default=0), "out_of_order": out_of_order,
            "dropped": sum(1 for s in ok if s.closed),
            "p50_ms": 1000 * (percentile(latencies, 0.50) or 0),
            "p99_ms": 1000 * (percentile(latencies, 0.99) or 0),
            "max_ms": 1000 * max(latencies, default=0)}


def main() -> None:
    try:
        import uvloop
    except ImportError:  # the stdlib loop measures the same, with a slower client
        uvloop = None  # type: ignore[assignment]
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    runs = {"sse": run_sse, "get": run_get, "burst": run_burst}
    runner = asyncio.run if uvloop is None else uvloop.run
    result = runner(runs[scenario](**args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
