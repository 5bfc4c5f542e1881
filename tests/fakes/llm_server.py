"""A local OpenAI-compatible Chat Completions server, for tests and demos.

``POST /v1/chat/completions`` answers like the real API: a ``chat.completion`` whose message
content is a JSON object ``{"prompt", "summary", "style"}`` (what a ``json_schema`` response format
asks for) and a ``usage`` block with token counts derived from the text lengths (about 4 characters a
token). The rewrite is deterministic: when the user message is the JSON document ``LLMRewriter``
sends, the prompt is ``"<clip_prompt>, <instruction>"`` and the style ``"<instruction>, look <crc>"``
(the CRC-32 of the clip prompt, so each clip's own style differs); given a ``shared_style``, the
prompt is ``"<clip_prompt>, <shared_style>"`` and the style the shared one. Otherwise the prompt is
the last user message.
``GET /v1/models`` lists the one model. Every completion request is kept in ``calls`` with its body
and headers (``ChatCall.idempotency_key`` is the ``Idempotency-Key`` it carried). It runs uvicorn
in a background thread on 127.0.0.1 and an OS-chosen port; ``url`` is the base URL, ending in ``/v1``.

Answers are scripted as a queue of actions, one consumed per completion request (an empty queue
means ``"ok"``). An action is a word, optionally followed by ``:argument``:

- ``ok``, or ``ok:<prompt_tokens>,<completion_tokens>`` to report exactly that usage;
  ``no_usage`` (ok, without a ``usage`` block);
- an HTTP status such as ``500`` / ``408`` / ``401``, or ``429:<Retry-After>`` (seconds or an
  HTTP-date), with OpenAI's error body;
- ``timeout`` (waits ``hang_seconds``, longer than any client timeout, then answers) and
  ``slow:<seconds>`` (answers ``ok`` after that delay);
- ``malformed`` (200 with a broken JSON body);
- ``content_policy`` (400, ``{"error": {"code": "content_policy_violation", ...}}``);
- ``refusal`` (200 whose message carries a ``refusal`` instead of content);
- ``echo_system`` (200 whose prompt repeats the system message, as a prompt-injected model would);
- ``content:<text>`` (200 whose message content is exactly ``<text>``).

Example::

    with FakeLLMServer(api_key="test-key") as server:
        server.script(["500", "429:3", "ok"])
        ...
        assert len(server.calls) == 3

As a pytest fixture::

    @pytest.fixture
    def llm_server() -> Iterator[FakeLLMServer]:
        yield from serve_fake_llm()

Three server shapes (``flavor``), as their OpenAI-compatible endpoints answer:

- ``openai``: takes ``response_format`` ``json_schema`` and ``json_object``; the message carries
  ``refusal`` and ``annotations``; ``system_fingerprint``, ``service_tier``.
- ``vllm`` (before structured outputs): ``json_object`` only; a ``json_schema`` request gets vLLM's
  400 (``{"object": "error", "message", "type": "BadRequestError", "code": 400}``); choices carry
  ``logprobs`` and ``stop_reason``, the message ``tool_calls``, no ``refusal``.
- ``ollama`` (before 0.5): ``json_object`` only, refused formats get a 400 in OpenAI's error shape;
  ``system_fingerprint: "fp_ollama"``; without a response format its answer wraps the JSON in
  prose and a fenced block, as chat models do.

``formats`` overrides which response formats the server takes (``()``: none, as a LiteLLM route to
a vendor without JSON mode). A refused format does not consume a scripted action.

Run ``python -m tests.fakes.llm_server --port 8089`` to serve it for a demo.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from tests.fakes.threaded_server import ThreadedServer, serve_until_interrupted

MODEL = "fake-llm-1"
MALFORMED_JSON = b'{"id": "chatcmpl-oops", "choices": [{"message": '
CONTENT_POLICY_BODY = {"error": {
    "message": "Your request was rejected as a result of our safety system.",
    "type": "invalid_request_error", "param": None, "code": "content_policy_violation"}}
REFUSAL_TEXT = "I'm sorry, I can't help with that request."
_CREATED = 1_700_000_000  # a fixed timestamp keeps answers byte-for-byte deterministic
Flavor = Literal["openai", "vllm", "ollama"]
FORMATS: dict[str, tuple[str, ...]] = {"openai": ("json_schema", "json_object"), "vllm": ("json_object",),
                                       "ollama": ("json_object",)}


@dataclass(frozen=True)
class ChatCall:
    """One completion request the fake received."""

    body: Any  # the parsed JSON body (or the raw text when it was not JSON)
    headers: dict[str, str] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)  # when it arrived (to check Retry-After waits)

    @property
    def idempotency_key(self) -> str:
        """The ``Idempotency-Key`` header the request carried ("" without one)."""
        return self.headers.get("idempotency-key", "")

    @property
    def response_format(self) -> str:
        """The ``response_format`` type the request asked for ("text" without one)."""
        requested = self.body.get("response_format") if isinstance(self.body, dict) else None
        return str(requested.get("type")) if isinstance(requested, dict) else "text"

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages = self.body.get("messages") if isinstance(self.body, dict) else None
        return [m for m in messages or [] if isinstance(m, dict)]

    def contents(self, role: str) -> list[str]:
        """The text of every message with ``role``, in order."""
        return [m["content"] for m in self.messages
                if m.get("role") == role and isinstance(m.get("content"), str)]

    @property
    def data(self) -> dict[str, Any] | None:
        """The last user message parsed as a JSON object, when it is one."""
        users = self.contents("user")
        try:
            parsed = json.loads(users[-1]) if users else None
        except ValueError:
            return None
        return parsed if isinstance(parsed, dict) else None


class FakeLLMServer:
    """The fake API; use as a context manager, or call ``start`` and ``stop``.

    With ``api_key`` set, requests without ``Authorization: Bearer <api_key>`` get 401.
    ``hang_seconds`` is how long a ``timeout`` action waits before answering.
    """

    def __init__(self, *, api_key: str | None = None, model: str = MODEL, hang_seconds: float = 30.0,
                 flavor: Flavor = "openai", formats: tuple[str, ...] | None = None) -> None:
        self.flavor = flavor
        self.formats = FORMATS[flavor] if formats is None else formats
        self.api_key = api_key
        self.model = model
        self.hang_seconds = hang_seconds
        self._lock = threading.Lock()
        self._script: deque[str] = deque()
        self._calls: list[ChatCall] = []
        self._answers: list[dict[str, Any]] = []
        self._http = ThreadedServer("fake LLM server")
        self.url = ""

    # Scripting and inspection (called from the test's thread).

    def script(self, actions: Iterable[str]) -> None:
        """Queue actions for the next completion requests (see the module docstring)."""
        with self._lock:
            self._script.extend(actions)

    def clear_script(self) -> None:
        """Drop the actions not used yet (the call log is kept)."""
        with self._lock:
            self._script.clear()

    @property
    def calls(self) -> list[ChatCall]:
        """Every completion request received, in order."""
        with self._lock:
            return list(self._calls)

    @property
    def answers(self) -> list[dict[str, Any]]:
        """The bodies of the successful completions sent, in order."""
        with self._lock:
            return list(self._answers)

    # Lifecycle.

    def start(self, port: int = 0) -> FakeLLMServer:
        """Bind ``port`` on 127.0.0.1 (0: a free one) and serve until ``stop``.

        Raises ``RuntimeError`` when the server does not come up within 10 seconds.
        """
        self.url = self._http.start(self._app(), port) + "/v1"
        return self

    def stop(self) -> None:
        self._http.stop()

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # The app (runs on the server's thread).

    def _next(self) -> tuple[str, str]:
        with self._lock:
            action = self._script.popleft() if self._script else "ok"
        word, _, argument = action.partition(":")
        return word, argument

    def _app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
            return JSONResponse({"object": "list", "data": [
                {"id": self.model, "object": "model", "created": _CREATED, "owned_by": "clipchat-tests"}]})

        @app.post("/v1/chat/completions")
        async def completions(request: Request) -> Response:
            raw = await request.body()
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
            call = ChatCall(body, dict(request.headers))
            with self._lock:
                self._calls.append(call)
            if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
            if not isinstance(body, dict) or not call.messages:
                return _error(400, "'messages' is a required property.", "invalid_request_error", None)
            if call.response_format != "text" and call.response_format not in self.formats:
                return self._format_refused(call.response_format)
            word, argument = self._next()
            if word in ("timeout", "slow"):
                await asyncio.sleep(float(argument) if argument else self.hang_seconds)
                word = "ok"
            return self._answer(call, word, argument)

        return app

    def _format_refused(self, requested: str) -> Response:
        """The 400 each server gives a response format it does not take."""
        if self.flavor == "vllm":
            message = (f"[{{'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), 'msg': "
                       f"\"Input should be 'text' or 'json_object'\", 'input': '{requested}'}}]")
            return JSONResponse({"object": "error", "message": message, "type": "BadRequestError",
                                 "param": None, "code": 400}, status_code=400)
        if self.flavor == "ollama":
            return _error(400, f"invalid response_format type: {requested}", "invalid_request_error", None)
        return _error(400, f"UnsupportedParamsError: this model does not support parameters: ['response_format'] "
                      f"({requested})", "invalid_request_error", None)

    def _answer(self, call: ChatCall, word: str, argument: str) -> Response:
        if word == "malformed":
            return Response(MALFORMED_JSON, status_code=200, media_type="application/json")
        if word == "content_policy":
            return JSONResponse(CONTENT_POLICY_BODY, status_code=400)
        if word.isdigit():
            status = int(word)
            headers = {"Retry-After": argument} if argument else {}
            return _error(status, f"scripted HTTP {status}", "server_error" if status >= 500 else
                          "invalid_request_error", None, headers)
        if word == "refusal":
            return self._completion(call, None, refusal=REFUSAL_TEXT)
        if word == "echo_system":
            system = " ".join(call.contents("system"))
            return self._completion(call, json.dumps({"prompt": system[:600], "summary": "Done."}))
        if word == "content":
            return self._completion(call, argument)
        if word in ("ok", "no_usage"):
            prompt, summary, style = _rewrite(call)
            usage = tuple(int(n) for n in argument.split(",")) if argument else None
            content = json.dumps({"prompt": prompt, "summary": summary, "style": style})
            if self.flavor == "ollama" and call.response_format == "text":
                content = f"Here is the rewritten prompt:\n\n```json\n{content}\n```\n\nWant any changes?"
            return self._completion(call, content, with_usage=word == "ok", usage=usage)
        return _error(500, f"unknown scripted action {word!r}", "server_error", None)

    def _completion(self, call: ChatCall, content: str | None, *, refusal: str | None = None,
                    with_usage: bool = True, usage: tuple[int, ...] | None = None) -> Response:
        with self._lock:
            number = len(self._answers) + 1
        answer = self._shape(call, number, content, refusal)
        if with_usage:
            if usage:
                prompt_tokens, completion_tokens = usage
            else:
                # Roughly how a BPE tokenizer counts English: ~4 characters a token, plus a few
                # tokens of framing per message.
                prompt_tokens = sum(math.ceil(len(_text(m)) / 4) + 4 for m in call.messages)
                completion_tokens = math.ceil(len(content or refusal or "") / 4)
            answer["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens}
        with self._lock:
            self._answers.append(answer)
        return JSONResponse(answer)

    def _shape(self, call: ChatCall, number: int, content: str | None, refusal: str | None) -> dict[str, Any]:
        """A ``chat.completion`` as this flavor of server writes it (usage added by the caller)."""
        model = call.body.get("model") or self.model
        if self.flavor == "vllm":
            return {"id": f"chat-{number:032x}", "object": "chat.completion", "created": _CREATED, "model": model,
                    "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop", "stop_reason": None,
                                 "message": {"role": "assistant", "content": content, "tool_calls": []}}]}
        if self.flavor == "ollama":
            return {"id": f"chatcmpl-{number}", "object": "chat.completion", "created": _CREATED, "model": model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}]}
        return {"id": f"chatcmpl-fake-{number}", "object": "chat.completion", "created": _CREATED, "model": model,
                "system_fingerprint": "fp_fake", "service_tier": "default",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": content, "refusal": refusal,
                                         "annotations": []}}]}


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def _rewrite(call: ChatCall) -> tuple[str, str, str]:
    """The deterministic "rewrite": the instruction (or the shared style) appended to the clip prompt,
    with the style of the look."""
    data = call.data or {}
    users = call.contents("user")
    instruction = str(data.get("instruction") or (users[-1] if users else "")).strip().rstrip(".!")
    base = str(data.get("clip_prompt") or "").strip().rstrip(".")
    shared = str(data.get("shared_style") or "").strip()
    style = shared or f"{instruction}, look {zlib.crc32(base.encode()):08x}"
    change = shared or instruction
    prompt = f"{base}, {change}" if base else change
    return prompt, f"Applied the instruction: {instruction}.", style


def _error(status: int, message: str, kind: str, code: str | None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status, headers=headers)


def serve_fake_llm(**options: Any) -> Iterator[FakeLLMServer]:
    """A running ``FakeLLMServer`` for the body of a pytest fixture (``yield from``)."""
    with FakeLLMServer(**options) as server:
        yield server


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the fake OpenAI-compatible LLM for a demo.")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    server = FakeLLMServer(api_key=args.api_key).start(args.port)
    serve_until_interrupted(server, "fake LLM")


if __name__ == "__main__":
    main()
