"""Choosing a video generator by settings: a closed set of names, checked before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipchat.settings import InvalidSettings, Settings
from services.regenerator.model_inputs import INPUT_MAPPINGS


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg, arg-type]


@pytest.mark.parametrize("name", ["replicat", "openai", "HTTP", ""])
def test_an_unknown_generator_is_refused_in_one_line(name: str) -> None:
    with pytest.raises(InvalidSettings) as caught:
        settings(generator=name)
    assert str(caught.value) == f"CLIPCHAT_GENERATOR={name!r} is not one of local, http, replicate, fal."


@pytest.mark.parametrize(("values", "named"), [
    ({"generator": "replicate", "generator_model": "acme/video-1"}, "CLIPCHAT_GENERATOR_API_TOKEN"),
    ({"generator": "replicate", "generator_api_token": "t"}, "is not a Replicate model"),
    ({"generator": "replicate", "generator_api_token": "t", "generator_model": "acme/video:abc"},
     "is not a Replicate model"),
    ({"generator": "fal", "generator_api_token": "t", "generator_model": "kling"}, "is not a fal model id"),
])
def test_a_paid_generator_needs_its_token_and_a_model_of_its_form(values: dict[str, str], named: str) -> None:
    with pytest.raises(InvalidSettings) as caught:
        settings(**values)
    assert named in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("model", ["acme/video-1", f"acme/video-1:{'a' * 64}", "b" * 64])
def test_the_three_forms_of_a_replicate_model(model: str) -> None:
    assert settings(generator="replicate", generator_api_token="t", generator_model=model).generator_model == model


def test_production_refuses_http_outputs_from_loopback() -> None:
    with pytest.raises(InvalidSettings) as caught:
        settings(environment="production", generator_allow_http_loopback=True, media_signing_key="k" * 40,
                 auth_tokens="a" * 30 + "=alice", service_token="s" * 30)
    assert "CLIPCHAT_GENERATOR_ALLOW_HTTP_LOOPBACK" in str(caught.value)


def test_serve_refuses_an_unknown_generator_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "CLIPCHAT_GENERATOR": "replicat", "CLIPCHAT_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "launcher.cli", "serve", "regenerator"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: invalid CLIPCHAT_* configuration: CLIPCHAT_GENERATOR='replicat' is not one of "
        "local, http, replicate, fal."]


@pytest.mark.parametrize(("adapter", "duration", "expected"), [
    ("http", 4.2, {"prompt": "p", "duration": 4.2}),
    ("replicate", 4.2, {"prompt": "p", "duration": 5, "aspect_ratio": "16:9"}),
    ("replicate", 6.0, {"prompt": "p", "duration": 10, "aspect_ratio": "16:9"}),
    ("fal", 5.0, {"prompt": "p", "duration": "5", "aspect_ratio": "16:9"}),
    ("fal", 12.0, {"prompt": "p", "duration": "10", "aspect_ratio": "16:9"}),
])
def test_the_model_input_of_each_adapter(adapter: str, duration: float, expected: dict[str, object]) -> None:
    assert INPUT_MAPPINGS[adapter].build("p", duration, "16:9") == expected
