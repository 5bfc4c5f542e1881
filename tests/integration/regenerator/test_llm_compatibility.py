"""``LLMRewriter`` against the shapes OpenAI, vLLM and Ollama's OpenAI-compatible endpoints answer,
and its structured-output fallback: json_schema → json_object with the schema in the prompt → text."""

from __future__ import annotations

import json
import logging
from decimal import Decimal

import pytest

from services.regenerator.rewrite import LLMRewriter, ProviderRejected, RewriteRejected, RewriteRequest
from services.regenerator.rewrite.llm import STRUCTURED_OUTPUT_MODES
from tests.fakes.llm_server import MODEL, FakeLLMServer, Flavor

PROMPT = "a dancer on a rooftop on a sunny afternoon"
INSTRUCTION = "make the dancer wear a red coat"
EXPECTED = f"{PROMPT}, {INSTRUCTION}"
PRICE = Decimal("1.00")


def make_rewriter(url: str) -> LLMRewriter:
    return LLMRewriter(url, MODEL, "", timeout_seconds=2.0, price_per_1k_input=PRICE, price_per_1k_output=PRICE)


def request(instruction: str = INSTRUCTION) -> RewriteRequest:
    return RewriteRequest(original_prompt=PROMPT, instruction=instruction, idempotency_key="r1:rewrite:1.1")


@pytest.mark.parametrize(("flavor", "formats", "mode"), [
    ("openai", None, "json_schema"),
    ("vllm", None, "json_object"),
    ("ollama", None, "json_object"),
    ("ollama", (), "text"),
    ("openai", (), "text"),
])
async def test_each_server_shape_gives_the_same_checked_prompt(
        flavor: Flavor, formats: tuple[str, ...] | None, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="clipchat.regenerator.llm")
    with FakeLLMServer(flavor=flavor, formats=formats) as server:
        async with make_rewriter(server.url) as llm:
            result = await llm.rewrite(request())
            assert llm.structured_output_mode == mode

    assert result.prompt == EXPECTED and result.rewriter == "llm"
    assert result.summary == f"Applied the instruction: {INSTRUCTION}."
    usage = server.answers[-1]["usage"]
    assert result.cost == (Decimal(usage["prompt_tokens"] + usage["completion_tokens"]) * PRICE / 1000).quantize(
        Decimal("0.0001"))
    tried = [c.response_format for c in server.calls]
    assert tried == list(STRUCTURED_OUTPUT_MODES[:STRUCTURED_OUTPUT_MODES.index(mode) + 1])
    answered = server.calls[-1]
    if mode != "json_schema":  # the schema travels in the prompt instead
        assert '"required": ["prompt", "summary", "style"]' in answered.contents("system")[0]
        assert answered.idempotency_key == f"r1:rewrite:1.1.{mode}"
    else:
        assert answered.idempotency_key == "r1:rewrite:1.1"
    fallbacks = [r for r in caplog.records if r.getMessage() == "llm.structured_output_mode"]
    assert [r.mode for r in fallbacks] == tried[1:]  # type: ignore[attr-defined]


async def test_the_mode_that_worked_is_remembered() -> None:
    with FakeLLMServer(flavor="vllm") as server:
        async with make_rewriter(server.url) as llm:
            await llm.rewrite(request())
            await llm.rewrite(request("make it snow"))

    assert [c.response_format for c in server.calls] == ["json_schema", "json_object", "json_object"]


@pytest.mark.parametrize(("flavor", "formats"), [("openai", None), ("vllm", None), ("ollama", ())])
async def test_every_mode_checks_the_answer_the_same_way(flavor: Flavor, formats: tuple[str, ...] | None) -> None:
    """A URL in the prompt is refused whichever way the answer's shape was asked for."""
    bad = json.dumps({"prompt": "a dancer, see https://example.com", "summary": "Done."})
    with FakeLLMServer(flavor=flavor, formats=formats) as server:
        server.script([f"content:{bad}"])
        async with make_rewriter(server.url) as llm:
            with pytest.raises(RewriteRejected) as caught:
                await llm.rewrite(request())

    assert caught.value.detail == "the answer contains a URL" and caught.value.cost > 0


async def test_text_without_a_json_object_is_rejected() -> None:
    with FakeLLMServer(flavor="ollama", formats=()) as server:
        server.script(["content:Sure! A dancer in a red coat on a rooftop."])
        async with make_rewriter(server.url) as llm:
            with pytest.raises(RewriteRejected) as caught:
                await llm.rewrite(request())

    assert caught.value.detail == "the model's answer is not JSON"


async def test_a_400_about_something_else_is_not_a_fallback() -> None:
    with FakeLLMServer(flavor="openai") as server:
        server.script(["400"])
        async with make_rewriter(server.url) as llm:
            with pytest.raises(ProviderRejected) as caught:
                await llm.rewrite(request())
            assert llm.structured_output_mode == "json_schema"

    assert caught.value.code == "llm_rejected" and len(server.calls) == 1
