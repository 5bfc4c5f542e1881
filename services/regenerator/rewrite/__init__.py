"""Instruction → new clip prompt: templates first (free), an LLM second, a plain modifier last.

A person picks one clip and types an instruction ("make it nighttime", "slower, more rain");
a ``PromptRewriter`` turns the clip's prompt and that instruction into the prompt the video
generator receives. ``ChainRewriter`` tries rewriters in order and takes the first answer:

- ``TemplateRewriter`` (``templates.py``, its table in ``template_table.py``) handles common, fully
  understood instructions deterministically, for free.
- ``LLMRewriter`` (``llm.py``) asks an OpenAI-compatible Chat Completions API for everything else.
- ``ModifierRewriter`` (``modifier.py``) is the honest fallback without an LLM: the instruction is
  appended to the prompt as written, and the result says so (``rewriter == "modifier"``).

Errors, in the terms of ``clipchat.errors``:

- ``InvalidInput`` from ``sanitize_instruction``: an empty or over-long instruction.
- ``LLMUnavailable`` (a ``TransientError``, retryable, with ``retry_after``): timeouts, connection
  errors, HTTP 408/409/429/5xx, a response body that is not the expected JSON.
- ``ProviderRejected`` (an ``InvalidInput``, permanent): any other HTTP 4xx (content policy, a bad
  request) or a refusal by the model; ``detail`` carries the provider's answer.
- ``ProviderMisconfigured`` (permanent, for an operator): the LLM refused ClipChat's credentials.
- ``RewriteRejected`` (an ``InvalidInput``, permanent): the model answered, but its prompt is not
  usable (empty, too long, a URL, control characters, its own instructions repeated).

Nothing here retries: the caller declares its retry policy around ``rewrite``.
"""

from services.regenerator.rewrite.base import (
    ChainRewriter,
    PromptRewriter,
    RewriteRequest,
    RewriteResult,
    reference_clip,
    sanitize_instruction,
)
from services.regenerator.rewrite.llm import (
    BUSY_MESSAGE,
    POLICY_MESSAGE,
    TIMEOUT_MESSAGE,
    LLMRewriter,
    LLMUnavailable,
    ProviderRejected,
    RewriteRejected,
)
from services.regenerator.rewrite.modifier import ModifierRewriter
from services.regenerator.rewrite.templates import TemplateRewriter

__all__ = [
    "BUSY_MESSAGE",
    "POLICY_MESSAGE",
    "TIMEOUT_MESSAGE",
    "ChainRewriter",
    "LLMRewriter",
    "LLMUnavailable",
    "ModifierRewriter",
    "PromptRewriter",
    "ProviderRejected",
    "RewriteRejected",
    "RewriteRequest",
    "RewriteResult",
    "TemplateRewriter",
    "reference_clip",
    "sanitize_instruction",
]
