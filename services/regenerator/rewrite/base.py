"""The rewriter interface: request, result, the ``PromptRewriter`` protocol and the chain."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from clipchat.errors import InvalidInput
from services.regenerator.rewrite.text import clean_text


@dataclass(frozen=True)
class RewriteResult:
    """A new prompt for the clip and what it cost to get it.

    ``rewriter`` is ``"template"``, ``"llm"`` or ``"modifier"``; ``summary`` is one sentence for the
    person ("Changed time of day to night; added rain."); ``usage`` holds the LLM's token counts
    (``prompt_tokens``, ``completion_tokens``, ``total_tokens``; ``estimated`` = 1 when the provider
    did not report them). ``style`` is the look the change gives, in a few words (time of day,
    weather, palette, lighting), so the other clips of a change can be given exactly the same ("":
    none; only the LLM gives one).
    """

    prompt: str
    summary: str
    cost: Decimal
    rewriter: str
    usage: dict[str, int] = field(default_factory=dict)
    style: str = ""


@dataclass
class RewriteRequest:
    """What a rewriter works from.

    ``original_prompt`` is the clip's current prompt (the one the instruction changes);
    ``history`` holds earlier turns about this clip, oldest first, as
    ``{"role": "user" | "assistant", "content": str}``; ``previous_prompt`` / ``next_prompt`` are
    the neighbouring clips' prompts, for continuity; ``reference_prompt`` is the prompt of the clip
    the instruction names as the look to match ("like clip 2", see ``reference_clip``);
    ``shared_style`` is the look another clip of the same change was given (its ``RewriteResult.style``),
    for this clip to take exactly (data for the model, like the prompts).
    ``idempotency_key``, when set, is sent with a paid request (``Idempotency-Key``) so that a
    provider can answer a repeat without charging again.
    """

    original_prompt: str
    instruction: str
    history: list[dict[str, str]] = field(default_factory=list)
    previous_prompt: str | None = None
    next_prompt: str | None = None
    reference_prompt: str | None = None
    shared_style: str | None = None
    idempotency_key: str = ""


# "like clip 2", "match clip 2", "the same look as clip 2": another clip's look, by the number the
# page shows (from 1).
REFERENCE = re.compile(r"\b(?:(?:look|looks|looking)\s+)?(?:like|match(?:es|ing)?|(?:the\s+)?same\s+"
                       r"(?:look|style|feel|colou?rs?|lighting)\s+as)\s+(?:that\s+of\s+|the\s+one\s+in\s+)?"
                       r"clip\s*(?:#|no\.?|number)?\s*(\d{1,4})\b", re.IGNORECASE)


def reference_clip(instruction: str) -> int | None:
    """The number (from 1, as the page shows it) of the clip an instruction asks to match, if any."""
    match = REFERENCE.search(instruction)
    return int(match.group(1)) if match else None


class PromptRewriter(Protocol):
    """Turns a clip prompt and an instruction into a new prompt.

    ``rewrite`` returns ``None`` when this rewriter does not handle the instruction, so that a
    chain can fall through to the next one. It raises the errors listed in the module docstring.
    """

    name: str

    async def rewrite(self, req: RewriteRequest) -> RewriteResult | None: ...


class ChainRewriter:
    """Tries each rewriter in order and returns the first result that is not ``None``.

    Errors are not swallowed: a transient LLM failure propagates so the caller's retry policy can
    run the whole chain again (the templates before it are deterministic and free).
    """

    name = "chain"

    def __init__(self, rewriters: Sequence[PromptRewriter]) -> None:
        if not rewriters:
            raise ValueError("a chain needs at least one rewriter")
        self._rewriters = list(rewriters)

    async def rewrite(self, req: RewriteRequest) -> RewriteResult | None:
        for rewriter in self._rewriters:
            result = await rewriter.rewrite(req)
            if result is not None:
                return result
        return None


def sanitize_instruction(text: str, max_chars: int) -> str:
    """The instruction as one line of visible text: control and invisible format characters
    removed, all whitespace (newlines included) collapsed to single spaces.

    Raises ``InvalidInput`` (codes ``empty_instruction`` / ``instruction_too_long``) when nothing
    is left or when more than ``max_chars`` characters are; ``ValueError`` when ``max_chars < 1``.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    cleaned = clean_text(text)
    if not cleaned:
        raise InvalidInput("Type what to change in the clip, for example “make it nighttime”.",
                           code="empty_instruction")
    if len(cleaned) > max_chars:
        raise InvalidInput(f"The instruction is too long ({len(cleaned):,} characters). "
                           f"Keep it under {max_chars:,} characters.", code="instruction_too_long")
    return cleaned
