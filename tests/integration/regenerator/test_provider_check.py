"""``clipchat providers check`` against the fakes: what answers, with what, and nothing spent."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from clipchat.settings import Settings
from services.regenerator.provider_check import check_generator, check_llm, check_providers
from tests.fakes import fal_server, replicate_server
from tests.fakes.fal_server import FalServer
from tests.fakes.llm_server import MODEL, FakeLLMServer
from tests.fakes.replicate_server import ReplicateServer

VIDEO = b"\x00\x00\x00\x18ftypmp42"  # never downloaded here


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg, arg-type]


@pytest.fixture
def llm() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(api_key="key", flavor="vllm") as server:
        yield server


@pytest.fixture
def replicate() -> Iterator[ReplicateServer]:
    with ReplicateServer(video=VIDEO) as server:
        yield server


async def test_a_working_llm_and_replicate_cost_nothing(llm: FakeLLMServer, replicate: ReplicateServer) -> None:
    config = settings(llm_base_url=llm.url, llm_model=MODEL, llm_api_key="key", generator="replicate",
                      generator_url=replicate.url, generator_api_token="test-token",
                      generator_model=replicate_server.MODEL)
    async with httpx.AsyncClient() as http:
        results = await check_providers(config, http=http)

    assert [(r.part, r.ok) for r in results] == [("llm", True), ("generator", True)]
    assert f"model {MODEL} found" in results[0].summary
    assert "account clipchat-tests" in results[1].summary and "acme/video-1 found" in results[1].summary
    assert not llm.calls and not replicate.creates  # no completion, no prediction


async def test_the_probe_learns_the_structured_output_mode(llm: FakeLLMServer) -> None:
    config = settings(llm_base_url=llm.url, llm_model=MODEL, llm_api_key="key")
    async with httpx.AsyncClient() as http:
        result = await check_llm(config, http, probe=True)

    assert result.ok and "structured output json_object" in result.summary
    assert [c.response_format for c in llm.calls] == ["json_schema", "json_object"]


@pytest.mark.parametrize(("values", "expected"), [
    ({"llm_api_key": "wrong"}, "the API key was refused (HTTP 401)"),
    ({"llm_api_key": "key", "llm_model": "other-model"}, "model other-model is not among the 1 it serves"),
])
async def test_llm_problems_are_named(llm: FakeLLMServer, values: dict[str, str], expected: str) -> None:
    config = settings(**{"llm_base_url": llm.url, "llm_model": MODEL, **values})
    async with httpx.AsyncClient() as http:
        result = await check_llm(config, http)
    assert not result.ok and expected in result.summary


@pytest.mark.parametrize(("model", "token", "expected"), [
    ("acme/video-1", "wrong", "the token was refused (HTTP 401)"),
    ("acme/missing", "test-token", "model acme/missing not found (HTTP 404)"),
    (f"acme/video-1:{replicate_server.VERSION}", "test-token", "found"),
])
async def test_replicate_token_and_model(replicate: ReplicateServer, model: str, token: str, expected: str) -> None:
    config = settings(generator="replicate", generator_url=replicate.url, generator_api_token=token,
                      generator_model=model)
    async with httpx.AsyncClient() as http:
        result = await check_generator(config, http)
    assert result.ok is (expected == "found") and expected in result.summary


@pytest.mark.parametrize(("token", "ok"), [("test-token", True), ("wrong", False)])
async def test_fal_key(token: str, ok: bool) -> None:
    with FalServer(video=VIDEO) as fal:
        config = settings(generator="fal", generator_url=fal.url, generator_api_token=token,
                          generator_model=fal_server.MODEL)
        async with httpx.AsyncClient() as http:
            result = await check_generator(config, http)
        assert not fal.creates
    assert result.ok is ok


def test_the_cli_prints_one_line_each_and_fails_on_a_problem(llm: FakeLLMServer, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPCHAT_")}
    env.update({"CLIPCHAT_DATA_DIR": str(tmp_path), "CLIPCHAT_LLM_BASE_URL": llm.url, "CLIPCHAT_LLM_MODEL": MODEL,
                "CLIPCHAT_LLM_API_KEY": "wrong"})
    done = subprocess.run([sys.executable, "-m", "launcher.cli", "providers", "check"], env=env,
                          capture_output=True, text=True, timeout=60)

    lines = done.stdout.splitlines()
    assert done.returncode == 1, done.stderr
    assert lines[0].startswith("llm        FAILED") and "refused" in lines[0]
    assert lines[1] == "generator  ok      local ffmpeg renderer"
