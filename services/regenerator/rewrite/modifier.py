"""The no-LLM fallback: the instruction appended to the prompt as written."""

from __future__ import annotations

from decimal import Decimal

from services.regenerator.rewrite.base import RewriteRequest, RewriteResult
from services.regenerator.rewrite.text import clean_text, truncate_words


class ModifierRewriter:
    """Appends the instruction to the prompt as written; used when no LLM is configured.

    The instruction is cleaned (one line, no control characters, no trailing punctuation) and
    capped at ``max_modifier_chars``; the prompt is shortened, never the instruction first, so the
    result fits ``max_prompt_chars``. Always returns a result and never raises; the summary says
    that no AI rewrite was used.
    """

    name = "modifier"

    def __init__(self, max_prompt_chars: int = 1000, max_modifier_chars: int = 300) -> None:
        if max_prompt_chars < max_modifier_chars + 2 or max_modifier_chars < 1:
            raise ValueError("max_prompt_chars must leave room for the modifier")
        self._max_prompt_chars = max_prompt_chars
        self._max_modifier_chars = max_modifier_chars

    async def rewrite(self, req: RewriteRequest) -> RewriteResult:
        prompt = clean_text(req.original_prompt)
        modifier = truncate_words(clean_text(req.instruction), self._max_modifier_chars).strip(" .,;:")
        if not modifier:
            return RewriteResult(prompt=truncate_words(prompt, self._max_prompt_chars),
                                 summary="The instruction was empty, so the prompt is unchanged.",
                                 cost=Decimal("0"), rewriter=self.name)
        base = truncate_words(prompt, self._max_prompt_chars - len(modifier) - 2).rstrip(" .,;:")
        return RewriteResult(prompt=f"{base}, {modifier}" if base else modifier,
                             summary="Added your instruction to the prompt as written (no AI rewrite).",
                             cost=Decimal("0"), rewriter=self.name)
