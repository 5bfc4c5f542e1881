"""A fault-injecting HTTP proxy in front of an S3-compatible server (moto), for tests.

Every request is forwarded to ``upstream`` unchanged and its answer returned unchanged, so the
services talk real S3 through it (set ``CLIPCHAT_S3_ENDPOINT_URL`` to ``url``). Faults are
scripted as rules matched on the method and a substring of the path, first match wins:

- ``fail(times=n)`` answers the next ``n`` matching requests (every one when ``times`` is None)
  with an S3 error document, by default ``503 SlowDown`` (which botocore retries);
- ``hold()`` keeps matching requests waiting until ``release()``, then forwards them: the
  request is "in flight" for as long as the test needs (for cancel during an upload).

Request bodies are always read in full first (so ``Expect: 100-continue`` is honoured the same
way whether the request fails or not). It runs uvicorn in a background thread on 127.0.0.1 and an
OS-chosen port.

Example::

    with S3FaultProxy(moto_url) as proxy:
        proxy.fail("PUT", "/versions/", times=3)
        ...
        assert len(proxy.requests_matching("PUT", "/versions/")) == 4
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from tests.fakes.threaded_server import ThreadedServer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                         "proxy-connection", "expect", "host", "content-length"})
_REASONS = {500: "InternalError", 503: "SlowDown"}


@dataclass
class ProxiedRequest:
    """One request the proxy saw and how it answered."""

    method: str
    path: str
    status: int
    faulted: bool
    at: float  # time.monotonic() when it arrived


@dataclass
class _Rule:
    method: str
    path_contains: str
    action: str  # "fail" | "hold"
    remaining: int | None  # for "fail": how many more to fail (None: all)
    status: int = 503
    code: str = "SlowDown"
    released: threading.Event = field(default_factory=threading.Event)
    held: int = 0  # requests waiting right now (for "hold")

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and self.path_contains in path


class S3FaultProxy:
    """The proxy; use as a context manager, or call ``start`` and ``stop``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._requests: list[ProxiedRequest] = []
        self._http = ThreadedServer("S3 fault proxy")
        self.url = ""

    # Scripting and inspection (called from the test's thread).

    def fail(self, method: str, path_contains: str, *, times: int | None = None, status: int = 503,
             code: str | None = None) -> None:
        """Answer the next ``times`` matching requests (all when None) with an S3 error."""
        with self._lock:
            self._rules.append(_Rule(method.upper(), path_contains, "fail", times, status,
                                     code or _REASONS.get(status, "InternalError")))

    def hold(self, method: str, path_contains: str) -> None:
        """Keep matching requests waiting until ``release``; then they are forwarded."""
        with self._lock:
            self._rules.append(_Rule(method.upper(), path_contains, "hold", None))

    def held(self) -> int:
        """How many requests are waiting on a ``hold`` now."""
        with self._lock:
            return sum(rule.held for rule in self._rules if rule.action == "hold")

    def release(self) -> None:
        """Let every held request through and remove the hold rules."""
        with self._lock:
            holds = [rule for rule in self._rules if rule.action == "hold"]
            self._rules = [rule for rule in self._rules if rule.action != "hold"]
        for rule in holds:
            rule.released.set()

    def clear(self) -> None:
        """Remove every rule (held requests are released)."""
        self.release()
        with self._lock:
            self._rules.clear()

    @property
    def requests(self) -> list[ProxiedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_matching(self, method: str, path_contains: str, *, since: float = 0.0) -> list[ProxiedRequest]:
        return [r for r in self.requests
                if r.method == method.upper() and path_contains in r.path and r.at >= since]

    # Lifecycle.

    def start(self) -> S3FaultProxy:
        """Bind a free port on 127.0.0.1 and serve until ``stop``; ``RuntimeError`` if it does not start."""
        self.url = self._http.start(self._app, interface="asgi3")
        return self

    def stop(self) -> None:
        self.clear()
        self._http.stop()

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # The ASGI app (runs on the proxy's thread).

    def _rule_for(self, method: str, path: str) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if not rule.matches(method, path):
                    continue
                if rule.action == "fail":
                    if rule.remaining is not None:
                        if rule.remaining <= 0:
                            continue
                        rule.remaining -= 1
                else:
                    rule.held += 1
                return rule
        return None

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        arrived = time.monotonic()
        method: str = scope["method"]
        path: str = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        query: bytes = scope.get("query_string", b"")
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        rule = self._rule_for(method, path)
        if rule is not None and rule.action == "hold":
            try:
                # Released from the test's thread: a threading.Event, polled without blocking the loop.
                while not rule.released.is_set():  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            finally:
                with self._lock:
                    rule.held -= 1
        elif rule is not None:
            self._log(method, path, rule.status, True, arrived)
            await _send(send, rule.status, [(b"content-type", b"application/xml")], _error_xml(rule.code))
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k.decode("latin-1").lower() not in _HOP_BY_HOP]
        url = f"{self.upstream}{path}" + (f"?{query.decode('latin-1')}" if query else "")
        async with httpx.AsyncClient(timeout=60) as client:
            request = client.build_request(method, url, headers=headers, content=bytes(body))
            response = await client.send(request, stream=True)
            try:
                data = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.multi_items()
               if k.lower() not in _HOP_BY_HOP]
        if method == "HEAD":
            length = response.headers.get("content-length")
            if length is not None:
                out.append((b"content-length", length.encode()))
        else:
            out.append((b"content-length", str(len(data)).encode()))
        self._log(method, path, response.status_code, False, arrived)
        await _send(send, response.status_code, out, b"" if method == "HEAD" else data)

    def _log(self, method: str, path: str, status: int, faulted: bool, at: float) -> None:
        with self._lock:
            self._requests.append(ProxiedRequest(method, path, status, faulted, at))


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    if not any(k == b"content-length" for k, _ in headers):
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_xml(code: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>Injected by the test proxy.</Message><RequestId>fault-proxy</RequestId></Error>"
            ).encode()
