"""``clipchat providers check``: do the configured LLM and video generator answer, and with what?

Each check spends nothing where the provider offers a free endpoint for it:

- LLM: ``GET {base}/models`` (OpenAI, vLLM, Ollama and LiteLLM all serve it): the key accepted and
  the model listed. With ``probe_llm`` one small rewrite is sent as well (a few tokens, priced as
  usual) to learn which structured-output mode the server takes.
- Replicate: ``GET /v1/account`` (the token) and ``GET /v1/models/{owner}/{name}`` or
  ``…/versions/{id}`` (the model or version).
- fal: ``GET`` the status of a request that does not exist: 401/403 means the key is refused, 404
  that the queue accepted the key. fal has no free model lookup, so the model is not checked.
- the generic ``http`` API: its base URL answers.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from urllib.parse import quote

import httpx

from clipchat.errors import ClipChatError
from clipchat.settings import Settings
from services.regenerator.fal_generator import FAL_QUEUE
from services.regenerator.replicate_generator import REPLICATE_API
from services.regenerator.rewrite import LLMRewriter, RewriteRequest


@dataclass(frozen=True)
class CheckResult:
    """One provider's answer: ``ok`` and one line saying what was found."""

    part: str  # "llm" | "generator"
    ok: bool
    summary: str


async def check_providers(settings: Settings, *, http: httpx.AsyncClient, probe_llm: bool = False) -> list[CheckResult]:
    """The LLM's and the generator's check results, in that order; never raises for a provider."""
    return [await check_llm(settings, http, probe=probe_llm), await check_generator(settings, http)]


async def check_llm(settings: Settings, http: httpx.AsyncClient, *, probe: bool = False) -> CheckResult:
    if not settings.llm_base_url:
        return CheckResult("llm", True, "not configured: templates first, then the instruction added as written")
    base = settings.llm_base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {settings.llm_api_key}"} if settings.llm_api_key else {}
    answer = await _get(http, f"{base}/models", headers)
    if isinstance(answer, str):
        return CheckResult("llm", False, f"{base}: {answer}")
    if answer.status_code in (401, 403):
        return CheckResult("llm", False, f"{base}: the API key was refused (HTTP {answer.status_code})")
    if not answer.is_success:
        return CheckResult("llm", False, f"{base}/models answered HTTP {answer.status_code}")
    models = _model_ids(answer)
    if settings.llm_model not in models:
        return CheckResult("llm", False, f"{base}: key accepted, but model {settings.llm_model} is not among "
                                         f"the {len(models)} it serves")
    found = f"{base}: key accepted, model {settings.llm_model} found"
    if not probe:
        return CheckResult("llm", True, f"{found}; structured output learnt on the first rewrite "
                                        "(--probe-llm to try it now)")
    return await _probe_llm(settings, http, found)


async def _probe_llm(settings: Settings, http: httpx.AsyncClient, found: str) -> CheckResult:
    rewriter = LLMRewriter(settings.llm_base_url, settings.llm_model, settings.llm_api_key,
                           timeout_seconds=settings.llm_timeout_seconds,
                           price_per_1k_input=settings.llm_price_per_1k_input,
                           price_per_1k_output=settings.llm_price_per_1k_output, http=http)
    try:
        result = await rewriter.rewrite(RewriteRequest("a red kite over a beach", "make it sunset"))
    except ClipChatError as exc:
        return CheckResult("llm", False, f"{found}; a test rewrite failed: {exc.code} "
                                         f"(mode {rewriter.structured_output_mode})")
    return CheckResult("llm", True, f"{found}; structured output {rewriter.structured_output_mode} "
                                    f"(the test rewrite cost {result.cost})")


async def check_generator(settings: Settings, http: httpx.AsyncClient) -> CheckResult:
    if settings.generator == "local":
        return CheckResult("generator", True, "local ffmpeg renderer")
    if settings.generator == "replicate":
        return await _check_replicate(settings, http)
    if settings.generator == "fal":
        return await _check_fal(settings, http)
    answer = await _get(http, settings.generator_url, {})
    if isinstance(answer, str):
        return CheckResult("generator", False, f"http {settings.generator_url}: {answer}")
    return CheckResult("generator", True, f"http {settings.generator_url} answers (HTTP {answer.status_code})")


async def _check_replicate(settings: Settings, http: httpx.AsyncClient) -> CheckResult:
    base = (settings.generator_url or REPLICATE_API).rstrip("/")
    headers = {"Authorization": f"Bearer {settings.generator_api_token}"}
    account = await _get(http, f"{base}/v1/account", headers)
    if isinstance(account, str):
        return CheckResult("generator", False, f"replicate {base}: {account}")
    if not account.is_success:
        return CheckResult("generator", False, f"replicate {base}: the token was refused (HTTP {account.status_code})")
    who = f"replicate {base}: token accepted (account {_field(account, 'username')})"
    name, _, version = settings.generator_model.partition(":")
    if "/" not in name:
        return CheckResult("generator", True, f"{who}; version id {name[:12]}… not looked up")
    owner, model = name.split("/", 1)
    path = f"/v1/models/{quote(owner, safe='')}/{quote(model, safe='')}"
    path += f"/versions/{quote(version, safe='')}" if version else ""
    found = await _get(http, base + path, headers)
    if isinstance(found, str) or not found.is_success:
        status = found if isinstance(found, str) else f"HTTP {found.status_code}"
        return CheckResult("generator", False, f"{who}; model {settings.generator_model} not found ({status})")
    return CheckResult("generator", True, f"{who}; model {settings.generator_model} found")


async def _check_fal(settings: Settings, http: httpx.AsyncClient) -> CheckResult:
    base = (settings.generator_url or FAL_QUEUE).rstrip("/")
    app = "/".join(settings.generator_model.strip("/").split("/")[:2])
    answer = await _get(http, f"{base}/{app}/requests/{uuid.uuid4()}/status",
                        {"Authorization": f"Key {settings.generator_api_token}"})
    if isinstance(answer, str):
        return CheckResult("generator", False, f"fal {base}: {answer}")
    if answer.status_code in (401, 403):
        return CheckResult("generator", False, f"fal {base}: the key was refused (HTTP {answer.status_code})")
    return CheckResult("generator", True, f"fal {base}: key accepted by the queue; model "
                                          f"{settings.generator_model} not looked up (fal has no free lookup)")


async def _get(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> httpx.Response | str:
    """The answer to ``GET url``, or why there was none."""
    try:
        return await http.get(url, headers=headers, follow_redirects=False)
    except httpx.HTTPError as exc:
        return f"no answer ({type(exc).__name__})"


def _model_ids(response: httpx.Response) -> list[str]:
    try:
        data = response.json().get("data")
    except (ValueError, AttributeError):
        return []
    return [str(m.get("id")) for m in data if isinstance(m, dict)] if isinstance(data, list) else []


def _field(response: httpx.Response, name: str) -> str:
    try:
        return str(response.json().get(name) or "?")
    except (ValueError, AttributeError):
        return "?"
