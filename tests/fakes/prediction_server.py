"""A local fake of the asynchronous prediction API (Replicate-style), for tests and demos.

It speaks the protocol ``HttpVideoGenerator`` uses: ``POST /predictions`` → 201 ``starting``,
``GET /predictions/{id}`` advancing through ``processing`` (with ``progress`` and ``logs``) to
``succeeded`` with an ``output`` URL, ``POST /predictions/{id}/cancel``, and ``GET /files/{id}.mp4``
serving a small real MP4. It runs uvicorn in a background thread on 127.0.0.1 and an OS-chosen port.

Idempotency works as providers offer it: the first create with an ``Idempotency-Key`` starts (and
charges) a prediction; a later create with the same key answers that prediction as it is now
(201, header ``Idempotent-Replayed: true``), charging nothing; the same key with another model or
input gets 422, and a create while the first one with that key is still in progress gets 409.
Scripted create failures answer before the key is looked at (the provider never saw the request).
``paid_predictions``, ``paid_for(key)`` and ``cancelled_ids`` say what was charged and cancelled.

Failures are scripted per endpoint as queues of actions, one action consumed per request (an empty
queue means ``"ok"``). An action is a word, optionally followed by ``:argument``:

- create: ``ok``, an HTTP status such as ``500`` / ``408`` / ``429:<Retry-After>``,
  ``content_policy`` (400), ``invalid_prompt`` (422), ``malformed`` (200 with broken JSON),
  ``slow:<seconds>`` (answers ``ok`` after a delay).
- poll: ``ok`` (advance one step), ``failed:<error text>``, ``canceled``, ``stall`` (this
  prediction never finishes from now on), ``malformed``, an HTTP status (``503:<Retry-After>``).
- download: ``ok``, ``truncated`` (full Content-Length, half the body), ``corrupt`` (right size,
  not an MP4), ``empty``, an HTTP status, ``redirect:<url>``.

Example::

    with PredictionServer(video=path, cost="0.12") as server:
        server.script(create=["500", "ok"], poll=["ok", "failed:CUDA error"])
        ...
        assert len(server.creates) == 2 and server.paid_predictions == 1 and not server.cancelled_ids

Run ``python -m tests.fakes.prediction_server --port 8090`` to serve it for a demo of the HTTP mode
(with ``CLIPCHAT_GENERATOR=http``, ``CLIPCHAT_GENERATOR_URL=http://127.0.0.1:8090`` and
``CLIPCHAT_GENERATOR_API_TOKEN=test-token``).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from tests.fakes.threaded_server import ThreadedServer, serve_until_interrupted

MALFORMED_JSON = b'{"id": "oops", "status": '
CONTENT_POLICY_BODY = {"detail": "The prompt was flagged by the content policy (nsfw).",
                       "code": "content_policy"}
INVALID_PROMPT_BODY = {"detail": "input.prompt: must not contain control characters",
                       "code": "invalid_input"}


def render_sample_mp4(dest: Path, *, ffmpeg: str | None = None, seconds: float = 1.0) -> Path:
    """Render a small H.264 test-pattern MP4 (320x180, 25 fps) to ``dest`` with the static ffmpeg.

    Raises ``subprocess.CalledProcessError`` when ffmpeg fails.
    """
    if ffmpeg is None:
        import imageio_ffmpeg

        ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    subprocess.run([ffmpeg, "-nostdin", "-y", "-hide_banner", "-loglevel", "error",
                    "-f", "lavfi", "-i", f"testsrc=size=320x180:rate=25:duration={seconds}",
                    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                    "-movflags", "+faststart", str(dest)],
                   check=True, capture_output=True, timeout=60)
    return dest


@dataclass(frozen=True)
class Call:
    """One request the fake received."""

    kind: str  # create | poll | cancel | download
    prediction_id: str | None
    body: Any = None  # the parsed JSON body of a create
    headers: dict[str, str] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)  # when it arrived (to check Retry-After waits)

    @property
    def idempotency_key(self) -> str:
        """The ``Idempotency-Key`` header the request carried ("" without one)."""
        return self.headers.get("idempotency-key", "")


@dataclass
class _Prediction:
    id: str
    model: str
    input: dict[str, Any]
    status: str = "starting"
    step: int = 0
    stalled: bool = False
    error: str | None = None


class PredictionServer:
    """The fake API; use as a context manager, or call ``start`` and ``stop``.

    ``video`` is the MP4 served as every output (a path or bytes; rendered once with ffmpeg when
    omitted). ``cost`` is reported on succeeded predictions when set, ``output_duration`` as
    ``metrics.duration``. ``output_url``, when set, replaces the output URL of succeeded
    predictions (to test URL checks). ``steps`` is how many polls answer ``processing``.
    """

    def __init__(self, *, video: Path | bytes | None = None, token: str = "test-token",
                 cost: str | None = None, steps: int = 3, output_duration: float | None = None,
                 output_url: str | None = None) -> None:
        self.token = token
        self.cost = cost
        self.steps = steps
        self.output_duration = output_duration
        self.output_url = output_url
        self._video_source = video
        self._video = b""
        self._lock = threading.Lock()
        self._scripts: dict[str, deque[str]] = {"create": deque(), "poll": deque(), "download": deque()}
        self._calls: list[Call] = []
        self._predictions: dict[str, _Prediction] = {}
        self._by_key: dict[str, str] = {}  # Idempotency-Key → the prediction it created
        self._keys_in_flight: set[str] = set()
        self._paid: Counter[str] = Counter()  # predictions created (charged), per Idempotency-Key
        self._cancelled_ids: list[str] = []
        self._http = ThreadedServer("fake prediction server")
        self.url = ""

    # Scripting and inspection (called from the test's thread).

    def script(self, *, create: list[str] | None = None, poll: list[str] | None = None,
               download: list[str] | None = None) -> None:
        """Queue actions for the next requests of each kind (see the module docstring)."""
        with self._lock:
            for kind, actions in (("create", create), ("poll", poll), ("download", download)):
                self._scripts[kind].extend(actions or ())

    def clear_script(self) -> None:
        """Drop the actions not used yet (the call log is kept)."""
        with self._lock:
            for queue in self._scripts.values():
                queue.clear()

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def calls_of(self, kind: str) -> list[Call]:
        return [c for c in self.calls if c.kind == kind]

    @property
    def creates(self) -> list[Call]:
        return self.calls_of("create")

    @property
    def polls(self) -> list[Call]:
        return self.calls_of("poll")

    @property
    def cancels(self) -> list[Call]:
        return self.calls_of("cancel")

    @property
    def downloads(self) -> list[Call]:
        return self.calls_of("download")

    @property
    def paid_predictions(self) -> int:
        """How many predictions were created (and charged) in all; idempotent replays not counted."""
        with self._lock:
            return sum(self._paid.values())

    def paid_for(self, idempotency_key: str) -> int:
        """How many predictions creates with ``idempotency_key`` charged ("": those without a key)."""
        with self._lock:
            return self._paid[idempotency_key]

    @property
    def cancelled_ids(self) -> list[str]:
        """The ids of known predictions that received an authorized cancel, in order (repeats kept)."""
        with self._lock:
            return list(self._cancelled_ids)

    def prediction_for(self, idempotency_key: str) -> str | None:
        """The id of the prediction created with ``idempotency_key``, if any."""
        with self._lock:
            return self._by_key.get(idempotency_key)

    @property
    def video(self) -> bytes:
        """The MP4 bytes every succeeded prediction serves."""
        return self._video

    def file_url(self, prediction_id: str) -> str:
        return f"{self.url}/files/{prediction_id}.mp4"

    # Lifecycle.

    def start(self, port: int = 0) -> Self:
        """Load or render the video, bind ``port`` on 127.0.0.1 (0: a free one) and serve until ``stop``."""
        self._video = self._load_video()
        self.url = self._http.start(self._app(), port)
        return self

    def stop(self) -> None:
        self._http.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _load_video(self) -> bytes:
        if isinstance(self._video_source, bytes):
            return self._video_source
        if self._video_source is not None:
            return Path(self._video_source).read_bytes()
        with tempfile.TemporaryDirectory() as tmp:
            return render_sample_mp4(Path(tmp) / "sample.mp4").read_bytes()

    # The app (runs on the server's thread).

    def _next(self, kind: str) -> tuple[str, str]:
        with self._lock:
            queue = self._scripts[kind]
            action = queue.popleft() if queue else "ok"
        word, _, argument = action.partition(":")
        return word, argument

    def _record(self, call: Call) -> None:
        with self._lock:
            self._calls.append(call)

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.token}"

    def _app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

        @app.post("/predictions")
        async def create(request: Request) -> Response:
            raw = await request.body()
            try:
                body = await request.json()
            except ValueError:
                body = raw.decode(errors="replace")
            call = Call("create", None, body, dict(request.headers))
            self._record(call)
            if not self._authorized(request):
                return JSONResponse({"detail": "Invalid token."}, status_code=401)
            word, argument = self._next("create")
            if word not in ("ok", "slow"):
                return _scripted_failure(word, argument)
            if not (isinstance(body, dict) and isinstance(body.get("input"), dict)
                    and isinstance(body["input"].get("prompt"), str) and body.get("model")):
                return JSONResponse({"detail": "model and input.prompt are required"}, status_code=422)
            key = call.idempotency_key
            replay = self._replay_or_reserve(key, body)
            if replay is not None:
                return replay
            try:
                if word == "slow":
                    await asyncio.sleep(float(argument))
                prediction = self._charge(key, body)
            finally:
                with self._lock:
                    self._keys_in_flight.discard(key)
            return JSONResponse(self._describe(prediction), status_code=201)

        @app.get("/predictions/{prediction_id}")
        async def poll(prediction_id: str, request: Request) -> Response:
            self._record(Call("poll", prediction_id, None, dict(request.headers)))
            if not self._authorized(request):
                return JSONResponse({"detail": "Invalid token."}, status_code=401)
            with self._lock:
                prediction = self._predictions.get(prediction_id)
            if prediction is None:
                return JSONResponse({"detail": "Not found."}, status_code=404)
            failure = self._poll_script(prediction)
            if failure is not None:
                return _scripted_failure(*failure)
            self._advance(prediction)
            return JSONResponse(self._describe(prediction))

        @app.post("/predictions/{prediction_id}/cancel")
        async def cancel(prediction_id: str, request: Request) -> Response:
            self._record(Call("cancel", prediction_id, None, dict(request.headers)))
            if not self._authorized(request):
                return JSONResponse({"detail": "Invalid token."}, status_code=401)
            with self._lock:
                prediction = self._predictions.get(prediction_id)
            if prediction is None:
                return JSONResponse({"detail": "Not found."}, status_code=404)
            with self._lock:
                self._cancelled_ids.append(prediction_id)
            if prediction.status in ("starting", "processing"):
                prediction.status = "canceled"
            return JSONResponse(self._describe(prediction))

        self._add_download_route(app)
        return app

    def _add_download_route(self, app: FastAPI) -> None:
        """``GET /files/{id}.mp4``: the video, or the scripted download failure."""

        @app.get("/files/{name}")
        async def download(name: str, request: Request) -> Response:
            self._record(Call("download", name.removesuffix(".mp4"), None, dict(request.headers)))
            word, argument = self._next("download")
            video = self._video
            if word == "ok":
                return Response(video, media_type="video/mp4")
            if word == "truncated":
                # The declared length promises the whole file; the connection ends halfway.
                return Response(video[: len(video) // 2], media_type="video/mp4",
                                headers={"Content-Length": str(len(video))})
            if word == "corrupt":
                return Response(b"\x00" * len(video), media_type="video/mp4")
            if word == "empty":
                return Response(b"", media_type="video/mp4")
            if word == "redirect":
                return RedirectResponse(argument, status_code=302)
            return _scripted_failure(word, argument)

    def _replay_or_reserve(self, key: str, body: dict[str, Any]) -> Response | None:
        """The answer to a create whose ``key`` was seen before; None (and ``key`` reserved) if new."""
        if not key:
            return None
        with self._lock:
            if key in self._keys_in_flight:
                return JSONResponse({"detail": "A request with this Idempotency-Key is in progress."},
                                    status_code=409, headers={"Retry-After": "1"})
            known = self._predictions.get(self._by_key.get(key, ""))
            if known is None:
                self._keys_in_flight.add(key)
                return None
        if (known.model, known.input) != (body["model"], body["input"]):
            return JSONResponse({"detail": "Idempotency-Key reused with a different request."},
                                status_code=422)
        return JSONResponse(self._describe(known), status_code=201, headers={"Idempotent-Replayed": "true"})

    def _charge(self, key: str, body: dict[str, Any]) -> _Prediction:
        """Create (and charge) a new prediction for a create ``body`` sent with ``key``."""
        prediction = _Prediction(id=uuid.uuid4().hex, model=str(body["model"]), input=body["input"])
        with self._lock:
            self._predictions[prediction.id] = prediction
            self._paid[key] += 1
            if key:
                self._by_key[key] = prediction.id
        return prediction

    def _poll_script(self, prediction: _Prediction) -> tuple[str, str] | None:
        """Apply the next scripted poll word to ``prediction``: stall it, fail it or cancel it; a
        word that is an HTTP status comes back as (status, argument) for the protocol's error answer."""
        word, argument = self._next("poll")
        if word == "stall":
            prediction.stalled = True
        elif word == "failed":
            prediction.status, prediction.error = "failed", argument or "The model failed."
        elif word == "canceled":
            prediction.status = "canceled"
        elif word != "ok":
            return word, argument
        return None

    def _advance(self, prediction: _Prediction) -> None:
        if prediction.status not in ("starting", "processing"):
            return
        if prediction.stalled:
            prediction.status = "processing"
            return
        prediction.step += 1
        prediction.status = "processing" if prediction.step <= self.steps else "succeeded"

    def _describe(self, prediction: _Prediction) -> dict[str, Any]:
        own = f"{self.url}/predictions/{prediction.id}"
        body: dict[str, Any] = {
            "id": prediction.id, "status": prediction.status, "input": prediction.input,
            "urls": {"get": own, "cancel": f"{own}/cancel"}, "output": None, "error": None,
            "logs": "", "metrics": {},
        }
        if prediction.status == "processing":
            fraction = min(prediction.step, self.steps) / (self.steps + 1)
            body["progress"] = round(fraction, 4)
            body["logs"] = f"{round(fraction * 100)}%|{'#' * prediction.step}"
        elif prediction.status == "succeeded":
            body["output"] = self.output_url or self.file_url(prediction.id)
            body["metrics"] = {"predict_time": 0.01 * self.steps}
            if self.output_duration is not None:
                body["metrics"]["duration"] = self.output_duration
            if self.cost is not None:
                body["cost"] = self.cost
        elif prediction.status == "failed":
            body["error"] = prediction.error
        return body


def _scripted_failure(word: str, argument: str) -> Response:
    """The response for a failure action: an HTTP status, a policy refusal or broken JSON."""
    if word == "content_policy":
        return JSONResponse(CONTENT_POLICY_BODY, status_code=400)
    if word == "invalid_prompt":
        return JSONResponse(INVALID_PROMPT_BODY, status_code=422)
    if word == "malformed":
        return Response(MALFORMED_JSON, status_code=200, media_type="application/json")
    status = int(word)
    headers = {"Retry-After": argument} if argument else {}
    return JSONResponse({"detail": f"scripted HTTP {status}"}, status_code=status, headers=headers)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the fake prediction API for a demo of the HTTP mode.")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--token", default="test-token")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the clip every prediction returns")
    parser.add_argument("--cost", default="0.20", help="what each succeeded prediction reports it cost")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        video = render_sample_mp4(Path(tmp) / "sample.mp4", seconds=args.seconds)
        server = PredictionServer(video=video, token=args.token, cost=args.cost).start(args.port)
    serve_until_interrupted(server, "fake prediction API")


if __name__ == "__main__":
    main()
