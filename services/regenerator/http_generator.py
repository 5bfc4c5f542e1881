"""A ``VideoGenerator`` backed by an asynchronous prediction API, and the base of the provider adapters.

ClipChat's generic protocol (``CLIPCHAT_GENERATOR=http``): ``POST {base_url}/predictions`` with
``{"model", "input"}`` starts a prediction, ``GET /predictions/{id}`` is
polled until its status is terminal, and a succeeded prediction's ``output`` is the URL of an MP4
that is downloaded next to ``dest`` and renamed into place once checked. The provider adapters
override the protocol's pieces: ``_create_request``, ``_own_url``, ``_track``, ``_state``,
``_result``, ``_output_url``, ``_error_for`` and the cancel method.

No double pay: the create request carries the caller's ``Idempotency-Key``, so a repeat of it
(after a lost answer or a timeout) gets the same prediction back instead of a second paid one.
``on_started`` hands the new prediction's id to the caller before polling, and ``resume_id`` polls
such a recorded prediction instead of creating one (a 404 for it creates one after all). A
prediction this generator abandons (an error, a timeout, a cancelled task, a failing
``on_started``) is cancelled at the provider, best effort.

Errors, in the terms of ``clipchat.errors``:

- ``TransientGenerationError`` (a ``TransientError``, retryable): connect/read timeouts, transport
  errors, HTTP 408/429/5xx (with ``retry_after`` from ``Retry-After``), HTTP 409 (code
  ``idempotency_conflict``: a create with the same key is still in flight), malformed answers, a
  corrupt or truncated download, a prediction cancelled by the provider, a failed prediction whose
  error text says it is transient, and the overall ``generation_timeout`` (code
  ``generation_timeout``).
- ``GenerationRejected`` (an ``InvalidInput``, permanent): any other HTTP 4xx, and a failed
  prediction whose error text does not say it is transient. Its code is ``content_policy`` when
  the provider's answer mentions a policy refusal, else ``invalid_prompt``.
- ``ProviderMisconfigured`` (permanent, for an operator): 401/403, a bad API token, which
  rephrasing cannot fix (code ``generator_unauthorized``). The provider adapters
  (``replicate_generator``, ``fal_generator``) map more of their 4xx answers here.
- ``MediaError`` (permanent): an output URL (or a redirect) that leaves the API's origin and the
  allowed output hosts (HTTPS only; plain http only from a listed loopback host when
  ``allow_http_loopback``), uses another scheme, or redirects too often.
- Whatever ``on_started`` raises propagates unchanged (after the prediction is cancelled).

There is no retry loop here: the caller declares its retry policy around ``generate``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import random
import re
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import anyio
import httpx

from clipchat.errors import (
    ClipChatError,
    InvalidInput,
    MediaError,
    ProviderMisconfigured,
    ProviderRefused,
    ProviderUnavailable,
)
from clipchat.pricing import round_money
from clipchat.providers import (
    DETAIL_CHARS,
    OwnedHttpClient,
    StatusKind,
    check_base_url,
    classify_status,
    retry_after,
)
from services.regenerator.generator import GeneratedClip, ProgressFn, StartedFn
from services.regenerator.model_inputs import INPUT_MAPPINGS

logger = logging.getLogger("clipchat.regenerator.http_generator")

_CANCEL_TIMEOUT = 5.0  # the remote cancel is best effort; it must not hold up a cancelled task
_MAX_REDIRECTS = 3
_MAX_CLIP_BYTES = 1 << 30  # a few seconds of 1080p is tens of MB; more means something is wrong
_PENDING = frozenset({"starting", "processing"})

# How a failed prediction's error text is classified: a retry can fix capacity problems and
# timeouts on the provider's side, so those are transient; everything else (bad input, a model
# error, a policy refusal) would fail the same way again, so it is permanent.
_TRANSIENT_FAILURE_MARKERS = ("timeout", "timed out", "capacity", "overloaded", "unavailable",
                              "temporar", "try again", "rate limit", "interrupted")
_POLICY_MARKERS = ("content_policy", "content policy", "nsfw", "safety", "flagged", "moderation")
_PERCENT_RE = re.compile(r"(\d{1,3}(?:\.\d+)?)\s*%")

TIMEOUT_MESSAGE = "Video generation timed out. Please retry."
REJECTED_MESSAGE = "The video generator refused this prompt. Try rephrasing the instruction."
UNAUTHORIZED_MESSAGE = "The video generator refused ClipChat's credentials. Please contact support."
_DOWNLOAD_MESSAGE = "The generated video could not be downloaded intact. Please retry."
_UNTRUSTED_OUTPUT_MESSAGE = "The video generator returned a video that cannot be used."


class TransientGenerationError(ProviderUnavailable):
    """The provider could not answer usefully right now; a later attempt may succeed.

    ``retry_after`` is the wait (seconds) the provider asked for, when it said; ``detail`` is
    technical context for logs, never shown to users.
    """

    code = "generator_unavailable"
    default_message = "The video generator is unavailable right now. Please retry."


class GenerationRejected(ProviderRefused):
    """The provider refused the request for good (content policy, invalid prompt); do not retry.

    ``detail`` carries the provider's response body (or failure text) for support.
    """

    code = "invalid_prompt"
    default_message = REJECTED_MESSAGE


class RemotePrediction:
    """What is known about the remote prediction, so that failures can cancel it."""

    def __init__(self) -> None:
        self.id = ""
        self.get_url = ""
        self.cancel_url = ""
        self.result_url = ""  # where a finished prediction's result is read (fal), "" when polled in place
        self.compute_seconds: float | None = None  # what the provider reports it computed
        self.finished = False  # terminal on the provider's side: nothing left to cancel


@dataclass(frozen=True)
class PollState:
    """One poll's answer in the generator's terms: ``status`` is ``pending``, ``succeeded``,
    ``failed`` or ``canceled``; ``error`` the failure text; ``fraction`` the progress, when known."""

    status: str
    error: object = None
    fraction: float | None = None


class HttpVideoGenerator(OwnedHttpClient):
    """Generates clips through an asynchronous prediction API.

    ``output_hosts`` names extra hosts (e.g. the provider's CDN; ``*.example.com`` for its
    subdomains) that outputs may be downloaded from over HTTPS; by default only the API's own
    origin is trusted. ``allow_http_loopback`` also lets a listed loopback host serve them over
    plain http (local fakes in dev and tests). The API token is only ever sent to the API's origin.
    ``price_per_compute_second``, when given, prices a clip by the compute time the provider
    reports (Replicate's ``metrics.predict_time``, fal's ``metrics.inference_time``) instead of by
    its length; a ``cost`` the provider reports wins over both. When ``http`` is not given, the
    generator owns its client and ``aclose`` closes it.
    """

    name = "http"
    default_base_url = ""
    auth_scheme = "Bearer"
    cancel_method = "POST"

    def __init__(self, base_url: str, api_token: str, model: str, *, price_per_second: Decimal,
                 request_timeout: float = 30, generation_timeout: float = 600,
                 poll_initial: float = 0.5, poll_max: float = 5.0,
                 http: httpx.AsyncClient | None = None, output_hosts: Collection[str] = (),
                 allow_http_loopback: bool = False, price_per_compute_second: Decimal | None = None,
                 aspect_ratio: str = "16:9") -> None:
        base_url = check_base_url(base_url or self.default_base_url)
        if not 0 < poll_initial <= poll_max:
            raise ValueError("poll intervals must satisfy 0 < poll_initial <= poll_max")
        if not model:
            raise ValueError("a generator model is required")
        self._base_url = base_url
        self._origin = _origin(base_url)
        self._auth = {"Authorization": f"{self.auth_scheme} {api_token}"}
        self._model = model
        self._price_per_second = price_per_second
        self._price_per_compute_second = price_per_compute_second
        self._aspect_ratio = aspect_ratio
        self._request_timeout = request_timeout
        self._generation_timeout = generation_timeout
        self._poll_initial = poll_initial
        self._poll_max = poll_max
        self._output_hosts = frozenset(h.strip().lower() for h in output_hosts if h.strip())
        self._allow_http_loopback = allow_http_loopback
        super().__init__(http, request_timeout)

    def estimate_cost(self, duration: float) -> Decimal:
        """``duration`` × the configured price per second, to 0.0001."""
        return round_money(Decimal(str(duration)) * self._price_per_second)

    async def generate(self, prompt: str, duration: float, dest: Path, *,
                       on_progress: ProgressFn | None = None, idempotency_key: str = "",
                       resume_id: str = "", on_started: StartedFn | None = None) -> GeneratedClip:
        """Generate a clip of ``duration`` seconds for ``prompt`` and write it to ``dest``.

        ``dest`` is written whole or not at all. ``idempotency_key`` is sent as the create
        request's ``Idempotency-Key``; ``on_started`` is awaited with the id of a newly created
        prediction before polling; ``resume_id`` polls that prediction instead of creating one
        (see ``_start``). Raises ``TransientGenerationError`` or ``GenerationRejected`` as the
        module describes, ``MediaError`` for an untrusted output URL, ``InvalidInput`` for a
        non-positive duration, and whatever ``on_started`` raises. Cancelling the awaiting task,
        like any of these errors, cancels the remote prediction (best effort) before it propagates.
        """
        if not (math.isfinite(duration) and duration > 0):
            raise InvalidInput("The clip duration must be a positive number of seconds.")
        if not prompt.strip():
            raise GenerationRejected(code="invalid_prompt", detail="empty prompt")
        prediction = RemotePrediction()
        deadline = asyncio.timeout(self._generation_timeout)
        try:
            async with deadline:
                body = await self._start(prediction, prompt, duration, idempotency_key=idempotency_key,
                                         resume_id=resume_id, on_started=on_started)
                body = await self._wait(prediction, body, on_progress)
                clip = await self._fetch(prediction, body, duration, dest)
        except TimeoutError:
            if not deadline.expired():
                raise
            await self._cancel_remote(prediction)
            logger.warning("generation.timed_out", extra={"prediction_id": prediction.id,
                                                           "timeout_s": self._generation_timeout})
            raise TransientGenerationError(TIMEOUT_MESSAGE, code="generation_timeout") from None
        except BaseException:
            # Covers task cancellation as well as errors while polling: an abandoned prediction
            # would keep running (and billing) while the caller retries with a new one.
            await self._cancel_remote(prediction)
            raise
        if on_progress is not None:
            await on_progress(1.0)
        return clip

    async def _start(self, prediction: RemotePrediction, prompt: str, duration: float, *, idempotency_key: str,
                     resume_id: str, on_started: StartedFn | None) -> dict[str, Any]:
        """Resume ``resume_id`` when the provider still knows it, else create a prediction.

        Only a created prediction is reported to ``on_started``: a resumed one was reported by
        whoever created it.
        """
        if resume_id:
            body = await self._resume(prediction, resume_id)
            if body is not None:
                return body
        body = await self._create(prediction, prompt, duration, idempotency_key)
        if on_started is not None:
            await on_started(prediction.id)
        return body

    async def _create(self, prediction: RemotePrediction, prompt: str, duration: float,
                      idempotency_key: str) -> dict[str, Any]:
        url, request, headers = self._create_request(prompt, duration)
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        body = await self._call("POST", url, json=request, headers=headers)
        prediction_id = body.get(self.id_field)
        if not isinstance(prediction_id, str) or not prediction_id:
            raise _malformed("create answer without an id")
        self._track(prediction, prediction_id, body)
        logger.info("generation.created", extra={"prediction_id": prediction_id, "model": self._model,
                                                  "idempotency_key": idempotency_key})
        return body

    async def _resume(self, prediction: RemotePrediction, resume_id: str) -> dict[str, Any] | None:
        """The current state of prediction ``resume_id``; None when the provider answers 404."""
        response = await self._send("GET", self._own_url(resume_id))
        if response.status_code == 404:
            logger.warning("generation.resume_missing", extra={"prediction_id": resume_id})
            return None
        if not response.is_success:
            raise self._error_for(response)
        body = _json_object(response, "GET")
        self._track(prediction, resume_id, body)
        logger.info("generation.resumed", extra={"prediction_id": resume_id, "status": body.get("status")})
        return body

    id_field = "id"  # the create answer's field that holds the prediction id

    def _create_request(self, prompt: str, duration: float) -> tuple[str, dict[str, Any], dict[str, str]]:
        """The create request: URL, JSON body and extra headers."""
        model_input = INPUT_MAPPINGS[self.name].build(prompt, duration, self._aspect_ratio)
        return f"{self._base_url}/predictions", {"model": self._model, "input": model_input}, {}

    def _track(self, prediction: RemotePrediction, prediction_id: str, body: Mapping[str, Any]) -> None:
        """Remember where to poll and cancel ``prediction_id``, from the provider's ``urls``."""
        prediction.id = prediction_id
        own = self._own_url(prediction_id)
        urls = _mapping(body.get("urls"))
        # URLs that leave the API's origin are ignored so the bearer token goes nowhere else.
        prediction.get_url = self._same_origin_or(urls.get("get"), own)
        prediction.cancel_url = self._same_origin_or(urls.get("cancel"), f"{own}/cancel")

    def _own_url(self, prediction_id: str) -> str:
        return f"{self._base_url}/predictions/{quote(prediction_id, safe='')}"

    async def _wait(self, prediction: RemotePrediction, body: dict[str, Any],
                    on_progress: ProgressFn | None) -> dict[str, Any]:
        """Poll until the prediction is terminal; return its result or raise."""
        interval = self._poll_initial
        reported = 0.0
        while True:
            state = self._state(prediction, body)
            if state.status == "succeeded":
                prediction.finished = True
                return await self._result(prediction, body)
            if state.status == "failed":
                prediction.finished = True
                raise _failure(prediction.id, state.error)
            if state.status == "canceled":
                prediction.finished = True
                raise TransientGenerationError(code="generation_canceled",
                                               detail=f"prediction {prediction.id} was canceled remotely")
            if on_progress is not None and state.fraction is not None and state.fraction > reported:
                reported = state.fraction
                await on_progress(state.fraction)
            # Jitter spreads the polls of many workers; the cap keeps latency bounded.
            await asyncio.sleep(random.uniform(interval / 2, interval))
            interval = min(interval * 2, self._poll_max)
            body = await self._call("GET", prediction.get_url)

    def _state(self, prediction: RemotePrediction, body: Mapping[str, Any]) -> PollState:
        """Read one poll answer (Replicate's statuses and fields)."""
        status = body.get("status")
        if status in ("succeeded", "failed", "canceled"):
            prediction.compute_seconds = _positive_number(_mapping(body.get("metrics")).get("predict_time"))
            return PollState(str(status), error=body.get("error"))
        if status not in _PENDING:
            raise _malformed(f"unknown prediction status {status!r}")
        return PollState("pending", fraction=_progress_of(body))

    async def _result(self, prediction: RemotePrediction, body: dict[str, Any]) -> dict[str, Any]:
        """The result of a succeeded prediction: here, the last poll's answer itself."""
        return body

    def _output_url(self, result: Mapping[str, Any]) -> object:
        """The video URL in a result: ``output`` as a string or a one-item list."""
        output = result.get("output")
        if isinstance(output, list) and len(output) == 1:
            output = output[0]
        return output

    async def _fetch(self, prediction: RemotePrediction, body: dict[str, Any], requested: float,
                     dest: Path) -> GeneratedClip:
        output = self._output_url(body)
        if not isinstance(output, str) or not output:
            raise _malformed("succeeded prediction without an output URL")
        await self._download(output, dest)
        metrics = _mapping(body.get("metrics"))
        duration = _positive_number(metrics.get("duration")) or requested
        cost = self._cost_of(body, duration, prediction.compute_seconds)
        logger.info("generation.succeeded", extra={
            "prediction_id": prediction.id, "compute_s": prediction.compute_seconds,
            "duration_s": duration, "cost": str(cost)})
        return GeneratedClip(path=dest, duration=duration, cost=cost, provider_id=prediction.id)

    def _cost_of(self, body: dict[str, Any], duration: float, compute_seconds: float | None) -> Decimal:
        """The provider's ``cost``; else compute time × its price, when both are known; else the
        clip's length × the price per second."""
        raw = body.get("cost")
        if raw is None and compute_seconds is not None and self._price_per_compute_second is not None:
            return round_money(Decimal(str(compute_seconds)) * self._price_per_compute_second)
        if raw is None:
            return self.estimate_cost(duration)
        try:
            cost = Decimal(str(raw))
        except InvalidOperation:
            cost = Decimal("NaN")
        if cost.is_finite() and cost >= 0:
            return round_money(cost)
        # The clip exists and was paid for; an estimate is a better record than losing it.
        logger.warning("generation.cost_unreadable", extra={"cost": str(raw)[:50]})
        return self.estimate_cost(duration)

    async def _download(self, url: str, dest: Path) -> None:
        """Stream ``url`` into a temporary file beside ``dest``, check it, then rename it.

        Redirects are followed by hand so every hop passes the same origin check.
        """
        await anyio.Path(dest.parent).mkdir(parents=True, exist_ok=True)
        partial = anyio.Path(dest.parent / f".{dest.name}.{secrets.token_hex(6)}.part")
        try:
            for _ in range(_MAX_REDIRECTS + 1):
                self._check_output_url(url)
                headers = dict(self._auth) if _origin(url) == self._origin else {}
                headers["Accept-Encoding"] = "identity"  # so Content-Length is the file size
                try:
                    async with self._http.stream("GET", url, headers=headers, follow_redirects=False,
                                                 timeout=self._request_timeout) as response:
                        if response.is_redirect:
                            url = urljoin(url, response.headers.get("location", ""))
                            continue
                        if not response.is_success:
                            await response.aread()
                            raise _download_failed(f"HTTP {response.status_code}",
                                                   retry_after(response.headers))
                        await _write_checked(response, partial)
                except httpx.HTTPError as exc:
                    raise _download_failed(f"{type(exc).__name__}: {exc}") from exc
                await partial.replace(dest)
                return
            raise MediaError(_UNTRUSTED_OUTPUT_MESSAGE, code="untrusted_output_url")
        finally:
            # Synchronous on purpose: it must run even if this task is cancelled again here.
            Path(partial).unlink(missing_ok=True)  # noqa: ASYNC240

    def _check_output_url(self, url: str) -> None:
        """Refuse anything but the API's origin or an allowed output host over HTTPS (or, with
        ``allow_http_loopback``, over http from a listed loopback host)."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        listed = any(host == allowed or (allowed.startswith("*.") and host.endswith(allowed[1:]))
                     for allowed in self._output_hosts)
        trusted = parts.scheme in ("http", "https") and (
            _origin(url) == self._origin
            or (listed and (parts.scheme == "https" or (self._allow_http_loopback and _is_loopback(host)))))
        if not trusted:
            logger.warning("generation.output_url_refused", extra={"scheme": parts.scheme, "host": host})
            raise MediaError(_UNTRUSTED_OUTPUT_MESSAGE, code="untrusted_output_url")

    async def _cancel_remote(self, prediction: RemotePrediction) -> None:
        """Ask the provider to stop a prediction that is still running; never raises for it."""
        if not prediction.id or prediction.finished:
            return
        prediction.finished = True
        try:
            # Shielded so that a second cancellation of the caller cannot abort the request.
            await asyncio.shield(self._http.request(
                self.cancel_method, prediction.cancel_url, headers=self._auth,
                timeout=min(_CANCEL_TIMEOUT, self._request_timeout), follow_redirects=False))
            logger.info("generation.cancelled", extra={"prediction_id": prediction.id})
        except (httpx.HTTPError, OSError) as exc:
            logger.warning("generation.cancel_failed", extra={"prediction_id": prediction.id,
                                                              "error": type(exc).__name__})

    async def _call(self, method: str, url: str, *, json: Any = None,
                    headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """One API request; its JSON object answer, or the error the response maps to."""
        response = await self._send(method, url, json=json, headers=headers)
        if not response.is_success:
            raise self._error_for(response)
        return _json_object(response, method)

    async def _send(self, method: str, url: str, *, json: Any = None,
                    headers: Mapping[str, str] | None = None) -> httpx.Response:
        """One API request with the bearer token; transport failures become ``TransientGenerationError``."""
        try:
            return await self._http.request(method, url, json=json, headers={**self._auth, **(headers or {})},
                                            timeout=self._request_timeout, follow_redirects=False)
        except httpx.TimeoutException as exc:
            raise TransientGenerationError(code="generator_timeout",
                                           detail=f"{type(exc).__name__} on {method}") from exc
        except httpx.HTTPError as exc:
            raise TransientGenerationError(detail=f"{type(exc).__name__}: {exc}") from exc

    def _error_for(self, response: httpx.Response) -> ClipChatError:
        """Map a non-2xx API answer: 408/409/429/5xx (and stray 3xx) are transient, 401/403 an
        operator's problem, any other 4xx a refusal of this prompt."""
        rejection = provider_error(response)
        if rejection is not None:
            return rejection
        body = response.text[:DETAIL_CHARS]
        return GenerationRejected(code=_rejection_code(body), detail=body)

    def _same_origin_or(self, url: object, fallback: str) -> str:
        return url if isinstance(url, str) and _origin(url) == self._origin else fallback


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        port = -1  # an unparseable port matches no origin
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def provider_error(response: httpx.Response) -> ClipChatError | None:
    """The error every adapter maps a non-2xx answer to alike (transient, rate limited, in flight,
    unauthorized); ``None`` for a 4xx refusal, which each adapter reads in its own terms."""
    status = response.status_code
    body = response.text[:DETAIL_CHARS]
    logger.warning("generation.http_error", extra={"status": status})
    kind = classify_status(status)
    wait = retry_after(response.headers)
    if kind is StatusKind.RATE_LIMITED:
        return TransientGenerationError(code="rate_limited", detail=body, retry_after=wait)
    if kind is StatusKind.IN_FLIGHT:
        # A create with the same Idempotency-Key is still being processed: ask again shortly.
        return TransientGenerationError(code="idempotency_conflict", detail=body, retry_after=wait)
    if kind is StatusKind.TRANSIENT:
        return TransientGenerationError(detail=f"HTTP {status}: {body}", retry_after=wait)
    if kind is StatusKind.UNAUTHORIZED:
        return ProviderMisconfigured(UNAUTHORIZED_MESSAGE, code="generator_unauthorized", detail=body)
    return None


# A provider's 4xx about ClipChat's own request: the code it is recorded under and the message.
MODEL_NOT_FOUND = ("generator_model_not_found", "The video generator model is not available. Please contact support.")
REQUEST_INVALID = ("generator_request_invalid",
                   "The video generator refused ClipChat's request format. Please contact support.")


def misconfiguration(response: httpx.Response, codes: Mapping[int, tuple[str, str]]) -> ClipChatError:
    """A non-2xx answer of an adapter whose 4xx answers are all about the request ClipChat sent:
    the common mapping first, then ``codes`` by status (else ``REQUEST_INVALID``)."""
    common = provider_error(response)
    if common is not None:
        return common
    code, message = codes.get(response.status_code, REQUEST_INVALID)
    return ProviderMisconfigured(message, code=code,
                                 detail=f"HTTP {response.status_code}: {response.text[:DETAIL_CHARS]}")


def _json_object(response: httpx.Response, method: str) -> dict[str, Any]:
    """A successful answer's JSON object; ``TransientGenerationError`` when it is malformed."""
    try:
        body = response.json()
    except ValueError as exc:
        raise _malformed(f"invalid JSON from {method}") from exc
    if not isinstance(body, dict):
        raise _malformed(f"JSON answer from {method} is not an object")
    return body


def _failure(prediction_id: str, error: object) -> TransientGenerationError | GenerationRejected:
    """Classify a failed prediction by its error text (see ``_TRANSIENT_FAILURE_MARKERS``)."""
    text = str(error or "")[:DETAIL_CHARS]
    logger.warning("generation.failed", extra={"prediction_id": prediction_id})
    if any(marker in text.lower() for marker in _TRANSIENT_FAILURE_MARKERS):
        return TransientGenerationError(code="generation_failed", detail=text)
    return GenerationRejected(code=_rejection_code(text), detail=text)


def _rejection_code(text: str) -> str:
    lowered = text.lower()
    return "content_policy" if any(m in lowered for m in _POLICY_MARKERS) else "invalid_prompt"


def _malformed(detail: str) -> TransientGenerationError:
    return TransientGenerationError(code="malformed_response", detail=detail)


def _download_failed(detail: str, retry_after: float | None = None) -> TransientGenerationError:
    return TransientGenerationError(_DOWNLOAD_MESSAGE, code="download_failed", detail=detail,
                                    retry_after=retry_after)


async def _write_checked(response: httpx.Response, partial: anyio.Path) -> None:
    """Write the body to ``partial``; raise ``TransientGenerationError`` unless it is a whole MP4."""
    declared = response.headers.get("content-length")
    # With a Content-Encoding the declared length is that of the encoded body, not of the file.
    encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
    expected = int(declared) if declared and declared.isdigit() and not encoded else None
    if expected is not None and expected > _MAX_CLIP_BYTES:
        raise _download_failed(f"declared size {expected} over the limit")
    head = b""
    size = 0
    async with await partial.open("wb") as file:
        async for chunk in response.aiter_bytes():
            if len(head) < 8:
                head += chunk[: 8 - len(head)]
            size += len(chunk)
            if size > _MAX_CLIP_BYTES:
                raise _download_failed("download over the size limit")
            await file.write(chunk)
    if expected is not None and size != expected:
        raise _download_failed(f"got {size} of {expected} bytes")
    # Every MP4 starts with an ``ftyp`` box: 4-byte big-endian size (at least 8), then the type.
    if size == 0 or head[4:8] != b"ftyp" or int.from_bytes(head[:4], "big") < 8:
        raise _download_failed(f"not an MP4 ({size} bytes)")


def _progress_of(body: Mapping[str, Any]) -> float | None:
    """The fraction done from ``progress`` (0..1) or else the last percentage in ``logs``."""
    progress = body.get("progress")
    if isinstance(progress, int | float) and not isinstance(progress, bool) and math.isfinite(progress):
        return min(max(float(progress), 0.0), 0.99)
    logs = body.get("logs")
    if isinstance(logs, str):
        found = _PERCENT_RE.findall(logs[-2000:])
        if found:
            return min(max(float(found[-1]) / 100, 0.0), 0.99)
    return None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _positive_number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
