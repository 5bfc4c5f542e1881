"""A local fake of Replicate's HTTP API, written from its API reference, for tests and demos.

What it reproduces:

- ``POST /v1/predictions`` takes ``{"version", "input"}``: a body without ``version`` answers 422
  ("version is required"), an unknown version 422 ("Invalid version or not permitted").
- ``POST /v1/models/{owner}/{name}/predictions`` takes ``{"input"}``; an unknown model is 404.
- the input is checked against the model's schema as Replicate does (422 "Input validation failed"
  with ``invalid_fields``): ``prompt`` a string, ``duration`` an integer, ``aspect_ratio`` one of
  16:9, 9:16, 1:1.
- ``Prefer: wait=N`` answers the finished prediction from the create call.
- ``GET /v1/predictions/{id}`` moves through ``starting`` → ``processing`` (with ``logs``) →
  ``succeeded`` (``output`` a URL string, or a list with ``output_as_list``; ``metrics.predict_time``);
  ``POST /v1/predictions/{id}/cancel`` cancels.
- errors are problem documents (``{"title", "detail", "status"}``): 401 for a wrong token, and
  scripted 402 (credit), 429 with ``Retry-After``, 5xx.
- ``GET /v1/account`` and ``GET /v1/models/{owner}/{name}[/versions/{id}]`` (free lookups).
- outputs are served from a CDN host: ``http://{cdn_host}:{port}/files/{id}.mp4`` (``localhost``
  by default, a host other than the API's ``127.0.0.1``, as ``replicate.delivery`` is in real life).

It reuses ``PredictionServer``'s scripting (``script(create=…, poll=…, download=…)``), call log and
video; a create action can also be ``402``. ``predict_time`` is what succeeded predictions report.
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from tests.fakes.prediction_server import Call, PredictionServer, _Prediction, render_sample_mp4
from tests.fakes.threaded_server import serve_until_interrupted

MODEL = "acme/video-1"
VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"
ASPECT_RATIOS = ("16:9", "9:16", "1:1")


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    """A Replicate error answer: an RFC 7807 problem document."""
    headers = {"Retry-After": str(extra.pop("retry_after"))} if "retry_after" in extra else None
    return JSONResponse({"title": title, "detail": detail, "status": status, **extra}, status_code=status,
                        headers=headers, media_type="application/problem+json")


class ReplicateServer(PredictionServer):
    """The fake Replicate API; ``url`` is its base URL (``http://127.0.0.1:PORT``)."""

    def __init__(self, *, models: tuple[str, ...] = (MODEL,), versions: tuple[str, ...] = (VERSION,),
                 predict_time: float = 12.5, output_as_list: bool = False, cdn_host: str = "localhost",
                 **options: Any) -> None:
        super().__init__(**options)
        self.models = models
        self.versions = versions
        self.predict_time = predict_time
        self.output_as_list = output_as_list
        self.cdn_host = cdn_host

    def file_url(self, prediction_id: str) -> str:
        port = self.url.rsplit(":", 1)[1]
        return f"http://{self.cdn_host}:{port}/files/{prediction_id}.mp4"

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.token}"

    def _app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

        @app.post("/v1/predictions")
        async def create_with_version(request: Request) -> Response:
            body = await _json(request)
            refused = self._refuse(Call("create", None, body, dict(request.headers)), request)
            if refused is not None:
                return refused
            version = body.get("version") if isinstance(body, dict) else None
            if not isinstance(version, str) or not version:
                return _invalid("(root)", "required", "version is required")
            if version.rsplit(":", 1)[-1] not in self.versions:
                return problem(422, "Invalid version or not permitted", "Invalid version or not permitted")
            return self._start(body, version, request)

        @app.post("/v1/models/{owner}/{name}/predictions")
        async def create_for_model(owner: str, name: str, request: Request) -> Response:
            body = await _json(request)
            refused = self._refuse(Call("create", None, body, dict(request.headers)), request)
            if refused is not None:
                return refused
            if f"{owner}/{name}" not in self.models:
                return problem(404, "Not found", "The requested resource could not be found.")
            return self._start(body, f"{owner}/{name}", request)

        @app.get("/v1/predictions/{prediction_id}")
        async def poll(prediction_id: str, request: Request) -> Response:
            self._record(Call("poll", prediction_id, None, dict(request.headers)))
            if not self._authorized(request):
                return _unauthenticated()
            prediction = self._predictions.get(prediction_id)
            if prediction is None:
                return problem(404, "Not found", "The requested resource could not be found.")
            failure = self._poll_script(prediction)
            if failure is not None:
                return _scripted(*failure)
            self._advance(prediction)
            return JSONResponse(self._describe(prediction))

        @app.post("/v1/predictions/{prediction_id}/cancel")
        async def cancel(prediction_id: str, request: Request) -> Response:
            self._record(Call("cancel", prediction_id, None, dict(request.headers)))
            if not self._authorized(request):
                return _unauthenticated()
            prediction = self._predictions.get(prediction_id)
            if prediction is None:
                return problem(404, "Not found", "The requested resource could not be found.")
            with self._lock:
                self._cancelled_ids.append(prediction_id)
            if prediction.status in ("starting", "processing"):
                prediction.status = "canceled"
            return JSONResponse(self._describe(prediction))

        @app.get("/v1/account")
        async def account(request: Request) -> Response:
            if not self._authorized(request):
                return _unauthenticated()
            return JSONResponse({"type": "user", "username": "clipchat-tests", "name": "ClipChat tests",
                                 "github_url": None})

        @app.get("/v1/models/{owner}/{name}")
        async def model(owner: str, name: str, request: Request) -> Response:
            if not self._authorized(request):
                return _unauthenticated()
            if f"{owner}/{name}" not in self.models:
                return problem(404, "Not found", "The requested resource could not be found.")
            return JSONResponse({"owner": owner, "name": name, "visibility": "public",
                                 "latest_version": {"id": self.versions[0]}})

        @app.get("/v1/models/{owner}/{name}/versions/{version}")
        async def model_version(owner: str, name: str, version: str, request: Request) -> Response:
            if not self._authorized(request):
                return _unauthenticated()
            if f"{owner}/{name}" not in self.models or version not in self.versions:
                return problem(404, "Not found", "The requested resource could not be found.")
            return JSONResponse({"id": version, "created_at": "2026-11-01T00:00:00Z"})

        self._add_download_route(app)
        return app

    def _refuse(self, call: Call, request: Request) -> Response | None:
        """Record a create; the answer when it is refused before the model is looked at."""
        self._record(call)
        if not self._authorized(request):
            return _unauthenticated()
        word, argument = self._next("create")
        return None if word == "ok" else _scripted(word, argument)

    def _start(self, body: Any, model: str, request: Request) -> Response:
        model_input = body.get("input") if isinstance(body, dict) else None
        invalid = _check_input(model_input)
        if invalid is not None:
            return invalid
        assert isinstance(model_input, dict)
        prediction = _Prediction(id=uuid.uuid4().hex[:26], model=model, input=model_input)
        with self._lock:
            self._predictions[prediction.id] = prediction
            self._paid[""] += 1
        if request.headers.get("prefer", "").startswith("wait"):
            while prediction.status in ("starting", "processing"):
                self._advance(prediction)
        return JSONResponse(self._describe(prediction), status_code=201)

    def _describe(self, prediction: _Prediction) -> dict[str, Any]:
        own = f"{self.url}/v1/predictions/{prediction.id}"
        body: dict[str, Any] = {
            "id": prediction.id, "model": prediction.model, "version": self.versions[0],
            "input": prediction.input, "logs": "", "output": None, "data_removed": False, "error": None,
            "status": prediction.status, "created_at": "2026-11-29T12:00:00.000Z",
            "urls": {"get": own, "cancel": f"{own}/cancel", "web": f"https://replicate.com/p/{prediction.id}"},
        }
        if prediction.status == "processing":
            body["logs"] = f"{round(100 * prediction.step / (self.steps + 1))}%|{'#' * prediction.step}"
        if prediction.status in ("succeeded", "failed", "canceled"):
            body["metrics"] = {"predict_time": self.predict_time, "total_time": self.predict_time + 1}
        if prediction.status == "succeeded":
            url = self.output_url or self.file_url(prediction.id)
            body["output"] = [url] if self.output_as_list else url
        elif prediction.status == "failed":
            body["error"] = prediction.error
        return body


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


def _unauthenticated() -> JSONResponse:
    return problem(401, "Unauthenticated", "You did not pass a valid authentication token")


def _invalid(field: str, kind: str, description: str) -> JSONResponse:
    return problem(422, "Input validation failed", f"- {field}: {description}\n",
                   invalid_fields=[{"type": kind, "field": field, "description": description}])


def _check_input(model_input: object) -> JSONResponse | None:
    """The 422 a model's schema gives this input, or None when it fits."""
    if not isinstance(model_input, dict):
        return _invalid("(root)", "required", "input is required")
    if not isinstance(model_input.get("prompt"), str):
        return _invalid("input", "required", "prompt is required")
    duration = model_input.get("duration")
    if duration is not None and (not isinstance(duration, int) or isinstance(duration, bool)):
        return _invalid("input.duration", "invalid_type",
                        f"Invalid type. Expected: integer, given: {type(duration).__name__}")
    ratio = model_input.get("aspect_ratio")
    if ratio is not None and ratio not in ASPECT_RATIOS:
        return _invalid("input.aspect_ratio", "enum", f"aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}")
    return None


def _scripted(word: str, argument: str) -> JSONResponse:
    status = int(word)
    if status == 429:
        return problem(429, "Request was throttled",
                       f"Request was throttled. Expected available in {argument or 1} second.",
                       retry_after=argument or "1")
    if status == 402:
        return problem(402, "Insufficient credit", "You have insufficient credit to run this model.")
    extra = {"retry_after": argument} if argument else {}
    return problem(status, "Scripted failure", f"scripted HTTP {status}", **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a fake Replicate API for a demo.")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--token", default="test-token")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the clip every prediction returns")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        video = render_sample_mp4(Path(tmp) / "sample.mp4", seconds=args.seconds)
        server = ReplicateServer(video=video, token=args.token).start(args.port)
    serve_until_interrupted(server, "fake Replicate API")


if __name__ == "__main__":
    main()
