"""A ``VideoGenerator`` on fal's queue API (``CLIPCHAT_GENERATOR=fal``).

As fal's queue reference documents it:

- submit: ``POST https://queue.fal.run/{model_id}`` with the model's input as the body; the answer
  holds ``request_id``, ``status_url``, ``response_url`` and ``cancel_url``.
- status: ``GET {status_url}`` (``?logs=1`` adds the runner's log lines) → ``status`` is
  ``IN_QUEUE`` (with ``queue_position``), ``IN_PROGRESS`` or ``COMPLETED`` (with
  ``metrics.inference_time``, and ``error`` / ``error_type`` when the request failed).
- result: ``GET {response_url}`` → the model's output, for a video model ``{"video": {"url": …}}``
  with the file on fal's CDN (``fal.media`` and its subdomains); a failed request answers with an
  error status here (``{"detail": …}``: a string and an ``error_type`` for platform errors, a list
  of typed items for the model's own validation).
- cancel: ``PUT {cancel_url}`` (202 ``CANCELLATION_REQUESTED``, 400 ``ALREADY_COMPLETED``).
- authentication: ``Authorization: Key <key>``.

The request URLs of a model id with a sub-path (``fal-ai/kling-video/v2.1/standard/text-to-video``)
use its first two segments (``fal-ai/kling-video/requests/{id}``); that is how a recorded request
is found again to resume it.

Errors: 429 and 5xx are transient; 401/403 (key, or a locked account), 404 (model) and other 4xx
on submit (an input the model refuses) are ``ProviderMisconfigured``; a failed request is classified
by its error (a content-policy refusal is ``GenerationRejected`` with code ``content_policy``;
platform timeouts and runner failures are transient).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx

from clipchat.errors import ClipChatError
from clipchat.providers import DETAIL_CHARS
from services.regenerator.http_generator import (
    MODEL_NOT_FOUND,
    GenerationRejected,
    HttpVideoGenerator,
    PollState,
    RemotePrediction,
    TransientGenerationError,
    misconfiguration,
)
from services.regenerator.model_inputs import INPUT_MAPPINGS

FAL_QUEUE = "https://queue.fal.run"
FAL_OUTPUT_HOSTS = ("fal.media", "*.fal.media")

_PENDING = frozenset({"IN_QUEUE", "IN_PROGRESS"})
_POLICY_TYPES = ("content_policy", "content_policy_violation", "nsfw")
# fal's platform error types that a later attempt may not hit (see its request-errors reference).
_TRANSIENT_TYPES = ("timeout", "runner", "internal_error", "client_disconnected")
_MISCONFIGURED: dict[int, tuple[str, str]] = {404: MODEL_NOT_FOUND}


class FalVideoGenerator(HttpVideoGenerator):
    """Generates clips with a model on fal's queue."""

    name = "fal"
    default_base_url = FAL_QUEUE
    auth_scheme = "Key"
    cancel_method = "PUT"
    id_field = "request_id"

    def _create_request(self, prompt: str, duration: float) -> tuple[str, dict[str, Any], dict[str, str]]:
        model_input = INPUT_MAPPINGS[self.name].build(prompt, duration, self._aspect_ratio)
        return f"{self._base_url}/{self._model.strip('/')}", model_input, {}

    def _requests_url(self, request_id: str) -> str:
        app = "/".join(self._model.strip("/").split("/")[:2])
        return f"{self._base_url}/{app}/requests/{quote(request_id, safe='')}"

    def _own_url(self, prediction_id: str) -> str:
        return f"{self._requests_url(prediction_id)}/status"

    def _track(self, prediction: RemotePrediction, prediction_id: str, body: Mapping[str, Any]) -> None:
        """Remember the status, result and cancel URLs (fal's own, when on the API's origin)."""
        prediction.id = prediction_id
        own = self._requests_url(prediction_id)
        prediction.get_url = self._same_origin_or(body.get("status_url"), f"{own}/status") + "?logs=1"
        prediction.result_url = self._same_origin_or(body.get("response_url"), own)
        prediction.cancel_url = self._same_origin_or(body.get("cancel_url"), f"{own}/cancel")

    def _state(self, prediction: RemotePrediction, body: Mapping[str, Any]) -> PollState:
        """A submit answer (no ``status`` yet: queued) or a status answer."""
        status = body.get("status", "IN_QUEUE")
        if status in _PENDING:
            return PollState("pending", fraction=_progress_of(body.get("logs")))
        if status != "COMPLETED":
            raise TransientGenerationError(code="malformed_response", detail=f"unknown fal status {status!r}")
        metrics = body.get("metrics")
        inference = metrics.get("inference_time") if isinstance(metrics, Mapping) else None
        if isinstance(inference, int | float) and not isinstance(inference, bool) and inference > 0:
            prediction.compute_seconds = float(inference)
        error = body.get("error")
        if error:
            return PollState("failed", error=f"{body.get('error_type') or ''} {error}".strip())
        return PollState("succeeded")

    async def _result(self, prediction: RemotePrediction, body: dict[str, Any]) -> dict[str, Any]:
        """Read the completed request's output from its response URL."""
        response = await self._send("GET", prediction.result_url)
        if response.is_success:
            try:
                result = response.json()
            except ValueError:
                result = None
            if isinstance(result, dict):
                return result
            raise TransientGenerationError(code="malformed_response", detail="fal result is not a JSON object")
        raise _result_error(prediction.id, response)

    def _output_url(self, result: Mapping[str, Any]) -> object:
        video = result.get("video")
        return video.get("url") if isinstance(video, Mapping) else None

    def _error_for(self, response: httpx.Response) -> ClipChatError:
        """A 4xx on submit or status is about the request ClipChat sent (see the module docstring)."""
        return misconfiguration(response, _MISCONFIGURED)


def _result_error(request_id: str, response: httpx.Response) -> ClipChatError:
    """The error a failed request's result answer means: a policy refusal, a platform failure
    worth retrying, or a request the model's schema refused."""
    text = response.text[:DETAIL_CHARS]
    kinds = _error_types(response)
    if any(policy in kind for kind in kinds for policy in _POLICY_TYPES):
        return GenerationRejected(code="content_policy", detail=text)
    if response.status_code >= 500 or any(t in kind for kind in kinds for t in _TRANSIENT_TYPES):
        return TransientGenerationError(code="generation_failed", detail=f"fal request {request_id}: {text}",
                                        retry_after=None)
    return misconfiguration(response, {})


def _error_types(response: httpx.Response) -> list[str]:
    """The ``error_type`` of a platform error and the ``type`` of each item of a model's ``detail``."""
    kinds = [response.headers.get("x-fal-error-type", "")]
    try:
        body = response.json()
    except (ValueError, json.JSONDecodeError):
        return [k for k in kinds if k]
    if isinstance(body, Mapping):
        kinds.append(str(body.get("error_type") or ""))
        detail = body.get("detail")
        if isinstance(detail, list):
            kinds += [str(item.get("type") or "") for item in detail if isinstance(item, Mapping)]
    return [k.lower() for k in kinds if k]


def _progress_of(logs: object) -> float | None:
    """The last percentage in the runner's log lines, as a fraction below 1."""
    if not isinstance(logs, list):
        return None
    for line in reversed(logs):
        message = line.get("message") if isinstance(line, Mapping) else None
        if isinstance(message, str) and message.rstrip().endswith("%"):
            try:
                return min(max(float(message.rstrip()[:-1].split()[-1]) / 100, 0.0), 0.99)
            except ValueError:
                continue
    return None
