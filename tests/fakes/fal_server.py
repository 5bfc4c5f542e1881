"""A local fake of fal's queue API, written from its queue reference, for tests and demos.

What it reproduces:

- ``POST /{model_id}`` (the body is the model's input) → ``request_id``, ``status_url``,
  ``response_url``, ``cancel_url`` and ``queue_position``; the request URLs use the model id's
  first two segments (``/{owner}/{app}/requests/{id}``). ``Authorization: Key <key>`` or 401.
  An unknown model is 404.
- ``GET …/requests/{id}/status`` moves ``IN_QUEUE`` (``queue_position``) → ``IN_PROGRESS`` (``logs``
  with ``?logs=1``) → ``COMPLETED`` (``metrics.inference_time``; ``error`` and ``error_type`` when
  the request failed).
- ``GET …/requests/{id}`` → ``{"video": {"url", "content_type", "file_name", "file_size"}}`` with
  the file on a CDN host (``http://{cdn_host}:{port}/files/{id}.mp4``, ``localhost`` by default, as
  ``fal.media`` in real life); 400 while the request is not completed; the model's validation
  errors as 422 ``{"detail": [{"loc", "msg", "type"}]}``: ``prompt`` a string, ``duration``
  ``"5"`` or ``"10"``, ``aspect_ratio`` 16:9, 9:16 or 1:1.
- ``PUT …/requests/{id}/cancel`` → 202 ``CANCELLATION_REQUESTED``, or 400 ``ALREADY_COMPLETED``.

Scripting as in ``PredictionServer``: ``script(create=…, poll=…, download=…)`` and
``script_result([...])``. Create and poll take an HTTP status (``429:<Retry-After>``); poll also
``failed:<error_type>:<text>`` (COMPLETED with an error) and ``stall``; result takes
``content_policy`` (422 with a ``content_policy_violation`` item) or an HTTP status.
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from tests.fakes.prediction_server import Call, PredictionServer, _Prediction, render_sample_mp4
from tests.fakes.threaded_server import serve_until_interrupted

MODEL = "fal-ai/acme-video/v1/text-to-video"
DURATIONS = ("5", "10")
ASPECT_RATIOS = ("16:9", "9:16", "1:1")


class FalServer(PredictionServer):
    """The fake queue; ``url`` is its base URL (stands for ``https://queue.fal.run``)."""

    def __init__(self, *, models: tuple[str, ...] = (MODEL,), inference_time: float = 8.25,
                 cdn_host: str = "localhost", **options: Any) -> None:
        super().__init__(**options)
        self.models = models
        self.inference_time = inference_time
        self.cdn_host = cdn_host
        self._scripts["result"] = deque()

    def script_result(self, actions: list[str]) -> None:
        with self._lock:
            self._scripts["result"].extend(actions)

    @property
    def results(self) -> list[Call]:
        return self.calls_of("result")

    def file_url(self, prediction_id: str) -> str:
        port = self.url.rsplit(":", 1)[1]
        return f"http://{self.cdn_host}:{port}/files/{prediction_id}.mp4"

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Key {self.token}"

    def _app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        self._add_download_route(app)

        @app.get("/{owner}/{app_name}/requests/{request_id}/status")
        async def status(owner: str, app_name: str, request_id: str, request: Request) -> Response:
            self._record(Call("poll", request_id, None, dict(request.headers)))
            found = self._find(request, request_id)
            if isinstance(found, Response):
                return found
            word, argument = self._next("poll")
            if word == "stall":
                found.stalled = True
            elif word == "failed":
                error_type, _, text = argument.partition(":")
                found.status, found.error = "failed", f"{error_type}:{text or 'The request failed.'}"
            elif word != "ok":
                return _scripted(word, argument)
            self._advance(found)
            return JSONResponse(self._status_of(found, with_logs=request.query_params.get("logs") == "1"))

        @app.get("/{owner}/{app_name}/requests/{request_id}")
        async def result(owner: str, app_name: str, request_id: str, request: Request) -> Response:
            self._record(Call("result", request_id, None, dict(request.headers)))
            found = self._find(request, request_id)
            if isinstance(found, Response):
                return found
            if found.status in ("starting", "processing"):
                return JSONResponse({"detail": "Request is still in progress"}, status_code=400)
            word, argument = self._next("result")
            if word == "content_policy":
                return _detail_error("prompt", "The prompt was flagged by the content checker.",
                                     "content_policy_violation")
            if word != "ok":
                return _scripted(word, argument)
            invalid = _check_input(found.input)
            if invalid is not None:
                return invalid
            return JSONResponse({"video": {"url": self.output_url or self.file_url(found.id),
                                           "content_type": "video/mp4", "file_name": "output.mp4",
                                           "file_size": len(self.video)}, "seed": 42})

        @app.put("/{owner}/{app_name}/requests/{request_id}/cancel")
        async def cancel(owner: str, app_name: str, request_id: str, request: Request) -> Response:
            self._record(Call("cancel", request_id, None, dict(request.headers)))
            found = self._find(request, request_id)
            if isinstance(found, Response):
                return found
            with self._lock:
                self._cancelled_ids.append(request_id)
            if found.status not in ("starting", "processing"):
                return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
            found.status = "canceled"
            return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)

        @app.post("/{model_id:path}")
        async def submit(model_id: str, request: Request) -> Response:
            try:
                body = await request.json()
            except ValueError:
                body = None
            self._record(Call("create", None, body, dict(request.headers)))
            if not self._authorized(request):
                return JSONResponse({"detail": "Unauthorized: invalid key"}, status_code=401)
            word, argument = self._next("create")
            if word != "ok":
                return _scripted(word, argument)
            if model_id not in self.models:
                return JSONResponse({"detail": f"Application '{model_id}' not found"}, status_code=404)
            return JSONResponse(self._submit(model_id, body if isinstance(body, dict) else {}))

        return app

    def _find(self, request: Request, request_id: str) -> _Prediction | Response:
        if not self._authorized(request):
            return JSONResponse({"detail": "Unauthorized: invalid key"}, status_code=401)
        with self._lock:
            found = self._predictions.get(request_id)
        return found if found is not None else JSONResponse({"detail": "Request not found"}, status_code=404)

    def _submit(self, model_id: str, model_input: dict[str, Any]) -> dict[str, Any]:
        request = _Prediction(id=str(uuid.uuid4()), model=model_id, input=model_input)
        with self._lock:
            self._predictions[request.id] = request
            self._paid[""] += 1
        own = f"{self.url}/{'/'.join(model_id.split('/')[:2])}/requests/{request.id}"
        return {"request_id": request.id, "response_url": own, "status_url": f"{own}/status",
                "cancel_url": f"{own}/cancel", "queue_position": 0}

    def _status_of(self, request: _Prediction, *, with_logs: bool) -> dict[str, Any]:
        own = f"{self.url}/{'/'.join(request.model.split('/')[:2])}/requests/{request.id}"
        if request.status == "starting":
            return {"status": "IN_QUEUE", "queue_position": 0, "response_url": own}
        if request.status == "processing":
            percent = round(100 * request.step / (self.steps + 1))
            logs = [{"message": f"Generating {percent}%", "level": "INFO", "source": "user",
                     "timestamp": "2026-11-29T12:00:00"}] if with_logs else None
            return {"status": "IN_PROGRESS", "logs": logs, "response_url": own}
        body: dict[str, Any] = {"status": "COMPLETED", "logs": [] if with_logs else None, "response_url": own,
                                "metrics": {"inference_time": self.inference_time}}
        if request.status == "failed" and request.error:
            error_type, _, text = request.error.partition(":")
            body.update(error=text, error_type=error_type)
        return body


def _detail_error(field: str, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": ["body", field], "msg": message, "type": kind}]}, status_code=422)


def _check_input(model_input: dict[str, Any]) -> JSONResponse | None:
    """The 422 the model gives this input, or None when it fits its schema."""
    if not isinstance(model_input.get("prompt"), str):
        return _detail_error("prompt", "field required", "value_error.missing")
    duration = model_input.get("duration")
    if duration is not None and duration not in DURATIONS:
        return _detail_error("duration", "value is not a valid enumeration member; permitted: '5', '10'",
                             "type_error.enum")
    ratio = model_input.get("aspect_ratio")
    if ratio is not None and ratio not in ASPECT_RATIOS:
        return _detail_error("aspect_ratio", "value is not a valid enumeration member", "type_error.enum")
    return None


def _scripted(word: str, argument: str) -> JSONResponse:
    status = int(word)
    headers = {"Retry-After": argument} if argument else None
    if status >= 500:
        return JSONResponse({"detail": "Runner disconnected", "error_type": "runner_disconnected"},
                            status_code=status, headers={**(headers or {}), "X-Fal-Error-Type": "runner_disconnected"})
    return JSONResponse({"detail": f"scripted HTTP {status}"}, status_code=status, headers=headers)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a fake fal queue for a demo.")
    parser.add_argument("--port", type=int, default=8092)
    parser.add_argument("--token", default="test-token")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the clip every request returns")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        video = render_sample_mp4(Path(tmp) / "sample.mp4", seconds=args.seconds)
        server = FalServer(video=video, token=args.token).start(args.port)
    serve_until_interrupted(server, "fake fal queue")


if __name__ == "__main__":
    main()
