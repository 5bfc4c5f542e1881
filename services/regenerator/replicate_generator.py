"""A ``VideoGenerator`` on Replicate's HTTP API (``CLIPCHAT_GENERATOR=replicate``).

As Replicate's API reference documents it:

- create: ``POST /v1/models/{owner}/{name}/predictions`` with ``{"input": …}`` when the model is
  ``owner/name`` (an official model, or the latest version of a community one), else ``POST
  /v1/predictions`` with ``{"version": …, "input": …}`` (``owner/name:version_id`` or a bare
  64-hex version id). ``Prefer: wait=N`` (1–60 s) lets a short job finish within the create call.
- the answer and every poll are a prediction: ``id``, ``status`` (``starting``, ``processing``,
  ``succeeded``, ``failed``, ``canceled``), ``urls.get`` to poll, ``urls.cancel`` to cancel
  (``POST``), ``output`` (a URL string or a list of URLs, served from ``replicate.delivery``),
  ``error``, ``logs`` and ``metrics.predict_time`` (the compute seconds billed).
- authentication: ``Authorization: Bearer <token>``.

Errors: 429 (with ``Retry-After``) and 5xx are transient; 401/403 (token), 402 (the account's
credit), 404 (model or version) and 422 or any other 4xx (an input the model's schema refuses)
are about ClipChat's configuration, not the person's instruction: ``ProviderMisconfigured``.
A prediction that fails is classified by its error text, as in ``http_generator``.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import httpx

from clipchat.errors import ClipChatError
from services.regenerator.http_generator import MODEL_NOT_FOUND, HttpVideoGenerator, misconfiguration
from services.regenerator.model_inputs import INPUT_MAPPINGS

REPLICATE_API = "https://api.replicate.com"
REPLICATE_OUTPUT_HOSTS = ("replicate.delivery", "*.replicate.delivery")

_MODEL = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name, without a version
# Replicate's 4xx answers other than 401/403/409/429, each with its code and message.
_MISCONFIGURED: dict[int, tuple[str, str]] = {
    402: ("generator_payment_required", "The video generator account is out of credit. Please contact support."),
    404: MODEL_NOT_FOUND,
}


class ReplicateVideoGenerator(HttpVideoGenerator):
    """Generates clips with a Replicate model; ``prefer_wait`` (0–60 s) asks the create call to
    wait that long for the prediction to finish (0: do not ask, poll from the start)."""

    name = "replicate"
    default_base_url = REPLICATE_API

    def __init__(self, base_url: str, api_token: str, model: str, *, prefer_wait: int = 0,
                 **options: Any) -> None:
        if not 0 <= prefer_wait <= 60:
            raise ValueError("prefer_wait is 0 to 60 seconds")
        super().__init__(base_url, api_token, model, **options)
        self._prefer_wait = prefer_wait
        # A create that waits must not time out first: a retry after that would pay twice.
        self._request_timeout = max(self._request_timeout, prefer_wait + 10.0)

    def _create_request(self, prompt: str, duration: float) -> tuple[str, dict[str, Any], dict[str, str]]:
        model_input = INPUT_MAPPINGS[self.name].build(prompt, duration, self._aspect_ratio)
        headers = {"Prefer": f"wait={self._prefer_wait}"} if self._prefer_wait else {}
        if _MODEL.fullmatch(self._model):
            owner, name = self._model.split("/")
            url = f"{self._base_url}/v1/models/{quote(owner, safe='')}/{quote(name, safe='')}/predictions"
            return url, {"input": model_input}, headers
        return f"{self._base_url}/v1/predictions", {"version": self._model, "input": model_input}, headers

    def _own_url(self, prediction_id: str) -> str:
        return f"{self._base_url}/v1/predictions/{quote(prediction_id, safe='')}"

    def _error_for(self, response: httpx.Response) -> ClipChatError:
        """Replicate's 4xx answers are about the request ClipChat sent (see the module docstring)."""
        return misconfiguration(response, _MISCONFIGURED)
